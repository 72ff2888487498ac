"""Segmentation networks and discriminators, looked up by name from the config."""

from collections.abc import Callable

import flax.linen as nn
import ml_collections

from segjax.models import compact, discriminators

# Each builder takes (model config, num_classes) and returns a linen Module.
SEGMENTERS: dict[str, Callable[..., nn.Module]] = {
    "compact": compact.CompactSeg.from_config,
}

DISCRIMINATORS: dict[str, Callable[..., nn.Module]] = {
    "fcd": discriminators.FCDiscriminator.from_config,
    "dsc": discriminators.DepthwiseSeparableDiscriminator.from_config,
}


def _lookup(registry: dict, kind: str, name: str):
  if name not in registry:
    raise ValueError(
        f"Unknown {kind} name {name!r} (config field {kind}.name); "
        f"expected one of {sorted(registry)}.")
  return registry[name]


def build_segmenter(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  return _lookup(SEGMENTERS, "model", config.name)(config, num_classes)


def build_discriminator(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  return _lookup(DISCRIMINATORS, "disc", config.name)(config, num_classes)
