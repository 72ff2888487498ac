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


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, cache_dir):
  """An uninterrupted run on 8 devices: (workdir, its stderr).

  Run once per test session: under pytest-xdist the workers share it through the session's
  base directory, the first to need it running it under a file lock.
  """
  import e2e  # pylint: disable=import-outside-toplevel
  if "PYTEST_XDIST_WORKER" not in os.environ:
    workdir = str(tmp_path_factory.mktemp("reference"))
    return workdir, e2e.run_main(workdir, cache_dir).stderr
  shared = tmp_path_factory.getbasetemp().parent  # The session's; each worker's is below it.
  workdir, stderr_file = shared / "reference_run", shared / "reference_run.stderr"
  with open(shared / "reference_run.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not stderr_file.exists():
      stderr_file.write_text(e2e.run_main(str(workdir), cache_dir).stderr, encoding="utf-8")
  return str(workdir), stderr_file.read_text(encoding="utf-8")



@pytest.fixture(scope="session")
def cityscapes_run(tmp_path_factory, cache_dir):
  """The workdir of configs/test_cityscapes.py's two-step run on the Cityscapes fixture,
  trained by `python -m segjax.main` on one device; shared by the workers as `reference_run`."""
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

  if "PYTEST_XDIST_WORKER" not in os.environ:
    workdir = str(tmp_path_factory.mktemp("cityscapes_run"))
    train(workdir)
    return workdir
  shared = tmp_path_factory.getbasetemp().parent
  workdir, done = shared / "cityscapes_run", shared / "cityscapes_run.done"
  with open(shared / "cityscapes_run.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      train(str(workdir))
      done.touch()
  return str(workdir)
