"""Image/label file pairs as a Grain random-access source, with the bad-input policy and a cache.

`FileSource` reads the pairs a dataset reader lists (`segjax.data.readers`):
RGB images and label files decoded to train ids through the dataset's
`LabelFormat`, optionally resized to a working resolution (images bicubic,
labels nearest, like AdaptSegNet and ADVENT). Records are
{'image': (H, W, 3) uint8, 'label': (H, W) uint8}; unlabelled sets have no
'label'.

Bad input. Start-up problems (no root, an empty split, images without labels)
are `DataError`s raised by the readers. A file that fails while training (an
unreadable or truncated image, a label with ids outside the mapping, a
label/image size mismatch) raises a `DataError` naming the file and the
problem (a subclass per kind: `MissingFile`, `UnreadableFile`,
`BadLabelFormat`, `BadLabelValues`, `SizeMismatch`), or, with
`on_error='skip'`, is replaced by the next readable record and counted
(`FileSource.skipped`). Each bad example is warned about once, naming its
file, and not read again: a run draws it many times over its epochs. A label whose size
differs from its image follows `on_size_mismatch`: 'fail' (an error, or a
skip under on_error='skip'), 'skip', or 'resize' (the label is resized to the
image, nearest neighbour: the GTA5 fixer's policy). A label is never guessed.
`python -m segjax.tools.check_data` reads every file of a config's datasets
and reports these problems by kind before a run meets them.

The cache (`build_cache`, run by `python -m segjax.tools.cache_data`) writes
each record after decoding and resizing, so a run that finds it reads small
files that need no mapping: images as JPEG (quality 95) or PNG, labels as
train-id PNGs. A cache is keyed by everything that changes its content
(dataset, root, split, list, resize, format) and counts as present only once
its manifest, written last, exists.
"""

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image

from segjax import errors


CACHE_MANIFEST = "manifest.json"
_CACHE_VERSION = 1


class DataError(errors.UserError, ValueError):
  """A dataset tree or file that cannot be used; the message names it and says what was expected."""


class MissingFile(DataError):
  """A listed image or label file does not exist."""


class UnreadableFile(DataError):
  """An image or label file exists but cannot be decoded (corrupt, truncated, not an image)."""


class BadLabelFormat(DataError):
  """A label file of the wrong kind for its dataset (a colour image, the wrong bit depth)."""


class BadLabelValues(DataError):
  """A label holds ids (or colours) outside its dataset's mapping."""


class SizeMismatch(DataError):
  """A label whose size differs from its image's."""


def _read_error(what: str, path: str, error: Exception) -> DataError:
  if isinstance(error, FileNotFoundError):
    return MissingFile(f"Cannot read the {what} {path}: it does not exist.")
  return UnreadableFile(f"Cannot read the {what} {path}: {error}")


@dataclasses.dataclass(frozen=True)
class LabelFormat:
  """How a dataset stores labels, and the table that maps them to train ids.

  kind: 'ids' (a single-channel 8-bit PNG of class indices, mode L or P),
  'ids16' (a 16-bit PNG whose first channel is the class id: SYNTHIA),
  or 'colors' (an RGB PNG whose colours are classes: KITTI Road).
  """
  kind: str
  description: str  # What the file holds, for error messages.
  table: np.ndarray | None = None  # 256 entries: id -> train id (kinds 'ids', 'ids16').
  valid: np.ndarray | None = None  # 256 bools: the ids the file may hold.
  colors: tuple[tuple[tuple[int, int, int], int], ...] = ()  # kind 'colors': (rgb, train id).


def read_image(path: str) -> np.ndarray:
  """An (H, W, 3) uint8 RGB array; DataError if the file is missing, unreadable or truncated."""
  try:
    with Image.open(path) as image:
      image.load()
      return np.asarray(image.convert("RGB"))
  except (OSError, SyntaxError, ValueError) as e:
    raise _read_error("image", path, e) from e


