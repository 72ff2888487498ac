"""Datasets (random-access sources selected by config) and the Grain input pipeline.

A dataset sub-config (`data.source`, `data.target`, `data.eval`) names a
dataset and its options:

  name: street_scenes (built in) | cityscapes | gta5 | synthia | kitti_road |
        voc | crosscity | tfds
  root, split, list_file: where the native files are (`segjax.data.readers`)
  resize: (height, width) working resolution, () for native; keep_ratio: True
        makes `resize` a bound that keeps the aspect ratio (mmseg's
        keep_ratio); resize_labels: False keeps labels at full resolution
        (evaluation)
  on_error: 'fail' | 'skip'; on_size_mismatch: 'fail' | 'skip' | 'resize'
        (`segjax.data.files`)
  cache_dir, cache_format: a cache of decoded, resized records
        (`python -m segjax.tools.cache_data`)
  pseudo_labels: (data.target) a folder of pseudo labels
        (`python -m segjax.tools.make_pseudo_labels`), the target labels of
        methods that train on them (`segjax.data.pseudo_label_files`)
plus the dataset's own fields (cityscapes: cities; crosscity: city; voc:
year; tfds: tfds_name, data_dir, image_key, label_key, label_space). See
`configs/recipes.py:dataset` for the defaults. `python -m
segjax.tools.check_data` reads every file a config points at and reports the
problems; `python -m segjax.tools.data_stats` plots its class distribution.
"""

import dataclasses
import os
from collections.abc import Callable

import ml_collections
import numpy as np
from absl import logging

