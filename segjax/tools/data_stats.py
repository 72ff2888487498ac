"""Class statistics and sample images of a config's dataset: the seed's data figures.

  python -m segjax.tools.data_stats --config=configs/adapt.py --out=runs/data_stats \
      [--field=data.source] [--max_examples=0] [--num_images=8]

Reads the dataset at `--field` as a run does (from its cache when one is
complete), `--max_examples` evenly spaced examples of it (0: all), and writes
to `--out`:

  class_distribution.png  the fraction of labelled pixels per class, as bars in
                          the dataset's palette; the share of ignored pixels
                          (255, not counted in the fractions) is in the title
  samples.png             `--num_images` evenly spaced examples, each beside its
                          colour-coded label (ignored pixels black)
  class_stats.json        pixel counts per class, ignored pixels, the number of
                          images and, per class, the fraction of images that
                          contain it

and prints the per-class table. Each file is written to a temporary name and
renamed. Works for the built-in street scenes (`--config=configs/adapt.py`)
and for the real datasets; an example that cannot be read stops it (see
`python -m segjax.tools.check_data`) unless the config says on_error='skip'.
"""

import json
import os

import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from ml_collections import config_flags
from PIL import Image

from segjax import cli, data, errors, reporting
from segjax.data import files
from segjax.tools import data_cli

FLAGS = flags.FLAGS

STATS_FILE = "class_stats.json"
DISTRIBUTION_FILE = "class_distribution.png"
SAMPLES_FILE = "samples.png"
PANEL_WIDTH = 512  # Pixels of each panel of samples.png at most.


def _read(source, index: int) -> dict | None:
  """Example `index`, or None if it is unreadable and the source's policy is to skip."""
  if not isinstance(source, files.FileSource):
    return source[index]
  try:
    return source.load(index)  # Not source[index], which would count the next one twice.
  except files.DataError as e:
    if source.on_error != "skip":
      raise
    logging.warning("%s: skipping example %d: %s", source.name, index, e)
    return None


def class_stats(source, num_classes: int, indices: list[int], keep: set[int],
                progress=tqdm.tqdm) -> tuple[dict, dict[int, dict]]:
  """Counts of the labels of `source[indices]`, and the records of the indices in `keep`.

  Returns ({'num_images', 'num_skipped', 'total_pixels', 'ignored_pixels',
  'class_pixels', 'class_images'}, {index: record}); pixels with a label
  outside range(num_classes) (255) count as ignored.
  """
  class_pixels = np.zeros(num_classes, np.int64)
  class_images = np.zeros(num_classes, np.int64)
  total = num_images = skipped = 0
  kept = {}
  for index in progress(indices, desc="examples", unit="img"):
    record = _read(source, index)
    if record is None:
      skipped += 1
      continue
    if "label" not in record:
      raise errors.ConfigError(f"Example {index} has no label: the dataset is unlabelled; choose a "
                               "labelled field with --field.")
    counts = np.bincount(record["label"].ravel(), minlength=256)[:num_classes]
    class_pixels += counts
    class_images += counts > 0
    total += record["label"].size
    num_images += 1
    if index in keep:
      kept[index] = record
  counts = dict(num_images=num_images, num_skipped=skipped, total_pixels=total,
                ignored_pixels=total - int(class_pixels.sum()),
                class_pixels=class_pixels.tolist(), class_images=class_images.tolist())
  return counts, kept


def stats_record(counts: dict, class_names: tuple[str, ...], field: str,
                 description: str) -> dict:
  """The content of class_stats.json."""
  labelled = counts["total_pixels"] - counts["ignored_pixels"]
  classes = [dict(id=c, name=name, pixels=counts["class_pixels"][c],
                  fraction=counts["class_pixels"][c] / labelled if labelled else 0.0,
                  images=counts["class_images"][c],
                  image_frequency=(counts["class_images"][c] / counts["num_images"]
                                   if counts["num_images"] else 0.0))
             for c, name in enumerate(class_names)]
  return dict(field=field, dataset=description, num_images=counts["num_images"],
              num_skipped=counts["num_skipped"], total_pixels=counts["total_pixels"],
              labelled_pixels=labelled, ignored_pixels=counts["ignored_pixels"],
              classes=classes)


def _figure(width: float, height: float) -> Figure:
  """A figure drawn by the Agg backend (files only), outside pyplot's global state."""
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _save_figure(fig: Figure, path: str) -> None:
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
  os.replace(tmp, path)


def plot_distribution(stats: dict, palette: np.ndarray, path: str) -> None:
  """Bars of the fraction of labelled pixels per class, in the class colours."""
  names = [c["name"] for c in stats["classes"]]
  fractions = [c["fraction"] for c in stats["classes"]]
  fig = _figure(max(6.0, 0.5 * len(names) + 2), 4.5)
  ax = fig.subplots()
  bars = ax.bar(range(len(names)), fractions, color=palette[:len(names)] / 255.0,
                edgecolor="black", linewidth=0.5)
  ax.bar_label(bars, labels=[f"{100 * f:.2g}%" for f in fractions], fontsize=7)
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
  ax.set_ylabel("fraction of labelled pixels")
  ax.margins(y=0.1)
  ignored = stats["ignored_pixels"] / stats["total_pixels"] if stats["total_pixels"] else 0.0
  ax.set_title(f"{stats['field']}: {stats['dataset']}\n{stats['num_images']} images; "
               f"{ignored:.1%} of pixels ignored (label 255, not in the fractions)", fontsize=9)
  _save_figure(fig, path)


