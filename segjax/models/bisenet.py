"""BiSeNet V1 (Yu et al., ECCV 2018): a shallow spatial path and a ResNet context path.

The two registered models follow two different published codes, each for a reason:

* `BiSeNetR18` is, op for op, the BiSeNet of the peer benchmark
  (bench/peers/models_torch.py), so that the speed comparison times the same
  work: a 7x7/3x3/3x3 stride-2 spatial path with a 1x1 projection to 128
  channels; ARMs (3x3 ConvBNReLU to 128, then a channel gate) on layer3 and
  layer4; the global average of layer4 *added* to the 1/32 branch; 3x3 heads
  after each upsampling; a 1x1 FFM with a squeeze (1/4) and excitation gate; a
  3x3 output conv and a 1x1 classifier. That is CoinCheung/BiSeNet's layout,
  except that the peer (and so this model) upsamples the context branches
  bilinearly where CoinCheung uses nearest neighbours, and its classifier has
  a bias.
* `BiSeNetR101` is the seed project's BiSeNet (micolrosini/Real-Time-Domain-
  Adaptation-in-Image-Segmentation, model/build_BiSeNet.py, from
  ooooverflow/BiSeNet): a 3x3 spatial path of 64/128/256 channels; ARMs that
  only gate the backbone features (a 1x1 conv with bias, BN, sigmoid), the
  layer4 branch *multiplied* by its global average; both context maps
  upsampled to 1/8 and concatenated, so the FFM sees 256 + 1024 + 2048 = 3328
  channels and its 3x3 ConvBNReLU maps them straight to `num_classes`; a
  num_classes-wide gate and a final 1x1 conv. The seed applies that conv after
  upsampling x8; a 1x1 conv commutes with bilinear interpolation, so it runs
  before, on 1/64 of the pixels, and its output is resized to the input (the
  same result when the input is a multiple of 8; for other sizes the seed's
  output would not match the input at all).

Both have the seed's two auxiliary "supervision" heads, 1x1 convs (with bias)
to `num_classes`, used in training only (CoinCheung's and mmseg's heads are a
3x3 ConvBNReLU then a 1x1 conv; the seed's are used). In BiSeNetR101 they read
the seed's features: the two gated context maps at 1/8. The peer's R18 layout
has no such maps; there they read the context path's two outputs, where
CoinCheung's read: the 1/16 branch after its head (at 1/8) and the 1/32
branch after its head (at 1/16).

Resizing is bilinear with align_corners=False, as in the peer and the seed
(whose `interpolate` without the argument defaults to it since PyTorch 0.4.1).
"""

from typing import Self

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from segjax.models import layers
from segjax.models.backbones.resnet import ResNet


def _global_average(x):
  return jnp.mean(x, axis=(1, 2), keepdims=True)


class AttentionRefinement(nn.Module):
  """Re-weights the channels of a context feature map by a gate from its global average.

  `refine=True` is CoinCheung's (the peer's) ARM: a 3x3 ConvBNReLU to `features`
  first, and a gate conv without bias. `refine=False` is the paper's and the
  seed's: the input is gated as it is (`features` must equal its channels), by
  a 1x1 conv with bias, BatchNorm and a sigmoid.
  """
  features: int
  refine: bool
  gate_bias: bool
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    if self.refine:
      x = layers.ConvBNReLU(self.features, 3, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="conv")(x, train)
    gate = layers.conv(self.features, 1, use_bias=self.gate_bias, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="gate_conv")(_global_average(x))
    gate = layers.norm("batch", train, self.bn_axis_name, self.dtype, self.param_dtype,
                       name="gate_norm")(gate)
    return x * nn.sigmoid(gate)


