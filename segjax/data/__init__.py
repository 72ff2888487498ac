"""Datasets (random-access sources selected by config) and the Grain input pipeline."""

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np

from segjax.data import synthetic


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  class_names: tuple[str, ...]
  palette: np.ndarray  # (num_classes, 3) uint8 colours for visualisation.

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _street_scenes(config: ml_collections.ConfigDict) -> synthetic.StreetScenes:
  return synthetic.StreetScenes(config.domain, config.split, num_examples=config.num_examples,
                                height=config.height, width=config.width, seed=config.seed)


# name -> (builder from the `data.source`/`data.target`/`data.eval` sub-config, label space).
DATASETS: dict[str, tuple[Callable, DatasetInfo]] = {
    "street_scenes": (_street_scenes, DatasetInfo(synthetic.CLASS_NAMES, synthetic.PALETTE)),
}


def _entry(config: ml_collections.ConfigDict, field: str):
  if config.name not in DATASETS:
    raise ValueError(f"Unknown dataset name {config.name!r} (config field {field}.name); "
                     f"expected one of {sorted(DATASETS)}.")
  return DATASETS[config.name]


def build_source(config: ml_collections.ConfigDict, field: str):
  """The random-access source described by the sub-config `field` (e.g. 'data.source')."""
  builder, _ = _entry(config, field)
  return builder(config)


def dataset_info(config: ml_collections.ConfigDict, field: str) -> DatasetInfo:
  return _entry(config, field)[1]
