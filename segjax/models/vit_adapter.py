"""VFM-UDA++'s segmenter: a DINOv2 ViT with a ViT-Adapter and a pyramid head.

tue-mps/vfm-uda-plusplus `VITAdapterLightweightPyramidHead` (Englert et al.
2025), built from facebookresearch/dinov2's ViT-Adapter
(`eval/segmentation_m2f/models/backbones/adapter_modules.py`, itself from
Chen et al. 2023, "Vision Transformer Adapter for Dense Predictions"):

  * The image is resized bilinearly by `input_scale` (1.1) and cut to a
    multiple of 224 on each side (VFM-UDA++'s 1024 -> 1120: patches of 14 and
    the adapter's strides up to 32 both tile it).
  * Spatial prior module (SPM): a ResNet-like stem (three 3x3 convs, the
    first of stride 2, BatchNorm, ReLU, a 3x3 stride-2 max pool) and three
    3x3 stride-2 convs, giving maps at 1/4, 1/8, 1/16 and 1/32, each projected
    to the ViT's width by a 1x1 conv. The 1/8, 1/16, 1/32 maps, flattened and
    with a learned level embedding each, are the adapter's tokens `c`.
  * The ViT's blocks in four equal groups, each an interaction: the injector
    (multi-scale deformable attention of the patch tokens, as queries, to
    `c`, LayerNorms on both, scaled by a learned gamma initialised at 0), the
    group's blocks on [class, patches], then the extractor (deformable
    attention of `c` to the patch tokens, then a ConvFFN: Linear to D/4, a
    3x3 depthwise conv on each level's map, GELU, Linear back); the last
    interaction has two extra extractors.
  * Outputs: `c` split into its 1/8, 1/16, 1/32 maps, the 1/4 map is the
    SPM's plus a 2x2 stride-2 transposed conv of the 1/8 one; each level adds
    its group's patch tokens resized bilinearly to it, then a BatchNorm.
  * Head (VFM-UDA++'s `_Upscale`): from 1/32 up, a 2x2 stride-2 transposed
    conv of the coarser map plus a 1x1 conv of the next level (to D/2, D/4,
    D/8), a 3x3 conv, BatchNorm and ReLU; a last 3x3 conv; a 1x1 classifier
    without bias, N(0, 0.1). Logits at 1/4 of the encoder's input, resized to
    the image's size.
  * `distill` (VFM-UDA++'s `DistillFeatureHead`, trained with the feature
    distance): the 1/32 output through a 1x1 conv to 4D, LayerNorm2d (1e-6),
    GELU, a 1x1 conv to the frozen model's width.

Multi-scale deformable attention (`deformable_attention`, Zhu et al. 2021):
per head, each query samples `points` locations per level around its
reference point (the centre of its own cell), offsets in units of the level's
cells, bilinearly with zeros outside (PyTorch's `grid_sample` with
align_corners=False, as the official `ms_deform_attn_core_pytorch`), weighted
by a softmax over levels x points. Values are projected to D x 0.5 first
(`deform_ratio`), heads D / 64.

Variables carry the official module names with '.' written '_'
(`adapter/interactions_0/injector/attn/sampling_offsets`, `head/up_conv1`), so
that `torch_key` maps them to the keys of VFM-UDA++'s checkpoints: the
ImageNet-pretrained encoders (`dinov2_{small,base,large}_with_vitadapter_
pretraining_in1k_step50000.ckpt`, a Lightning checkpoint under
'network.encoder.') that its recipe starts from, read by
`model.backbone_weights` with the ViT, and its trained segmenters
('network.upscale.', 'network.out.').

Differences from the official code: each side is scaled and cut on its own
(the official asserts square 1024 inputs); the position embeddings are
resampled to the grid's size as Hugging Face does (`vit.resample_positions`),
where DINOv2's torch.hub code scales them by (grid + 0.1) / 37, a fraction of
a pixel apart; the deformable attention samples by gathers, not the CUDA
kernel (the same sums).
"""

import re
from typing import Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segjax.models import layers, weights
from segjax.models.backbones import vit

