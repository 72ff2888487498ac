"""Building blocks shared by the segmentation networks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def dtype_of(name: str) -> jnp.dtype:
  """Maps a config string ('float32', 'bfloat16', ...) to a dtype."""
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"Unknown dtype {name!r}; expected e.g. 'float32' or 'bfloat16'.") from e


def batch_norm(train: bool, axis_name: str | None, dtype, param_dtype) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5).

  `axis_name` set: statistics are averaged over that mesh axis (synchronised
  BatchNorm); None: each device normalises with its own batch.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5,
      axis_name=axis_name if train else None, dtype=dtype, param_dtype=param_dtype)


class ConvBNReLU(nn.Module):
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), strides=self.strides,
                kernel_dilation=self.dilation,
                padding=[(self.dilation * (k - 1) // 2,) * 2] * 2, use_bias=False,
                kernel_init=nn.initializers.kaiming_normal(),
                dtype=self.dtype, param_dtype=self.param_dtype)(x)
    x = batch_norm(train, self.bn_axis_name, self.dtype, self.param_dtype)(x)
    return nn.relu(x)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of NHWC features (align_corners=False, like F.interpolate)."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear")


conv1x1 = functools.partial(nn.Conv, kernel_size=(1, 1))
