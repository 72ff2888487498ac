"""StreetScenes: procedurally generated street views in two domains, for domain adaptation.

The project's built-in dataset: no download, every example is a pure function of
(seed, domain, split, index) (they seed its numpy Generator), and one 128x256 example takes a
few milliseconds on one core.
It mimics the GTA5 -> Cityscapes setting of unsupervised domain adaptation (UDA):

* Both domains share one label space (8 Cityscapes-like classes, below) and one *layout
  distribution*: a level pinhole camera (random horizon row and vanishing point) looks down a
  street with a road converging to the vanishing point, sidewalks, grass verges, facades with windows,
  a building row closing the street, trees, hedges, cars, pedestrians and poles, all placed in
  world coordinates (unit: the camera height) and projected, so that sizes follow perspective.
* `source` ("rendered", like a game engine) paints that layout in flat per-class colours with
  small per-instance variations, hard edges, no noise and uniform lighting.
* `target` ("real camera") paints the same kind of layout with a different, class-dependent
  palette (overcast grey-white sky, brick and plaster facades, dark olive vegetation, light
  grainy asphalt, grey sidewalk slabs, muted cars and clothes), per-class procedural textures,
  per-image lighting (exposure, contrast, colour temperature, illumination gradient,
  vignetting, cast shadows), a slight blur and sensor noise.

Intended gap: a network trained on `source` only classifies largely by the flat colours, so on
`target` it confuses classes, and several of its confusions violate the typical layout: the
overcast sky looks like the source's grey buildings (a building over the end of the street) and
the grey sidewalk slabs look like the source's asphalt (a road running up to the facades). An
output-space adversarial discriminator sees such implausible label maps and can push the
segmenter to correct them. A global colour jitter cannot remove the gap, since the palette
change differs per class, while position, shape and texture still tell the classes apart.
"""

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from segjax import errors

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole")
NUM_CLASSES = len(CLASS_NAMES)
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, PERSON, POLE = range(NUM_CLASSES)
# Cityscapes colours, for visualising label maps (not the appearance of either domain).
PALETTE: np.ndarray = np.array(
    [(128, 64, 128), (244, 35, 232), (70, 70, 70), (107, 142, 35),
     (70, 130, 180), (0, 0, 142), (220, 20, 60), (153, 153, 153)], np.uint8)
PALETTE.setflags(write=False)
IGNORE_LABEL = 255
DOMAINS = ("source", "target")
SPLITS = ("train", "val")

# Parts refine a class for rendering only (a car's windows are still "car"). Part 0 is the
# "base" of every class; the others mean something per class, in this order.
PART_NAMES: dict[str, tuple[str, ...]] = {
    "road": ("base", "marking"),
    "sidewalk": ("base",),
    "building": ("base", "window"),
    "vegetation": ("base", "trunk", "grass"),
    "sky": ("base",),
    "car": ("base", "window", "wheel", "light"),
    "person": ("base", "legs", "skin"),
    "pole": ("base", "fixture"),
}
NUM_PARTS = 4
_MARKING = _WINDOW = _TRUNK = _LEGS = _FIXTURE = 1
_GRASS = _WHEEL = _SKIN = 2
_LIGHT = 3

# Appearance tables. "base" lists the colours an instance draws its base part from (a car's
# paint, a facade's material); the other keys are the colours of the other parts.
SOURCE_APPEARANCE: dict[str, dict[str, Any]] = {
    "road": {"base": [(80, 80, 84)], "marking": (236, 236, 236)},
    "sidewalk": {"base": [(192, 166, 152)]},
    "building": {"base": [(176, 176, 180), (168, 164, 158), (184, 180, 172)],
                 "window": (140, 146, 158)},
    "vegetation": {"base": [(54, 150, 48)], "trunk": (112, 80, 50), "grass": (96, 168, 62)},
    "sky": {"base": [(104, 162, 230)]},
    "car": {"base": [(196, 32, 32), (32, 64, 196), (226, 196, 40), (232, 232, 232),
                     (28, 28, 32), (36, 140, 64), (230, 120, 30)],
            "window": (44, 54, 74), "wheel": (22, 22, 22), "light": (250, 90, 40)},
    "person": {"base": [(210, 40, 40), (40, 90, 210), (50, 170, 70), (230, 200, 50),
                        (140, 60, 170), (235, 235, 235)],
               "legs": (40, 44, 120), "skin": (232, 184, 150)},
    "pole": {"base": [(124, 124, 134)], "fixture": (236, 226, 96)},
}
SOURCE_JITTER = 6.0  # per-instance brightness offset range (+-), in 0..255 units

