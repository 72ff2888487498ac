"""Pseudo labels of the target training images by a trained checkpoint (BDL, the seed; CBST).

  python -m segjax.tools.make_pseudo_labels --config=configs/pseudo_label.py --workdir=runs/adapt \
      [--checkpoint=latest|best|STEP] --out=runs/adapt/pseudo_labels
  python -m segjax.main --config=configs/pseudo_label.py --workdir=runs/pseudo_label \
      --config.data.target.pseudo_labels=runs/adapt/pseudo_labels [--config.init_from=runs/adapt]

--config has the trained run's model (which restores the checkpoint), any field
overridable; the thresholds come from config.adapt, the fields of adapt.method
'pseudo_label' (configs/pseudo_label.py; with another method's config, the
trained run's own, they take their defaults):
  pl_threshold='median' (BDL, the seed): per class, the median confidence (max
      softmax probability) of the pixels predicted as that class, capped at
      pl_cap (0.9); a pixel keeps its prediction when its confidence reaches
      its class's threshold, else it is ignored (255);
  pl_threshold='cbst' (CBST): class-balanced thresholds k_c keeping the most
      confident portion p = min(pl_portion + pl_round * pl_portion_step,
      pl_portion_max) of each class's pixels (the portion grows with the
      self-training round; defaults 0.2, 0.05, 0.5); a pixel is labelled
      argmax_c prob_c / k_c where that ratio reaches 1;
  pl_scope='dataset': thresholds from every pixel of the target set (BDL's
      SSL.py, CBST), through per-class histograms (exact to 2^-16,
      `segjax.pseudo_labels`); 'image': each image's thresholds from its own
      pixels, exactly (the seed's createpseudolabels.py).
The segmenter of the checkpoint (restored read-only) predicts data.target, the
training split at its working resolution, in order and without augmentation,
in inference mode (BatchNorm statistics, no dropout) with config.inference
(flip or scales: averaged probabilities), data-parallel over the local
devices in fixed batches of eval_batch_size.

Output, in --out:
  statistics.npz  dataset scope: the histograms of pass 1 over every image;
  <name>.png      pass 2: each image's pseudo label (train ids, 255 ignored),
                  named as `segjax.data.pseudo_label_files.label_names` says:
                  a file's path under the dataset root (Cityscapes:
                  leftImg8bit/train/<city>/<stem>.png), else the index
                  (000000.png, ... for the built-in scenes); with the image
                  scope, the image's thresholds are in the PNG's text chunk
                  'thresholds' (null for classes it does not predict);
  thresholds.json written last, marking the folder complete: the thresholds
                  per class (image scope: their mean, min and max over the
                  images predicting the class), kind, scope, cap, portion and
                  round, the checkpoint (workdir, step), the target
                  set and inference settings, the labelled pixels per class,
                  the ignored and total pixels and the number of images.
It resumes and is deterministic. Files are written under temporary names and
renamed; a rerun of the command keeps the PNGs already written (it predicts
only the batches missing some), reuses statistics.npz instead of pass 1, and
writes the bytes an uninterrupted run writes (batches are fixed, so each image
is predicted in the same company). settings.json, written first, holds what
the labels depend on: a rerun with another checkpoint step, thresholds, target
set or inference is refused rather than mixing labels in one folder.

Exit status: 0 when the folder is complete; 1 for a checkpoint or data problem
(the message says which).
"""

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, PngImagePlugin

from segjax import (checkpointing, cli, data, errors, evaluate, inference, methods, parallel,
                    pseudo_labels, reporting, steps)
from segjax.data import files, pseudo_label_files
from segjax.losses import IGNORE_LABEL
from segjax.methods import base

FLAGS = flags.FLAGS
SETTINGS_FILE = "settings.json"
STATISTICS_FILE = "statistics.npz"
THRESHOLDS_FILE = pseudo_label_files.THRESHOLDS_FILE
PNG_TEXT_KEY = "thresholds"
THRESHOLD_KINDS = ("median", "cbst")
SCOPES = ("dataset", "image")


