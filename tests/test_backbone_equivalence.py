"""The backbones reproduce torchvision's networks when loaded with their weights.

The reference networks are built here in plain PyTorch with torchvision's
module names (torchvision itself is not needed), so their state dicts carry
torchvision's keys, the ImageNet classifier (`fc`, `classifier.6`) included.
They are randomly initialised, BatchNorm statistics and affine terms too, so
every tensor the loader maps is exercised; a single misplaced or transposed
tensor changes the outputs. DeepLab-v2 is checked the same way in both its
styles: against the Caffe ResNet-101 and classifier of AdaptSegNet's and
ADVENT's init files, saved under their 'Scale.' keys, and against
torchvision's dilated ResNet-101.

"Matches within 1e-4" means, for every stage output:
`max |ours - torch| / max |torch| <= 1e-4`, i.e. the largest error is at most
1e-4 of the stage's largest activation. The weights are scaled so that
activations are O(1) (largest 2.5 to 14), so this is also about an absolute
1e-4; the measured ratios are about 1e-6 (`pytest -s` prints them), the
float32 rounding of two convolution libraries, and a 1% change of one
BatchNorm channel deep in ResNet-18 gives 8e-4. XLA on CPU computes float32
convolutions in float32, so no matmul-precision setting is needed.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from segjax import models
from segjax.models import deeplab, weights
from segjax.models.backbones import VGG16, ResNet
from segjax.tools import convert_weights

import needs  # pylint: disable=wrong-import-order

torch = needs.package("torch", "the torchvision reference networks need PyTorch")
safetensors_torch = needs.package("safetensors.torch", "the references' state dicts are saved "
                                  "as .safetensors")
tnn = torch.nn
F = torch.nn.functional

TOLERANCE = 1e-4
RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
VGG_STAGES = ("pool3", "pool4", "pool5", "fc7")
NUM_CLASSES = 19
# DeepLab's Caffe input (BGR pixels in 0-255 less IMG_MEAN) from segjax's (RGB in [0, 1] less
# ImageNet's mean, over its std), written out here so that the model's own conversion is checked.
CAFFE_BGR_MEAN = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_INPUT_SCALE = 58.0  # The spread of Caffe's input: about 255 times ImageNet's std.


# ---------------------------------------------------------------------------
# torchvision's networks, with its module names.
# ---------------------------------------------------------------------------


class FrozenBatchNorm2d(tnn.Module):
  """torchvision.ops.misc.FrozenBatchNorm2d: fixed statistics and affine buffers."""

  def __init__(self, num_features: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.register_buffer("weight", torch.ones(num_features))
    self.register_buffer("bias", torch.zeros(num_features))
    self.register_buffer("running_mean", torch.zeros(num_features))
    self.register_buffer("running_var", torch.ones(num_features))

  def forward(self, x):
    w, b, rv, rm = (t.reshape(1, -1, 1, 1) for t in (self.weight, self.bias, self.running_var,
                                                      self.running_mean))
    scale = w * (rv + self.eps).rsqrt()
    return x * scale + (b - rm * scale)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> tnn.Conv2d:
  return tnn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> tnn.Conv2d:
  return tnn.Conv2d(cin, cout, 1, stride, bias=False)


class _BasicBlock(tnn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1,
               norm_layer=tnn.BatchNorm2d):
    super().__init__()
    if dilation > 1:
      raise NotImplementedError("torchvision's BasicBlock does not support dilation.")
    self.conv1 = _conv3x3(inplanes, planes, stride)
    self.bn1 = norm_layer(planes)
    self.relu = tnn.ReLU()
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = norm_layer(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class _Bottleneck(tnn.Module):
  """torchvision's Bottleneck; `stride_in_1x1` moves the stride to conv1, as DeepLab's Caffe one."""
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1,
               norm_layer=tnn.BatchNorm2d, stride_in_1x1=False):
    super().__init__()
    self.conv1 = _conv1x1(inplanes, planes, stride if stride_in_1x1 else 1)
    self.bn1 = norm_layer(planes)
    self.conv2 = _conv3x3(planes, planes, 1 if stride_in_1x1 else stride, dilation)
    self.bn2 = norm_layer(planes)
    self.conv3 = _conv1x1(planes, planes * self.expansion)
    self.bn3 = norm_layer(planes * self.expansion)
    self.relu = tnn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class TorchResNet(tnn.Module):
  """torchvision.models.ResNet, returning the stage outputs instead of logits."""

  def __init__(self, depth: int, replace_stride_with_dilation=(False, False, False),
               norm_layer=tnn.BatchNorm2d):
    super().__init__()
    block, counts = {18: (_BasicBlock, (2, 2, 2, 2)), 50: (_Bottleneck, (3, 4, 6, 3)),
                     101: (_Bottleneck, (3, 4, 23, 3))}[depth]
    self._norm_layer = norm_layer
    self.inplanes, self.dilation = 64, 1
    self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = norm_layer(64)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make_layer(block, 64, counts[0])
    self.layer2 = self._make_layer(block, 128, counts[1], 2, replace_stride_with_dilation[0])
    self.layer3 = self._make_layer(block, 256, counts[2], 2, replace_stride_with_dilation[1])
    self.layer4 = self._make_layer(block, 512, counts[3], 2, replace_stride_with_dilation[2])
    self.avgpool = tnn.AdaptiveAvgPool2d(1)
    self.fc = tnn.Linear(512 * block.expansion, 1000)

  def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
    downsample, previous_dilation = None, self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = tnn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                  self._norm_layer(planes * block.expansion))
    blocks_ = [block(self.inplanes, planes, stride, downsample, previous_dilation,
                     self._norm_layer)]
    self.inplanes = planes * block.expansion
    for _ in range(1, blocks):
      blocks_.append(block(self.inplanes, planes, dilation=self.dilation,
                           norm_layer=self._norm_layer))
    return tnn.Sequential(*blocks_)

  def forward(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    out = {"stem": x}
    x = self.maxpool(x)
    for name in RESNET_STAGES[1:]:
      x = out[name] = getattr(self, name)(x)
    return out


class TorchCaffeDeepLabV2(tnn.Module):
  """DeepLab-v2 as AdaptSegNet's model/deeplab.py builds it: the network of the Caffe init files.

  The Caffe ResNet-101 (stride on each first block's 1x1 conv, ceil-mode max
  pooling, layer3 and layer4 dilated 2 and 4 in every block, each with a
  projection) and 'layer5', the classifier on layer4: four dilated 3x3 convs
  (6, 12, 18, 24), all summed, as Caffe's DeepLab-v2 and ADVENT sum them
  (AdaptSegNet's forward stops after two: aspp_branches=2, tested with
  ASPPv2). Returns the stage outputs and the logits at output stride 8.
  """

  def __init__(self, num_classes: int):
    super().__init__()
    self.inplanes = 64
    self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = tnn.BatchNorm2d(64)
    self.relu = tnn.ReLU()
    self.maxpool = tnn.MaxPool2d(3, 2, 1, ceil_mode=True)
    self.layer1 = self._make_layer(64, 3)
    self.layer2 = self._make_layer(128, 4, stride=2)
    self.layer3 = self._make_layer(256, 23, dilation=2)
    self.layer4 = self._make_layer(512, 3, dilation=4)
    self.layer5 = tnn.Module()
    self.layer5.conv2d_list = tnn.ModuleList(
        tnn.Conv2d(2048, num_classes, 3, padding=d, dilation=d) for d in (6, 12, 18, 24))

  def _make_layer(self, planes, blocks, stride=1, dilation=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * 4 or dilation > 1:
      downsample = tnn.Sequential(_conv1x1(self.inplanes, planes * 4, stride),
                                  tnn.BatchNorm2d(planes * 4))
    blocks_ = [_Bottleneck(self.inplanes, planes, stride, downsample, dilation,
                           stride_in_1x1=True)]
    self.inplanes = planes * 4
    for _ in range(1, blocks):
      blocks_.append(_Bottleneck(self.inplanes, planes, dilation=dilation, stride_in_1x1=True))
    return tnn.Sequential(*blocks_)

  def forward(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    out = {"stem": x}
    x = self.maxpool(x)
    for name in RESNET_STAGES[1:]:
      x = out[name] = getattr(self, name)(x)
    out["logits"] = sum(conv(x) for conv in self.layer5.conv2d_list)
    return out


class TorchDeepLabV2Init(tnn.Module):
  """The network under 'Scale', as DeepLab's PyTorch port saved it: the init files' keys."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.Scale = TorchCaffeDeepLabV2(num_classes)  # pylint: disable=invalid-name

  def forward(self, x):
    return self.Scale(x)


