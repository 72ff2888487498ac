"""SegFormer's MiT encoders and the SegFormer / DAFormer heads: sizes, weights, equivalence.

The reference is Hugging Face `transformers`' PyTorch `SegformerModel`, which
nobody here wrote; random-initialised models stand in for the released
weights, saved in the layouts users hold: `save_pretrained` (the Hub's files)
and the official `mit_b*.pth` (a bare state dict, renamed below from the
Hugging Face names with the table of NVlabs' and Hugging Face's conversion
script, not with segjax's code).
"""

import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from segjax import models, parallel
from segjax.models import layers, weights
from segjax.models.backbones import mit
from segjax.models import segformer

import needs  # pylint: disable=wrong-import-order

# Parameters without the ImageNet head, in millions, as the SegFormer paper and DAFormer give them.
PUBLISHED_MILLIONS = {"mit_b0": 3.32, "mit_b1": 13.15, "mit_b2": 24.20, "mit_b3": 44.07,
                      "mit_b4": 60.84, "mit_b5": 81.44}


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _encoder_params_from_shapes(size: str) -> int:
  """The encoder's parameter count from its layer shapes (the official module, layer by layer)."""
  widths, depths = mit.SIZES[size]
  total, channels_in = 0, 3
  for c, depth, ratio, (kernel, _) in zip(widths, depths, (8, 4, 2, 1), mit.PATCH):
    total += kernel * kernel * channels_in * c + c + 2 * c  # patch_embed: proj, norm
    block = 2 * c  # norm1
    block += (c * c + c) + (c * 2 * c + 2 * c) + (c * c + c)  # attn.q, attn.kv, attn.proj
    if ratio > 1:
      block += ratio * ratio * c * c + c + 2 * c  # attn.sr, attn.norm
    hidden = 4 * c
    block += 2 * c + (c * hidden + hidden) + (9 * hidden + hidden) + (hidden * c + c)  # norm2, mlp
    total += depth * block + 2 * c  # blocks, norm
    channels_in = c
  return total


