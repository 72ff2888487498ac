"""Rounds of self-training (CBST): make pseudo labels, train on them, again from the new model.

  python -m segjax.tools.self_training_rounds --config=configs/pseudo_label.py \
      --workdir=runs/rounds --init_from=runs/adapt --rounds=3 --steps_per_round=500 \
      [--checkpoint=latest] [--config.adapt.pl_threshold=cbst --config.adapt.lambda_adv=0]

Round r = 0, 1, ... in WORKDIR/round_<r>/:
  1. pseudo_labels/: `segjax.tools.make_pseudo_labels` with
     config.adapt.pl_round = r (CBST's portion grows a step each round) from
     the model of the round before: --init_from (a trained run's workdir,
     optionally :latest, :best or :STEP) for round 0, else round r-1's
     training run at --checkpoint;
  2. train/: a fresh run of the config's method (one training on pseudo
     labels, e.g. pseudo_label) for --steps_per_round steps, its segmenter
     initialised from that same model (config.init_from), on those labels
     (config.data.target.pseudo_labels); the optimizer and its schedule start
     afresh each round, as in CBST.
The config must describe the initial run's model and optimizer (the
checkpoints are restored into its states). A rerun of the command resumes: a
round is finished when train/final_metrics.json exists, its pseudo labels when
pseudo_labels/thresholds.json does; unfinished steps resume where they stopped.
At the end, a table per round: the thresholds, the share of target pixels
labelled, and the final target mIoU. One process (the devices of this host).
"""

import copy
import json
import os
from collections.abc import Callable

import ml_collections
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from segjax import cli, errors, methods, reporting, states, train
from segjax.data import pseudo_label_files
from segjax.tools import make_pseudo_labels

FLAGS = flags.FLAGS
FINAL_METRICS = "final_metrics.json"


def round_dirs(workdir: str, round_index: int) -> tuple[str, str]:
  """(pseudo-label folder, training workdir) of round `round_index`."""
  round_dir = os.path.join(workdir, f"round_{round_index}")
  return os.path.join(round_dir, "pseudo_labels"), os.path.join(round_dir, "train")


def round_config(config: ml_collections.ConfigDict, round_index: int, labels: str, model: str,
                 steps_per_round: int) -> ml_collections.ConfigDict:
  """`config` for round `round_index`: its portion, its labels, its initial model and length."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.adapt.pl_round = round_index
    config.data.target.pseudo_labels = labels
    config.init_from = model
    config.num_train_steps = steps_per_round
  return config


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def run_rounds(config: ml_collections.ConfigDict, workdir: str, init_from: str, rounds: int,
               steps_per_round: int, checkpoint: str = "latest",
               progress: Callable = tqdm.tqdm) -> list[dict]:
  """Runs (or finishes) `rounds` rounds in `workdir`; a summary per round."""
  if rounds <= 0 or steps_per_round <= 0:
    raise errors.ConfigError(f"--rounds={rounds} and --steps_per_round={steps_per_round} must be "
                             "positive.")
  if not methods.method_class(config.adapt.method).target_labels:
    raise errors.ConfigError(f"adapt.method={config.adapt.method!r} does not train on pseudo "
                             "labels; use a config of one that does, e.g. configs/pseudo_label.py.")
  if not init_from:
    raise errors.ConfigError("--init_from: expected the workdir of the trained run that makes "
                             "round 0's pseudo labels.")
  model = init_from
  summaries = []
  for r in range(rounds):
    labels, run_dir = round_dirs(workdir, r)
    config_r = round_config(config, r, labels, model, steps_per_round)
    if os.path.isfile(os.path.join(run_dir, FINAL_METRICS)):
      logging.info("Round %d is finished (%s exists).", r, os.path.join(run_dir, FINAL_METRICS))
    else:
      if os.path.isfile(os.path.join(labels, pseudo_label_files.THRESHOLDS_FILE)):
        logging.info("Round %d: the pseudo labels in %s are complete.", r, labels)
      else:
        model_workdir, choice = states.parse_init_from(model)
        logging.info("Round %d: pseudo labels from %s (checkpoint %s) in %s.", r, model_workdir,
                     choice, labels)
        make_pseudo_labels.make_pseudo_labels(config_r, model_workdir, choice, labels, progress)
      logging.info("Round %d: training %d steps in %s.", r, steps_per_round, run_dir)
      train.train_and_evaluate(config_r, run_dir)
    report = _read_json(os.path.join(labels, pseudo_label_files.THRESHOLDS_FILE))
    final = _read_json(os.path.join(run_dir, FINAL_METRICS))
    summaries.append({
        "round": r, "kind": report["kind"], "portion": report["portion"],
        "labelled": 1 - report["ignored_pixels"] / max(report["total_pixels"], 1),
        "from": f"{report['checkpoint']['workdir']}:{report['checkpoint']['step']}",
        "miou": final.get("eval/miou")})
    model = f"{run_dir}:{checkpoint}"
  return summaries


def format_table(summaries: list[dict]) -> str:
  lines = [f"{'round':<7}{'thresholds':<16}{'labelled %':>11}{'mIoU %':>9}  pseudo labels from",
           "-" * 72]
  for s in summaries:
    kind = s["kind"] if s["portion"] is None else f"{s['kind']} p={s['portion']:.2f}"
    miou = f"{100 * s['miou']:9.2f}" if s["miou"] is not None else f"{'n/a':>9}"
    lines.append(f"{s['round']:<7}{kind:<16}{100 * s['labelled']:11.2f}{miou}  {s['from']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_libraries()
  summaries = run_rounds(FLAGS.config, FLAGS.workdir, FLAGS.init_from, FLAGS.rounds,
                         FLAGS.steps_per_round, FLAGS.checkpoint)
  print(format_table(summaries), flush=True)


def define_flags():
  """The command's flags, defined when it runs: absl refuses a flag defined twice in a process."""
  config_flags.DEFINE_config_file("config", None, "The rounds' configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Folder of the rounds (round_<r>/pseudo_labels, train).")
  flags.DEFINE_string("init_from", None,
                      "The trained run making round 0's pseudo labels: WORKDIR[:latest|best|STEP].")
  flags.DEFINE_integer("rounds", 3, "Number of rounds.")
  flags.DEFINE_integer("steps_per_round", None, "Training steps of each round.")
  flags.DEFINE_string("checkpoint", "latest",
                      "Checkpoint of each round's run making the next round's labels: 'latest', "
                      "'best' or a step.")
  flags.mark_flags_as_required(["config", "workdir", "init_from", "steps_per_round"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
