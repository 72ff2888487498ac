"""Helpers for the per-paper configs: dataset roots from the config string, built-in fallback.

Each paper config takes optional dataset roots after the file name:

  python -m segjax.main --config=configs/deeplabv2_gta5_cityscapes.py:gta5=/data/GTA5,cityscapes=/data/cityscapes

A dataset whose root is not given is replaced by the built-in street scenes
(source domain for a source dataset, target domain otherwise) rendered at the
recipe's working resolution, so every config runs out of the box.
"""

import ml_collections

from configs import default


def parse_roots(arg: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
  """'name=/path,name2=/path2' -> {name: path}; names must be among `allowed`."""
  roots = {}
  for item in filter(None, (arg or "").split(",")):
    name, sep, path = item.partition("=")
    if not sep or not path or name not in allowed:
      raise ValueError(f"Bad dataset root {item!r} in the config string; expected "
                       f"NAME=PATH with NAME one of {list(allowed)}.")
    roots[name] = path
  return roots


def dataset(name: str, roots: dict[str, str], split: str, domain: str, size: tuple[int, int],
            num_examples: int) -> ml_collections.ConfigDict:
  """The real dataset `name` at its root if one was given, else built-in scenes of `domain`."""
  if name in roots:
    return ml_collections.ConfigDict(dict(name=name, root=roots[name], split=split))
  height, width = size
  return ml_collections.ConfigDict(dict(
      name="street_scenes", domain=domain, split=split, num_examples=num_examples,
      height=height, width=width, seed=0))


def base(model: str) -> ml_collections.ConfigDict:
  """The shared defaults with `model`, ImageNet-normalised inputs and float32.

  The model section is rebuilt without CompactSeg's fields (width,
  dropout_rate), so each network falls back to its published defaults unless
  the recipe sets a field.
  """
  config = default.get_config()
  config.model = ml_collections.ConfigDict(dict(
      name=model, sync_batch_stats=True, dtype="float32", param_dtype="float32",
      backbone_weights=""))
  return config