class TorchVGG16(tnn.Module):
  """torchvision.models.vgg16, returning pool3/pool4/pool5 and the convolutional fc7.

  With the defaults, `features` is torchvision's exactly (padding 1, floor
  pooling). `conv1_padding=100, ceil_mode=True` gives the FCN reference
  (Caffe's pooling). fc6 and fc7 are torchvision's `classifier.0` and
  `classifier.3` Linear weights applied as the 7x7 and 1x1 convolutions they
  are, with `fc6_padding` (3 aligned, 0 in the FCN reference); dropout is off
  (eval).
  """

  STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
  POOLS = {16: "pool3", 23: "pool4", 30: "pool5"}  # Indices in torchvision's `features`.

  def __init__(self, conv1_padding: int = 1, ceil_mode: bool = False, fc6_padding: int = 3):
    super().__init__()
    layers, cin = [], 3
    for widths in self.STAGES:
      for width in widths:
        layers += [tnn.Conv2d(cin, width, 3, padding=conv1_padding if cin == 3 else 1),
                   tnn.ReLU()]
        cin = width
      layers.append(tnn.MaxPool2d(2, 2, ceil_mode=ceil_mode))
    self.features = tnn.Sequential(*layers)
    self.avgpool = tnn.AdaptiveAvgPool2d((7, 7))
    self.classifier = tnn.Sequential(
        tnn.Linear(512 * 7 * 7, 4096), tnn.ReLU(), tnn.Dropout(),
        tnn.Linear(4096, 4096), tnn.ReLU(), tnn.Dropout(), tnn.Linear(4096, 1000))
    self.fc6_padding = fc6_padding

  def forward(self, x):
    out = {}
    for i, layer in enumerate(self.features):
      x = layer(x)
      if i in self.POOLS:
        out[self.POOLS[i]] = x
    fc6, fc7 = self.classifier[0], self.classifier[3]
    x = F.relu(F.conv2d(x, fc6.weight.reshape(4096, 512, 7, 7), fc6.bias,
                        padding=self.fc6_padding))
    out["fc7"] = F.relu(F.conv2d(x, fc7.weight.reshape(4096, 4096, 1, 1), fc7.bias))
    return out


