"""ResNet-18/50/101 with torchvision's structure and parameter names.

Submodules are named after torchvision's state-dict keys (`layer1_0.conv1` for
`layer1.0.conv1`), so `segjax.models.weights` maps an ImageNet checkpoint onto
them without a table. Options cover what the segmentation heads need:
  * `output_stride` 32, 16 or 8: the strides of layer4 (and layer3) become
    dilations, as torchvision's `replace_stride_with_dilation`;
  * `norm` 'batch' or 'frozen' (AdaptSegNet/ADVENT freeze every BatchNorm);
  * `style` 'torchvision' or 'caffe': where the network that made the weights
    put things (see STYLES). The two have the same parameters, so a file of
    one style loads into the other without complaint and computes something
    else: each style must get its own weights.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models import layers

# name -> (block, blocks per layer)
CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
# torchvision: stride on each bottleneck's 3x3 convolution, floor-mode max pooling, and a dilated
#   layer's first block at the previous layer's dilation (replace_stride_with_dilation).
# caffe: MSRA's Caffe ResNet that DeepLab-v2 converted (AdaptSegNet's and ADVENT's init files):
#   stride on the first 1x1 convolution, ceil-mode max pooling, and DeepLab's `_make_layer`, where
#   every block of a dilated layer, the first included, uses the layer's dilation and a dilated
#   layer always has a projection. Bottleneck ResNets only.
STYLES = ("torchvision", "caffe")


@dataclasses.dataclass(frozen=True)
class _Common:
  norm: str
  bn_axis_name: str | None
  dtype: jnp.dtype
  param_dtype: jnp.dtype


class BasicBlock(nn.Module):
  planes: int
  strides: int
  dilation: int
  first_dilation: int
  project: bool
  common: _Common

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.common
    conv = lambda *a, **k: layers.conv(*a, dtype=c.dtype, param_dtype=c.param_dtype, **k)
    norm = lambda name: layers.norm(c.norm, train, c.bn_axis_name, c.dtype, c.param_dtype,
                                    name=name)
    y = conv(self.planes, 3, self.strides, self.first_dilation, self.first_dilation,
             name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = conv(self.planes, 3, 1, self.dilation, self.dilation, name="conv2")(y)
    y = norm("bn2")(y)
    if self.project:
      x = norm("downsample_1")(conv(self.planes, 1, self.strides, name="downsample_0")(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  planes: int
  strides: int
  dilation: int
  first_dilation: int
  project: bool
  common: _Common
  stride_in_1x1: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.common
    conv = lambda *a, **k: layers.conv(*a, dtype=c.dtype, param_dtype=c.param_dtype, **k)
    norm = lambda name: layers.norm(c.norm, train, c.bn_axis_name, c.dtype, c.param_dtype,
                                    name=name)
    s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
    y = nn.relu(norm("bn1")(conv(self.planes, 1, s1, name="conv1")(x)))
    y = conv(self.planes, 3, s3, self.first_dilation, self.first_dilation, name="conv2")(y)
    y = nn.relu(norm("bn2")(y))
    y = norm("bn3")(conv(4 * self.planes, 1, name="conv3")(y))
    if self.project:
      x = norm("downsample_1")(conv(4 * self.planes, 1, self.strides, name="downsample_0")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Returns the stage features {'stem', 'layer1', ..., 'layer4'} (NHWC, compute dtype).

  Strides: stem 2 (before the max pool), layer1 4, layer2 8, layer3 16 (or 8),
  layer4 32 (or 16, 8). The ImageNet classifier (avgpool, fc) is not built.
  """
  depth: int = 18
  output_stride: int = 32
  norm: str = "batch"
  style: str = "torchvision"
  bn_axis_name: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @property
  def channels(self) -> dict[str, int]:
    e = EXPANSION[CONFIGS[f"resnet{self.depth}"][0]]
    return {"stem": 64, "layer1": 64 * e, "layer2": 128 * e, "layer3": 256 * e,
            "layer4": 512 * e}

  @nn.compact
  def __call__(self, x, train: bool = False) -> dict[str, jax.Array]:
    name = f"resnet{self.depth}"
    if name not in CONFIGS:
      raise ValueError(f"Unsupported ResNet depth {self.depth}; expected one of "
                       f"{sorted(int(k[6:]) for k in CONFIGS)}.")
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"output_stride={self.output_stride} (config field model.output_stride) "
                       "must be 8, 16 or 32.")
    kind, counts = CONFIGS[name]
    if self.style not in STYLES:
      raise ValueError(f"ResNet style {self.style!r} (config field model.resnet_style) must be "
                       f"one of {list(STYLES)}.")
    if self.style == "caffe" and kind == "basic":
      raise ValueError(f"The Caffe ResNet style needs a bottleneck ResNet (50 or 101), not {name}.")
    caffe = self.style == "caffe"
    block_cls = functools.partial(Bottleneck, stride_in_1x1=caffe) if kind == "bottleneck" else (
        BasicBlock)
    common = _Common(self.norm, self.bn_axis_name, self.dtype, self.param_dtype)
    x = x.astype(self.dtype)
    x = layers.conv(64, 7, 2, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv1")(x)
    x = nn.relu(layers.norm(self.norm, train, self.bn_axis_name, self.dtype, self.param_dtype,
                            name="bn1")(x))
    features = {"stem": x}
    x = layers.max_pool(x, 3, 2, 1, ceil_mode=caffe)
    # Layers whose stride becomes a dilation: layer4 below OS32, layer3 too below OS16.
    dilate = {2: False, 3: self.output_stride == 8, 4: self.output_stride < 32}
    in_channels, dilation = 64, 1
    for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts), start=1):
      strides = 1 if i == 1 else 2
      previous = dilation
      if dilate.get(i, False):
        dilation *= strides
        strides = 1
      out_channels = planes * EXPANSION[kind]
      if caffe:
        first, project = dilation, (strides != 1 or in_channels != out_channels
                                    or dilation > 1)
      else:
        first, project = previous, strides != 1 or in_channels != out_channels
      for j in range(count):
        x = block_cls(planes, strides if j == 0 else 1, dilation, first if j == 0 else dilation,
                      project and j == 0, common, name=f"layer{i}_{j}")(x, train)
      in_channels = out_channels
      features[f"layer{i}"] = x
    return features

  @staticmethod
  def torch_key(path: tuple[str, ...]) -> str:
    """torchvision's state-dict key of the variable at `path` (inside this module)."""
    *modules, leaf = path
    parts = [m.replace("_", ".") if m.startswith(("layer", "downsample")) else m
             for m in modules]
    return ".".join(parts + [layers.TORCH_LEAF_NAMES[leaf]])
