"""Loading ImageNet backbone weights from the files users have (torchvision state dicts).

Formats, chosen by extension:
  * `.pth` / `.pt`: a PyTorch state dict (or a dict holding one under
    'state_dict' or 'model'); needs torch, read with `weights_only=True`.
  * `.safetensors`: the same key names; needs no torch (see
    `python -m segjax.tools.convert_weights` to write one from a .pth).
  * `.npz`: the same key names as numpy arrays.

A backbone module names its variables so that `torch_key(path)` gives the
torchvision key of each; the loader converts layouts (OIHW -> HWIO, a Linear
matrix -> the convolution it stands for) and fails on any missing key or shape
mismatch, naming them. Keys in the file that the backbone does not use (the
ImageNet classifier, `num_batches_tracked`) are reported, not loaded.
"""

import dataclasses
import os
from collections.abc import Callable, Mapping

import numpy as np
from absl import logging
from flax import traverse_util

BACKBONE = "backbone"  # The submodule name every segmenter gives its pretrained trunk.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


@dataclasses.dataclass
class LoadReport:
  loaded: list[str]
  unused: list[str]

  def summary(self, path: str) -> str:
    text = f"Loaded {len(self.loaded)} backbone tensors from {path}."
    if self.unused:
      shown = ", ".join(self.unused[:8]) + (" ..." if len(self.unused) > 8 else "")
      text += f" {len(self.unused)} keys in the file are not used by the backbone: {shown}"
    return text


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torchvision-format state dict into float32/int numpy arrays."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Backbone weights file {path!r} (config field "
                            "model.backbone_weights) does not exist.")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".safetensors", ".npz", ".pth", ".pt", ".bin"):
    raise ValueError(f"Backbone weights file {path!r} has extension {ext!r}; expected "
                     ".pth/.pt (PyTorch), .safetensors or .npz.")
  try:
    if ext == ".safetensors":
      from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
      tensors = load_file(path)
    elif ext == ".npz":
      with np.load(path, allow_pickle=False) as f:
        tensors = {k: f[k] for k in f.files}
    else:
      tensors = _read_torch(path)
  except ImportError:
    raise
  except Exception as e:  # Each format's library raises its own type for a corrupt file.
    raise ValueError(f"Cannot read backbone weights file {path!r}: {e}") from e
  return {k: np.asarray(v) for k, v in tensors.items()}


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"Reading {path!r} needs PyTorch, which is not installed. Convert it once where torch "
        "is available: python -m segjax.tools.convert_weights --input=FILE.pth "
        "--output=FILE.safetensors, then point model.backbone_weights at the .safetensors."
    ) from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict.")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "detach"):
      continue
    v = v.detach().cpu()
    if v.is_floating_point():
      v = v.float()
    out[k.removeprefix("module.")] = v.numpy()
  return out


def convert(value: np.ndarray, target_shape: tuple[int, ...], key: str) -> np.ndarray:
  """Converts a PyTorch tensor to the layout of the Flax variable of `target_shape`."""
  file_shape = value.shape
  if value.ndim == 4 and len(target_shape) == 4:  # Conv OIHW -> HWIO.
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2 and len(target_shape) == 4:  # Linear standing for a conv (VGG fc6).
    kh, kw, cin, cout = target_shape
    if value.shape != (cout, cin * kh * kw):
      raise ValueError(f"{key}: shape {value.shape} cannot be the {kh}x{kw} convolution "
                       f"{target_shape} (HWIO) of the backbone.")
    value = value.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)
  elif value.ndim == 2 and len(target_shape) == 2:  # Linear (out, in) -> (in, out).
    value = value.T
  if value.shape != tuple(target_shape):
    raise ValueError(f"{key}: shape {file_shape} in the file does not match the backbone's "
                     f"{tuple(target_shape)} ({value.shape} after layout conversion); is this "
                     "the right architecture (model.name) for these weights?")
  return value


def load_backbone(variables: dict, path: str, torch_key: Callable[[tuple[str, ...]], str],
                  prefix: str = BACKBONE) -> tuple[dict, LoadReport]:
  """Returns `variables` with every variable under `prefix` replaced from the file at `path`.

  Works on the `params` and `batch_stats` collections alike (a frozen
  BatchNorm keeps its affine terms in batch_stats). Raises, listing them, if
  any backbone variable has no key in the file.
  """
  tensors = read_state_dict(path)
  new_variables, loaded, missing = {}, [], []
  found_prefix = False
  for collection, tree in variables.items():
    flat = traverse_util.flatten_dict(dict(tree))
    for var_path, value in flat.items():
      if var_path[0] != prefix:
        continue
      found_prefix = True
      key = torch_key(var_path[1:])
      if key not in tensors:
        missing.append(key)
        continue
      converted = convert(tensors[key], value.shape, f"{path}: {key}")
      flat[var_path] = converted.astype(value.dtype)
      loaded.append(key)
    new_variables[collection] = traverse_util.unflatten_dict(flat)
  if not found_prefix:
    raise ValueError(f"model.backbone_weights is set but this model has no pretrained "
                     f"backbone (no '{prefix}' submodule); unset it.")
  if missing:
    shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
    raise ValueError(f"{path} lacks {len(missing)} keys the backbone needs: {shown}. "
                     "Is it a torchvision state dict of the model.name architecture?")
  used = set(loaded)
  unused = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  return new_variables, LoadReport(loaded=loaded, unused=unused)


def log_report(report: LoadReport, path: str) -> None:
  logging.info(report.summary(path))