from segjax import errors
from segjax.data import files, labels, readers, synthetic
from segjax.data.files import DataError, FileSource


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  class_names: tuple[str, ...]
  palette: np.ndarray  # (num_classes, 3) uint8 colours for visualisation.
  # Extra mIoU scores over subsets of the classes, e.g. {'miou16': (...), 'miou13': (...)}.
  eval_subsets: tuple[tuple[str, tuple[int, ...]], ...] = ()
  # train id -> id of the official label files, for submissions (Cityscapes).
  train_to_id: tuple[tuple[int, int], ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


STREET_SCENES = DatasetInfo(synthetic.CLASS_NAMES, synthetic.PALETTE)
CITYSCAPES = DatasetInfo(labels.CITYSCAPES_CLASSES, labels.CITYSCAPES_PALETTE,
                         train_to_id=tuple(labels.CITYSCAPES_TRAIN_TO_ID.items()))
SYNTHIA = dataclasses.replace(CITYSCAPES, eval_subsets=(("miou16", labels.SYNTHIA_16),
                                                        ("miou13", labels.SYNTHIA_13)))
CROSSCITY = dataclasses.replace(CITYSCAPES, eval_subsets=(("miou13", labels.CROSSCITY_13),))
VOC = DatasetInfo(labels.VOC_CLASSES, labels.VOC_PALETTE)
KITTI_ROAD = DatasetInfo(labels.KITTI_CLASSES, labels.KITTI_PALETTE)
LABEL_SPACES = {"cityscapes": CITYSCAPES, "cityscapes_train_ids": CITYSCAPES, "voc": VOC}


def _street_scenes(config: ml_collections.ConfigDict) -> synthetic.StreetScenes:
  return synthetic.StreetScenes(config.domain, config.split, num_examples=config.num_examples,
                                height=config.height, width=config.width, seed=config.seed)


def _files_source(lister: Callable[[ml_collections.ConfigDict], tuple]) -> Callable:
  """A builder: the reader's pairs as a FileSource with the sub-config's policy."""
  def build(config: ml_collections.ConfigDict) -> FileSource:
    if not config.get("root"):
      raise DataError(f"{config.name}: no root given (config field root); expected the folder "
                      "holding the dataset in its native layout.")
    if not os.path.isdir(config.root):
      raise DataError(f"{config.name}: the root {config.root} is not a directory.")
    pairs, label_format = lister(config)
    return FileSource(config.name, pairs, label_format, resize=tuple(config.get("resize", ())),
                      resize_labels=config.get("resize_labels", True),
                      keep_ratio=config.get("keep_ratio", False),
                      on_error=config.get("on_error", "fail"),
                      on_size_mismatch=config.get("on_size_mismatch", "fail"))
  return build


def _cached(config: ml_collections.ConfigDict, source: FileSource) -> FileSource:
  """The cache of `source` under `config.cache_dir` if it is complete, else `source` itself."""
  directory = cache_directory(config, source)
  cached = files.open_cache(source, directory)
  if cached is not None:
    return cached
  logging.warning("%s: no complete cache in %s; reading the original files. Build it with "
                  "python -m segjax.tools.cache_data.", config.name, directory)
  return source


def cache_directory(config: ml_collections.ConfigDict, source: FileSource) -> str:
  """Where the cache of the dataset described by `config` lives."""
  identity = {k: v for k, v in config.to_dict().items()
              if k not in ("cache_dir", "cache_format", "on_error", "on_size_mismatch",
                           "pseudo_labels")}
  identity["root"] = os.path.abspath(config.root)
  identity["image_format"] = config.get("cache_format", "jpeg")
  return os.path.join(config.cache_dir, files.cache_key(source, identity))


class TfdsSource:
  """A TFDS dataset prepared on disk, read with `tfds.data_source` (random access, no TF).

  Records are mapped to {'image', 'label'}; `label_space` 'cityscapes' maps
  Cityscapes label ids (TFDS `cityscapes` stores them) to train ids,
  'cityscapes_train_ids' and 'voc' take the values as they are (255 ignored).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self._config = config
    try:
      self._source = tfds.data_source(config.tfds_name, split=config.split,
                                      data_dir=config.get("data_dir") or None)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"tfds: cannot open {config.tfds_name!r} split {config.split!r} in "
                      f"{config.get('data_dir') or 'the default data_dir'}: {e}") from e
    space = config.get("label_space", "cityscapes")
    if space not in LABEL_SPACES:
      raise DataError(f"tfds: label_space {space!r}; expected one of {sorted(LABEL_SPACES)}.")
    fmt = {"cityscapes": readers.CITYSCAPES_IDS}.get(space)
    self._table = fmt.table if fmt else labels.lookup_table({i: i for i in range(256)})
    self._valid = fmt.valid if fmt else labels.valid_ids(
        (*range(LABEL_SPACES[space].num_classes), 255))
    self._resize = tuple(config.get("resize", ()))
    self._keep_ratio = config.get("keep_ratio", False)
    self._resize_labels = config.get("resize_labels", True)
    if len(self._source) == 0:
      raise DataError(f"tfds: {config.tfds_name!r} split {config.split!r} is empty.")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    image = np.asarray(record[self._config.get("image_key", "image_left")], np.uint8)
    label = np.asarray(record[self._config.get("label_key", "segmentation_label")])
    label = label[..., 0] if label.ndim == 3 else label
    bad = ~self._valid[np.clip(label, 0, 255)] | (label > 255)
    if bad.any():
      raise files.BadLabelValues(f"tfds: {self._config.tfds_name} example {index} has label "
                                 f"values {np.unique(label[bad])[:10].tolist()} outside the "
                                 "label space.")
    label = self._table[label.astype(np.uint8)]
    size = files.working_size(image.shape[:2], self._resize, self._keep_ratio)
    if size and image.shape[:2] != size:
      from PIL import Image  # pylint: disable=import-outside-toplevel
      image = files.resize_array(image, size, Image.BICUBIC)
      if self._resize_labels and label.shape != size:
        label = files.resize_array(label, size, Image.NEAREST)
    return {"image": image, "label": label}


def _tfds_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  return LABEL_SPACES.get(config.get("label_space", "cityscapes"), CITYSCAPES)


# name -> (builder from the `data.source`/`data.target`/`data.eval` sub-config, label space).
DATASETS: dict[str, tuple[Callable, DatasetInfo | Callable]] = {
    "street_scenes": (_street_scenes, STREET_SCENES),
    "cityscapes": (_files_source(lambda c: readers.cityscapes(
        c.root, c.split, tuple(c.get("cities", ())), c.get("list_file", ""))), CITYSCAPES),
    "gta5": (_files_source(lambda c: readers.gta5(c.root, c.split, c.get("list_file", ""))),
             CITYSCAPES),
    "synthia": (_files_source(lambda c: readers.synthia(c.root, c.split,
                                                        c.get("list_file", ""))), SYNTHIA),
    "kitti_road": (_files_source(lambda c: readers.kitti_road(c.root, c.split,
                                                              c.get("list_file", ""))),
                   KITTI_ROAD),
    "voc": (_files_source(lambda c: readers.voc(c.root, c.split, str(c.get("year", "2012")),
                                                c.get("list_file", ""))), VOC),
    "crosscity": (_files_source(lambda c: readers.crosscity(c.root, c.split, c.city)), CROSSCITY),
    "tfds": (TfdsSource, _tfds_info),
}


def _entry(config: ml_collections.ConfigDict, field: str):
  if config.name not in DATASETS:
    raise errors.ConfigError(f"Unknown dataset name {config.name!r} (config field {field}.name); "
                             f"expected one of {sorted(DATASETS)}.")
  # A sub-config of the built-in scenes renamed on the command line has no place for a root.
  where = "tfds_name" if config.name == "tfds" else "root"
  if config.name != "street_scenes" and where not in config:
    raise DataError(f"{field}.name={config.name!r}: {field} has the fields of the built-in "
                    f"street scenes ({', '.join(config.keys())}), not a real dataset's ({where}, "
                    f"resize, on_error, ...); {errors.REAL_DATASETS}.")
  return DATASETS[config.name]


def build_source(config: ml_collections.ConfigDict, field: str, use_cache: bool = True):
  """The random-access source described by the sub-config `field` (e.g. 'data.source').

  A file dataset with a `cache_dir` is read from its cache when the cache is
  complete, unless `use_cache=False` (the original files: what
  `segjax.tools.check_data` checks and `segjax.tools.cache_data` caches).
  A `DataError` keeps its kind and is prefixed with `field`.
  """
  builder, _ = _entry(config, field)
  try:
    source = builder(config)
    if use_cache and config.get("cache_dir") and isinstance(source, FileSource):
      source = _cached(config, source)
    return source
  except DataError as e:
    raise type(e)(f"{field}: {e}") from e


def dataset_info(config: ml_collections.ConfigDict, field: str) -> DatasetInfo:
  info = _entry(config, field)[1]
  return info(config) if callable(info) else info


def describe(config: ml_collections.ConfigDict) -> str:
  """One line for reports: the dataset, its split and where it is read from."""
  if config.name == "street_scenes":
    return (f"street_scenes (built in: {config.domain} domain, {config.split} split, "
            f"{config.num_examples} examples)")
  where = config.get("list_file") or config.get("root") or config.get("tfds_name", "")
  return f"{config.name} (split {config.get('split', '?')}) at {where}"


def evenly_spaced(num_examples: int, count: int) -> list[int]:
  """`count` indices spread over range(num_examples), first and last included (0: all)."""
  if count <= 0 or count >= num_examples:
    return list(range(num_examples))
  return np.linspace(0, num_examples - 1, count).round().astype(int).tolist()