class FeatureFusion(nn.Module):
  """FFM: concatenates the two paths, projects them, then adds a channel-gated copy.

  The peer's FFM projects with a 1x1 ConvBNReLU and gates through a 4x channel
  squeeze with bias-free convs; the seed's projects with a 3x3 ConvBNReLU to
  the classes and gates through two bias-carrying 1x1 convs of full width.
  """
  features: int
  kernel_size: int
  reduction: int
  gate_bias: bool
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, spatial, context, train: bool):
    conv = lambda features, name: layers.conv(features, 1, use_bias=self.gate_bias,
                                              dtype=self.dtype, param_dtype=self.param_dtype,
                                              name=name)
    x = jnp.concatenate([spatial, context], axis=-1)
    x = layers.ConvBNReLU(self.features, self.kernel_size, bn_axis_name=self.bn_axis_name,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x, train)
    gate = nn.relu(conv(self.features // self.reduction, "squeeze")(_global_average(x)))
    gate = nn.sigmoid(conv(self.features, "excite")(gate))
    return x * gate + x


def _from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                 bn_axis_name: str | None):
  return cls(num_classes=num_classes, norm=config.get("norm", "batch"),
             aux_heads=config.get("aux_heads", True),
             bn_axis_name=bn_axis_name,
             dtype=layers.dtype_of(config.dtype),
             param_dtype=layers.dtype_of(config.param_dtype))


def _outputs(logits, aux, size, train: bool) -> dict:
  """Logits and (in training) auxiliary logits, in float32 at the input's `size`."""
  upsample = lambda x: layers.resize_bilinear(x.astype(jnp.float32), *size)
  return {"logits": upsample(logits), "aux": tuple(upsample(a) for a in aux) if train else ()}


class BiSeNetR18(nn.Module):
  """BiSeNet V1 with a ResNet-18 context path, in the peer benchmark's layout.

  Output: {'logits', 'aux'} as the segmenter contract in `segjax.models` says;
  'aux' holds the supervision heads on the 1/16 and 1/32 context branches.
  """
  num_classes: int
  norm: str = "batch"
  aux_heads: bool = True  # False: no supervision heads (as the PyTorch speed peer).
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return _from_config(cls, config, num_classes, bn_axis_name)

  @staticmethod
  def backbone_torch_key(path: tuple[str, ...]) -> str:
    return ResNet.torch_key(path)

  @nn.compact
  def __call__(self, images, train: bool = False):
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    block = lambda features, kernel_size, name, strides=1: layers.ConvBNReLU(
        features, kernel_size, strides, name=name, **common)
    x = images.astype(self.dtype)

    spatial = block(64, 7, "spatial_conv1", strides=2)(x, train)
    spatial = block(64, 3, "spatial_conv2", strides=2)(spatial, train)
    spatial = block(64, 3, "spatial_conv3", strides=2)(spatial, train)
    spatial = block(128, 1, "spatial_out")(spatial, train)  # 1/8

    features = ResNet(depth=18, norm=self.norm, name="backbone", **common)(x, train)
    c16, c32 = features["layer3"], features["layer4"]
    arm = lambda name: AttentionRefinement(128, refine=True, gate_bias=False, name=name, **common)
    global_context = block(128, 1, "global_context")(_global_average(c32), train)
    context32 = arm("arm32")(c32, train) + global_context
    context32 = block(128, 3, "head32")(layers.resize_bilinear(context32, *c16.shape[1:3]), train)
    context16 = arm("arm16")(c16, train) + context32
    context16 = block(128, 3, "head16")(
        layers.resize_bilinear(context16, *spatial.shape[1:3]), train)

    fused = FeatureFusion(256, kernel_size=1, reduction=4, gate_bias=False, name="ffm",
                          **common)(spatial, context16, train)
    fused = block(256, 3, "out_conv")(fused, train)
    classifier = lambda name: layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                                          param_dtype=self.param_dtype, name=name)
    logits = classifier("classifier")(fused)
    aux = ()
    if self.aux_heads and (train or self.is_initializing()):
      aux = (classifier("aux16")(context16), classifier("aux32")(context32))
    return _outputs(logits, aux, images.shape[1:3], train)


class BiSeNetR101(nn.Module):
  """BiSeNet V1 with a ResNet-101 context path, in the seed project's layout.

  Output: {'logits', 'aux'} as the segmenter contract in `segjax.models` says;
  'aux' holds the supervision heads on the gated layer3 and layer4 maps.
  """
  num_classes: int
  norm: str = "batch"
  aux_heads: bool = True  # False: no supervision heads (as the PyTorch speed peer).
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return _from_config(cls, config, num_classes, bn_axis_name)

  @staticmethod
  def backbone_torch_key(path: tuple[str, ...]) -> str:
    return ResNet.torch_key(path)

  @nn.compact
  def __call__(self, images, train: bool = False):
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)

    spatial = x
    for i, features in enumerate((64, 128, 256), start=1):
      spatial = layers.ConvBNReLU(features, 3, strides=2, name=f"spatial_conv{i}",
                                  **common)(spatial, train)  # 1/8 after the third.

    backbone = ResNet(depth=101, norm=self.norm, name="backbone", **common)
    features = backbone(x, train)
    c16, c32 = features["layer3"], features["layer4"]
    context16 = AttentionRefinement(backbone.channels["layer3"], refine=False, gate_bias=True,
                                    name="arm16", **common)(c16, train)
    context32 = AttentionRefinement(backbone.channels["layer4"], refine=False, gate_bias=True,
                                    name="arm32", **common)(c32, train)
    context32 = context32 * _global_average(c32)
    context16 = layers.resize_bilinear(context16, *spatial.shape[1:3])
    context32 = layers.resize_bilinear(context32, *spatial.shape[1:3])

    fused = FeatureFusion(self.num_classes, kernel_size=3, reduction=1, gate_bias=True,
                          name="ffm", **common)(
                              spatial, jnp.concatenate([context16, context32], axis=-1), train)
    classifier = lambda name: layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                                          param_dtype=self.param_dtype, name=name)
    logits = classifier("classifier")(fused)
    aux = ()
    if self.aux_heads and (train or self.is_initializing()):
      aux = (classifier("aux16")(context16), classifier("aux32")(context32))
    return _outputs(logits, aux, images.shape[1:3], train)
