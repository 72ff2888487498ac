"""HRDA's multi-resolution segmenter (Hoyer et al. 2022b, `HRDAEncoderDecoder` + `HRDAHead`).

  * `hrda_mitb0` ... `hrda_mitb5`: a MiT encoder and DAFormer's fusion head,
    applied at two scales of the input, whose predictions a learned scale
    attention fuses.

The context is the whole input resized by 0.5 (bilinear, no antialiasing, as
mmseg's `resize`); the encoder and the head predict it at 1/4 of its size, and
a second DAFormer head (256 channels, a 1x1 conv + BN + ReLU fusion instead of
the ASPP: HRDA's `scale_attention`) predicts from the same features one
attention map per class, through a sigmoid. The detail is a `detail_crop`
window of the input at full resolution, predicted by the same encoder and
head. The fused prediction, at 1/4 of the input:

    fused = up(a) * detail_inserted + up((1 - a) * context)

with `a` the attention, set to 0 outside the detail window, `up` a 2x bilinear
upsampling and `detail_inserted` the detail prediction placed in its window
(0 elsewhere): inside the window an attention-weighted sum, elsewhere the
context alone. The window's corner is a multiple of `detail_divisible` (8:
both grids then align), drawn per example in training (from the 'dropout'
stream, keyed by the example's index in the global batch, so a step is the
same on any number of devices), uniformly as HRDA's `get_crop_bbox`.

In inference (and for the teacher's pseudo labels) the detail covers the
whole input in `detail_crop` windows at half-window strides, each predicted
on its own and the overlaps averaged (HRDA's `hr_slide_inference`); the
attention is not masked. Training and inference sizes must be multiples of 8,
with the input at least `detail_crop`.

Outputs: 'logits' (the fused prediction resized to the input), 'aux' (),
'features' (the context's last encoder stage: DAFormer's feature distance at
scale 0.5, as HRDA's `feature_scale`), and in training 'detail_logits' (the
detail prediction resized to the window) with 'detail_offsets' ((N, 2) int32:
each window's top-left corner), for HRDA's detail loss on the labels of the
window. `encode` runs the encoder on the input at scale 0.5, so the frozen
ImageNet encoder is compared at the same scale.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax import global_batch
from segjax.models import layers, segformer

CONTEXT_SCALE = 0.5
HEAD_STRIDE = 4  # The DAFormer head predicts at 1/4 of its input.
ATTENTION_EMBED = 256
GRID = 8  # HEAD_STRIDE / CONTEXT_SCALE: the context prediction's cell, in input pixels.


def detail_offset(key: jax.Array, height: int, width: int, crop: tuple[int, int],
                  divisible: int) -> jax.Array:
  """(2,) int32: the top-left corner of a `crop` window in a height x width input, uniformly
  on the `divisible` grid (HRDA's `get_crop_bbox`)."""
  offsets = []
  for key, size, window in zip(jax.random.split(key), (height, width), crop):
    choices = max(1, (max(size - window, 0) + 1) // divisible)
    offsets.append(jax.random.randint(key, (), 0, choices) * divisible)
  return jnp.stack(offsets).astype(jnp.int32)


def fuse(context: jax.Array, attention: jax.Array, detail: jax.Array, offsets: jax.Array | None
         ) -> jax.Array:
  """HRDA's fusion (the module docstring) of a batch, at twice the context's grid.

  context (N, h, w, C) and attention (N, h, w, C or 1) on the context grid; detail
  (N, dh, dw, C) on the output grid (2h x 2w), placed with its top-left corner at
  `offsets` / 4 (input pixels); `offsets` None: the detail covers the whole output (2h,
  2w) and the attention is not masked.
  """
  n, h, w, _ = context.shape
  if offsets is not None:
    dh, dw = detail.shape[1:3]
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    top, left = (offsets[:, 0] // GRID)[:, None, None], (offsets[:, 1] // GRID)[:, None, None]
    inside = ((rows >= top) & (rows < top + dh // 2) & (cols >= left) & (cols < left + dw // 2))
    attention = attention * inside[..., None].astype(attention.dtype)
    canvas = jnp.zeros((n, 2 * h, 2 * w, detail.shape[-1]), detail.dtype)
    detail = jax.vmap(lambda c, d, o: jax.lax.dynamic_update_slice(
        c, d, (o[0] // HEAD_STRIDE, o[1] // HEAD_STRIDE, 0)))(canvas, detail, offsets)
  context = (1 - attention) * context
  up = lambda x: layers.resize_bilinear(x, 2 * h, 2 * w)
  return up(attention) * detail + up(context)


def slide_windows(height: int, width: int, crop: tuple[int, int]) -> list[tuple[int, int]]:
  """Top-left corners of `crop` windows covering height x width at half-window strides, the
  last ones moved back inside (HRDA's `extract_slide_feat`)."""
  corners = []
  for axis_size, window in zip((height, width), crop):
    stride = window // 2
    count = max(axis_size - window + stride - 1, 0) // stride + 1
    corners.append([max(min(i * stride + window, axis_size) - window, 0) for i in range(count)])
  return [(y, x) for y in corners[0] for x in corners[1]]


def average_windows(windows: list[jax.Array], corners: list[tuple[int, int]], height: int,
                    width: int) -> jax.Array:
  """(N, height, width, C): the windows (N, wh, ww, C) placed at `corners` and averaged where
  they overlap (every pixel must be covered)."""
  total, count = 0.0, np.zeros((height, width), np.float32)
  for window, (y, x) in zip(windows, corners):
    wh, ww = window.shape[1:3]
    # Padded into place (HRDA's F.pad), not scattered: the teacher runs this every step.
    total = total + jnp.pad(window, ((0, 0), (y, height - y - wh), (x, width - x - ww), (0, 0)))
    count[y:y + wh, x:x + ww] += 1
  return total / jnp.asarray(count, windows[0].dtype)[None, :, :, None]


class HRDASegmenter(segformer.MiTSegmenter):
  """A MiT segmenter at two scales with HRDA's scale attention: see the module docstring."""
  detail_crop: tuple[int, int] = (512, 512)
  detail_divisible: int = 8

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None):
    model = super().from_config(config, num_classes, bn_axis_name)
    crop = tuple(config.get("detail_crop", (512, 512)))
    divisible = config.get("detail_divisible", 8)
    if len(crop) != 2 or any(c <= 0 or c % GRID for c in crop):
      raise ValueError(f"model.detail_crop={crop} must be (height, width), multiples of {GRID}.")
    if divisible <= 0 or divisible % GRID:
      raise ValueError(f"model.detail_divisible={divisible} must be a multiple of {GRID} (the "
                       f"context prediction's cell), so that the two grids align.")
    return model.clone(detail_crop=crop, detail_divisible=divisible)

  def setup(self):
    super().setup()
    self.scale_attention = segformer.DAFormerHead(
        self.num_classes, embed_dim=ATTENTION_EMBED, fusion="conv",
        dropout_rate=self.dropout_rate, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
        param_dtype=self.param_dtype)

  def _check_size(self, height: int, width: int) -> None:
    if height % GRID or width % GRID:
      raise ValueError(f"HRDA's input must be a multiple of {GRID} on each side; got "
                       f"{height}x{width}.")
    if height < self.detail_crop[0] or width < self.detail_crop[1]:
      raise ValueError(f"HRDA's input {height}x{width} is smaller than model.detail_crop="
                       f"{self.detail_crop}.")

  def _predict(self, images: jax.Array, train: bool):
    features = self.backbone(images, train)
    return self.decode_head(features, train), features

  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    n, height, width, _ = images.shape
    self._check_size(height, width)
    context_images = layers.resize_bilinear(images, int(height * CONTEXT_SCALE),
                                            int(width * CONTEXT_SCALE))
    context, features = self._predict(context_images, train)
    attention = jax.nn.sigmoid(self.scale_attention(features, train).astype(jnp.float32))
    context = context.astype(jnp.float32)
    outputs = {"aux": (), "features": features[-1]}
    if train:
      keys = global_batch.example_keys(jax.random.fold_in(self.make_rng("dropout"), 0x48524441), n)
      offsets = jax.vmap(lambda key: detail_offset(key, height, width, self.detail_crop,
                                                   self.detail_divisible))(keys)
      crops = jax.vmap(lambda image, o: jax.lax.dynamic_slice(
          image, (o[0], o[1], 0), (*self.detail_crop, image.shape[-1])))(images, offsets)
      detail, _ = self._predict(crops, train)
      detail = detail.astype(jnp.float32)
      outputs["detail_logits"] = layers.resize_bilinear(detail, *self.detail_crop)
      outputs["detail_offsets"] = offsets
    else:
      offsets = None
      corners = slide_windows(height, width, self.detail_crop)
      # One batch of every window, as HRDA's extract_slide_feat: a teacher on batch statistics
      # (`layers.batch_statistics`) normalises the detail windows together, not each alone.
      crops = jnp.concatenate([images[:, y:y + self.detail_crop[0], x:x + self.detail_crop[1]]
                               for y, x in corners])
      windows = jnp.split(self._predict(crops, False)[0].astype(jnp.float32), len(corners))
      detail = average_windows(windows, [(y // HEAD_STRIDE, x // HEAD_STRIDE)
                                         for y, x in corners],
                               height // HEAD_STRIDE, width // HEAD_STRIDE)
    fused = fuse(context, attention, detail, offsets)
    outputs["logits"] = layers.resize_bilinear(fused, height, width)
    return outputs

  def encode(self, images: jax.Array) -> list[jax.Array]:
    """The encoder's four stages on the input at scale 0.5, in inference mode."""
    height, width = images.shape[1:3]
    return self.backbone(layers.resize_bilinear(images, int(height * CONTEXT_SCALE),
                                                int(width * CONTEXT_SCALE)), False)


class HRDAMiTB0(HRDASegmenter):
  size: str = "mit_b0"


class HRDAMiTB1(HRDASegmenter):
  size: str = "mit_b1"


class HRDAMiTB2(HRDASegmenter):
  size: str = "mit_b2"


class HRDAMiTB3(HRDASegmenter):
  size: str = "mit_b3"


class HRDAMiTB4(HRDASegmenter):
  size: str = "mit_b4"


class HRDAMiTB5(HRDASegmenter):
  size: str = "mit_b5"
