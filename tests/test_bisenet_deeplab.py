"""BiSeNet and DeepLab segmenters: reference parameter counts, peer equivalence, outputs.

Expected counts are written out from each reference's layer list (with
torchvision's published ResNet counts for the trunks); the peer benchmark's
PyTorch models (shared/bench/peers/models_torch.py, beside the clone) are
counted and run, which needs torch and that file (tests/needs.py). ResNet-101
models are only traced (jax.eval_shape).
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from segjax import models
from segjax.models import deeplab, layers, weights
from segjax.models.backbones.resnet import ResNet

import needs  # pylint: disable=wrong-import-order

NUM_CLASSES = 19
# torchvision's published parameter counts of resnet18/50/101, less the ImageNet classifier.
TORCHVISION_TRUNK = {18: 11_689_512 - (512 * 1000 + 1000),
                     50: 25_557_032 - (2048 * 1000 + 1000),
                     101: 44_549_160 - (2048 * 1000 + 1000)}


def conv(cin, cout, k=1, bias=False):
  return k * k * cin * cout + (cout if bias else 0)


def conv_bn(cin, cout, k=1):
  return conv(cin, cout, k) + 2 * cout


def classifier(cin, k=1):
  return conv(cin, NUM_CLASSES, k, bias=True)


def bisenet_r18_peer_layout():
  """The peer's BiSeNetR18 (which has no auxiliary heads)."""
  spatial = conv_bn(3, 64, 7) + 2 * conv_bn(64, 64, 3) + conv_bn(64, 128, 1)
  arms = sum(conv_bn(c, 128, 3) + conv(128, 128) + 2 * 128 for c in (256, 512))
  context = conv_bn(512, 128, 1) + 2 * conv_bn(128, 128, 3)
  ffm = conv_bn(256, 256, 1) + conv(256, 64) + conv(64, 256)
  return (TORCHVISION_TRUNK[18] + spatial + arms + context + ffm + conv_bn(256, 256, 3)
          + classifier(256))


def bisenet_r101_seed_layout():
  """The seed's build_BiSeNet.py with context_path='resnet101', supervision heads included."""
  k = NUM_CLASSES
  spatial = conv_bn(3, 64, 3) + conv_bn(64, 128, 3) + conv_bn(128, 256, 3)
  arms = sum(conv(c, c, bias=True) + 2 * c for c in (1024, 2048))
  supervision = classifier(1024) + classifier(2048)
  ffm = conv_bn(256 + 1024 + 2048, k, 3) + 2 * conv(k, k, bias=True)
  return TORCHVISION_TRUNK[101] + spatial + arms + supervision + ffm + conv(k, k, bias=True)


def deeplabv3plus_layout(depth):
  aspp = 2 * conv_bn(2048, 256, 1) + 3 * conv_bn(2048, 256, 3) + conv_bn(5 * 256, 256, 1)
  decoder = conv_bn(256, 48, 1) + conv_bn(256 + 48, 256, 3) + conv_bn(256, 256, 3)
  return TORCHVISION_TRUNK[depth] + aspp + decoder + classifier(256)


FCN_AUX_HEAD = conv_bn(1024, 256, 3) + classifier(256)  # mmseg's FCNHead on layer3.


def deeplabv2_layout(branches):
  """AdaptSegNet's deeplab_multi.py / ADVENT's deeplabv2.py, counting only the branches used."""
  return TORCHVISION_TRUNK[101] + branches * (classifier(1024, 3) + classifier(2048, 3))


def model_config(name, **fields):
  defaults = dict(sync_batch_stats=False, dtype="float32", param_dtype="float32")
  return ml_collections.ConfigDict({**defaults, "name": name, **fields})


def abstract_init(model, size=(33, 47)):
  """The model's variables as shapes, from an init with train=False (as train.py does)."""
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, *size, 3), jnp.float32))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def trainable_and_frozen_count(variables):
  """Parameters plus the affine terms a frozen BatchNorm keeps in batch_stats.

  That is what PyTorch's `parameters()` counts: it lists frozen BN's weight and
  bias (with requires_grad=False) but not the running statistics.
  """
  frozen = [v for path, v in traverse_util.flatten_dict(variables.get("batch_stats", {})).items()
            if path[-1] in ("scale", "bias")]
  return count(variables["params"]) + count(frozen)