BN_MOMENTUM = 0.99  # PyTorch's SyncBatchNorm momentum 0.01.
ADAPTER_EPS = 1e-5  # The adapter's nn.LayerNorm.
STRIDE = 224  # The encoder's input sides: multiples of the patch (14) and of 32.
SPM_WIDTH = 64  # conv_inplane.
POINTS = 4
DEFORM_RATIO = 0.5
CFFN_RATIO = 0.25
PREFIX = "network.encoder."  # The encoder's keys in VFM-UDA++'s Lightning checkpoints.


def reference_points(shapes: list[tuple[int, int]]) -> np.ndarray:
  """(sum h*w, 2) the (x, y) centres of every cell of each level, in [0, 1] of its size."""
  points = []
  for h, w in shapes:
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    points.append(np.stack([x.ravel(), y.ravel()], -1))
  return np.concatenate(points).astype(np.float32)


def deformable_attention(value: jax.Array, shapes: list[tuple[int, int]],
                         locations: jax.Array, attention: jax.Array) -> jax.Array:
  """Multi-scale deformable attention's sampling: (N, Lq, M * Dh).

  value (N, sum h*w, M, Dh), the levels' maps flattened one after another;
  locations (N, Lq, M, L, P, 2) (x, y) in [0, 1] of each level (0 and 1 the
  outer edges of its first and last cells); attention (N, Lq, M, L, P). Each
  location is sampled bilinearly, zeros outside the map (grid_sample with
  align_corners=False and zero padding).
  """
  n, lq, m = locations.shape[:3]
  dh = value.shape[-1]
  out = jnp.zeros((n, m, lq, dh), jnp.float32)
  start = 0
  for level, (h, w) in enumerate(shapes):
    v = value[:, start:start + h * w].transpose(0, 2, 1, 3)  # (N, M, h*w, Dh)
    start += h * w
    x = locations[:, :, :, level, :, 0].astype(jnp.float32) * w - 0.5  # (N, Lq, M, P)
    y = locations[:, :, :, level, :, 1].astype(jnp.float32) * h - 0.5
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    a = attention[:, :, :, level].astype(jnp.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
      for dx, wx in ((0, 1 - fx), (1, fx)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        index = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
        weight = jnp.where(inside, wx * wy, 0.0) * a  # (N, Lq, M, P)
        index = index.transpose(0, 2, 1, 3).reshape(n, m, lq * locations.shape[4], 1)
        sampled = jnp.take_along_axis(v, index, axis=2).reshape(n, m, lq, -1, dh)
        out = out + jnp.einsum("nmqpd,nmqp->nmqd", sampled,
                               weight.transpose(0, 2, 1, 3).astype(sampled.dtype),
                               preferred_element_type=jnp.float32)
  return out.transpose(0, 2, 1, 3).reshape(n, lq, m * dh).astype(value.dtype)


def _offset_bias(heads: int, levels: int, points: int):
  """The official sampling-offset init: head h points along angle 2 pi h / heads (scaled to
  the unit square's edge), point p at distance p + 1, on every level."""
  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(heads) * (2.0 * np.pi / heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None], (1, levels, points, 1)) * (
        np.arange(points) + 1)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


class MSDeformAttn(nn.Module):
  """The official `MSDeformAttn` (reference points of 2 coordinates)."""
  heads: int
  levels: int
  points: int = POINTS
  ratio: float = DEFORM_RATIO
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, reference: jax.Array, feat: jax.Array,
               shapes: list[tuple[int, int]]) -> jax.Array:
    n, lq, d = query.shape
    m, levels, p = self.heads, self.levels, self.points
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    xavier = nn.initializers.xavier_uniform()
    value = nn.Dense(int(d * self.ratio), kernel_init=xavier, name="value_proj", **kw)(feat)
    value = value.reshape(n, feat.shape[1], m, -1)
    offsets = nn.Dense(m * levels * p * 2, kernel_init=nn.initializers.zeros,
                       bias_init=_offset_bias(m, levels, p), name="sampling_offsets",
                       **kw)(query).reshape(n, lq, m, levels, p, 2)
    logits = nn.Dense(m * levels * p, kernel_init=nn.initializers.zeros,
                      name="attention_weights", **kw)(query)
    attention = jax.nn.softmax(logits.reshape(n, lq, m, levels * p).astype(jnp.float32),
                               -1).reshape(n, lq, m, levels, p)
    normalizer = jnp.asarray([(w, h) for h, w in shapes], jnp.float32)  # (L, 2) as (x, y).
    locations = (reference[None, :, None, None, None, :]
                 + offsets.astype(jnp.float32) / normalizer[None, None, None, :, None, :])
    out = deformable_attention(value, shapes, locations, attention)
    return nn.Dense(d, kernel_init=xavier, name="output_proj", **kw)(out)


