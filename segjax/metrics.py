"""Segmentation metrics from a confusion matrix.

The matrix is accumulated on device (`confusion_matrix`, summed over batches
and devices); the scores are computed on the host from the total, with the
definitions of FCN's `score.py` and the Cityscapes scripts:
IoU_c = TP / (TP + FP + FN), pixel accuracy = sum(diag) / sum(all),
mean accuracy = mean over classes of TP / (TP + FN). Classes with an empty
denominator (absent from labels and predictions) are NaN and left out of means.
"""

import jax
import jax.numpy as jnp
import numpy as np

from segjax.losses import IGNORE_LABEL


def confusion_matrix(labels: jax.Array, preds: jax.Array, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> jax.Array:
  """(num_classes, num_classes) int32 counts; rows are labels, columns predictions."""
  labels = labels.reshape(-1).astype(jnp.int32)
  preds = preds.reshape(-1).astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + preds, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes ** 2)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def scores(confusion: np.ndarray,
           subsets: tuple[tuple[str, tuple[int, ...]], ...] = ()) -> dict[str, float | np.ndarray]:
  """mIoU, per-class IoU, pixel accuracy and mean class accuracy.

  `subsets` adds the mean IoU over some classes under a name, from the same
  matrix (SYNTHIA's mIoU16 and mIoU13, the cross-city 13 classes).
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  tp = np.diag(confusion)
  label_totals = confusion.sum(axis=1)
  pred_totals = confusion.sum(axis=0)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = tp / (label_totals + pred_totals - tp)
    class_acc = tp / label_totals
    pixel_acc = tp.sum() / confusion.sum()
  result = {
      "miou": _nanmean(iou),
      "iou": iou,
      "pixel_acc": float(pixel_acc),
      "mean_acc": _nanmean(class_acc),
  }
  for name, classes in subsets:
    result[name] = _nanmean(iou[list(classes)])
  return result


def _nanmean(x: np.ndarray) -> float:
  return float(np.nanmean(x)) if np.any(np.isfinite(x)) else float("nan")