@pytest.mark.parametrize("name, fields, expected", [
    ("bisenet_r18", {}, bisenet_r18_peer_layout() + 2 * classifier(128)),
    ("bisenet_r101", {}, bisenet_r101_seed_layout()),
    ("deeplabv3plus_r50", {}, deeplabv3plus_layout(50)),
    ("deeplabv3plus_r50", {"aux_head": True}, deeplabv3plus_layout(50) + FCN_AUX_HEAD),
    ("deeplabv3plus_r101", {}, deeplabv3plus_layout(101)),
    ("deeplabv2_r101", {}, deeplabv2_layout(4)),
    ("deeplabv2_r101", {"aspp_branches": 2}, deeplabv2_layout(2)),
])
def test_parameter_counts_match_the_reference_layer_lists(name, fields, expected):
  variables = abstract_init(models.build_segmenter(model_config(name, **fields), NUM_CLASSES))
  assert trainable_and_frozen_count(variables) == expected


def test_reference_trunk_counts_are_torchvisions():
  """The ResNet trunks alone, with trainable BatchNorm, against torchvision's counts."""
  for depth, expected in TORCHVISION_TRUNK.items():
    assert count(abstract_init(ResNet(depth=depth))["params"]) == expected


@pytest.fixture(scope="module")
def peers():
  torch = needs.package("torch", "the peer models are PyTorch modules")
  spec = importlib.util.spec_from_file_location("models_torch",
                                                needs.shared("bench/peers/models_torch.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return torch, module


# Our submodule names -> the peer's, where they differ.
PEER_NAMES = {
    "spatial_conv1": "sp.conv1", "spatial_conv2": "sp.conv2", "spatial_conv3": "sp.conv3",
    "spatial_out": "sp.conv_out", "global_context": "conv_avg", "gate_conv": "att_conv",
    "gate_norm": "att_bn", "squeeze": "att1", "excite": "att2", "classifier": "cls",
    "low_level": "low", "decoder1": "dec1", "decoder2": "dec2", "branch0": "b0",
    "branch1": "b1", "branch2": "b2", "branch3": "b3", "project": "proj",
    "Conv_0": "0", "BatchNorm_0": "1"}  # Inside a ConvBNReLU (a Sequential in the peer).


def peer_key(path):
  if path[0] == weights.BACKBONE:  # The peer's ResNet: `stem` Sequential, `down` projections.
    key = ResNet.torch_key(path[1:]).replace(".downsample.", ".down.")
    for ours, theirs in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
      if key.startswith(ours):
        key = theirs + key.removeprefix(ours)
    return "backbone." + key
  *modules, leaf = path
  return ".".join([PEER_NAMES.get(m, m) for m in modules] + [layers.TORCH_LEAF_NAMES[leaf]])


@pytest.mark.parametrize("name, peer_name, extra", [
    ("bisenet_r18", "bisenet_r18", 2 * classifier(128)),  # The peer omits the aux heads.
    ("deeplabv3plus_r50", "deeplabv3p_r50", 0),
])
def test_same_network_as_the_peer_benchmark(peers, name, peer_name, extra):
  """Equal parameter counts, and equal eval outputs once the peer's weights are copied in."""
  torch, module = peers
  theirs = module.build(peer_name, NUM_CLASSES).eval()
  assert (count(abstract_init(models.build_segmenter(model_config(name), NUM_CLASSES))["params"])
          == sum(p.numel() for p in theirs.parameters()) + extra)

  generator = torch.Generator().manual_seed(0)
  for m in theirs.modules():  # Non-trivial statistics, so BatchNorm's wiring is tested too.
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.normal_(0, 0.1, generator=generator)
      m.running_var.uniform_(0.5, 1.5, generator=generator)
      m.bias.data.normal_(0, 0.1, generator=generator)
  state = theirs.state_dict()
  images = np.random.default_rng(0).standard_normal((1, 33, 47, 3)).astype(np.float32)
  ours = models.build_segmenter(model_config(name), NUM_CLASSES)
  copy = lambda path, value: (
      jnp.zeros(value.shape) if path[0].startswith("aux")
      else weights.convert(state[peer_key(path)].numpy(), value.shape, peer_key(path)))
  variables = {
      collection: traverse_util.unflatten_dict(
          {path: copy(path, value) for path, value in traverse_util.flatten_dict(tree).items()})
      for collection, tree in abstract_init(ours).items()}
  with torch.no_grad():
    expected = theirs(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(jax.jit(ours.apply)(variables, images)["logits"], expected,
                             rtol=1e-4, atol=1e-5)


MODELS = [("bisenet_r18", {}, ("aux16", "aux32")),
          ("bisenet_r101", {}, ("aux16", "aux32")),
          ("deeplabv3plus_r50", {}, ()),
          ("deeplabv3plus_r101", {"aux_head": True}, ("aux_head",)),
          ("deeplabv2_r101", {}, ("head_layer3",))]


@pytest.mark.parametrize("name, fields, aux_modules", MODELS)
def test_outputs_at_an_odd_size_with_aux_heads_only_in_training(name, fields, aux_modules):
  """Logits at the input size; aux heads built at init (train=False), returned in training."""
  model = models.build_segmenter(model_config(name, **fields), NUM_CLASSES)
  variables = abstract_init(model)
  assert all(m in variables["params"] for m in aux_modules)
  images = jax.ShapeDtypeStruct((2, 97, 131, 3), jnp.float32)
  train_out, _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)},
                               mutable=["batch_stats"]), variables, images)
  eval_out = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
  for out, num_aux in ((train_out, len(aux_modules)), (eval_out, 0)):
    assert (out["logits"].shape, out["logits"].dtype) == ((2, 97, 131, NUM_CLASSES), jnp.float32)
    assert len(out["aux"]) == num_aux
    assert all((a.shape, a.dtype) == (out["logits"].shape, jnp.float32) for a in out["aux"])


