"""CompactSeg: a small encoder-decoder that trains in minutes on a CPU.

The shape of DeepLabV3+ at toy width: a residual encoder to output stride 8,
dilated context blocks and image pooling, and a decoder that fuses stride-4
features before the classifier. Logits come back at the input's resolution.
"""

from typing import Self

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from segjax.models import layers


class ResidualBlock(nn.Module):
  features: int
  strides: int = 1
  dilation: int = 1
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    y = layers.ConvBNReLU(self.features, strides=self.strides, dilation=self.dilation,
                          **common)(x, train)
    y = layers.conv(self.features, 3, padding=self.dilation, dilation=self.dilation,
                    dtype=self.dtype, param_dtype=self.param_dtype)(y)
    y = layers.batch_norm(train, self.bn_axis_name, self.dtype, self.param_dtype)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = layers.conv(self.features, 1, self.strides, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=nn.initializers.lecun_normal())(x)
      x = layers.batch_norm(train, self.bn_axis_name, self.dtype, self.param_dtype)(x)
    return nn.relu(x + y)


class CompactSeg(nn.Module):
  """Returns {'logits', 'aux', 'features'} for images (N, H, W, 3).

  'logits' (N, H, W, num_classes) float32; 'aux': with `aux_head`, in training,
  the logits of a 1x1 classifier on the stride-8 context features (the place
  of DeepLab-v2's layer3 head, for multi-level adaptation), else ();
  'features': the stride-8 context features (what FCNs in the Wild aligns).
  """
  num_classes: int
  width: int = 32
  dropout_rate: float = 0.1
  aux_head: bool = False
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return cls(num_classes=num_classes, width=config.width, dropout_rate=config.dropout_rate,
               aux_head=config.get("aux_head", False),
               bn_axis_name=bn_axis_name,
               dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  @nn.compact
  def __call__(self, images, train: bool = False):
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    w = self.width
    height, width = images.shape[1:3]
    x = images.astype(self.dtype)
    x = layers.ConvBNReLU(w, strides=2, **common)(x, train)            # 1/2
    x = ResidualBlock(w, **common)(x, train)
    low = ResidualBlock(2 * w, strides=2, **common)(x, train)          # 1/4
    x = ResidualBlock(4 * w, strides=2, **common)(low, train)          # 1/8
    x = ResidualBlock(4 * w, dilation=2, **common)(x, train)
    x = ResidualBlock(4 * w, dilation=4, **common)(x, train)
    # Image pooling: the global context of DeepLab's ASPP.
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = layers.ConvBNReLU(4 * w, kernel_size=1, **common)(pooled, train)
    x = jnp.concatenate([x, jnp.broadcast_to(pooled, x.shape)], axis=-1)
    x = layers.ConvBNReLU(4 * w, kernel_size=1, **common)(x, train)
    features = x
    aux = ()
    if self.aux_head:
      aux_logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               kernel_init=nn.initializers.lecun_normal(), name="aux_head")(x)
      if train:
        aux = (layers.resize_bilinear(aux_logits, height, width).astype(jnp.float32),)
    # Decoder: upsample to stride 4 and fuse the low-level features.
    x = layers.resize_bilinear(x, *low.shape[1:3])
    low = layers.ConvBNReLU(w, kernel_size=1, **common)(low, train)
    x = jnp.concatenate([x, low], axis=-1)
    x = layers.ConvBNReLU(2 * w, **common)(x, train)
    x = layers.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype,
                         kernel_init=nn.initializers.lecun_normal())(x)
    return {"logits": layers.resize_bilinear(logits, height, width).astype(jnp.float32),
            "aux": aux, "features": features}
