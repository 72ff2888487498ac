"""U-Net (Ronneberger et al., MICCAI 2015) and seed (d)'s shallow encoder-decoder.

`UNet` is the "reference UNet" of seed (d), milesial/Pytorch-UNet: double
3x3 conv-BN-ReLU blocks (no conv bias) at widths 64-128-256-512-1024, four 2x
max-pool downs, four ups that double the resolution (a learned 2x2 stride-2
transposed convolution, or with `bilinear` an align-corners bilinear resize
and a halved bottom width) and concatenate the skip, then a 1x1 classifier.
With 2 classes it has 31,037,698 parameters (17,263,042 with `bilinear`).

`UNetSmall` is seed (d)'s own "my_FCN" (kerrgarr/SemanticSegmentationCityscapes,
`seg_code/models.py`), ported layer for layer; see its docstring.

Both work at any input size (UNet: at least 16 pixels a side, for its four
pools): pooling floors (UNet) or ceils (UNetSmall) odd sizes, and the decoder
pads (UNet) or resamples (UNetSmall) each upsampled map to its skip's size.
"""

from typing import Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.models import layers
from segjax.models.fcn import ConvTranspose


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of 1-D linear interpolation with align_corners=True."""
  position = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
  low = np.floor(position).astype(np.int64)
  high = np.minimum(low + 1, n_in - 1)
  frac = position - low
  matrix = np.zeros((n_out, n_in), np.float32)
  np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
  np.add.at(matrix, (np.arange(n_out), high), frac)
  return matrix


def resize_bilinear_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of NHWC maps with align_corners=True (the reference UNet's nn.Upsample).

  Corner pixels map to corner pixels, unlike `layers.resize_bilinear`; done as
  two small interpolation matrices, one per axis.
  """
  rows = jnp.asarray(_interpolation_matrix(x.shape[1], height), x.dtype)
  cols = jnp.asarray(_interpolation_matrix(x.shape[2], width), x.dtype)
  return jnp.einsum("ph,qw,nhwc->npqc", rows, cols, x)


def adaptive_max_pool(x: jax.Array, height: int, width: int) -> jax.Array:
  """`nn.AdaptiveMaxPool2d((height, width))` on NHWC maps, to a smaller or larger size.

  Output cell i of an axis takes the max over input cells
  [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)); to a larger size
  this repeats cells (exact nearest-neighbour upsampling for a factor of 2).
  """
  for axis, n_out in ((1, height), (2, width)):
    n_in = x.shape[axis]
    starts = np.arange(n_out) * n_in // n_out
    ends = -(-np.arange(1, n_out + 1) * n_in // n_out)
    length = int((ends - starts).max())
    # Windows padded to a common length by repeating their last cell, which leaves the max alone.
    index = np.minimum(starts[:, None] + np.arange(length), ends[:, None] - 1)
    x = jnp.take(x, index.reshape(-1), axis=axis)
    x = x.reshape(x.shape[:axis] + (n_out, length) + x.shape[axis + 1:]).max(axis=axis + 1)
  return x


def resize_nearest_torch(x: jax.Array, height: int, width: int) -> jax.Array:
  """`F.interpolate(mode='nearest')` on NHWC maps: source index floor(i * n_in / n_out).

  The scale is a float32, as in PyTorch, so indices match it exactly; this
  differs from `jax.image.resize`'s half-pixel 'nearest'.
  """
  for axis, n_out in ((1, height), (2, width)):
    n_in = x.shape[axis]
    index = (np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)).astype(np.int64)
    x = jnp.take(x, np.minimum(index, n_in - 1), axis=axis)
  return x


class DoubleConv(nn.Module):
  """(3x3 conv without bias -> BN -> ReLU) x 2; the first conv to `mid_features`."""
  features: int
  mid_features: int | None = None
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.ConvBNReLU(self.mid_features or self.features, **common)(x, train)
    return layers.ConvBNReLU(self.features, **common)(x, train)