def cbst_portion(adapt: ml_collections.ConfigDict) -> float:
  """CBST's target portion of round adapt.pl_round: min(init + round * step, max)."""
  return min(adapt.pl_portion + adapt.pl_round * adapt.pl_portion_step, adapt.pl_portion_max)


@dataclasses.dataclass(frozen=True)
class Policy:
  """How probabilities become thresholds and labels (config.adapt.pl_*)."""
  kind: str
  scope: str
  num_classes: int
  cap: float | None = None  # 'median' only.
  portion: float | None = None  # 'cbst' only.
  round: int = 0

  @classmethod
  def from_config(cls, adapt: ml_collections.ConfigDict, num_classes: int) -> "Policy":
    kind, scope = adapt.pl_threshold, adapt.pl_scope
    if kind not in THRESHOLD_KINDS:
      raise errors.ConfigError(f"adapt.pl_threshold={kind!r}; expected one of {THRESHOLD_KINDS}.")
    if scope not in SCOPES:
      raise errors.ConfigError(f"adapt.pl_scope={scope!r}; expected one of {SCOPES}.")
    if not 0 < adapt.pl_cap <= 1:
      raise errors.ConfigError(f"adapt.pl_cap={adapt.pl_cap} must be in (0, 1].")
    for field in ("pl_portion", "pl_portion_max"):
      if not 0 < adapt[field] <= 1:
        raise errors.ConfigError(f"adapt.{field}={adapt[field]} must be in (0, 1].")
    if adapt.pl_portion_step < 0 or adapt.pl_round < 0:
      raise errors.ConfigError(f"adapt.pl_portion_step={adapt.pl_portion_step} and adapt.pl_round="
                               f"{adapt.pl_round} must be >= 0.")
    if kind == "median":
      return cls(kind, scope, num_classes, cap=float(adapt.pl_cap), round=int(adapt.pl_round))
    return cls(kind, scope, num_classes, portion=float(cbst_portion(adapt)),
               round=int(adapt.pl_round))

  def describe(self) -> dict:
    return {"kind": self.kind, "scope": self.scope, "cap": self.cap, "portion": self.portion,
            "round": self.round}

  def thresholds_of(self, confidences: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Exact thresholds from explicit pixels (image scope)."""
    if self.kind == "median":
      return pseudo_labels.median_thresholds(confidences, predictions, self.num_classes, self.cap)
    return pseudo_labels.cbst_thresholds(confidences, predictions, self.num_classes, self.portion)

  def histogram_thresholds(self, histogram: pseudo_labels.ConfidenceHistogram) -> np.ndarray:
    """Thresholds from the histograms of a whole dataset (dataset scope)."""
    if self.kind == "median":
      return histogram.median_thresholds(self.cap)
    return histogram.cbst_thresholds(self.portion)

  def apply(self, probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    if self.kind == "median":
      return pseudo_labels.apply_median(probs, thresholds)
    return pseudo_labels.apply_cbst(probs, thresholds)


def _write_json(path: str, content: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(content, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _write_png(path: str, labels: np.ndarray, text: str | None = None) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  info = None
  if text is not None:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_TEXT_KEY, text)
  tmp = path + ".tmp"
  Image.fromarray(labels).save(tmp, format="PNG", pnginfo=info)
  os.replace(tmp, path)


def _read_png(path: str) -> tuple[np.ndarray, list | None]:
  """A pseudo label written by `_write_png`, and its image thresholds if it has some."""
  with Image.open(path) as image:
    image.load()
    text = image.text.get(PNG_TEXT_KEY)
    return np.asarray(image), (json.loads(text) if text is not None else None)


def _check_settings(out: str, settings: dict) -> None:
  """Writes settings.json, or refuses a folder whose labels were made with other settings."""
  path = os.path.join(out, SETTINGS_FILE)
  settings = json.loads(json.dumps(settings))
  if not os.path.isfile(path):
    _write_json(path, settings)
    return
  with open(path, encoding="utf-8") as f:
    existing = json.load(f)
  if existing != settings:
    differing = sorted(key for key in {*existing, *settings}
                       if existing.get(key) != settings.get(key))
    details = "; ".join(f"{key}: {existing.get(key)} there, {settings.get(key)} now"
                        for key in differing)
    raise files.DataError(f"--out={out} holds pseudo labels made with other settings "
                          f"({details}). Give another --out, or delete it to start again.")


def _dataset_histogram(out: str, batches: Sequence[range], predict: Callable,
                       num_classes: int, progress: Callable):
  """Pass 1: the confidence histograms of every image, from statistics.npz when saved."""
  path = os.path.join(out, STATISTICS_FILE)
  if os.path.isfile(path):
    with np.load(path) as saved:
      counts = saved["counts"]
    if counts.shape != (num_classes, pseudo_labels.NUM_BINS):
      raise files.DataError(f"{path} holds statistics of shape {counts.shape}, not "
                            f"{(num_classes, pseudo_labels.NUM_BINS)}; delete it.")
    logging.info("Pass 1: statistics read from %s.", path)
    return pseudo_labels.ConfidenceHistogram(num_classes, counts), "reused"
  histogram = pseudo_labels.ConfidenceHistogram(num_classes)
  for batch in progress(batches, desc="pass 1: statistics", unit="batch"):
    for probs in predict(list(batch)):
      histogram.add(probs.max(axis=-1), probs.argmax(axis=-1))
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez_compressed(f, counts=histogram.counts)
  os.replace(tmp, path)
  return histogram, "computed"


def _image_thresholds_summary(per_image: list[list], class_names: Sequence[str]) -> dict:
  summary = {}
  for c, name in enumerate(class_names):
    values = [thresholds[c] for thresholds in per_image if thresholds[c] is not None]
    summary[name] = ({"mean": float(np.mean(values)), "min": float(np.min(values)),
                      "max": float(np.max(values)), "images": len(values)} if values else None)
  return summary


def write_pseudo_labels(out: str, names: Sequence[str], predict: Callable[[list[int]], np.ndarray],
                        policy: Policy, settings: dict, class_names: Sequence[str],
                        batch_size: int, progress: Callable = tqdm.tqdm) -> tuple[dict, dict]:
  """Fills `out` (see the module docstring) with the pseudo labels of `names`' images.

  `predict(indices)` returns the (n, H, W, num_classes) probabilities of those
  images; it is called on the fixed batches [k * batch_size, (k + 1) *
  batch_size). `settings` (JSON-serialisable) is what the labels depend on.
  Returns thresholds.json's content and what this call did: PNGs written and
  kept, and whether pass 1 ran ('computed'), was read back ('reused') or is
  not needed ('none').
  """
  os.makedirs(out, exist_ok=True)
  _check_settings(out, settings)
  thresholds_path = os.path.join(out, THRESHOLDS_FILE)
  if os.path.isfile(thresholds_path):
    with open(thresholds_path, encoding="utf-8") as f:
      logging.info("%s is complete (%s exists): nothing to do.", out, THRESHOLDS_FILE)
      return json.load(f), {"written": 0, "kept": len(names), "statistics": "none"}
  batches = [range(start, min(start + batch_size, len(names)))
             for start in range(0, len(names), batch_size)]
  thresholds, statistics = None, "none"
  if policy.scope == "dataset":
    histogram, statistics = _dataset_histogram(out, batches, predict, policy.num_classes,
                                               progress)
    thresholds = policy.histogram_thresholds(histogram)

  pixel_counts = np.zeros(256, np.int64)
  per_image: list[list | None] = [None] * len(names)
  written = 0
  for batch in progress(batches, desc="pass 2: pseudo labels", unit="batch"):
    paths = {i: os.path.join(out, names[i] + ".png") for i in batch}
    missing = [i for i in batch if not os.path.isfile(paths[i])]
    probs = predict(list(batch)) if missing else None
    for i in batch:
      if i in missing:
        image_probs = probs[i - batch.start]
        image_thresholds, text = thresholds, None
        if policy.scope == "image":
          confidences, predictions = image_probs.max(axis=-1), image_probs.argmax(axis=-1)
          image_thresholds = policy.thresholds_of(confidences, predictions)
          predicted = np.bincount(predictions.ravel(), minlength=policy.num_classes) > 0
          per_image[i] = [float(t) if present else None
                          for t, present in zip(image_thresholds, predicted)]
          text = json.dumps(per_image[i])
        labels = policy.apply(image_probs, image_thresholds)
        _write_png(paths[i], labels, text)
        written += 1
      else:
        labels, per_image[i] = _read_png(paths[i])
      pixel_counts += np.bincount(labels.ravel(), minlength=256)

  report = {
      **json.loads(json.dumps(settings)),
      "thresholds": (None if thresholds is None else
                     {name: float(t) for name, t in zip(class_names, thresholds)}),
      "image_thresholds": (_image_thresholds_summary(per_image, class_names)
                           if policy.scope == "image" else None),
      "labelled_pixels": {name: int(n) for name, n in zip(class_names, pixel_counts)},
      "ignored_pixels": int(pixel_counts[IGNORE_LABEL]),
      "total_pixels": int(pixel_counts.sum()),
  }
  _write_json(thresholds_path, report)
  activity = {"written": written, "kept": len(names) - written, "statistics": statistics}
  logging.info("Wrote %d pseudo labels (%d were already there) and %s.", written,
               activity["kept"], thresholds_path)
  return report, activity


def read_target_image(source, index: int) -> np.ndarray:
  """Image `index` of a target source; a file that cannot be read is an error, never replaced."""
  record = source.load(index) if isinstance(source, files.FileSource) else source[index]
  return record["image"]


class CheckpointPredictor:
  """(indices) -> (n, H, W, C) float32 probabilities of the target images, from a checkpoint.

  The segmenter is restored on the first call (a complete folder needs none),
  read-only, replicated over `mesh`; each call predicts one batch of
  `batch_size` images (the last one padded), data-parallel.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step: int, images,
               batch_size: int, mesh: Mesh):
    self._config = config
    self._workdir = workdir
    self._step = step
    self._images = images
    self._batch_size = batch_size
    self._mesh = mesh
    self._state = None
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    tta = inference.Inference.from_config(config.get("inference"))

    def probabilities(state, images):
      def logits_fn(x):
        outputs, _ = base.segment(state, state.params, state.batch_stats, x, None, train=False)
        return outputs["logits"]
      scores = inference.predict(logits_fn, steps.preprocess(images, mean, std),
                                 images.shape[1:3], tta)
      return scores if tta.returns_probs else jax.nn.softmax(scores, axis=-1)

    self._probabilities = parallel.data_parallel(
        probabilities, mesh, in_specs=(P(), P(parallel.DATA_AXIS)),
        out_specs=P(parallel.DATA_AXIS))

  def __call__(self, indices: list[int]) -> np.ndarray:
    if self._state is None:
      self._state, _ = evaluate.restore_segmenter(self._config, self._workdir, str(self._step),
                                                  self._mesh)
    images = [read_target_image(self._images, i) for i in indices]
    if len({image.shape for image in images}) > 1:
      raise files.DataError(
          f"data.target: images {indices[0]}-{indices[-1]} differ in size "
          f"({sorted({image.shape[:2] for image in images})}); set data.target.resize to "
          "the working resolution.")
    padding = [np.zeros_like(images[0])] * (self._batch_size - len(images))
    batch = jax.device_put(np.stack(images + padding),
                           NamedSharding(self._mesh, P(parallel.DATA_AXIS)))
    probs = self._probabilities(self._state, batch)
    return np.asarray(jax.device_get(probs))[:len(indices)]


