"""DeepLabV3+ (Chen et al., ECCV 2018) and DeepLab-v2 (Chen et al., TPAMI 2017) on ResNets.

DeepLabV3+ is jfzhang95/pytorch-deeplab-xception's layout on torchvision's
ResNet and ASPP, op for op the peer benchmark's (bench/peers/models_torch.py)
for ResNet-50: the ResNet at output stride 16 (or 8); ASPP of a 1x1 branch,
three 3x3 branches at rates 6/12/18 (doubled at stride 8) and image pooling,
each a ConvBNReLU to 256, then a 1x1 ConvBNReLU projection and dropout; a
decoder that concatenates the 4x-upsampled ASPP output with layer1 projected
to 48 channels, two 3x3 ConvBNReLU of 256 and a 1x1 classifier. The
convolutions are regular ones (mmseg's variant is depthwise separable). Where
the references differ, the peer is followed: no multi-grid (1, 2, 4) in layer4
and no dropout inside the decoder (jfzhang95 has both). `aux_head` adds
mmseg's auxiliary FCNHead on layer3 (3x3 ConvBNReLU to 256, channel dropout
0.1, 1x1 classifier), whose loss mmseg weights 0.4 (config.loss.aux_weights).

DeepLab-v2 is AdaptSegNet's model/deeplab_multi.py and ADVENT's
advent/model/deeplabv2.py: the Caffe ResNet-101 (stride on the first 1x1
conv, ceil-mode max pooling, layer3 and layer4 dilated 2 and 4: output stride
8) with every BatchNorm frozen, one ASPP-v2 classifier on layer3 ('layer5',
the auxiliary head of multi-level adaptation) and one on layer4 ('layer6', the
main head). `resnet_style` follows the weights: 'caffe' (the default) is that
network, for the Caffe-converted init files both repos train from;
'torchvision' is torchvision's ResNet-101 dilated to output stride 8
(replace_stride_with_dilation=[False, True, True], as DeepLabV3+ builds it),
for torchvision's ImageNet weights, which were trained with the stride in the
3x3 conv and floor-mode pooling.
"""

import os
from typing import Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from segjax.models import layers, weights
from segjax.models.backbones.resnet import ResNet

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # DeepLabV3+'s atrous rates per output stride.
ASPP_V2_DILATIONS = (6, 12, 18, 24)
# DeepLab's Caffe networks read BGR pixels in 0-255 less this mean (AdaptSegNet's and ADVENT's
# IMG_MEAN), not scaled; segjax feeds RGB in [0, 1] less data.mean over data.std, ImageNet's
# statistics by default (configs/default.py).
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling of DeepLabV3(+): five parallel branches, fused by 1x1."""
  rates: tuple[int, ...]
  features: int = 256
  dropout_rate: float = 0.5
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    branches = [layers.ConvBNReLU(self.features, 1, name="branch0", **common)(x, train)]
    branches += [layers.ConvBNReLU(self.features, 3, dilation=rate, name=f"branch{i}",
                                   **common)(x, train)
                 for i, rate in enumerate(self.rates, start=1)]
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = layers.ConvBNReLU(self.features, 1, name="pool", **common)(pooled, train)
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    x = layers.ConvBNReLU(self.features, 1, name="project", **common)(
        jnp.concatenate(branches, axis=-1), train)
    return layers.Dropout(self.dropout_rate, deterministic=not train)(x)


class FCNAuxHead(nn.Module):
  """mmseg's auxiliary FCNHead: 3x3 ConvBNReLU, channel dropout, 1x1 classifier."""
  num_classes: int
  features: int = 256
  dropout_rate: float = 0.1
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.ConvBNReLU(self.features, 3, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                          param_dtype=self.param_dtype)(x, train)
    # nn.Dropout2d: whole channels are dropped.
    x = layers.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
    return layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)


