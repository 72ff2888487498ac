"""VFM-UDA++: the ViT-Adapter segmenter, its checkpoints, the layer-wise learning rates, the
feature distance and the masks. (4 = 1 devices at batch 4 and resume: tests/test_methods.py's
'vfm_uda_pp', in the slow set; the whole segmenter against the official PyTorch code:
benchmarks/vfmpp_reference.py.)"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import vfm_uda_pp as vfm_uda_pp_config
from segjax import methods, optim, validation
from segjax.data import pipeline
from segjax.methods import daformer
from segjax.models import vit_adapter, weights
from segjax.models.backbones import vit

import test_vit  # pylint: disable=wrong-import-order


def test_deformable_sampling_is_grid_samples_weighted_sum():
  """Against PyTorch's grid_sample (bilinear, zeros outside, align_corners=False) per level and
  head, weighted and summed as the official `ms_deform_attn_core_pytorch` does; locations
  reach outside the maps."""
  torch = test_vit._torch()  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  shapes = [(6, 10), (3, 5), (2, 3)]
  n, lq, m, dh, p = 2, 7, 3, 4, 4
  value = rng.normal(size=(n, sum(h * w for h, w in shapes), m, dh)).astype(np.float32)
  locations = rng.uniform(-0.2, 1.2, size=(n, lq, m, len(shapes), p, 2)).astype(np.float32)
  attention = rng.uniform(size=(n, lq, m, len(shapes), p)).astype(np.float32)
  ours = vit_adapter.deformable_attention(jnp.asarray(value), shapes, jnp.asarray(locations),
                                          jnp.asarray(attention))
  expected = np.zeros((n, lq, m, dh), np.float32)
  start = 0
  for level, (h, w) in enumerate(shapes):
    v = torch.from_numpy(value[:, start:start + h * w]).permute(0, 2, 3, 1).reshape(n * m, dh, h, w)
    start += h * w
    grid = torch.from_numpy(2 * locations[:, :, :, level] - 1).permute(0, 2, 1, 3, 4).reshape(
        n * m, lq, p, 2)
    sampled = torch.nn.functional.grid_sample(v, grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False)  # (N*M, Dh, Lq, P)
    sampled = sampled.reshape(n, m, dh, lq, p).numpy()
    expected += np.einsum("nmdqp,nqmp->nqmd", sampled, attention[:, :, :, level])
  np.testing.assert_allclose(np.asarray(ours), expected.reshape(n, lq, m * dh), rtol=1e-5,
                             atol=1e-5)


def test_pytorch_transposed_convolutions_read_as_pytorch_computes_them():
  """A ConvTranspose2d(2, stride 2) weight of a VFM-UDA++ checkpoint, through `from_vfmpp` and
  the loader's conversion, gives flax's ConvTranspose PyTorch's output."""
  torch = test_vit._torch()  # pylint: disable=protected-access
  layer = torch.nn.ConvTranspose2d(6, 4, 2, stride=2)
  x = np.random.default_rng(0).normal(size=(1, 3, 5, 6)).astype(np.float32)
  with torch.no_grad():
    expected = layer(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  state = {"network.encoder.up.weight": layer.weight.detach().numpy(),
           "network.encoder.up.bias": layer.bias.detach().numpy()}
  converted = vit_adapter.from_vfmpp(state)
  module = vit_adapter._conv_transpose(4, "up", jnp.float32, jnp.float32)  # pylint: disable=protected-access
  params = {"kernel": weights.convert(converted["up.weight"], (2, 2, 6, 4), "up.weight"),
            "bias": converted["up.bias"]}
  got = module.apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def _model(**kw):
  return vit_adapter.VFMPPViTS14(num_classes=5, depth=4, **kw)


def test_the_adapter_gives_four_levels_of_a_non_square_input():
  # VFM-UDA++'s 1024 -> 1120; each side on its own, cut to a multiple of 224 (at least 224).
  assert _model().encoder_size(1024, 1024) == (1120, 1120)
  assert _model().encoder_size(1024, 2048) == (1120, 2240)
  model = _model(input_scale=3.5)
  assert model.encoder_size(64, 128) == (224, 448) and model.encoder_size(10, 10) == (224, 224)
  images = jax.random.uniform(jax.random.key(0), (2, 64, 128, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  features = model.apply(variables, images, method="encode")
  assert [f.shape for f in features] == [(2, 56, 112, 384), (2, 28, 56, 384),
                                         (2, 14, 28, 384), (2, 7, 14, 384)]
  out = model.apply(variables, images)
  assert out["logits"].shape == (2, 64, 128, 5) and out["features"].shape == (2, 7, 14, 384)
  # The injectors start as the identity (gamma 0), as the official init.
  gammas = [variables["params"]["adapter"][f"interactions_{i}"]["injector"]["gamma"]
            for i in range(4)]
  assert all(not np.any(g) for g in gammas)
  with pytest.raises(ValueError, match="multiple of 4"):
    vit_adapter.VFMPPViTS14(num_classes=5, depth=6).init(jax.random.key(0), images)


def _vfmpp_file(variables: dict, path: str) -> None:
  """The segmenter's variables as VFM-UDA++'s Lightning checkpoint, in PyTorch's layouts, with
  an EMA copy the loader must leave unused."""
  torch = test_vit._torch()  # pylint: disable=protected-access
  state = {}
  for collection in ("params", "batch_stats"):
    for path_, value in traverse_util.flatten_dict(variables[collection]).items():
      value = np.asarray(value)
      if path_[0] == "backbone":
        key = vit.VisionTransformer.torch_key(path_[1:])
        if key == "mask_token":
          continue  # VFM-UDA++'s adapter has none.
      else:
        key = vit_adapter.head_key(path_)
        if key is None:
          continue
      if key in ("up.weight", "upscale.up_conv1.weight", "upscale.up_conv2.weight",
                 "upscale.up_conv3.weight"):
        value = value[::-1, ::-1].transpose(2, 3, 0, 1)  # HWIO, mirrored -> (in, out, kh, kw).
      elif value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif value.ndim == 2 and key != "level_embed":
        value = value.T
      prefix = ("network." if key.startswith(("upscale.", "out.")) else "network.encoder.")
      state[prefix + key] = torch.from_numpy(np.ascontiguousarray(value))
  state["network_ema.out.weight"] = state["network.out.weight"]
  torch.save({"state_dict": state, "global_step": 1}, path)


def test_a_vfm_uda_pp_checkpoint_loads_every_variable_but_the_distillation_head(tmp_path):
  model = _model(input_scale=1.0, distill_features=16)
  images = jax.random.uniform(jax.random.key(0), (1, 224, 224, 3))
  source = jax.device_get(jax.jit(model.init)(jax.random.key(1), images))
  source = jax.tree.map(lambda x: x + np.random.default_rng(0).normal(size=x.shape).astype(
      x.dtype) * 0.05, source)
  path = str(tmp_path / "vfmpp.ckpt")
  _vfmpp_file(source, path)
  fresh = jax.device_get(jax.jit(model.init)(jax.random.key(2), images))
  loaded, report = weights.load_backbone(fresh, path, model.backbone_torch_key)
  assert report.layout == weights.VFMPP and report.unused == ["network_ema.out.weight"]
  assert report.skipped == ["mask_token (the file has none; it keeps its initialisation)"]
  for collection in ("params", "batch_stats"):
    flat_loaded = traverse_util.flatten_dict(loaded[collection])
    for path_, value in traverse_util.flatten_dict(source[collection]).items():
      if path_[0] == "distill" or path_[-1] == "mask_token":
        continue
      np.testing.assert_array_equal(flat_loaded[path_], value, err_msg=str(path_))
  np.testing.assert_array_equal(loaded["params"]["distill"]["feat_project_0"]["kernel"],
                                fresh["params"]["distill"]["feat_project_0"]["kernel"])


def test_a_plain_dinov2_file_gives_the_vit_and_leaves_its_final_norm_unused(tmp_path):
  """The adapter never runs the ViT's final norm: a DINOv2 file's `norm.*` is reported unused,
  not an error; a file of another width names the key and both shapes."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  hub = test_vit._hub_state(test_vit._hf_model(0, depth=4), tmp_path / "hub")  # pylint: disable=protected-access
  official = test_vit._official_state_dict(hub)  # pylint: disable=protected-access
  save_file(official, str(tmp_path / "dinov2.safetensors"))
  model = _model(input_scale=1.0)
  variables = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  loaded, report = weights.load_backbone(variables, str(tmp_path / "dinov2.safetensors"),
                                         model.backbone_torch_key)
  assert report.layout == weights.DINOV2
  assert report.unused == ["head.weight", "norm.bias", "norm.weight"]
  np.testing.assert_array_equal(loaded["params"]["backbone"]["cls_token"], official["cls_token"])
  save_file(test_vit._official_state_dict(test_vit._hub_state(  # pylint: disable=protected-access
      test_vit._hf_model(0, depth=4, width=128), tmp_path / "narrow")),  # pylint: disable=protected-access
      str(tmp_path / "narrow.safetensors"))
  with pytest.raises(ValueError, match=r"blocks\.0\.attn\.proj\.bias: shape \(128,\) in the "
                                       r"file does not match the model's \(384,\)"):
    weights.load_backbone(variables, str(tmp_path / "narrow.safetensors"),
                          model.backbone_torch_key)


def test_layer_wise_decay_is_adamw_with_vfm_uda_pps_parameter_groups():
  """Three AdamW steps against PyTorch's AdamW with VFM-UDA++'s groups: the decoder at the
  lr x 10 (head_lr_mult), block i of n at lr x 0.9^(n-1-i), the embeddings at lr x 0.9^n;
  weight decay on every group; the poly(1) schedule's lr at each step."""
  torch = test_vit._torch()  # pylint: disable=protected-access
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-2, b1=0.9, b2=0.999, weight_decay=0.01, power=1.0, head_lr_mult=10.0,
      layer_decay=0.9, warmup_steps=0, no_decay=()))
  rng = np.random.default_rng(0)
  params = {"backbone": {"blocks_0": {"kernel": rng.normal(size=(3, 2))},
                         "blocks_1": {"kernel": rng.normal(size=(2, 2))},
                         "blocks_2": {"bias": rng.normal(size=(2,))},
                         "pos_embed": rng.normal(size=(1, 4, 2))},
            "adapter": {"level_embed": rng.normal(size=(3, 2))},
            "head": {"out": {"kernel": rng.normal(size=(2, 5))}}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  multipliers = {("backbone", "blocks_0", "kernel"): 0.9 ** 2,
                 ("backbone", "blocks_1", "kernel"): 0.9, ("backbone", "blocks_2", "bias"): 1.0,
                 ("backbone", "pos_embed"): 0.9 ** 3, ("adapter", "level_embed"): 10.0,
                 ("head", "out", "kernel"): 10.0}
  flat = traverse_util.flatten_dict(params)
  for path, mult in multipliers.items():
    assert optim.layer_multiplier(path, 3, 10.0, 0.9) == pytest.approx(mult)
  tx, schedule = optim.segmenter_optimizer(config, num_steps=10)
  tensors = {path: torch.nn.Parameter(torch.from_numpy(np.array(value)))
             for path, value in flat.items()}
  torch_opt = torch.optim.AdamW(
      [{"params": [tensors[path]], "lr": config.lr * multipliers[path]} for path in flat],
      lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  state = tx.init(params)
  for step in range(3):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    factor = float(schedule(step)) / config.lr
    for group, path in zip(torch_opt.param_groups, flat):
      group["lr"] = config.lr * multipliers[path] * factor
      tensors[path].grad = torch.from_numpy(np.array(traverse_util.flatten_dict(grads)[path]))
    torch_opt.step()
  for path, value in traverse_util.flatten_dict(params).items():
    np.testing.assert_allclose(value, tensors[path].detach().numpy(), rtol=1e-5, atol=1e-6,
                               err_msg=str(path))


def test_the_feature_distance_is_smooth_l1_and_cosine_as_pytorch_computes_them():
  torch = test_vit._torch()  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  student = rng.normal(size=(2, 3, 4, 8)).astype(np.float32) * 2
  frozen = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  total, count = daformer.feature_distance_loss(jnp.asarray(student), jnp.asarray(frozen))
  s, f = (torch.from_numpy(a.transpose(0, 3, 1, 2)) for a in (student, frozen))
  expected = (torch.nn.functional.smooth_l1_loss(s, f, reduction="none").mean(1) * 0.1
              + (1 - torch.nn.functional.cosine_similarity(s, f)) * 0.9).mean()
  assert count == 24
  np.testing.assert_allclose(float(total / count), float(expected), rtol=1e-5)


def _method_config(**adapt):
  config = vfm_uda_pp_config.get_config()
  config.model.input_scale = 3.5
  config.data.crop_size = (32, 64)
  config.adapt.update(adapt)
  return config


def test_block_masks_are_drawn_at_the_encoders_resolution_and_source_images_augmented():
  method = methods.build(_method_config(), 5)
  keys = jax.random.split(jax.random.key(0), 4)
  keep = method.draw_masks(keys, pipeline.crop_size(method.config, "target"))["keep"]
  # 32x64 crops seen at 224x224: round(224 / 16) = 14 cells a side, 70% masked.
  assert keep.shape == (4, 224, 224)
  cells = np.asarray(keep)[:, ::16, ::16]
  assert np.array_equal(np.repeat(np.repeat(cells, 16, 1), 16, 2), np.asarray(keep))
  assert 0.2 < cells.mean() < 0.4
  np.testing.assert_array_equal(method.draw_masks(keys[2:], (32, 64))["keep"], keep[2:])
  images = jax.random.uniform(jax.random.key(1), (4, 32, 64, 3), maxval=255.0)
  augmented = method.source_images(images, keys)
  assert augmented.shape == images.shape and not np.allclose(augmented, images)
  assert float(jnp.min(augmented)) >= 0 and float(jnp.max(augmented)) <= 255
  method.adapt.st_source_strong = False  # VFM-UDA++'s else branch: the weak jitter.
  np.testing.assert_allclose(method.source_images(images, keys), jax.vmap(
      lambda image, key: daformer.weak_jitter(image, jax.random.fold_in(key, 7)))(images, keys),
                             rtol=1e-5, atol=1e-4)
  method.adapt.st_source_weak = False
  np.testing.assert_array_equal(method.source_images(images, keys), images)


def _dinov2_file(path: str, size: str = "vit_s14", registers: int = 4) -> None:
  """A random-init DINOv2 in the official layout (`dinov2_vits14_reg4_pretrain.pth`'s keys)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  model = vit.VisionTransformer(size, registers)
  params = jax.device_get(
      jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 28, 28, 3)))["params"])
  state = {}
  for path_, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value)
    value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
    state[vit.VisionTransformer.torch_key(path_)] = np.ascontiguousarray(value)
  state["mask_token"] = state["mask_token"].reshape(1, -1)
  save_file(state, path)


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_reg4.safetensors")
  _dinov2_file(path)
  return path


def test_the_feature_distance_needs_its_weights_and_a_matching_head(dinov2_file):
  config = _method_config(fd_weights=dinov2_file, fd_model="vit_s14", fd_size=(28, 56))
  with pytest.raises(ValueError, match="model.distill_features=0: the distillation head must "
                                       "give the frozen vit_s14's 384 channels"):
    methods.build(config, 5)
  config.model.distill_features = 384
  method = methods.build(config, 5)
  assert method.fd and "vfm" in method.state_inits(jax.random.key(0), lambda: None)
  assert not methods.build(_method_config(), 5).fd  # No weights: off.
  config.adapt.fd_weights = os.path.join(os.path.dirname(dinov2_file), "missing.pth")
  method = methods.build(config, 5)
  with pytest.raises(FileNotFoundError, match="adapt.fd_weights="):
    method.load_initial({"vfm": {}}, None)


def test_the_published_recipe_and_the_built_in_one():
  config = vfm_uda_pp_config.get_config("gta5=/g,cityscapes=/c")
  assert config.batch_size == 8 and config.eval_batch_size == 1
  config.eval_batch_size = 8  # The recipe's 1 would not split over this session's 8 devices.
  validation.validate_config(config)
  assert config.model.name == "vfmpp_vit_l14" and config.model.distill_features == 1024
  assert config.adapt.method == "vfm_uda_pp" and config.adapt.fd_model == "vit_l14"
  assert (config.adapt.fd_registers, config.adapt.fd_source, config.adapt.fd_target) == (
      4, 0.1, 0.1)
  assert config.adapt.mic_block == 64 and config.adapt.mic_ratio == 0.7
  assert tuple(config.adapt.fd_size) == (406, 406)
  # 1e-5 x sqrt(8) for the decoder; the ViT's last block at 0.1 of it, 0.9 a layer below.
  seg = config.optim.seg
  assert seg.lr * seg.head_lr_mult == pytest.approx(1e-5 * np.sqrt(8))
  assert (seg.head_lr_mult, seg.layer_decay, seg.weight_decay, tuple(seg.no_decay)) == (
      10.0, 0.9, 0.01, ())
  assert (seg.warmup_steps, seg.warmup_ratio, config.num_train_steps) == (1500, 1e-3, 40_000)
  assert tuple(config.data.crop_size) == (1024, 1024)
  assert tuple(config.data.target.pseudo_margins) == (30, 256, 61, 61)
  built_in = vfm_uda_pp_config.get_config()
  validation.validate_config(built_in)
  assert built_in.model.name == "vfmpp_vit_s14" and built_in.data.source.name == "street_scenes"
  assert built_in.adapt.fd_weights == "" and built_in.model.distill_features == 0


def test_bfloat16_keeps_the_vits_and_the_adapters_token_streams_in_float32():
  """As autocast in VFM-UDA++'s fp16-mixed training: the injectors, the ViT's blocks and the
  extractors compute in bfloat16 and add to float32 token streams."""
  images = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3))  # 224x224 in the encoder.
  variables = jax.jit(_model(input_scale=7.0).init)(jax.random.key(1), images)
  streams = (vit_adapter.Injector, vit_adapter.Extractor, vit.Block)
  _, state = jax.jit(lambda v, x: _model(input_scale=7.0, dtype=jnp.bfloat16).apply(
      v, x, capture_intermediates=lambda module, _: isinstance(module, streams),
      mutable=["intermediates"]))(variables, images)
  outputs = jax.tree.leaves(state["intermediates"])
  # An injector, a block (depth 4) and an extractor per interaction; the last has 2 more
  # extractors.
  assert len(outputs) == 4 + 4 + 4 + 2
  assert {x.dtype for x in outputs} == {jnp.dtype(jnp.float32)}
