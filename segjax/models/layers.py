"""Building blocks shared by the segmentation networks."""

import contextlib
import functools
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax import global_batch, platforms
from segjax.models import fast_ops


def dtype_of(name: str) -> jnp.dtype:
  """Maps a config string ('float32', 'bfloat16', ...) to a dtype."""
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"Unknown dtype {name!r}; expected e.g. 'float32' or 'bfloat16'.") from e


_BATCH_STATISTICS = threading.local()


@contextlib.contextmanager
def batch_statistics():
  """Within it, while a network is traced, every BatchNorm normalises with the batch's statistics
  (synchronised as in training), whatever its `train`: DACS's, DAFormer's and VFM-UDA's EMA
  teacher runs in training mode with dropout and drop path off. The batch statistics update
  the 'batch_stats' collection, so apply the network with it mutable."""
  previous = getattr(_BATCH_STATISTICS, "on", False)
  _BATCH_STATISTICS.on = True
  try:
    yield
  finally:
    _BATCH_STATISTICS.on = previous


def bn_training(train: bool) -> bool:
  """Whether a BatchNorm normalises with the batch's statistics: in training, or within
  `batch_statistics`."""
  return train or getattr(_BATCH_STATISTICS, "on", False)


def batch_norm(train: bool, axis_name: str | None, dtype, param_dtype) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5).

  `axis_name` set: statistics are averaged over that mesh axis (synchronised
  BatchNorm); None: each device normalises with its own batch.
  """
  return norm("batch", train, axis_name, dtype, param_dtype)


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
    x = conv(self.features, k, self.strides, self.dilation * (k - 1) // 2, self.dilation,
             dtype=self.dtype, param_dtype=self.param_dtype)(x)
    x = batch_norm(train, self.bn_axis_name, self.dtype, self.param_dtype)(x)
    return nn.relu(x)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of NHWC features (align_corners=False, like F.interpolate: no
  antialiasing when it shrinks).

  Traced for `segjax.export`, the same interpolation is written as two gathers
  and a blend per axis (`_interpolate`): jax.image.resize's products with
  interpolation matrices quantise badly in TFLite's int8 (measured: the
  int8 argmax agreed on 67% of pixels with them).
  """
  if x.shape[1:3] == (height, width):
    return x
  if platforms.exporting():
    return _interpolate(_interpolate(x, 1, height), 2, width)
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear",
                          antialias=False)


