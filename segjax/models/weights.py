"""Loading ImageNet backbone weights from the files users have (PyTorch state dicts).

Formats, chosen by extension:
  * `.pth` / `.pt`: a PyTorch state dict (or a dict holding one under
    'state_dict' or 'model'); needs torch, read with `weights_only=True`.
  * `.safetensors`: the same key names; needs no torch (see
    `python -m segjax.tools.convert_weights` to write one from a .pth).
  * `.npz`: the same key names as numpy arrays.

Layouts, told apart by the keys (`detect_layout`):
  * 'torchvision': torchvision's key names (`layer1.0.conv1.weight`), as in
    its ImageNet ResNets and VGG16;
  * 'caffe': DeepLab's Caffe-converted ResNet-101, the init files of
    AdaptSegNet (`DeepLab_resnet_pretrained_init-f81d91e8.pth`, ImageNet then
    COCO) and ADVENT (`DeepLab_resnet_pretrained_imagenet.pth`): the same names
    behind a 'Scale.' prefix, plus DeepLab-v2's classifier (`Scale.layer5`).
    The network strides in the 1x1 convolution where torchvision's strides in
    the 3x3, so the two layouts' ResNets hold the same shapes and compute
    different things: a model reads a layout only if it says so (`KeyMap`).
  * 'mit': the official SegFormer MiT encoders (`mit_b0.pth` ... `mit_b5.pth`,
    a bare state dict: `patch_embed1.proj.weight`, `block1.0.attn.kv.weight`);
  * 'hf_segformer': Hugging Face's SegFormer (`encoder.patch_embeddings.0...`,
    `encoder.block.0.0.attention.self.query...`, under 'segformer.' in the
    `SegformerFor...` models), which a `KeyMap` converter renames to 'mit';
  * 'dinov2': the official DINOv2 ViTs (`dinov2_vits14_pretrain.pth`, ...
    `_reg4_`: `blocks.0.attn.qkv.weight`, `blocks.0.ls1.gamma`);
  * 'hf_dinov2': Hugging Face's `Dinov2Model` and `Dinov2WithRegistersModel`
    (`embeddings.patch_embeddings.projection...`, `encoder.layer.0.attention
    .attention.query...`), which `vit.from_hugging_face` renames to 'dinov2';
  * 'timm_dinov2': timm's DINOv2 ViTs with registers (`vit_small_patch14_reg4_
    dinov2.lvd142m`: `reg_token`, and position embeddings without the class
    token's, which timm adds to `cls_token`), which `vit.from_timm` converts.
    timm's DINOv2 ViTs without registers keep the official names and read as
    'dinov2'; timm drops `mask_token` from both (`KeyMap.optional`).

A backbone module names its variables so that `torch_key(path)` gives the key
of each; the loader converts layouts (OIHW -> HWIO, a Linear matrix -> the
convolution it stands for) and fails on any missing key or shape mismatch,
naming them. Keys in the file that the model does not use (the ImageNet
classifier, `num_batches_tracked`) are reported, not loaded; so is a
classifier the file has for another number of classes (`LoadReport.skipped`).
"""

import collections
import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

BACKBONE = "backbone"  # The submodule name every segmenter gives its pretrained trunk.
# In a key a key function gives: the variable stacks one tensor per layer on its leading axis (a
# scanned stage's blocks), the file one key per layer with the layer's number in its place.
LAYER = "{layer}"
_IGNORED_SUFFIXES = ("num_batches_tracked",)

TORCHVISION = "torchvision"
CAFFE = "caffe"
MIT = "mit"
HF_SEGFORMER = "hf_segformer"
DINOV2 = "dinov2"
HF_DINOV2 = "hf_dinov2"
TIMM_DINOV2 = "timm_dinov2"
VFMPP = "vfmpp"
LAYOUTS = {
    TORCHVISION: "torchvision's layout (its ResNets stride in each bottleneck's 3x3 convolution)",
    CAFFE: "the Caffe-converted DeepLab layout ('Scale.' keys; its ResNet strides in each "
           "bottleneck's 1x1 convolution)",
    MIT: "the official SegFormer MiT layout ('patch_embed1.proj.weight', 'block1.0.attn.kv')",
    HF_SEGFORMER: "Hugging Face's SegFormer layout ('encoder.patch_embeddings.0.proj.weight')",
    DINOV2: "the official DINOv2 ViT layout ('blocks.0.attn.qkv.weight', 'blocks.0.ls1.gamma'; "
            "timm's without registers too)",
    TIMM_DINOV2: "timm's DINOv2 layout with registers ('reg_token', 'blocks.0.ls1.gamma')",
    VFMPP: "VFM-UDA++'s checkpoint layout ('network.encoder.level_embed', "
           "'network.encoder.interactions.0...')",
    HF_DINOV2: "Hugging Face's DINOv2 layout "
               "('embeddings.patch_embeddings.projection.weight')",
}
KEY_PREFIXES = {TORCHVISION: "", CAFFE: "Scale.", MIT: "", HF_SEGFORMER: "", DINOV2: "",
                HF_DINOV2: "", TIMM_DINOV2: "", VFMPP: ""}


