"""Test setup: 8 fake CPU devices (before JAX is imported), the repo root importable."""

import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's optimisations off (its backend at -O0, no expensive LLVM passes): the tests' programs
# compile about 40% faster in CPU time and run on tiny inputs, where speed does not matter. The
# computations are the same, to float rounding; every comparison in the tests is between two
# programs compiled alike, or with a tolerance. benchmarks/slow_tests.py runs the slow set with
# them on (SEGJAX_TEST_XLA_OPTIMIZATIONS=1), as users compile.
if os.environ.get("SEGJAX_TEST_XLA_OPTIMIZATIONS") != "1":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.dirname(os.path.abspath(__file__))):
  if path not in sys.path:
    sys.path.insert(0, path)

# Grain's worker processes read absl flags, which `absl.app.run` parses in real runs.
from absl import flags  # pylint: disable=wrong-import-position

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, cache_dir):
  """An uninterrupted run on 8 devices: (workdir, its stderr)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  import e2e  # pylint: disable=import-outside-toplevel
  proc = e2e.run_main(workdir, cache_dir)
  return workdir, proc.stderr

