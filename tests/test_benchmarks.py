"""Each script under benchmarks/ runs at its tiny size, so that the benchmarks cannot rot unseen.

Compiling dominates: a segjax process compiles its steps (an adaptation step
takes about 20 s on CI's CPU even with XLA's optimizations off, which --tiny
turns off), so CI runs the speed benchmark's adaptation step, the mode with
the most code of its own; its supervised and inference steps run with the
slow tests (benchmarks/slow_tests.py).
"""

import json
import os
import subprocess
import sys

import pytest

import e2e
import needs


def _run(script: str, *args: str, cache_dir: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, os.path.join("benchmarks", script), *args],
                        cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


@pytest.mark.parametrize("mode", ["adapt", pytest.param("train", marks=pytest.mark.slow),
                                  pytest.param("infer", marks=pytest.mark.slow)])
def test_speed_vs_torch_runs_each_mode_at_its_tiny_size(mode, cache_dir, tmp_path):
  needs.shared("bench/peers/bench_torch.py")
  needs.package("torch", "the speed benchmark's peer is PyTorch")
  out = tmp_path / "rows.jsonl"
  proc = _run("speed_vs_torch.py", "--tiny", "--modes", mode, f"--out={out}",
              cache_dir=cache_dir)
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert (row["model"], row["mode"], row["dtype"]) == ("bisenet_r18", mode, "fp32")
  for framework in ("jax", "torch"):
    assert (row[framework]["batch"], row[framework]["hw"]) == (2, "32x64")
    assert row[framework]["median_ms"] > 0
  assert f"| bisenet_r18 | {mode} | fp32 |" in proc.stdout


def test_builtin_uda_runs_a_tiny_config(cache_dir, tmp_path):
  proc = _run("builtin_uda.py", "--tiny", f"--out={tmp_path}", cache_dir=cache_dir)
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  (run,) = results["source_only"]
  assert 0 <= run["metrics"]["eval/miou"] <= 1 and run["wall_seconds"] > 0
  workdir = tmp_path / "source_only_seed0"
  with open(workdir / "final_metrics.json", encoding="utf-8") as f:
    assert json.load(f)["eval/miou"] == run["metrics"]["eval/miou"]
  with open(workdir / "config.json", encoding="utf-8") as f:
    assert json.load(f)["num_train_steps"] == 2  # The tiny run's.
  assert "\n| source_only | " in proc.stdout


def test_builtin_uda_tables_wall_time_only_from_whole_runs_and_count_seeds():
  from benchmarks import builtin_uda  # pylint: disable=import-outside-toplevel
  record = lambda miou, seconds, resumed: {
      "metrics": {"eval/miou": miou, "eval/pixel_acc": 0.5, "eval/iou/road": miou},
      "wall_seconds": seconds, "resumed": resumed}
  rows = builtin_uda.table({
      "a": [record(0.2, 600, False), record(0.3, 60, True), record(0.4, 540, False)],
      "b": [record(0.2, 60, True), record(0.4, 30, True)],
      "c": [record(0.25, 120, False)]}, [0, 1, 2]).splitlines()
  # The fastest whole run; a resumed run timed only its rest, so none when every seed resumed.
  assert rows[2] == "| a | 30.0 ± 10.0 (20.0, 30.0, 40.0) | 50.0 | 30.0 | 9.0 min |"
  # A config with fewer seeds finished than asked for says so.
  assert rows[3] == ("| b | 30.0 ± 14.1 (20.0, 40.0), 2 of 3 seeds | 50.0 | 30.0 | "
                     "none (every seed resumed) |")
  assert rows[4] == "| c | 25.0, 1 of 3 seeds | 50.0 | 25.0 | 2.0 min |"


