"""SegFormer's Mix Transformer encoders, MiT-B0 ... MiT-B5, with the official parameter names.

The structure is NVlabs' `mix_transformer.py` (as DAFormer, HRDA and MIC use
it): four stages, each an overlapping patch embedding (a 7x7 stride-4
convolution, then 3x3 stride-2 ones, padded by half the kernel, then
LayerNorm), transformer blocks of efficient self-attention (keys and values
from the map reduced by a `ratio` x `ratio` stride-`ratio` convolution and a
LayerNorm, where the ratio is over 1) and a Mix-FFN (Linear, 3x3 depthwise
convolution, GELU, Linear), each branch residual behind stochastic depth, and
a final LayerNorm. Any input size works: a stage's map is the previous one's
convolved, ceil(size / 4) then ceil(size / 2) each stage.

Submodules carry the official state-dict names (`patch_embed1.proj`,
`block1_0.attn.kv`, `norm1`), so `torch_key` maps a variable to the key of a
`mit_b*.pth` file without a table. Hugging Face's `SegformerModel` files name
them otherwise and split `kv` into `key` and `value`: `from_hugging_face`
renames them to the official keys first.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models import layers, weights

# name -> (widths, depths); every size has heads 1/2/5/8, reduction ratios 8/4/2/1, MLP ratio 4.
SIZES = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
HEADS = (1, 2, 5, 8)
REDUCTION_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
PATCH = ((7, 4), (3, 2), (3, 2), (3, 2))  # (kernel, stride) of each stage's patch embedding.
BLOCK_EPS = 1e-6  # The blocks' and stages' LayerNorms; the patch embeddings' and the
PATCH_EPS = 1e-5  # reduction's use PyTorch's default.

# NVlabs' initialisation: Linear layers truncated normal (std 0.02), convolutions normal with
# variance 2 / fan-out (PyTorch's fan-out of a grouped convolution counts one group), biases 0.
_dense_init = nn.initializers.truncated_normal(0.02)


def _conv(features: int, kernel: int, strides: int, padding: int, name: str, dtype,
          param_dtype, groups: int = 1) -> layers.Conv:
  std = (2.0 / (kernel * kernel * features // groups)) ** 0.5
  return layers.conv(features, kernel, strides, padding, use_bias=True, groups=groups,
                     dtype=dtype, param_dtype=param_dtype, name=name,
                     kernel_init=nn.initializers.normal(std))


def _dense(features: int, name: str, dtype, param_dtype) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=_dense_init,
                  name=name)


def _layer_norm(eps: float, name: str, dtype, param_dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention whose keys and values come from the map reduced `ratio` times."""
  heads: int
  ratio: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = _dense(c, "q", **kw)(x).reshape(n, h * w, self.heads, c // self.heads)
    context = x
    if self.ratio > 1:
      context = _conv(c, self.ratio, self.ratio, 0, "sr", **kw)(x)
      context = _layer_norm(PATCH_EPS, "norm", **kw)(context)
    context = context.reshape(n, -1, c)
    kv = _dense(2 * c, "kv", **kw)(context).reshape(n, -1, 2, self.heads, c // self.heads)
    k, v = kv[:, :, 0], kv[:, :, 1]
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(scores * (c // self.heads) ** -0.5, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, h, w, c)
    return _dense(c, "proj", **kw)(out)


class MixFFN(nn.Module):
  """Linear, 3x3 depthwise convolution (the positional information), GELU, Linear."""
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = _dense(self.hidden, "fc1", **kw)(x)
    y = _conv(self.hidden, 3, 1, 1, "dwconv_dwconv", groups=self.hidden, **kw)(y)
    y = layers.gelu(y)
    return _dense(x.shape[-1], "fc2", **kw)(y)


class Block(nn.Module):
  heads: int
  ratio: int
  drop_path: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, drop_path: jax.Array | None = None) -> jax.Array:
    """`drop_path`, if given, replaces the field's rate (a scanned stage's traced rates)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = layers.DropPath(self.drop_path, deterministic=not train)
    x = x + drop(Attention(self.heads, self.ratio, name="attn", **kw)(
        _layer_norm(BLOCK_EPS, "norm1", **kw)(x)), rate=drop_path)
    return x + drop(MixFFN(MLP_RATIO * x.shape[-1], name="mlp", **kw)(
        _layer_norm(BLOCK_EPS, "norm2", **kw)(x)), rate=drop_path)


def block_class(remat: bool) -> type[nn.Module]:
  """`Block`, or with `remat` a Block whose activations are recomputed in the backward pass."""
  return nn.remat(Block, static_argnums=(2,)) if remat else Block


def _scan_stage(block: nn.Module, x: jax.Array, train: bool, rates: np.ndarray) -> jax.Array:
  """`x` through a stage's blocks as one loop over `block`, whose variables stack a leading
  axis of len(rates) blocks; block i drops its branches at rates[i]."""
  def body(block, x, rate):
    return block(x, train, rate), None
  scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 length=len(rates))
  return scan(block, x, jnp.asarray(rates, jnp.float32))[0]


class MixVisionTransformer(nn.Module):
  """Returns the four stages' maps [(N, H/4, W/4, C1), ..., (N, H/32, W/32, C4)] (rounded up).

  `drop_path_rate` is the last block's stochastic-depth rate, rising linearly
  from 0 over all blocks (0.1 in SegFormer and DAFormer). `remat` recomputes
  each block's activations in the backward pass instead of keeping them.

  `scan` runs each stage's blocks as one loop (`nn.scan`) over a block whose
  variables stack the stage's blocks on a leading axis, `block{stage}`
  instead of `block{stage}_{i}`: the same function, compiled once per stage
  instead of once per block (MiT-B5's 52 blocks). Pretrained weights load
  into either layout; a checkpoint restores into the layout that wrote it.
  Stochastic depth draws other keys in the two layouts.
  """
  size: str = "mit_b0"
  drop_path_rate: float = 0.1
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    if self.size not in SIZES:
      raise ValueError(f"Unknown MiT size {self.size!r}; expected one of {sorted(SIZES)}.")
    widths, depths = SIZES[self.size]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths))
    block_cls = block_class(self.remat)
    x = x.astype(self.dtype)
    outs, first = [], 0
    for stage, (width, depth) in enumerate(zip(widths, depths), start=1):
      kernel, stride = PATCH[stage - 1]
      x = _conv(width, kernel, stride, kernel // 2, f"patch_embed{stage}_proj", **kw)(x)
      x = _layer_norm(PATCH_EPS, f"patch_embed{stage}_norm", **kw)(x)
      if self.scan:
        block = block_cls(HEADS[stage - 1], REDUCTION_RATIOS[stage - 1], 0.0,
                          name=f"block{stage}", **kw)
        x = _scan_stage(block, x, train, rates[first:first + depth])
      else:
        for i in range(depth):
          x = block_cls(HEADS[stage - 1], REDUCTION_RATIOS[stage - 1], float(rates[first + i]),
                        name=f"block{stage}_{i}", **kw)(x, train)
      first += depth
      x = _layer_norm(BLOCK_EPS, f"norm{stage}", **kw)(x)
      outs.append(x)
    return outs

  @staticmethod
  def widths(size: str) -> tuple[int, ...]:
    return SIZES[size][0]

  @staticmethod
  def torch_key(path: tuple[str, ...]) -> str:
    """The official `mit_b*.pth` key of the variable at `path` (inside this module); a
    scanned stage's stacked variable gets a key with `weights.LAYER` for the block's number."""
    *modules, leaf = path
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    parts = []
    for module in modules:
      # patch_embed1_proj -> patch_embed1.proj, block1_0 -> block1.0, dwconv_dwconv -> dwconv.dwconv
      module = re.sub(r"^(patch_embed\d)_", r"\1.", module)
      module = re.sub(r"^(block\d)_(\d+)$", r"\1.\2", module)
      module = re.sub(r"^(block\d)$", r"\1." + weights.LAYER, module)
      parts.append(module.replace("dwconv_dwconv", "dwconv.dwconv"))
    return ".".join(parts + [leaf])


# Hugging Face SegformerModel's names (as `save_pretrained` writes them, and the Hub's files) ->
# the official ones; stage and block numbers count from 0 there, from 1 here.
_HF_RENAMES = (
    (r"^encoder\.patch_embeddings\.(\d)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^encoder\.patch_embeddings\.(\d)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^encoder\.layer_norm\.(\d)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^encoder\.block\.(\d)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
)
_HF_BLOCK_RENAMES = {
    "layer_norm_1.": "norm1.", "layer_norm_2.": "norm2.",
    "attention.self.query.": "attn.q.", "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.", "attention.output.dense.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.", "mlp.dense2.": "mlp.fc2.", "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.",
}
HF_PREFIXES = ("segformer.", "")  # SegformerFor... files nest the encoder under 'segformer.'.


def is_encoder_key(key: str) -> bool:
  """Whether an official-layout key belongs to the encoder (not to an ImageNet `head`)."""
  return re.match(r"(patch_embed|block|norm)\d\.", key) is not None


def from_hugging_face(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A Hugging Face SegFormer state dict with the official MiT keys.

  `key` and `value` become one `kv` (key rows first, as the official Linear
  computes them). Keys outside the encoder (a decode head, a classifier) keep
  their names, so the loader reports them as unused.
  """
  out, kv = {}, {}
  for key, value in tensors.items():
    name = key.removeprefix("segformer.")
    for pattern, replace in _HF_RENAMES:
      match = re.match(pattern, name)
      if match:
        name = replace(match) + name[match.end():]
        break
    else:
      out[key] = value
      continue
    if name.startswith("block"):
      head, _, rest = name.partition(".")
      index, _, rest = rest.partition(".")
      for old, new in _HF_BLOCK_RENAMES.items():
        if rest.startswith(old):
          rest = new + rest[len(old):]
          break
      else:
        part = re.match(r"attention\.self\.(key|value)\.(weight|bias)$", rest)
        if part:
          kv.setdefault(f"{head}.{index}.attn.kv.{part[2]}", {})[part[1]] = value
          continue
      name = f"{head}.{index}.{rest}"
    out[name] = value
  for name, parts in kv.items():
    if set(parts) != {"key", "value"}:
      raise ValueError(f"The Hugging Face file has only the {next(iter(parts))} of {name}.")
    out[name] = np.concatenate([parts["key"], parts["value"]], axis=0)
  return out
