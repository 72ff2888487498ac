"""Runs the real entry point in subprocesses (shared by the end-to-end tests)."""

import os
import subprocess
import sys

from segjax import reporting

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Long enough to be killed mid-run, short enough for CI.
NUM_STEPS, EVAL_EVERY = 20, 10
RUN_FLAGS = ("--config=configs/test.py", f"--config.num_train_steps={NUM_STEPS}",
             "--config.log_every_steps=2", "--config.checkpoint_every_steps=2",
             f"--config.eval_every_steps={EVAL_EVERY}")


def env(devices_per_process: int, cache_dir: str) -> dict:
  out = dict(os.environ)
  out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  out["JAX_PLATFORMS"] = "cpu"
  out["TF_CPP_MIN_LOG_LEVEL"] = "1"
  # Compiled programs are shared between the runs of a test session.
  out["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  out["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return out


def main_command(workdir: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "segjax.main", *RUN_FLAGS, f"--workdir={workdir}", *extra]


def run_main(workdir: str, cache_dir: str, *extra: str, devices: int = 8,
             check: bool = True) -> subprocess.CompletedProcess:
  proc = subprocess.run(main_command(workdir, *extra), cwd=REPO_ROOT,
                        env=env(devices, cache_dir), capture_output=True, text=True,
                        timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"segjax.main failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
  return proc


def comparable_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl without the timing figures, which differ from run to run."""
  return [{k: v for k, v in record.items() if k != "train/steps_per_sec"}
          for record in reporting.read_metrics(workdir)]
