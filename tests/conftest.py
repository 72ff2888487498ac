"""Test setup: 8 fake CPU devices (before JAX is imported), the repo root importable."""

import fcntl
import os
import subprocess
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


def _once_per_session(tmp_path_factory, name: str, make) -> str:
  """The folder `name` that `make(folder)` fills once per test session: under pytest-xdist the
  workers share it through the session's base directory, the first to need it making it under
  a file lock, the others waiting for it."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    folder = str(tmp_path_factory.mktemp(name))
    make(folder)
    return folder
  shared = tmp_path_factory.getbasetemp().parent  # The session's; each worker's is below it.
  folder, done = shared / name, shared / f"{name}.done"
  with open(shared / f"{name}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      make(str(folder))
      done.touch()
  return str(folder)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, cache_dir):
  """An uninterrupted run on 8 devices: (workdir, its stderr), run once per session."""
  import e2e  # pylint: disable=import-outside-toplevel

  def run(workdir: str) -> None:
    with open(f"{workdir}.stderr", "w", encoding="utf-8") as f:
      f.write(e2e.run_main(workdir, cache_dir).stderr)
  workdir = _once_per_session(tmp_path_factory, "reference_run", run)
  with open(f"{workdir}.stderr", encoding="utf-8") as f:
    return workdir, f.read()


@pytest.fixture(scope="session")
def cityscapes_run(tmp_path_factory, cache_dir):
  """The workdir of configs/test_cityscapes.py's two-step run on the Cityscapes fixture,
  trained by `python -m segjax.main` on one device, once per session."""
  import e2e  # pylint: disable=import-outside-toplevel
  import needs  # pylint: disable=import-outside-toplevel
  needs.fixtures("cityscapes/gtFine")
  fixture = os.path.join(needs.fixtures_root(), "cityscapes")

  def train(workdir: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "segjax.main", f"--config=configs/test_cityscapes.py:{fixture}",
         f"--workdir={workdir}"], cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir),
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
  return _once_per_session(tmp_path_factory, "cityscapes_run", train)