class Up(nn.Module):
  """Doubles the resolution, pads to the skip's size, concatenates [skip, x], DoubleConv.

  Learned: a 2x2 stride-2 transposed convolution halving the channels, then
  DoubleConv(features). `bilinear`: an align-corners resize keeping the
  channels, then DoubleConv(features, mid = half the concatenated channels).
  The padding (half before, half after, as the reference) absorbs the pixel
  lost when pooling floored an odd size.
  """
  features: int
  bilinear: bool = False
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skip, train: bool):
    if self.bilinear:
      x = resize_bilinear_align_corners(x, 2 * x.shape[1], 2 * x.shape[2])
    else:
      x = ConvTranspose(x.shape[-1] // 2, 2, 2, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="up")(x)
    dy, dx = skip.shape[1] - x.shape[1], skip.shape[2] - x.shape[2]
    x = jnp.pad(x, ((0, 0), (dy // 2, dy - dy // 2), (dx // 2, dx - dx // 2), (0, 0)))
    x = jnp.concatenate([skip, x], axis=-1)
    mid = x.shape[-1] // 2 if self.bilinear else None
    return DoubleConv(self.features, mid, self.bn_axis_name, self.dtype, self.param_dtype,
                      name="conv")(x, train)


class UNet(nn.Module):
  """milesial/Pytorch-UNet's UNet; `width` is the first level's width (64 in the reference).

  Submodules carry the reference's names (inc, down1..4, up1..4, outc).
  Returns {'logits': (N, H, W, num_classes) float32, 'aux': ()}.
  """
  num_classes: int
  width: int = 64
  bilinear: bool = False
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return cls(num_classes=num_classes, width=config.get("width", 64),
               bilinear=config.get("bilinear", False),
               bn_axis_name=bn_axis_name,
               dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  @nn.compact
  def __call__(self, images, train: bool = False):
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    # The bilinear variant halves the bottom width, since its ups cannot halve channels.
    factor = 2 if self.bilinear else 1
    x = DoubleConv(self.width, name="inc", **common)(images.astype(self.dtype), train)
    skips = []
    for level in range(1, 5):
      skips.append(x)
      features = self.width * 2 ** level // (factor if level == 4 else 1)
      x = DoubleConv(features, name=f"down{level}", **common)(layers.max_pool(x, 2, 2), train)
    for level in range(1, 5):
      features = self.width * 2 ** (4 - level) // (factor if level < 4 else 1)
      x = Up(features, self.bilinear, name=f"up{level}", **common)(x, skips.pop(), train)
    logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="outc")(x)
    return {"logits": logits.astype(jnp.float32), "aux": ()}


class SeedBlock(nn.Module):
  """Seed (d)'s down_conv / up_conv: (3x3 conv with bias -> ReLU -> BN) x 2.

  BatchNorm after the ReLU, as the seed has it (unlike DoubleConv).
  """
  features: int
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(2):
      x = layers.conv(self.features, 3, padding=1, use_bias=True, dtype=self.dtype,
                      param_dtype=self.param_dtype)(x)
      x = layers.batch_norm(train, self.bn_axis_name, self.dtype, self.param_dtype)(nn.relu(x))
    return x


class UNetSmall(nn.Module):
  """Seed (d)'s shallow encoder-decoder "my_FCN", at widths w-2w-4w-8w (w = 32 in the seed).

  Layer for layer (with the seed's names):
    conv_down1 (w) at 1/1, ceil-mode 2x2 max pool, conv_down2 (2w) at 1/2,
    pool, conv_down3 (4w) at 1/4, conv_down4 (8w) also at 1/4: the seed feeds
    it conv3, not a pooled map, so the encoder stops at stride 4;
    bottleneck: a 3x3 stride-2 transposed convolution (padding 1, output
    padding 1) to 4w at 1/2, plus conv3 resampled to its size by adaptive
    max pooling (the seed's `crop`; a nearest 2x upsampling here);
    conv_up3 (2w), upsample3: the same transposed convolution to w at 1/1,
    plus conv1 resampled likewise; classifier: 1x1 conv; then a nearest
    resize to the input (the 1/1 map is 4 * ceil(H / 4) tall).
  conv2 is not a skip, and there is no 1/8 level, exactly as in the seed.
  Skips are summed, not concatenated. The seed's input normalisation,
  (x - 0.5) / 0.25 inside forward, is left to the data pipeline, which
  normalises the inputs of every model.
  With 19 classes and width 32 it has 1,599,283 parameters.
  Returns {'logits': (N, H, W, num_classes) float32, 'aux': ()}.
  """
  num_classes: int
  width: int = 32
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return cls(num_classes=num_classes, width=config.get("width", 32),
               bn_axis_name=bn_axis_name,
               dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  @nn.compact
  def __call__(self, images, train: bool = False):
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    upsample = dict(kernel_size=3, stride=2, padding=1, output_padding=1, dtype=self.dtype,
                    param_dtype=self.param_dtype)
    w = self.width
    height, width = images.shape[1:3]
    conv1 = SeedBlock(w, name="conv_down1", **common)(images.astype(self.dtype), train)
    conv2 = SeedBlock(2 * w, name="conv_down2", **common)(
        layers.max_pool(conv1, 2, 2, ceil_mode=True), train)
    conv3 = SeedBlock(4 * w, name="conv_down3", **common)(
        layers.max_pool(conv2, 2, 2, ceil_mode=True), train)
    conv4 = SeedBlock(8 * w, name="conv_down4", **common)(conv3, train)
    x = ConvTranspose(4 * w, name="bottleneck", **upsample)(conv4)
    x = x + adaptive_max_pool(conv3, *x.shape[1:3])
    x = SeedBlock(2 * w, name="conv_up3", **common)(x, train)
    x = ConvTranspose(w, name="upsample3", **upsample)(x)
    x = x + adaptive_max_pool(conv1, *x.shape[1:3])
    logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="classifier")(x)
    logits = resize_nearest_torch(logits, height, width)
    return {"logits": logits.astype(jnp.float32), "aux": ()}
