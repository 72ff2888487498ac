"""Metric writers: TensorBoard, console and `metrics.jsonl`, through CLU.

Only process 0 writes files; other processes only log. `metrics.jsonl` holds
one JSON object per write (`step` plus the metric names), so scripts can read
results without TensorBoard. Each line is flushed as it is written; on resume,
lines past the restored step (and a line cut short by a crash) are dropped, so
the file ends up exactly as an uninterrupted run would have written it.

Also the pictures (label maps in a palette, overlays, sample grids) and the
filter that keeps Orbax's and Grain's INFO chatter out of the entry points' logs.
"""

import json
import logging as std_logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from clu import metric_writers
from PIL import Image

METRICS_FILE = "metrics.jsonl"


class JsonlWriter(metric_writers.MetricWriter):
  """Appends scalars to a JSON-lines file; other summaries are not its business."""

  def __init__(self, path: str):
    self._path = path
    self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self):
    self._file.close()


def truncate_metrics(workdir: str, last_step: int) -> None:
  """Drops records after `last_step` and any incomplete line (atomic rewrite)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.endswith("\n"):
        break  # Cut short by a crash.
      if json.loads(line)["step"] <= last_step:
        kept.append(line)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl`, in order."""
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def create_writer(workdir: str, *, is_primary: bool) -> metric_writers.MetricWriter:
  if not is_primary:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=True),
      JsonlWriter(os.path.join(workdir, METRICS_FILE)),
  ])


class _QuietLibraries:
  """Drops the INFO chatter of Orbax and Grain (warnings and errors still show).

  Also Orbax's warning for each checkpoint saved without metrics: only the
  checkpoints of evaluation steps have them, by design.
  """

  def filter(self, record) -> bool:
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain"))
    if noisy and record.getMessage().startswith("Requested `tracked_metric`"):
      return False
    return record.levelno >= std_logging.WARNING or not noisy


def quiet_libraries() -> None:
  """Filters the INFO logs of Orbax and Grain out of the absl log (entry points call it)."""
  logging.get_absl_handler().python_handler.addFilter(_QuietLibraries())


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """Label map (..., H, W) to RGB using `palette`; ignored/unknown labels are black."""
  table = np.zeros((256, 3), np.uint8)
  table[:len(palette)] = palette
  return table[np.asarray(labels, np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """`image` (H, W, 3) uint8 blended with the colours of `labels` (H, W), `alpha` of colour."""
  colors = colorize(labels, palette).astype(np.float32)
  return np.round((1 - alpha) * image.astype(np.float32) + alpha * colors).astype(np.uint8)


def sample_grid(images: np.ndarray, preds: np.ndarray, labels: np.ndarray,
                palette: np.ndarray) -> np.ndarray:
  """(N, H, 3W, 3) uint8 rows of image | prediction | ground truth, at the labels' size.

  Images read at a working resolution below their full-resolution labels
  (evaluation at full resolution) are resized to the labels' size for display.
  """
  size = labels.shape[1:3]
  if images.shape[1:3] != size:
    images = np.stack([np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
                       for image in images])
  return np.concatenate([images, colorize(preds, palette), colorize(labels, palette)], axis=2)
