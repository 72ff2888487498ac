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
of a model trained 300 steps (99% argmax agreement).
Unlike CI's run, XLA's optimisations stay on (tests/conftest.py), as in
users' runs.
"""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
  command = [sys.executable, "-m", "pytest", "-m", "slow", "-p", "no:cacheprovider",
             "-o", "addopts=", "-n", "2", "--durations=0", "-q", *sys.argv[1:]]
  print("$", " ".join(command), flush=True)
  env = dict(os.environ, SEGJAX_TEST_XLA_OPTIMIZATIONS="1")
  return subprocess.call(command, cwd=REPO_ROOT, env=env)


if __name__ == "__main__":
  sys.exit(main())