# The target adds per-class texture: colour += n * tint, where n is a sum of noise fields in
# about [-1, 1] weighted by "grain" (per pixel), "leaf" (a few pixels), "blotch" (~1/14 of
# the image height) and "cloud" (~1/3). "courses" flags the facade materials drawn with
# brick courses; sidewalks always get perspective slabs.
TARGET_APPEARANCE: dict[str, dict[str, Any]] = {
    "road": {"base": [(124, 121, 116)], "marking": (190, 190, 178),
             "tint": (-30, -30, -28), "grain": 0.5, "leaf": 0.0, "blotch": 0.35, "cloud": 0.3},
    "sidewalk": {"base": [(90, 90, 94)],
                 "tint": (26, 24, 20), "grain": 0.25, "leaf": 0.0, "blotch": 0.2, "cloud": 0.2},
    "building": {"base": [(140, 80, 60), (186, 166, 130), (158, 128, 92), (110, 72, 60)],
                 "courses": [True, False, False, True], "window": (54, 62, 72),
                 "tint": (-40, -38, -30), "grain": 0.25, "leaf": 0.0, "blotch": 0.3,
                 "cloud": 0.35},
    "vegetation": {"base": [(60, 70, 34)], "trunk": (58, 46, 34), "grass": (92, 98, 52),
                   "tint": (45, 45, 15), "grain": 0.35, "leaf": 0.6, "blotch": 0.3,
                   "cloud": 0.1},
    "sky": {"base": [(188, 192, 198), (200, 202, 204), (172, 180, 192)],
            "tint": (22, 22, 20), "grain": 0.05, "leaf": 0.0, "blotch": 0.2, "cloud": 0.8},
    "car": {"base": [(160, 164, 168), (62, 64, 68), (28, 28, 32), (206, 206, 202),
                     (36, 44, 72), (98, 32, 32), (168, 158, 138)],
            "window": (34, 38, 46), "wheel": (24, 24, 24), "light": (140, 36, 32),
            "tint": (25, 25, 25), "grain": 0.1, "leaf": 0.0, "blotch": 0.25, "cloud": 0.2},
    "person": {"base": [(46, 46, 52), (82, 72, 62), (40, 48, 70), (118, 110, 100),
                        (92, 34, 38), (60, 66, 54)],
               "legs": (44, 44, 54), "skin": (186, 146, 122),
               "tint": (20, 20, 20), "grain": 0.15, "leaf": 0.0, "blotch": 0.2, "cloud": 0.0},
    "pole": {"base": [(72, 74, 78)], "fixture": (190, 190, 180),
             "tint": (20, 20, 20), "grain": 0.1, "leaf": 0.0, "blotch": 0.2, "cloud": 0.0},
}
TARGET_JITTER = 12.0
_NOISE_FIELDS = ("grain", "leaf", "blotch", "cloud")

_FOCAL = 1.1  # focal length as a fraction of the image width (about 50 degrees field of view)


# ----------------------------------------------------------------------------------------------
# Argument checks


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> int:
  if not isinstance(value, str) or value not in choices:
    raise errors.ConfigError(f"{name} must be one of {choices}, got {value!r}")
  return choices.index(value)


def _check_positive(name: str, value: Any) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise errors.ConfigError(f"{name} must be a positive integer, got {value!r}") from None
  if value <= 0:
    raise errors.ConfigError(f"{name} must be a positive integer, got {value}")
  return value


def _check_seed(seed: Any) -> int:
  try:
    seed = operator.index(seed)
  except TypeError:
    raise errors.ConfigError(f"seed must be a non-negative integer, got {seed!r}") from None
  if seed < 0:
    raise errors.ConfigError(f"seed must be a non-negative integer, got {seed}")
  return seed


def _check_index(index: Any, length: int | None = None) -> int:
  index = operator.index(index)
  if index < 0 or (length is not None and index >= length):
    expected = "a non-negative integer" if length is None else f"in [0, {length})"
    raise IndexError(f"index must be {expected}, got {index}")
  return index


# ----------------------------------------------------------------------------------------------
# Scene description shared by layout and rendering


@dataclasses.dataclass(frozen=True)
class Instances:
  """What `render` needs beyond the label map to paint a scene.

  ids: (H, W) uint16 instance of each pixel. Ids 0..NUM_CLASSES-1 are the "stuff" of the class
    with that id (the road, the sky, ...); larger ids are objects (a car, a facade, a tree).
  classes: (N,) uint8 class of each instance id, so that label == classes[ids].
  parts: (H, W) uint8 part of each pixel (see PART_NAMES), e.g. a car's windows or wheels.
  horizon, vanish_x, focal: camera geometry in pixels (row of the horizon, column of the
    vanishing point, focal length), for perspective textures and cast shadows.
  """
  ids: np.ndarray
  classes: np.ndarray
  parts: np.ndarray
  horizon: float
  vanish_x: float
  focal: float

  @classmethod
  def from_label(cls, label: np.ndarray) -> "Instances":
    """One instance per class, no parts and a typical camera: lets any label map be rendered."""
    height, width = label.shape
    return cls(ids=label.astype(np.uint16), classes=np.arange(NUM_CLASSES, dtype=np.uint8),
               parts=np.zeros_like(label, np.uint8), horizon=0.45 * height,
               vanish_x=0.5 * width, focal=_FOCAL * width)


