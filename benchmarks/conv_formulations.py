"""Times each formulation of segjax.models.fast_ops on the convolutions it was tuned on (XLA:CPU).

  python benchmarks/conv_formulations.py              # batch 2, the layers' sizes at 256x512
  python benchmarks/conv_formulations.py --tiny       # a smoke run (CI): 1/8 of each map side

For each convolution (the segmenters' and the FCD discriminator's layers whose
formulation is not obvious) it prints the milliseconds of every candidate for
the forward pass and the kernel gradient, the one `fast_ops` plans, and the
candidates' largest relative difference from lax's result. The rules in
fast_ops' docstring were read off this table; rerun it after a JAX upgrade.
Times are medians of --iters runs after one warm-up; the machine is noisy, so
compare candidates within a row.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from segjax.models import fast_ops  # pylint: disable=wrong-import-position

# (name, input height, width, Cin, Cout, kernel, stride) at batch 2, 256x512 images.
LAYERS = (
    ("fcd conv1", 256, 512, 19, 64, 4, 2),
    ("fcd conv2", 128, 256, 64, 128, 4, 2),
    ("fcd conv3", 64, 128, 128, 256, 4, 2),
    ("resnet stem", 256, 512, 3, 64, 7, 2),
    ("resnet layer1", 64, 128, 64, 64, 3, 1),
    ("resnet layer2 down", 64, 128, 64, 128, 3, 2),
    ("vgg conv1_1", 256, 512, 3, 64, 3, 1),
    ("vgg conv1_2", 256, 512, 64, 64, 3, 1),
    ("vgg conv2_2", 128, 256, 128, 128, 3, 1),
)


def _time(fn, *args, iters: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def measure(layer, batch: int, scale: int, iters: int) -> dict:
  name, height, width, cin, cout, k, stride = layer
  height, width = height // scale, width // scale
  x = jax.random.normal(jax.random.key(0), (batch, height, width, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / np.sqrt(k * k * cin)
  pad = k // 2 if k % 2 else k // 2 - 1
  plan = fast_ops._plan(x.shape, w.shape, (stride, stride), ((pad, pad), (pad, pad)), (1, 1))  # pylint: disable=protected-access
  g = jax.random.normal(jax.random.key(2), (batch, *plan.out_size, cout))
  # pylint: disable=protected-access
  forwards = {"xla": fast_ops._forward_xla, "taps": fast_ops._forward_taps}
  if stride == 2:
    forwards["s2d"] = fast_ops._forward_s2d
  kernel_grads = {
      "xla": lambda x, g: jax.vjp(lambda w: fast_ops._forward_xla(x, w, plan), w)[1](g)[0],
      "taps": lambda x, g: fast_ops._kernel_grad_taps(x, g, plan),
  }
  if stride == 1:
    kernel_grads["rows"] = lambda x, g: fast_ops._kernel_grad_rows(x, g, plan)
  # pylint: enable=protected-access
  row = {"layer": name, "input": [batch, height, width, cin], "cout": cout, "kernel": k,
         "stride": stride, "planned": {"forward": plan.forward, "kernel_grad": plan.kernel_grad}}
  for pass_name, candidates, args in (
      ("forward", {n: jax.jit(lambda x, w, f=f: f(x, w, plan)) for n, f in forwards.items()},
       (x, w)),
      ("kernel_grad", {n: jax.jit(f) for n, f in kernel_grads.items()}, (x, g))):
    reference = np.asarray(candidates["xla"](*args))
    scale_of = float(np.max(np.abs(reference))) or 1.0
    row[pass_name] = {
        n: {"ms": round(_time(f, *args, iters=iters), 2),
            "max_rel_diff": float(np.max(np.abs(np.asarray(f(*args)) - reference)) / scale_of)}
        for n, f in candidates.items()}
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--tiny", action="store_true",
                      help="each map side divided by 8, one timed run: a smoke test")
  parser.add_argument("--out", default="", help="also write the rows as JSON lines here")
  args = parser.parse_args()
  scale, iters = (8, 1) if args.tiny else (1, args.iters)
  rows = []
  for layer in LAYERS:
    row = measure(layer, args.batch, scale, iters)
    rows.append(row)
    cells = []
    for pass_name in ("forward", "kernel_grad"):
      cells.append(f"{pass_name} [{row['planned'][pass_name]}] " + " ".join(
          f"{n} {r['ms']:.1f}" for n, r in row[pass_name].items()))
    print(f"{row['layer']:20s} {' | '.join(cells)}  (ms)", flush=True)
    worst = max(r["max_rel_diff"] for p in ("forward", "kernel_grad") for r in row[p].values())
    if worst > 1e-4:
      raise SystemExit(f"{row['layer']}: a formulation differs from lax's by {worst:.1e}.")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
