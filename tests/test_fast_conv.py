"""fast_ops' convolution and max pooling equal lax's, forward and both gradients."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from segjax import parallel
from segjax.models import fast_ops, layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _plan(x_shape, k, stride, padding, dilation, cout):
  return fast_ops._plan(x_shape, (k, k, x_shape[-1], cout), (stride,) * 2,
                        ((padding,) * 2,) * 2, (dilation,) * 2)


def _check(x_shape, k, stride, padding, dilation, cout, methods=None, dtype=jnp.float32):
  """Compares the output and the gradients of x and w with lax's (float32 reference).

  `methods` (forward, input_grad, kernel_grad) overrides the planned
  formulations, so that each is tested on every geometry.
  """
  rng = np.random.default_rng(sum(x_shape) + 7 * k + stride + padding + dilation)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, x_shape[-1], cout)) / k, jnp.float32)
  plan = _plan(x_shape, k, stride, padding, dilation, cout)
  if methods is not None:
    plan = dataclasses.replace(plan, forward=methods[0], input_grad=methods[1],
                               kernel_grad=methods[2])
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                              rhs_dilation=(dilation, dilation),
                                              dimension_numbers=NHWC)
  new = lambda x, w: fast_ops._apply(x.astype(dtype), w.astype(dtype), plan)
  y, ref_vjp = jax.vjp(ref, x, w)
  y_new, new_vjp = jax.vjp(jax.jit(new), x, w)
  assert y_new.shape == y.shape and y_new.dtype == dtype
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  for a, b in zip((y, *ref_vjp(g)), (y_new, *new_vjp(g.astype(dtype)))):
    scale = float(jnp.max(jnp.abs(a))) + 1e-6
    np.testing.assert_allclose(np.asarray(b, np.float32) / scale, np.asarray(a) / scale,
                               atol=tol, rtol=0)


GEOMETRIES = [  # (x_shape, k, stride, padding, dilation, cout)
    ((2, 13, 17, 6), 1, 1, 0, 1, 5),
    ((2, 13, 17, 6), 1, 2, 0, 1, 5),
    ((1, 13, 17, 6), 1, 2, 1, 1, 5),
    ((2, 13, 17, 6), 3, 1, 1, 1, 5),
    ((2, 13, 17, 6), 3, 2, 1, 1, 5),
    ((1, 13, 17, 6), 3, 1, 0, 1, 4),
    ((1, 13, 17, 6), 3, 2, 3, 1, 4),
    ((1, 13, 17, 6), 4, 2, 1, 1, 4),   # AdaptSegNet's discriminator
    ((1, 14, 18, 3), 7, 2, 3, 1, 4),   # ResNet's stem
    ((1, 4, 6, 5), 5, 1, 2, 1, 4),     # like VGG's fc6: a kernel as large as the map
    ((1, 6, 7, 3), 3, 1, 100, 1, 2),   # FCN's conv1_1 padding
    ((2, 9, 11, 4), 3, 1, 2, 2, 3),
    # Dilations reaching past the map: dead taps dropped (rows only, or down to 1x1).
    ((2, 5, 9, 4), 3, 1, 6, 6, 3),
    ((1, 7, 30, 4), 3, 1, 18, 18, 3),
    ((2, 5, 9, 4), 3, 1, 18, 18, 3),
    ((1, 4, 5, 4), 3, 2, 12, 12, 3),
]
METHODS = [("xla", "xla", "xla"), ("taps", "taps", "taps"), ("xla", "xla", "taps"),
           ("xla", "xla", "rows"), ("xla", "s2d", "xla")]


# Space-to-depth is for stride-2 convolutions without dilation only, rows for stride 1.
CASES = [(g, m) for g in GEOMETRIES for m in METHODS
         if (m[1] != "s2d" or (g[2] == 2 and g[4] == 1)) and (m[2] != "rows" or g[2] == 1)]


@pytest.mark.parametrize("geometry, methods", CASES, ids=str)
def test_conv_matches_lax(geometry, methods):
  _check(*geometry, methods=methods)


@pytest.mark.parametrize("geometry", [GEOMETRIES[i] for i in (1, 4, 7, 14)], ids=str)
def test_conv_bfloat16(geometry):
  _check(*geometry, dtype=jnp.bfloat16)


@pytest.mark.parametrize("x_shape,k,stride,padding,dilation,cout,expected", [
    ((2, 16, 32, 1024), 1, 1, 0, 1, 256, ("taps",) * 3),
    ((2, 64, 128, 256), 1, 2, 0, 1, 512, ("taps",) * 3),
    ((2, 16, 32, 2048), 3, 1, 12, 12, 256, ("taps",) * 3),   # DeepLabV3+'s ASPP
    ((2, 8, 16, 512), 7, 1, 3, 1, 4096, ("taps",) * 3),      # VGG's fc6
    ((2, 8, 16, 512), 3, 1, 1, 1, 512, ("xla", "taps", "rows")),
    ((2, 64, 128, 64), 3, 1, 1, 1, 64, ("xla", "xla", "rows")),    # ResNet's layer1
    ((2, 256, 512, 64), 3, 1, 1, 1, 64, ("xla", "xla", "rows")),   # VGG's conv1_2
    ((2, 256, 512, 3), 3, 1, 1, 1, 64, ("xla", "xla", "taps")),    # VGG's conv1_1
    ((2, 128, 256, 128), 3, 1, 1, 1, 128, ("xla", "xla", "rows")),  # VGG's conv2_2
    ((2, 256, 512, 3), 7, 2, 3, 1, 64, ("xla", "s2d", "xla")),     # ResNet's stem
    ((2, 256, 512, 19), 4, 2, 1, 1, 64, ("xla", "s2d", "xla")),    # the FCD's first layer
    ((2, 64, 128, 128), 4, 2, 1, 1, 256, ("xla", "s2d", "xla")),   # the FCD's third layer
    ((2, 32, 64, 256), 4, 2, 1, 1, 512, ("xla", "taps", "taps")),  # the FCD's fourth layer
    ((2, 64, 128, 64), 3, 2, 1, 1, 128, ("xla", "xla", "taps")),   # ResNet's layer2 downsampling
])
def test_plan_per_shape(x_shape, k, stride, padding, dilation, cout, expected):
  plan = _plan(x_shape, k, stride, padding, dilation, cout)
  assert (plan.forward, plan.input_grad, plan.kernel_grad) == expected, plan


def test_dead_taps_are_dropped():
  # Rate 18 on a 16x32 map: the top and bottom kernel rows read only padding.
  plan = _plan((2, 16, 32, 8), 3, 1, 18, 18, 4)
  assert (plan.kernel_size, plan.kernel_offset, plan.padding) == ((1, 3), (1, 0),
                                                                  ((0, 0), (18, 18)))


def test_unsupported_convolutions_go_to_lax():
  x = jnp.ones((1, 6, 6, 4))
  grouped = fast_ops.conv_general_dilated(x, jnp.ones((3, 3, 2, 4)), (1, 1), [(1, 1)] * 2,
                                          dimension_numbers=NHWC, feature_group_count=2)
  expected = lax.conv_general_dilated(x, jnp.ones((3, 3, 2, 4)), (1, 1), [(1, 1)] * 2,
                                      dimension_numbers=NHWC, feature_group_count=2)
  np.testing.assert_array_equal(grouped, expected)


@pytest.mark.parametrize("shape, k, stride, padding, dilation", [
    ((2, 17, 23, 64), 3, 1, 1, 1),   # MiT's Mix-FFN
    ((2, 17, 23, 64), 3, 2, 1, 1),
    ((2, 9, 11, 32), 5, 1, 3, 2),
    ((2, 16, 32, 256), 3, 1, 12, 12),  # DAFormer's dilated depthwise ASPP branch
])
def test_depthwise_convolutions_are_lax_in_value_and_gradient(shape, k, stride, padding, dilation):
  """On the CPU a depthwise convolution is a sum of shifted per-channel products."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, 1, shape[-1])), jnp.float32)

  def conv(fn):
    return lambda x, kernel: fn(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                rhs_dilation=(dilation, dilation), dimension_numbers=NHWC,
                                feature_group_count=shape[-1])

  ours, theirs = conv(fast_ops.conv_general_dilated), conv(lax.conv_general_dilated)
  np.testing.assert_allclose(ours(x, kernel), theirs(x, kernel), rtol=1e-5, atol=1e-4)
  loss = lambda fn: jax.grad(lambda x, k: jnp.sum(jnp.sin(fn(x, k))), argnums=(0, 1))(x, kernel)
  for a, b in zip(loss(ours), loss(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
  jaxpr = str(jax.make_jaxpr(ours)(x, kernel))
  assert "conv_general_dilated" not in jaxpr


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_layers_conv_matches_nn_conv(use_bias, dtype):
  """Same variables (names, shapes, initial values) as nn.Conv; same outputs and gradients."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 3)), jnp.float32)
  fast = layers.conv(4, 3, 2, 1, use_bias=use_bias, dtype=dtype)
  plain = nn.Conv(4, (3, 3), strides=2, padding=[(1, 1)] * 2, use_bias=use_bias, dtype=dtype,
                  kernel_init=nn.initializers.kaiming_normal())
  variables = fast.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, variables, plain.init(jax.random.key(0), x))
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a nonzero bias
  y, fast_vjp = jax.vjp(lambda v: fast.apply(v, x), variables)
  y_plain, plain_vjp = jax.vjp(lambda v: plain.apply(v, x), variables)
  assert y.dtype == y_plain.dtype == dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_plain, np.float32),
                             atol=tol)
  g = jnp.ones_like(y)
  for a, b in zip(jax.tree.leaves(fast_vjp(g)), jax.tree.leaves(plain_vjp(g))):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,window,stride,padding,ceil_mode", [
    ((2, 13, 17, 3), 3, 2, 1, False),
    ((1, 13, 17, 3), 3, 2, 0, True),
    ((1, 12, 12, 2), 2, 2, 0, False),
    ((1, 9, 10, 2), 3, 1, 1, False),
])
def test_max_pool_matches_lax(shape, window, stride, padding, ceil_mode):
  rng = np.random.default_rng(0)
  # Rounded ReLU outputs: many ties, which must go to the first maximum.
  x = jnp.asarray(np.maximum(np.round(rng.standard_normal(shape), 1), 0), jnp.float32)
  pads = layers.max_pool(x, window, stride, padding, ceil_mode).shape  # output size only
  ref_pads = []
  for size, out in zip(shape[1:3], pads[1:3]):
    ref_pads.append((padding, max(padding, (out - 1) * stride + window - size - padding)))
  ref = lambda x: nn.max_pool(x, (window, window), (stride, stride), ref_pads)
  new = lambda x: layers.max_pool(x, window, stride, padding, ceil_mode)
  y, ref_vjp = jax.vjp(ref, x)
  y_new, new_vjp = jax.vjp(jax.jit(new), x)
  np.testing.assert_array_equal(y_new, y)
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  np.testing.assert_allclose(new_vjp(g)[0], ref_vjp(g)[0], atol=1e-6)
  # bfloat16: the same routing (exact maxima), gradients summed in float32 then rounded.
  y16, vjp16 = jax.vjp(jax.jit(new), x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y16, np.float32), np.asarray(y.astype(jnp.bfloat16),
                                                                       np.float32))
  np.testing.assert_allclose(np.asarray(vjp16(g.astype(jnp.bfloat16))[0], np.float32),
                             ref_vjp(g.astype(jnp.bfloat16).astype(jnp.float32))[0], rtol=1e-2)


def test_kernel_gradient_under_shard_map():
  """With the batch split over devices, the kernel gradient is summed over them, as lax's is."""
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((jax.device_count(), 6, 7, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 5, 4)), jnp.float32)

  def grad(conv):
    def loss(w, x):
      y = conv(x, w, (1, 1), [(1, 1)] * 2, dimension_numbers=NHWC)
      return jax.lax.psum(jnp.sum(y ** 2), parallel.DATA_AXIS)
    return jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
                                 out_specs=P()))(w, x)

  np.testing.assert_allclose(grad(fast_ops.conv_general_dilated),
                             grad(lax.conv_general_dilated), rtol=1e-5)
