"""Deployment speed: ms per frame and FPS of each way to run a segmenter, side by side.

  python benchmarks/inference_speed.py            # the README's table (about 25 min here)
  python benchmarks/inference_speed.py --rows bisenet_r18@512x1024 --paths jax onnx
  python benchmarks/inference_speed.py --tiny     # a smoke run of every path (CI)

Rows: BiSeNet-R18 at 512x1024 and 768x1536 (the BiSeNet paper's speed size),
DeepLabV3+-R50 and FCN-8s at 512x1024, one frame at a time (batch 1), float32
input, random weights (speed does not depend on them), 19 classes. Paths:
  jax          the jitted inference function (`segjax.steps.eval_logits`) on
               JAX's default backend, as `segjax.predict --workdir` runs it;
  onnx         `segjax.export --format=onnx` run by onnxruntime (CPU provider);
  tflite       `--format=tflite`, float32, TFLite's interpreter (XNNPACK);
  tflite_int8  `--quantize=int8`, calibrated on 8 built-in target scenes;
  torch        the plain-PyTorch peer (../shared/bench/peers/bench_torch.py
               --mode infer: eval-mode forward, no grad).
The exported paths include the normalisation in the model; each path runs in a
fresh process, all threads of the machine, and reports the median over --iters
frames after --warmup. The FCN-8s and BiSeNet models are set up as the peer's
(FCN-8s 'aligned' padding, BiSeNet without the auxiliary heads that inference
does not run anyway). The machine is noisy: compare within one run.
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
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
import speed_vs_torch  # pylint: disable=wrong-import-position

ROWS = ("bisenet_r18@512x1024", "bisenet_r18@768x1536", "deeplabv3plus_r50@512x1024",
        "fcn8s_vgg16@512x1024")
PATHS = ("jax", "onnx", "tflite", "tflite_int8", "torch")
NUM_CLASSES = 19


def worker(model: str, path: str, hw: tuple[int, int], warmup: int, iters: int) -> dict:
  """Times one path of one model in this process."""
  sys.path.insert(0, REPO_ROOT)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from segjax import export, parallel, platforms, steps  # pylint: disable=import-outside-toplevel
  from segjax import states as states_lib  # pylint: disable=import-outside-toplevel

  config = speed_vs_torch.peer_config(model)
  mesh = Mesh(np.asarray(jax.devices()[:1]), (parallel.DATA_AXIS,))
  states, _ = states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  seg_state = jax.device_get(states["seg"])
  image = export.target_images(config, 1, hw).astype(np.float32)
  with tempfile.TemporaryDirectory(prefix="segjax_speed_") as folder:
    setup_start = time.perf_counter()
    if path == "jax":
      mean, std = tuple(config.data.mean), tuple(config.data.std)
      fn = jax.jit(lambda state, x: steps.eval_logits(state, x, mean, std))
      state = jax.device_put(seg_state)
      run = lambda: fn(state, image).block_until_ready()
    else:
      fmt, quantize = ("tflite", "int8") if path == "tflite_int8" else (path, "float32")
      calibration = export.target_images(config, 8, hw) if quantize == "int8" else None
      with platforms.compiling_for(platforms.EXPORT):
        fn = export.scores_fn(config, seg_state, hw)
        export.WRITERS[fmt](fn, folder, hw, 1, quantize, calibration, ("cpu",))
      model_run = export.runtime(fmt, os.path.join(folder, export.MODEL_FILES[fmt]))
      run = lambda: model_run(image)
    run()
    setup_s = time.perf_counter() - setup_start
    times = speed_vs_torch.time_calls(run, warmup, iters)
  median = statistics.median(times)
  return {"model": model, "path": path, "hw": f"{hw[0]}x{hw[1]}", "median_ms": median * 1e3,
          "min_ms": min(times) * 1e3, "fps": 1 / median, "setup_s": setup_s}


def run_path(args, model: str, path: str, hw: str) -> dict:
  if path == "torch":
    peer_args = argparse.Namespace(torch_python=args.torch_python, peers=args.peers, batch=1,
                                   hw=hw, warmup=args.warmup, iters=args.iters)
    record = speed_vs_torch.run_torch(peer_args, model, "infer", "fp32")
    return {"model": model, "path": path, "hw": hw, "median_ms": record["median_ms"],
            "min_ms": record["min_ms"], "fps": 1e3 / record["median_ms"]}
  if args.tiny:  # One process for every path: a smoke run, whose times mean nothing.
    return worker(model, path, tuple(int(v) for v in hw.split("x")), args.warmup, args.iters)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--rows", f"{model}@{hw}",
         "--paths", path, "--warmup", str(args.warmup), "--iters", str(args.iters)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS=os.environ.get(
      "JAX_PLATFORMS", "cpu"))
  if args.tiny:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:  # Reported in the table; the other paths still run.
    why = ("killed: out of memory" if proc.returncode in (-9, 137)
           else f"exit status {proc.returncode}")
    print(f"{model} {hw} {path} failed ({why}):\n{proc.stderr[-2000:]}", file=sys.stderr)
    return {"model": model, "path": path, "hw": hw, "failed": why}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", nargs="+", default=list(ROWS), help="MODEL@HxW")
  parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--peers", default=speed_vs_torch.DEFAULT_PEERS,
                      help="folder with bench_torch.py")
  parser.add_argument("--torch_python", default=sys.executable,
                      help="a Python with torch installed (the peer's venv)")
  parser.add_argument("--out", default="", help="also write the records here (JSON lines)")
  parser.add_argument("--tiny", action="store_true",
                      help="a smoke run: BiSeNet-R18 at 64x128, every path, one frame, in this "
                      "process (the PyTorch peer in its own); the times mean nothing")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.tiny:
    args.rows, args.warmup, args.iters = ["bisenet_r18@64x128"], 0, 1
  if args.worker:
    model, hw = args.rows[0].split("@")
    print(json.dumps(worker(model, args.paths[0], tuple(int(v) for v in hw.split("x")),
                            args.warmup, args.iters)))
    return
  if "torch" in args.paths and not os.path.isfile(os.path.join(args.peers, "bench_torch.py")):
    parser.error(f"No bench_torch.py in --peers={args.peers!r} (or leave out --paths torch).")
  table = []
  for row in args.rows:
    model, hw = row.split("@")
    records = {}
    for path in args.paths:
      records[path] = run_path(args, model, path, hw)
      print(f"{model:18s} {hw:9s} {path:12s} {_cell(records[path])}", flush=True)
      if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
          f.write(json.dumps(records[path]) + "\n")
    table.append((model, hw, records))
  print(f"\nms per frame (FPS), batch 1, median of {args.iters} frames after {args.warmup} "
        "warm-ups, float32 unless int8.\n")
  print("| model | size | " + " | ".join(args.paths) + " |")
  print("|---|---|" + "---|" * len(args.paths))
  for model, hw, records in table:
    print(f"| {model} | {hw} | " + " | ".join(_cell(records[p]) for p in args.paths) + " |")


def _cell(record: dict) -> str:
  if "failed" in record:
    return record["failed"]
  return f"{record['median_ms']:.0f} ({record['fps']:.2f})"


if __name__ == "__main__":
  main()