class DeepLabV3Plus(nn.Module):
  """DeepLabV3+ on a torchvision ResNet of `depth` layers (50 or 101).

  Output: {'logits', 'aux'} as the segmenter contract in `segjax.models` says;
  'aux' holds the FCN head on layer3 when `aux_head` is set, else nothing.
  """
  num_classes: int
  depth: int = 50
  output_stride: int = 16
  norm: str = "batch"
  dropout_rate: float = 0.5
  aux_head: bool = False
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    return cls(num_classes=num_classes, output_stride=config.get("output_stride", 16),
               norm=config.get("norm", "batch"), dropout_rate=config.get("dropout_rate", 0.5),
               aux_head=config.get("aux_head", False),
               bn_axis_name=bn_axis_name,
               dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  @staticmethod
  def backbone_torch_key(path: tuple[str, ...]) -> str:
    return ResNet.torch_key(path)

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.output_stride not in ASPP_RATES:
      raise ValueError(f"DeepLabV3+ output_stride={self.output_stride} (config field "
                       f"model.output_stride) must be one of {sorted(ASPP_RATES)}.")
    common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
    height, width = images.shape[1:3]
    features = ResNet(depth=self.depth, output_stride=self.output_stride, norm=self.norm,
                      name="backbone", **common)(images, train)
    low_level = features["layer1"]  # 1/4
    x = ASPP(ASPP_RATES[self.output_stride], dropout_rate=self.dropout_rate, name="aspp",
             **common)(features["layer4"], train)
    x = layers.resize_bilinear(x, *low_level.shape[1:3])
    low_level = layers.ConvBNReLU(48, 1, name="low_level", **common)(low_level, train)
    x = jnp.concatenate([x, low_level], axis=-1)
    x = layers.ConvBNReLU(256, 3, name="decoder1", **common)(x, train)
    x = layers.ConvBNReLU(256, 3, name="decoder2", **common)(x, train)
    logits = layers.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="classifier")(x)
    aux = ()
    if self.aux_head and (train or self.is_initializing()):
      aux = (FCNAuxHead(self.num_classes, name="aux_head", **common)(features["layer3"], train),)
    upsample = lambda x: layers.resize_bilinear(x.astype(jnp.float32), height, width)
    return {"logits": upsample(logits),
            "aux": tuple(upsample(a) for a in aux) if train else ()}


class DeepLabV3PlusR50(DeepLabV3Plus):
  depth: int = 50


class DeepLabV3PlusR101(DeepLabV3Plus):
  depth: int = 101


class ASPPv2(nn.Module):
  """DeepLab-v2's Classifier_Module: parallel dilated 3x3 convs to the classes, summed.

  `branches` counts the dilations (6, 12, 18, 24) used: 4 is DeepLab-v2 and
  ADVENT; 2 reproduces AdaptSegNet, whose `return` inside the summing loop
  adds only the dilation-12 branch to the dilation-6 one (its dilation-18 and
  -24 convs hold parameters but never run; here they are not built).
  """
  num_classes: int
  branches: int = 4
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not 1 <= self.branches <= len(ASPP_V2_DILATIONS):
      raise ValueError(f"aspp_branches={self.branches} (config field model.aspp_branches) "
                       f"must be 1 to {len(ASPP_V2_DILATIONS)}: 4 for DeepLab-v2 and ADVENT, "
                       "2 for AdaptSegNet's.")
    return sum(layers.conv(self.num_classes, 3, padding=d, dilation=d, use_bias=True,
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=nn.initializers.normal(0.01), name=f"conv{i}")(x)
               for i, d in enumerate(ASPP_V2_DILATIONS[:self.branches]))


