"""Readers of the real datasets in their native on-disk layouts.

Each reader lists a split's (image, label) file pairs from its root (or from
a list file, for parity with the published lists) and says how its labels map
to train ids. `segjax.data.build_source` wraps them in a `FileSource`.

  cityscapes  {root}/leftImg8bit/{split}/{city}/{id}_leftImg8bit.png +
              {root}/gtFine/{split}/{city}/{id}_gtFine_labelIds.png (19 train ids);
              `cities` selects a subset (the seed's Hamburg / Frankfurt runs);
              the test split is unlabelled. List files: AdaptSegNet's
              `cityscapes_list/{train,val}.txt` (paths under leftImg8bit/{split}).
  gta5        {root}/images/NNNNN.png + {root}/labels/NNNNN.png, 8-bit palette
              PNGs of Cityscapes label ids. One split of all 24,966 frames
              ('all' or 'train'); `gta5_list/train.txt` as a list file.
  synthia     SYNTHIA-RAND-CITYSCAPES {root}/RGB/NNNNNNN.png +
              {root}/GT/LABELS/NNNNNNN.png (16-bit, class id in the first channel),
              mapped to the 19 Cityscapes train ids. One split ('all' or 'train').
  kitti_road  {root}/[data_road/]training/image_2/{um,umm,uu}_NNNNNN.png +
              training/gt_image_2/{cat}_road_NNNNNN.png (road / not road / outside
              the valid area, ignored). Splits: 'trainval' (all 289), 'val'
              (every 6th, sorted), 'train' (the rest), 'testing' (unlabelled);
              KittiSeg's `train3.txt`/`val3.txt` as list files.
  voc         {root}/[VOCdevkit/][VOC2012/]JPEGImages/{id}.jpg +
              SegmentationClass/{id}.png (palette indices, 255 ignored), split
              from ImageSets/Segmentation/{split}.txt ('all': every labelled image).
  crosscity   NTHU cross-city {root}/{City}/Images/{Train,Test}/*.png|jpg +
              {root}/{City}/Labels/Test/{stem}_eval.png (Cityscapes label ids of
              the 13 shared classes); the train split is unlabelled.
"""

import os
from collections.abc import Sequence

from segjax.data import labels
from segjax.data.files import DataError, LabelFormat, check_pairs

CITYSCAPES_IDS = LabelFormat(
    kind="ids", description="Cityscapes label ids 0-33 (a *_labelIds.png)",
    table=labels.lookup_table(labels.CITYSCAPES_ID_TO_TRAIN),
    valid=labels.valid_ids(labels.CITYSCAPES_IDS))
GTA5_IDS = LabelFormat(
    kind="ids", description="GTA5 palette indices = Cityscapes label ids 0-33",
    table=CITYSCAPES_IDS.table, valid=CITYSCAPES_IDS.valid)
CROSSCITY_IDS = LabelFormat(
    kind="ids", description="Cityscapes label ids 0-33 or 255 (an NTHU *_eval.png)",
    table=labels.lookup_table({k: v for k, v in labels.CITYSCAPES_ID_TO_TRAIN.items()
                               if v in labels.CROSSCITY_13}),
    valid=labels.valid_ids((*labels.CITYSCAPES_IDS, 255)))
SYNTHIA_IDS = LabelFormat(
    kind="ids16", description="SYNTHIA class ids 0-22 in the first channel of a 16-bit PNG",
    table=labels.lookup_table(labels.SYNTHIA_TO_TRAIN), valid=labels.valid_ids(labels.SYNTHIA_IDS))
VOC_IDS = LabelFormat(
    kind="ids", description="VOC palette indices 0-20 and 255 (a SegmentationClass PNG)",
    table=labels.lookup_table({i: i for i in labels.VOC_IDS}),
    valid=labels.valid_ids(labels.VOC_IDS))
KITTI_COLORS = LabelFormat(
    kind="colors", description="KITTI Road colours: magenta road, red not road, black outside",
    colors=tuple(labels.KITTI_COLORS.items()))


