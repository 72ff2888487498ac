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
            num_examples: int, *, full_res_labels: bool = False,
            **fields) -> ml_collections.ConfigDict:
  """The real dataset `name` at its root if one was given, else built-in scenes of `domain`.

  A real dataset is read at the working resolution `size` (images and, unless
  `full_res_labels`, labels; evaluation keeps labels at full resolution and
  upsamples the predictions to them). `fields` sets dataset-specific options
  (cities, city, year, list_file, ...).
  """
  if name in roots:
    fields.setdefault("resize", size)
    return real_dataset(name, roots[name], split, resize_labels=not full_res_labels, **fields)
  height, width = size
  return ml_collections.ConfigDict(dict(
      name="street_scenes", domain=domain, split=split, num_examples=num_examples,
      height=height, width=width, seed=0, crop_size=()))


def real_dataset(name: str, root: str, split: str, **fields) -> ml_collections.ConfigDict:
  """A complete sub-config for a dataset in its native layout (see segjax.data)."""
  config = ml_collections.ConfigDict(dict(
      name=name, root=root, split=split, list_file="", resize=(), resize_labels=True,
      keep_ratio=False,  # True: `resize` bounds the image, its aspect ratio kept (mmseg's).
      pad_to=(),  # Evaluation of variable-size images: pad image and label to (H, W).
      on_error="fail",  # Or "skip": replace an unreadable example by the next and count it.
      # GTA5 has frames whose label and image sizes differ: its labels are resized (nearest).
      on_size_mismatch="resize" if name == "gta5" else "fail",
      cache_dir="", cache_format="jpeg",
      crop_size=()))  # Training crop of this dataset; () takes data.crop_size.
  config.update({"cityscapes": dict(cities=()), "voc": dict(year="2012"),
                 "crosscity": dict(city="Rome"),
                 "tfds": dict(tfds_name="cityscapes/semantic_segmentation", data_dir="",
                              image_key="image_left", label_key="segmentation_label",
                              label_space="cityscapes")}.get(name, {}))
  for key, value in fields.items():
    config[key] = value
  return config


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


SYNTHETIC_SOURCES = ("gta5", "synthia")
# The working resolutions of UDA-REFERENCE.md 2a/2b/2g: GTA5 1280x720, SYNTHIA 1280x760.
SOURCE_SIZES = {"gta5": ((720, 1280), 24_966), "synthia": ((760, 1280), 9_400)}


def uda_roots(arg: str | None) -> dict[str, str]:
  """Roots for GTA5 or SYNTHIA -> Cityscapes; both synthetic sources at once is an error."""
  roots = parse_roots(arg, (*SYNTHETIC_SOURCES, "cityscapes"))
  if all(name in roots for name in SYNTHETIC_SOURCES):
    raise ValueError("Give either gta5= or synthia= as the source root, not both.")
  return roots


def uda_data(config: ml_collections.ConfigDict, roots: dict[str, str]) -> None:
  """Source GTA5 (default) or SYNTHIA, target Cityscapes train, evaluation on Cityscapes val.

  Sources resized to their working resolution, Cityscapes to 1024x512, and
  evaluation at the labels' full 2048x1024. A SYNTHIA source adds mIoU16/13.
  Training sees whole images, as in AdaptSegNet, ADVENT and BDL: each domain's
  crop is its working size (the source's 1280x720 beside Cityscapes' 1024x512);
  a recipe that crops both domains alike sets the two crops back to ().
  """
  source = "synthia" if "synthia" in roots else "gta5"
  size, count = SOURCE_SIZES[source]
  config.data.source = dataset(source, roots, "train", "source", size, count)
  config.data.target = dataset("cityscapes", roots, "train", "target", (512, 1024), 2_975)
  config.data.source.crop_size = size
  config.data.target.crop_size = (512, 1024)
  config.data.target.pseudo_margins = ()  # See configs/default.py.
  config.data.eval = dataset("cityscapes", roots, "val", "target", (512, 1024), 500,
                             full_res_labels=True)