def _norm(name: str, dtype, param_dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=ADAPTER_EPS, name=name, dtype=dtype, param_dtype=param_dtype)


class Injector(nn.Module):
  heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, reference, feat, shapes):
    d = query.shape[-1]
    attn = MSDeformAttn(self.heads, len(shapes), dtype=self.dtype, param_dtype=self.param_dtype,
                        name="attn")(_norm("query_norm", self.dtype, self.param_dtype)(query),
                                     reference,
                                     _norm("feat_norm", self.dtype, self.param_dtype)(feat),
                                     shapes)
    gamma = self.param("gamma", nn.initializers.zeros, (d,), self.param_dtype)
    return query + gamma * attn  # In the stream's float32, as autocast's.


class Extractor(nn.Module):
  """Deformable attention of the adapter's tokens to the patch tokens, then a ConvFFN whose
  depthwise conv runs on each of the adapter's levels (`level_shapes`)."""
  heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, reference, feat, shapes, level_shapes):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = query.shape[-1]
    query = query + MSDeformAttn(self.heads, len(shapes), name="attn", **kw)(
        _norm("query_norm", **kw)(query), reference, _norm("feat_norm", **kw)(feat), shapes)
    dense = nn.initializers.truncated_normal(0.02)
    y = nn.Dense(int(d * CFFN_RATIO), kernel_init=dense, name="ffn_fc1", **kw)(
        _norm("ffn_norm", **kw)(query))
    dwconv = layers.conv(y.shape[-1], 3, padding=1, groups=y.shape[-1], use_bias=True,
                         name="ffn_dwconv_dwconv", **kw)
    parts, start = [], 0
    for h, w in level_shapes:
      part = y[:, start:start + h * w].reshape(y.shape[0], h, w, -1)
      parts.append(dwconv(part).reshape(y.shape[0], h * w, -1))
      start += h * w
    y = layers.gelu(jnp.concatenate(parts, axis=1))
    return query + nn.Dense(d, kernel_init=dense, name="ffn_fc2", **kw)(y)


class SpatialPrior(nn.Module):
  """The SPM: the (N, H/4, W/4, D) map and the 1/8, 1/16, 1/32 maps (N, h, w, D)."""
  width: int
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def conv_bn_relu(x, features, stride, conv_name, bn_name):
      x = layers.conv(features, 3, stride, 1, name=conv_name, **kw)(x)
      x = layers.norm("batch", train, self.bn_axis_name, name=bn_name, momentum=BN_MOMENTUM,
                      **kw)(x)
      return nn.relu(x)

    c = SPM_WIDTH
    x = conv_bn_relu(x, c, 2, "stem_0", "stem_1")
    x = conv_bn_relu(x, c, 1, "stem_3", "stem_4")
    x = conv_bn_relu(x, c, 1, "stem_6", "stem_7")
    c1 = layers.max_pool(x, 3, 2, 1)
    c2 = conv_bn_relu(c1, 2 * c, 2, "conv2_0", "conv2_1")
    c3 = conv_bn_relu(c2, 4 * c, 2, "conv3_0", "conv3_1")
    c4 = conv_bn_relu(c3, 4 * c, 2, "conv4_0", "conv4_1")
    return [layers.conv(self.width, 1, use_bias=True, name=f"fc{i + 1}", **kw)(level)
            for i, level in enumerate((c1, c2, c3, c4))]


