"""Segmenters on DINOv2 ViT encoders: VFM-UDA's lightweight head (Englert et al. 2024).

  * `vfm_vit_s14`, `vfm_vit_b14`, `vfm_vit_l14` and the `_reg4` variants (4
    register tokens): tue-mps/vfm-uda's `VITLightweightHead`. The image is
    resized bilinearly by `input_scale` (1.1) and cut to a multiple of 14
    (VFM-UDA's 1024 -> 1120, an 80x80 token grid), encoded by the ViT
    (`segjax.models.backbones.vit`: every block, the final LayerNorm, the
    class and register tokens dropped), then upsampled 4x by the head:
    2x2 stride-2 transposed conv to D/2 channels, LayerNorm2d, GELU; 2x2
    stride-2 transposed conv to D/4, LayerNorm2d; 3x3 conv, LayerNorm2d
    (no biases, LayerNorm eps 1e-6 as timm's LayerNorm2d); a 1x1 classifier
    without bias, initialised N(0, 0.1). The logits are resized bilinearly
    to the input's size.

`token_mask` (N, h*w) bool replaces those patch tokens by the encoder's
learned mask token (VFM-UDA's token masking of the student's target input;
`segjax.methods.daformer.VFMUDA` draws it). 'features' is the patch-token map
of the last block after the final norm.

Differences from the official code: VFM-UDA asserts square inputs; here any
size works, each side scaled and cut on its own. Its DINOv2 (torch.hub)
resamples the position embeddings by a scale factor, these by the grid's
size as Hugging Face does (`vit.resample_positions`: a fraction of a pixel
apart). With a `_reg4` encoder the registers are used, as DINOv2's own
forward does (VFM-UDA's `forward_features` skips them).
"""

from typing import Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segjax.models import layers
from segjax.models.backbones import vit

HEAD_EPS = 1e-6  # timm's LayerNorm2d.


class LightweightHead(nn.Module):
  """VFM-UDA's `upscale` + `out`: (N, h, w, D) tokens -> (N, 4h, 4w, classes) logits."""
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=HEAD_EPS, name=name, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
    x = nn.ConvTranspose(width // 2, (2, 2), strides=(2, 2), padding="VALID",
                         name="upscale_0", **kw)(x)
    x = layers.gelu(norm("upscale_1")(x))
    x = nn.ConvTranspose(width // 4, (2, 2), strides=(2, 2), padding="VALID",
                         name="upscale_3", **kw)(x)
    x = norm("upscale_4")(x)
    x = nn.Conv(width // 4, (3, 3), padding=1, name="upscale_5", **kw)(x)
    x = norm("upscale_6")(x)
    return nn.Conv(self.num_classes, (1, 1), kernel_init=nn.initializers.normal(0.1),
                   name="out", **kw)(x)


class VFMSegmenter(nn.Module):
  """A DINOv2 ViT (`size`, `registers`) and VFM-UDA's lightweight head."""
  num_classes: int
  size: str = "vit_s14"
  registers: int = 0
  input_scale: float = 1.1
  drop_path_rate: float = 0.0
  remat: bool = False
  depth: int = 0  # The encoder's first `depth` blocks (0: all): quick tests.
  bn_axis_name: str | None = None  # No BatchNorm: kept for the segmenter contract.
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  backbone_torch_key = staticmethod(vit.KEY_MAP)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return cls(num_classes=num_classes, input_scale=config.get("input_scale", 1.1),
               drop_path_rate=config.get("drop_path_rate", 0.0),
               remat=config.get("remat", False), depth=config.get("depth", 0),
               bn_axis_name=bn_axis_name,
               dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  def setup(self):
    self.backbone = vit.VisionTransformer(
        self.size, self.registers, self.drop_path_rate, pos_antialias=self.registers > 0,
        remat=self.remat, depth=self.depth, dtype=self.dtype, param_dtype=self.param_dtype)
    self.head = LightweightHead(self.num_classes, self.dtype, self.param_dtype)

  def encoder_size(self, height: int, width: int) -> tuple[int, int]:
    """The encoder's input size for an image of height x width: each side x `input_scale`,
    cut to a multiple of the patch (VFM-UDA's int(side * 1.1 // 14 * 14))."""
    return tuple(max(vit.PATCH, int(side * self.input_scale // vit.PATCH * vit.PATCH))
                 for side in (height, width))

  def __call__(self, images: jax.Array, train: bool = False,
               token_mask: jax.Array | None = None) -> dict:
    height, width = images.shape[1:3]
    features = self.encode(images, train, token_mask)
    logits = self.head(features)
    return {"logits": layers.resize_bilinear(logits.astype(jnp.float32), height, width),
            "aux": (), "features": features}

  def encode(self, images: jax.Array, train: bool = False,
             token_mask: jax.Array | None = None) -> jax.Array:
    """The encoder's (N, h, w, D) patch-token map after the final norm."""
    x = layers.resize_bilinear(images, *self.encoder_size(*images.shape[1:3]))
    out = self.backbone(x, train, token_mask)
    return self.backbone.patch_maps(out["tokens"], out["grid"])

  def token_grid(self, height: int, width: int) -> tuple[int, int]:
    """The (h, w) patch grid of an image of height x width: `token_mask` is (N, h*w)."""
    return tuple(side // vit.PATCH for side in self.encoder_size(height, width))


class VFMViTS14(VFMSegmenter):
  size: str = "vit_s14"


class VFMViTB14(VFMSegmenter):
  size: str = "vit_b14"


class VFMViTL14(VFMSegmenter):
  size: str = "vit_l14"


class VFMViTS14Reg4(VFMSegmenter):
  size: str = "vit_s14"
  registers: int = 4


class VFMViTB14Reg4(VFMSegmenter):
  size: str = "vit_b14"
  registers: int = 4


class VFMViTL14Reg4(VFMSegmenter):
  size: str = "vit_l14"
  registers: int = 4