def resize_bilinear_align_corners(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear upsampling of NHWC maps with align_corners=True (corners map onto corners).

  DeepLab-v2's Caffe ResNet (padded convs, ceil-mode pooling) turns an input
  of 8k + 1 pixels into a map of k + 1 whose first and last samples sit on the
  input's first and last pixels, which is this mapping; ADVENT trains with it,
  and AdaptSegNet's code was written for the PyTorch (< 0.4) that did it.
  """
  in_size = x.shape[1:3]
  if in_size == (height, width):
    return x
  scale, translation = [], []
  for n_in, n_out in zip(in_size, (height, width)):
    s = (n_out - 1) / (n_in - 1) if n_in > 1 else float(n_out)
    scale.append(s)
    # Output index i samples input index i / s; in the half-pixel coordinates of
    # scale_and_translate, centre i + 0.5 comes from centre i / s + 0.5.
    translation.append(0.5 * (1 - s) if n_in > 1 else 0.0)
  return jax.image.scale_and_translate(
      x, (x.shape[0], height, width, x.shape[3]), (1, 2), jnp.asarray(scale),
      jnp.asarray(translation), method="linear", antialias=False)


def caffe_input(images: jax.Array) -> jax.Array:
  """segjax's normalised RGB images as the input DeepLab's Caffe weights were trained on.

  Those weights read BGR pixels in 0-255 less CAFFE_BGR_MEAN; segjax feeds
  every model RGB normalised with data.mean and data.std, left at ImageNet's
  statistics. Converting here rather than in the data pipeline lets
  model.resnet_style alone switch between Caffe and torchvision weights, and
  it is exact: conv1's zero padding comes after it.
  """
  rgb = images.astype(jnp.float32) * jnp.asarray(IMAGENET_STD) + jnp.asarray(IMAGENET_MEAN)
  return 255.0 * rgb[..., ::-1] - jnp.asarray(CAFFE_BGR_MEAN)


def caffe_classifier_key(path: tuple[str, ...]) -> str | None:
  """The Caffe init's key (after 'Scale.') of a DeepLabV2R101 variable outside the backbone.

  The init is the single-level DeepLab-v2 (AdaptSegNet's model/deeplab.py),
  whose only classifier, 'layer5', reads layer4: the main head here. The
  layer3 head has no counterpart in it (None).
  """
  if path[0] != "head_layer4":
    return None
  _, conv, leaf = path
  return f"layer5.conv2d_list.{conv.removeprefix('conv')}.{layers.TORCH_LEAF_NAMES[leaf]}"


class DeepLabV2R101(nn.Module):
  """DeepLab-v2 ResNet-101 with a main (layer4) and an auxiliary (layer3) ASPP-v2 head.

  Output: {'logits', 'aux'} as the segmenter contract in `segjax.models` says;
  'aux' holds the layer3 head, which multi-level adaptation supervises with
  weight 0.1 and aligns with its own discriminator. `resnet_style` is the
  ResNet the backbone weights come from (see the module docstring); 'caffe'
  converts segjax's ImageNet-normalised RGB input to Caffe's (`caffe_input`).
  """
  num_classes: int
  norm: str = "frozen"
  aspp_branches: int = 4
  resnet_style: str = weights.CAFFE
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  # Reads both layouts; the Caffe init's classifier goes into the main head. A staticmethod,
  # as linen would wrap a callable attribute into a method.
  backbone_torch_key = staticmethod(weights.KeyMap(
      ResNet.torch_key, (weights.TORCHVISION, weights.CAFFE),
      {weights.CAFFE: caffe_classifier_key}))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_classes: int,
                  bn_axis_name: str | None = None) -> Self:
    """`model.norm` defaults to 'frozen' (the reference) when backbone weights are given.

    Without them it defaults to 'batch': frozen statistics of an untrained
    network are the identity, and 33 unnormalised bottlenecks overflow.
    `model.resnet_style` must be the layout of `model.backbone_weights`:
    checked here, where the config check (`segjax.validation`) builds the
    model first, so a contradiction fails before anything is compiled. A file
    that is not there is left to the loader (evaluation and prediction do not
    read it).
    """
    path = config.get("backbone_weights")
    style = config.get("resnet_style", weights.CAFFE)
    if path and os.path.isfile(path):
      weights.check_layout(path, style, "model.resnet_style")
    return cls(num_classes=num_classes, norm=config.get("norm", "frozen" if path else "batch"),
               aspp_branches=config.get("aspp_branches", 4), resnet_style=style,
               bn_axis_name=bn_axis_name,
               dtype=layers.dtype_of(config.dtype),
               param_dtype=layers.dtype_of(config.param_dtype))

  @nn.compact
  def __call__(self, images, train: bool = False):
    height, width = images.shape[1:3]
    x = caffe_input(images) if self.resnet_style == weights.CAFFE else images
    features = ResNet(depth=101, output_stride=8, norm=self.norm, style=self.resnet_style,
                      bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="backbone")(x, train)
    head = lambda name: ASPPv2(self.num_classes, self.aspp_branches, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name)
    logits = head("head_layer4")(features["layer4"])
    aux = ()
    if train or self.is_initializing():
      aux = (head("head_layer3")(features["layer3"]),)
    upsample = lambda x: resize_bilinear_align_corners(x.astype(jnp.float32), height, width)
    return {"logits": upsample(logits),
            "aux": tuple(upsample(a) for a in aux) if train else ()}
