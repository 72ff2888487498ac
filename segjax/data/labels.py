"""Label spaces of the real datasets and the lookup tables that map their files to train ids.

Every reader turns its native label file into train ids through one 256-entry
lookup table (`lookup_table`), with 255 (ignored) for every id outside the
mapping, and checks the ids against the set the format can hold (`valid_ids`),
so that a label from another dataset or a colour image fails loudly instead of
becoming a silently wrong label.

Sources (UDA-REFERENCE.md section 3): Cityscapes `helpers/labels.py`, the
GTA5 id_to_trainid dict, DAFormer/BDL's SYNTHIA mapping, CBST's 16/13-class
SYNTHIA protocol, the KITTI Road devkit, the VOC colour map.
"""

import dataclasses

import numpy as np

from segjax.losses import IGNORE_LABEL


@dataclasses.dataclass(frozen=True)
class CityscapesLabel:
  name: str
  id: int
  train_id: int  # 255: not evaluated.
  color: tuple[int, int, int]


# cityscapesscripts/helpers/labels.py (license plate, id -1, never appears in labelIds files).
CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = tuple(CityscapesLabel(*row) for row in [
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
])
_TRAIN_LABELS = sorted((l for l in CITYSCAPES_LABELS if l.train_id != IGNORE_LABEL),
                       key=lambda l: l.train_id)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(l.name for l in _TRAIN_LABELS)
CITYSCAPES_PALETTE: np.ndarray = np.array([l.color for l in _TRAIN_LABELS], np.uint8)
CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {l.id: l.train_id for l in _TRAIN_LABELS}
CITYSCAPES_TRAIN_TO_ID: dict[int, int] = {l.train_id: l.id for l in _TRAIN_LABELS}
CITYSCAPES_IDS = range(34)  # The ids a labelIds PNG (Cityscapes, GTA5, NTHU) can hold.

# SYNTHIA-RAND-CITYSCAPES class ids (0 void ... 22 lanemarking) -> Cityscapes train ids.
SYNTHIA_TO_TRAIN: dict[int, int] = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8,
                                    16: 9, 1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15,
                                    20: 16, 12: 17, 11: 18}
SYNTHIA_IDS = range(23)

# Evaluation subsets of the 19 train ids reported by the literature.
SYNTHIA_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)  # No terrain, truck, train.
SYNTHIA_13 = tuple(c for c in SYNTHIA_16 if c not in (3, 4, 5))       # ...nor wall, fence, pole.
# The 13 classes annotated in the NTHU cross-city dataset.
CROSSCITY_13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")
VOC_IDS = (*range(len(VOC_CLASSES)), IGNORE_LABEL)  # 255 marks object borders.


def voc_colormap(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (bit-interleaved class index), (n, 3) uint8."""
  index = np.arange(n)
  cmap = np.zeros((n, 3), np.int64)
  for shift in range(8):
    for channel in range(3):
      cmap[:, channel] |= ((index >> (shift * 3 + channel)) & 1) << (7 - shift)
  return cmap.astype(np.uint8)


VOC_PALETTE: np.ndarray = voc_colormap(len(VOC_CLASSES))

# KITTI Road: train id 0 not road (red), 1 road (magenta); black, outside the valid area, ignored.
KITTI_CLASSES: tuple[str, ...] = ("not road", "road")
KITTI_PALETTE: np.ndarray = np.array([(255, 0, 0), (255, 0, 255)], np.uint8)
KITTI_COLORS: dict[tuple[int, int, int], int] = {
    (255, 0, 255): 1, (255, 0, 0): 0, (0, 0, 0): IGNORE_LABEL}

for _array in (CITYSCAPES_PALETTE, VOC_PALETTE, KITTI_PALETTE):
  _array.setflags(write=False)


def lookup_table(mapping: dict[int, int]) -> np.ndarray:
  """A 256-entry uint8 table: `mapping` where given, 255 elsewhere."""
  table = np.full(256, IGNORE_LABEL, np.uint8)
  for key, value in mapping.items():
    table[key] = value
  table.setflags(write=False)
  return table


def valid_ids(ids) -> np.ndarray:
  """A 256-entry bool table marking the ids a label file may contain."""
  table = np.zeros(256, bool)
  table[list(ids)] = True
  table.setflags(write=False)
  return table


IDENTITY_19 = lookup_table({i: i for i in range(len(CITYSCAPES_CLASSES))})
