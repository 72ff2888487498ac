"""Convolution and max pooling arranged for speed on XLA:CPU, numerically lax's.

Only a CPU compile uses these formulations (`segjax.platforms`: the platform
being compiled for, the default backend unless a caller says otherwise). For
a GPU or TPU, `conv_general_dilated` and `max_pool` are lax's single
convolution (cuDNN's kernels and weight gradients) and reduce-window in the
compute dtype, exactly as if this module did not exist
(tests/test_platforms.py lowers the main job's step for CUDA and checks).
The choice is made while tracing, not by `lax.platform_dependent`, whose
per-convolution branches made tracing the main job's step 3.3x slower
(13.0 s instead of 3.9 s).

XLA:CPU runs a convolution's forward pass about as fast as PyTorch (oneDNN),
but its kernel gradient 1.5-6x slower: it computes it as a convolution whose
contracted feature dimension is the batch (2 here), a poor matrix product.
Other formulations sum the same products and run well, and which one is
fastest depends on the shapes, which are static. `conv_general_dilated` is a
drop-in for `lax.conv_general_dilated` (`layers.Conv` computes with it) that
plans each convolution:

  * kernel taps that can only read padding (a dilation at least the map's
    size, like DeepLabV3+'s rate-18 ASPP branch on a 16x32 map) are dropped:
    their outputs and gradients are exactly zero;
  * then each pass (forward, input gradient, kernel gradient) is one of
      - 'xla': lax's convolution (and its autodiff transposes);
      - 'taps': one 2-D matrix product per kernel tap, (input slice) @ (the
        tap's Cin x Cout matrix). Where padding makes up a fifth or more of
        the products (DeepLab's ASPP and VGG's fc6 on small maps), each tap
        covers only the outputs that read inside the map, so those products
        are skipped rather than computed as zeros. A 1x1 convolution is a
        single such product, differentiated by autodiff;
      - 'rows' (kernel gradient, stride 1): one product per kernel row,
        (input rows)^T @ (g shifted by each column tap, side by side);
      - 's2d' (input gradient of stride-2 convolutions): autodiff of the
        stride-1 convolution of the 2x2 space-to-depth input, which avoids
        the zero-interleaved gradient XLA is slow on.
    Forward: taps for 1x1 kernels and where taps skip padding on maps of at
    most 16x32 outputs, else XLA (which also fuses the BatchNorm and ReLU
    that follow). Input gradient: taps on maps of at most 16x32, s2d for
    stride 2 on large maps, else XLA. Kernel gradient: XLA's for stride 2 on
    the maps where the input gradient is s2d (ResNet's stem: 15.0 ms, taps
    20.6; BiSeNet's whole supervised step was 5-9% slower with taps there
    under glibc's default malloc, the same within noise with huge pages); rows for
    every other stride-1 convolution of 32 or more input channels whose taps
    read little padding (ResNet's layer1, 64 channels at 64x128: 9.5 ms, taps
    11.9, XLA 9.9; VGG's conv1_2: 144 ms, taps 193, XLA 372); else taps (VGG's
    conv1_1, 3 input channels: 20.5 ms, rows 94.7, XLA 23.0). Each rule was
    kept only where BiSeNet-R18's whole supervised and AdaptSegNet steps ran
    no slower with it (jax 0.10.2, XLA:CPU with YNNPACK, huge-page malloc as
    segjax's commands run: `segjax.hostmem`; `benchmarks/conv_formulations.py`
    times each candidate of each layer).
These rules come from timing each candidate on every convolution of the
segmentation models and the discriminator on a 2-core AVX-512 machine. All
formulations sum the same products as lax, so results agree to float
rounding (tests/test_fast_conv.py). bfloat16 inputs are computed in float32,
as XLA:CPU does internally, with one conversion per operand.

`max_pool` has a hand-written gradient: XLA:CPU differentiates a strided
max reduce-window through a scatter that took about 120 ms per ResNet stem at
2x256x512 (40 ms with this one). As in lax and PyTorch, each window's
gradient goes to its first maximum.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from segjax import platforms

_NHWC = ("NHWC", "HWIO", "NHWC")

_TAPS_MAX_MAP = 16 * 32           # forward and input gradient by taps up to this many outputs
_S2D_MIN_MAP = 64 * 128           # stride-2 input gradient by space-to-depth from this many outputs
_S2D_MIN_MAP_EVEN_KERNEL = 32 * 64  # ...or from this many when the kernel is even (no added taps)
_ROWS_MIN_CHANNELS = 32           # kernel gradient by rows (stride 1) from this many input channels
_SKIP_PADDING_BELOW = 0.8         # taps skip padded products when fewer than this share are live


@dataclasses.dataclass(frozen=True)
class _Plan:
  """One convolution's static geometry (dead taps dropped) and the formulation of each pass."""
  kernel_size: tuple[int, int]    # taps kept
  kernel_offset: tuple[int, int]  # first kept tap of the original kernel
  strides: tuple[int, int]
  dilation: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]  # for the kept taps; negative crops
  out_size: tuple[int, int]
  forward: str = "xla"
  input_grad: str = "xla"
  kernel_grad: str = "xla"
  skip_padding: bool = False  # taps read only the live boxes (else the padded input)