def detect_layout(keys: Iterable[str]) -> str:
  """The layout of a state dict with these keys (see the module docstring)."""
  keys = list(keys)
  if any(k.startswith(KEY_PREFIXES[CAFFE]) for k in keys):
    return CAFFE
  if "network.encoder.level_embed" in keys:
    return VFMPP
  if any(k.removeprefix("segformer.").startswith("encoder.patch_embeddings.") for k in keys):
    return HF_SEGFORMER
  if any(k.startswith("patch_embed1.") for k in keys):
    return MIT
  if any(re.sub(r"^dinov2(_with_registers)?\.", "", k).startswith(
      "embeddings.patch_embeddings.projection.") for k in keys):
    return HF_DINOV2
  if any(k.startswith("blocks.") and k.endswith(".ls1.gamma") for k in keys):
    return TIMM_DINOV2 if "reg_token" in keys else DINOV2
  return TORCHVISION


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """Where a segmenter's pretrained variables are in the weight files it reads.

  Called with the path of a variable inside the backbone, it gives the
  variable's key without the layout's prefix, as a plain key function does.
  `layouts` are the file layouts the segmenter reads (a plain key function
  reads torchvision's only). `heads[layout](path)` gives the key of a variable
  outside the backbone that files of that layout hold (DeepLab-v2's classifier
  in its Caffe init), or None for a variable they do not hold.
  `converters[layout]` rewrites a file of that layout's tensors into the
  layout the key functions read (Hugging Face's SegFormer names into the
  official MiT ones). A file key for which `backbone_file_key` is true must be
  used: one left over means the file holds another size of the network
  (MiT-B2's extra blocks in a MiT-B1), an error.
  """
  backbone: Callable[[tuple[str, ...]], str]
  layouts: tuple[str, ...] = (TORCHVISION,)
  heads: Mapping[str, Callable[[tuple[str, ...]], str | None]] = dataclasses.field(
      default_factory=dict)
  converters: Mapping[str, Callable[[dict], dict]] = dataclasses.field(default_factory=dict)
  backbone_file_key: Callable[[str], bool] | None = None
  optional: Callable[[str], bool] | None = None

  def __call__(self, path: tuple[str, ...]) -> str:
    return self.backbone(path)


