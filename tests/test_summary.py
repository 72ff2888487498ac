"""segjax.tools.summary: parameter counts, XLA FLOPs and latency of a config's networks."""

import subprocess
import sys

import jax
import jax.numpy as jnp

import e2e
import uda_testing
from configs import adapt
from configs import test as test_config
from segjax.tools import summary


def test_compiled_flops_counts_a_convolution_exactly():
  """2 FLOPs per multiply-add; XLA does not count the taps that fall on zero padding."""
  x = jnp.zeros((2, 16, 24, 8))
  w = jnp.zeros((3, 3, 8, 32))
  conv = lambda x, w, padding: jax.lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert summary.compiled_flops(lambda x, w: conv(x, w, "VALID"), x, w) == (
      2 * 2 * 14 * 22 * 3 * 3 * 8 * 32)
  valid_taps = (16 * 3 - 2) * (24 * 3 - 2)  # Per image and channel pair, with SAME padding.
  assert summary.compiled_flops(lambda x, w: conv(x, w, "SAME"), x, w) == (
      2 * 2 * valid_taps * 8 * 32)


def test_summary_reports_both_networks_of_an_adversarial_config():
  config = adapt.get_config()
  config.model.width = 8
  records = summary.summarize(config, 32, 64, batch=1, num_classes=19, repeats=1)
  assert [r["network"] for r in records] == ["model: compact", "disc: fcd"]
  assert records[1]["params"] == 2_781_121  # AdaptSegNet's FCD with 19 classes.
  for r in records:
    assert 0 < r["forward_flops"] < r["train_flops"] and r["latency_s"] > 0
    # At least the parameters and their gradients (float32).
    assert r["train_bytes"] >= 2 * 4 * r["params"]
  table = summary.format_table(records, 32, 64, 1, "float32")
  assert "2,781,121" in table and "disc: fcd" in table


def test_summary_command_runs():
  proc = subprocess.run(
      [sys.executable, "-m", "segjax.tools.summary", "--config=configs/test.py", "--height=32",
       "--width=64", "--repeats=1"], cwd=e2e.REPO_ROOT, env=e2e.env(1, ""), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "model: compact" in proc.stdout and "train MiB" in proc.stdout


def test_step_costs_count_the_whole_step_and_accumulation_saves_its_activations():
  """--step: the method's whole training step (DACS: the student on source and mixed images,
  the teacher's pass, optimizer and EMA states); accumulation keeps the FLOPs (counted without
  it) and lowers the memory."""
  config = uda_testing.override(test_config.get_config(), {"adapt.method": "self_training"})
  records = summary.summarize(config, 64, 128, batch=8, num_classes=8, repeats=1)
  whole = summary.step_costs(config, 64, 128, batch=8, num_classes=8)
  assert whole["method"] == "self_training"
  # Two student passes with their gradient and a teacher pass: above one gradient on 8 images.
  assert whole["step_flops"] > 1.5 * records[0]["train_flops"]
  assert whole["step_bytes"] > 4 * 4 * records[0]["params"]  # Params, Adam's moments, the EMA.
  config.optim.accumulate_steps = 4
  micro = summary.step_costs(config, 64, 128, batch=8, num_classes=8)
  assert micro["step_flops"] == whole["step_flops"]
  assert micro["step_bytes"] < 0.6 * whole["step_bytes"], (micro, whole)
  assert "optim.accumulate_steps 4" in summary.format_step(micro, 64, 128, 8, config)


def test_step_costs_count_every_block_of_a_scanned_stage():
  """model.scan_blocks: cost analysis counts a loop's body once, so the FLOPs come from the
  unrolled step, the same math; the scanned layout is what is compiled for the memory."""
  from configs import daformer  # pylint: disable=import-outside-toplevel
  config = daformer.get_config()
  config.model.name = "daformer_mitb1"  # Two blocks a stage: a loop of two counted once differs.
  unrolled = summary.step_costs(config, 64, 64, batch=1, num_classes=8, with_memory=False)
  config.model.scan_blocks = True
  scanned = summary.step_costs(config, 64, 64, batch=1, num_classes=8, with_memory=False)
  assert scanned["step_flops"] == unrolled["step_flops"] > 0
  assert config.model.scan_blocks  # The caller's config is left as it was.