def test_conv_formulations_runs_at_its_tiny_size(cache_dir, tmp_path):
  out = tmp_path / "rows.jsonl"
  proc = _run("conv_formulations.py", "--tiny", f"--out={out}", cache_dir=cache_dir)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [row["layer"] for row in rows][:2] == ["fcd conv1", "fcd conv2"]
  for row in rows:
    assert set(row["kernel_grad"]) >= {"xla", "taps"} and row["kernel_grad"]["taps"]["ms"] > 0
    assert row["planned"]["kernel_grad"] in row["kernel_grad"]
  assert "fcd conv1" in proc.stdout


@pytest.mark.parametrize("recipes", [
    # CI: MIC on HRDA, whose step holds HRDA's and MIC's passes; all three with the slow tests.
    ("MIC on HRDA",),
    pytest.param(("DAFormer + MIC", "MIC on HRDA", "VFM-UDA ViT-B"), marks=pytest.mark.slow)],
    ids=["mic_on_hrda", "all"])
def test_step_costs_runs_at_its_tiny_size(recipes, cache_dir):
  # --memory compiles each step (minutes even here): tests/test_summary.py checks that path.
  proc = _run("step_costs.py", "--tiny", "--bf16", "--remat", "--recipes", *recipes,
              cache_dir=cache_dir)
  rows = [line for line in proc.stdout.splitlines() if "GFLOPs" in line]
  # The tiny run's recipes are the MIC ones, whose steps hold the others' passes (the whole
  # step's count is checked in tests/test_summary.py), and VFM-UDA's.
  assert [row[:16].strip() for row in rows] == list(recipes)
  models = {"DAFormer + MIC": "daformer_mitb0 ", "MIC on HRDA": "hrda_mitb0     ",
            "VFM-UDA ViT-B": "vfm_vit_s14    "}
  for recipe, row in zip(recipes, rows):
    assert f"{models[recipe]} bfloat16 remat=True scan=False 8 + 8 images" in row
  flops = [float(row.rsplit(": ", 1)[1].split()[0].replace(",", "")) for row in rows]
  assert all(f > 0 for f in flops) and len(set(flops)) == len(recipes)


def test_inference_speed_runs_every_path_at_its_tiny_size(cache_dir, tmp_path):
  needs.shared("bench/peers/bench_torch.py")
  needs.package("torch", "the inference benchmark's peer is PyTorch")
  out = tmp_path / "rows.jsonl"
  proc = _run("inference_speed.py", "--tiny", f"--out={out}", cache_dir=cache_dir)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [row["path"] for row in rows] == ["jax", "onnx", "tflite", "tflite_int8", "torch"]
  assert all(row["model"] == "bisenet_r18" and row["hw"] == "64x128" and row["median_ms"] > 0
             for row in rows)
  assert "| bisenet_r18 | 64x128 |" in proc.stdout


def test_train_steps_runs_at_its_tiny_size(cache_dir, tmp_path):
  out = tmp_path / "rows.jsonl"
  proc = _run("train_steps.py", "--tiny", "--recipes", "bisenet_adaptsegnet", f"--out={out}",
              cache_dir=cache_dir)
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert "failed" not in row, row
  assert (row["recipe"], row["method"], row["batch"]) == ("bisenet_adaptsegnet", "adaptsegnet", 2)
  assert row["sizes"] == {"source": "32x64", "target": "32x64"}
  assert row["ms_per_step"] > 0 and row["xla_gib"] > 0 and row["gflops"] > 0
  assert row["compile_s"] > 0 and row["peak_gib"] is None  # The CPU keeps no allocator stats.
  assert "| bisenet_adaptsegnet | bisenet_r18 | float32 |" in proc.stdout


def test_builtin_uda_counts_a_run_resumed_only_if_a_step_was_saved(tmp_path):
  from benchmarks import builtin_uda  # pylint: disable=import-outside-toplevel
  assert not builtin_uda.has_checkpoint(str(tmp_path))
  # A run stopped before its first checkpoint leaves the folder empty: the next one starts over.
  (tmp_path / "checkpoints").mkdir()
  assert not builtin_uda.has_checkpoint(str(tmp_path))
  (tmp_path / "checkpoints" / "250").mkdir()
  assert builtin_uda.has_checkpoint(str(tmp_path))
