"""Evaluation of a segmenter on a labelled split: the data-parallel step, the pass, the scores.

One home for what the training loop's periodic evaluations (`segjax.train`)
and the evaluation of a checkpoint (`segjax.evaluate`) share, so that both
report the same numbers for the same state: the step (`segjax.steps.eval_step`
with `config.inference`), a pass over the split accumulating a confusion
matrix, and the scalars written from it.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from segjax import data, inference, metrics, parallel, steps


def make_eval_step(config: ml_collections.ConfigDict, num_classes: int, mesh):
  """The data-parallel evaluation step, (seg_state, global batch, confusion) -> (confusion, preds).

  Test-time augmentation and sliding windows come from `config.inference`.
  """
  return parallel.data_parallel(
      functools.partial(steps.eval_step, num_classes=num_classes, mean=tuple(config.data.mean),
                        std=tuple(config.data.std),
                        inference=inference.Inference.from_config(config.get("inference"))),
      mesh, in_specs=(P(), P(parallel.DATA_AXIS), P()), out_specs=(P(), P(parallel.DATA_AXIS)))


def confusion_spec(num_classes: int, mesh) -> jax.ShapeDtypeStruct:
  """The evaluation step's running confusion matrix, for ahead-of-time compilation."""
  return jax.ShapeDtypeStruct((num_classes,) * 2, jnp.int32, sharding=parallel.replicated(mesh))


def evaluate(eval_fn, seg_state, eval_ds, mesh, num_classes: int, num_samples: int,
             on_predictions: Callable[[int, np.ndarray], None] | None = None
             ) -> tuple[np.ndarray, dict]:
  """Runs the evaluation split once; returns the confusion matrix and a few samples.

  `on_predictions(i, preds)`, if given, receives this process's rows of the
  predictions of its i-th local batch (padding records included).
  """
  def zeros():
    return parallel.make_replicated(lambda: jnp.zeros((num_classes, num_classes), jnp.int32),
                                    mesh)

  confusion = zeros()
  total = np.zeros((num_classes, num_classes), np.int64)
  pixels_on_device, samples = 0, {}
  for batch_index, local_batch in enumerate(eval_ds):
    batch_pixels = local_batch["label"].size * jax.process_count()
    if pixels_on_device + batch_pixels >= 2 ** 31:  # Flush before the int32 sum could overflow.
      total += np.asarray(confusion)
      confusion, pixels_on_device = zeros(), 0
    confusion, preds = eval_fn(seg_state, parallel.to_global(local_batch, mesh), confusion)
    pixels_on_device += batch_pixels
    if on_predictions is not None:
      on_predictions(batch_index, parallel.local_rows(preds))
    if not samples:
      n = min(num_samples, len(local_batch["image"]))
      samples = {"image": local_batch["image"][:n], "label": local_batch["label"][:n],
                 "pred": parallel.local_rows(preds)[:n]}
  total += np.asarray(confusion)
  return total, samples


def eval_subsets(config: ml_collections.ConfigDict) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """The extra mIoU subsets of the source and evaluation datasets (SYNTHIA's 16/13 classes...)."""
  subsets = dict(data.dataset_info(config.data.source, "data.source").eval_subsets)
  subsets.update(data.dataset_info(config.data.eval, "data.eval").eval_subsets)
  return tuple(subsets.items())


def eval_summary(confusion: np.ndarray, class_names: tuple[str, ...],
                 subsets: tuple = ()) -> dict[str, float]:
  """The scalars written for an evaluation: mIoU, accuracies, subsets, per-class IoU."""
  result = metrics.scores(confusion, subsets)
  summary = {"eval/miou": result["miou"], "eval/pixel_acc": result["pixel_acc"],
             "eval/mean_acc": result["mean_acc"]}
  summary.update({f"eval/{name}": result[name] for name, _ in subsets})
  summary.update({f"eval/iou/{name}": float(iou) for name, iou in zip(class_names, result["iou"])})
  return summary