@dataclasses.dataclass
class LoadReport:
  loaded: list[str]
  unused: list[str]
  layout: str = TORCHVISION
  skipped: list[str] = dataclasses.field(default_factory=list)  # Heads left out, with why.

  def summary(self, path: str) -> str:
    text = f"Loaded {len(self.loaded)} tensors from {path}, in {LAYOUTS[self.layout]}."
    for reason in self.skipped:
      text += f" Skipped {reason}."
    if self.unused:
      shown = ", ".join(self.unused[:8]) + (" ..." if len(self.unused) > 8 else "")
      text += f" {len(self.unused)} keys in the file are not used by the model: {shown}"
    return text


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict into float32/int numpy arrays."""
  return {k: np.asarray(v) for k, v in _read(path, keys_only=False).items()}


def read_keys(path: str) -> list[str]:
  """The tensor names in the file at `path`.

  A .safetensors or .npz file is read no further than its index; a .pth file
  is read whole (torch has no index to read).
  """
  return list(_read(path, keys_only=True))


def file_layout(path: str) -> str:
  """The layout of the weights file at `path`; remembered per file version, since model
  builders ask for it several times per run and a .pth is read whole to answer."""
  stat = os.stat(path)
  return _file_layout(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _file_layout(path: str, mtime_ns: int, size: int) -> str:
  del mtime_ns, size  # Only the cache key: a rewritten file is read again.
  return detect_layout(read_keys(path))


def check_layout(path: str, expected: str, field: str) -> None:
  """Raises unless the weights file at `path` has the layout `expected` (set by `field`)."""
  if expected not in LAYOUTS:
    raise ValueError(f"{field}={expected!r} must be one of {list(LAYOUTS)}.")
  found = file_layout(path)
  if found != expected:
    raise ValueError(
        f"{field}={expected!r} builds the network of {LAYOUTS[expected]}, but "
        f"model.backbone_weights={path!r} holds {LAYOUTS[found]}. Set {field}={found!r}, or "
        f"give weights in the {expected!r} layout.")


def _read(path: str, keys_only: bool) -> Mapping[str, object]:
  """The state dict at `path`: tensors, or (`keys_only`) its keys mapped to None where the
  format can list them without reading the tensors."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Backbone weights file {path!r} (config field "
                            "model.backbone_weights) does not exist.")
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".safetensors", ".npz", ".pth", ".pt", ".bin", ".ckpt"):
    raise ValueError(f"Backbone weights file {path!r} has extension {ext!r}; expected "
                     ".pth/.pt/.ckpt (PyTorch), .safetensors or .npz.")
  try:
    if ext == ".safetensors":
      # pylint: disable=import-outside-toplevel
      from safetensors import safe_open
      from safetensors.numpy import load_file
      if keys_only:
        with safe_open(path, framework="numpy") as f:
          return dict.fromkeys(f.keys())
      return load_file(path)
    if ext == ".npz":
      with np.load(path, allow_pickle=False) as f:
        return dict.fromkeys(f.files) if keys_only else {k: f[k] for k in f.files}
    return _read_torch(path)
  except ImportError:
    raise
  except Exception as e:  # Each format's library raises its own type for a corrupt file.
    raise ValueError(f"Cannot read backbone weights file {path!r}: {e}") from e


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


def _to_flax_layout(value: np.ndarray, target_shape: tuple[int, ...], key: str) -> np.ndarray:
  """A PyTorch tensor in the layout of a Flax variable of `target_shape` (shape not checked)."""
  if value.ndim == 4 and len(target_shape) == 4:  # Conv OIHW -> HWIO.
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2 and len(target_shape) == 4:  # Linear standing for a conv (VGG fc6).
    kh, kw, cin, cout = target_shape
    if value.shape != (cout, cin * kh * kw):
      raise ValueError(f"{key}: shape {value.shape} cannot be the {kh}x{kw} convolution "
                       f"{target_shape} (HWIO) of the model.")
    return value.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)
  if value.ndim == 2 and len(target_shape) == 2:  # Linear (out, in) -> (in, out).
    return value.T
  return value


def convert(value: np.ndarray, target_shape: tuple[int, ...], key: str) -> np.ndarray:
  """Converts a PyTorch tensor to the layout of the Flax variable of `target_shape`."""
  converted = _to_flax_layout(value, target_shape, key)
  if converted.shape != tuple(target_shape):
    raise _shape_error(key, value.shape, target_shape, converted.shape)
  return converted


def _shape_error(key: str, file_shape, target_shape, converted_shape) -> ValueError:
  return ValueError(f"{key}: shape {tuple(file_shape)} in the file does not match the model's "
                    f"{tuple(target_shape)} ({tuple(converted_shape)} after layout conversion); "
                    "is this the right architecture (model.name) for these weights?")