@pytest.mark.parametrize("size", sorted(mit.SIZES))
def test_encoder_parameter_counts_are_the_published_ones(size):
  shapes = jax.eval_shape(mit.MixVisionTransformer(size).init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  count = _count(shapes)
  assert count == _encoder_params_from_shapes(size)
  assert round(count / 1e6, 2) == PUBLISHED_MILLIONS[size]


# --- Hugging Face reference ---------------------------------------------------------------------

def _transformers():
  # transformers' models import torch._dynamo, which imports triton when it is installed (the
  # CUDA wheels of torch bring it); loading triton into a process that has loaded TensorFlow
  # (CLU's writers import it) is a segmentation fault. None in sys.modules makes
  # `import triton` an ImportError, which torch takes as "no triton".
  sys.modules.setdefault("triton", None)
  return needs.package("transformers", "the MiT reference is transformers' SegformerModel")


def _hf_config(size: str):
  transformers = _transformers()
  widths, depths = mit.SIZES[size]
  return transformers.SegformerConfig(hidden_sizes=list(widths), depths=list(depths),
                                      decoder_hidden_size=256 if size == "mit_b0" else 768)


def _hf_model(size: str, seed: int = 0):
  torch = needs.package("torch", "the MiT reference runs in PyTorch")
  transformers = _transformers()
  torch.manual_seed(seed)
  model = transformers.SegformerModel(_hf_config(size)).eval()
  with torch.no_grad():  # Random LayerNorm affines and biases, so that a swapped one shows.
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


# Hugging Face -> official names, as in transformers' convert_segformer_original_to_pytorch.py
# (read in reverse); `kv` is the key rows over the value rows.
_OFFICIAL = [
    (r"encoder\.patch_embeddings\.(\d)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"encoder\.patch_embeddings\.(\d)\.layer_norm\.",
     lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"encoder\.layer_norm\.(\d)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"encoder\.block\.(\d)\.(\d+)\.layer_norm_1\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.norm1."),
    (r"encoder\.block\.(\d)\.(\d+)\.layer_norm_2\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.norm2."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.query\.",
     lambda m: f"block{int(m[1]) + 1}.{m[2]}.attn.q."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.sr\.",
     lambda m: f"block{int(m[1]) + 1}.{m[2]}.attn.sr."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.layer_norm\.",
     lambda m: f"block{int(m[1]) + 1}.{m[2]}.attn.norm."),
    (r"encoder\.block\.(\d)\.(\d+)\.attention\.output\.dense\.",
     lambda m: f"block{int(m[1]) + 1}.{m[2]}.attn.proj."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dense1\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.mlp.fc1."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dense2\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.mlp.fc2."),
    (r"encoder\.block\.(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.",
     lambda m: f"block{int(m[1]) + 1}.{m[2]}.mlp.dwconv.dwconv."),
]


def _official_state_dict(hf_state: dict) -> dict:
  """The official `mit_b*.pth` state dict of a Hugging Face SegformerModel's, with the ImageNet
  classifier (`head`) the released files carry."""
  out, kv = {}, {}
  for key, value in hf_state.items():
    attention = re.match(r"encoder\.block\.(\d)\.(\d+)\.attention\.self\.(key|value)\.(\w+)$", key)
    if attention:
      stage, block, part, leaf = attention.groups()
      kv.setdefault(f"block{int(stage) + 1}.{block}.attn.kv.{leaf}", {})[part] = value
      continue
    for pattern, name in _OFFICIAL:
      match = re.match(pattern, key)
      if match:
        out[name(match) + key[match.end():]] = value
        break
    else:
      raise AssertionError(f"unmapped Hugging Face key {key}")
  for key, parts in kv.items():
    out[key] = np.concatenate([parts["key"], parts["value"]])
  width = next(v.shape[0] for k, v in out.items() if k == "norm4.weight")
  rng = np.random.default_rng(0)
  out["head.weight"] = rng.normal(size=(1000, width)).astype(np.float32)
  out["head.bias"] = np.zeros(1000, np.float32)
  return out


def _hub_state(model, directory) -> dict:
  """The state dict in the Hub's names, as `save_pretrained` writes it (transformers 5 renames
  its modules in memory and back on saving)."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  model.save_pretrained(directory)
  return load_file(os.path.join(directory, "model.safetensors"))


def _load_encoder(size: str, path: str):
  """MixVisionTransformer variables for `size` with the backbone of the file at `path`."""
  encoder = mit.MixVisionTransformer(size)
  params = jax.jit(encoder.init)(jax.random.key(1), jnp.zeros((1, 64, 64, 3)))["params"]
  loaded, report = weights.load_backbone({"params": {"backbone": params}}, path,
                                         segformer.MiTSegmenter.backbone_torch_key)
  return encoder, loaded["params"]["backbone"], report


def _hf_stages(model, images: np.ndarray) -> list[np.ndarray]:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                output_hidden_states=True)
  return [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states]


@pytest.mark.parametrize("layout", ["hf_safetensors", "official_pth", "official_safetensors"])
def test_each_stage_equals_hugging_face_segformer_with_the_same_weights(layout, tmp_path):
  torch = needs.package("torch", "the MiT reference runs in PyTorch")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  model = _hf_model("mit_b0")
  if layout == "hf_safetensors":
    model.save_pretrained(tmp_path / "hf")
    path = str(tmp_path / "hf" / "model.safetensors")
  else:
    state = _official_state_dict(_hub_state(model, tmp_path / "hub"))
    if layout == "official_pth":
      path = str(tmp_path / "mit_b0.pth")
      torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    else:
      path = str(tmp_path / "mit_b0.safetensors")
      save_file(state, path)
  encoder, params, report = _load_encoder("mit_b0", path)
  assert report.layout == (weights.HF_SEGFORMER if layout == "hf_safetensors" else weights.MIT)
  assert report.unused == ([] if layout == "hf_safetensors" else ["head.bias", "head.weight"])
  assert len(report.loaded) == len(jax.tree.leaves(params))

  images = np.random.default_rng(0).normal(size=(2, 83, 117, 3)).astype(np.float32)
  ours = encoder.apply({"params": params}, jnp.asarray(images))
  theirs = _hf_stages(model, images)
  assert [o.shape for o in ours] == [t.shape for t in theirs] == [
      (2, 21, 30, 32), (2, 11, 15, 64), (2, 6, 8, 160), (2, 3, 4, 256)]
  for stage, (o, t) in enumerate(zip(ours, theirs), start=1):
    np.testing.assert_allclose(np.asarray(o), t, atol=1e-4, rtol=1e-4, err_msg=f"stage {stage}")


def test_a_segformer_for_semantic_segmentation_file_loads_its_encoder(tmp_path):
  """The Hub's SegformerFor... files nest the encoder under 'segformer.'; the rest is reported."""
  transformers = _transformers()
  needs.package("torch", "the MiT reference runs in PyTorch")
  full = transformers.SegformerForSemanticSegmentation(_hf_config("mit_b0"))
  state = _hub_state(full, tmp_path / "full")
  _, params, report = _load_encoder("mit_b0", str(tmp_path / "full" / "model.safetensors"))
  assert report.layout == weights.HF_SEGFORMER
  assert report.unused and all(k.startswith("decode_head.") for k in report.unused)
  np.testing.assert_array_equal(
      np.asarray(params["block2_1"]["attn"]["kv"]["kernel"]),
      np.concatenate([state["segformer.encoder.block.1.1.attention.self.key.weight"],
                      state["segformer.encoder.block.1.1.attention.self.value.weight"]]).T)


def test_a_file_of_another_size_is_an_error_naming_the_key_and_shapes(tmp_path):
  torch = needs.package("torch", "the MiT reference runs in PyTorch")
  b0 = _official_state_dict(_hub_state(_hf_model("mit_b0"), tmp_path / "b0"))
  torch.save({k: torch.from_numpy(v) for k, v in b0.items()}, tmp_path / "mit_b0.pth")
  # The first key that differs in the model's (sorted) order: B0's key and value rows of 32.
  with pytest.raises(ValueError, match=r"block1\.0\.attn\.kv\.bias: shape \(64,\) in the file "
                                       r"does not match the model's \(128,\)"):
    _load_encoder("mit_b1", str(tmp_path / "mit_b0.pth"))
  # MiT-B2 has B1's widths and more blocks: B1 would load all its keys and leave B2's over.
  b2 = _official_state_dict(_hub_state(_hf_model("mit_b2"), tmp_path / "b2"))
  torch.save({k: torch.from_numpy(v) for k, v in b2.items()}, tmp_path / "mit_b2.pth")
  with pytest.raises(ValueError, match=r"block1\.2\.attn\.kv\.bias \(128,\) has no place in the "
                                       r"model's backbone \(\d+ such keys\); is it another size"):
    _load_encoder("mit_b1", str(tmp_path / "mit_b2.pth"))


def test_a_resnet_file_is_refused_by_a_mit_segmenter_and_a_mit_file_by_a_resnet(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, tmp_path / "r.safetensors")
  with pytest.raises(ValueError, match=r"holds torchvision's layout \(.*\), which this model \(model.name\) does not read: "
                                       r"it reads the official SegFormer MiT layout"):
    _load_encoder("mit_b0", str(tmp_path / "r.safetensors"))
  save_file({"patch_embed1.proj.weight": np.zeros((32, 3, 7, 7), np.float32)},
            tmp_path / "m.safetensors")
  from segjax.models import bisenet  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="holds the official SegFormer MiT layout.*The MiT "
                                       "segmenters"):
    weights.load_backbone({"params": {"backbone": {}}}, str(tmp_path / "m.safetensors"),
                          bisenet.BiSeNetR18.backbone_torch_key)


# --- Heads and segmenters -----------------------------------------------------------------------

def _conv_bn(cin, cout, k=1, groups=1):
  return k * k * cin // groups * cout + 2 * cout


def test_decode_heads_have_the_published_structure():
  """Parameter counts from the layer shapes of mmseg's SegFormerHead and DAFormer's
  DAFormerHead (daformer_sepaspp_mitb5), for 19 classes."""
  k = 19
  widths = mit.SIZES["mit_b5"][0]
  features = [jnp.zeros((1, 16 // 2 ** i, 16 // 2 ** i, c)) for i, c in enumerate(widths)]

  def head_params(head):
    variables = jax.eval_shape(lambda: head.init(jax.random.key(0), features, False))
    return _count(variables["params"])

  e = 768
  segformer_head = sum(c * e + e for c in widths) + _conv_bn(4 * e, e) + e * k + k
  assert head_params(segformer.SegFormerHead(k, e)) == segformer_head
  e, cin = 256, 4 * 256
  daformer_head = (sum(c * e + e for c in widths)  # embeddings
                   + _conv_bn(cin, e)  # the 1x1 branch
                   + 3 * (_conv_bn(cin, cin, 3, groups=cin) + _conv_bn(cin, e))  # dilated
                   + _conv_bn(4 * e, e, 3)  # bottleneck
                   + e * k + k)
  assert head_params(segformer.DAFormerHead(k)) == daformer_head


@pytest.mark.parametrize("name", ["daformer_mitb0", "segformer_mitb0"])
def test_segmenter_logits_come_back_at_an_odd_input_size(name):
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({"name": name, "dtype": "float32",
                                      "param_dtype": "float32", "dropout_rate": 0.1})
  model = models.build_segmenter(config, 5)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 83, 117, 3)), jnp.float32)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images,
                         train=False)
  out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(2)})
  assert out["logits"].shape == (2, 83, 117, 5) and out["logits"].dtype == jnp.float32
  assert out["features"].shape == (2, 3, 4, 256)
  assert out["aux"] == ()