class Interaction(nn.Module):
  """The injector, then (in the caller) the ViT's blocks, then the extractor(s); `remat`
  recomputes each in the backward pass (the deformable attention's samples are most of the
  adapter's activations)."""
  heads: int
  extra: bool = False  # Two more extractors (the last interaction).
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    injector = nn.remat(Injector, static_argnums=(4,)) if self.remat else Injector
    extractor = nn.remat(Extractor, static_argnums=(4, 5)) if self.remat else Extractor
    self.injector = injector(self.heads, **kw)
    self.extractor = extractor(self.heads, **kw)
    self.extra_extractors = [extractor(self.heads, **kw) for _ in range(2 if self.extra else 0)]

  def inject(self, x, reference, c, shapes):
    return self.injector(x, reference, c, tuple(shapes))

  def extract(self, c, reference, x, grid, level_shapes):
    for extractor in [self.extractor, *self.extra_extractors]:
      c = extractor(c, reference, x, (grid,), tuple(level_shapes))
    return c


def _conv_transpose(features: int, name: str, dtype, param_dtype, kernel_init=None):
  """PyTorch's ConvTranspose2d(kernel 2, stride 2) with bias."""
  return nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID", name=name,
                          dtype=dtype, param_dtype=param_dtype,
                          **({"kernel_init": kernel_init} if kernel_init else {}))