def read_label(path: str, fmt: LabelFormat) -> np.ndarray:
  """Train ids (H, W) uint8 from a label file; DataError naming the file on any problem."""
  if fmt.kind == "ids16":
    ids = _read_class_channel_16bit(path)
  else:
    try:
      with Image.open(path) as image:
        image.load()
        mode = image.mode
        array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as e:
      raise _read_error("label", path, e) from e
    if fmt.kind == "colors":
      return _colors_to_train_ids(path, array, mode, fmt)
    if mode not in ("L", "P"):
      raise BadLabelFormat(f"The label {path} is a {mode} image; expected a single-channel "
                           f"PNG of {fmt.description} (mode L or P). Is it a colour "
                           "visualisation?")
    ids = array
  bad = ~fmt.valid[ids] if ids.max(initial=0) < 256 else np.ones(1, bool)
  if bad.any():
    values = np.unique(ids[bad] if bad.shape == ids.shape else ids[ids >= 256])
    raise BadLabelValues(f"The label {path} holds ids {values[:10].tolist()} outside the "
                         f"mapping; expected {fmt.description}.")
  return fmt.table[ids]


def _read_class_channel_16bit(path: str) -> np.ndarray:
  """The class channel (the first, R) of a 16-bit PNG. Pillow would truncate it to 8 bits."""
  import cv2  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise MissingFile(f"Cannot read the label {path}: it does not exist.")
  array = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if array is None:
    raise UnreadableFile(f"Cannot read the label {path}: not an image OpenCV can decode.")
  if array.dtype != np.uint16:
    raise BadLabelFormat(f"The label {path} is {array.dtype}; expected a 16-bit PNG whose "
                         "first channel is the SYNTHIA class id.")
  if array.ndim == 2:
    return array
  # OpenCV orders channels BGR(A): the first PNG channel is index 2 (0 for gray + alpha).
  return array[..., 2] if array.shape[-1] >= 3 else array[..., 0]


def _colors_to_train_ids(path: str, array: np.ndarray, mode: str, fmt: LabelFormat) -> np.ndarray:
  if mode != "RGB":
    raise BadLabelFormat(f"The label {path} is a {mode} image; expected an RGB PNG of "
                         f"{fmt.description}.")
  packed = (array[..., 0].astype(np.int32) << 16) | (array[..., 1].astype(np.int32) << 8) \
      | array[..., 2]
  out = np.full(packed.shape, 254, np.uint8)  # 254: not a known colour (never a class here).
  for (r, g, b), train_id in fmt.colors:
    out[packed == (r << 16 | g << 8 | b)] = train_id
  unknown = out == 254
  if unknown.any():
    colors = np.unique(array[unknown].reshape(-1, 3), axis=0)[:5].tolist()
    raise BadLabelValues(f"The label {path} has colours {colors} outside the mapping; "
                         f"expected {fmt.description}.")
  return out


