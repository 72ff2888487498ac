"""segjax vs the plain-PyTorch peer: one supervised step, one adaptation step, inference.

  python benchmarks/speed_vs_torch.py                       # the full table (about 30 min here)
  python benchmarks/speed_vs_torch.py --models bisenet_r18 --modes adapt --dtypes fp32
  python benchmarks/speed_vs_torch.py --tiny                # a smoke run of every mode (CI)

For each (model, mode, dtype) row it runs the segjax step and the peer's
`bench_torch.py` (../shared/bench/peers, or --peers) in fresh processes, one
after the other and alternating which goes first, on the same random-weight
models at the same batch and size, and reports the median ms per step of
each and their ratio. The machine is noisy: only side-by-side ratios mean
anything. Rows print as they finish; the table comes last.

What a step is, for both frameworks (the peer's definitions):
  train: forward, CE (ignore 255), backward, SGD-momentum update;
  adapt: one AdaptSegNet iteration: segmenter on source CE + 0.001 x BCE of
         the frozen discriminator on target softmax, then the discriminator
         (FCD) on both detached softmax maps; SGD for the segmenter, Adam for D;
  infer: forward in eval mode.
bf16 is bfloat16 compute with float32 parameters and loss in both (torch autocast).
The segjax models are set to do the peer's work: FCN-8s with the 'aligned'
padding (conv1_padding 1), BiSeNet without its auxiliary heads (the peer has none).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from segjax import hostmem  # pylint: disable=wrong-import-position  (imports no JAX)

DEFAULT_PEERS = os.path.join(REPO_ROOT, "..", "shared", "bench", "peers")
PEER_NAMES = {"bisenet_r18": "bisenet_r18", "fcn8s_vgg16": "fcn8s_vgg16",
              "deeplabv3plus_r50": "deeplabv3p_r50"}
NUM_CLASSES = 19


def peer_config(model: str):
  """The default config with `model` set up to do the peer's work (see the module docstring)."""
  sys.path.insert(0, REPO_ROOT)
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.model.name = model
  config.model.sync_batch_stats = False
  if model.startswith("fcn"):
    config.model.conv1_padding = 1
  if model.startswith("bisenet"):
    config.model.aux_heads = False
  return config


def time_calls(run, warmup: int, iters: int) -> list[float]:
  """Seconds of each of `iters` calls of `run`, after `warmup` untimed ones."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return times


def jax_worker(model: str, mode: str, dtype: str, batch: int, hw: tuple[int, int],
               warmup: int, iters: int) -> dict:
  """Times segjax's real train/eval functions on one device; returns a result record."""
  sys.path.insert(0, REPO_ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel

  from segjax import methods, parallel, steps, states as states_lib  # pylint: disable=import-outside-toplevel

  config = peer_config(model)
  config.model.dtype = "bfloat16" if dtype == "bf16" else "float32"
  config.data.crop_size = hw
  config.optim.seg.update(lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
  config.adapt = (methods.adapt_config("adaptsegnet", lambda_adv=0.001) if mode == "adapt"
                  else methods.adapt_config("source_only"))
  config.disc.name = "fcd"
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  states, _ = states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  rng = np.random.default_rng(0)
  height, width = hw

  def images():
    return rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)

  labels = rng.integers(0, NUM_CLASSES, (batch, height, width)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.1] = 255
  mean, std = tuple(config.data.mean), tuple(config.data.std)  # ImageNet's, as the peer's.
  if mode == "infer":
    fn = jax.jit(lambda state, x: steps.eval_logits(state, x, mean, std))
    x = jnp.asarray(images())
    run = lambda: fn(states["seg"], x).block_until_ready()
    images_per_step = batch
  else:
    batch_data = {"source": {"image": images(), "label": labels}}
    if mode == "adapt":
      batch_data["target"] = {"image": images()}
    batch_data = parallel.to_global(batch_data, mesh)
    method = methods.build(config, NUM_CLASSES)
    step = parallel.train_step(method.step, mesh)
    key = parallel.make_replicated(lambda: jax.random.key(0), mesh)
    carry = {"states": states}

    def run():
      carry["states"], metrics = step(carry["states"], batch_data, key)
      jax.block_until_ready(metrics)
    images_per_step = 2 * batch if mode == "adapt" else batch

  times = time_calls(run, warmup, iters)
  median = statistics.median(times)
  return {"framework": "jax", "version": jax.__version__, "model": model, "mode": mode,
          "dtype": dtype, "batch": batch, "hw": f"{height}x{width}",
          "median_ms": round(median * 1e3, 1), "min_ms": round(min(times) * 1e3, 1),
          "img_per_s": round(images_per_step / median, 3)}


def run_jax(args, model, mode, dtype) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--models", model, "--modes", mode,
         "--dtypes", dtype, "--batch", str(args.batch), "--hw", args.hw,
         "--warmup", str(args.warmup), "--iters", str(args.iters)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  # segjax's commands run with glibc's huge-page malloc on a CPU-only host (segjax.hostmem).
  env = hostmem.huge_page_environment(env) or env
  if args.tiny:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  return _last_json(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True))


