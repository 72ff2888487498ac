"""Writes the per-class size statistics of the source labels: the priors of FCNs in the Wild's CA.

  python -m segjax.tools.category_stats --config=configs/fcn_wild.py:gta5=ROOT,cityscapes=ROOT \
      --out=runs/gta5_category_stats.json [--max_examples=0]

then train with `--config.adapt.category_stats=runs/gta5_category_stats.json`.

Reads `data.source` as training does (`segjax.data.build_source`: at the
working resolution, from the cache when one is complete; with on_error='skip'
an unreadable example is replaced by the next readable one, as in training),
`--max_examples` evenly spaced examples of it (0: all), and writes the
statistics `segjax.data.category_stats` describes (alpha, delta, gamma and
the number of images per class) as JSON, to a temporary name then renamed.
"""

from absl import app, flags
from ml_collections import config_flags

from segjax import cli
from segjax.data import category_stats
from segjax.tools import data_cli

FLAGS = flags.FLAGS


def format_table(record: dict) -> str:
  lines = [f"{record['field']}: {record['dataset']}: {record['num_images']} images.",
           f"  {'class':<16} {'alpha':>7} {'delta':>7} {'gamma':>7} {'images':>7}"]
  for c, name in enumerate(record["class_names"]):
    lines.append(f"  {name:<16} {record['alpha'][c]:>7.4f} {record['delta'][c]:>7.4f} "
                 f"{record['gamma'][c]:>7.4f} {record['images'][c]:>7d}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.max_examples < 0:
    raise app.UsageError(f"--max_examples={FLAGS.max_examples}; expected 0 or more.")
  [(field, source)] = data_cli.dataset_configs(FLAGS.config, ["data.source"], "--config")
  record = category_stats.compute(source, field, FLAGS.max_examples)
  category_stats.write(record, FLAGS.out)
  print(format_table(record))
  print(f"Wrote {FLAGS.out}.")


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
  flags.DEFINE_string("out", None, "The JSON file to write.")
  flags.DEFINE_integer("max_examples", 0, "Examples of data.source read, evenly spaced (0: all).")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