def _panel_size(image: np.ndarray) -> tuple[int, int]:
  """(height, width) of the image's panel: at most PANEL_WIDTH wide, same aspect."""
  height, width = image.shape[:2]
  scale = min(1.0, PANEL_WIDTH / width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def _resized(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
  height, width = size
  if array.shape[:2] == (height, width):
    return array
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


def plot_samples(records: dict[int, dict], class_names: tuple[str, ...], palette: np.ndarray,
                 path: str) -> None:
  """One row per record: the image and its colour-coded label, with a legend of the classes.

  Labels kept at full resolution (resize_labels=False) are shown at their image's size.
  """
  rows = sorted(records)
  height, width = _panel_size(records[rows[0]]["image"])
  fig = _figure(8, len(rows) * 4 * height / width + 0.4)
  axes = fig.subplots(len(rows), 2, squeeze=False)
  for (image_ax, label_ax), index in zip(axes, rows):
    record = records[index]
    size = _panel_size(record["image"])
    image_ax.imshow(_resized(record["image"], size, Image.BILINEAR))
    label_ax.imshow(_resized(reporting.colorize(record["label"], palette), size, Image.NEAREST))
    image_ax.set_title(f"example {index}", fontsize=8)
    label_ax.set_title("label", fontsize=8)
    image_ax.axis("off")
    label_ax.axis("off")
  handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="black", label=name)
             for c, name in enumerate(class_names)]
  handles.append(Patch(facecolor="black", label="ignored"))
  fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
             ncol=min(len(handles), 7), fontsize=7, frameon=False)
  fig.tight_layout()
  _save_figure(fig, path)


def _write_json(record: dict, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def format_table(stats: dict) -> str:
  lines = [f"{stats['field']}: {stats['dataset']}: {stats['num_images']} images"
           + (f" ({stats['num_skipped']} unreadable, skipped)" if stats["num_skipped"] else "")
           + f", {stats['ignored_pixels'] / max(stats['total_pixels'], 1):.1%} of pixels ignored.",
           f"  {'class':<16} {'pixels':>8} {'in images':>10}"]
  for c in stats["classes"]:
    lines.append(f"  {c['name']:<16} {c['fraction']:>8.2%} {c['image_frequency']:>10.1%}")
  return "\n".join(lines)


def write_stats(config: ml_collections.ConfigDict, field: str, out_dir: str,
                max_examples: int = 0, num_images: int = 8, progress=tqdm.tqdm) -> dict:
  """Writes the figures and class_stats.json of the dataset at `field` to `out_dir`."""
  [(field, sub)] = data_cli.dataset_configs(config, [field], "--field")
  source = data.build_source(sub, field)
  info = data.dataset_info(sub, field)
  indices = data.evenly_spaced(len(source), max_examples)
  shown = ([indices[i] for i in data.evenly_spaced(len(indices), num_images)] if num_images > 0
           else [])
  counts, records = class_stats(source, info.num_classes, indices, set(shown), progress)
  if not counts["num_images"]:
    raise files.DataError(f"{field}: none of the {len(indices)} examples could be read.")
  stats = stats_record(counts, info.class_names, field, data.describe(sub))
  os.makedirs(out_dir, exist_ok=True)
  _write_json(stats, os.path.join(out_dir, STATS_FILE))
  plot_distribution(stats, info.palette, os.path.join(out_dir, DISTRIBUTION_FILE))
  if records:
    plot_samples(records, info.class_names, info.palette, os.path.join(out_dir, SAMPLES_FILE))
  return stats


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for name in ("max_examples", "num_images"):
    if FLAGS[name].value < 0:
      raise app.UsageError(f"--{name}={FLAGS[name].value}; expected 0 or more.")
  stats = write_stats(FLAGS.config, FLAGS.field, FLAGS.out, FLAGS.max_examples, FLAGS.num_images)
  print(format_table(stats))
  written = [STATS_FILE, DISTRIBUTION_FILE] + ([SAMPLES_FILE] if FLAGS.num_images else [])
  print("Wrote " + ", ".join(os.path.join(FLAGS.out, name) for name in written) + ".")


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
  flags.DEFINE_string("out", None, "Directory for the figures and class_stats.json.")
  flags.DEFINE_string("field", "data.source", "Dataset field to describe.")
  flags.DEFINE_integer("max_examples", 0, "Examples read, evenly spaced (0: all).")
  flags.DEFINE_integer("num_images", 8, "Examples shown in samples.png (0: none).")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
