"""How right are pseudo labels: each class's precision and recall against the target's own labels.

  python -m segjax.tools.score_pseudo_labels --labels=runs/adapt/pseudo_labels [--out=scores.json]

A diagnostic for target training sets that do have labels (Cityscapes train,
the built-in scenes); training never reads those labels. The folder's
thresholds.json (`segjax.tools.make_pseudo_labels`) names the target set the
labels were made for, so no config is needed. Every pseudo label is compared
with the true label of its image, pixels whose true label is ignored (255)
left out, and per class c:

  labelled   the share of the pixels pseudo-labelled c
  precision  the share of those whose true label is c
  recall     the share of the pixels truly c that are pseudo-labelled c
             (an ignored pseudo label counts as a miss)
  mistaken   the other class most often given to pixels truly c, and the
             share of those pixels it got

and overall the coverage (the share of pixels given a pseudo label) and the
accuracy of the labelled ones; the JSON also holds the whole confusion
(counts[true class][pseudo label], the last column ignored). With --out the scores are written as JSON
(atomically). Exit status 1 when the folder is incomplete or the target set
has no labels.
"""

import os
from collections.abc import Callable

import ml_collections
import numpy as np
import tqdm
from absl import app, flags

from segjax import cli, data
from segjax.data import category_stats, files, pseudo_label_files
from segjax.losses import IGNORE_LABEL

FLAGS = flags.FLAGS


def confusion(truth: np.ndarray, pseudo: np.ndarray, num_classes: int) -> np.ndarray:
  """(C, C + 1) pixel counts [true class, pseudo label], the last column the ignored pseudo
  labels; pixels whose true label is ignored are left out."""
  valid = truth != IGNORE_LABEL
  if np.any(truth[valid] >= num_classes):
    raise files.DataError(f"a true label above {num_classes - 1}: "
                          f"{sorted(set(np.unique(truth[valid]).tolist()))}")
  pseudo = np.where(pseudo == IGNORE_LABEL, num_classes, pseudo)
  pairs = truth[valid].astype(np.int64) * (num_classes + 1) + pseudo[valid]
  return np.bincount(pairs, minlength=num_classes * (num_classes + 1)).reshape(
      num_classes, num_classes + 1)


def scores(counts: np.ndarray, class_names) -> dict:
  """Per-class labelled share, precision and recall, coverage and accuracy of a confusion."""
  num_classes = len(class_names)
  total = counts.sum()
  labelled = counts[:, :num_classes].sum(axis=0)
  correct = np.diag(counts[:, :num_classes])
  truly = counts.sum(axis=1)
  ratio = lambda a, b: float(a / b) if b else None  # None: nothing to measure.

  def mistaken(c: int) -> dict | None:
    wrong = counts[c, :num_classes].copy()
    wrong[c] = 0
    if not wrong.any():
      return None
    other = int(np.argmax(wrong))
    return {"class": class_names[other], "share": ratio(wrong[other], truly[c])}

  return {
      "classes": {name: {"labelled": ratio(labelled[c], total),
                         "precision": ratio(correct[c], labelled[c]),
                         "recall": ratio(correct[c], truly[c]),
                         "mistaken": mistaken(c)}
                  for c, name in enumerate(class_names)},
      "coverage": ratio(labelled.sum(), total),
      "accuracy": ratio(correct.sum(), labelled.sum()),
      "pixels": int(total),
      "confusion": counts.tolist(),
  }


def score(directory: str, progress: Callable = tqdm.tqdm) -> dict:
  """The scores of the pseudo labels in `directory` against their target set's labels."""
  report = pseudo_label_files.read_thresholds(directory, "--labels")
  target = ml_collections.ConfigDict(report["target"])
  images = data.build_source(target, "the pseudo labels' target set")
  class_names = report["classes"]
  names = pseudo_label_files.label_names(
      target, data.build_source(target, "the pseudo labels' target set", use_cache=False))
  if len(names) != report["num_images"]:
    raise files.DataError(f"--labels={directory} holds labels of {report['num_images']} images "
                          f"but its target set now has {len(names)}.")
  label_format = pseudo_label_files.label_format(len(class_names))
  load = getattr(images, "load", images.__getitem__)  # Never another image in its place.
  counts = np.zeros((len(class_names), len(class_names) + 1), np.int64)
  for i in progress(range(len(names)), desc="scoring", unit="image"):
    record = load(i)
    if "label" not in record:
      raise files.DataError(f"--labels={directory}: its target set ({target.get('name')}, split "
                            f"{target.get('split')}) has no labels to score against.")
    path = os.path.join(directory, names[i] + ".png")
    pseudo = files.read_label(path, label_format)
    if pseudo.shape != record["label"].shape:
      raise files.SizeMismatch(f"{path} is {pseudo.shape[1]}x{pseudo.shape[0]} but the true "
                               f"label is {record['label'].shape[1]}x{record['label'].shape[0]}.")
    counts += confusion(record["label"], pseudo, len(class_names))
  return {"labels": os.path.abspath(directory), "num_images": len(names),
          "checkpoint": report["checkpoint"], **scores(counts, class_names)}


def format_table(record: dict) -> str:
  show = lambda v: f"{100 * v:10.1f}" if v is not None else f"{'-':>10}"
  lines = [f"{record['labels']}: {record['num_images']} images; coverage "
           f"{100 * record['coverage']:.1f}% of the pixels, accuracy {100 * record['accuracy']:.1f}%",
           f"  {'class':<16}{'labelled %':>10}{'precision':>10}{'recall':>10}   mistaken for"]
  for name, c in record["classes"].items():
    wrong = (f"{c['mistaken']['class']} ({100 * c['mistaken']['share']:.1f}%)"
             if c["mistaken"] else "-")
    lines.append(f"  {name:<16}{show(c['labelled'])}{show(c['precision'])}{show(c['recall'])}"
                 f"   {wrong}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  record = score(FLAGS.labels)
  print(format_table(record))
  if FLAGS.out:
    category_stats.write(record, FLAGS.out)
    print(f"Wrote {FLAGS.out}.")


def define_flags():
  flags.DEFINE_string("labels", None, "A folder of segjax.tools.make_pseudo_labels.")
  flags.DEFINE_string("out", "", "A JSON file for the scores (optional).")
  flags.mark_flags_as_required(["labels"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