def _require_dir(path: str, name: str, expected: str) -> None:
  if not os.path.isdir(path):
    raise DataError(f"{name}: {path} is not a directory; expected {expected}.")


def _read_list(path: str, name: str) -> list[list[str]]:
  if not os.path.isfile(path):
    raise DataError(f"{name}: the list file {path} does not exist.")
  with open(path, encoding="utf-8") as f:
    rows = [line.split() for line in f if line.strip()]
  if not rows:
    raise DataError(f"{name}: the list file {path} is empty.")
  return rows


def _files(directory: str, suffixes: Sequence[str]) -> list[str]:
  return sorted(f for f in os.listdir(directory) if f.endswith(tuple(suffixes)))


# ---- Cityscapes.

def cityscapes(root: str, split: str, cities: Sequence[str] = (),
               list_file: str = "") -> tuple[list, LabelFormat | None]:
  name = "cityscapes"
  _require_dir(root, name, "the Cityscapes root (holding leftImg8bit/ and gtFine/)")
  image_dir = os.path.join(root, "leftImg8bit", split)
  _require_dir(image_dir, name, "leftImg8bit/<split>/<city>/*_leftImg8bit.png under the "
               "Cityscapes root")
  if list_file:
    relative = [row[0] for row in _read_list(list_file, name)]
  else:
    available = sorted(os.listdir(image_dir))
    unknown = sorted(set(cities) - set(available))
    if unknown:
      raise DataError(f"{name}: cities {unknown} are not in {image_dir} (it has {available}).")
    relative = [os.path.join(city, f) for city in (cities or available)
                for f in _files(os.path.join(image_dir, city), ["_leftImg8bit.png"])]
  labelled = split != "test"  # Test labels are placeholders.
  pairs = []
  for rel in relative:
    label = None
    if labelled:
      label = os.path.join(root, "gtFine", split,
                           rel.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
    pairs.append((os.path.join(image_dir, rel), label))
  check_pairs(name, pairs, image_dir if not list_file else list_file)
  return pairs, CITYSCAPES_IDS if labelled else None


# ---- GTA5 and SYNTHIA: one folder of frames each.

def _frames(name: str, root: str, split: str, list_file: str, image_sub: str, label_sub: str,
            strip: str = "") -> list:
  if split not in ("all", "train"):
    raise DataError(f"{name}: split {split!r}; {name} has one split, 'all' (or 'train'): "
                    "give a list file to select frames.")
  image_dir, label_dir = os.path.join(root, image_sub), os.path.join(root, label_sub)
  _require_dir(image_dir, name, f"{image_sub}/ and {label_sub}/ under the {name} root")
  _require_dir(label_dir, name, f"{image_sub}/ and {label_sub}/ under the {name} root")
  if list_file:
    files = [row[0].removeprefix(strip) for row in _read_list(list_file, name)]
  else:
    files = _files(image_dir, [".png"])
  pairs = [(os.path.join(image_dir, f), os.path.join(label_dir, f)) for f in files]
  check_pairs(name, pairs, image_dir)
  return pairs


def gta5(root: str, split: str, list_file: str = "") -> tuple[list, LabelFormat]:
  return _frames("gta5", root, split, list_file, "images", "labels"), GTA5_IDS


def synthia(root: str, split: str, list_file: str = "") -> tuple[list, LabelFormat]:
  return (_frames("synthia", root, split, list_file, "RGB", os.path.join("GT", "LABELS"),
                  strip="RGB/"), SYNTHIA_IDS)


# ---- KITTI Road.

KITTI_VAL_EVERY = 6


def kitti_road(root: str, split: str, list_file: str = "") -> tuple[list, LabelFormat | None]:
  name = "kitti_road"
  if os.path.isdir(os.path.join(root, "data_road")):
    root = os.path.join(root, "data_road")
  if list_file:
    rows = _read_list(list_file, name)
    pairs = [(os.path.join(root, r[0]), os.path.join(root, r[1]) if len(r) > 1 else None)
             for r in rows]
    check_pairs(name, pairs, list_file)
    return pairs, KITTI_COLORS if pairs[0][1] else None
  splits = ("train", "val", "trainval", "testing")
  if split not in splits:
    raise DataError(f"{name}: split {split!r}; expected one of {list(splits)} or a list file.")
  folder = "testing" if split == "testing" else "training"
  image_dir = os.path.join(root, folder, "image_2")
  _require_dir(image_dir, name, f"data_road/{folder}/image_2 under the KITTI Road root")
  files = _files(image_dir, [".png"])
  if split == "testing":
    pairs = [(os.path.join(image_dir, f), None) for f in files]
    check_pairs(name, pairs, image_dir)
    return pairs, None
  if split != "trainval":
    val = set(files[KITTI_VAL_EVERY - 1::KITTI_VAL_EVERY])
    files = [f for f in files if (f in val) == (split == "val")]
  pairs = []
  for f in files:
    category, number = f[:-len(".png")].rsplit("_", 1)
    pairs.append((os.path.join(image_dir, f),
                  os.path.join(root, "training", "gt_image_2", f"{category}_road_{number}.png")))
  check_pairs(name, pairs, image_dir)
  return pairs, KITTI_COLORS


# ---- PASCAL VOC.

def _voc_year_dir(root: str, year: str) -> str:
  for candidate in (root, os.path.join(root, f"VOC{year}"),
                    os.path.join(root, "VOCdevkit", f"VOC{year}")):
    if os.path.isdir(os.path.join(candidate, "JPEGImages")):
      return candidate
  raise DataError(f"voc: no JPEGImages/ found in {root}, {root}/VOC{year} or "
                  f"{root}/VOCdevkit/VOC{year}; expected the VOCdevkit layout.")


def voc(root: str, split: str, year: str = "2012", list_file: str = "") -> tuple[list, LabelFormat]:
  name = "voc"
  base = _voc_year_dir(root, year)
  label_dir = os.path.join(base, "SegmentationClass")
  _require_dir(label_dir, name, "SegmentationClass/ (palette PNGs) beside JPEGImages/")
  if list_file:
    ids = [row[0] for row in _read_list(list_file, name)]
  elif split == "all":
    ids = [f[:-len(".png")] for f in _files(label_dir, [".png"])]
  else:
    split_file = os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(split_file):
      raise DataError(f"{name}: the split file {split_file} does not exist; use split='all' "
                      "(every labelled image) or give a list file (e.g. FCN's seg11valid.txt).")
    ids = [row[0] for row in _read_list(split_file, name)]
  pairs = [(os.path.join(base, "JPEGImages", f"{i}.jpg"), os.path.join(label_dir, f"{i}.png"))
           for i in ids]
  check_pairs(name, pairs, base)
  return pairs, VOC_IDS


# ---- NTHU cross-city.

CROSSCITY_CITIES = ("Rio", "Rome", "Taipei", "Tokyo")


def crosscity(root: str, split: str, city: str) -> tuple[list, LabelFormat | None]:
  name = "crosscity"
  if city not in CROSSCITY_CITIES:
    raise DataError(f"{name}: city {city!r}; expected one of {list(CROSSCITY_CITIES)}.")
  folder = {"train": "Train", "test": "Test", "val": "Test"}.get(split)
  if folder is None:
    raise DataError(f"{name}: split {split!r}; expected 'train' (unlabelled) or 'test'.")
  image_dir = os.path.join(root, city, "Images", folder)
  _require_dir(image_dir, name, "<City>/Images/{Train,Test} under the NTHU root")
  files = _files(image_dir, [".png", ".jpg"])
  if folder == "Train":
    pairs = [(os.path.join(image_dir, f), None) for f in files]
    check_pairs(name, pairs, image_dir)
    return pairs, None
  label_dir = os.path.join(root, city, "Labels", "Test")
  pairs = [(os.path.join(image_dir, f), os.path.join(label_dir, os.path.splitext(f)[0] +
                                                     "_eval.png")) for f in files]
  check_pairs(name, pairs, image_dir)
  return pairs, CROSSCITY_IDS
