"""Milliseconds and memory of the published recipes' training steps on this machine's accelerator.

  python benchmarks/train_steps.py                       # every recipe (a GPU: about 6 min)
  python benchmarks/train_steps.py --recipes hrda_bf16_remat mic_bf16_remat
  python benchmarks/train_steps.py --tiny --recipes daformer   # 32x64 on the CPU (CI)

Each recipe is the published config (`configs/*.py` with dataset roots, whose
files are not read) and its whole training step as `segjax.train` runs it on
one device: every network pass, every state the method keeps, random uint8
images and labels at the recipe's crops and batch. Per recipe it prints:
  - compile: seconds to compile the lowered step (XLA's autotuning included);
  - XLA GiB: XLA's memory analysis of the compiled step (states, batch and
    temporaries, less the donated states updated in place);
  - peak GiB: the allocator's peak bytes in use over the whole process
    (`Device.memory_stats`; GPU and TPU only), what a card must hold;
  - ms/step: the median of --steps steps after 3 warm-ups, and images/s.

Each recipe is compiled, then timed, in processes of its own, so that one's
peak does not hide another's, and an out-of-memory recipe is reported and
skipped. The compile processes (--compile_jobs at a time: a GPU machine has
the cores, and XLA's compile is mostly single-threaded) fill a persistent
compilation cache, from which the timing process loads the step: its peak is
the step's own, without XLA:GPU's autotuning, whose scratch buffers took the
peak to 33 GiB on an H200 for steps that need 5-11 GiB.

The feature distance (DAFormer, HRDA, MIC, VFM-UDA++) is on:
`model.backbone_weights` (`adapt.fd_weights`) names a file that is not read;
the weights are random.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = "gta5=/data/gta5,cityscapes=/data/cityscapes"
NUM_CLASSES = 19


def _recipe(module: str, **overrides):
  return {"module": module, **overrides}


RECIPES = {
    "bisenet_adaptsegnet": _recipe("bisenet_gta5_cityscapes"),
    "deeplabv2_adaptsegnet": _recipe("deeplabv2_gta5_cityscapes"),
    "daformer": _recipe("daformer"),
    "daformer_bf16": _recipe("daformer", dtype="bfloat16"),
    "daformer_mic_bf16": _recipe("daformer", dtype="bfloat16", mic=True),
    "hrda": _recipe("hrda"),
    "hrda_bf16_remat": _recipe("hrda", dtype="bfloat16", remat=True),
    "mic": _recipe("mic"),
    "mic_bf16_remat": _recipe("mic", dtype="bfloat16", remat=True),
    # VFM-UDA's global batch 8 over 8 GPUs: one source + one target image per device.
    "vfm_uda_vitb": _recipe("vfm_uda", batch=1),
    "vfm_uda_vitl_remat": _recipe("vfm_uda", model="vfm_vit_l14", batch=1, remat=True),
    # VFM-UDA++'s global batch 8 as its README trains it: 2 + 2 images on each of 4 GPUs.
    "vfm_uda_pp_vitl_remat": _recipe("vfm_uda_pp", batch=2, remat=True),
}


def recipe_config(name: str, tiny: bool):
  """The config of recipe `name`: the published one, or with --tiny the built-in one."""
  sys.path.insert(0, REPO_ROOT)
  import importlib  # pylint: disable=import-outside-toplevel
  recipe = RECIPES[name]
  config = importlib.import_module(f"configs.{recipe['module']}").get_config(
      None if tiny else ROOTS)
  if recipe.get("model"):
    config.model.name = recipe["model"]
  if recipe.get("batch"):
    config.batch_size = recipe["batch"]
  if recipe.get("dtype"):
    config.model.dtype = recipe["dtype"]
  if recipe.get("remat"):
    config.model.remat = True
  if "mic" in recipe:
    config.adapt.mic = recipe["mic"]
  if config.adapt.method in ("daformer", "hrda"):
    config.model.backbone_weights = "not_read.pth"  # Turns the feature distance on.
  if config.adapt.method == "vfm_uda_pp":
    config.adapt.fd_weights = "not_read.pth"  # Turns the feature distance on.
  return config


def worker(name: str, tiny: bool, steps: int, compile_only: bool) -> dict:
  """Compiles (and unless `compile_only`, times) recipe `name`'s step on device 0."""
  sys.path.insert(0, REPO_ROOT)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel

  from segjax import methods, parallel, states as states_lib  # pylint: disable=import-outside-toplevel
  from segjax.data import pipeline  # pylint: disable=import-outside-toplevel

  config = recipe_config(name, tiny)
  if tiny:  # Every recipe at 32x64, 2 + 2 images (BatchNorm needs 2).
    config.num_train_steps, config.batch_size, config.data.crop_size = 10, 2, (32, 64)
    config.data.source.crop_size = config.data.target.crop_size = ()
    if config.model.get("detail_crop"):
      config.model.detail_crop = (16, 32)
  warmups = 0 if tiny else 3
  device = jax.devices()[0]
  mesh = Mesh(np.asarray([device]), (parallel.DATA_AXIS,))
  method = methods.build(config, NUM_CLASSES)
  batch = config.batch_size
  rng = np.random.default_rng(0)

  def domain(which: str, labels: bool) -> dict:
    height, width = pipeline.crop_size(config, which)
    out = {"image": rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)}
    if labels:
      out["label"] = rng.integers(0, NUM_CLASSES, (batch, height, width)).astype(np.uint8)
    return out

  data = {"source": domain("source", True)}
  if method.uses_target:
    data["target"] = domain("target", method.target_labels)
  data = parallel.to_global(data, mesh)
  states, _ = states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  key = parallel.make_replicated(lambda: jax.random.key(0), mesh)
  step = parallel.train_step(method.step, mesh)
  lowered = step.lower(states, data, key)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
               + memory.temp_size_in_bytes - memory.alias_size_in_bytes) if memory else -1
  # The program as traced: XLA:GPU's compiled cost analysis leaves out cuDNN's convolutions.
  cost = lowered.cost_analysis()
  sizes = {d: "x".join(map(str, pipeline.crop_size(config, d))) for d in data}
  record = {"recipe": name, "model": config.model.name, "method": config.adapt.method,
            "mic": bool(config.adapt.get("mic", False)), "dtype": config.model.dtype,
            "remat": bool(config.model.get("remat", False)), "batch": batch, "sizes": sizes,
            "platform": device.platform, "device": device.device_kind,
            "jax": jax.__version__, "compile_s": round(compile_s, 1),
            "xla_gib": round(xla_bytes / 2 ** 30, 2),
            "gflops": round(float(cost.get("flops", float("nan"))) / 1e9, 1)}
  if compile_only:
    return record
  times = []
  for i in range(warmups + steps):
    begin = time.perf_counter()
    states, metrics = compiled(states, data, key)
    jax.block_until_ready((states, metrics))
    if i >= warmups:
      times.append(time.perf_counter() - begin)
  losses = {k: float(v) for k, v in jax.device_get(metrics).items()
            if "loss" in k and np.ndim(v) == 0}
  if not all(np.isfinite(v) for v in losses.values()):
    raise FloatingPointError(f"{name}: a loss is not finite after {warmups + steps} steps: {losses}")
  stats = device.memory_stats() or {}
  median = statistics.median(times)
  images = batch * len(data)
  record.update(ms_per_step=round(median * 1e3, 1), min_ms=round(min(times) * 1e3, 1),
                images_per_s=round(images / median, 1), steps_timed=steps,
                peak_gib=round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
                if "peak_bytes_in_use" in stats else None)
  return record


