"""Per-class size statistics of a dataset's labels: the priors of FCNs in the Wild's CA.

For every class c, the fraction of the image's pixels labelled c (all pixels
count, ignored ones included: the target constraints are over every pixel of
a prediction) over the images that contain c (Hoffman et al. 2016,
UDA-REFERENCE.md 2c):

  alpha   the 10th percentile of those fractions (the "lower 10%" bound)
  delta   their mean
  gamma   the 90th percentile (the "upper 10%" bound)
  images  how many images contain c

with the class names, the dataset and the number of images read.
Percentiles interpolate linearly between the sorted fractions (numpy's
default). A class found in no image (SYNTHIA has no terrain, truck or train)
gets alpha = delta = gamma = 0 and images = 0; category adaptation never
counts it as present.

`segjax.methods.fcn_wild` computes or reads them at start-up;
`python -m segjax.tools.category_stats` writes them once, for a large source.
"""

import json
import os
from collections.abc import Callable

import ml_collections
import numpy as np
import tqdm

from segjax import data, errors
from segjax.data import files

PERCENTILES = (10, 90)
STAT_FIELDS = ("alpha", "delta", "gamma", "images")


def image_fractions(label: np.ndarray, num_classes: int) -> np.ndarray:
  """(num_classes,) share of the image's pixels (ignored ones included) labelled with each class."""
  return np.bincount(label.ravel(), minlength=256)[:num_classes] / label.size


def summarize(fractions: list[list[float]]) -> dict[str, list]:
  """alpha, delta, gamma and images from each class's per-image fractions (zeros if none)."""
  out = {name: [] for name in STAT_FIELDS}
  for values in fractions:
    values = np.asarray(values, np.float64)
    if values.size:
      low, high = np.percentile(values, PERCENTILES)
      stats = (float(low), float(values.mean()), float(high), int(values.size))
    else:
      stats = (0.0, 0.0, 0.0, 0)
    for name, value in zip(STAT_FIELDS, stats):
      out[name].append(value)
  return out


def compute(dataset: ml_collections.ConfigDict, field: str, max_examples: int = 0,
            progress: Callable = tqdm.tqdm) -> dict:
  """The statistics record (a JSON-serialisable dict) of the labelled dataset sub-config
  `dataset`, read as training reads it, from `max_examples` evenly spaced examples (0: all);
  `field` names it (e.g. 'data.source') in errors and in the record."""
  source = data.build_source(dataset, field)
  info = data.dataset_info(dataset, field)
  indices = data.evenly_spaced(len(source), max_examples)
  fractions = [[] for _ in range(info.num_classes)]
  for index in progress(indices, desc="category statistics", unit="img"):
    record = source[index]
    if "label" not in record:
      raise files.DataError(f"{field}: example {index} has no label; category statistics need "
                            "a labelled source dataset.")
    for c, fraction in enumerate(image_fractions(record["label"], info.num_classes)):
      if fraction > 0:
        fractions[c].append(float(fraction))
  return dict(field=field, dataset=data.describe(dataset), num_images=len(indices),
              percentiles=list(PERCENTILES), class_names=list(info.class_names),
              **summarize(fractions))


def write(record: dict, path: str) -> None:
  """Writes `record` as JSON to `path` atomically (a temporary file, then a rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def read(path: str, class_names: tuple[str, ...], field: str) -> dict:
  """The statistics record at `path`, checked against the dataset's classes.

  `field` names where the path came from (a config field) in the errors:
  FileNotFoundError if it is not a file, ValueError if it is not a valid
  record for these classes.
  """
  hint = ("write one with python -m segjax.tools.category_stats --config=CONFIG --out=FILE, or "
          "leave adapt.category_stats empty to compute them from data.source at start-up")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{field}={path!r} is not a file; {hint}.")
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.ConfigError(f"{field}={path!r} cannot be read as JSON: {e}; {hint}.") from e
  missing = [k for k in ("class_names", *STAT_FIELDS) if not isinstance(record, dict)
             or not isinstance(record.get(k), list)]
  if missing:
    raise errors.ConfigError(f"{field}={path!r} is not a category statistics file (no list "
                             f"{missing[0]!r}); {hint}.")
  for key in ("class_names", *STAT_FIELDS):
    if len(record[key]) != len(class_names):
      raise errors.ConfigError(f"{field}={path!r} has {len(record[key])} classes in {key!r}; the "
                               f"dataset has {len(class_names)} ({', '.join(class_names)}).")
  if tuple(record["class_names"]) != tuple(class_names):
    raise errors.ConfigError(f"{field}={path!r} is for the classes {record['class_names']}, not "
                             f"the dataset's {list(class_names)}.")
  values = np.asarray([record[k] for k in STAT_FIELDS[:3]], np.float64)
  if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
    raise errors.ConfigError(f"{field}={path!r}: alpha, delta and gamma must be fractions in "
                             "[0, 1].")
  return record
