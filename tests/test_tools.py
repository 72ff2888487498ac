"""segjax.tools.convert_weights: exact, atomic conversion of state dicts, and its command."""

import os
import subprocess
import sys

import numpy as np
import pytest

from segjax.tools import convert_weights

import needs  # pylint: disable=wrong-import-order

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state_dict() -> dict[str, np.ndarray]:
  """A small torchvision-style state dict: conv, BatchNorm (with its 0-d counter), Linear."""
  rng = np.random.default_rng(0)
  return {"conv1.weight": rng.standard_normal((8, 3, 3, 3), dtype=np.float32),
          "bn1.weight": rng.standard_normal(8, dtype=np.float32),
          "bn1.running_var": rng.uniform(0.5, 2.0, 8).astype(np.float32),
          "bn1.num_batches_tracked": np.array(12, np.int64),
          "fc.weight": rng.standard_normal((10, 8), dtype=np.float32)}


def _read(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(path)


def _assert_same(actual: dict, expected: dict) -> None:
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def test_pth_converts_exactly_to_safetensors(tmp_path):
  """A DataParallel checkpoint ('state_dict' wrapper, 'module.' keys) becomes plain keys."""
  torch = needs.package("torch", "reading a .pth needs PyTorch")
  expected = _state_dict()
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v)
                                         for k, v in expected.items()}},
             tmp_path / "model.pth")
  count, size = convert_weights.convert_file(str(tmp_path / "model.pth"),
                                             str(tmp_path / "model.safetensors"))
  assert count == len(expected) and size == sum(v.nbytes for v in expected.values())
  _assert_same(_read(str(tmp_path / "model.safetensors")), expected)


def test_npz_output_and_no_temporary_file_left(tmp_path):
  expected = _state_dict()
  np.savez(tmp_path / "in.npz", **expected)
  convert_weights.convert_file(str(tmp_path / "in.npz"), str(tmp_path / "out.npz"))
  _assert_same(_read(str(tmp_path / "out.npz")), expected)
  assert sorted(os.listdir(tmp_path)) == ["in.npz", "out.npz"]


def test_a_failed_write_leaves_the_previous_output_intact(tmp_path, monkeypatch):
  np.savez(tmp_path / "in.npz", **_state_dict())
  (tmp_path / "out.safetensors").write_bytes(b"previous")

  def write_half_then_crash(tensors, path):
    with open(path, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(convert_weights, "_write", write_half_then_crash)
  with pytest.raises(OSError, match="disk full"):
    convert_weights.convert_file(str(tmp_path / "in.npz"), str(tmp_path / "out.safetensors"))
  assert (tmp_path / "out.safetensors").read_bytes() == b"previous"
  assert sorted(os.listdir(tmp_path)) == ["in.npz", "out.safetensors"]


def test_errors_name_the_flag(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"--input='.*absent\.pth' does not exist"):
    convert_weights.convert_file(str(tmp_path / "absent.pth"), str(tmp_path / "out.npz"))
  np.savez(tmp_path / "in.npz", **_state_dict())
  with pytest.raises(ValueError, match=r"--output=.* extension '\.pth'; expected "
                     r"\.safetensors or \.npz"):
    convert_weights.convert_file(str(tmp_path / "in.npz"), str(tmp_path / "out.pth"))


def test_command_line(tmp_path):
  expected = _state_dict()
  np.savez(tmp_path / "in.npz", **expected)
  output = tmp_path / "out.safetensors"
  proc = subprocess.run(
      [sys.executable, "-m", "segjax.tools.convert_weights", f"--input={tmp_path / 'in.npz'}",
       f"--output={output}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert f"Wrote 5 tensors (0.0 MiB) from {tmp_path / 'in.npz'} to {output}." in proc.stdout
  _assert_same(_read(str(output)), expected)
