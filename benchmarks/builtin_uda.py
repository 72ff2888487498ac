"""The built-in UDA benchmark: every adaptation method, with bounds, several seeds each.

  python benchmarks/builtin_uda.py --seeds 0 1 2 --out runs/builtin_uda
  python benchmarks/builtin_uda.py --configs source_only adapt oracle   # a subset
  python benchmarks/builtin_uda.py --report   # the table of the runs finished so far
  python benchmarks/builtin_uda.py --tiny --out /tmp/uda   # a smoke run, 2 steps (CI)

Runs `python -m segjax.main --config=configs/<name>.py --config.seed=<seed>`
one after another (so wall times are not inflated by sharing the CPU), then
prints a markdown table of target mIoU (mean and spread), per-class IoU and
wall time, and writes it beside the raw results (results.json). A finished run
(its final_metrics.json exists) is not run again, so an interrupted benchmark
resumes; an interrupted run resumes from its checkpoints, and since its wall
time then covers only the rest, the table's wall time comes from whole runs.
`pseudo_label` is its three-stage pipeline: the `adapt` run of the same seed,
`segjax.tools.make_pseudo_labels` from its final checkpoint, then the
pseudo-label run; its wall time counts the last two stages. `mpl` is the
`adapt` run of the same seed, then MPL with that run's model as the teacher
(`adapt.mpl_teacher_from`), as the real-time seed does; its wall time is the
second stage's. The pseudo labels' precision and recall per class
(`segjax.tools.score_pseudo_labels`, against the built-in target labels that
training never reads) go to pseudo_labels_seed<S>_scores.json.

--tiny runs the first seed of each config (by default source_only, the
quickest to compile) for two steps on tiny scenes (TINY) with XLA's
optimizations off, through the same code: what CI runs, so that the
benchmark keeps working.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CONFIGS = ("source_only", "adapt", "advent", "fcn_wild", "pseudo_label", "mpl", "self_training",
           "oracle")
# The transformer recipes: hours a seed on a 2-core CPU, so only when asked (--configs).
TRANSFORMER_CONFIGS = ("daformer", "hrda", "mic", "vfm_uda")
# --tiny: two steps on 32x64 scenes with a narrow network, like configs/test.py.
TINY = ["--config.num_train_steps=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
        "--config.batch_size=2", "--config.eval_batch_size=2", "--config.num_eval_samples=1",
        "--config.data.crop_size=(32, 64)", "--config.model.width=8", "--config.disc.width=8",
        *(f"--config.data.{split}.{field}={value}" for split in ("source", "target", "eval")
          for field, value in (("height", 32), ("width", 64), ("num_examples", 4)))]


def _pseudo_label_args(seed: int, out: str, extra: list[str]) -> list[str]:
  """Makes the pseudo labels of the `adapt` run of `seed`; returns the run's extra flags."""
  labels = os.path.join(out, f"pseudo_labels_seed{seed}")
  if not os.path.exists(os.path.join(labels, "thresholds.json")):
    cmd = [sys.executable, "-m", "segjax.tools.make_pseudo_labels",
           "--config=configs/pseudo_label.py", f"--workdir={os.path.join(out, f'adapt_seed{seed}')}",
           f"--out={labels}", f"--config.seed={seed}", *extra]
    print("$", " ".join(cmd), flush=True)
    with open(os.path.join(out, f"pseudo_labels_seed{seed}.log"), "w", encoding="utf-8") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
  scores = os.path.join(out, f"pseudo_labels_seed{seed}_scores.json")
  if not os.path.exists(scores):  # Their precision and recall against the true target labels.
    subprocess.run([sys.executable, "-m", "segjax.tools.score_pseudo_labels", f"--labels={labels}",
                    f"--out={scores}"], check=True, stdout=subprocess.DEVNULL)
  return [f"--config.data.target.pseudo_labels={labels}"]


def run(name: str, seed: int, out: str, extra: list[str]) -> dict:
  workdir = os.path.join(out, f"{name}_seed{seed}")
  final = os.path.join(workdir, "final_metrics.json")
  if os.path.exists(final):
    with open(os.path.join(workdir, "wall_time.json"), encoding="utf-8") as f:
      timing = json.load(f)
  else:
    start = time.monotonic()
    # An interrupted run resumes from its checkpoints: its wall time is only the rest.
    resumed = has_checkpoint(workdir)
    stage = []
    if name in ("pseudo_label", "mpl"):  # Stages after the adversarial run, as in the seed.
      run("adapt", seed, out, extra)
      start = time.monotonic()
      stage = (_pseudo_label_args(seed, out, extra) if name == "pseudo_label" else
               [f"--config.adapt.mpl_teacher_from={os.path.join(out, f'adapt_seed{seed}')}"])
    cmd = [sys.executable, "-m", "segjax.main", f"--config=configs/{name}.py",
           f"--workdir={workdir}", f"--config.seed={seed}", *stage, *extra]
    print("$", " ".join(cmd), flush=True)
    with open(os.path.join(out, f"{name}_seed{seed}.log"), "w", encoding="utf-8") as log:
      subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    timing = {"seconds": time.monotonic() - start, "resumed": resumed}
    with open(os.path.join(workdir, "wall_time.json"), "w", encoding="utf-8") as f:
      json.dump(timing, f)
  with open(final, encoding="utf-8") as f:
    return {"metrics": json.load(f), "wall_seconds": timing["seconds"],
            "resumed": timing.get("resumed", False)}