def _randomise(model: tnn.Module, seed: int, input_scale: float = 1.0) -> tnn.Module:
  """Random weights and BatchNorm terms, in eval mode.

  Weights are He-scaled and BatchNorm statistics are those of a calibration
  batch, then perturbed, so activations stay O(1) through deep residual stacks
  (uncalibrated random statistics let ResNet-101's layer3 reach ~1e6). Each
  variance is raised by its layer's mean variance: channels left nearly
  constant by the few calibration pixels would otherwise be scaled up ~100x,
  and with them float32 rounding, until torch's own float32 ResNet-101 is 1e-4
  away from its float64 result (with the floor: about 1e-6). The calibration
  batch has the spread `input_scale` of the inputs the network reads.
  """
  gen = torch.Generator().manual_seed(seed)
  randn = lambda t: torch.randn(t.shape, generator=gen)
  uniform = lambda t, lo, hi: lo + (hi - lo) * torch.rand(t.shape, generator=gen)
  norms = [m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)]
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (tnn.Conv2d, tnn.Linear)):
        m.weight.copy_(randn(m.weight) * (2.0 / m.weight[0].numel()) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * randn(m.bias))
    for m in norms:
      m.weight.copy_(uniform(m.weight, 0.5, 1.5))
      m.bias.copy_(0.1 * randn(m.bias))
      m.reset_running_stats()
      m.momentum = None  # The running statistics become the calibration batch's.
    if norms:
      model.train()(input_scale * torch.randn((2, 3, 67, 93), generator=gen))
    for m in norms:
      m.momentum = 0.1
      m.running_mean.add_(0.1 * randn(m.running_mean) * m.running_var.sqrt())
      floor = m.running_var.mean()
      m.running_var.mul_(uniform(m.running_var, 0.5, 2.0)).add_(floor)
  return model.eval()