def _without_pseudo_labels(target: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """data.target as a plain dataset: the labels being made must not depend on older ones."""
  plain = ml_collections.ConfigDict(target.to_dict())
  if "pseudo_labels" in plain:
    del plain["pseudo_labels"]
  return plain


def make_pseudo_labels(config: ml_collections.ConfigDict, workdir: str,
                       checkpoint: str = "latest", out: str = "",
                       progress: Callable = tqdm.tqdm) -> tuple[dict, dict]:
  """The pseudo labels of data.target by the checkpoint `checkpoint` of `workdir`, in `out`.

  Returns thresholds.json's content and what was done (`write_pseudo_labels`).
  """
  if not out:
    raise errors.ConfigError("--out: expected the folder to write the pseudo labels to.")
  info = data.dataset_info(config.data.source, "data.source")
  if data.dataset_info(config.data.target, "data.target").class_names != info.class_names:
    raise files.DataError(f"data.target ({config.data.target.name}) and data.source "
                          f"({config.data.source.name}) do not share one label space: the "
                          "checkpoint predicts data.source's classes.")
  # A pseudo_label config's thresholds; another method's config (the trained run's) has none of
  # its fields and gets their defaults.
  policy = Policy.from_config(methods.fields_of("pseudo_label", config.adapt), info.num_classes)
  evaluate.check_model(config)
  devices = jax.local_devices()
  if config.eval_batch_size <= 0 or config.eval_batch_size % len(devices):
    raise errors.ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be a positive "
                             f"multiple of the {len(devices)} local devices.")
  target = _without_pseudo_labels(config.data.target)
  names = pseudo_label_files.label_names(
      target, data.build_source(target, "data.target", use_cache=False))
  images = data.build_source(target, "data.target")
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1,
                                    read_only=True)
  try:
    step = ckpt.select_step(checkpoint)
  finally:
    ckpt.close()
  settings = {
      **policy.describe(),
      "classes": list(info.class_names),
      "num_images": len(names),
      "checkpoint": {"workdir": os.path.abspath(workdir), "step": int(step)},
      "target": target.to_dict(),
      "inference": config.inference.to_dict() if "inference" in config else {},
      "mean": list(config.data.mean), "std": list(config.data.std),
  }
  predict = CheckpointPredictor(config, workdir, step, images, config.eval_batch_size,
                                Mesh(np.asarray(devices), (parallel.DATA_AXIS,)))
  logging.info("Pseudo labels of %d target images by step %d of %s (%s thresholds, %s scope) "
               "in %s.", len(names), step, workdir, policy.kind, policy.scope, out)
  return write_pseudo_labels(out, names, predict, policy, settings, info.class_names,
                             config.eval_batch_size, progress)