def test_drop_path_drops_whole_examples_alike_on_any_device_count():
  x = jnp.ones((8, 4, 4, 3))
  drop = layers.DropPath(0.5)

  def apply(x):
    return drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})

  def run(n):
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    return np.asarray(parallel.data_parallel(apply, mesh, in_specs=(P("data"),),
                                             out_specs=P("data"))(x))

  on8, on1 = run(8), run(1)
  np.testing.assert_array_equal(on8, on1)
  per_example = on1.reshape(8, -1)
  assert set(np.unique(per_example)) <= {0.0, 2.0}
  assert all(len(np.unique(row)) == 1 for row in per_example)  # All or nothing per example.
  assert 0 < (per_example[:, 0] == 0).sum() < 8


def test_remat_gives_the_same_gradients_and_parameters():
  """A block (of MiT-B0's stage 2, with drop path) recomputed in the backward pass gives the
  gradients of the plain one; the encoder's parameters do not change with remat."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 10, 64)), jnp.float32)
  block = lambda remat: mit.block_class(remat)(heads=2, ratio=4, drop_path=0.1)
  params = block(False).init(jax.random.key(0), x, True)["params"]

  def grads(model):
    loss = lambda p, x: jnp.mean(model.apply({"params": p}, x, True,
                                             rngs={"dropout": jax.random.key(4)}) ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-8),
               grads(block(True)), grads(block(False)))
  shapes = lambda remat: jax.tree.map(lambda a: a.shape, jax.eval_shape(
      mit.MixVisionTransformer("mit_b0", remat=remat).init, jax.random.key(0),
      jnp.zeros((1, 64, 64, 3))))
  assert shapes(True) == shapes(False)


def _stacked(unrolled: dict, scanned: dict) -> dict:
  """The unrolled encoder's params in the scanned layout: block{s}_{i} stacked as block{s}."""
  return {name: (jax.tree.map(lambda *blocks: jnp.stack(blocks),
                              *[unrolled[f"{name}_{i}"] for i in range(jax.tree.leaves(
                                  value)[0].shape[0])])
                 if re.fullmatch(r"block\d", name) else unrolled[name])
          for name, value in scanned.items()}


