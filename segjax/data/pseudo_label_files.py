"""Pseudo-label folders: their layout, and the target source that trains on them.

`python -m segjax.tools.make_pseudo_labels` writes a folder holding one
train-id PNG per target training image (255: ignored), named by `label_names`,
and `thresholds.json`, written last: a folder without it is incomplete. The
dataset field `data.target.pseudo_labels=DIR` makes the training stream's
target records carry these labels in place of the dataset's own, which are
never read then (methods with `target_labels`, e.g. pseudo_label); the
augmentation crops, scales and flips image and label together.
"""

import json
import os

import ml_collections
import numpy as np

from segjax import data
from segjax.data import files
from segjax.losses import IGNORE_LABEL

THRESHOLDS_FILE = "thresholds.json"
HOW_TO_MAKE = "run python -m segjax.tools.make_pseudo_labels first (a rerun resumes it)"


def label_names(target_config: ml_collections.ConfigDict, listed) -> list[str]:
  """The pseudo labels' paths relative to their folder, without '.png', of `listed`'s examples.

  `listed` is the target split as listed from its original files
  (`data.build_source(..., use_cache=False)`). An image read from a file
  mirrors its path relative to the dataset root (Cityscapes:
  leftImg8bit/train/<city>/<image stem>), or is named by its stem when it lies
  outside the root; other sources (the built-in scenes, TFDS) number their
  examples.
  """
  pairs = getattr(listed, "pairs", None)
  if pairs is None:
    return [f"{index:06d}" for index in range(len(listed))]
  root = os.path.abspath(target_config.get("root", "") or os.sep)
  names = []
  for image_path, _ in pairs:
    relative = os.path.relpath(os.path.abspath(image_path), root)
    if relative.startswith(".."):
      relative = os.path.basename(image_path)
    names.append(os.path.splitext(relative)[0])
  if len(set(names)) != len(names):
    duplicate = next(name for name in names if names.count(name) > 1)
    raise files.DataError(f"data.target: two images would have the pseudo label "
                          f"{duplicate!r}.png; the split's image names must be unique.")
  return names


def read_thresholds(directory: str, field: str = "data.target.pseudo_labels") -> dict:
  """The thresholds.json of a complete folder; DataError naming `field` otherwise."""
  if not directory:
    raise files.DataError(f"{field} is not set: the method trains on pseudo labels of the "
                          f"target images; {HOW_TO_MAKE}, then pass --config.{field}=DIR.")
  if not os.path.isdir(directory):
    raise files.DataError(f"{field}={directory} is not a directory; {HOW_TO_MAKE} with "
                          f"--out={directory}.")
  path = os.path.join(directory, THRESHOLDS_FILE)
  if not os.path.isfile(path):
    raise files.DataError(f"{field}={directory} has no {THRESHOLDS_FILE} (written last): its "
                          f"pseudo labels are incomplete; {HOW_TO_MAKE}.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def label_format(num_classes: int) -> files.LabelFormat:
  """Pseudo-label PNGs: train ids below `num_classes`, or 255."""
  return files.LabelFormat(
      kind="ids", description=f"pseudo labels (train ids 0-{num_classes - 1}, 255 ignored)",
      table=np.arange(256, dtype=np.uint8),
      valid=np.isin(np.arange(256), [*range(num_classes), IGNORE_LABEL]))


class PseudoLabelSource:
  """The target images, each with its pseudo label from a folder: a Grain data source.

  Image i is paired with <directory>/<names[i]>.png. Under the images'
  on_error='skip', an unreadable example is replaced by the next one, image and
  pseudo label together.
  """

  def __init__(self, images, directory: str, names: list[str], num_classes: int,
               on_error: str = "fail"):
    self._images = images
    self._directory = directory
    self._names = names
    self._format = label_format(num_classes)
    self._on_error = on_error
    self._skipped: set[int] = set()  # The examples found bad, each warned about once.

  @property
  def skipped(self) -> int:
    """The number of bad examples skipped so far (by this process)."""
    return len(self._skipped)

  def __len__(self) -> int:
    return len(self._names)

  def __repr__(self) -> str:
    return f"PseudoLabelSource({self._images!r}, {self._directory!r})"

  def label_path(self, index: int) -> str:
    return os.path.join(self._directory, self._names[index] + ".png")

  def load(self, index: int) -> dict:
    # A FileSource's own __getitem__ would substitute another image for an unreadable one.
    load_image = getattr(self._images, "load", self._images.__getitem__)
    image = load_image(index)["image"]
    path = self.label_path(index)
    label = files.read_label(path, self._format)
    if label.shape != image.shape[:2]:
      raise files.SizeMismatch(
          f"The pseudo label {path} is {label.shape[1]}x{label.shape[0]} but its image is "
          f"{image.shape[1]}x{image.shape[0]}: the labels were made at another resolution "
          "(data.target.resize); make them again for this config.")
    return {"image": image, "label": label}

  def __getitem__(self, index: int) -> dict:
    return files.read_or_skip(self.load, index, len(self), self._skipped,
                              "data.target (pseudo labels)", lambda e: self._on_error == "skip")


def pseudo_labelled_target(target_config: ml_collections.ConfigDict, images,
                           field: str = "data.target") -> PseudoLabelSource:
  """`images` (the source of `target_config`) with the pseudo labels of its `pseudo_labels` folder.

  DataError naming the field when the folder is not set, incomplete, made for
  another number of images, or missing files.
  """
  directory = target_config.get("pseudo_labels", "")
  report = read_thresholds(directory, f"{field}.pseudo_labels")
  names = label_names(target_config, data.build_source(target_config, field, use_cache=False))
  if report["num_images"] != len(names) or len(images) != len(names):
    raise files.DataError(
        f"{field}.pseudo_labels={directory} holds pseudo labels of {report['num_images']} "
        f"images but {field} has {len(names)}: they were made for another target set; "
        f"{HOW_TO_MAKE} with this config and another --out.")
  class_names = list(data.dataset_info(target_config, field).class_names)
  if report["classes"] != class_names:
    raise files.DataError(f"{field}.pseudo_labels={directory} holds labels of the classes "
                          f"{report['classes']}, but {field} has {class_names}.")
  source = PseudoLabelSource(images, directory, names, len(class_names),
                             target_config.get("on_error", "fail"))
  missing = [source.label_path(i) for i in range(len(names))
             if not os.path.isfile(source.label_path(i))]
  if missing:
    shown = "\n  ".join(missing[:5])
    raise files.MissingFile(f"{field}.pseudo_labels={directory}: {len(missing)} pseudo "
                            f"label(s) of the target images do not exist, e.g.\n  {shown}\n"
                            f"{HOW_TO_MAKE} with --out={directory}.")
  return source