def has_checkpoint(workdir: str) -> bool:
  """Whether a run in `workdir` would resume: a step's checkpoint, not only the folder (which
  a run stopped before its first checkpoint leaves empty)."""
  checkpoints = os.path.join(workdir, "checkpoints")
  return os.path.isdir(checkpoints) and any(entry.isdigit() for entry in os.listdir(checkpoints))


def finished(names, seeds: list[int], out: str) -> dict:
  """The results of the runs of `names` x `seeds` that have finished in `out`."""
  results = {}
  for name in names:
    for seed in seeds:
      workdir = os.path.join(out, f"{name}_seed{seed}")
      if os.path.exists(os.path.join(workdir, "wall_time.json")):
        results.setdefault(name, []).append(run(name, seed, out, []))
  if not results:
    raise SystemExit(f"No finished run in {out}.")
  return results


def table(results: dict, seeds: list[int]) -> str:
  first = next(iter(results.values()))
  names = [k.removeprefix("eval/iou/") for k in first[0]["metrics"] if k.startswith("eval/iou/")]
  lines = ["| config | target mIoU (%) | pixel acc (%) | "
           + " | ".join(names) + " | wall time, fastest seed |",
           "|---" * (len(names) + 4) + "|"]
  for name, runs in results.items():
    miou = 100 * np.array([r["metrics"]["eval/miou"] for r in runs])
    acc = 100 * np.array([r["metrics"]["eval/pixel_acc"] for r in runs])
    per_class = [100 * np.mean([r["metrics"][f"eval/iou/{c}"] for r in runs]) for c in names]
    # The fastest seed: the least disturbed by anything else running on the machine.
    # A resumed run timed only its rest: with no seed run whole there is no wall time to give.
    whole = [r for r in runs if not r["resumed"]]
    spread = (f"{miou.mean():.1f} ± {miou.std(ddof=1):.1f} ({', '.join(f'{m:.1f}' for m in miou)})"
              if len(runs) > 1 else f"{miou[0]:.1f}")
    if len(runs) < len(seeds):  # A benchmark still running, or stopped: say how far it got.
      spread += f", {len(runs)} of {len(seeds)} seeds"
    wall_text = (f"{min(r['wall_seconds'] for r in whole) / 60:.1f} min" if whole
                 else "none (every seed resumed)")
    lines.append(f"| {name} | {spread} | {acc.mean():.1f} | "
                 + " | ".join(f"{v:.1f}" for v in per_class) + f" | {wall_text} |")
  lines.append(f"\nSeeds {seeds}; ± is the sample standard deviation over seeds; per-class IoU "
               "and pixel accuracy are means over seeds. Wall time: one whole run (compile and "
               "evaluations included; pseudo_label: label generation and its run).")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--configs", nargs="+", choices=CONFIGS + TRANSFORMER_CONFIGS,
                      help="the configs to run (default: all but the transformer recipes "
                      f"{', '.join(TRANSFORMER_CONFIGS)}; with --tiny: source_only)")
  parser.add_argument("--out", default="runs/builtin_uda")
  parser.add_argument("--report", action="store_true",
                      help="only tabulate the runs already finished in --out; run nothing")
  parser.add_argument("--tiny", action="store_true",
                      help="a smoke run: the first seed, two steps on tiny scenes")
  parser.add_argument("extra", nargs="*", help="extra --config.x=y overrides for every run")
  args = parser.parse_args()
  args.configs = args.configs or (["source_only"] if args.tiny else list(CONFIGS))
  if args.tiny:  # Compiling is most of a two-step run: XLA compiles faster without optimizing.
    args.seeds, args.extra = args.seeds[:1], TINY + args.extra
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  if args.report:
    print(table(finished(args.configs, args.seeds, args.out), args.seeds))
    return
  os.makedirs(args.out, exist_ok=True)
  # Seed-major: every method gets its first seed before any gets its second, and the
  # results so far are written after each run, so a stopped benchmark still has a table.
  results = {name: [] for name in args.configs}
  for i, seed in enumerate(args.seeds):
    for name in args.configs:
      results[name].append(run(name, seed, args.out, args.extra))
      _write(results, args.seeds[:i + 1], args.out)
  print(table(results, args.seeds))


def _write(results: dict, seeds: list[int], out: str) -> None:
  done = {name: runs for name, runs in results.items() if runs}
  for name, text in (("results.json", json.dumps(done, indent=2)),
                     ("table.md", table(done, seeds) + "\n")):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))


if __name__ == "__main__":
  main()
