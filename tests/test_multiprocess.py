"""Two processes of 4 fake CPU devices (launch/local.py) equal one process of 8."""

import os
import subprocess
import sys

import numpy as np

import e2e


def test_two_processes_match_one_process_of_eight_devices(reference_run, cache_dir, tmp_path):
  workdir = str(tmp_path / "two_processes")
  cmd = [sys.executable, os.path.join("launch", "local.py"), "--num_processes=2",
         "--cpu_devices_per_process=4", "--", *e2e.RUN_FLAGS, f"--workdir={workdir}"]
  env = e2e.env(4, cache_dir)
  del env["XLA_FLAGS"]  # The launcher gives each process its own device count.
  proc = subprocess.run(cmd, cwd=e2e.REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "JAX process 1 of 2, 4 local / 8 global devices" in proc.stderr
  got = e2e.comparable_metrics(workdir)
  want = e2e.comparable_metrics(reference_run[0])
  assert [r["step"] for r in got] == [r["step"] for r in want]
  # Gloo's cross-process all-reduce may sum in another order than the in-process one: the
  # first steps agree to float rounding; over tens of steps training amplifies that rounding
  # (~1e-3), and evaluation counts pixels, where it can flip a few argmaxes.
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in g:
      if key.startswith("train/"):
        rtol = 1e-6 if g["step"] <= 6 else 1e-2
        np.testing.assert_allclose(g[key], w[key], rtol=rtol, err_msg=f"{key} at {g['step']}")
      elif key.startswith("eval/"):
        np.testing.assert_allclose(g[key], w[key], atol=0.02, err_msg=f"{key} at {g['step']}")
