"""FCN-32s, FCN-16s and FCN-8s on VGG16 (Long, Shelhamer and Darrell, CVPR 2015).

Scores are predicted from fc7 (`score_fr`) and, for the finer nets, from
pool4 and pool3 (`score_pool4`, `score_pool3`); all score layers start at
zero, so a fresh net predicts zeros and the trunk alone sets the first
gradients. Coarse scores are brought up by 2x transposed convolutions,
summed with the next skip's scores, and the sum is upsampled to the input by
one last transposed convolution. Every transposed convolution is
`kernel = 2 * stride` wide, holds the bilinear kernel of the reference
`surgery.upsample_filt` on its class diagonal, and has no bias.

`learned_upsampling`:
  True (the paper, section 4.2): the 2x deconvolutions (`upscore2`,
    `upscore_pool4`) are parameters, initialised to the bilinear kernel and
    trained; the final upsampling (`upscore`, `upscore16`, `upscore8`) is the
    fixed bilinear kernel, a constant with no parameters.
  False (the reference Caffe nets, whose deconvolutions have `lr_mult: 0`):
    every deconvolution is the fixed bilinear kernel; the model has no
    upsampling parameters.
  FCN-32s, whose only upsampling is the final one, is the same either way.

`conv1_padding` picks the geometry of the trunk (see `backbones.vgg`):
  100 (the reference, shelhamer/fcn.berkeleyvision.org): unpadded
    deconvolutions, and each skip's scores and the final map are cropped at
    the reference's offsets (Caffe's `crop` layers), which gives the input's
    size for any input size.
  1 ('aligned', the PyTorch peer benchmark's FCN8s): the deconvolutions are
    padded by stride / 2, like `ConvTranspose2d(k, s, padding=s // 2)`, so
    each one exactly doubles (or multiplies by its stride) its input, and
    for inputs divisible by 32 this is the peer's network op for op. Other
    sizes leave ceil-mode pooling one cell larger than an exact division; the
    upsampled map, which then overhangs the finer map at the bottom and right
    by less than one coarse cell, is cropped to it (offset 0), and the final
    map to the input. Nothing is padded, so no work is spent on filler pixels.

`skip_scaling` multiplies pool4 by 0.01 and pool3 by 1e-4 before their score
layers, as in the reference's at-once FCN-8s and CyCADA's FCN-8s, to train
all streams at once with a single learning rate.
"""

from collections.abc import Callable
from typing import Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.models import layers
from segjax.models.backbones.vgg import VGG16

# The reference's Caffe crop offsets, for conv1_padding 100: of each skip's
# scores against the upsampled coarser scores, and of the final map against
# the input, by output stride.
REFERENCE_SKIP_CROPS = {"pool4": 5, "pool3": 9}
REFERENCE_FINAL_CROPS = {32: 19, 16: 27, 8: 31}

# At-once FCN's scaling of the skip features (field `skip_scaling`).
SKIP_SCALES = {"pool4": 0.01, "pool3": 1e-4}


def upsample_filt(size: int) -> np.ndarray:
  """The (size, size) bilinear kernel of the reference's `surgery.upsample_filt`."""
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  rows, cols = np.ogrid[:size, :size]
  return (1 - abs(rows - center) / factor) * (1 - abs(cols - center) / factor)


def bilinear_kernel(size: int, channels: int) -> np.ndarray:
  """A (size, size, channels, channels) deconvolution kernel that upsamples each channel alone.

  `upsample_filt` on the diagonal (kernel[:, :, c, c]) and zeros elsewhere,
  the reference's initialisation of every FCN deconvolution.
  """
  kernel = np.zeros((size, size, channels, channels), np.float32)
  kernel[:, :, np.arange(channels), np.arange(channels)] = upsample_filt(size)[:, :, None]
  return kernel


def bilinear_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """A flax initialiser for `ConvTranspose` kernels: `bilinear_kernel`."""
  del key  # Deterministic.
  size, _, channels, out_channels = shape
  if channels != out_channels:
    raise ValueError(f"A bilinear deconvolution maps each channel to itself; got kernel "
                     f"shape {shape} with {channels} inputs and {out_channels} outputs.")
  return jnp.asarray(bilinear_kernel(size, channels), dtype)