def _spawn(args, name: str, compile_only: bool, cache: str) -> subprocess.Popen:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps)]
  cmd += ["--tiny"] if args.tiny else []
  cmd += ["--compile_only"] if compile_only else []
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  if args.tiny:
    env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  if compile_only:  # Several at once: none may take the card's memory for itself.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _result(name: str, proc: subprocess.Popen, timeout: float) -> dict:
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    return {"recipe": name, "failed": f"over {timeout:.0f} s"}
  if proc.returncode:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    reason = next((l for l in reversed(lines) if "RESOURCE_EXHAUSTED" in l or "Error" in l),
                  lines[-1] if lines else f"exit {proc.returncode}")
    return {"recipe": name, "failed": reason[-300:]}
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
  parser.add_argument("--steps", type=int, default=10, help="Timed steps (after 3 warm-ups).")
  parser.add_argument("--compile_jobs", type=int, default=1,
                      help="Compile this many recipes at once (into a persistent cache, before "
                      "they are timed one at a time).")
  parser.add_argument("--timeout", type=float, default=900, help="Seconds per recipe process.")
  parser.add_argument("--out", default="", help="Also append the records here (JSON lines).")
  parser.add_argument("--tiny", action="store_true",
                      help="Each recipe at 32x64, 2 + 2 images, on the CPU, one step, XLA's "
                      "optimizations off (CI: the script cannot rot; the times mean nothing).")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--compile_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.tiny:
    args.steps = 1
  if args.worker:
    print(json.dumps(worker(args.worker, args.tiny, args.steps, args.compile_only)))
    return
  rows = []
  with tempfile.TemporaryDirectory(prefix="segjax_train_steps_") as cache:
    failed, compile_s = {}, {}
    pending = list(args.recipes)
    while pending:
      group, pending = pending[:args.compile_jobs], pending[args.compile_jobs:]
      procs = [(name, _spawn(args, name, True, cache)) for name in group]
      for name, proc in procs:
        record = _result(name, proc, args.timeout)
        if "failed" in record:
          failed[name] = record
        else:
          compile_s[name] = record["compile_s"]
        print(f"compiled {name}: " + record.get("failed", f"{record.get('compile_s')} s"),
              flush=True)
    for name in args.recipes:
      record = failed.get(name) or _result(name, _spawn(args, name, False, cache), args.timeout)
      if name in compile_s and "failed" not in record:  # Not the load from the cache.
        record["compile_s"] = compile_s[name]
      rows.append(record)
      print(json.dumps(record), flush=True)
      if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
          f.write(json.dumps(record) + "\n")
  print("\n| recipe | model | dtype | remat | batch | crops | GFLOPs | compile s | XLA GiB | "
        "peak GiB | ms/step | images/s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "failed" in r:
      print(f"| {r['recipe']} | failed: {r['failed']} |||||||||||")
      continue
    crops = " + ".join(r["sizes"].values())
    print(f"| {r['recipe']} | {r['model']} | {r['dtype']} | {r['remat']} | {r['batch']} | "
          f"{crops} | {r['gflops']:,.0f} | {r['compile_s']} | {r['xla_gib']} | "
          f"{r['peak_gib'] if r['peak_gib'] is not None else '-'} | {r['ms_per_step']} | "
          f"{r['images_per_s']} |")
  if rows:
    print(f"\n{rows[0].get('device', '?')} ({rows[0].get('platform', '?')}), jax "
          f"{rows[0].get('jax', '?')}; median of {args.steps} steps after {0 if args.tiny else 3} warm-ups.")


if __name__ == "__main__":
  main()
