"""Nothing lost, nothing mixed: signals, unreadable checkpoints, a live workdir, a changed config.

The runs are the real entry point (tests/e2e.py) on the reference run's config.
"""

import os
import shutil
import signal
import subprocess
import time

import jax.numpy as jnp
import ml_collections
import pytest

import e2e
from segjax import preemption, reporting, train
from segjax import workdir as workdir_lib


def _checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []


def _copy(reference_run, tmp_path, name):
  workdir = str(tmp_path / name)
  shutil.copytree(reference_run[0], workdir, ignore=shutil.ignore_patterns(".lock"))
  return workdir


# SIGINT (Ctrl-C) takes the same path as SIGTERM; it runs with the slow tests.
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_saves_the_step_reached_and_the_rerun_matches(reference_run, cache_dir,
                                                               tmp_path, sig):
  workdir = str(tmp_path / "stopped")
  log_path = tmp_path / "stopped.log"
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(e2e.main_command(workdir), cwd=e2e.REPO_ROOT,
                            env=e2e.env(8, cache_dir), stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 300
    while len(_checkpoints(workdir)) < 1 and proc.poll() is None:
      assert time.monotonic() < deadline, "no checkpoint appeared"
      time.sleep(0.02)
    time.sleep(0.3)  # Mid-way between two checkpoints, most likely.
    proc.send_signal(sig)
    signalled = time.monotonic()
    returncode = proc.wait(timeout=120)
    waited = time.monotonic() - signalled
  stderr = log_path.read_text(encoding="utf-8")
  assert returncode == preemption.REQUEUE_EXIT_CODE, stderr[-3000:]
  assert waited < 20, f"took {waited:.1f} s to stop"
  name = signal.Signals(sig).name
  stopped_at = int(stderr.split(f"Stopped by {name} after step ")[1].split(";")[0])
  assert stopped_at < e2e.NUM_STEPS and _checkpoints(workdir)[-1] == stopped_at
  logged = [r["step"] for r in reporting.read_metrics(workdir) if "train/loss_seg" in r]
  assert logged == list(range(2, stopped_at + 1, 2))

  resumed = e2e.run_main(workdir, cache_dir)
  assert f"Resumed from the checkpoint at step {stopped_at}" in resumed.stderr
  assert e2e.comparable_metrics(workdir) == e2e.comparable_metrics(reference_run[0])


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(reference_run, cache_dir,
                                                                      tmp_path):
  workdir = _copy(reference_run, tmp_path, "truncated")
  latest = _checkpoints(workdir)[-1]
  assert latest == e2e.NUM_STEPS
  seg_dir = os.path.join(workdir, "checkpoints", str(latest), "seg")
  truncated = 0
  for root, _, files in os.walk(seg_dir):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 1000:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        truncated += 1
  assert truncated
  proc = e2e.run_main(workdir, cache_dir)
  assert f"The checkpoint of step {latest} in " in proc.stderr and "cannot be read" in proc.stderr
  assert f"Resumed from the checkpoint at step {latest - 2}" in proc.stderr
  assert any(n.startswith(f"{latest}-") for n in
             os.listdir(os.path.join(workdir, "unreadable_checkpoints")))
  assert _checkpoints(workdir)[-1] == latest  # Saved again, from the resumed run.
  assert e2e.comparable_metrics(workdir) == e2e.comparable_metrics(reference_run[0])


def test_a_second_run_on_a_live_workdir_refuses_and_names_the_holder(reference_run, cache_dir,
                                                                     tmp_path):
  workdir = _copy(reference_run, tmp_path, "live")
  before = {name: os.path.getmtime(os.path.join(workdir, name))
            for name in ("metrics.jsonl", "config.json", "final_metrics.json")}
  with workdir_lib.Lock(workdir):  # This process stands for the live run.
    proc = e2e.run_main(workdir, cache_dir, check=False)
  assert proc.returncode == 1
  assert f"is in use by another run (host {os.uname().nodename}, PID {os.getpid()}" \
      in proc.stderr and "Traceback" not in proc.stderr
  assert {name: os.path.getmtime(os.path.join(workdir, name)) for name in before} == before
  assert e2e.comparable_metrics(workdir) == e2e.comparable_metrics(reference_run[0])


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
  (tmp_path / workdir_lib.LOCK_FILE).write_text("host gone, PID 1, since yesterday\n")
  with workdir_lib.Lock(str(tmp_path)) as lock:
    assert f"PID {os.getpid()}" in (tmp_path / workdir_lib.LOCK_FILE).read_text()
    with pytest.raises(workdir_lib.WorkdirError, match="in use by another run"):
      workdir_lib.Lock(str(tmp_path)).acquire()
  del lock
  workdir_lib.Lock(str(tmp_path)).acquire().release()  # Released: free again.


def test_a_changed_method_on_resume_is_refused(reference_run, cache_dir, tmp_path):
  workdir = _copy(reference_run, tmp_path, "changed")
  # advent reads the fields of adaptsegnet: the method alone changes.
  proc = e2e.run_main(workdir, cache_dir, "--config.adapt.method=advent", check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert 'config.adapt.method: "adaptsegnet" in config.json, now "advent"' in proc.stderr
  assert e2e.comparable_metrics(workdir) == e2e.comparable_metrics(reference_run[0])


def test_resume_config_check_refuses_training_fields_and_records_the_others(tmp_path):
  config = ml_collections.ConfigDict({"seed": 0, "log_every_steps": 2,
                                      "model": {"name": "compact", "width": 8},
                                      "inference": {"scales": (1.0,)}})
  workdir_lib.record_config(str(tmp_path), config)
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.model.width = 16
  changed.seed = 1
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"config.model.width: 8 in config.json, now 16; config.seed: 0"):
    workdir_lib.check_resume_config(str(tmp_path), changed, step=4)
  allowed = ml_collections.ConfigDict({**config.to_dict(), "init_from": "elsewhere"})
  allowed.log_every_steps = 4
  allowed.inference.scales = (0.5, 1.0)
  record = workdir_lib.config_as_json(config)
  record["init_from"] = "a moved run"
  workdir_lib.write_json_atomically(str(tmp_path / workdir_lib.CONFIG_FILE), record)
  assert workdir_lib.may_change("data.target.root") and workdir_lib.may_change("init_from")
  assert not workdir_lib.may_change("data.target.name")
  workdir_lib.check_resume_config(str(tmp_path), allowed, step=4)
  changes = (tmp_path / workdir_lib.CONFIG_CHANGES_FILE).read_text()
  assert '"step": 4' in changes and '"log_every_steps": [2, 4]' in changes
  assert '"inference.scales": [[1.0], [0.5, 1.0]]' in changes
  workdir_lib.check_resume_config(str(tmp_path), allowed, step=6)  # Now the recorded config.


def test_a_workdir_recorded_before_a_field_resumes_only_with_the_fields_old_value(tmp_path):
  """A self-training run recorded before adapt.st_teacher_bn trained with the running
  statistics: it resumes with 'running', and the new default 'batch' is a change it names."""
  old = ml_collections.ConfigDict({"seed": 0, "adapt": {"method": "self_training"}})
  workdir_lib.record_config(str(tmp_path), old)
  new = ml_collections.ConfigDict({"seed": 0, "adapt": {"method": "self_training",
                                                        "st_teacher_bn": "batch"}})
  with pytest.raises(workdir_lib.WorkdirError, match=r"config.adapt.st_teacher_bn"):
    workdir_lib.check_resume_config(str(tmp_path), new, step=4)
  new.adapt.st_teacher_bn = "running"
  workdir_lib.check_resume_config(str(tmp_path), new, step=4)


def test_non_finite_states_are_recognised_before_a_save():
  finite = {"w": jnp.ones(3), "count": jnp.zeros((), jnp.int32)}
  assert bool(train._all_finite(finite))  # pylint: disable=protected-access
  for bad in (jnp.nan, jnp.inf):
    assert not bool(train._all_finite({**finite, "b": jnp.array([1.0, bad])}))  # pylint: disable=protected-access