def _save(state_dict: dict, path: str) -> str:
  """Writes a state dict as a user would have it: .pth, .safetensors or .npz."""
  if path.endswith(".pth"):
    torch.save(state_dict, path)
  elif path.endswith(".safetensors"):
    safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
  else:
    np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})
  return path


# ---------------------------------------------------------------------------
# Our side: load through weights.load_backbone, run, compare.
# ---------------------------------------------------------------------------


def _load(backbone, path: str, input_hw=(64, 64)):
  """Backbone variables read from `path`, and the loader's report.

  The variables' shapes come from `jax.eval_shape`: load_backbone replaces
  every one of them, so no random initialisation is needed.
  """
  abstract = jax.eval_shape(lambda: backbone.init(jax.random.key(0),
                                                  jnp.zeros((1, *input_hw, 3))))
  wrapped = {collection: {weights.BACKBONE: tree} for collection, tree in abstract.items()}
  loaded, report = weights.load_backbone(wrapped, path, backbone.torch_key)
  return {c: tree[weights.BACKBONE] for c, tree in loaded.items()}, report


def _run_ours(backbone, variables, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
  apply = jax.jit(functools.partial(backbone.apply, train=False))
  out = apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  return {k: np.asarray(v).transpose(0, 3, 1, 2) for k, v in out.items()}


def _run_torch(model: tnn.Module, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
  with torch.no_grad():
    return {k: v.numpy() for k, v in model(torch.from_numpy(x_nchw)).items()}


def _assert_stages_match(label: str, ours: dict, ref: dict, stages) -> None:
  for stage in stages:
    assert ours[stage].shape == ref[stage].shape, (label, stage)
    scale = np.abs(ref[stage]).max()
    assert scale > 0 and (ref[stage] > 0).mean() > 0.05, f"{label} {stage}: degenerate reference"
    abs_diff = np.abs(ours[stage] - ref[stage]).max()
    print(f"{label} {stage} {ref[stage].shape}: max|diff| {abs_diff:.3g}, "
          f"max|ref| {scale:.3g}, relative {abs_diff / scale:.3g}")
    assert abs_diff / scale <= TOLERANCE, (
        f"{label} {stage}: max|diff| / max|torch| = {abs_diff / scale:.3g} > {TOLERANCE}")


def _input(seed: int, height: int = 67, width: int = 93) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((1, 3, height, width), dtype=np.float32)


def _num_params(model: tnn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def _caffe_input(x_nchw: np.ndarray) -> np.ndarray:
  """segjax's ImageNet-normalised RGB images as the BGR pixels less the mean Caffe reads."""
  rgb = x_nchw * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]
  return np.ascontiguousarray(255 * rgb[:, ::-1] - CAFFE_BGR_MEAN[:, None, None])


def _load_deeplabv2(shapes: dict, path: str):
  return weights.load_backbone(shapes, path, deeplab.DeepLabV2R101.backbone_torch_key)


def _loaded_leaves(variables: dict) -> list:
  """The arrays the loader put in; what it left are the shapes it was given."""
  return [x for x in jax.tree.leaves(variables) if not isinstance(x, jax.ShapeDtypeStruct)]


def _run_deeplabv2(model, variables, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
  """The backbone's stages and the logits (NCHW) in eval mode.

  Variables the file did not hold (the layer3 head, which eval does not run;
  the main head of a torchvision file) are zeros.
  """
  variables = jax.tree.map(
      lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
      variables)
  capture = lambda module, _: isinstance(module, ResNet)
  apply = jax.jit(functools.partial(model.apply, capture_intermediates=capture,
                                    mutable=["intermediates"]))
  out, state = apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  stages = dict(state["intermediates"]["backbone"]["__call__"][0], logits=out["logits"])
  return {k: np.asarray(v).transpose(0, 3, 1, 2) for k, v in stages.items()}


# ---------------------------------------------------------------------------
# Reference networks, each built once per module.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tmp_path_factory.mktemp("backbone_weights")


@pytest.fixture(scope="module")
def resnet18(folder):
  model = _randomise(TorchResNet(18), seed=18)
  return model, _save(model.state_dict(), str(folder / "resnet18.pth"))


@pytest.fixture(scope="module")
def resnet101(folder):
  model = _randomise(TorchResNet(101), seed=101)
  return model, _save(model.state_dict(), str(folder / "resnet101.pth"))


@pytest.fixture(scope="module")
def caffe_init(folder):
  """DeepLab-v2's Caffe init network, its state dict saved under the files' 'Scale.' keys."""
  model = _randomise(TorchDeepLabV2Init(NUM_CLASSES), seed=2, input_scale=CAFFE_INPUT_SCALE)
  return model, _save(model.state_dict(), str(folder / "deeplab_init.pth"))


@pytest.fixture(scope="module")
def deeplabv2_shapes():
  """DeepLabV2R101's variables as shapes, which both styles share."""
  model = deeplab.DeepLabV2R101(NUM_CLASSES, norm="frozen")
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 33, 47, 3))))


