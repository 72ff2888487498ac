"""Segmentation networks and discriminators, looked up by name from the config.

The registries name each model's class as 'module:Class' and import it on
first use, so building one model does not import the others.

Contract of a segmenter (a linen Module with
`from_config(config, num_classes, bn_axis_name=None)`):
  `__call__(images (N, H, W, 3) float, train: bool = False)` returns a dict
    'logits':   (N, H, W, num_classes) float32, at the input's size;
    'aux':      a tuple of auxiliary logits of the same shape (BiSeNet's
                supervision heads, DeepLab-v2's layer3 head), empty in eval;
    'features': (optional) the last hidden map (FCN's fc7), for feature-level
                discriminators.
    'detail_logits', 'detail_offsets': (HRDA, in training) the detail
                window's prediction and each window's top-left corner.
  A segmenter with a pretrained trunk names it 'backbone' and defines the
  static method `backbone_torch_key(path) -> torchvision key`.
"""

import importlib
from collections.abc import Callable

import flax.linen as nn
import ml_collections

SEGMENTERS: dict[str, str] = {
    "compact": "compact:CompactSeg",
    "fcn32s_vgg16": "fcn:FCN32s",
    "fcn16s_vgg16": "fcn:FCN16s",
    "fcn8s_vgg16": "fcn:FCN8s",
    "bisenet_r18": "bisenet:BiSeNetR18",
    "bisenet_r101": "bisenet:BiSeNetR101",
    "deeplabv3plus_r50": "deeplab:DeepLabV3PlusR50",
    "deeplabv3plus_r101": "deeplab:DeepLabV3PlusR101",
    "deeplabv2_r101": "deeplab:DeepLabV2R101",
    "unet": "unet:UNet",
    "unet_small": "unet:UNetSmall",
    **{f"{head}_mitb{i}": f"segformer:{cls}MiTB{i}"
       for head, cls in (("daformer", "DAFormer"), ("segformer", "SegFormer")) for i in range(6)},
    **{f"hrda_mitb{i}": f"hrda:HRDAMiTB{i}" for i in range(6)},
    **{f"vfm_vit_{size}14{reg}": f"vfm:VFMViT{size.upper()}14{reg.title().lstrip('_')}"
       for size in ("s", "b", "l") for reg in ("", "_reg4")},
    **{f"vfmpp_vit_{size}14": f"vit_adapter:VFMPPViT{size.upper()}14" for size in ("s", "b", "l")},
}

DISCRIMINATORS: dict[str, str] = {
    "fcd": "discriminators:FCDiscriminator",
    "dsc": "discriminators:DepthwiseSeparableDiscriminator",
    "fc7_domain": "discriminators:FC7DomainClassifier",
}


def _lookup(registry: dict[str, str], kind: str, name: str) -> type[nn.Module]:
  if name not in registry:
    raise ValueError(
        f"Unknown {kind} name {name!r} (config field {kind}.name); "
        f"expected one of {sorted(registry)}.")
  module, cls = registry[name].split(":")
  return getattr(importlib.import_module(f"segjax.models.{module}"), cls)


def segmenter_class(name: str) -> type[nn.Module]:
  return _lookup(SEGMENTERS, "model", name)


def build_segmenter(config: ml_collections.ConfigDict, num_classes: int,
                    bn_axis_name: str | None = None) -> nn.Module:
  """The segmenter of the model config `config`.

  `bn_axis_name` is the mesh axis over which its BatchNorm layers average
  their batch statistics, None for each device's own: a property of where
  the model runs (the mesh), which the caller knows and the models do not.
  """
  return segmenter_class(config.name).from_config(config, num_classes, bn_axis_name)


def build_discriminator(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  return _lookup(DISCRIMINATORS, "disc", config.name).from_config(config, num_classes)


Builder = Callable[[ml_collections.ConfigDict, int], nn.Module]
