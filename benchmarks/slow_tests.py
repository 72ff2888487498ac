"""The tests marked slow (over ~35 s each), which CI leaves out to stay under 20 minutes.

  python benchmarks/slow_tests.py

Runs `pytest -m slow` on the 8 fake CPU devices of the test suite and prints
each test's outcome and duration: the R101, UNet, KITTI Road and BiSeNet
paper configs end to end, the AdaptSegNet variants', MPL's and DAFormer's
data-parallel equivalence, BiSeNet-R101, DeepLabV3+-R50, FCN-32s and the MiT
segmenters trained at an odd size, BiSeNet's and DeepLabV3+'s bf16 forward,
per-device BatchNorm, the pseudo-label step without labelled pixels or
without a discriminator, MPL without discriminators, a SIGKILLed run resumed,
accumulation with self_training, --state=ema on DAFormer, and the int8 export
of a model trained 300 steps (99% argmax agreement), VFM-UDA++'s step on 8
devices against 1 and across a checkpoint round trip (marked `alone`: run one
at a time, after the others, for their memory), and step_costs.py's tiny run
of all three of its recipes (CI runs MIC on HRDA's).
Unlike CI's run, XLA's optimisations stay on (tests/conftest.py), as in
users' runs.
"""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
  env = dict(os.environ, SEGJAX_TEST_XLA_OPTIMIZATIONS="1")
  failures = []
  # The tests marked `alone` (VFM-UDA++'s step: 17+ GiB each) run one at a time after the rest.
  for marks, workers in (("slow and not alone", "2"), ("slow and alone", "0")):
    command = [sys.executable, "-m", "pytest", "-m", marks, "-p", "no:cacheprovider",
               "-o", "addopts=", "-n", workers, "--durations=0", "-q", *sys.argv[1:]]
    print("$", " ".join(command), flush=True)
    code = subprocess.call(command, cwd=REPO_ROOT, env=env)
    if code not in (0, 5):  # 5: no test selected (e.g. -k matched none of this group).
      failures.append(code)
  return failures[0] if failures else 0


if __name__ == "__main__":
  sys.exit(main())