def load_backbone(variables: dict, path: str, torch_key: Callable[[tuple[str, ...]], str],
                  prefix: str = BACKBONE) -> tuple[dict, LoadReport]:
  """Returns `variables` with every variable under `prefix` replaced from the file at `path`.

  Works on the `params` and `batch_stats` collections alike (a frozen
  BatchNorm keeps its affine terms in batch_stats). Raises, listing them, if
  any backbone variable has no key in the file. `torch_key` is a key function
  (torchvision's layout only) or a `KeyMap`; the heads a KeyMap names for the
  file's layout are loaded too, each whole or not at all: a head the file
  holds for another number of classes, or lacks, keeps its initialisation and
  is reported in `LoadReport.skipped` (AdaptSegNet and ADVENT drop the Caffe
  init's 21-class classifier alike).
  """
  key_map = torch_key if isinstance(torch_key, KeyMap) else KeyMap(torch_key)
  tensors = read_state_dict(path)
  layout = detect_layout(tensors)
  if layout not in key_map.layouts:
    readable = " or ".join(LAYOUTS[name] for name in key_map.layouts)
    hint = {CAFFE: " DeepLab-v2 (model.name='deeplabv2_r101') reads it.",
            MIT: " The MiT segmenters (model.name='daformer_mitb5', ...) read it.",
            HF_SEGFORMER: " The MiT segmenters (model.name='daformer_mitb5', ...) read it.",
            }.get(layout, "")
    raise ValueError(f"{path} holds {LAYOUTS[layout]}, which this model (model.name) does not "
                     f"read: it reads {readable}.{hint}")
  if layout in key_map.converters:
    tensors = key_map.converters[layout](tensors)
  file_key = lambda key: KEY_PREFIXES[layout] + key
  head_key = key_map.heads.get(layout, lambda path: None)
  flat = {collection: traverse_util.flatten_dict(dict(tree))
          for collection, tree in variables.items()}
  loaded, missing, skipped = [], [], []
  heads = collections.defaultdict(list)  # Top-level module -> [(collection, path, file key)].
  found_prefix = False
  for collection, tree in flat.items():
    for var_path, value in tree.items():
      if var_path[0] != prefix:
        if (key := head_key(var_path)) is not None:
          heads[var_path[0]].append((collection, var_path, file_key(key)))
        continue
      found_prefix = True
      key = file_key(key_map(var_path[1:]))
      stacked = LAYER in key
      keys = [key.replace(LAYER, str(i)) for i in range(value.shape[0])] if stacked else [key]
      absent = [key for key in keys if key not in tensors]
      for key in absent:
        if key_map.optional is not None and key_map.optional(key):
          skipped.append(f"{key} (the file has none; it keeps its initialisation)")
        else:
          missing.append(key)
      if absent:
        continue
      shape = value.shape[1:] if stacked else value.shape
      layers = [convert(tensors[key], shape, f"{path}: {key}") for key in keys]
      tree[var_path] = (np.stack(layers) if stacked else layers[0]).astype(value.dtype)
      loaded.extend(keys)
  if not found_prefix:
    raise ValueError(f"model.backbone_weights is set but this model has no pretrained "
                     f"backbone (no '{prefix}' submodule); unset it.")
  if missing:
    shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
    raise ValueError(f"{path} lacks {len(missing)} keys the backbone needs: {shown}. "
                     f"Is it a state dict in {LAYOUTS[layout]} of the model.name architecture?")
  skipped_keys = set()
  for module, entries in heads.items():
    reason = _head_mismatch(entries, flat, tensors, path)
    if reason:
      skipped.append(f"{module} ({reason}; it keeps its initialisation)")
      skipped_keys.update(key for _, _, key in entries)
      continue
    for collection, var_path, key in entries:
      value = flat[collection][var_path]
      flat[collection][var_path] = convert(tensors[key], value.shape,
                                           f"{path}: {key}").astype(value.dtype)
      loaded.append(key)
  used = set(loaded) | skipped_keys
  unused = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  extra = sorted(k for k in tensors if k not in used and key_map.backbone_file_key is not None
                 and key_map.backbone_file_key(k))
  if extra:
    raise ValueError(f"{path}: {extra[0]} {tuple(tensors[extra[0]].shape)} has no place in "
                     f"the model's backbone ({len(extra)} such keys); is it another size of "
                     "the model.name architecture?")
  new_variables = {collection: traverse_util.unflatten_dict(tree)
                   for collection, tree in flat.items()}
  return new_variables, LoadReport(loaded=loaded, unused=unused, layout=layout, skipped=skipped)


def _head_mismatch(entries, flat: dict, tensors: Mapping[str, np.ndarray],
                   path: str) -> str | None:
  """Why a head cannot be loaded (a key absent, another class count), or None if it can.

  The class count is a variable's last axis (a kernel's outputs, a bias); any
  other difference means another network, which raises as `convert` does.
  """
  for collection, var_path, key in entries:
    if key not in tensors:
      return f"the file has no {key}"
    target = tuple(flat[collection][var_path].shape)
    value = _to_flax_layout(tensors[key], target, f"{path}: {key}")
    if value.shape == target:
      continue
    if value.shape[:-1] == target[:-1]:
      return f"{key} has {value.shape[-1]} classes, the model {target[-1]}"
    raise _shape_error(f"{path}: {key}", tensors[key].shape, target, value.shape)
  return None