def _ground(horizon: float, vanish_x: float, focal: float, height: int,
            width: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
  """Ground-plane coordinates of the rows below the horizon.

  Returns the first such row r0, dy (rows,) the pixel distance below the horizon (= pixels per
  camera height at that depth), x (rows, W) the lateral position and depth (rows,) the distance,
  both in camera heights.
  """
  r0 = min(height, max(0, math.floor(horizon - 0.5) + 1))
  dy = np.arange(r0, height, dtype=np.float32) + (0.5 - horizon)
  cols = np.arange(width, dtype=np.float32) + (0.5 - vanish_x)
  return r0, dy, cols[None, :] / dy[:, None], focal / dy


def _span(lo: float, hi: float, size: int) -> tuple[int, int]:
  """Pixels whose centres lie in [lo, hi), at least one, clipped to [0, size)."""
  if hi - lo < 1.0:
    mid = 0.5 * (lo + hi)
    lo, hi = mid - 0.5, mid + 0.5
  return max(0, math.ceil(lo - 0.5)), min(size, math.ceil(hi - 0.5))


class _Canvas:
  """Instance-id and part maps painted back to front."""

  def __init__(self, height: int, width: int, horizon: float, vanish_x: float):
    self.height, self.width = height, width
    self.horizon, self.vanish_x, self.focal = horizon, vanish_x, _FOCAL * width
    self.ids = np.full((height, width), SKY, np.uint16)
    self.parts = np.zeros((height, width), np.uint8)
    self.classes = list(range(NUM_CLASSES))

  def new_instance(self, cls: int) -> int:
    self.classes.append(cls)
    return len(self.classes) - 1

  def project(self, x: float, y: float, depth: float) -> tuple[float, float, float]:
    """World point (lateral x, height y, depth) -> image (column, row, pixels per unit)."""
    scale = self.focal / depth
    return self.vanish_x + x * scale, self.horizon + (1.0 - y) * scale, scale

  def rect(self, x0: float, y0: float, x1: float, y1: float, inst: int, part: int = 0) -> None:
    r0, r1 = _span(y0, y1, self.height)
    c0, c1 = _span(x0, x1, self.width)
    if r0 < r1 and c0 < c1:
      self.ids[r0:r1, c0:c1] = inst
      self.parts[r0:r1, c0:c1] = part

  def blob(self, x0: float, y0: float, x1: float, y1: float, inst: int, part: int = 0,
           power: float = 2.0) -> None:
    """Superellipse inscribed in the box: an ellipse for power 2, a rounded box for more."""
    r0, r1 = _span(y0, y1, self.height)
    c0, c1 = _span(x0, x1, self.width)
    if r0 >= r1 or c0 >= c1:
      return
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    rx, ry = max(0.5 * (x1 - x0), 0.5), max(0.5 * (y1 - y0), 0.5)
    fx = np.abs((np.arange(c0, c1) + 0.5 - cx) / rx) ** power
    fy = np.abs((np.arange(r0, r1) + 0.5 - cy) / ry) ** power
    mask = fy[:, None] + fx[None, :] <= 1.0
    self.ids[r0:r1, c0:c1][mask] = inst
    self.parts[r0:r1, c0:c1][mask] = part

  def paint(self, rows: slice, cols: slice, mask: np.ndarray, inst: np.ndarray | int,
            part: np.ndarray | int) -> None:
    """Paint a mask over a window of the canvas; inst and part broadcast against it."""
    self.ids[rows, cols] = np.where(mask, inst, self.ids[rows, cols])
    self.parts[rows, cols] = np.where(mask, part, self.parts[rows, cols])

  def finish(self) -> tuple[np.ndarray, Instances]:
    classes = np.array(self.classes, np.uint8)
    inst = Instances(self.ids, classes, self.parts, self.horizon, self.vanish_x, self.focal)
    return classes[self.ids], inst


# ----------------------------------------------------------------------------------------------
# Layout


@dataclasses.dataclass(frozen=True)
class _Side:
  """One side of the street, in camera heights from the camera's vertical plane."""
  sign: int  # -1 left, +1 right
  curb: float  # lateral position of the road edge
  verge: float  # width of the grass strip between road and sidewalk
  sidewalk: float  # width of the sidewalk (0: none)
  park: bool  # no buildings: grass and trees beyond the sidewalk

  def at(self, offset: float) -> float:
    """Lateral position `offset` away from the road edge, outwards."""
    return self.curb + self.sign * offset

  @property
  def facade(self) -> float:
    return self.at(self.verge + self.sidewalk)


def _sample_side(rng: np.random.Generator, sign: int, curb: float) -> _Side:
  sidewalk = rng.uniform(1.5, 3.5) if rng.random() < 0.85 else 0.0
  if sidewalk == 0.0:
    verge = rng.uniform(0.8, 3.0) if rng.random() < 0.5 else 0.0
  else:
    verge = rng.uniform(0.4, 1.5) if rng.random() < 0.2 else 0.0
  return _Side(sign, curb, verge, sidewalk, park=rng.random() < 0.15)


def _draw_skyline(canvas: _Canvas, rng: np.random.Generator) -> None:
  """Distant blocks standing on the horizon, visible where nothing nearer hides the sky."""
  h, w = canvas.height, canvas.width
  for _ in range(rng.integers(0, 8)):
    x0 = rng.uniform(-0.1, 1.0) * w
    top = canvas.horizon - rng.uniform(0.02, 0.12) * h
    canvas.rect(x0, top, x0 + rng.uniform(0.03, 0.12) * w, canvas.horizon + 1,
                canvas.new_instance(BUILDING))


def _draw_ground(canvas: _Canvas, rng: np.random.Generator, left: _Side, right: _Side,
                 end: float) -> None:
  """Bands of constant lateral position: grass | sidewalk | verge | road | verge | ... ."""
  r0, dy, x, depth = _ground(canvas.horizon, canvas.vanish_x, canvas.focal, canvas.height,
                             canvas.width)
  if r0 == canvas.height:
    return
  edges = np.array([left.facade, left.at(left.verge), left.curb,
                    right.curb, right.at(right.verge), right.facade], np.float32)
  band_ids = np.array([VEGETATION, SIDEWALK, VEGETATION, ROAD, VEGETATION, SIDEWALK, VEGETATION],
                      np.uint16)
  band_parts = np.array([_GRASS, 0, _GRASS, 0, _GRASS, 0, _GRASS], np.uint8)
  band = np.searchsorted(edges, x, side="right")
  ids, parts = band_ids[band], band_parts[band]

  # Lane markings (about 10 cm wide), only while they are wider than about a pixel.
  near = ((depth < end) & (0.13 * dy > 0.8))[:, None]
  road_width = right.curb - left.curb
  marking = np.zeros_like(x, bool)
  if road_width > 3.0 and rng.random() < 0.85:  # centre line
    centre = left.curb + road_width * rng.uniform(0.4, 0.6)
    line = np.abs(x - centre) < rng.uniform(0.05, 0.08)
    if rng.random() < 0.65:  # dashed: dashes of 3-5 m every 9-14 m
      period = rng.uniform(6.0, 9.0)
      line &= ((depth / period + rng.random()) % 1.0 < 0.35)[:, None]
    marking |= line
  if rng.random() < 0.35:  # edge lines
    inset = rng.uniform(0.15, 0.4)
    marking |= (np.abs(x - left.curb - inset) < 0.05) | (np.abs(x - right.curb + inset) < 0.05)
  if rng.random() < 0.2:  # zebra crossing
    start = rng.uniform(1.1, 3.0) * depth[-1]
    across = ((depth > start) & (depth < start + rng.uniform(2.0, 3.0)))[:, None]
    marking |= across & ((x / 0.6) % 1.0 < 0.5)
  parts[marking & near & (ids == ROAD)] = _MARKING
  canvas.ids[r0:], canvas.parts[r0:] = ids, parts


def _side_columns(canvas: _Canvas, sign: int) -> tuple[slice, np.ndarray]:
  """The image columns left (sign -1) or right (+1) of the vanishing point, and their offsets
  from it in pixels: a plane along that side of the street is seen at one depth per column."""
  split = min(canvas.width, max(0, math.ceil(canvas.vanish_x - 0.5)))
  cols = slice(0, split) if sign < 0 else slice(split, canvas.width)
  return cols, np.arange(canvas.width, dtype=np.float32)[cols] + (0.5 - canvas.vanish_x)


def _draw_facades(canvas: _Canvas, rng: np.random.Generator, side: _Side, end: float) -> None:
  """A row of buildings of random lengths and heights on the facade plane of one side.

  Everything is computed per image column: the column sees the facade plane at one depth,
  hence one building, one base and one roof line.
  """
  if side.park:
    return
  starts, heights, floors, bays, shops = [], [], [], [], []
  start = -rng.uniform(0.0, 20.0)
  while start < end:
    starts.append(start)
    heights.append(0.0 if rng.random() < 0.12 else rng.uniform(5.0, 18.0))
    floors.append(rng.uniform(1.8, 2.4))
    bays.append(rng.uniform(1.4, 2.6))
    shops.append(rng.random() < 0.5)
    start += rng.uniform(6.0, 25.0)
  ids = np.array([canvas.new_instance(BUILDING) for _ in starts], np.uint16)

  cols, dx = _side_columns(canvas, side.sign)
  if dx.size == 0:
    return
  with np.errstate(divide="ignore"):
    depth = canvas.focal * side.facade / dx
  depth[depth <= 0] = np.inf
  block = np.clip(np.searchsorted(np.array(starts), depth, side="right") - 1, 0, len(starts) - 1)
  height = np.where(depth < end, np.array(heights)[block], 0.0)
  scale = canvas.focal / depth  # pixels per camera height in each column
  base = canvas.horizon + scale
  top = base - height * scale
  rows = slice(0, min(canvas.height, max(0, math.ceil(float(base.max()) - 0.5))))
  y = np.arange(rows.stop, dtype=np.float32)[:, None] + 0.5
  wall = (y >= top) & (y < base)

  # Windows: floors (rows) times bays (columns), in the facade's own coordinates, dropped where
  # a window would be about a pixel.
  floor = np.array(floors)[block]
  bay = np.array(bays)[block]
  along = (depth - np.array(starts)[block]) / bay
  bay_px = bay * canvas.focal * abs(side.facade) / depth ** 2
  visible = (np.minimum(bay_px, floor * scale) > 3.0) & np.isfinite(depth)
  in_bay = along % 1.0
  up = (base - y) / scale  # height above the ground, camera heights
  level = up / floor
  windows = ((level % 1.0 > 0.35) & (level % 1.0 < 0.8) & (level > 1.0)
             & (up < height - 0.6) & ((in_bay > 0.3) & (in_bay < 0.75) & visible))
  shop = (level > 0.12) & (level < 0.75) & ((in_bay > 0.1) & (in_bay < 0.9) & visible
                                            & np.array(shops)[block])
  canvas.paint(rows, cols, wall, ids[block], np.where(windows | shop, _WINDOW, 0))


def _draw_street_end(canvas: _Canvas, rng: np.random.Generator, left: _Side, right: _Side,
                     end: float) -> None:
  """Buildings across the street at its far end, facing the camera."""
  if rng.random() < 0.3:
    return
  x = left.facade - rng.uniform(0.0, 10.0)
  stop = right.facade + rng.uniform(0.0, 10.0)
  while x < stop:
    length = rng.uniform(4.0, 15.0)
    if rng.random() > 0.25:
      x0, y0, scale = canvas.project(x, rng.uniform(4.0, 16.0), end)
      x1, y1, _ = canvas.project(x + length, 0.0, end)
      inst = canvas.new_instance(BUILDING)
      canvas.rect(x0, y0, x1, y1, inst)
      if scale * 2.0 > 4.0:  # windows where a floor is more than a few pixels high
        r0, r1 = _span(y0, y1 - scale, canvas.height)
        c0, c1 = _span(x0, x1, canvas.width)
        level = ((y1 - np.arange(r0, r1) - 0.5) / (2.0 * scale)) % 1.0
        bay = ((np.arange(c0, c1) + 0.5 - x0) / (1.8 * scale)) % 1.0
        mask = ((level > 0.35) & (level < 0.8))[:, None] & ((bay > 0.3) & (bay < 0.75))[None, :]
        canvas.paint(slice(r0, r1), slice(c0, c1), mask, inst, _WINDOW)
    x += length


def _draw_hedge(canvas: _Canvas, rng: np.random.Generator, side: _Side, end: float) -> None:
  """A low band of vegetation just in front of the facade plane, over a range of depths."""
  x = side.at(side.verge + side.sidewalk - 0.3) if side.sidewalk else side.facade
  near = rng.uniform(0.0, 30.0)
  far = min(end, near + rng.uniform(10.0, 60.0))
  cols, dx = _side_columns(canvas, side.sign)
  if dx.size == 0:
    return
  with np.errstate(divide="ignore"):
    depth = canvas.focal * x / dx
  scale = np.where((depth > near) & (depth < far), canvas.focal / depth, 0.0)
  base = canvas.horizon + scale
  top = base - rng.uniform(0.5, 1.0) * scale
  rows = slice(0, min(canvas.height, max(0, math.ceil(float(base.max()) - 0.5))))
  y = np.arange(rows.stop, dtype=np.float32)[:, None] + 0.5
  canvas.paint(rows, cols, (y >= top) & (y < base), canvas.new_instance(VEGETATION), 0)


def _draw_tree(canvas: _Canvas, rng: np.random.Generator, depth: float, x: float) -> None:
  """A trunk under a canopy made of a union of discs."""
  inst = canvas.new_instance(VEGETATION)
  trunk, radius = rng.uniform(1.3, 2.5), rng.uniform(1.2, 2.6)
  half = 0.5 * rng.uniform(0.15, 0.25)
  x0, y0, scale = canvas.project(x - half, trunk + 0.5 * radius, depth)
  x1, y1, _ = canvas.project(x + half, 0.0, depth)
  canvas.rect(x0, y0, x1, y1, inst, _TRUNK)
  centre = trunk + 0.8 * radius
  for _ in range(rng.integers(4, 8)):
    r = radius * rng.uniform(0.45, 0.75)
    cx = x + radius * rng.uniform(-0.7, 0.7)
    cy = centre + radius * rng.uniform(-0.5, 0.6)
    u, v, _ = canvas.project(cx, cy, depth)
    canvas.blob(u - r * scale, v - r * scale, u + r * scale, v + r * scale, inst)


def _draw_pole(canvas: _Canvas, rng: np.random.Generator, depth: float, x: float,
               towards_road: int) -> None:
  """A thin bar, sometimes with a lamp arm reaching over the road or a sign plate."""
  inst = canvas.new_instance(POLE)
  height, half = rng.uniform(3.0, 5.0), 0.5 * rng.uniform(0.08, 0.14)
  x0, y0, scale = canvas.project(x - half, height, depth)
  x1, y1, _ = canvas.project(x + half, 0.0, depth)
  canvas.rect(x0, y0, x1, y1, inst)
  kind = rng.random()
  if kind < 0.45:  # street lamp: an arm over the road with the lamp at its end
    reach = towards_road * rng.uniform(0.8, 1.8)
    ax, _, _ = canvas.project(x + reach, height, depth)
    canvas.rect(min(x0, ax), y0, max(x1, ax), y0 + 0.07 * scale, inst)
    canvas.rect(ax - 0.2 * scale, y0, ax + 0.2 * scale, y0 + 0.12 * scale, inst, _FIXTURE)
  elif kind < 0.75:  # sign plate
    width, plate = rng.uniform(0.4, 0.7), rng.uniform(0.4, 0.6)
    px, py, _ = canvas.project(x, rng.uniform(1.8, min(2.8, height)), depth)
    canvas.rect(px - 0.5 * width * scale, py, px + 0.5 * width * scale, py + plate * scale,
                inst, _FIXTURE)


def _draw_person(canvas: _Canvas, rng: np.random.Generator, depth: float, x: float) -> None:
  """Two legs, a body ellipse and a head; now and then a child."""
  inst = canvas.new_instance(PERSON)
  tall = rng.uniform(1.05, 1.25) if rng.random() < 0.9 else rng.uniform(0.6, 0.8)
  cx, ground, scale = canvas.project(x, 0.0, depth)
  size = tall * scale
  stride = rng.uniform(0.0, 0.12) * size
  for offset in (-1.0, 1.0):  # legs, apart by a random stride
    lx = cx + offset * (0.05 * size + 0.5 * stride)
    canvas.rect(lx - 0.045 * size, ground - 0.5 * size, lx + 0.045 * size, ground, inst, _LEGS)
  canvas.blob(cx - 0.14 * size, ground - 0.86 * size, cx + 0.14 * size, ground - 0.44 * size,
              inst, 0, power=3.0)
  canvas.blob(cx - 0.075 * size, ground - size, cx + 0.075 * size, ground - 0.84 * size,
              inst, _SKIN)


def _draw_car(canvas: _Canvas, rng: np.random.Generator, depth: float, x: float) -> None:
  """A car seen from behind or from the front: wheels, body, cabin, window, lights."""
  inst = canvas.new_instance(CAR)
  van = rng.random() < 0.15
  width = rng.uniform(1.15, 1.35)
  tall = rng.uniform(1.4, 1.7) if van else rng.uniform(0.95, 1.15)
  cabin = 0.47 if van else rng.uniform(0.36, 0.42)
  cx, ground, scale = canvas.project(x, 0.0, depth)
  w, h = width * scale, tall * scale
  for side in (-1.0, 1.0):
    canvas.rect(cx + side * 0.3 * w, ground - 0.25 * h, cx + side * 0.47 * w, ground,
                inst, _WHEEL)
  canvas.blob(cx - 0.5 * w, ground - 0.62 * h, cx + 0.5 * w, ground - 0.1 * h, inst, 0, 6.0)
  canvas.blob(cx - cabin * w, ground - h, cx + cabin * w, ground - 0.5 * h, inst, 0, 4.0)
  canvas.blob(cx - (cabin - 0.07) * w, ground - 0.93 * h, cx + (cabin - 0.07) * w,
              ground - 0.63 * h, inst, _WINDOW, 4.0)
  for side in (-1.0, 1.0):
    canvas.rect(cx + side * 0.33 * w, ground - 0.5 * h, cx + side * 0.47 * w, ground - 0.41 * h,
                inst, _LIGHT)


def _sample_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray,
                                                                                Instances]:
  horizon = rng.uniform(0.35, 0.55) * height
  canvas = _Canvas(height, width, horizon, rng.uniform(0.3, 0.7) * width)
  nearest = canvas.focal / (height - horizon)  # depth seen at the bottom row
  end = rng.uniform(40.0, 150.0)  # depth of the street's far end
  left = _sample_side(rng, -1, -rng.uniform(1.5, 6.0))
  right = _sample_side(rng, 1, rng.uniform(1.5, 4.5))
  sides = (left, right)

  _draw_skyline(canvas, rng)
  _draw_ground(canvas, rng, left, right, end)
  _draw_street_end(canvas, rng, left, right, end)
  for side in sides:
    _draw_facades(canvas, rng, side, end)
    if rng.random() < 0.35:
      _draw_hedge(canvas, rng, side, end)

  def depth_between(near: float, far: float) -> float | None:
    """A depth in [near, far), uniform in 1 / depth (i.e. in image rows), or None if empty."""
    return 1.0 / rng.uniform(1.0 / far, 1.0 / near) if near < far else None

  def depth_in_view(x: float, far: float) -> float | None:
    """A depth up to `far` at which lateral position x is inside the image."""
    room = canvas.vanish_x if x < 0 else width - canvas.vanish_x
    return depth_between(max(nearest, canvas.focal * abs(x) / max(room, 1.0)), far)

  # Objects as (depth, draw, args), painted far to near so that near ones occlude far ones.
  things: list[tuple[float, Callable[..., None], tuple]] = []
  for side in sides:
    if side.park:
      for _ in range(rng.integers(2, 7)):
        x = side.at(side.verge + side.sidewalk + rng.uniform(0.5, 12.0))
        if (depth := depth_between(nearest, end)) is not None:
          things.append((depth, _draw_tree, (x,)))
    elif rng.random() < 0.7:  # a row of trees along the sidewalk or the verge
      x = (side.at(side.verge + side.sidewalk - rng.uniform(0.5, 0.9)) if side.sidewalk > 1.5
           else side.at(0.5 * side.verge))
      depth = rng.uniform(0.7, 2.0) * nearest
      for _ in range(rng.integers(1, 6)):
        things.append((depth, _draw_tree, (x,)))
        depth += rng.uniform(8.0, 16.0)
  for _ in range(rng.integers(0, 6)):
    side = sides[rng.integers(2)]
    x = side.at(side.verge + (0.3 if side.sidewalk else -0.2))
    if (depth := depth_in_view(x, 0.8 * end)) is not None:
      things.append((depth, _draw_pole, (x, -side.sign)))
  with_sidewalk = [side for side in sides if side.sidewalk > 0.0]
  for _ in range(rng.integers(0, 7) if with_sidewalk else 0):
    side = with_sidewalk[rng.integers(len(with_sidewalk))]
    x = side.at(side.verge + rng.uniform(0.2, 0.8) * side.sidewalk)
    if (depth := depth_in_view(x, min(30.0, end))) is not None:
      things.append((depth, _draw_person, (x,)))
  lo, hi = left.curb + 0.7, right.curb - 0.7
  for _ in range(rng.integers(0, 6)):
    x = rng.uniform(lo, hi) if lo < hi else 0.5 * (lo + hi)
    if (depth := depth_between(nearest / 0.75, min(70.0, end))) is not None:
      things.append((depth, _draw_car, (x,)))
  for depth, draw, args in sorted(things, key=lambda thing: -thing[0]):
    draw(canvas, rng, depth, *args)
  return canvas.finish()


