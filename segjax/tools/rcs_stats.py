"""Writes the per-image class pixel counts of the source labels: rare-class sampling's statistics.

  python -m segjax.tools.rcs_stats --config=configs/daformer.py:gta5=ROOT,cityscapes=ROOT \
      --out=runs/gta5_rcs_stats.json

then train with `--config.data.rcs.stats=runs/gta5_rcs_stats.json` (without
it, a run with rare-class sampling computes them at its first start and keeps
them in its workdir as rcs_stats.json). Reads `data.source` as training does,
every example, and writes the record `segjax.data.rare_class` describes.
Interrupted, it continues from the partial record at --out when run again.
Prints each class's pixel share, images over `data.rcs.min_pixels` and
sampling probability at `data.rcs.temperature`.
"""

from absl import app, flags
from ml_collections import config_flags

from segjax import cli
from segjax.data import rare_class
from segjax.tools import data_cli

FLAGS = flags.FLAGS


def format_table(record: dict, temperature: float, min_pixels: int) -> str:
  sampler = rare_class.Sampler(record["counts"], record["class_names"], temperature, min_pixels)
  probs = dict(zip(sampler.classes.tolist(), sampler.probs.tolist()))
  totals = [sum(row[c] for row in record["counts"]) for c in range(len(record["class_names"]))]
  lines = [f"{record['field']}: {record['dataset']}: {record['num_images']} images; sampling "
           f"at temperature {temperature}, images with more than {min_pixels} pixels of a class.",
           f"  {'class':<16} {'share':>8} {'images':>7} {'p':>8}"]
  for c, name in enumerate(record["class_names"]):
    images = len(sampler.images.get(c, ()))
    lines.append(f"  {name:<16} {totals[c] / max(sum(totals), 1):>8.5f} {images:>7d} "
                 f"{probs.get(c, 0.0):>8.5f}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  [(field, source)] = data_cli.dataset_configs(FLAGS.config, ["data.source"], "--config")
  record = rare_class.compute(source, field, FLAGS.out)
  rcs = FLAGS.config.data.rcs
  print(format_table(record, rcs.temperature or 0.01, rcs.min_pixels))
  print(f"Wrote {FLAGS.out}.")


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
  flags.DEFINE_string("out", None, "The JSON file to write (or to continue).")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