def resize_array(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
  """`array` (an image or a label) resized to `size` (height, width) with PIL's `resample`."""
  height, width = size
  return np.asarray(Image.fromarray(array).resize((width, height), resample=resample))


def working_size(native: tuple[int, int], resize: tuple[int, ...],
                 keep_ratio: bool) -> tuple[int, ...]:
  """The (height, width) an image of `native` (height, width) is read at; () for native.

  With `keep_ratio`, `resize` bounds the image as mmseg's `Resize(img_scale,
  keep_ratio=True)` (`mmcv.rescale_size`): it is scaled by min(long side of
  `resize` / its long side, short side of `resize` / its short side), each side
  rounded (GTA5's 1914x1052 in (720, 1280): 1280x704).
  """
  if not resize or not keep_ratio:
    return tuple(resize)
  scale = min(max(resize) / max(native), min(resize) / min(native))
  return int(native[0] * scale + 0.5), int(native[1] * scale + 0.5)


class _SizeMismatchSkip(SizeMismatch):
  """A label/image size mismatch under on_size_mismatch='skip': skipped whatever on_error says."""


@dataclasses.dataclass
class FileSource:
  """Random access to (image, label) file pairs: a Grain data source.

  pairs: (image path, label path or None) per example, in order.
  resize: (height, width) to resize every image to, or () for the native size.
  keep_ratio: `resize` bounds the image instead, keeping its aspect ratio
    (`working_size`, mmseg's `Resize(img_scale, keep_ratio=True)`).
  resize_labels: resize labels with their images (training), or keep them at
    their native resolution (evaluation at full resolution).
  """
  name: str
  pairs: Sequence[tuple[str, str | None]]
  label_format: LabelFormat | None
  resize: tuple[int, ...] = ()
  resize_labels: bool = True
  keep_ratio: bool = False
  on_error: str = "fail"  # 'fail' or 'skip'.
  on_size_mismatch: str = "fail"  # 'fail', 'skip' or 'resize'.

  def __post_init__(self):
    if self.on_error not in ("fail", "skip"):
      raise errors.ConfigError(f"on_error={self.on_error!r} for {self.name}; expected 'fail' or "
                               "'skip'.")
    if self.on_size_mismatch not in ("fail", "skip", "resize"):
      raise errors.ConfigError(f"on_size_mismatch={self.on_size_mismatch!r} for {self.name}; "
                               "expected 'fail', 'skip' or 'resize'.")
    if self.resize and (len(self.resize) != 2 or min(self.resize) <= 0):
      raise errors.ConfigError(f"resize={tuple(self.resize)} for {self.name}; expected (height, "
                               "width) with positive sizes, or () for the native size.")
    self.resize = tuple(self.resize)
    self._resized_labels: set[int] = set()
    self._skipped: set[int] = set()  # The examples found bad, each warned about once.

  @property
  def skipped(self) -> int:
    """The number of bad examples skipped so far (by this process)."""
    return len(self._skipped)

  @property
  def labelled(self) -> bool:
    return bool(self.pairs) and self.pairs[0][1] is not None

  def __len__(self) -> int:
    return len(self.pairs)

  def __repr__(self) -> str:
    return f"FileSource({self.name!r}, {len(self)} examples)"

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"Index {index} out of range for {self!r}.")
    return read_or_skip(self.load, index, len(self), self._skipped, self.name,
                        lambda e: self.on_error == "skip" or isinstance(e, _SizeMismatchSkip))

  def working_size(self, native: tuple[int, int]) -> tuple[int, ...]:
    """The (height, width) an image of `native` (height, width) is read at; () for native."""
    return working_size(native, self.resize, self.keep_ratio)

  def load(self, index: int) -> dict:
    """Example `index`, decoded and resized; DataError on any problem with its files."""
    image_path, label_path = self.pairs[index]
    image = read_image(image_path)
    size = self.working_size(image.shape[:2])
    record = {}
    if label_path is not None:
      label = read_label(label_path, self.label_format)
      if label.shape != image.shape[:2]:
        if self.on_size_mismatch == "resize":
          if index not in self._resized_labels:
            self._resized_labels.add(index)
            logging.warning("%s: the label %s is %dx%d and its image %dx%d: label resized "
                            "(nearest).", self.name, label_path, *label.shape[::-1],
                            *image.shape[1::-1])
          label = resize_array(label, image.shape[:2], Image.NEAREST)
        else:
          error = SizeMismatch(f"The label {label_path} is {label.shape[1]}x{label.shape[0]} "
                               f"but its image {image_path} is "
                               f"{image.shape[1]}x{image.shape[0]}.")
          if self.on_size_mismatch == "skip" and self.on_error != "skip":
            raise _SizeMismatchSkip(str(error))
          raise error
      if size and self.resize_labels and label.shape != size:
        label = resize_array(label, size, Image.NEAREST)
      record["label"] = label
    if size and image.shape[:2] != size:
      image = resize_array(image, size, Image.BICUBIC)
    record["image"] = image
    return record

  def describe(self, index: int) -> str:
    """The files of example `index`, for reports."""
    image_path, label_path = self.pairs[index]
    return image_path if label_path is None else f"{image_path} + {label_path}"


def read_or_skip(load: Callable[[int], dict], index: int, length: int, skipped: set[int],
                 name: str, skippable: Callable[[DataError], bool]) -> dict:
  """`load(index)`, or, if that example is bad and its error `skippable`, the next readable one.

  A bad example joins `skipped` (its index) and is warned about once, naming
  its file: later calls pass over it without reading it again. DataError if
  no example of the `length` can be read.
  """
  for offset in range(length):
    i = (index + offset) % length
    if i in skipped:
      continue
    try:
      return load(i)
    except DataError as e:
      if not skippable(e):
        raise
      skipped.add(i)
      logging.warning("%s: skipping example %d from now on (%d skipped so far): %s", name, i,
                      len(skipped), e)
  raise DataError(f"{name}: no example of the {length} could be read.")


_MISSING_FILES_FAIL_ON_LOAD = contextvars.ContextVar("missing_files_fail_on_load", default=False)