def run_torch(args, model, mode, dtype) -> dict:
  cmd = [args.torch_python, os.path.join(args.peers, "bench_torch.py"), "--model",
         PEER_NAMES[model], "--mode", mode, "--batch", str(args.batch), "--hw", args.hw,
         "--dtype", dtype, "--warmup", str(args.warmup), "--iters", str(args.iters)]
  env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
  return _last_json(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True))


def _last_json(proc: subprocess.CompletedProcess) -> dict:
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(PEER_NAMES))
  parser.add_argument("--modes", nargs="+", default=["train", "adapt", "infer"])
  parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--hw", default="256x512")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--peers", default=DEFAULT_PEERS, help="folder with bench_torch.py")
  parser.add_argument("--torch_python", default=sys.executable,
                      help="a Python with torch installed (the peer's venv)")
  parser.add_argument("--out", default="", help="also write the records here (JSON lines)")
  parser.add_argument("--tiny", action="store_true",
                      help="a smoke run: BiSeNet-R18, every mode once at batch 2 (the peer's "
                      "BatchNorm needs 2), 32x64, fp32, no warm-up, and XLA's optimizations "
                      "off to compile faster; the times mean nothing")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.tiny:
    args.models, args.dtypes, args.batch, args.hw, args.warmup, args.iters = (
        ["bisenet_r18"], ["fp32"], 2, "32x64", 0, 1)
  hw = tuple(int(v) for v in args.hw.lower().split("x"))
  if args.worker:
    print(json.dumps(jax_worker(args.models[0], args.modes[0], args.dtypes[0], args.batch, hw,
                                args.warmup, args.iters)))
    return
  if not os.path.isfile(os.path.join(args.peers, "bench_torch.py")):
    parser.error(f"No bench_torch.py in --peers={args.peers!r}.")
  rows = []
  for i, (model, mode, dtype) in enumerate(
      (m, o, d) for m in args.models for o in args.modes for d in args.dtypes):
    runners = [("jax", run_jax), ("torch", run_torch)]
    if i % 2:
      runners.reverse()
    row = {"model": model, "mode": mode, "dtype": dtype}
    for name, runner in runners:
      row[name] = runner(args, model, mode, dtype)
    row["speedup"] = round(row["torch"]["median_ms"] / row["jax"]["median_ms"], 2)
    rows.append(row)
    print(f"{model:18s} {mode:6s} {dtype:5s} jax {row['jax']['median_ms']:8.1f} ms  "
          f"torch {row['torch']['median_ms']:8.1f} ms  torch/jax {row['speedup']:.2f}", flush=True)
    if args.out:
      with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
  print(f"\nbatch {args.batch}, {args.hw}, median ms per step over {args.iters} steps after "
        f"{args.warmup} warm-ups; > 1 means segjax is faster.\n")
  print("| model | mode | dtype | segjax ms | torch ms | torch / segjax |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['model']} | {row['mode']} | {row['dtype']} | {row['jax']['median_ms']:.0f} | "
          f"{row['torch']['median_ms']:.0f} | {row['speedup']:.2f} |")


if __name__ == "__main__":
  main()
