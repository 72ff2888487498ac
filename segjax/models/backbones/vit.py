"""Vision Transformers with DINOv2's structure and parameter names: ViT-S/14, ViT-B/14, ViT-L/14.

The structure is facebookresearch/dinov2's `vision_transformer.py` (as
VFM-UDA uses it): a 14x14 stride-14 patch embedding, a class token, optional
register tokens (the `_reg4` models), learned position embeddings for the
37x37 grid of the 518x518 pretraining images, resampled bicubically to the
input's grid, then pre-norm blocks (LayerNorm, multi-head self-attention with
a fused qkv projection, LayerScale, stochastic depth; LayerNorm, MLP with
exact GELU, LayerScale, stochastic depth) and a final LayerNorm (eps 1e-6
everywhere). The tokens are [class, registers..., patches]: the position
embeddings are added to the class and patch tokens before the registers are
inserted. An input whose sides are not multiples of 14 is cut to the largest
multiple, as the stride-14 convolution does.

Position embeddings are resampled as Hugging Face `transformers` does
(`Dinov2Model`: PyTorch's bicubic, a = -0.75, to the grid's size;
`Dinov2WithRegistersModel`: with `antialias=True`, PyTorch's antialiased
cubic filter, a = -0.5), by `resample_matrix`, so that the same weights give
the same outputs (tests/test_vit.py). facebookresearch/dinov2's own code
resamples by the scale factor (grid + 0.1) / 37 instead of to the grid's size,
which moves the embeddings by a fraction of a pixel.

With `dtype=bfloat16` the blocks compute in bfloat16 and the residual stream
stays in the parameters' float32, as PyTorch's autocast keeps it in VFM-UDA's
fp16-mixed training: the position embeddings are added in float32, each
branch's LayerScale multiplies in float32, and the sums are float32. A
bfloat16 stream would round each branch's contribution to 8 bits of the
stream's magnitude, and LayerScale's initial 1e-5 would add nothing at all.

Submodules carry the official names (`patch_embed.proj`, `blocks.0.attn.qkv`,
`blocks.0.ls1.gamma`, `norm`) with '.' written '_'; `torch_key` maps a
variable to the key of a `dinov2_vit*14*_pretrain.pth` file;
`from_hugging_face` and `from_timm` convert Hugging Face's and timm's files
(`vit_small_patch14_reg4_dinov2.lvd142m`, ...) to those keys.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from segjax.models import layers, weights

# name -> (width, depth, heads); MLP ratio 4, patch 14, position grid 37x37 everywhere.
SIZES = {"vit_s14": (384, 12, 6), "vit_b14": (768, 12, 12), "vit_l14": (1024, 24, 16)}
PATCH = 14
GRID = 37  # 518 / 14: the pretraining resolution's patch grid.
MLP_RATIO = 4
EPS = 1e-6
LAYERSCALE_INIT = 1e-5  # DINOv2's init_values; pretrained files replace it.

_dense_init = nn.initializers.truncated_normal(0.02)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a` (PyTorch: -0.75, antialiased -0.5)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resample_matrix(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
  """(size_out, size_in) weights of PyTorch's `interpolate(mode='bicubic',
  align_corners=False, size=...)` along one axis, `antialias` as given."""
  scale = size_in / size_out
  weights = np.zeros((size_out, size_in), np.float64)
  if antialias:  # PyTorch's separable antialiased filter (as PIL's), a = -0.5.
    support = 2.0 * scale if scale >= 1 else 2.0
    inverse = 1.0 / scale if scale >= 1 else 1.0
    for i in range(size_out):
      center = scale * (i + 0.5)
      low = max(int(center - support + 0.5), 0)
      high = min(int(center + support + 0.5), size_in)
      taps = _cubic((np.arange(low, high) - center + 0.5) * inverse, -0.5)
      weights[i, low:high] = taps / taps.sum()
    return weights
  for i in range(size_out):  # Four taps around the source position, edges repeated.
    source = scale * (i + 0.5) - 0.5
    first = int(np.floor(source))
    t = source - first
    taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
    for k, tap in enumerate(taps):
      weights[i, min(max(first - 1 + k, 0), size_in - 1)] += tap
  return weights


def resample_positions(table: jax.Array, grid: tuple[int, int], antialias: bool) -> jax.Array:
  """The (G*G, D) position embeddings of the pretraining grid resampled to `grid` (h, w):
  (h*w, D), in float32 as Hugging Face computes them."""
  if grid == (GRID, GRID):
    return table
  square = table.astype(jnp.float32).reshape(GRID, GRID, -1)
  rows = jnp.asarray(resample_matrix(GRID, grid[0], antialias), jnp.float32)
  cols = jnp.asarray(resample_matrix(GRID, grid[1], antialias), jnp.float32)
  resampled = jnp.einsum("hy,yxd,wx->hwd", rows, square, cols,
                         precision=jax.lax.Precision.HIGHEST)
  return resampled.reshape(grid[0] * grid[1], -1).astype(table.dtype)


class Attention(nn.Module):
  heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, tokens, width = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init)
    qkv = nn.Dense(3 * width, name="qkv", **kw)(x)
    q, k, v = jnp.split(qkv.reshape(n, tokens, 3, self.heads, width // self.heads), 3, axis=2)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return nn.Dense(width, name="proj", **kw)(out.reshape(n, tokens, width))


class LayerScale(nn.Module):
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.constant(LAYERSCALE_INIT), (x.shape[-1],),
                       self.param_dtype)
    return x * gamma  # A bfloat16 branch times float32 gamma: float32, as autocast's.


class Block(nn.Module):
  heads: int
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=EPS, name=name, **kw)
    drop = layers.DropPath(self.drop_path, deterministic=not train)
    y = Attention(self.heads, name="attn", **kw)(norm("norm1")(x))
    x = x + drop(LayerScale(self.param_dtype, name="ls1")(y))
    y = nn.Dense(MLP_RATIO * x.shape[-1], name="mlp_fc1", kernel_init=_dense_init, **kw)(
        norm("norm2")(x))
    y = nn.Dense(x.shape[-1], name="mlp_fc2", kernel_init=_dense_init, **kw)(layers.gelu(y))
    return x + drop(LayerScale(self.param_dtype, name="ls2")(y))


class VisionTransformer(nn.Module):
  """Returns {'tokens': (N, 1 + R + h*w, D) after the final LayerNorm, 'layers': each block's
  output (N, 1 + R + h*w, D) before it, 'grid': (h, w)} for images (N, H, W, 3), h = H // 14.

  `mask` (N, h*w) bool replaces those patch tokens by the learned mask token
  before the position embeddings are added (DINOv2's and VFM-UDA's token
  masking). `drop_path_rate` is the last block's rate, rising linearly from 0.
  `pos_antialias`: Hugging Face's resampling of the position embeddings for
  `Dinov2WithRegistersModel` (True) or `Dinov2Model` (False).
  """
  size: str = "vit_s14"
  registers: int = 0
  drop_path_rate: float = 0.0
  pos_antialias: bool = False
  remat: bool = False
  depth: int = 0  # Blocks: 0 for the size's own (12 or 24); fewer for quick tests.
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    if self.size not in SIZES:
      raise ValueError(f"Unknown ViT size {self.size!r}; expected one of {sorted(SIZES)}.")
    width, depth, heads = SIZES[self.size]
    if not 0 <= self.depth <= depth:
      raise ValueError(f"model.depth={self.depth} must be between 1 and {self.size}'s {depth} "
                       "blocks (0: all of them).")
    depth = self.depth or depth
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed_proj = nn.Conv(width, (PATCH, PATCH), strides=(PATCH, PATCH),
                                    padding="VALID", **kw)
    self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, width),
                                 self.param_dtype)
    self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, width),
                                self.param_dtype)
    self.pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                                (1, 1 + GRID * GRID, width), self.param_dtype)
    if self.registers:
      self.register_tokens = self.param("register_tokens", nn.initializers.normal(1e-6),
                                        (1, self.registers, width), self.param_dtype)
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    rates = np.linspace(0.0, self.drop_path_rate, depth)
    self.blocks = [block_cls(heads, float(rate), **kw) for rate in rates]
    self.norm = nn.LayerNorm(epsilon=EPS, **kw)

  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> dict:
    tokens, grid = self.embed(x, mask)
    outputs = []
    for block in self.blocks:
      tokens = block(tokens, train)
      outputs.append(tokens)
    return {"tokens": self.norm(tokens), "layers": outputs, "grid": grid}

  def embed(self, x: jax.Array, mask: jax.Array | None = None,
            registers: bool = True) -> tuple[jax.Array, tuple[int, int]]:
    """The tokens (N, 1 + R + h*w, D) the first block reads, and the grid (h, w).

    `registers=False` leaves the register tokens out (the ViT-Adapter's
    interactions carry the class token only).
    """
    n, height, image_width = x.shape[:3]
    width = self.cls_token.shape[-1]
    grid = (height // PATCH, image_width // PATCH)
    if min(grid) < 1:
      raise ValueError(f"Images of {height}x{image_width} are smaller than one {PATCH}x{PATCH} "
                       "patch.")
    # The residual stream: float32 under bfloat16 compute (see the module docstring).
    patches = self.patch_embed_proj(x.astype(self.dtype))
    patches = patches.reshape(n, grid[0] * grid[1], width)
    if mask is not None:
      patches = jnp.where(mask[..., None], self.mask_token.astype(patches.dtype), patches)
    patches = patches.astype(jnp.promote_types(self.dtype, self.param_dtype))
    table = jnp.concatenate([self.pos_embed[0, :1], resample_positions(
        self.pos_embed[0, 1:], grid, self.pos_antialias)])
    tokens = jnp.concatenate([jnp.broadcast_to(self.cls_token, (n, 1, width)), patches], axis=1)
    tokens = tokens + table
    if self.registers and registers:
      tokens = jnp.concatenate([tokens[:, :1], jnp.broadcast_to(
          self.register_tokens, (n, self.registers, width)), tokens[:, 1:]], axis=1)
    return tokens, grid

  def patch_maps(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """The patch tokens of (N, 1 + R + h*w, D) as a map (N, h, w, D)."""
    return tokens[:, 1 + self.registers:].reshape(tokens.shape[0], *grid, tokens.shape[-1])

  @staticmethod
  def width(size: str) -> int:
    return SIZES[size][0]

  @staticmethod
  def torch_key(path: tuple[str, ...]) -> str:
    """The official DINOv2 key of the variable at `path` (inside this module)."""
    *modules, leaf = path
    if not modules:  # cls_token, pos_embed, mask_token, register_tokens.
      return leaf
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma"}[leaf]
    parts = []
    for module in modules:
      module = re.sub(r"^blocks_(\d+)$", r"blocks.\1", module)
      parts.append(module.replace("patch_embed_proj", "patch_embed.proj")
                   .replace("mlp_fc", "mlp.fc"))
    return ".".join(parts + [leaf])


def is_encoder_key(key: str) -> bool:
  """Whether an official-layout key belongs to the encoder (not to a classifier head)."""
  return re.match(r"(cls_token|pos_embed|mask_token|register_tokens|patch_embed\.|blocks\.|"
                  r"norm\.)", key) is not None


def from_official(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An official DINOv2 state dict with the shapes the model keeps: mask_token (1, 1, D)."""
  out = dict(tensors)
  if "mask_token" in out:
    out["mask_token"] = out["mask_token"].reshape(1, 1, -1)
  return out


_HF_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
)


def from_hugging_face(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` state dict with the official
  keys: query, key and value become one `qkv` (in that order). Both the files'
  names (`attention.attention.query`) and transformers 5's module names
  (`attention.q_proj`, a `state_dict()` saved with torch) are read. Other keys keep their names,
  so the loader reports them as unused."""
  out, qkv = {}, {}
  for key, value in tensors.items():
    name = re.sub(r"^dinov2(_with_registers)?\.", "", key)
    part = re.match(r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|"
                    r"(q|k|v)_proj)\.(weight|bias)$", name)
    if part:
      which = part[2] or {"q": "query", "k": "key", "v": "value"}[part[3]]
      qkv.setdefault(f"blocks.{part[1]}.attn.qkv.{part[4]}", {})[which] = value
      continue
    for pattern, replace in _HF_RENAMES:
      renamed = re.sub(pattern, replace, name)
      if renamed != name:
        out[renamed] = value
        break
    else:
      out[key] = value
  for name, parts in qkv.items():
    if set(parts) != {"query", "key", "value"}:
      raise ValueError(f"The Hugging Face file has only the {sorted(parts)} of {name}.")
    out[name] = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
  return from_official(out)


def from_timm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A timm DINOv2-with-registers state dict with the official keys.

  timm's `_convert_dinov2` renamed `register_tokens` to `reg_token`, added the
  class token's position embedding to `cls_token` and dropped it from
  `pos_embed`; the class position here is therefore 0 and `cls_token` timm's
  sum, which computes the same tokens. Without a `mask_token` (timm drops it)
  the model keeps its initialisation, DINOv2's zeros.
  """
  out = {("register_tokens" if key == "reg_token" else key): value
         for key, value in tensors.items()}
  table = out["pos_embed"]
  out["pos_embed"] = np.concatenate([np.zeros_like(table[:, :1]), table], axis=1)
  return from_official(out)


# Where the encoder's variables are in the files users hold (`weights.load_backbone`).
KEY_MAP = weights.KeyMap(VisionTransformer.torch_key,
                         (weights.DINOV2, weights.HF_DINOV2, weights.TIMM_DINOV2),
                         converters={weights.DINOV2: from_official,
                                     weights.HF_DINOV2: from_hugging_face,
                                     weights.TIMM_DINOV2: from_timm},
                         backbone_file_key=is_encoder_key,
                         optional=lambda key: key == "mask_token")