def _live_taps(size: int, taps: int, stride: int, dilation: int, low: int, out: int):
  """The first and last kernel taps (along one axis) that read at least one input pixel."""
  live = []
  for i in range(taps):
    offset = i * dilation - low          # input index read by output 0
    first = max(0, -(offset // stride))  # first output reading an index >= 0
    if first < out and offset + first * stride <= size - 1:
      live.append(i)
  return (live[0], live[-1]) if live else (taps // 2, taps // 2)


def _plan(x_shape, kernel_shape, strides, padding, dilation) -> _Plan:
  """Drops dead taps, then picks each pass's formulation from the shapes (module docstring)."""
  size, cin, taps = x_shape[1:3], x_shape[3], kernel_shape[:2]
  out = tuple((size[a] + sum(padding[a]) - dilation[a] * (taps[a] - 1) - 1) // strides[a] + 1
              for a in range(2))
  kept, offset, pads = [], [], []
  for a in range(2):
    first, last = _live_taps(size[a], taps[a], strides[a], dilation[a], padding[a][0], out[a])
    k = last - first + 1
    low = padding[a][0] - first * dilation[a]
    kept.append(k)
    offset.append(first)
    pads.append((low, (out[a] - 1) * strides[a] + dilation[a] * (k - 1) + 1 - size[a] - low))
  geometry = _Plan(tuple(kept), tuple(offset), tuple(strides), tuple(dilation), tuple(pads), out)
  pixels, kept_taps = out[0] * out[1], kept[0] * kept[1]
  live = sum((r1 - r0) * (c1 - c0)
             for ((r0, r1), _), ((c0, c1), _) in _live_boxes(x_shape, geometry))
  skip_padding = live < _SKIP_PADDING_BELOW * pixels * kept_taps
  pointwise, small = kept_taps == 1, pixels <= _TAPS_MAX_MAP
  forward = "taps" if pointwise or (small and skip_padding) else "xla"
  input_grad = "taps" if pointwise or small else "xla"
  kernel_grad = "taps"
  if not pointwise and strides == (2, 2) and dilation == (1, 1) and (
      pixels >= _S2D_MIN_MAP
      or (pixels >= _S2D_MIN_MAP_EVEN_KERNEL and kept[0] % 2 == 0 and kept[1] % 2 == 0)):
    input_grad, kernel_grad = "s2d", "xla"
  if (not pointwise and strides == (1, 1) and not skip_padding
      and cin >= _ROWS_MIN_CHANNELS):
    kernel_grad = "rows"
  return dataclasses.replace(geometry, forward=forward, input_grad=input_grad,
                             kernel_grad=kernel_grad, skip_padding=skip_padding)


def _pad(x, padding):
  """Zero-pads (or, for negative amounts, crops) the two spatial dimensions."""
  (top, bottom), (left, right) = padding
  return lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))


def _dense(x, w):
  """x (..., Cin) @ w (Cin, Cout), as one 2-D product.

  XLA:CPU canonicalises the transposes of a product of 4-D operands (as in
  its autodiff, the kernel gradient) with physical transposes that cost more
  than the product on small maps; 2-D operands need none.
  """
  return lax.dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])