@pytest.fixture(scope="module")
def vgg16(folder):
  model = _randomise(TorchVGG16(), seed=16)
  return model, _save(model.state_dict(), str(folder / "vgg16.safetensors"))


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


def test_reference_networks_are_torchvisions(resnet18, resnet101, vgg16):
  """Parameter counts are torchvision's published ones; the keys are its names."""
  assert _num_params(resnet18[0]) == 11_689_512
  assert _num_params(resnet101[0]) == 44_549_160
  assert _num_params(vgg16[0]) == 138_357_544
  keys = set(resnet101[0].state_dict())
  assert {"conv1.weight", "bn1.running_var", "layer3.22.bn3.bias", "layer4.0.downsample.0.weight",
          "layer4.0.downsample.1.num_batches_tracked", "fc.weight"} <= keys
  assert {"features.28.weight", "classifier.0.weight", "classifier.6.bias"} <= set(
      vgg16[0].state_dict())


@pytest.mark.parametrize("norm", ["batch", "frozen"])
def test_resnet18_matches_torchvision(resnet18, norm):
  """Eval-mode BatchNorm2d equals our trainable BatchNorm (eval) and our frozen one."""
  model, path = resnet18
  backbone = ResNet(depth=18, norm=norm)
  variables, report = _load(backbone, path)
  assert report.unused == ["fc.bias", "fc.weight"]  # num_batches_tracked is not reported.
  assert len(report.loaded) == len(jax.tree.leaves(variables))
  x = _input(0)
  _assert_stages_match(f"resnet18/{norm}", _run_ours(backbone, variables, x),
                       _run_torch(model, x), RESNET_STAGES)


def test_resnet18_matches_torch_frozen_batchnorm(folder):
  """torchvision's FrozenBatchNorm2d buffers, loaded into batch_stats, give its numbers."""
  calibrated = _randomise(TorchResNet(18), seed=7)
  model = TorchResNet(18, norm_layer=FrozenBatchNorm2d).eval()
  model.load_state_dict({k: v for k, v in calibrated.state_dict().items()
                         if not k.endswith("num_batches_tracked")})
  path = _save(model.state_dict(), str(folder / "resnet18_frozen.npz"))
  backbone = ResNet(depth=18, norm="frozen")
  variables, report = _load(backbone, path)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["batch_stats"]["bn1"]) == {"scale", "bias", "mean", "var"}
  assert "bn1" not in variables["params"]
  assert report.unused == ["fc.bias", "fc.weight"]
  x = _input(1)
  _assert_stages_match("resnet18/torch-frozen", _run_ours(backbone, variables, x),
                       _run_torch(model, x), RESNET_STAGES)


def test_resnet50_output_stride_16_matches_torchvision_dilation(folder):
  """output_stride=16 is torchvision's replace_stride_with_dilation=[False, False, True]."""
  model = _randomise(TorchResNet(50, replace_stride_with_dilation=(False, False, True)), seed=50)
  path = _save(model.state_dict(), str(folder / "resnet50.safetensors"))
  backbone = ResNet(depth=50, output_stride=16)
  variables, report = _load(backbone, path)
  assert report.unused == ["fc.bias", "fc.weight"]
  x = _input(2)
  ours = _run_ours(backbone, variables, x)
  assert ours["layer4"].shape[2:] == ours["layer3"].shape[2:] == (5, 6)
  _assert_stages_match("resnet50/os16", ours, _run_torch(model, x), RESNET_STAGES)