def test_bisenet_r18_trains_and_updates_batch_statistics():
  model = models.build_segmenter(model_config("bisenet_r18"), NUM_CLASSES)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 33, 47, 3)), jnp.float32)
  # The 'rbg' generator compiles in a fraction of threefry's time on CPU.
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images)
  out, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, images)
  assert len(out["aux"]) == 2
  assert all(np.isfinite(x).all() for x in (out["logits"], *out["aux"]))
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, updates["batch_stats"],
                                       variables["batch_stats"]))


@pytest.mark.parametrize("name", ["bisenet_r18", "deeplabv2_r101"])
def test_bfloat16_compute_keeps_float32_parameters_and_logits(name):
  model = models.build_segmenter(model_config(name, dtype="bfloat16"), NUM_CLASSES)
  variables = abstract_init(model)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out, _ = jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]),
                          variables, jax.ShapeDtypeStruct((1, 33, 47, 3), jnp.float32))
  assert {x.dtype for x in (out["logits"], *out["aux"])} == {jnp.dtype(jnp.float32)}


def test_deeplabv2_freezes_every_batchnorm_when_given_backbone_weights():
  config = model_config("deeplabv2_r101", backbone_weights="resnet101.safetensors")
  variables = abstract_init(models.build_segmenter(config, NUM_CLASSES))
  param_leaves = {path[-1] for path in traverse_util.flatten_dict(variables["params"])}
  assert param_leaves == {"kernel", "bias"}  # Convolutions only; the heads' have a bias.
  backbone_params = traverse_util.flatten_dict(variables["params"]["backbone"])
  assert {path[-1] for path in backbone_params} == {"kernel"}
  stats = traverse_util.flatten_dict(variables["batch_stats"]["backbone"])
  assert {path[-1] for path in stats} == {"scale", "bias", "mean", "var"}


class AdaptSegNetClassifier:
  """AdaptSegNet's Classifier_Module.forward: the `return` sits inside the loop."""

  def __init__(self, convs):
    self.convs = convs

  def __call__(self, x):
    out = self.convs[0](x)
    for i in range(len(self.convs) - 1):
      out += self.convs[i + 1](x)
      return out


