"""The entry point end to end: train, get killed, resume; bad configs fail clearly."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

import e2e
from configs import test as test_config
from segjax import train


def _committed_checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_uninterrupted_run_writes_metrics_checkpoints_and_tensorboard(reference_run):
  workdir, _ = reference_run
  records = e2e.comparable_metrics(workdir)
  train_records = [r for r in records if "train/loss_seg" in r]
  eval_records = [r for r in records if "eval/miou" in r]
  assert [r["step"] for r in train_records] == list(range(2, e2e.NUM_STEPS + 1, 2))
  assert [r["step"] for r in eval_records] == [e2e.EVAL_EVERY, e2e.NUM_STEPS]
  for key in ("train/loss_seg", "train/loss_adv", "train/loss_disc", "train/lr"):
    assert all(np.isfinite(r[key]) for r in train_records)
  for key in ("eval/pixel_acc", "eval/mean_acc", "eval/iou/road", "eval/iou/pole"):
    assert key in eval_records[-1]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  # The latest two checkpoints are kept (the best by mIoU is among them or kept too).
  assert _committed_checkpoints(workdir)[-2:] == [e2e.NUM_STEPS - 2, e2e.NUM_STEPS]


# 140 s: the slow set. CI checks the same resume path on its own: tests/test_preemption.py resumes
# from a checkpoint before the last (whose metrics lines were already written) and from a signal.
@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(reference_run, cache_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(e2e.main_command(workdir), cwd=e2e.REPO_ROOT,
                          env=e2e.env(8, cache_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 300
  while not _committed_checkpoints(workdir) and proc.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint appeared"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _committed_checkpoints(workdir)
  assert killed_at and killed_at[-1] < e2e.NUM_STEPS, f"the run was not killed mid-way: {killed_at}"

  resumed = e2e.run_main(workdir, cache_dir)
  resume_step = killed_at[-1]
  assert f"Resumed from the checkpoint at step {resume_step}" in resumed.stderr
  assert e2e.comparable_metrics(workdir) == e2e.comparable_metrics(reference_run[0])


def test_rerunning_a_finished_run_changes_nothing(reference_run, cache_dir):
  workdir, _ = reference_run
  before = e2e.comparable_metrics(workdir)
  proc = e2e.run_main(workdir, cache_dir)
  assert f"Training already finished at step {e2e.NUM_STEPS}" in proc.stderr
  assert e2e.comparable_metrics(workdir) == before


def test_unknown_model_name_is_a_clear_error(tmp_path):
  config = test_config.get_config()
  config.model.name = "resnet9000"
  with pytest.raises(ValueError, match=r"Unknown model name 'resnet9000' \(config field "
                                       r"model.name\); expected one of \['bisenet_r101', 'bisenet_r18', "
                                       r"'compact', 'daformer_mitb0'"):
    train.train_and_evaluate(config, str(tmp_path))


def test_indivisible_batch_is_a_clear_error(tmp_path):
  config = test_config.get_config()
  config.batch_size = 12
  with pytest.raises(ValueError, match=r"config.batch_size=12 must be a positive multiple of "
                                       r"the number of devices \(8"):
    train.train_and_evaluate(config, str(tmp_path))


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(PermissionError, match="Cannot write to the workdir .*a_file/run"):
    train.train_and_evaluate(test_config.get_config(), str(blocker / "run"))
