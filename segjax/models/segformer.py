"""Segmenters on SegFormer's MiT encoders: SegFormer's all-MLP head and DAFormer's fusion head.

  * `segformer_mitb0` ... `segformer_mitb5`: SegFormer (Xie et al. 2021). Each
    stage embedded by a Linear layer to `embed_dim` channels (256 for B0, 768
    for B1-B5, as the official configs), upsampled to 1/4, concatenated from
    the last stage to the first, fused by a 1x1 conv + BatchNorm + ReLU,
    channel dropout 0.1, a 1x1 classifier.
  * `daformer_mitb0` ... `daformer_mitb5`: DAFormer's context-aware fusion
    (Hoyer et al. 2022, `daformer_sepaspp_mitb5`): each stage embedded to 256
    channels, upsampled to 1/4, concatenated from the first stage to the last,
    fused by a depthwise-separable ASPP (a 1x1 branch and 3x3 depthwise +
    pointwise branches at dilations 6, 12, 18, each with BatchNorm and ReLU, no
    image pooling) and a 3x3 conv + BatchNorm + ReLU bottleneck, channel
    dropout 0.1, a 1x1 classifier.

Both upsample bilinearly without aligned corners (mmseg's `resize`); the
logits come back at the input's size. The encoder is the pretrained trunk
(`backbone`), read from the official `mit_b*.pth` or a Hugging Face SegFormer
file (`segjax.models.weights`). 'features' is the last stage's map, the
features DAFormer's ImageNet feature distance compares.
"""

from typing import Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segjax.models import layers, weights
from segjax.models.backbones import mit

SEGFORMER_EMBED = {"mit_b0": 256}  # Every other size: 768.
DAFORMER_EMBED = 256
DAFORMER_DILATIONS = (1, 6, 12, 18)


