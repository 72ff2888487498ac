"""Pseudo-label thresholds: BDL's class-wise median and CBST's class-balanced portion.

Both are computed from the maximum softmax probability ("confidence") and the
predicted class of target pixels.

  median (BDL `SSL.py`, the real-time seed): for each class, the median
      confidence of the pixels predicted as that class, capped at 0.9
      (`cap`); a class never predicted gets 0. A pixel keeps its prediction
      when its confidence reaches its class's threshold, else it is ignored.
      Scope 'dataset' (BDL) pools every target image; 'image' (the seed's
      code) computes the thresholds of each image from its own pixels.
  cbst (Zou et al. 2018, `solve_ST.py`): for each class, k_c is the
      confidence ranked floor(n_c * p) - 1 in decreasing order among the n_c
      pixels predicted as c, p the target portion (0 -> k_c = 1 would keep
      nothing: classes with k_c = 0 get 1). A pixel is labelled
      argmax_c(prob_c / k_c) when that ratio reaches 1, else ignored.

Dataset-wide thresholds are accumulated in per-class histograms of the
confidences over `NUM_BINS` bins (`ConfidenceHistogram`), so the whole target
set never sits in memory: a threshold is the confidence value at the lower
edge of the bin holding the rank, exact to 1 / NUM_BINS. Per-image
thresholds are exact.
"""

import dataclasses

import numpy as np

from segjax.losses import IGNORE_LABEL

NUM_BINS = 1 << 16
MEDIAN_CAP = 0.9


def median_thresholds(confidences: np.ndarray, predictions: np.ndarray, num_classes: int,
                      cap: float = MEDIAN_CAP) -> np.ndarray:
  """BDL's thresholds from explicit lists: per class sorted(conf)[round(n / 2)], capped; 0 if absent.

  The index is NumPy's round (half to even), as in BDL.
  """
  confidences, predictions = np.ravel(confidences), np.ravel(predictions)
  thresholds = np.zeros(num_classes, np.float64)
  for c in range(num_classes):
    values = np.sort(confidences[predictions == c])
    if values.size:
      thresholds[c] = values[min(int(np.round(values.size * 0.5)), values.size - 1)]
  return np.minimum(thresholds, cap)


def cbst_thresholds(confidences: np.ndarray, predictions: np.ndarray, num_classes: int,
                    portion: float) -> np.ndarray:
  """CBST's k_c from explicit lists: sorted(conf, decreasing)[floor(n_c p) - 1]; 1 where 0 or absent."""
  confidences, predictions = np.ravel(confidences), np.ravel(predictions)
  thresholds = np.ones(num_classes, np.float64)
  for c in range(num_classes):
    values = np.sort(confidences[predictions == c])[::-1]
    rank = int(np.floor(values.size * portion)) - 1
    if values.size and rank >= 0 and values[rank] > 0:
      thresholds[c] = values[rank]
  return thresholds


@dataclasses.dataclass
class ConfidenceHistogram:
  """Per-class histograms of confidences, accumulated image by image (dataset-wide thresholds)."""
  num_classes: int
  counts: np.ndarray = None

  def __post_init__(self):
    if self.counts is None:
      self.counts = np.zeros((self.num_classes, NUM_BINS), np.int64)

  def add(self, confidences: np.ndarray, predictions: np.ndarray) -> None:
    bins = np.minimum((np.ravel(confidences) * NUM_BINS).astype(np.int64), NUM_BINS - 1)
    index = np.ravel(predictions).astype(np.int64) * NUM_BINS + bins
    self.counts += np.bincount(index, minlength=self.num_classes * NUM_BINS).reshape(
        self.num_classes, NUM_BINS)

  def _value_at_rank(self, c: int, rank: int) -> float:
    """The confidence (bin lower edge) of the rank-th smallest pixel predicted as c."""
    cumulative = np.cumsum(self.counts[c])
    return float(np.searchsorted(cumulative, rank + 1)) / NUM_BINS

  def median_thresholds(self, cap: float = MEDIAN_CAP) -> np.ndarray:
    thresholds = np.zeros(self.num_classes)
    for c in range(self.num_classes):
      n = int(self.counts[c].sum())
      if n:
        thresholds[c] = self._value_at_rank(c, min(int(np.round(n * 0.5)), n - 1))
    return np.minimum(thresholds, cap)

  def cbst_thresholds(self, portion: float) -> np.ndarray:
    thresholds = np.ones(self.num_classes)
    for c in range(self.num_classes):
      n = int(self.counts[c].sum())
      rank_from_top = int(np.floor(n * portion)) - 1
      if n and rank_from_top >= 0:
        value = self._value_at_rank(c, n - 1 - rank_from_top)
        thresholds[c] = value if value > 0 else 1.0
    return thresholds


def apply_median(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """(..., C) probabilities -> labels: the prediction where its confidence reaches its threshold."""
  predictions = np.argmax(probs, axis=-1)
  confidences = np.max(probs, axis=-1)
  keep = confidences >= thresholds[predictions]
  return np.where(keep, predictions, IGNORE_LABEL).astype(np.uint8)


def apply_cbst(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """(..., C) probabilities -> labels: argmax(prob / k) where max(prob / k) >= 1, else ignored."""
  ratios = probs / thresholds
  labels = np.argmax(ratios, axis=-1)
  return np.where(np.max(ratios, axis=-1) >= 1.0, labels, IGNORE_LABEL).astype(np.uint8)