@contextlib.contextmanager
def missing_files_fail_on_load():
  """Within it, `check_pairs` lets listed files that do not exist through.

  Each such example then fails on load with a `MissingFile`, so that
  `segjax.tools.check_data` reports the missing files together with the other
  problems of the split instead of stopping at start-up.
  """
  token = _MISSING_FILES_FAIL_ON_LOAD.set(True)
  try:
    yield
  finally:
    _MISSING_FILES_FAIL_ON_LOAD.reset(token)


def check_pairs(name: str, pairs: Sequence[tuple[str, str | None]], where: str) -> None:
  """Start-up checks: a non-empty split whose files all exist. DataError listing what is missing."""
  if not pairs:
    raise DataError(f"{name}: no examples found in {where}.")
  if _MISSING_FILES_FAIL_ON_LOAD.get():
    return
  missing = [path for pair in pairs for path in pair if path is not None
             and not os.path.isfile(path)]
  if missing:
    shown = "\n  ".join(missing[:10])
    raise MissingFile(f"{name}: {len(missing)} file(s) listed for {where} do not exist, "
                      f"e.g.\n  {shown}")


# ---- Cache of decoded, resized records.

def cache_key(source: FileSource, identity: dict) -> str:
  """The cache folder name for `source`: a hash of everything that changes its content."""
  payload = json.dumps({"version": _CACHE_VERSION, "resize": list(source.resize),
                        "resize_labels": source.resize_labels, **identity,
                        **({"keep_ratio": True} if source.keep_ratio else {})}, sort_keys=True)
  return f"{source.name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def _cache_paths(directory: str, index: int, image_format: str, labelled: bool):
  ext = "jpg" if image_format == "jpeg" else "png"
  image = os.path.join(directory, "images", f"{index:07d}.{ext}")
  label = os.path.join(directory, "labels", f"{index:07d}.png") if labelled else None
  return image, label


CACHED_LABELS = LabelFormat(
    kind="ids", description="train ids (the segjax cache)",
    table=np.arange(256, dtype=np.uint8), valid=np.ones(256, bool))


def open_cache(source: FileSource, directory: str) -> FileSource | None:
  """A FileSource over the cache in `directory` if it is complete, else None."""
  manifest_path = os.path.join(directory, CACHE_MANIFEST)
  if not os.path.isfile(manifest_path):
    return None
  with open(manifest_path, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("num_examples") != len(source):
    raise DataError(f"The cache {directory} holds {manifest.get('num_examples')} examples but "
                    f"{source.name} lists {len(source)}; delete it and rebuild it.")
  pairs = [_cache_paths(directory, i, manifest["image_format"], source.labelled)
           for i in range(len(source))]
  return FileSource(source.name + " (cache)", pairs, CACHED_LABELS, on_error=source.on_error)


def build_cache(source: FileSource, directory: str, image_format: str = "jpeg",
                progress: Callable = lambda it, **kw: it) -> dict:
  """Writes every record of `source` to `directory` (resumable), then its manifest.

  Files are written to a temporary name and renamed, so an interrupted build
  leaves only complete files, and a rerun writes only the missing ones.
  Returns the manifest.
  """
  if image_format not in ("jpeg", "png"):
    raise errors.ConfigError(f"image_format={image_format!r}; expected 'jpeg' or 'png'.")
  for sub in ("images", "labels") if source.labelled else ("images",):
    os.makedirs(os.path.join(directory, sub), exist_ok=True)
  for index in progress(range(len(source)), desc=source.name, unit="img"):
    image_path, label_path = _cache_paths(directory, index, image_format, source.labelled)
    if os.path.exists(image_path) and (label_path is None or os.path.exists(label_path)):
      continue
    record = source.load(index)
    _write_atomic(image_path, Image.fromarray(record["image"]),
                  dict(format="JPEG", quality=95) if image_format == "jpeg" else
                  dict(format="PNG"))
    if label_path is not None:
      _write_atomic(label_path, Image.fromarray(record["label"]), dict(format="PNG"))
  manifest = {"version": _CACHE_VERSION, "num_examples": len(source),
              "image_format": image_format, "source": source.name,
              "resize": list(source.resize)}
  tmp = os.path.join(directory, CACHE_MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(directory, CACHE_MANIFEST))
  return manifest


def _write_atomic(path: str, image: Image.Image, options: dict) -> None:
  tmp = path + ".tmp"
  image.save(tmp, **options)
  os.replace(tmp, path)