def test_scanned_stages_load_the_same_weights_and_give_the_unrolled_blocks_outputs(tmp_path):
  """model.scan_blocks: a MiT file loads into the stacked layout (block i of a stage at index
  i), and the scanned encoder's stages and gradients are the unrolled one's."""
  needs.package("torch", "the MiT file is written from a PyTorch SegFormer")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "mit_b0.safetensors")
  save_file(_official_state_dict(_hub_state(_hf_model("mit_b0"), tmp_path / "hub")), path)
  encoder, unrolled, report = _load_encoder("mit_b0", path)
  scanned_encoder = mit.MixVisionTransformer("mit_b0", scan=True)
  init = jax.jit(scanned_encoder.init)(jax.random.key(1), jnp.zeros((1, 64, 64, 3)))["params"]
  assert set(init) >= {"block1", "block4"} and "block1_0" not in init
  loaded, scanned_report = weights.load_backbone({"params": {"backbone": init}}, path,
                                                 segformer.MiTSegmenter.backbone_torch_key)
  scanned = loaded["params"]["backbone"]
  assert sorted(scanned_report.loaded) == sorted(report.loaded)
  assert "block3.1.attn.kv.weight" in scanned_report.loaded
  jax.tree.map(np.testing.assert_array_equal, scanned, _stacked(unrolled, init))

  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 45, 61, 3)), jnp.float32)

  def stages_and_grads(model, params):  # One compile each: the stages and their loss's gradients.
    def loss(p):
      stages = model.apply({"params": p}, images)
      return sum(jnp.mean(s ** 2) for s in stages), stages
    grads, stages = jax.jit(jax.grad(loss, has_aux=True))(params)
    return stages, grads

  ours, our_grads = stages_and_grads(scanned_encoder, scanned)
  theirs, their_grads = stages_and_grads(encoder, unrolled)
  for o, t in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(o), np.asarray(t), rtol=1e-5, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7),
               our_grads, _stacked(their_grads, init))