def format_summary(out: str, report: dict, activity: dict) -> str:
  """The console report: what was done, then the thresholds and labelled pixels per class."""
  total = max(report["total_pixels"], 1)
  lines = [f"{out}: pseudo labels of {report['num_images']} images by step "
           f"{report['checkpoint']['step']} of {report['checkpoint']['workdir']}",
           f"  {report['kind']} thresholds, {report['scope']} scope"
           + (f", portion {report['portion']:.3f} (round {report['round']})"
              if report["portion"] is not None else f", cap {report['cap']}"),
           f"  {activity['written']} written, {activity['kept']} already there; pass 1 "
           f"statistics: {activity['statistics']}",
           f"  labelled {1 - report['ignored_pixels'] / total:.1%} of the pixels",
           f"  {'class':<16}{'threshold':>10}{'labelled %':>12}"]
  for name, count in report["labelled_pixels"].items():
    if report["thresholds"] is not None:
      threshold = f"{report['thresholds'][name]:10.4f}"
    else:
      stats = report["image_thresholds"][name]
      threshold = f"{stats['mean']:10.4f}" if stats else f"{'-':>10}"
    lines.append(f"  {name:<16}{threshold}{100 * count / total:12.2f}")
  if report["thresholds"] is None:
    lines.append("  (image scope: the mean of the images' thresholds)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_libraries()
  report, activity = make_pseudo_labels(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.out)
  print(format_summary(FLAGS.out, report, activity), flush=True)


def define_flags():
  """The command's flags, defined when it runs: absl refuses a flag defined twice in a process."""
  cli.define_run_flags("trained")
  flags.DEFINE_string("out", None, "Folder for the pseudo labels (created; a rerun resumes).")
  flags.mark_flags_as_required(["config", "workdir", "out"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