def _gram(a, b):
  """a^T b over all leading dimensions: (..., M), (..., N) -> (M, N), as one 2-D product."""
  return lax.dot_general(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                         (((0,), (0,)), ((), ())))


def _in_float32(fn, *arrays):
  """fn on float32 copies of 16-bit float arrays, its results cast back to their dtype.

  XLA:CPU computes bfloat16 products in float32 anyway (converting per
  operation); converting once here keeps the tap slices, pads and sums in
  float32 instead of converting around each of them.
  """
  dtype = arrays[0].dtype
  if jnp.finfo(dtype).bits >= 32:
    return fn(*arrays)
  out = fn(*(a.astype(jnp.float32) for a in arrays))
  return jax.tree.map(lambda y: y.astype(dtype), out)


def _forward_xla(x, w, plan: _Plan):
  padding = plan.padding
  if min(min(p) for p in padding) < 0:  # lax's convolution only pads: crop first.
    x, padding = _pad(x, padding), ((0, 0), (0, 0))
  return lax.conv_general_dilated(x, w, plan.strides, padding, rhs_dilation=plan.dilation,
                                  dimension_numbers=_NHWC)


def _live_boxes(x_shape, plan: _Plan):
  """Per kernel tap (row-major): ((out_lo, out_hi), (in_lo, in_hi)) for rows, then for columns.

  Tap (i, j) of output (a, b) reads input (a*sh + i*dh - top, b*sw + j*dw - left).
  The outputs whose read lies inside the map form a box [out_lo, out_hi), and
  they read the strided input slice [in_lo, in_hi) of the unpadded map.
  """
  per_axis = []
  for size, out, stride, dilation, (low, _), taps in zip(
      x_shape[1:3], plan.out_size, plan.strides, plan.dilation, plan.padding, plan.kernel_size):
    ranges = []
    for k in range(taps):
      offset = k * dilation - low
      first = max(0, -(offset // stride))
      last = min(out - 1, (size - 1 - offset) // stride)
      ranges.append(((first, last + 1), (first * stride + offset, last * stride + offset + 1)))
    per_axis.append(ranges)
  return [(rows, cols) for rows in per_axis[0] for cols in per_axis[1]]


def _taps_geometry(x, plan: _Plan):
  """The input the taps read, and the plan to read it with: the padded map, unless skip_padding."""
  if plan.skip_padding:
    return x, plan
  return _pad(x, plan.padding), dataclasses.replace(plan, padding=((0, 0), (0, 0)))


def _tap_input(x, rows, cols, strides):
  """The strided input slice one tap reads (see `_live_boxes`)."""
  (_, (r0, r1)), (_, (c0, c1)) = rows, cols
  return lax.slice(x, (0, r0, c0, 0), (x.shape[0], r1, c1, x.shape[3]), (1, *strides, 1))


def _forward_taps(x, w, plan: _Plan):
  """The sum over kernel taps of (input slice @ tap matrix), each padded to the output."""
  x, plan = _taps_geometry(x, plan)
  (ho, wo), cin = plan.out_size, x.shape[-1]
  tap_matrices = w.reshape(-1, cin, w.shape[-1])
  y = None
  for t, (rows, cols) in enumerate(_live_boxes(x.shape, plan)):
    ((a0, a1), _), ((b0, b1), _) = rows, cols
    term = _dense(_tap_input(x, rows, cols, plan.strides), tap_matrices[t])
    term = _pad(term, ((a0, ho - a1), (b0, wo - b1)))
    y = term if y is None else y + term
  return y


def _forward_s2d(x, w, plan: _Plan):
  """A stride-2 convolution as a stride-1 one on 2x2 space-to-depth blocks (kernel padded even)."""
  (kh, kw), (ho, wo) = plan.kernel_size, plan.out_size
  eh, ew = kh + kh % 2, kw + kw % 2
  n, h, wd, c = x.shape
  hp, wp = 2 * (ho - 1) + eh, 2 * (wo - 1) + ew
  (top, _), (left, _) = plan.padding
  xp = _pad(x, ((top, hp - h - top), (left, wp - wd - left)))
  xs = xp.reshape(n, hp // 2, 2, wp // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(n, hp // 2, wp // 2, 4 * c)
  we = jnp.pad(w, ((0, eh - kh), (0, ew - kw), (0, 0), (0, 0)))
  ws = we.reshape(eh // 2, 2, ew // 2, 2, c, -1).transpose(0, 2, 1, 3, 4, 5)
  ws = ws.reshape(eh // 2, ew // 2, 4 * c, -1)
  return lax.conv_general_dilated(xs, ws, (1, 1), [(0, 0), (0, 0)], dimension_numbers=_NHWC)


_FORWARDS = {"xla": _forward_xla, "taps": _forward_taps, "s2d": _forward_s2d}


def _kernel_grad_taps(x, g, plan: _Plan):
  """dL/dw tap by tap: (input slice)^T @ g(box), a (Cin, Cout) product over N and the box."""
  x, plan = _taps_geometry(x, plan)
  grads = []
  for rows, cols in _live_boxes(x.shape, plan):
    ((a0, a1), _), ((b0, b1), _) = rows, cols
    grads.append(_gram(_tap_input(x, rows, cols, plan.strides), g[:, a0:a1, b0:b1]))
  return jnp.stack(grads).reshape(*plan.kernel_size, x.shape[-1], g.shape[-1])


def _kernel_grad_rows(x, g, plan: _Plan):
  """dL/dw per kernel row, stride 1: (padded input rows)^T @ [g shifted by each column tap].

  kh (Cin, kw*Cout) products and kh input slices, where taps makes kh*kw
  (Cin, Cout) products and slices: on large 64-channel maps this is the
  fastest, twice XLA's speed.
  """
  (kh, kw), (dh, dw), (ho, wo) = plan.kernel_size, plan.dilation, plan.out_size
  xp = _pad(x, plan.padding)
  wp, cin, cout = xp.shape[2], x.shape[-1], g.shape[-1]
  shifted = jnp.concatenate([_pad(g, ((0, 0), (j * dw, wp - wo - j * dw))) for j in range(kw)],
                            axis=-1)  # column j*dw + b holds g(b) in block j
  # [g shifted]^T @ (input rows), then transposed: XLA:CPU computes this order of the product up
  # to 1.15x faster and never slower (VGG's conv1_2: 204 ms instead of 233; 2x64x128x256 maps
  # with 256 output channels: 88 instead of 98; equal on maps of 16x32 and less).
  grads = [_gram(shifted, lax.slice_in_dim(xp, i * dh, i * dh + ho, axis=1)) for i in range(kh)]
  return jnp.stack(grads).reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, plan: _Plan):
  return _in_float32(functools.partial(_FORWARDS[plan.forward], plan=plan), x, w)


def _conv_fwd(x, w, plan: _Plan):
  return _conv(x, w, plan), (x, w)


def _conv_grads(g, x, w, plan: _Plan):
  _, input_vjp = jax.vjp(lambda x: _FORWARDS[plan.input_grad](x, w, plan), x)
  dx, = input_vjp(g)
  if plan.kernel_grad == "taps":
    dw = _kernel_grad_taps(x, g, plan)
  elif plan.kernel_grad == "rows":
    dw = _kernel_grad_rows(x, g, plan)
  else:
    _, kernel_vjp = jax.vjp(lambda w: _forward_xla(x, w, plan), w)
    dw, = kernel_vjp(g)
  return dx, dw


def _conv_bwd(plan: _Plan, residuals, g):
  return _in_float32(functools.partial(_conv_grads, plan=plan), g, *residuals)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _same_varying_axes(*arrays):
  """Casts the arrays to vary over the same manual (shard_map) mesh axes.

  Inside `shard_map` the batch varies over the data axis and the kernel does
  not. lax's convolution reconciles them implicitly, but a custom_vjp's
  cotangents must have its inputs' types, so the kernel is made varying
  first; the transpose of that cast sums its gradient over the axis, as lax's
  autodiff does.
  """
  axes = [jax.typeof(a).manual_axis_type.varying for a in arrays]
  union = frozenset().union(*axes)
  return tuple(lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
               for a, v in zip(arrays, axes))


def _apply(x, w, plan: _Plan):
  """The convolution of x by the full kernel w (dead taps included), formulated as planned."""
  (i0, j0), (kh, kw) = plan.kernel_offset, plan.kernel_size
  w = w[i0:i0 + kh, j0:j0 + kw]
  passes = (plan.forward, plan.input_grad, plan.kernel_grad)
  if passes == ("xla",) * 3:
    return _forward_xla(x, w, plan)
  if passes == ("taps",) * 3 and (kh, kw) == (1, 1):
    # One matrix product: its autodiff is the taps gradient.
    return _in_float32(functools.partial(_forward_taps, plan=plan), x, w)
  return _conv(*_same_varying_axes(x, w), plan)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, faster on XLA:CPU for plain 2-D NHWC/HWIO convolutions.

  Compiled for another platform it is lax's convolution itself. Depthwise
  convolutions (one input channel per output channel) are a sum of per-channel
  products of shifted input slices (`_depthwise_taps`). Other grouped,
  input-dilated, non-2-D, non-NHWC or mixed-dtype convolutions, string
  paddings, explicit precisions and result types go to lax unchanged.
  """
  if _is_depthwise(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count,
                   batch_group_count, precision, preferred_element_type):
    return _in_float32(functools.partial(_depthwise_taps, strides=tuple(window_strides),
                                         padding=tuple(map(tuple, padding)),
                                         dilation=tuple(rhs_dilation or (1, 1))), lhs, rhs)
  if (not platforms.cpu_kernels() or lhs.ndim != 4 or lhs.dtype != rhs.dtype
      or isinstance(padding, str)
      or feature_group_count != 1
      or batch_group_count != 1 or precision is not None or preferred_element_type is not None
      or any(d != 1 for d in (lhs_dilation or (1, 1)))
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  plan = _plan(lhs.shape, rhs.shape, tuple(window_strides), tuple(map(tuple, padding)),
               tuple(rhs_dilation or (1, 1)))
  return _apply(lhs, rhs, plan)


def _is_depthwise(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count,
                  batch_group_count, precision, preferred_element_type) -> bool:
  """A CPU compile's depthwise NHWC/HWIO convolution (kernel (kh, kw, 1, C), C groups)."""
  return (platforms.cpu_kernels() and lhs.ndim == 4 and lhs.dtype == rhs.dtype
          and not isinstance(padding, str) and batch_group_count == 1 and precision is None
          and preferred_element_type is None
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
          and feature_group_count > 1 and rhs.shape[2] == 1
          and feature_group_count == lhs.shape[3] == rhs.shape[3])


def _depthwise_taps(x, kernel, *, strides, padding, dilation):
  """A depthwise convolution as the sum over kernel taps of (input slice) * (the tap's weights).

  XLA:CPU's grouped convolution is slow at this: DAFormer's 3x3 depthwise
  branches over 1,024 channels on a 8x16x32 map take 0.2 s forward and 2.1-2.6
  s for both gradients; the products of the slices, and their autodiff
  (products and sums over the batch and map), take milliseconds.
  """
  n, height, width, channels = x.shape
  kh, kw = kernel.shape[:2]
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h = (x.shape[1] - dilation[0] * (kh - 1) - 1) // strides[0] + 1
  out_w = (x.shape[2] - dilation[1] * (kw - 1) - 1) // strides[1] + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      top, left = i * dilation[0], j * dilation[1]
      tap = lax.slice(x, (0, top, left, 0),
                      (n, top + (out_h - 1) * strides[0] + 1, left + (out_w - 1) * strides[1] + 1,
                       channels), (1, strides[0], strides[1], 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  del height, width
  return out


# ------------------------------------------------------------------------------ max pooling

def max_pool(x, window: int, stride: int, padding: tuple[tuple[int, int], tuple[int, int]]):
  """Max pooling of NHWC maps (padding with -inf); on XLA:CPU with a scatter-free gradient.

  Traced for `segjax.export`, the map is padded with copies of its edges instead,
  which gives the same maxima (a window reaching into the padding holds the
  edge it copies): -inf gives TFLite's int8 quantisation an infinite range.
  """
  if platforms.exporting():
    edges = jnp.pad(x, ((0, 0), *padding, (0, 0)), mode="edge")
    return _reduce_max(edges, window, stride, ((0, 0), (0, 0)))
  if platforms.cpu_kernels():
    return _max_pool_cpu(x, window, stride, padding)
  return _reduce_max(x, window, stride, padding)


def _reduce_max(x, window: int, stride: int, padding):
  # A Python scalar identity makes lax use its differentiable max reduce-window.
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           ((0, 0), *padding, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_cpu(x, window: int, stride: int, padding):
  return _in_float32(lambda x: _reduce_max(x, window, stride, padding), x)


def _max_pool_fwd(x, window, stride, padding):
  y = _max_pool_cpu(x, window, stride, padding)
  return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, g):
  return (_in_float32(functools.partial(_max_pool_grad, window, stride, padding), g,
                      *residuals),)


def _max_pool_grad(window, stride, padding, g, x, y):
  """Routes each window's gradient to its first maximum (row-major), as lax and PyTorch do.

  Tap (i, j) of output (a, b) reads padded input (a*stride + i, b*stride + j):
  the padded pixels of phase (i % stride, j % stride) collect that tap's
  gradient shifted by (i // stride, j // stride) outputs. The phases are then
  interleaved into the padded map, with no scatter and no zero-interleaving.
  """
  n, h, w, c = x.shape
  ho, wo = y.shape[1:3]
  (top, bottom), (left, right) = padding
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype),
               ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  hq, wq = -(-xp.shape[1] // stride), -(-xp.shape[2] // stride)
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)
  phases = {}
  for i in range(window):
    for j in range(window):
      tap = lax.slice(xp, (0, i, j, 0),
                      (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                      (1, stride, stride, 1))
      first = (tap == y) & ~taken
      taken = taken | first
      di, dj = i // stride, j // stride
      shifted = _pad(jnp.where(first, g, zero), ((di, hq - ho - di), (dj, wq - wo - dj)))
      key = (i % stride, j % stride)
      phases[key] = phases[key] + shifted if key in phases else shifted
  empty = jnp.zeros((n, hq, wq, c), g.dtype)
  grid = jnp.stack([jnp.stack([phases.get((p, q), empty) for q in range(stride)], 3)
                    for p in range(stride)], 2)  # (n, hq, p, wq, q, c)
  dxp = grid.reshape(n, hq * stride, wq * stride, c)
  return dxp[:, top:top + h, left:left + w]


_max_pool_cpu.defvjp(_max_pool_fwd, _max_pool_bwd)