class PyramidHead(nn.Module):
  """VFM-UDA++'s `_Upscale` and `out`: the four adapter outputs -> logits at 1/4."""
  num_classes: int
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: list[jax.Array], train: bool) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    f1, f2, f3, f4 = features
    d = f4.shape[-1]
    x = f4
    for i, (skip, width) in enumerate(((f3, d // 2), (f2, d // 4), (f1, d // 8)), start=1):
      x = (_conv_transpose(width, f"up_conv{i}", **kw)(x)
           + layers.conv(width, 1, use_bias=True, name=f"reduce_conv{i}", **kw)(skip))
      x = layers.conv(width, 3, padding=1, use_bias=True, name=f"smooth_conv{i}", **kw)(x)
      x = nn.relu(layers.norm("batch", train, self.bn_axis_name, name=f"norm{i}",
                              momentum=BN_MOMENTUM, **kw)(x))
    x = layers.conv(d // 8, 3, padding=1, use_bias=True, name="smooth_conv4", **kw)(x)
    return layers.conv(self.num_classes, 1, kernel_init=nn.initializers.normal(0.1),
                       name="out", **kw)(x)


class DistillHead(nn.Module):
  """VFM-UDA++'s `DistillFeatureHead`: (N, h, w, D) -> (N, h, w, `features`)."""
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.conv(4 * x.shape[-1], 1, use_bias=True, name="feat_project_0", **kw)(x)
    x = nn.LayerNorm(epsilon=1e-6, name="feat_project_1", **kw)(x)
    return layers.conv(self.features, 1, use_bias=True, name="feat_project_3", **kw)(
        layers.gelu(x))


class AdapterSegmenter(nn.Module):
  """A DINOv2 ViT (`size`) with the ViT-Adapter and the pyramid head: see the module
  docstring. `distill_features` is the width of the frozen model the feature distance
  compares with (VFM-UDA++: ViT-L's 1024); 0 leaves the distillation head out."""
  num_classes: int
  size: str = "vit_s14"
  input_scale: float = 1.1
  distill_features: int = 0
  remat: bool = False
  depth: int = 0  # The ViT's first `depth` blocks (0: all; a multiple of 4): quick tests.
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return cls(num_classes=num_classes, input_scale=config.get("input_scale", 1.1),
               distill_features=config.get("distill_features", 0),
               remat=config.get("remat", False), depth=config.get("depth", 0),
               bn_axis_name=bn_axis_name, dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  def setup(self):
    width, depth, heads = vit.SIZES[self.size]
    depth = self.depth or depth
    if depth % 4:
      raise ValueError(f"model.depth={self.depth}: the ViT-Adapter splits the blocks into four "
                       "interactions, so it must be a multiple of 4.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.backbone = vit.VisionTransformer(self.size, remat=self.remat, depth=self.depth, **kw)
    self.adapter = Adapter(width, depth, remat=self.remat, bn_axis_name=self.bn_axis_name, **kw)
    self.head = PyramidHead(self.num_classes, self.bn_axis_name, **kw)
    if self.distill_features:
      self.distill = DistillHead(self.distill_features, **kw)
    del width, heads

  def encoder_size(self, height: int, width: int) -> tuple[int, int]:
    """The encoder's input size for an image of height x width: each side x `input_scale`,
    cut to a multiple of 224 (VFM-UDA++'s 1024 -> 1120), at least 224."""
    return tuple(max(STRIDE, int(side * self.input_scale // STRIDE * STRIDE))
                 for side in (height, width))

  def __call__(self, images: jax.Array, train: bool = False,
               keep: jax.Array | None = None) -> dict:
    """{'logits', 'aux': (), 'features': the 1/32 output}. `keep` (N, h, w) of the encoder's
    input size (`encoder_size`) zeroes the other pixels of the resized, normalised image
    (VFM-UDA++'s block masking)."""
    height, width = images.shape[1:3]
    features = self.encode(images, train, keep)
    if self.distill_features and self.is_initializing():
      self.distill(features[-1])  # Its variables, which only the feature distance uses.
    logits = self.head(features, train)
    return {"logits": layers.resize_bilinear(logits.astype(jnp.float32), height, width),
            "aux": (), "features": features[-1]}

  def encode(self, images: jax.Array, train: bool = False,
             keep: jax.Array | None = None) -> list[jax.Array]:
    """The adapter's four (N, h, w, D) outputs at 1/4, 1/8, 1/16 and 1/32 of its input."""
    x = layers.resize_bilinear(images, *self.encoder_size(*images.shape[1:3]))
    if keep is not None:
      x = x * keep[..., None].astype(x.dtype)
    return self.adapter(x, self.backbone, train)

  def distill_features_of(self, features: jax.Array) -> jax.Array:
    """The distillation head on the 1/32 output (`features` of __call__)."""
    return self.distill(features)


class Adapter(nn.Module):
  """The ViT-Adapter around the ViT `backbone` (the segmenter's, passed in)."""
  width: int
  depth: int
  remat: bool = False
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, backbone: vit.VisionTransformer, train: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, height, width = x.shape[:3]
    d = self.width
    heads = d // 64
    levels = [(height // s, width // s) for s in (8, 16, 32)]
    c1, *cs = SpatialPrior(d, self.bn_axis_name, name="spm", **kw)(x, train)
    level_embed = self.param("level_embed", nn.initializers.normal(1.0), (3, d),
                             self.param_dtype)
    for i, level in enumerate(cs):
      if level.shape[1:3] != levels[i]:
        raise ValueError(f"The adapter's level {i + 2} is {level.shape[1:3]} for a "
                         f"{height}x{width} input, not {levels[i]}: sides must be multiples "
                         "of 32.")
    # The adapter's tokens, as the ViT's, are a float32 stream (autocast's).
    c = jnp.concatenate([level.reshape(n, -1, d) + level_embed[i]
                         for i, level in enumerate(cs)], axis=1)
    tokens, grid = backbone.embed(x, registers=False)
    cls, patches = tokens[:, :1], tokens[:, 1:]
    patch_points = jnp.asarray(reference_points([grid]))
    level_points = jnp.asarray(reference_points(levels))
    group = self.depth // 4
    outs = []
    for i in range(4):
      interaction = Interaction(heads, extra=i == 3, remat=self.remat, name=f"interactions_{i}",
                                **kw)
      patches = interaction.inject(patches, patch_points, c, levels)
      tokens = jnp.concatenate([cls, patches], axis=1)
      for block in backbone.blocks[i * group:(i + 1) * group]:
        tokens = block(tokens, train)
      cls, patches = tokens[:, :1], tokens[:, 1:]
      c = interaction.extract(c, level_points, patches, grid, levels)
      outs.append(patches.reshape(n, *grid, d))
    sizes = [h * w for h, w in levels]
    c2, c3, c4 = (part.reshape(n, *shape, d) for part, shape in zip(
        jnp.split(c, np.cumsum(sizes)[:-1], axis=1), levels))
    c1 = _conv_transpose(d, "up", **kw)(c2) + c1
    features = []
    for i, level in enumerate((c1, c2, c3, c4)):
      level = level + layers.resize_bilinear(outs[i], *level.shape[1:3])
      features.append(layers.norm("batch", train, self.bn_axis_name, name=f"norm{i + 1}",
                                  momentum=BN_MOMENTUM, **kw)(level))
    return features


def _torch_name(module: str) -> str:
  return re.sub(r"_(\d+)$", r".\1", module)


def head_key(path: tuple[str, ...]) -> str | None:
  """The key (as `from_vfmpp` names it) of a segmenter variable outside the ViT: the
  adapter's (`level_embed`, `spm.stem.0.weight`, ...), the head's (`upscale.up_conv1.weight`,
  `out.weight`); None for the distillation head, which evaluation does not need."""
  top, *modules, leaf = path
  if top not in ("adapter", "head"):
    return None
  if not modules:
    return leaf
  leaf = layers.TORCH_LEAF_NAMES.get(leaf, leaf)
  names = [_torch_name(module).replace("ffn_fc", "ffn.fc")
           .replace("ffn_dwconv_dwconv", "ffn.dwconv.dwconv") for module in modules]
  if top == "head":
    names = names if names == ["out"] else ["upscale", *names]
  return ".".join(names + [leaf])


_TRANSPOSED_CONVS = ("up.weight", "upscale.up_conv1.weight", "upscale.up_conv2.weight",
                     "upscale.up_conv3.weight")


def from_vfmpp(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A VFM-UDA++ checkpoint's state dict with the keys `head_key` and the ViT's
  `torch_key` give: 'network.encoder.' dropped, 'network.upscale.' -> 'upscale.',
  'network.out.' -> 'out.'; other keys (the EMA teacher, the frozen DINOv2, the ImageNet
  classifier) keep their names and are reported unused.

  PyTorch's ConvTranspose2d weights (in, out, 2, 2) are rewritten as the (out, in, 2, 2)
  convolution the loader converts to Flax's kernel: flax's ConvTranspose without
  `transpose_kernel` applies the kernel mirrored. `level_embed` (3, D) is stored
  transposed, which the loader's Linear rule undoes.
  """
  out = {}
  for key, value in tensors.items():
    for prefix, replace in (("network.encoder.", ""), ("network.upscale.", "upscale."),
                            ("network.out.", "out.")):
      if key.startswith(prefix):
        name = replace + key[len(prefix):]
        break
    else:
      out[key] = value
      continue
    if name in _TRANSPOSED_CONVS:
      value = value.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
    elif name == "level_embed":
      value = value.T
    out[name] = value
  return vit.from_official(out)


# Where the segmenter's variables are in the files users hold: the ViT in any DINOv2 layout,
# and VFM-UDA++'s checkpoints (the ViT, the adapter and, in a trained one, the head).
KEY_MAP = weights.KeyMap(
    vit.VisionTransformer.torch_key, (*vit.KEY_MAP.layouts, weights.VFMPP),
    heads={weights.VFMPP: head_key},
    converters={**vit.KEY_MAP.converters, weights.VFMPP: from_vfmpp},
    # The adapter never runs the ViT's final norm: a DINOv2 file's `norm.*` is unused.
    backbone_file_key=lambda key: vit.is_encoder_key(key) and not key.startswith("norm."),
    optional=vit.KEY_MAP.optional)
AdapterSegmenter.backbone_torch_key = staticmethod(KEY_MAP)


class VFMPPViTS14(AdapterSegmenter):
  size: str = "vit_s14"


class VFMPPViTB14(AdapterSegmenter):
  size: str = "vit_b14"


class VFMPPViTL14(AdapterSegmenter):
  size: str = "vit_l14"