def test_scanned_stages_drop_paths_alike_on_any_device_count_with_remat():
  """Training mode, stochastic depth on (0.5, to see it), scanned and recomputed: 8 devices'
  shards give 1 device's stages, and the drops change them."""
  encoder = mit.MixVisionTransformer("mit_b0", 0.5, remat=True, scan=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
  params = encoder.init(jax.random.key(0), x[:1])["params"]

  def apply(x):
    return encoder.apply({"params": params}, x, True, rngs={"dropout": jax.random.key(5)})

  def run(n):
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    return [np.asarray(s) for s in parallel.data_parallel(
        apply, mesh, in_specs=(P("data"),), out_specs=P("data"))(x)]

  on8, on1 = run(8), run(1)
  for a, b in zip(on8, on1):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  plain = jax.jit(encoder.apply)({"params": params}, x)
  assert not np.allclose(on1[-1], np.asarray(plain[-1]), atol=1e-3)  # Something was dropped.


def test_a_mit_segmenter_reads_scan_blocks_from_its_config():
  config = ml_collections.ConfigDict({"name": "daformer_mitb0", "scan_blocks": True,
                                      "dtype": "float32", "param_dtype": "float32"})
  model = models.build_segmenter(config, num_classes=4)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert shapes["params"]["backbone"]["block2"]["attn"]["q"]["kernel"].shape == (2, 64, 64)