def _interpolate(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Half-pixel linear interpolation of `x` along `axis` to `size` samples, edges clamped."""
  n = x.shape[axis]
  source = np.clip((np.arange(size) + 0.5) * (n / size) - 0.5, 0, n - 1)
  low = np.floor(source).astype(np.int32)
  high = np.minimum(low + 1, n - 1)
  weight = (source - low).astype(np.float32).reshape(
      [size if d == axis else 1 for d in range(x.ndim)])
  return (jnp.take(x, low, axis=axis) * (1 - weight)
          + jnp.take(x, high, axis=axis) * weight).astype(x.dtype)


conv1x1 = functools.partial(nn.Conv, kernel_size=(1, 1))

# Eigen's float32 erf (XLA's own expansion on CPU and GPU): erf(x) = x P(x^2) / Q(x^2) on
# [-4, 4], +-1 beyond; within 5e-7 of lax.erf.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x (1 + erf(x / sqrt 2)) / 2 (PyTorch's nn.GELU()), within 2e-6 of
  nn.gelu(approximate=False).

  erf is written as XLA expands it, in plain arithmetic: lax.erf is exported
  as a StableHLO composite that TensorFlow's converters cannot read, and
  nn.gelu's erfc lowers to a masked branch that overflows, which ONNX
  (`segjax.export`) turns into NaN.
  """
  z = jnp.clip(x * np.sqrt(0.5).astype(x.dtype), -4.0, 4.0)
  z2 = z * z
  p = functools.reduce(lambda acc, c: acc * z2 + c, _ERF_P[1:], jnp.full_like(z2, _ERF_P[0]))
  q = functools.reduce(lambda acc, c: acc * z2 + c, _ERF_Q[1:], jnp.full_like(z2, _ERF_Q[0]))
  return 0.5 * x * (1.0 + z * p / q)


class Dropout(nn.Module):
  """nn.Dropout, each example's mask drawn from its own key (`global_batch.example_keys`).

  nn.Dropout draws one mask for the device's whole slice of the batch, so the
  masks, and the run, change with the number of devices; here example i of
  the global batch gets the same mask on any number of devices and processes.
  `broadcast_dims` (e.g. (1, 2): channel dropout, PyTorch's Dropout2d) share
  a mask along those dimensions. Needs a 'dropout' rng unless deterministic.
  """
  rate: float
  broadcast_dims: tuple[int, ...] = ()
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    keys = global_batch.example_keys(self.make_rng("dropout"), x.shape[0])
    shape = tuple(1 if d in self.broadcast_dims else n for d, n in enumerate(x.shape))[1:]
    keep = jax.vmap(lambda key: jax.random.bernoulli(key, keep_prob, shape))(keys)
    return jax.lax.select(jnp.broadcast_to(keep, x.shape), x / keep_prob, jnp.zeros_like(x))


class DropPath(nn.Module):
  """Stochastic depth (timm's DropPath): drops a residual branch for whole examples.

  Each example keeps the branch with probability 1 - rate, drawn from its own
  key (`global_batch.example_keys`) as `Dropout` draws its masks, and a kept
  branch is scaled by 1 / (1 - rate). Needs a 'dropout' rng unless
  deterministic. A `rate` passed to the call replaces the field's: a scanned
  stage passes each block's rate as a traced scalar.
  """
  rate: float
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None,
               rate: float | jax.Array | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    rate = self.rate if rate is None else rate
    if deterministic or (isinstance(rate, float) and rate == 0.0):
      return x
    keep_prob = 1.0 - rate
    keys = global_batch.example_keys(self.make_rng("dropout"), x.shape[0])
    keep = jax.vmap(lambda key: jax.random.bernoulli(key, keep_prob))(keys)
    scale = jnp.where(keep, 1.0 / keep_prob, 0.0).astype(x.dtype)
    return x * scale.reshape((-1,) + (1,) * (x.ndim - 1))


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine terms (torchvision's FrozenBatchNorm2d).

  All four tensors live in the `batch_stats` collection, so they are loaded and
  checkpointed like BatchNorm's but never receive gradients; their names match
  nn.BatchNorm's (scale, bias, mean, var), so one weight mapping serves both.
  """
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.variable("batch_stats", "scale", jnp.ones, (features,), self.param_dtype)
    bias = self.variable("batch_stats", "bias", jnp.zeros, (features,), self.param_dtype)
    mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), self.param_dtype)
    var = self.variable("batch_stats", "var", jnp.ones, (features,), self.param_dtype)
    mul = scale.value.astype(jnp.float32) * jax.lax.rsqrt(var.value.astype(jnp.float32)
                                                          + self.epsilon)
    add = bias.value.astype(jnp.float32) - mean.value.astype(jnp.float32) * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def norm(kind: str, train: bool, axis_name: str | None, dtype, param_dtype, name=None,
         momentum: float = 0.9):
  """'batch' (trainable BatchNorm; flax's `momentum`, PyTorch's 0.1 by default) or 'frozen'
  (FrozenBatchNorm), by config name."""
  if kind == "batch":
    train = bn_training(train)
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5,
                        axis_name=axis_name if train else None, dtype=dtype,
                        param_dtype=param_dtype, name=name)
  if kind == "frozen":
    return FrozenBatchNorm(dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"Unknown norm {kind!r} (config field model.norm); "
                   "expected 'batch' or 'frozen'.")


class Conv(nn.Module):
  """A 2-D convolution of NHWC maps with nn.Conv's variables, computed by `fast_ops`.

  The variables are nn.Conv's, with the same names, shapes and initial values
  ('kernel' (k, k, in / groups, out) and an optional 'bias'; the class name
  keeps flax's automatic 'Conv_<i>' names), so checkpoints and the weight
  converters are unchanged. `fast_ops.conv_general_dilated` computes lax's
  convolution, on XLA:CPU in the formulation it runs fastest for the static
  shapes. On XLA:CPU the bias is added in float32 and rounded once, which is
  what it does for a bfloat16 addition anyway, so that its gradient is a
  float32 sum: XLA:CPU splits a bfloat16 sum over a large map into a slow
  windowed reduction (about 70 ms per 2x256x512 map). Other platforms add it
  in the compute dtype.
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  dilation: int = 1
  groups: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.kaiming_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features), self.param_dtype)
    y = fast_ops.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.strides,) * 2,
        [(self.padding, self.padding)] * 2, rhs_dilation=(self.dilation,) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      bias = bias.astype(self.dtype)
      y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype) \
          if platforms.cpu_kernels() else y + bias
    return y


def conv(features: int, kernel_size: int, strides: int = 1, padding: int = 0,
         dilation: int = 1, use_bias: bool = False, groups: int = 1, dtype=jnp.float32,
         param_dtype=jnp.float32, name=None, kernel_init=None) -> Conv:
  """A 2-D convolution with PyTorch's arguments (symmetric integer padding); see `Conv`."""
  return Conv(features, kernel_size, strides, padding, dilation, groups, use_bias, dtype,
              param_dtype, kernel_init=kernel_init or nn.initializers.kaiming_normal(),
              name=name)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0,
             ceil_mode: bool = False) -> jax.Array:
  """MaxPool2d with PyTorch's semantics, including `ceil_mode` (Caffe's pooling).

  The gradient goes to each window's first maximum, as in PyTorch (see
  `fast_ops.max_pool`, which computes it without XLA:CPU's slow scatter).
  """
  pads = []
  for size in x.shape[1:3]:
    extra = 0
    if ceil_mode:
      out = -(-(size + 2 * padding - window) // stride) + 1
      if (out - 1) * stride >= size + padding:  # The last window must start inside the input.
        out -= 1
      extra = max(0, (out - 1) * stride + window - (size + 2 * padding))
    pads.append((padding, padding + extra))
  return fast_ops.max_pool(x, window, stride, tuple(pads))


# Flax variable names -> PyTorch's parameter and buffer names (conv and norm layers).
TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
                    "mean": "running_mean", "var": "running_var"}