def test_resnet101_matches_torchvision(resnet101):
  """Output stride 32; 8 is checked through DeepLab-v2's torchvision style, which builds it."""
  model, path = resnet101
  backbone = ResNet(depth=101)
  variables, report = _load(backbone, path)
  assert report.unused == ["fc.bias", "fc.weight"]
  x = _input(3)
  _assert_stages_match("resnet101/os32", _run_ours(backbone, variables, x),
                       _run_torch(model, x), RESNET_STAGES)


def test_deeplabv2_torchvision_style_is_torchvisions_dilated_resnet101(resnet101,
                                                                      deeplabv2_shapes):
  """resnet_style='torchvision' with torchvision's weights: its ResNet-101 at output stride 8.

  That is replace_stride_with_dilation=[False, True, True], stride in the 3x3
  conv, floor-mode pooling, ImageNet-normalised RGB in; the backbone is
  ResNet(depth=101, output_stride=8), DeepLabV3+'s trunk at output stride 8,
  so this also checks that one.
  """
  model, path = resnet101
  dilated = TorchResNet(101, replace_stride_with_dilation=(False, True, True))
  dilated.load_state_dict(model.state_dict())
  variables, report = _load_deeplabv2(deeplabv2_shapes, path)
  assert (report.layout, report.unused, report.skipped) == (
      weights.TORCHVISION, ["fc.bias", "fc.weight"], [])
  x = _input(3)
  ours = _run_deeplabv2(deeplab.DeepLabV2R101(NUM_CLASSES, norm="frozen",
                                              resnet_style="torchvision"), variables, x)
  _assert_stages_match("deeplabv2/torchvision", ours, _run_torch(dilated.eval(), x),
                       RESNET_STAGES)


def test_deeplabv2_caffe_style_is_the_caffe_init_network(caffe_init, deeplabv2_shapes, folder):
  """resnet_style='caffe' with a Caffe init file: its network's stages and logits.

  The Caffe network reads BGR pixels less their mean; ours reads segjax's
  ImageNet-normalised RGB, which it converts. The file is read as the .pth and
  as the .safetensors segjax.tools.convert_weights writes from it, 'Scale.'
  keys kept. The classifier comes from the file (same class count) and its
  logits are upsampled with aligned corners on both sides. The input is 201
  wide so that layer4 is 26 wide and every dilation (up to 24) reaches past
  the centre tap.
  """
  model, pth = caffe_init
  assert {"Scale.conv1.weight", "Scale.layer3.22.bn3.running_var",
          "Scale.layer4.0.downsample.1.weight",
          "Scale.layer5.conv2d_list.3.bias"} <= set(model.state_dict())
  converted = str(folder / "deeplab_init.safetensors")
  convert_weights.convert_file(pth, converted)
  assert weights.file_layout(converted) == weights.CAFFE
  variables, report = _load_deeplabv2(deeplabv2_shapes, converted)
  assert (report.layout, report.unused, report.skipped) == (weights.CAFFE, [], [])
  assert sorted(k for k in report.loaded if k.startswith("Scale.layer5.")) == [
      f"Scale.layer5.conv2d_list.{i}.{leaf}" for i in range(4) for leaf in ("bias", "weight")]
  from_pth, _ = _load_deeplabv2(deeplabv2_shapes, pth)
  for leaf, pth_leaf in zip(_loaded_leaves(variables), _loaded_leaves(from_pth), strict=True):
    np.testing.assert_array_equal(leaf, pth_leaf)

  x = _input(6, 33, 201)
  ours = _run_deeplabv2(deeplab.DeepLabV2R101(NUM_CLASSES, norm="frozen"), variables, x)
  ref = _run_torch(model, _caffe_input(x))
  ref["logits"] = F.interpolate(torch.from_numpy(ref["logits"]), x.shape[2:], mode="bilinear",
                                align_corners=True).numpy()
  assert ours["layer4"].shape[2:] == (5, 26)
  _assert_stages_match("deeplabv2/caffe", ours, ref, (*RESNET_STAGES, "logits"))


