"""Inference at the labels' resolution: multi-scale and flip test-time augmentation, sliding window.

`predict` runs inside the jitted evaluation step, on static shapes: for each
scale it resizes the batch, runs the network on the whole image or on
overlapping windows (`window`, `stride`: mmsegmentation's slide inference,
window logits averaged where they overlap; with `average='probs'` their
softmax, as VFM-UDA's `slide_inference_pre_cropped`), optionally on the mirrored image
too, resizes the logits to the output size (bilinear, half-pixel centres,
like PyTorch's align_corners=False) and averages the softmax probabilities.
Without augmentation it returns the resized logits themselves.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from segjax.models import layers


@dataclasses.dataclass(frozen=True)
class Inference:
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False
  window: tuple[int, ...] = ()  # (height, width) of sliding windows; () for whole images.
  stride: tuple[int, ...] = ()  # (height, width) between windows; default 2/3 of the window.
  average: str = "logits"  # What overlapping windows average: "logits" or "probs".

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | None) -> "Inference":
    if config is None:
      return cls()
    inference = cls(scales=tuple(float(s) for s in config.get("scales", (1.0,))),
                    flip=bool(config.get("flip", False)),
                    window=tuple(config.get("window", ())), stride=tuple(config.get("stride", ())),
                    average=config.get("average", "logits"))
    if inference.average not in ("logits", "probs"):
      raise ValueError(f"inference.average={inference.average!r}: expected 'logits' (mmseg's "
                       f"slide inference) or 'probs' (VFM-UDA's).")
    if not inference.scales or min(inference.scales) <= 0:
      raise ValueError(f"inference.scales={inference.scales}: expected positive factors.")
    for field in ("window", "stride"):
      value = getattr(inference, field)
      if value and (len(value) != 2 or min(value) <= 0):
        raise ValueError(f"inference.{field}={value}: expected (height, width) > 0, or ().")
    if inference.stride and not inference.window:
      raise ValueError("inference.stride is set but inference.window is not.")
    return inference

  @property
  def augmented(self) -> bool:
    return self.flip or self.scales != (1.0,)

  @property
  def window_probs(self) -> bool:
    """Whether sliding windows average their softmax (VFM-UDA) rather than their logits."""
    return bool(self.window) and self.average == "probs"

  @property
  def returns_probs(self) -> bool:
    """Whether `predict` returns probabilities (test-time augmentation, or windows averaging
    their softmax) rather than logits."""
    return self.augmented or self.window_probs


def _resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  return layers.resize_bilinear(x, *size)


def _window_starts(length: int, window: int, stride: int) -> list[int]:
  """Window offsets covering [0, length): every `stride`, the last one flush with the end."""
  if length <= window:
    return [0]
  count = math.ceil((length - window) / stride) + 1
  return sorted({min(i * stride, length - window) for i in range(count)})


def sliding_window(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
                   window: tuple[int, int], stride: tuple[int, int],
                   probs: bool = False) -> jax.Array:
  """Logits of `images` from overlapping windows, averaged where windows overlap; with
  `probs`, each window's softmax instead.

  An image smaller than the window along an axis is padded (zeros) to it there
  and the padding cropped from the logits.
  """
  height, width = images.shape[1:3]
  pad_h, pad_w = max(window[0] - height, 0), max(window[1] - width, 0)
  padded = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  full_h, full_w = padded.shape[1:3]
  total, count = None, jnp.zeros((1, full_h, full_w, 1), jnp.float32)
  for top in _window_starts(full_h, window[0], stride[0]):
    for left in _window_starts(full_w, window[1], stride[1]):
      crop = padded[:, top:top + window[0], left:left + window[1]]
      logits = logits_fn(crop).astype(jnp.float32)
      if probs:
        logits = jax.nn.softmax(logits, axis=-1)
      pads = ((0, 0), (top, full_h - top - window[0]), (left, full_w - left - window[1]), (0, 0))
      total = jnp.pad(logits, pads) if total is None else total + jnp.pad(logits, pads)
      count = count + jnp.pad(jnp.ones((1, *window, 1), jnp.float32), pads)
  return (total / count)[:, :height, :width]


def predict(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
            out_size: tuple[int, int], inference: Inference = Inference()) -> jax.Array:
  """Class scores (N, *out_size, C) for float images (N, H, W, 3), normalised.

  Logits when there is no test-time augmentation (with `average='probs'` windows, their
  averaged probabilities), else averaged probabilities; either way the argmax is the
  prediction.
  """
  height, width = images.shape[1:3]
  probs = inference.window_probs

  def run(x):
    if inference.window:
      stride = inference.stride or tuple(max(1, w * 2 // 3) for w in inference.window)
      return sliding_window(logits_fn, x, inference.window, stride, probs)
    return logits_fn(x).astype(jnp.float32)

  if not inference.augmented:
    return _resize(run(images), out_size)
  total = None
  for scale in inference.scales:
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    scaled = _resize(images, size)
    views = [run(scaled)]
    if inference.flip:
      views.append(run(scaled[:, :, ::-1])[:, :, ::-1])
    for scores in views:
      view = _resize(scores, out_size)
      view = view if probs else jax.nn.softmax(view, axis=-1)
      total = view if total is None else total + view
  return total / (len(inference.scales) * (2 if inference.flip else 1))