def conv_transpose(x: jax.Array, kernel: jax.Array, stride: int, padding: int = 0,
                   output_padding: int = 0) -> jax.Array:
  """`torch.nn.functional.conv_transpose2d` on NHWC inputs.

  `kernel` is (k, k, in, out) with kernel[i, j, c, d] = torch_weight[c, d, i, j].
  A transposed convolution is the plain convolution of the input dilated by
  `stride` (stride - 1 zeros between pixels) and padded by k - 1 - padding
  (plus `output_padding` at the end) with the spatially flipped kernel; its
  output has (n - 1) * stride + k - 2 * padding + output_padding pixels.
  """
  low = kernel.shape[0] - 1 - padding
  return jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1].astype(x.dtype), window_strides=(1, 1),
      padding=[(low, low + output_padding)] * 2, lhs_dilation=(stride, stride),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvTranspose(nn.Module):
  """`torch.nn.ConvTranspose2d` with a square kernel, on NHWC inputs (see `conv_transpose`)."""
  features: int
  kernel_size: int
  stride: int
  padding: int = 0
  output_padding: int = 0
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.kaiming_normal()
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    y = conv_transpose(x.astype(self.dtype), kernel, self.stride, self.padding,
                       self.output_padding)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def _crop(x: jax.Array, offset: int, height: int, width: int) -> jax.Array:
  return x[:, offset:offset + height, offset:offset + width]


class _FCN(nn.Module):
  """An FCN on VGG16; subclasses name the skips, coarse to fine.

  Returns {'logits': (N, H, W, num_classes) float32, 'aux': (), 'features':
  fc7 (N, h, w, 4096) in the compute dtype, the map FCNs in the Wild's global
  domain classifier reads}. Dropout after fc6 and fc7 (`dropout_rate`, 0.5 in
  the reference) needs a 'dropout' rng when `train`. No normalisation layers,
  hence no `bn_axis_name`.
  """
  num_classes: int
  conv1_padding: int = 100
  learned_upsampling: bool = True
  skip_scaling: bool = False
  dropout_rate: float = 0.5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  skips = ()  # The skip features, coarse to fine: a class attribute, not a field.

  backbone_torch_key = staticmethod(VGG16.torch_key)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    del bn_axis_name  # No BatchNorm.
    return cls(num_classes=num_classes,
               conv1_padding=config.get("conv1_padding", 100),
               learned_upsampling=config.get("learned_upsampling", True),
               skip_scaling=config.get("skip_scaling", False),
               dropout_rate=config.get("dropout_rate", 0.5),
               dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  def _score(self, x: jax.Array, name: str) -> jax.Array:
    return layers.conv(self.num_classes, 1, use_bias=True, kernel_init=nn.initializers.zeros,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

  def _upsample(self, x: jax.Array, stride: int, learned_name: str | None = None) -> jax.Array:
    """Deconvolution by `stride` (kernel 2 * stride): learned as `learned_name`, or fixed if None."""
    padding = 0 if self.conv1_padding == 100 else stride // 2
    if learned_name:
      return ConvTranspose(self.num_classes, 2 * stride, stride, padding, use_bias=False,
                           kernel_init=bilinear_init, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=learned_name)(x)
    kernel = jnp.asarray(bilinear_kernel(2 * stride, self.num_classes), self.dtype)
    return conv_transpose(x, kernel, stride, padding)

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.conv1_padding not in (1, 100):
      raise ValueError(f"FCN conv1_padding must be 100 (the reference) or 1 (aligned); "
                       f"got {self.conv1_padding} (config field model.conv1_padding).")
    reference = self.conv1_padding == 100
    height, width = images.shape[1:3]
    features = VGG16(conv1_padding=self.conv1_padding, dropout_rate=self.dropout_rate,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="backbone")(images, train)
    x = self._score(features["fc7"], "score_fr")
    upscore_name = "upscore2"
    for skip in self.skips:
      x = self._upsample(x, 2, upscore_name if self.learned_upsampling else None)
      skip_features = features[skip]
      if self.skip_scaling:
        skip_features = skip_features * SKIP_SCALES[skip]
      score = self._score(skip_features, f"score_{skip}")
      if reference:
        score = _crop(score, REFERENCE_SKIP_CROPS[skip], *x.shape[1:3])
      else:
        x = _crop(x, 0, *score.shape[1:3])
      x = x + score
      upscore_name = f"upscore_{skip}"
    stride = 32 // 2 ** len(self.skips)
    x = self._upsample(x, stride)  # upscore / upscore16 / upscore8: always fixed.
    x = _crop(x, REFERENCE_FINAL_CROPS[stride] if reference else 0, height, width)
    return {"logits": x.astype(jnp.float32), "aux": (), "features": features["fc7"]}


class FCN32s(_FCN):
  """FCN-32s: fc7 scores upsampled 32x (k64 s32), no skips."""


class FCN16s(_FCN):
  """FCN-16s: fc7 scores up 2x (k4 s2) + pool4 scores, then 16x (k32 s16)."""
  skips = ("pool4",)


class FCN8s(_FCN):
  """FCN-8s: fc7 scores up 2x + pool4 scores, up 2x + pool3 scores, then 8x (k16 s8)."""
  skips = ("pool4", "pool3")