def sample_layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Label map (H, W) uint8 of one random street scene."""
  height, width = _check_positive("height", height), _check_positive("width", width)
  return _sample_scene(rng, height, width)[0]


# ----------------------------------------------------------------------------------------------
# Rendering


@dataclasses.dataclass(frozen=True)
class _Style:
  """An appearance table compiled to arrays indexed by class (and part, option)."""
  options: np.ndarray  # (C, K, 3) base colours an instance of class c chooses from
  num_options: np.ndarray  # (C,)
  parts: np.ndarray  # (C, P, 3) part colours (the base part's entry is overwritten)
  courses: np.ndarray  # (C, K) bool: base colour drawn with brick courses
  tint: np.ndarray  # (C, 3) colour displacement per unit of texture noise
  amplitudes: np.ndarray  # (len(_NOISE_FIELDS), C) weight of each noise field
  jitter: float


def _compile(table: dict[str, dict[str, Any]], jitter: float) -> _Style:
  most = max(len(table[name]["base"]) for name in CLASS_NAMES)
  options = np.zeros((NUM_CLASSES, most, 3), np.float32)
  num_options = np.zeros(NUM_CLASSES, np.intp)
  parts = np.zeros((NUM_CLASSES, NUM_PARTS, 3), np.float32)
  courses = np.zeros((NUM_CLASSES, most), bool)
  tint = np.zeros((NUM_CLASSES, 3), np.float32)
  amplitudes = np.zeros((len(_NOISE_FIELDS), NUM_CLASSES), np.float32)
  for c, name in enumerate(CLASS_NAMES):
    entry = table[name]
    options[c, :len(entry["base"])] = entry["base"]
    num_options[c] = len(entry["base"])
    for p, part in enumerate(PART_NAMES[name][1:], start=1):
      parts[c, p] = entry[part]
    courses[c, :len(entry["base"])] = entry.get("courses", False)
    tint[c] = entry.get("tint", (0, 0, 0))
    amplitudes[:, c] = [entry.get(field, 0.0) for field in _NOISE_FIELDS]
  return _Style(options, num_options, parts, courses, tint, amplitudes, jitter)


_SOURCE = _compile(SOURCE_APPEARANCE, SOURCE_JITTER)
_TARGET = _compile(TARGET_APPEARANCE, TARGET_JITTER)


def _instance_colours(style: _Style, classes: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(N, P, 3) colour of every part of every instance, and (N,) its brick-courses flag."""
  n = len(classes)
  choice = (rng.random(n) * style.num_options[classes]).astype(np.intp)
  colours = style.parts[classes]
  colours[:, 0] = style.options[classes, choice]
  colours += rng.uniform(-style.jitter, style.jitter, (n, 1, 1)).astype(np.float32)
  return colours, style.courses[classes, choice]


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
  """Smooth noise in [-1, 1] with features about `cell` pixels wide (bilinear, smoothstep)."""
  grid = rng.random((int(height / cell) + 2, int(width / cell) + 2), dtype=np.float32) * 2 - 1

  def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
    pos = (np.arange(n, dtype=np.float32) + 0.5) / cell
    i = pos.astype(np.intp)
    t = pos - i
    return i, t * t * (3 - 2 * t)

  # Interpolate the few grid columns along y first, so that only the last step is full size.
  iy, ty = axis(height)
  ix, tx = axis(width)
  rows = grid[iy] + (grid[iy + 1] - grid[iy]) * ty[:, None]
  out = np.take(np.diff(rows, axis=1), ix, axis=1)
  out *= tx
  out += np.take(rows, ix, axis=1)
  return out


