"""The DINOv2 ViT encoders (segjax/models/backbones/vit.py) against Hugging Face `transformers`.

The reference is transformers' PyTorch `Dinov2Model` and
`Dinov2WithRegistersModel`, randomly initialised (with random LayerScales,
biases and norms, so that a swapped tensor shows) and saved in the layouts
users hold: `save_pretrained` (the Hub's files), and the official DINOv2
state dict (`dinov2_vits14_pretrain.pth`: `blocks.0.attn.qkv`,
`blocks.0.ls1.gamma`) as .pth and .safetensors. Each block's output and the
final tokens must agree to 1e-4 at a size that is neither square nor a
multiple of 14.
"""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import needs
from segjax.models import weights
from segjax.models.backbones import vit


def _torch():
  sys.modules.setdefault("triton", None)  # As tests/test_mit.py: no triton next to TensorFlow.
  return needs.package("torch", "the DINOv2 reference runs in PyTorch")


def _transformers():
  _torch()
  return needs.package("transformers", "the DINOv2 reference is transformers' Dinov2Model")


@pytest.mark.parametrize("size_out", [5, 9, 23, 37, 40, 74])
@pytest.mark.parametrize("antialias", [False, True])
def test_position_resampling_is_pytorchs_bicubic(size_out, antialias):
  torch = _torch()
  table = np.random.default_rng(0).normal(size=(vit.GRID * vit.GRID, 6)).astype(np.float32)
  grid = (size_out, 11)  # Non-square: rows and columns resampled differently.
  ours = np.asarray(vit.resample_positions(jnp.asarray(table), grid, antialias))
  square = torch.from_numpy(table.reshape(1, vit.GRID, vit.GRID, 6)).permute(0, 3, 1, 2)
  theirs = torch.nn.functional.interpolate(square, size=grid, mode="bicubic",
                                           align_corners=False, antialias=antialias)
  # PyTorch computes the weights in float32, here in float64 (measured: 1.1e-5 apart at most).
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).reshape(-1, 6).numpy(),
                             atol=3e-5)


def _hf_model(registers: int, depth: int = 12, width: int = 384, seed: int = 0):
  torch, transformers = _torch(), _transformers()
  torch.manual_seed(seed)
  options = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,
                 mlp_ratio=4, image_size=518, patch_size=14, layerscale_value=1.0)
  if registers:
    model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        num_register_tokens=registers, **options))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**options))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "lambda1" in name or "token" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


# Hugging Face -> official DINOv2 names, from transformers' convert_dinov2_to_hf.py read in reverse.
_OFFICIAL = [
    (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
]


def _official_state_dict(hub: dict) -> dict:
  out = {}
  for key, value in hub.items():
    part = re.match(r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)$", key)
    if part:
      stem = f"encoder.layer.{part[1]}.attention.attention"
      out[f"blocks.{part[1]}.attn.qkv.{part[2]}"] = np.concatenate(
          [hub[f"{stem}.{n}.{part[2]}"] for n in ("query", "key", "value")])
      continue
    if ".attention.attention." in key:
      continue
    for pattern, replace in _OFFICIAL:
      if re.match(pattern, key):
        out[re.sub(pattern, replace, key)] = value
        break
    else:
      raise AssertionError(f"unmapped Hugging Face key {key}")
  out["mask_token"] = out["mask_token"].reshape(1, -1)  # The official (1, D).
  out["head.weight"] = np.zeros((1000, hub["layernorm.weight"].shape[0]), np.float32)
  return out


def _hub_state(model, directory) -> dict:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  model.save_pretrained(directory)
  return load_file(os.path.join(directory, "model.safetensors"))


def _load(encoder: vit.VisionTransformer, path: str):
  params = encoder.init(jax.random.key(1), jnp.zeros((1, 28, 42, 3)))["params"]
  loaded, report = weights.load_backbone({"params": {"backbone": params}}, path, vit.KEY_MAP)
  return loaded["params"]["backbone"], report


def _timm_state_dict(official: dict) -> dict:
  """The file timm saves (`vit_small_patch14[_reg4]_dinov2.lvd142m`), by the rule of timm's
  `vision_transformer._convert_dinov2`: no mask token, and with registers `reg_token` and the
  class token's position embedding added to `cls_token`, not in `pos_embed`."""
  out = {k: v for k, v in official.items() if k not in ("mask_token", "head.weight")}
  if "register_tokens" in out:
    out["reg_token"] = out.pop("register_tokens")
    out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
    out["pos_embed"] = out["pos_embed"][:, 1:]
  return out


@pytest.mark.parametrize("registers, layout", [
    (0, "hf"), (0, "official_pth"), (4, "hf"), (4, "official_safetensors"), (0, "timm"),
    (4, "timm")])
def test_every_block_equals_hugging_face_dinov2_with_the_same_weights(registers, layout,
                                                                     tmp_path):
  torch = _torch()
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  model = _hf_model(registers)
  if layout == "timm":  # timm's files have no mask token: the model keeps DINOv2's zeros.
    with torch.no_grad():
      model.embeddings.mask_token.zero_()
  if layout == "hf":
    model.save_pretrained(tmp_path / "hf")
    path = str(tmp_path / "hf" / "model.safetensors")
  else:
    state = _official_state_dict(_hub_state(model, tmp_path / "hub"))
    if layout == "timm":
      state = _timm_state_dict(state)
    path = str(tmp_path / ("dinov2.pth" if layout == "official_pth" else "dinov2.safetensors"))
    if layout == "official_pth":
      torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    else:
      save_file(state, path)
  encoder = vit.VisionTransformer("vit_s14", registers=registers, pos_antialias=bool(registers))
  params, report = _load(encoder, path)
  expected_layout = {"hf": weights.HF_DINOV2, "timm": weights.TIMM_DINOV2 if registers
                     else weights.DINOV2}.get(layout, weights.DINOV2)
  assert report.layout == expected_layout
  assert report.unused == ([] if layout in ("hf", "timm") else ["head.weight"])
  missing = 1 if layout == "timm" else 0  # The mask token.
  assert report.skipped == (["mask_token (the file has none; it keeps its initialisation)"]
                            if missing else [])
  assert len(report.loaded) == len(jax.tree.leaves(params)) - missing
  assert sum(p.numel() for p in model.parameters()) == sum(
      x.size for x in jax.tree.leaves(params))

  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 75, 103, 3)).astype(np.float32)  # A 5x7 grid, cut as the conv.
  mask = rng.random((2, 35)) < 0.4  # Token masking: the mask token replaces those patches.
  ours = encoder.apply({"params": params}, jnp.asarray(images), mask=jnp.asarray(mask))
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                   bool_masked_pos=torch.from_numpy(mask), output_hidden_states=True)
  assert ours["grid"] == (5, 7)
  assert ours["tokens"].shape == (2, 1 + registers + 35, 384)
  for i, (o, t) in enumerate(zip(ours["layers"], theirs.hidden_states[1:])):
    np.testing.assert_allclose(np.asarray(o), t.numpy(), atol=1e-4, rtol=1e-4,
                               err_msg=f"block {i}")
  np.testing.assert_allclose(np.asarray(ours["tokens"]), theirs.last_hidden_state.numpy(),
                             atol=1e-4, rtol=1e-4)
  maps = encoder.patch_maps(ours["tokens"], ours["grid"])
  np.testing.assert_array_equal(maps[:, 1, 2], ours["tokens"][:, 1 + registers + 7 + 2])


