"""The Grain input pipelines: training streams and the evaluation split.

Training: each domain is a random-access source, shuffled with a seeded
per-epoch permutation, augmented per record and repeated forever. The source
and target streams are zipped, so they advance in lockstep and one iterator
state (saved in every checkpoint) covers both.

Rare-class sampling (`data.rcs.temperature` > 0, DAFormer): the source stream
draws each record's image for a rare class instead (`segjax.data.rare_class`),
one draw per position of the stream, from the stream's seed and that position.

Multi-process: every process describes the same global stream and reads only
its contiguous slice of each global batch (process p gets rows
[p * B/P, (p+1) * B/P) of batch t). The global batches are therefore the same
for any number of processes, and so are the results.
"""

import dataclasses
import os

import grain
import ml_collections
import numpy as np
import tqdm

from segjax import data, errors
from segjax.data import pseudo_label_files, rare_class
from segjax.data.augment import TrainAugment
from segjax.losses import IGNORE_LABEL


def _stream_seed(seed: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _as_domains(pair: tuple) -> dict:
  return {"source": pair[0], "target": pair[1]}


def _as_source(element: dict) -> dict:
  return {"source": element}


def crop_size(config: ml_collections.ConfigDict, domain: str) -> tuple[int, int]:
  """The training crop (height, width) of `domain` ('source' or 'target').

  `data.<domain>.crop_size` when set (AdaptSegNet feeds the whole 1280x720 GTA5
  image beside 1024x512 Cityscapes ones), else the shared `data.crop_size`.
  """
  own = tuple(config.data[domain].get("crop_size", ()) or ())
  size = own or tuple(config.data.crop_size)
  if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
    field = f"data.{domain}.crop_size" if own else "data.crop_size"
    raise errors.ConfigError(f"{field} must be (height, width) in positive pixels, got {size}.")
  return size


def pseudo_margins(config: ml_collections.ConfigDict) -> tuple[int, int, int, int] | tuple[()]:
  """`data.target.pseudo_margins`: () (none) or (top, bottom, left, right) pixels."""
  margins = tuple(config.data.target.get("pseudo_margins", ()) or ())
  if margins and (len(margins) != 4 or not all(
      isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in margins)):
    raise errors.ConfigError(f"data.target.pseudo_margins must be () or (top, bottom, left, "
                             f"right) in non-negative pixels, got {margins}.")
  return margins


def _augmentation(config: ml_collections.ConfigDict, domain: str,
                  target_labels: bool = False) -> TrainAugment:
  """The source's augmentation, or the target's: its labels dropped before the augmentation
  reads them unless they are `target_labels` (pseudo labels), and no `cat_max_ratio` redraws,
  so no target crop depends on a label."""
  aug = config.data.augment
  target = domain == "target"
  return TrainAugment(crop_size=crop_size(config, domain), scale_range=tuple(aug.scale_range),
                      flip=aug.flip, brightness=aug.brightness, contrast=aug.contrast,
                      saturation=aug.saturation, hue=aug.hue,
                      cat_max_ratio=1.0 if target else aug.get("cat_max_ratio", 1.0),
                      pseudo_margins=pseudo_margins(config) if target else (),
                      drop_label=target and not target_labels)


def _domain_stream(source, seed: int, augment: TrainAugment) -> grain.MapDataset:
  return grain.MapDataset.source(source).seed(seed).shuffle().random_map(augment).repeat()


@dataclasses.dataclass(frozen=True)
class _RareClassDraw(grain.transforms.RandomMap):
  """Stream position -> an augmented source record drawn for a rare class (see the module
  docstring of `segjax.data.rare_class`)."""
  source: object
  sampler: rare_class.Sampler
  augment: TrainAugment
  min_crop_pixels: float

  def random_map(self, element: int, rng: np.random.Generator) -> dict:
    del element  # The draw depends on the position only through `rng`.
    index, c = self.sampler.draw(rng)
    record = self.source[index]
    for _ in range(rare_class.MAX_CROPS):
      out = self.augment.random_map(record, rng)
      if self.min_crop_pixels <= 0 or np.sum(out["label"] == c) > self.min_crop_pixels:
        break
    return out


def _rare_class_stream(source, seed: int, augment: TrainAugment, sampler: rare_class.Sampler,
                       min_crop_pixels: float) -> grain.MapDataset:
  # Every position of the repeated range gets its own draw (random_map after repeat).
  return (grain.MapDataset.range(len(source)).repeat().seed(seed)
          .random_map(_RareClassDraw(source, sampler, augment, min_crop_pixels)))


RCS_STATS_FILE = "rcs_stats.json"  # The workdir's copy of the rare-class statistics.


def rare_class_sampler(config: ml_collections.ConfigDict, workdir: str = "",
                       is_primary: bool = True) -> rare_class.Sampler | None:
  """The sampler of `data.rcs`, or None when rare-class sampling is off (temperature 0).

  Its statistics come from `data.rcs.stats` when set, else from the workdir's
  rcs_stats.json, computed there at the run's first start (and continued
  there if that start was interrupted).
  """
  rcs = config.data.get("rcs")
  if rcs is None or not rcs.temperature:
    return None
  if rcs.temperature < 0 or rcs.min_pixels < 0 or rcs.min_crop_ratio < 0:
    raise errors.ConfigError(f"data.rcs: temperature ({rcs.temperature}), min_pixels "
                             f"({rcs.min_pixels}) and min_crop_ratio ({rcs.min_crop_ratio}) "
                             "must be >= 0.")
  saved = os.path.join(workdir, RCS_STATS_FILE) if workdir else ""
  if rcs.stats:
    record = rare_class.read(rcs.stats, config.data.source, "data.source")
  else:
    record = rare_class.compute(config.data.source, "data.source",
                                path=saved if is_primary else "",
                                progress=tqdm.tqdm if is_primary else (lambda it, **_: it))
  return rare_class.Sampler(record["counts"], record["class_names"], rcs.temperature,
                            rcs.min_pixels)


def _process_slice(ds: grain.MapDataset, global_batch: int, process_index: int,
                   process_count: int) -> grain.MapDataset:
  """Batches of B/P records, process p taking every P-th one starting at p."""
  return ds.batch(global_batch // process_count, drop_remainder=True)[process_index::process_count]


def train_batches(config: ml_collections.ConfigDict, *, with_target: bool, process_index: int,
                  process_count: int, target_labels: bool = False,
                  sampler: rare_class.Sampler | None = None) -> grain.MapDataset:
  """Infinite random-access sequence of this process's batches.

  Each is {'source': {image, label}[, 'target': {image[, label]}]}: with
  `target_labels`, the target labels are the pseudo labels of
  `data.target.pseudo_labels`, augmented with their images. With `sampler`
  (`rare_class_sampler`), the source images are drawn for their rare classes.
  """
  source_data = data.build_source(config.data.source, "data.source")
  if sampler is None:
    source = _domain_stream(source_data, _stream_seed(config.seed, 0),
                            _augmentation(config, "source"))
  else:
    rcs = config.data.rcs
    source = _rare_class_stream(source_data, _stream_seed(config.seed, 0),
                                _augmentation(config, "source"), sampler,
                                rcs.min_pixels * rcs.min_crop_ratio)
  if with_target:
    target_source = data.build_source(config.data.target, "data.target")
    if target_labels:
      target_source = pseudo_label_files.pseudo_labelled_target(config.data.target, target_source)
    target = _domain_stream(target_source, _stream_seed(config.seed, 1),
                            _augmentation(config, "target", target_labels))
    ds = grain.experimental.ZipMapDataset(parents=[source, target]).map(_as_domains)
  else:
    ds = source.map(_as_source)
  return _process_slice(ds, config.batch_size, process_index, process_count)


def stream(batches: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  """`batches` as a checkpointable stream, read by `num_workers` worker processes (0: none)."""
  ds = batches.to_iter_dataset()
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def train_dataset(config: ml_collections.ConfigDict, *, with_target: bool, process_index: int,
                  process_count: int) -> grain.IterDataset:
  """The stream of `train_batches`, read by `data.num_workers` worker processes."""
  return stream(train_batches(config, with_target=with_target, process_index=process_index,
                              process_count=process_count), config.data.num_workers)


def pad_record(record: dict, size: tuple[int, int], where: str) -> dict:
  """Pads image (zeros) and label (ignore) at the bottom and right to `size`."""
  height, width = size
  image, label = record["image"], record["label"]
  if image.shape[0] > height or image.shape[1] > width:
    raise errors.ConfigError(f"An image of {image.shape[1]}x{image.shape[0]} is larger than "
                             f"{where}.pad_to={tuple(size)} (height, width); raise it.")
  out = {"image": np.pad(image, ((0, height - image.shape[0]), (0, width - image.shape[1]),
                                 (0, 0)))}
  out["label"] = np.pad(label, ((0, height - label.shape[0]), (0, width - label.shape[1])),
                        constant_values=IGNORE_LABEL)
  return out


@dataclasses.dataclass(frozen=True)
class _EvalRecord(grain.transforms.Map):
  """Index -> record; indices past the end give an all-ignore record of the same shape.

  With `pad_to`, images and labels of varying sizes are padded to one shape
  (the padding is ignored by the metrics).
  """
  source: object
  length: int
  pad_to: tuple[int, ...] = ()

  def map(self, index: int) -> dict:
    record = dict(self.source[min(index, self.length - 1)])
    if "label" not in record:
      raise data.DataError("The evaluation split has no labels (e.g. a test split); evaluate on "
                           "a labelled split or use segjax.predict.")
    if self.pad_to:
      record = pad_record(record, self.pad_to, "data.eval")
    if index >= self.length:
      record = {"image": np.zeros_like(record["image"]),
                "label": np.full_like(record["label"], IGNORE_LABEL)}
    return record


def eval_dataset(config: ml_collections.ConfigDict, *, process_index: int,
                 process_count: int) -> tuple[grain.MapDataset, int]:
  """Local batches covering the evaluation split once, and the number of real examples.

  The split is padded to a whole number of global batches with ignore-only
  records, which the confusion matrix does not count.
  """
  source = data.build_source(config.data.eval, "data.eval")
  length = len(source)
  if length == 0:
    raise data.DataError(f"The evaluation split (config.data.eval = "
                         f"{config.data.eval.to_dict()}) is empty.")
  global_batch = config.eval_batch_size
  padded = -(-length // global_batch) * global_batch
  pad_to = tuple(config.data.eval.get("pad_to", ()))
  ds = grain.MapDataset.range(padded).map(_EvalRecord(source, length, pad_to))
  return _process_slice(ds, global_batch, process_index, process_count), length