def _blur(img: np.ndarray) -> np.ndarray:
  """Separable [1, 2, 1] / 4 blur of (H, W, 3), edges replicated: a soft lens."""
  for axis in (0, 1):
    if img.shape[axis] < 3:
      continue
    pad = [(0, 0)] * 3
    pad[axis] = (1, 1)
    padded = np.moveaxis(np.pad(img, pad, mode="edge"), axis, 0)
    out = padded[:-2] + padded[2:]
    out += padded[1:-1]
    out += padded[1:-1]
    out *= 0.25
    img = np.moveaxis(out, 0, axis)
  return img


def _render_source(inst: Instances, rng: np.random.Generator) -> np.ndarray:
  colours, _ = _instance_colours(_SOURCE, inst.classes, rng)
  table = np.clip(colours, 0, 255).astype(np.uint8).reshape(-1, 3)
  return np.take(table, inst.ids.astype(np.intp) * NUM_PARTS + inst.parts, axis=0)


def _render_target(label: np.ndarray, inst: Instances, rng: np.random.Generator) -> np.ndarray:
  height, width = label.shape
  colours, courses = _instance_colours(_TARGET, inst.classes, rng)
  # Colour temperature is a per-channel gain: fold it into the colour tables.
  temperature = rng.uniform(-0.08, 0.08)
  white = np.array([1 + temperature, 1, 1 - temperature], np.float32)
  colours *= white
  ids = inst.ids.astype(np.intp)
  img = np.take(colours.reshape(-1, 3), ids * NUM_PARTS + inst.parts, axis=0)

  # Per-class texture: one set of noise fields, weighted per class, moves each pixel's colour
  # along its class's tint.
  amp = _TARGET.amplitudes
  noise = rng.random((height, width), dtype=np.float32) * 2 - 1
  noise *= np.take(amp[0], label)
  for a, cell in zip(amp[1:], (max(1.5, height / 50), height / 14, height / 3), strict=True):
    field = _value_noise(rng, height, width, cell)
    field *= np.take(a, label)
    noise += field
  tint = np.take(_TARGET.tint * white, label, axis=0)
  tint *= noise[..., None]
  img += tint

  # Multiplicative shading: facade brick courses, sidewalk slabs, lighting, cast shadows.
  shade = np.ones((height, width), np.float32)
  k = max(2, round(height / 40))
  y = np.arange(height, dtype=np.int32)[:, None]
  x = np.arange(width, dtype=np.int32)[None, :]
  mortar = (y % k == 0) | ((x + (y // k % 2) * k) % (2 * k) == 0)
  shade[mortar & np.take(courses, ids) & (inst.parts == 0)] = 1.2

  r0, dy, lateral, depth = _ground(inst.horizon, inst.vanish_x, inst.focal, height, width)
  ground = label[r0:]
  if r0 < height:
    size_x, size_z = rng.uniform(0.4, 0.9, 2)
    across, along = lateral / size_x, depth / size_z
    brightness = rng.uniform(0.9, 1.1, (13, 11)).astype(np.float32)
    slab = brightness[np.floor(across).astype(np.int32) % 13,
                      np.floor(along).astype(np.int32)[:, None] % 11]
    # Joints: distance to the nearest slab edge, converted to pixels.
    joint = ((np.abs(across - np.round(across)) * (size_x * dy[:, None]) < 0.5)
             | (np.abs(along - np.round(along)) * (size_z * dy ** 2 / inst.focal) < 0.5)[:, None])
    slab[joint] *= 0.7
    sidewalk = ground == SIDEWALK
    shade[r0:][sidewalk] = slab[sidewalk]
    if rng.random() < 0.5:  # shadow of a building: one side of a line along the street
      cast = rng.choice((-1, 1)) * (lateral - rng.uniform(-2.5, 2.5)) > 0
      if rng.random() < 0.5:
        near = rng.uniform(5.0, 30.0)
        cast &= ((depth > near) & (depth < near + rng.uniform(5.0, 40.0)))[:, None]
      cast &= (sidewalk | (ground == ROAD)
               | ((ground == VEGETATION) & (inst.parts[r0:] == _GRASS)))
      shade[r0:][cast] *= rng.uniform(0.55, 0.75)

  # Lighting: exposure and contrast, a smooth gradient and vignetting.
  yn = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
  xn = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
  angle, slope, vignette = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.25), rng.uniform(0, 0.4)
  exposure, contrast = rng.uniform(0.7, 1.15), rng.uniform(0.8, 1.15)
  # A product of a row and a column factor: about 1 + slope * (direction . position) minus
  # vignette * radius^2 / 2, at the cost of one (H, W) product.
  along_y = exposure * contrast * (1 + slope * np.sin(angle) * yn - 0.5 * vignette * yn * yn)
  along_x = 1 + slope * np.cos(angle) * xn - 0.5 * vignette * xn * xn
  shade *= along_y * along_x
  img *= shade[..., None]
  img += 110 * (1 - contrast)  # contrast pivots around mid grey

  img = _blur(img)
  # Sensor noise, independent per pixel and channel: the three channels read one Gaussian
  # sequence at offsets far apart, which costs about a third of drawing (H, W, 3) values.
  gap = 7 * width + 3
  sequence = rng.standard_normal(height * width + 2 * gap, dtype=np.float32)
  sequence *= rng.uniform(3.0, 8.0)
  step = sequence.itemsize
  img += np.lib.stride_tricks.as_strided(
      sequence, (height, width, 3), (width * step, step, gap * step), writeable=False)
  img += 0.5
  return np.clip(img, 0, 255, out=img).astype(np.uint8)


def render(label: np.ndarray, domain: str, rng: np.random.Generator,
           instances: Instances | None = None) -> np.ndarray:
  """(H, W, 3) uint8 image of that layout in the domain's appearance.

  `instances` (from the layout) gives per-object colours, parts (windows, wheels, lane
  markings, ...) and the camera geometry; without it every class is one flat instance seen by
  a typical camera.
  """
  domain_id = _check_choice("domain", domain, DOMAINS)
  label = np.asarray(label)
  if label.ndim != 2 or label.dtype != np.uint8:
    raise ValueError(f"label must be a (H, W) uint8 array, got {label.dtype} {label.shape}")
  if label.size and label.max() >= NUM_CLASSES:
    raise ValueError(f"label values must be class ids < {NUM_CLASSES}, got {label.max()}")
  if instances is None:
    instances = Instances.from_label(label)
  elif instances.ids.shape != label.shape or instances.parts.shape != label.shape:
    raise ValueError(f"instances maps must have the label's shape {label.shape}, got "
                     f"{instances.ids.shape} and {instances.parts.shape}")
  if domain_id == 0:
    return _render_source(instances, rng)
  return _render_target(label, instances, rng)


# ----------------------------------------------------------------------------------------------
# Dataset


def generate(domain: str, split: str, index: int, height: int, width: int,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 HxWx3, label uint8 HxW) of one example, deterministic in all arguments.

  Each (seed, domain, split, index) seeds its own generator, so that source and target, and
  train and val, are different scenes from the same layout distribution.
  """
  domain_id = _check_choice("domain", domain, DOMAINS)
  split_id = _check_choice("split", split, SPLITS)
  index = _check_index(index)
  height, width = _check_positive("height", height), _check_positive("width", width)
  seed = _check_seed(seed)
  rng = np.random.default_rng(np.random.SeedSequence([seed, domain_id, split_id, index]))
  label, instances = _sample_scene(rng, height, width)
  return render(label, domain, rng, instances), label


class StreetScenes:
  """Random-access source of `num_examples` examples: [i] -> {"image", "label"}.

  image: (height, width, 3) uint8, label: (height, width) uint8 train ids (see CLASS_NAMES).
  """

  def __init__(self, domain: str, split: str, *, num_examples: int, height: int = 128,
               width: int = 256, seed: int = 0):
    _check_choice("domain", domain, DOMAINS)
    _check_choice("split", split, SPLITS)
    self.domain, self.split = domain, split
    self.num_examples = _check_positive("num_examples", num_examples)
    self.height = _check_positive("height", height)
    self.width = _check_positive("width", width)
    self.seed = _check_seed(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = _check_index(index, self.num_examples)
    image, label = generate(self.domain, self.split, index, self.height, self.width, self.seed)
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return (f"StreetScenes(domain={self.domain!r}, split={self.split!r}, "
            f"num_examples={self.num_examples}, height={self.height}, width={self.width}, "
            f"seed={self.seed})")