def test_a_file_of_another_size_is_an_error_naming_the_key_and_shapes(tmp_path):
  _hf_model(0, depth=2, width=128).save_pretrained(tmp_path / "narrow")
  with pytest.raises(ValueError, match=r"mask_token: shape \(1, 1, 128\) in the file does not "
                                       r"match the model's \(1, 1, 384\)"):
    _load(vit.VisionTransformer("vit_s14"), str(tmp_path / "narrow" / "model.safetensors"))
  # More blocks of the same width: the file's extra blocks have no place in the model.
  deeper = _official_state_dict(_hub_state(_hf_model(0, depth=13), tmp_path / "deep"))
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(deeper, str(tmp_path / "deep.safetensors"))
  with pytest.raises(ValueError, match=r"blocks\.12\.\S+ \(\S+\) has no place in the model's "
                                       r"backbone"):
    _load(vit.VisionTransformer("vit_s14"), str(tmp_path / "deep.safetensors"))


def test_remat_and_drop_path_keep_the_computation():
  encoder = vit.VisionTransformer("vit_s14", drop_path_rate=0.2)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 42, 56, 3)), jnp.float32)
  params = encoder.init(jax.random.key(0), images)["params"]
  rematted = vit.VisionTransformer("vit_s14", drop_path_rate=0.2, remat=True)

  def loss(model, p):
    out = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(3)})
    return jnp.mean(out["tokens"] ** 2)
  value, grads = jax.value_and_grad(lambda p: loss(encoder, p))(params)
  value_r, grads_r = jax.value_and_grad(lambda p: loss(rematted, p))(params)
  np.testing.assert_allclose(value, value_r, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, grads_r)
  # Drop path is on in training (a branch dropped changes the tokens), off in inference.
  trained = encoder.apply({"params": params}, images, train=True,
                          rngs={"dropout": jax.random.key(3)})["tokens"]
  inferred = encoder.apply({"params": params}, images)["tokens"]
  assert not np.allclose(trained, inferred)


@pytest.mark.parametrize("registers, masked", [(0, False), (4, True)])
def test_bfloat16_blocks_keep_a_float32_residual_stream(registers, masked):
  """As autocast in VFM-UDA's fp16-mixed training: the branches compute in bfloat16 and add to a
  float32 stream, so a branch scaled by LayerScale's initial 1e-5 still moves the tokens."""
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 44, 60, 3)), jnp.float32)
  mask = jax.random.bernoulli(jax.random.key(5), 0.5, (2, 3 * 4)) if masked else None
  encoder32 = vit.VisionTransformer("vit_s14", registers=registers, depth=2)
  encoder16 = vit.VisionTransformer("vit_s14", registers=registers, depth=2, dtype=jnp.bfloat16)
  variables = encoder32.init(jax.random.key(0), images)
  embed = lambda model: model.apply(variables, images, mask,
                                    method=lambda m, x, k: m.embed(x, k)[0])
  out32 = encoder32.apply(variables, images, mask=mask)
  out16 = encoder16.apply(variables, images, mask=mask)
  assert all(x.dtype == jnp.float32 for x in [embed(encoder16), *out16["layers"]])
  assert out16["tokens"].dtype == jnp.bfloat16  # The final LayerNorm's output: compute dtype.
  # What the blocks added to the embedded tokens (each about 1e-5 of them) survives in bfloat16.
  added32 = out32["layers"][-1] - embed(encoder32)
  added16 = out16["layers"][-1] - embed(encoder16)
  assert float(jnp.max(jnp.abs(added32))) > 0
  error = float(jnp.max(jnp.abs(added16 - added32)) / jnp.max(jnp.abs(added32)))
  assert error < 0.05, error
