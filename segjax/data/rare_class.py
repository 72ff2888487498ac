"""Rare-class sampling (DAFormer, Hoyer et al. 2022): source images drawn for their rare classes.

From per-image class pixel counts of the source labels (as training reads
them, after resizing), computed once:

  1. class c is drawn with probability p_c = softmax((1 - f_c) / T) over the
     classes present in the dataset, f_c the share of c among all labelled
     pixels (T = `temperature`, 0.01 in DAFormer: rare classes dominate);
  2. an image holding more than `min_pixels` (3,000) pixels of c is drawn
     uniformly;
  3. its random crop (scale, crop, flip, jitter) is redrawn, up to 10 times,
     until c covers more than `min_pixels * min_crop_ratio` pixels of it (0.5;
     HRDA 2.0).

Each draw comes from the stream's seed and the draw's position, so the stream
is the same on every run, number of processes and workers, and resumes where
its iterator state says (DAFormer's draws use the process's global numpy
state). A class without any image over `min_pixels` cannot be drawn: the
sampler leaves it out and says so (DAFormer stops on an assertion).

The counts are a JSON record (`compute`, `write`, `read`): the dataset's
description, the sizing that made its labels (`resize`, `keep_ratio`,
`resize_labels`: counts at another size would select other images), class
names and one row of counts per image. Computing them
reads every label once (GTA5: 24,966 images); `compute` continues a partial
record left by an interrupted run instead of starting again.
"""

import json
import os
from collections.abc import Callable

import ml_collections
import numpy as np
import tqdm
from absl import logging

from segjax import data, errors
from segjax.data import category_stats, files

SAVE_EVERY = 500  # Images between two writes of a partial record.
MAX_CROPS = 11  # DAFormer's crops per drawn image: the first and up to 10 redraws.


def class_pixel_counts(label: np.ndarray, num_classes: int) -> list[int]:
  """Pixels of each class in `label` (ignored pixels not counted)."""
  return np.bincount(label.ravel(), minlength=256)[:num_classes].astype(int).tolist()


def sizing(dataset: ml_collections.ConfigDict) -> dict:
  """The fields of the dataset sub-config `dataset` that decide the size of its labels."""
  return {"resize": list(dataset.get("resize", ())),
          "keep_ratio": bool(dataset.get("keep_ratio", False)),
          "resize_labels": bool(dataset.get("resize_labels", True))}


def compute(dataset: ml_collections.ConfigDict, field: str, path: str = "",
            progress: Callable = tqdm.tqdm) -> dict:
  """The counts record of the labelled dataset sub-config `dataset` (`field` names it).

  With `path`, a partial record is written there every `SAVE_EVERY` images
  and read back at the start, so an interrupted computation continues; the
  complete record is written there at the end.
  """
  source = data.build_source(dataset, field)
  info = data.dataset_info(dataset, field)
  record = dict(field=field, dataset=data.describe(dataset), sizing=sizing(dataset),
                class_names=list(info.class_names), num_images=len(source), counts=[])
  if path and os.path.isfile(path):
    previous = _load(path)
    # Records written before the sizing was kept lack it (a workdir's: its config fixes it).
    keys = ("dataset", "class_names", "num_images") + (("sizing",) if "sizing" in previous
                                                       else ())
    if all(previous.get(k) == record[k] for k in keys):
      record["counts"] = previous["counts"]
      logging.info("Rare-class statistics: continuing %s after %d of %d images.", path,
                   len(record["counts"]), len(source))
    else:
      logging.info("Rare-class statistics: %s counts another dataset or size; computing them "
                   "again.", path)
  for index in progress(range(len(record["counts"]), len(source)), desc="class pixel counts",
                        unit="img"):
    example = source[index]
    if "label" not in example:
      raise files.DataError(f"{field}: example {index} has no label; rare-class sampling needs a "
                            "labelled source dataset.")
    record["counts"].append(class_pixel_counts(example["label"], info.num_classes))
    if path and len(record["counts"]) % SAVE_EVERY == 0:
      category_stats.write(record, path)
  if path:
    category_stats.write(record, path)
  return record


def _load(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.ConfigError(f"Rare-class statistics {path!r} cannot be read as JSON: {e}; "
                             "delete it to compute them again.") from e
  if not isinstance(record, dict) or not isinstance(record.get("counts"), list):
    raise errors.ConfigError(f"{path!r} is not a rare-class statistics record (no 'counts'); "
                             "delete it to compute them again.")
  return record


def read(path: str, dataset: ml_collections.ConfigDict, field: str) -> dict:
  """The complete counts record at `path`, checked against the dataset `field` describes."""
  record = _load(path)
  source_len = len(data.build_source(dataset, field))
  names = list(data.dataset_info(dataset, field).class_names)
  if record.get("class_names") != names:
    raise errors.ConfigError(f"{path!r} counts the classes {record.get('class_names')}, not "
                             f"{field}'s {names}.")
  if "sizing" not in record:
    logging.warning("%r does not record the size its labels were counted at; it must be %s's "
                    "%s.", path, field, sizing(dataset))
  elif record["sizing"] != sizing(dataset):
    raise errors.ConfigError(f"{path!r} counts labels sized {record['sizing']}, not {field}'s "
                             f"{sizing(dataset)}: a class's pixels, and so the images drawn, "
                             "depend on the size. Compute the statistics for this config "
                             "(segjax.tools.rcs_stats).")
  if record.get("num_images") != source_len or len(record["counts"]) != source_len:
    raise errors.ConfigError(f"{path!r} counts {len(record['counts'])} of "
                             f"{record.get('num_images')} images; {field} has {source_len}. "
                             "Delete it to compute the statistics again.")
  return record


class Sampler:
  """Draws (image index, class) pairs for rare-class sampling from a counts record."""

  def __init__(self, counts: np.ndarray, class_names: list[str], temperature: float,
               min_pixels: int):
    counts = np.asarray(counts, np.int64)
    totals = counts.sum(axis=0)
    if totals.sum() == 0:
      raise errors.ConfigError("Rare-class sampling: the source labels hold no labelled pixel.")
    present = np.flatnonzero(totals)
    eligible = [c for c in present if np.any(counts[:, c] > min_pixels)]
    left_out = sorted(set(present) - set(eligible))
    if left_out:
      logging.warning("Rare-class sampling leaves out %s: no source image holds more than %d "
                      "of their pixels.", ", ".join(class_names[c] for c in left_out), min_pixels)
    if not eligible:
      raise errors.ConfigError(f"Rare-class sampling: no source image holds more than "
                               f"{min_pixels} pixels of any class (data.rcs.min_pixels).")
    freq = totals[present] / totals.sum()
    logits = (1.0 - freq) / temperature
    probs = np.exp(logits - logits.max())
    probs = probs / probs.sum()
    # p_c over the present classes (DAFormer's softmax), renormalised over those drawable.
    keep = np.isin(present, eligible)
    self.classes = present[keep]
    self.probs = probs[keep] / probs[keep].sum()
    self.images = {int(c): np.flatnonzero(counts[:, c] > min_pixels) for c in self.classes}

  def draw(self, rng: np.random.Generator) -> tuple[int, int]:
    c = int(rng.choice(self.classes, p=self.probs))
    return int(rng.choice(self.images[c])), c