class AdventClassifier(AdaptSegNetClassifier):
  """ADVENT's ClassifierModule.forward: every branch summed."""

  def __call__(self, x):
    out = self.convs[0](x)
    for i in range(len(self.convs) - 1):
      out += self.convs[i + 1](x)
    return out


@pytest.mark.parametrize("branches, reference", [(2, AdaptSegNetClassifier),
                                                 (4, AdventClassifier)])
def test_aspp_v2_branches_reproduce_adaptsegnet_and_advent(branches, reference):
  torch = needs.package("torch", "the reference classifiers are PyTorch code")
  torch.manual_seed(0)
  convs = [torch.nn.Conv2d(16, 5, 3, padding=d, dilation=d) for d in (6, 12, 18, 24)]
  x = np.random.default_rng(0).standard_normal((1, 29, 37, 16)).astype(np.float32)
  with torch.no_grad():
    expected = reference(convs)(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  head = deeplab.ASPPv2(5, branches)
  params = {f"conv{i}": {"kernel": c.weight.detach().numpy().transpose(2, 3, 1, 0),
                         "bias": c.bias.detach().numpy()}
            for i, c in enumerate(convs[:branches])}
  np.testing.assert_allclose(head.apply({"params": params}, x), expected.numpy(),
                             rtol=1e-5, atol=1e-5)


def test_aspp_v2_two_branches_differ_from_four():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 13, 16)), jnp.float32)
  variables = deeplab.ASPPv2(5, 4).init(jax.random.key(0), x)
  first_two = {"params": {k: variables["params"][k] for k in ("conv0", "conv1")}}
  two, four = deeplab.ASPPv2(5, 2).apply(first_two, x), deeplab.ASPPv2(5, 4).apply(variables, x)
  assert not np.allclose(two, four)
  with pytest.raises(ValueError, match="model.aspp_branches"):
    deeplab.ASPPv2(5, 5).init(jax.random.key(0), x)


def test_deeplabv2_upsamples_with_aligned_corners():
  torch = needs.package("torch", "compared with F.interpolate(align_corners=True)")
  x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), (33, 47),
                                             mode="bilinear", align_corners=True)
  np.testing.assert_allclose(deeplab.resize_bilinear_align_corners(x, 33, 47),
                             expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_from_config_reads_the_model_fields_and_published_defaults():
  build = lambda name, **fields: models.build_segmenter(model_config(name, **fields), 7)
  v3 = build("deeplabv3plus_r101")
  assert (v3.depth, v3.output_stride, v3.dropout_rate, v3.aux_head, v3.norm,
          v3.bn_axis_name) == (101, 16, 0.5, False, "batch", None)
  v3 = models.build_segmenter(model_config("deeplabv3plus_r50", output_stride=8, dropout_rate=0.1,
                                            aux_head=True, norm="frozen", dtype="bfloat16"),
                              7, bn_axis_name="data")  # The mesh's axis: the caller's to give.
  assert (v3.depth, v3.output_stride, v3.dropout_rate, v3.aux_head, v3.norm, v3.bn_axis_name,
          v3.dtype) == (50, 8, 0.1, True, "frozen", "data", jnp.bfloat16)
  v2 = build("deeplabv2_r101", backbone_weights="resnet101.safetensors")
  assert (v2.norm, v2.aspp_branches, v2.num_classes) == ("frozen", 4, 7)
  # Without pretrained weights, frozen statistics would be the identity: BatchNorm trains.
  assert build("deeplabv2_r101").norm == "batch"
  assert build("deeplabv2_r101", aspp_branches=2, norm="batch").aspp_branches == 2
  assert build("bisenet_r101", norm="frozen").norm == "frozen"
  with pytest.raises(ValueError, match="model.output_stride"):
    abstract_init(build("deeplabv3plus_r50", output_stride=32))


@pytest.mark.parametrize("name", ["bisenet_r18", "bisenet_r101", "deeplabv3plus_r50",
                                  "deeplabv2_r101"])
def test_backbone_keys_are_torchvisions(name):
  cls = models.segmenter_class(name)
  assert cls.backbone_torch_key(("layer3_0", "downsample_0", "kernel")) == (
      "layer3.0.downsample.0.weight")
  assert cls.backbone_torch_key(("bn1", "var")) == "bn1.running_var"
