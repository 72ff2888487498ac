"""Per-record augmentation of the seeds: random scale, random crop, flip, colour jitter.

Each record gets its own numpy Generator from Grain (seeded by the pipeline
seed and the record's index), so a record is augmented the same way in every
run, whatever the number of workers or processes.
"""

import dataclasses

import grain
import numpy as np
from PIL import Image

from segjax.data import files
from segjax.losses import IGNORE_LABEL

# RGB -> YIQ, where a hue shift is a rotation of the (I, Q) plane.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ).astype(np.float32)
CROP_TRIES = 11  # mmseg's RandomCrop for cat_max_ratio: the first crop and up to 10 redraws.


def color_jitter(image: np.ndarray, rng: np.random.Generator, *, brightness: float,
                 contrast: float, saturation: float, hue: float) -> np.ndarray:
  """torchvision-style ColorJitter: factors drawn from [1 - s, 1 + s], hue from [-hue, hue]."""
  x = image.astype(np.float32)
  gray_weights = np.array([0.299, 0.587, 0.114], np.float32)
  if brightness:
    x = x * rng.uniform(1 - brightness, 1 + brightness)
  if contrast:
    mean = (x @ gray_weights).mean()
    x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
  if saturation:
    gray = (x @ gray_weights)[..., None]
    x = (x - gray) * rng.uniform(1 - saturation, 1 + saturation) + gray
  if hue:
    angle = rng.uniform(-hue, hue) * 2 * np.pi
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
    x = x @ (YIQ_TO_RGB @ rotation @ RGB_TO_YIQ).T
  return np.clip(x, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class TrainAugment(grain.transforms.RandomMap):
  """Scale by a random factor, crop `crop_size` at random (padding with ignore), flip, jitter.

  Records without a label (unlabelled target images) are augmented the same way;
  `drop_label` drops a record's label before anything reads it (the target
  images of adaptation, whose labels training never uses), with the same draws.
  `cat_max_ratio` < 1 (mmseg's RandomCrop): a labelled crop is redrawn, up to 10
  times, until no class covers `cat_max_ratio` or more of its labelled
  pixels (a crop of a single class is redrawn too).

  `pseudo_margins` (top, bottom, left, right pixels of the image as read; HRDA's
  pseudo-label crop v2, `crop_pseudo_margins`) adds 'pseudo_valid' (uint8, 1
  inside): the image less those margins, scaled, cropped and flipped with the
  image, so a crop's pseudo labels lose the margins only where the crop
  reaches the image's border (padding is not valid).
  """
  crop_size: tuple[int, int]
  scale_range: tuple[float, float] = (1.0, 1.0)
  flip: bool = True
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  cat_max_ratio: float = 1.0
  pseudo_margins: tuple[int, int, int, int] | tuple[()] = ()
  drop_label: bool = False

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image = element["image"]
    label = None if self.drop_label else element.get("label")
    valid = None
    if self.pseudo_margins:
      above, below, before, after = self.pseudo_margins
      valid = np.zeros(image.shape[:2], np.uint8)
      valid[above:image.shape[0] - below, before:image.shape[1] - after] = 1
    crop_h, crop_w = self.crop_size
    scale = rng.uniform(*self.scale_range)
    height = max(1, round(image.shape[0] * scale))
    width = max(1, round(image.shape[1] * scale))
    if (height, width) != image.shape[:2]:
      image = files.resize_array(image, (height, width), Image.BILINEAR)
      if label is not None:
        label = files.resize_array(label, (height, width), Image.NEAREST)
      if valid is not None:
        valid = files.resize_array(valid, (height, width), Image.NEAREST)
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
      image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
      if label is not None:
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_LABEL)
      if valid is not None:
        valid = np.pad(valid, ((0, pad_h), (0, pad_w)))
    for _ in range(CROP_TRIES):
      top = rng.integers(0, image.shape[0] - crop_h + 1)
      left = rng.integers(0, image.shape[1] - crop_w + 1)
      if label is None or self.cat_max_ratio >= 1.0:
        break
      counts = np.bincount(label[top:top + crop_h, left:left + crop_w].ravel(), minlength=256)
      counts = counts[:IGNORE_LABEL]
      if np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
        break
    image = image[top:top + crop_h, left:left + crop_w]
    if label is not None:
      label = label[top:top + crop_h, left:left + crop_w]
    if valid is not None:
      valid = valid[top:top + crop_h, left:left + crop_w]
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
      if label is not None:
        label = label[:, ::-1]
      if valid is not None:
        valid = valid[:, ::-1]
    image = color_jitter(image, rng, brightness=self.brightness, contrast=self.contrast,
                         saturation=self.saturation, hue=self.hue)
    out = {"image": np.ascontiguousarray(image)}
    if label is not None:
      out["label"] = np.ascontiguousarray(label)
    if valid is not None:
      out["pseudo_valid"] = np.ascontiguousarray(valid)
    return out