def _caffe_state_with_classifier(caffe_init, shape) -> dict:
  """The Caffe init's state dict with a zero classifier of kernel `shape` (OIHW)."""
  state = dict(caffe_init[0].state_dict())
  for i in range(4):
    state[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.zeros(shape)
    state[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.zeros(shape[0])
  return state


def test_caffe_classifier_for_other_classes_is_skipped_and_reported(caffe_init,
                                                                     deeplabv2_shapes, folder):
  """AdaptSegNet's init has a 21-class classifier: for 19 classes it is left out, and said so.

  (AdaptSegNet and ADVENT drop it alike.) The backbone loads all the same.
  """
  path = _save(_caffe_state_with_classifier(caffe_init, (21, 2048, 3, 3)),
               str(folder / "deeplab_init_21.npz"))
  variables, report = _load_deeplabv2(deeplabv2_shapes, path)
  assert report.skipped == ["head_layer4 (Scale.layer5.conv2d_list.0.bias has 21 classes, the "
                            "model 19; it keeps its initialisation)"]
  assert "Skipped head_layer4 (" in report.summary(path)
  assert report.unused == []
  assert len(report.loaded) == len(_loaded_leaves(variables)) == sum(
      len(jax.tree.leaves(tree["backbone"])) for tree in deeplabv2_shapes.values())
  assert not _loaded_leaves(variables["params"]["head_layer4"])


def test_caffe_classifier_of_another_network_names_the_key_and_both_shapes(caffe_init,
                                                                            deeplabv2_shapes,
                                                                            folder):
  """A classifier on 1024 channels (the multi-level models' layer3 head) is another network."""
  path = _save(_caffe_state_with_classifier(caffe_init, (19, 1024, 3, 3)),
               str(folder / "deeplab_layer3_classifier.npz"))
  with pytest.raises(ValueError, match=r"Scale\.layer5\.conv2d_list\.0\.weight: shape "
                     r"\(19, 1024, 3, 3\) in the file does not match the model's "
                     r"\(3, 3, 2048, 19\)"):
    _load_deeplabv2(deeplabv2_shapes, path)


def test_caffe_backbone_of_another_network_names_the_key_and_both_shapes(deeplabv2_shapes,
                                                                          folder):
  """The first key that does not fit fails, before the keys the file lacks are counted."""
  path = _save({"Scale.layer3.5.conv2.weight": torch.zeros(256, 256, 1, 1)},
               str(folder / "deeplab_wrong.npz"))
  with pytest.raises(ValueError, match=r"Scale\.layer3\.5\.conv2\.weight: shape "
                     r"\(256, 256, 1, 1\) in the file does not match the model's "
                     r"\(3, 3, 256, 256\)"):
    _load_deeplabv2(deeplabv2_shapes, path)


def _deeplabv2_config(weights_path: str, **fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="deeplabv2_r101", sync_batch_stats=False,
                                        dtype="float32", param_dtype="float32",
                                        backbone_weights=weights_path, **fields))


@pytest.mark.parametrize("file_key, style", [("Scale.conv1.weight", weights.CAFFE),
                                             ("conv1.weight", weights.TORCHVISION)])
def test_resnet_style_defaults_to_caffe_and_must_be_the_files(folder, file_key, style):
  """model.resnet_style (default 'caffe') must be the file's layout, checked at model build.

  train.py's config check builds the model first, so a contradiction fails
  early, naming the field, its value and both layouts. Only the keys matter.
  """
  path = _save({file_key: torch.zeros(64, 3, 7, 7)}, str(folder / f"{style}_conv1.npz"))
  build = lambda **fields: models.build_segmenter(_deeplabv2_config(path, **fields), NUM_CLASSES)
  assert build(resnet_style=style).resnet_style == style
  other = weights.TORCHVISION if style == weights.CAFFE else weights.CAFFE
  with pytest.raises(ValueError, match=re.escape(
      f"model.resnet_style={other!r} builds the network of {weights.LAYOUTS[other]}, but "
      f"model.backbone_weights={path!r} holds {weights.LAYOUTS[style]}. "
      f"Set model.resnet_style={style!r}")):
    build(resnet_style=other)
  if style == weights.CAFFE:
    assert build().resnet_style == weights.CAFFE
  else:
    with pytest.raises(ValueError, match="model.resnet_style='caffe' builds"):
      build()


def test_caffe_file_is_refused_by_a_torchvision_backbone(folder):
  """Same shapes, other strides: a torchvision-only model must not take a Caffe file."""
  path = _save({"Scale.conv1.weight": torch.zeros(64, 3, 7, 7)}, str(folder / "caffe.npz"))
  with pytest.raises(ValueError, match=r"holds the Caffe-converted DeepLab layout .* which this "
                     r"model \(model.name\) does not read: it reads torchvision's layout"):
    _load(ResNet(depth=18), path)


@pytest.fixture(scope="module")
def vgg16_variables(vgg16):
  """Loaded once: the parameters are the same for both paddings."""
  variables, report = _load(VGG16(conv1_padding=1), vgg16[1], input_hw=(32, 32))
  assert report.unused == ["classifier.6.bias", "classifier.6.weight"]
  return variables


def test_vgg16_aligned_matches_torchvision_features(vgg16, vgg16_variables):
  """conv1_padding=1: torchvision's `vgg16.features` exactly, then fc6 (padding 3) and fc7.

  Our pools are ceil-mode (as the PyTorch peer's aligned FCN-8s); torchvision's
  floor, so the input is a multiple of 32, where the two agree.
  """
  x = _input(4, 64, 96)
  ours = _run_ours(VGG16(conv1_padding=1), vgg16_variables, x)
  assert ours["fc7"].shape == (1, 4096, 2, 3)
  _assert_stages_match("vgg16/aligned", ours, _run_torch(vgg16[0], x), VGG_STAGES)


def test_vgg16_fcn_reference_matches_torch(vgg16, vgg16_variables):
  """conv1_padding=100: conv1_1 padded by 100, ceil-mode pools, fc6 unpadded (FCN)."""
  reference = TorchVGG16(conv1_padding=100, ceil_mode=True, fc6_padding=0)
  reference.load_state_dict(vgg16[0].state_dict())
  x = _input(5)
  ours = _run_ours(VGG16(conv1_padding=100), vgg16_variables, x)
  assert ours["pool5"].shape == (1, 512, 9, 10) and ours["fc7"].shape == (1, 4096, 3, 4)
  _assert_stages_match("vgg16/fcn", ours, _run_torch(reference.eval(), x), VGG_STAGES)


@pytest.mark.parametrize("ext", [".safetensors", ".npz"])
def test_every_format_loads_the_same_variables(resnet18, folder, ext):
  model, pth = resnet18
  backbone = ResNet(depth=18)
  from_pth, _ = _load(backbone, pth)
  other, report = _load(backbone, _save(model.state_dict(), str(folder / f"resnet18{ext}")))
  assert report.unused == ["fc.bias", "fc.weight"]
  jax.tree.map(np.testing.assert_array_equal, other, from_pth)


def test_missing_keys_are_named(resnet18, folder):
  state = {k: v for k, v in resnet18[0].state_dict().items()
           if k not in ("layer4.1.bn2.running_var", "layer2.0.downsample.0.weight")}
  path = _save(state, str(folder / "missing.npz"))
  with pytest.raises(ValueError, match=r"lacks 2 keys the backbone needs") as error:
    _load(ResNet(depth=18), path)
  assert "layer4.1.bn2.running_var" in str(error.value)
  assert "layer2.0.downsample.0.weight" in str(error.value)


def test_wrong_shape_is_named(resnet18, folder):
  state = dict(resnet18[0].state_dict())
  state["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
  path = _save(state, str(folder / "wrong_shape.npz"))
  with pytest.raises(ValueError,
                     match=r"layer3\.1\.conv2\.weight: shape \(256, 256, 1, 1\) in the file"):
    _load(ResNet(depth=18), path)


def test_missing_file_names_the_config_field(folder):
  with pytest.raises(FileNotFoundError, match="model.backbone_weights"):
    _load(ResNet(depth=18), str(folder / "absent.pth"))