class _ConvNormReLU(nn.Module):
  """mmcv's ConvModule: a convolution without bias, BatchNorm, ReLU."""
  features: int
  kernel_size: int = 1
  dilation: int = 1
  groups: int = 1
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k = self.kernel_size
    x = layers.conv(self.features, k, 1, self.dilation * (k - 1) // 2, self.dilation,
                    groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv")(x)
    x = layers.norm("batch", train, self.bn_axis_name, self.dtype, self.param_dtype,
                    name="bn")(x)
    return nn.relu(x)


class SegFormerHead(nn.Module):
  num_classes: int
  embed_dim: int
  dropout_rate: float = 0.1
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: list[jax.Array], train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    height, width = features[0].shape[1:3]
    embedded = [layers.resize_bilinear(nn.Dense(self.embed_dim, name=f"linear_c{i}", **kw)(f),
                                       height, width)
                for i, f in enumerate(features, start=1)]
    x = jnp.concatenate(embedded[::-1], axis=-1)
    x = _ConvNormReLU(self.embed_dim, bn_axis_name=self.bn_axis_name, name="linear_fuse",
                      **kw)(x, train)
    x = layers.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(x, deterministic=not train)
    return layers.conv(self.num_classes, 1, use_bias=True, name="linear_pred", **kw)(x)


class DAFormerHead(nn.Module):
  num_classes: int
  embed_dim: int = DAFORMER_EMBED
  dilations: tuple[int, ...] = DAFORMER_DILATIONS
  dropout_rate: float = 0.1
  # 'aspp': the depthwise-separable ASPP and bottleneck; 'conv': one 1x1 conv + BN + ReLU
  # (HRDA's scale-attention head).
  fusion: str = "aspp"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: list[jax.Array], train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = lambda features, name, **k: _ConvNormReLU(
        features, bn_axis_name=self.bn_axis_name, name=name, **k, **kw)
    height, width = features[0].shape[1:3]
    embedded = [layers.resize_bilinear(nn.Dense(self.embed_dim, name=f"embed_{i}", **kw)(f),
                                       height, width)
                for i, f in enumerate(features)]
    x = jnp.concatenate(embedded, axis=-1)
    if self.fusion == "conv":
      x = block(self.embed_dim, "fuse")(x, train)
      x = layers.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(x, deterministic=not train)
      return layers.conv(self.num_classes, 1, use_bias=True, name="classifier", **kw)(x)
    if self.fusion != "aspp":
      raise ValueError(f"Unknown DAFormer head fusion {self.fusion!r}; expected 'aspp' or 'conv'.")
    branches = []
    for d in self.dilations:
      if d == 1:
        branches.append(block(self.embed_dim, "aspp_1x1")(x, train))
      else:  # Depthwise 3x3 at dilation d, then pointwise.
        y = block(x.shape[-1], f"aspp_d{d}_depthwise", kernel_size=3, dilation=d,
                  groups=x.shape[-1])(x, train)
        branches.append(block(self.embed_dim, f"aspp_d{d}_pointwise")(y, train))
    x = block(self.embed_dim, "bottleneck", kernel_size=3)(jnp.concatenate(branches, -1), train)
    x = layers.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(x, deterministic=not train)
    return layers.conv(self.num_classes, 1, use_bias=True, name="classifier", **kw)(x)


class MiTSegmenter(nn.Module):
  """A MiT encoder (`size`) and a decode head (`head`: 'segformer' or 'daformer').

  Output: {'logits', 'aux': (), 'features'} as the segmenter contract in
  `segjax.models` says.
  """
  num_classes: int
  size: str = "mit_b0"
  head: str = "daformer"
  dropout_rate: float = 0.1
  drop_path_rate: float = 0.1
  remat: bool = False
  scan_blocks: bool = False
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  # A staticmethod, as linen would wrap a callable attribute into a method.
  backbone_torch_key = staticmethod(weights.KeyMap(
      mit.MixVisionTransformer.torch_key, (weights.MIT, weights.HF_SEGFORMER),
      converters={weights.HF_SEGFORMER: mit.from_hugging_face},
      backbone_file_key=mit.is_encoder_key))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return cls(num_classes=num_classes, dropout_rate=config.get("dropout_rate", 0.1),
               drop_path_rate=config.get("drop_path_rate", 0.1),
               remat=config.get("remat", False), scan_blocks=config.get("scan_blocks", False),
               bn_axis_name=bn_axis_name,
               dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  def setup(self):
    self.backbone = mit.MixVisionTransformer(self.size, self.drop_path_rate, self.remat,
                                             self.dtype, self.param_dtype, self.scan_blocks)
    common = dict(dropout_rate=self.dropout_rate, bn_axis_name=self.bn_axis_name,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    if self.head == "segformer":
      self.decode_head = SegFormerHead(self.num_classes, SEGFORMER_EMBED.get(self.size, 768),
                                       **common)
    elif self.head == "daformer":
      self.decode_head = DAFormerHead(self.num_classes, **common)
    else:
      raise ValueError(f"Unknown MiT decode head {self.head!r}; expected 'segformer' or "
                       "'daformer'.")

  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    height, width = images.shape[1:3]
    features = self.backbone(images, train)
    logits = self.decode_head(features, train)
    return {"logits": layers.resize_bilinear(logits.astype(jnp.float32), height, width),
            "aux": (), "features": features[-1]}

  def encode(self, images: jax.Array) -> list[jax.Array]:
    """The encoder's four stages in inference mode (DAFormer's frozen ImageNet encoder)."""
    return self.backbone(images, False)


class DAFormerMiTB0(MiTSegmenter):
  size: str = "mit_b0"


class DAFormerMiTB1(MiTSegmenter):
  size: str = "mit_b1"


class DAFormerMiTB2(MiTSegmenter):
  size: str = "mit_b2"


class DAFormerMiTB3(MiTSegmenter):
  size: str = "mit_b3"


class DAFormerMiTB4(MiTSegmenter):
  size: str = "mit_b4"


class DAFormerMiTB5(MiTSegmenter):
  size: str = "mit_b5"


class SegFormerMiTB0(MiTSegmenter):
  size: str = "mit_b0"
  head: str = "segformer"


class SegFormerMiTB1(MiTSegmenter):
  size: str = "mit_b1"
  head: str = "segformer"


class SegFormerMiTB2(MiTSegmenter):
  size: str = "mit_b2"
  head: str = "segformer"


class SegFormerMiTB3(MiTSegmenter):
  size: str = "mit_b3"
  head: str = "segformer"


class SegFormerMiTB4(MiTSegmenter):
  size: str = "mit_b4"
  head: str = "segformer"


class SegFormerMiTB5(MiTSegmenter):
  size: str = "mit_b5"
  head: str = "segformer"
