"""Every per-paper config runs end to end on the built-in data with a tiny override.

Each run trains its published architecture (at an odd 97x131 size) for two
steps on 2 devices, checkpoints and evaluates through the real entry point.
"""

import json
import os
import subprocess
import sys

import pytest

import e2e
from configs import recipes
from segjax import reporting

TINY = ("--config.batch_size=2", "--config.eval_batch_size=2", "--config.num_train_steps=2",
        "--config.log_every_steps=1", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.num_eval_samples=1",
        "--config.data.crop_size=(97, 131)")
SPLITS = ("source", "target", "eval")


def _tiny_data_flags():
  flags = []
  for split in SPLITS:
    flags += [f"--config.data.{split}.height=97", f"--config.data.{split}.width=131",
              f"--config.data.{split}.num_examples=4"]
  # Per-domain crops (the GTA5 recipes' whole 1280x720 source images), at a tiny size.
  return flags + ["--config.data.source.crop_size=(97, 131)",
                  "--config.data.target.crop_size=(81, 113)"]


# (config, the segmenter it trains)
CONFIGS = (
    ("fcn8s_voc", "fcn8s_vgg16"), ("fcn8s_kitti_road", "fcn8s_vgg16"),
    ("bisenet_gta5_cityscapes", "bisenet_r18"), ("deeplabv3plus_cityscapes", "deeplabv3plus_r101"),
    ("unet_cityscapes", "unet"), ("deeplabv2_gta5_cityscapes", "deeplabv2_r101"))


# Over 80 s each on CI's 2 cores: benchmarks/slow_tests.py runs them. In CI, FCN-16s trains at
# an odd size for the FCNs and unet_small for UNet's blocks (tests/test_models.py); BiSeNet-R18
# trains in tests/test_bisenet_deeplab.py and the speed benchmark's tiny run.
SLOW_CONFIGS = ("deeplabv3plus_cityscapes", "deeplabv2_gta5_cityscapes", "fcn8s_kitti_road",
                "fcn8s_voc", "unet_cityscapes", "bisenet_gta5_cityscapes")


@pytest.mark.parametrize("name, model", [
    pytest.param(name, model, marks=pytest.mark.slow) if name in SLOW_CONFIGS else (name, model)
    for name, model in CONFIGS])
def test_paper_config_trains_on_builtin_data(name, model, cache_dir, tmp_path):
  workdir = str(tmp_path / name)
  command = [sys.executable, "-m", "segjax.main", f"--config=configs/{name}.py",
             f"--workdir={workdir}", *TINY, *_tiny_data_flags()]
  proc = subprocess.run(command, cwd=e2e.REPO_ROOT, env=e2e.env(2, cache_dir),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
    final = json.load(f)
  assert 0.0 <= final["eval/miou"] <= 1.0
  train_records = [r for r in reporting.read_metrics(workdir) if "train/loss_seg" in r]
  assert [r["step"] for r in train_records] == [1, 2]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model"]["name"] == model


def test_dataset_roots_come_from_the_config_string():
  assert recipes.parse_roots("gta5=/d/gta,cityscapes=/d/cs", ("gta5", "cityscapes")) == {
      "gta5": "/d/gta", "cityscapes": "/d/cs"}
  with pytest.raises(ValueError, match=r"Bad dataset root 'synthia=/x'.*\['gta5'\]"):
    recipes.parse_roots("synthia=/x", ("gta5",))


@pytest.mark.slow  # MiT-B0 HRDA's step compiles for minutes on 2 cores: benchmarks/slow_tests.py.
@pytest.mark.parametrize("name, metrics", [
    ("hrda", {"train/loss_detail", "train/loss_mix_detail"}),
    ("mic", {"train/loss_detail", "train/loss_mask", "train/loss_mask_detail"})])
def test_hrda_configs_train_and_evaluate_the_teacher_in_sliding_windows(name, metrics, cache_dir,
                                                                         tmp_path):
  """configs/hrda.py and configs/mic.py (MIC on HRDA) as published but for the built-in scenes:
  two steps on 2 devices with each loss logged under its own name, the student evaluated, then
  the EMA teacher by segjax.evaluate --state=ema; both over 64x64 windows at stride 32 of 64x128
  images (inference.window, HRDA's 1024/512 on Cityscapes), each window fusing the segmenter's
  two scales."""
  workdir = str(tmp_path / name)
  flags = ["--config.batch_size=2", "--config.eval_batch_size=2", "--config.num_train_steps=2",
           "--config.log_every_steps=1", "--config.eval_every_steps=2",
           "--config.checkpoint_every_steps=2", "--config.num_eval_samples=2",
           "--config.inference.window=(64, 64)", "--config.inference.stride=(32, 32)"]
  for split in SPLITS:
    flags += [f"--config.data.{split}.height=64", f"--config.data.{split}.width=128",
              f"--config.data.{split}.num_examples=4"]
  command = [sys.executable, "-m", "segjax.main", f"--config=configs/{name}.py",
             f"--workdir={workdir}", *flags]
  proc = subprocess.run(command, cwd=e2e.REPO_ROOT, env=e2e.env(2, cache_dir),
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  assert config["model"]["name"] == "hrda_mitb0" and config["adapt"]["method"] == "hrda"
  assert config["inference"]["window"] == [64, 64]
  with open(os.path.join(workdir, "final_metrics.json"), encoding="utf-8") as f:
    assert 0.0 <= json.load(f)["eval/miou"] <= 1.0
  train_records = [r for r in reporting.read_metrics(workdir) if "train/loss_seg" in r]
  assert [r["step"] for r in train_records] == [1, 2]
  assert metrics <= set(train_records[-1]), sorted(train_records[-1])
  command = [sys.executable, "-m", "segjax.evaluate", f"--config=configs/{name}.py",
             f"--workdir={workdir}", "--state=ema", *flags]
  proc = subprocess.run(command, cwd=e2e.REPO_ROOT, env=e2e.env(2, cache_dir),
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(os.path.join(workdir, "eval", "val_step2_ema.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert report["state"] == "ema" and report["inference"]["window"] == [64, 64]
  assert 0.0 <= report["miou"] <= 1.0
