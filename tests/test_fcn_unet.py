"""FCN-32s/16s/8s, UNet, UNetSmall and the fc7 domain classifier against their references.

Parameter counts come from `jax.eval_shape` (free even for VGG16's 134M);
one FCN-8s is initialised for the whole module. Where torch is installed the
networks are checked numerically against PyTorch transcriptions of the
references, with the weights copied over.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from segjax.models import build_discriminator, build_segmenter, fcn, layers, unet

import needs  # pylint: disable=wrong-import-order

NUM_CLASSES = 5


def _num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def _abstract_variables(model, height=32, width=32):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, height, width, 3))))


def _random_variables(model, seed=0):
  """Variables of `model` drawn with numpy: quicker than compiling its initialisers on a CPU."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if path[-1].key == "var":
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(draw, _abstract_variables(model))


def _model_config(name, **fields):
  config = dict(name=name, dtype="float32", param_dtype="float32", sync_batch_stats=False)
  return ml_collections.ConfigDict({**config, **fields})


@pytest.fixture(scope="module")
def torch():
  return needs.package("torch", "the PyTorch references need torch installed")


@pytest.fixture(scope="module")
def fcn8s():
  """An aligned FCN-8s and its variables, initialised once (VGG16 is 134M parameters)."""
  model = fcn.FCN8s(num_classes=NUM_CLASSES, conv1_padding=1)
  return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _with_random_scores(variables, seed=0):
  """`variables` with every score layer drawn at random, so that the logits are not all zero."""
  rng = np.random.default_rng(seed)
  params = dict(variables["params"])
  for name in ("score_fr", "score_pool4", "score_pool3"):
    params[name] = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                                params[name])
  return {"params": params}


# FCN


def _caffe_fcn8s_params(num_classes):
  """Learnable parameters of the reference voc-fcn8s net, layer by layer (deconvolutions too)."""
  vgg_convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
               (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
  trunk = sum(9 * cin * cout + cout for cin, cout in vgg_convs)
  trunk += 7 * 7 * 512 * 4096 + 4096  # fc6
  trunk += 4096 * 4096 + 4096  # fc7
  scores = sum((cin + 1) * num_classes for cin in (4096, 512, 256))  # score_fr, _pool4, _pool3
  deconvs = num_classes ** 2 * (4 * 4 + 4 * 4 + 16 * 16)  # upscore2, upscore_pool4, upscore8
  return trunk + scores + deconvs


def test_fcn_parameter_counts_match_the_reference_net():
  """voc-fcn8s (21 classes) has 134,489,759 parameters; here the fixed upsamplings are constants."""
  classes = 21
  assert _caffe_fcn8s_params(classes) == 134_489_759
  fixed_upscore8 = classes ** 2 * 16 * 16
  learned = _num_params(_abstract_variables(fcn.FCN8s(num_classes=classes)))
  assert learned == 134_489_759 - fixed_upscore8 == 134_376_863
  fixed = _abstract_variables(fcn.FCN8s(num_classes=classes, learned_upsampling=False))
  assert _num_params(fixed) == 134_489_759 - classes ** 2 * (16 + 16 + 256)
  trunk_and_score_fr = 134_260_544 + 4097 * classes
  assert _num_params(_abstract_variables(fcn.FCN32s(num_classes=classes))) == trunk_and_score_fr
  assert (_num_params(_abstract_variables(fcn.FCN16s(num_classes=classes)))
          == trunk_and_score_fr + 513 * classes + classes ** 2 * 16)


def test_learned_upsampling_false_has_no_upsampling_parameters():
  for cls in (fcn.FCN16s, fcn.FCN8s):
    params = _abstract_variables(cls(num_classes=3, learned_upsampling=False))["params"]
    assert not [name for name in params if name.startswith("upscore")]


def test_score_layers_start_at_zero(fcn8s):
  _, variables = fcn8s
  for name in ("score_fr", "score_pool4", "score_pool3"):
    for leaf in ("kernel", "bias"):
      assert not np.any(variables["params"][name][leaf]), (name, leaf)


def test_upsample_filt_is_the_reference_bilinear_kernel():
  np.testing.assert_allclose(fcn.upsample_filt(4),
                             np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]))
  np.testing.assert_allclose(fcn.upsample_filt(3), np.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))


def test_learned_deconvolutions_start_as_the_bilinear_kernel(fcn8s):
  _, variables = fcn8s
  for name in ("upscore2", "upscore_pool4"):
    kernel = np.asarray(variables["params"][name]["kernel"])
    assert kernel.shape == (4, 4, NUM_CLASSES, NUM_CLASSES)
    for c in range(NUM_CLASSES):
      np.testing.assert_array_equal(kernel[:, :, c, c], fcn.upsample_filt(4).astype(np.float32))
    off_diagonal = kernel * (1 - np.eye(NUM_CLASSES))
    assert not np.any(off_diagonal)


def test_fixed_upsampling_equals_the_learned_ones_at_initialisation(fcn8s):
  model, variables = fcn8s
  variables = _with_random_scores(variables)
  images = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  learned = model.apply(variables, images)["logits"]
  fixed_model = fcn.FCN8s(num_classes=NUM_CLASSES, conv1_padding=1, learned_upsampling=False)
  fixed_params = {k: v for k, v in variables["params"].items() if not k.startswith("upscore")}
  fixed = fixed_model.apply({"params": fixed_params}, images)["logits"]
  assert np.abs(learned).max() > 0
  np.testing.assert_allclose(fixed, learned, rtol=1e-5, atol=1e-6)


def test_skip_scaling_scales_pool4_and_pool3(fcn8s):
  """Scaling a skip's features by s is scaling its score layer's kernel by s."""
  model, variables = fcn8s
  variables = _with_random_scores(variables)
  images = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
  scaled_model = fcn.FCN8s(num_classes=NUM_CLASSES, conv1_padding=1, skip_scaling=True)
  params = dict(variables["params"])
  for skip, scale in fcn.SKIP_SCALES.items():
    params[f"score_{skip}"] = dict(params[f"score_{skip}"],
                                   kernel=params[f"score_{skip}"]["kernel"] / scale)
  np.testing.assert_allclose(scaled_model.apply({"params": params}, images)["logits"],
                             model.apply(variables, images)["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [fcn.FCN32s, fcn.FCN16s, fcn.FCN8s])
@pytest.mark.parametrize("conv1_padding", [100, 1])
def test_fcn_output_has_the_input_size(cls, conv1_padding):
  model = cls(num_classes=3, conv1_padding=conv1_padding)
  variables = _abstract_variables(model)
  for height, width in [(1, 1), (37, 45), (97, 131), (64, 96)]:
    out = jax.eval_shape(model.apply, variables, jnp.zeros((2, height, width, 3)))
    assert out["logits"].shape == (2, height, width, 3)
    assert out["logits"].dtype == jnp.float32
    assert out["features"].shape[-1] == 4096 and out["aux"] == ()


@pytest.mark.parametrize("conv1_padding", [100, 1])
def test_fcn8s_runs_at_an_odd_size(fcn8s, conv1_padding):
  _, variables = fcn8s
  model = fcn.FCN8s(num_classes=NUM_CLASSES, conv1_padding=conv1_padding)
  out = model.apply(_with_random_scores(variables), jnp.ones((1, 37, 45, 3)), train=True,
                    rngs={"dropout": jax.random.key(0)})
  assert out["logits"].shape == (1, 37, 45, NUM_CLASSES)
  assert np.isfinite(out["logits"]).all() and np.abs(out["logits"]).max() > 0


@pytest.mark.parametrize("model", [
    fcn.FCN8s(num_classes=3, dtype=jnp.bfloat16), unet.UNet(3, width=4, dtype=jnp.bfloat16),
    unet.UNet(3, width=4, bilinear=True, dtype=jnp.bfloat16),
    unet.UNetSmall(3, width=4, dtype=jnp.bfloat16)])
def test_bfloat16_compute_returns_float32_logits(model):
  out = jax.eval_shape(model.apply, _abstract_variables(model), jnp.zeros((1, 37, 45, 3)))
  assert out["logits"].shape == (1, 37, 45, 3) and out["logits"].dtype == jnp.float32


def test_fcn_rejects_other_paddings():
  with pytest.raises(ValueError, match="conv1_padding"):
    _abstract_variables(fcn.FCN8s(num_classes=3, conv1_padding=50))


def test_fcn_from_config_defaults_to_the_reference():
  model = build_segmenter(_model_config("fcn8s_vgg16"), 19)
  assert isinstance(model, fcn.FCN8s) and model.num_classes == 19
  assert (model.conv1_padding, model.learned_upsampling, model.skip_scaling,
          model.dropout_rate) == (100, True, False, 0.5)
  model = build_segmenter(_model_config("fcn16s_vgg16", conv1_padding=1, learned_upsampling=False,
                                        skip_scaling=True, dropout_rate=0.0, dtype="bfloat16"), 19)
  assert isinstance(model, fcn.FCN16s) and model.dtype == jnp.bfloat16
  assert (model.conv1_padding, model.learned_upsampling, model.skip_scaling,
          model.dropout_rate) == (1, False, True, 0.0)
  assert isinstance(build_segmenter(_model_config("fcn32s_vgg16"), 19), fcn.FCN32s)
  assert fcn.FCN8s.backbone_torch_key(("fc6", "kernel")) == "classifier.0.weight"


@pytest.mark.parametrize("kernel, stride, padding, output_padding",
                         [(4, 2, 1, 0), (4, 2, 0, 0), (16, 8, 4, 0), (3, 2, 1, 1), (2, 2, 0, 0),
                          (5, 3, 2, 2)])
def test_conv_transpose_matches_torch(torch, kernel, stride, padding, output_padding):
  reference = torch.nn.ConvTranspose2d(3, 4, kernel, stride, padding, output_padding)
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 7)).astype(np.float32)
  expected = reference(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
  module = fcn.ConvTranspose(4, kernel, stride, padding, output_padding)
  variables = {"params": {
      "kernel": jnp.asarray(reference.weight.detach().numpy().transpose(2, 3, 0, 1)),
      "bias": jnp.asarray(reference.bias.detach().numpy())}}
  actual = module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


# PyTorch transcriptions of the references, and copying their weights.


def _from_torch(torch, reference, variables, torch_name, constants=()):
  """`variables` with each leaf taken from `reference`'s state dict; `torch_name` maps module paths.

  Fails unless every parameter and buffer of the reference is used, but for
  `constants`, tensors that are constants of the model.
  """
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()
           if not k.endswith("num_batches_tracked")}
  transposed = {name for name, m in reference.named_modules()
                if isinstance(m, torch.nn.ConvTranspose2d)}
  used, out = set(), {}
  for collection, tree in variables.items():
    flat = traverse_util.flatten_dict(tree)
    for path, value in flat.items():
      module = torch_name(path[:-1])
      key = f"{module}.{layers.TORCH_LEAF_NAMES[path[-1]]}"
      array = state[key]
      if array.ndim == 4:  # ConvTranspose2d (in, out, k, k); Conv2d (out, in, k, k).
        array = array.transpose(2, 3, 0, 1) if module in transposed else array.transpose(2, 3, 1, 0)
      assert array.shape == value.shape, (path, key)
      flat[path] = jnp.asarray(array)
      used.add(key)
    out[collection] = traverse_util.unflatten_dict(flat)
  assert used == set(state) - set(constants), sorted(set(state) - used)
  return out


def _randomise_batch_norms(torch, reference):
  """Non-trivial BN statistics and affine terms, so that misplaced BNs show."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for m in reference.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        for tensor, low, high in ((m.weight, 0.5, 1.5), (m.bias, -0.5, 0.5),
                                  (m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 1.5)):
          tensor.copy_(torch.rand(tensor.shape, generator=gen) * (high - low) + low)


def _peer_fcn8s(torch, num_classes):
  """The PyTorch speed peer's FCN8s ('aligned': conv1 padding 1, fc6 padding 3), transcribed."""
  nn, F = torch.nn, torch.nn.functional

  class PeerFCN8s(nn.Module):
    def __init__(self):
      super().__init__()
      cin = 3
      for s, widths in enumerate([[64, 64], [128, 128], [256, 256, 256], [512, 512, 512],
                                  [512, 512, 512]], start=1):
        mods = []
        for w in widths:
          mods += [nn.Conv2d(cin, w, 3, 1, 1), nn.ReLU()]
          cin = w
        mods.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        setattr(self, f"stage{s}", nn.Sequential(*mods))
      self.fc6 = nn.Conv2d(512, 4096, 7, 1, 3)
      self.fc7 = nn.Conv2d(4096, 4096, 1)
      self.score_fr = nn.Conv2d(4096, num_classes, 1)
      self.score_pool4 = nn.Conv2d(512, num_classes, 1)
      self.score_pool3 = nn.Conv2d(256, num_classes, 1)
      self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, 2, 1, bias=False)
      self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, 2, 1, bias=False)
      self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, 8, 4, bias=False)

    def forward(self, x):
      p3 = self.stage3(self.stage2(self.stage1(x)))
      p4 = self.stage4(p3)
      h = F.relu(self.fc7(F.relu(self.fc6(self.stage5(p4)))))
      h = self.upscore2(self.score_fr(h))
      h = self.upscore_pool4(h + self.score_pool4(p4))
      return self.upscore8(h + self.score_pool3(p3))

  return PeerFCN8s()


def _peer_torch_name(path):
  """backbone/conv3_2 -> stage3.2 (the peer's stages are conv, ReLU pairs); others keep names."""
  name = path[-1]
  if name.startswith("conv"):
    stage, index = name.removeprefix("conv").split("_")
    return f"stage{stage}.{2 * (int(index) - 1)}"
  return name


def test_aligned_fcn8s_is_the_peer_network(torch, fcn8s):
  """conv1_padding=1 computes the benchmark peer's FCN8s, its upscore8 set to bilinear."""
  torch.manual_seed(0)
  reference = _peer_fcn8s(torch, NUM_CLASSES).eval()
  kernel = fcn.bilinear_kernel(16, NUM_CLASSES).transpose(2, 3, 0, 1).copy()
  with torch.no_grad():
    reference.upscore8.weight.copy_(torch.from_numpy(kernel))
  model, variables = fcn8s
  variables = _from_torch(torch, reference, variables, _peer_torch_name,
                          constants=("upscore8.weight",))
  x = np.random.default_rng(0).normal(size=(1, 3, 32, 64)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  actual = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))["logits"]
  scale = np.abs(expected).max()
  assert scale > 0
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


# UNet and UNetSmall


def _milesial_unet(torch, n_classes, width, bilinear):
  """milesial/Pytorch-UNet's UNet (unet_model.py, unet_parts.py) with base width `width`."""
  nn, F = torch.nn, torch.nn.functional

  class DoubleConv(nn.Module):
    def __init__(self, cin, cout, mid=None):
      super().__init__()
      mid = mid or cout
      self.double_conv = nn.Sequential(
          nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
          nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
      return self.double_conv(x)

  class Down(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x):
      return self.maxpool_conv(x)

  class Up(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      if bilinear:
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(cin, cout, cin // 2)
      else:
        self.up = nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x1, x2):
      x1 = self.up(x1)
      dy, dx = x2.size(2) - x1.size(2), x2.size(3) - x1.size(3)
      x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
      return self.conv(torch.cat([x2, x1], dim=1))

  class OutConv(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, kernel_size=1)

    def forward(self, x):
      return self.conv(x)

  class UNet(nn.Module):
    def __init__(self):
      super().__init__()
      w, factor = width, 2 if bilinear else 1
      self.inc = DoubleConv(3, w)
      self.down1, self.down2, self.down3 = Down(w, 2 * w), Down(2 * w, 4 * w), Down(4 * w, 8 * w)
      self.down4 = Down(8 * w, 16 * w // factor)
      self.up1, self.up2 = Up(16 * w, 8 * w // factor), Up(8 * w, 4 * w // factor)
      self.up3, self.up4 = Up(4 * w, 2 * w // factor), Up(2 * w, w)
      self.outc = OutConv(w, n_classes)

    def forward(self, x):
      x1 = self.inc(x)
      x2 = self.down1(x1)
      x3 = self.down2(x2)
      x4 = self.down3(x3)
      x = self.up1(self.down4(x4), x4)
      return self.outc(self.up4(self.up3(self.up2(x, x3), x2), x1))

  return UNet()


_DOUBLE_CONV_NAMES = {("ConvBNReLU_0", "Conv_0"): "double_conv.0",
                      ("ConvBNReLU_0", "BatchNorm_0"): "double_conv.1",
                      ("ConvBNReLU_1", "Conv_0"): "double_conv.3",
                      ("ConvBNReLU_1", "BatchNorm_0"): "double_conv.4"}


def _unet_torch_name(path):
  suffix = [_DOUBLE_CONV_NAMES[path[-2:]]] if path[-2:] in _DOUBLE_CONV_NAMES else []
  prefix = path[:-2] if suffix else path
  renamed = {"outc": "outc.conv", **{f"down{i}": f"down{i}.maxpool_conv.1" for i in range(1, 5)}}
  return ".".join([renamed.get(name, name) for name in prefix] + suffix)


def _seed_my_fcn(torch, n_class, width):
  """Seed (d)'s my_FCN (kerrgarr/SemanticSegmentationCityscapes seg_code/models.py), width a."""
  nn = torch.nn

  def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout))

  class MyFCN(nn.Module):
    def __init__(self):
      super().__init__()
      a, b, c, d = width, 2 * width, 4 * width, 8 * width
      self.maxpool = nn.MaxPool2d(kernel_size=2, ceil_mode=True)
      self.conv_down1, self.conv_down2 = block(3, a), block(a, b)
      self.conv_down3, self.conv_down4 = block(b, c), block(c, d)
      self.bottleneck = nn.ConvTranspose2d(d, c, 3, stride=2, padding=1, output_padding=1)
      self.conv_up3 = block(c, b)
      self.upsample3 = nn.ConvTranspose2d(b, a, 3, stride=2, padding=1, output_padding=1)
      self.classifier = nn.Conv2d(a, n_class, kernel_size=1)

    def crop(self, a, b):
      return nn.AdaptiveMaxPool2d((a.size(2), a.size(3)))(b)

    def forward(self, x):
      h, w = x.shape[2:]
      z = (x - 0.5) / 0.25
      conv1 = self.conv_down1(z)
      conv2 = self.conv_down2(self.maxpool(conv1))
      conv3 = self.conv_down3(self.maxpool(conv2))
      conv4 = self.conv_down4(conv3)
      score = self.bottleneck(conv4)
      score = score + self.crop(score, conv3)
      score = self.upsample3(self.conv_up3(score))
      score = score + self.crop(score, conv1)
      return nn.functional.interpolate(self.classifier(score), size=(h, w))[:, :, :h, :w]

  return MyFCN()


def _my_fcn_torch_name(path):
  inner = {"Conv_0": "0", "BatchNorm_0": "2", "Conv_1": "3", "BatchNorm_1": "5"}
  return ".".join([path[0]] + [inner[name] for name in path[1:]])


def _count_torch_params(torch, build):
  with torch.device("meta"):
    return sum(p.numel() for p in build().parameters())


def test_unet_parameter_counts_match_milesial(torch):
  assert _num_params(_abstract_variables(unet.UNet(2))) == 31_037_698
  assert _count_torch_params(torch, lambda: _milesial_unet(torch, 2, 64, False)) == 31_037_698
  bilinear = _num_params(_abstract_variables(unet.UNet(2, bilinear=True)))
  assert bilinear == _count_torch_params(torch, lambda: _milesial_unet(torch, 2, 64, True))


def test_unet_small_parameter_count_matches_the_seed(torch):
  count = _num_params(_abstract_variables(unet.UNetSmall(19)))
  assert count == _count_torch_params(torch, lambda: _seed_my_fcn(torch, 19, 32))


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_matches_milesial(torch, bilinear):
  torch.manual_seed(0)
  reference = _milesial_unet(torch, NUM_CLASSES, 4, bilinear).eval()
  _randomise_batch_norms(torch, reference)
  model = unet.UNet(NUM_CLASSES, width=4, bilinear=bilinear)
  variables = _from_torch(torch, reference, _abstract_variables(model), _unet_torch_name)
  x = np.random.default_rng(0).normal(size=(1, 3, 37, 45)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  actual = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))["logits"]
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_unet_small_matches_the_seed(torch):
  torch.manual_seed(0)
  reference = _seed_my_fcn(torch, NUM_CLASSES, 4).eval()
  _randomise_batch_norms(torch, reference)
  model = unet.UNetSmall(NUM_CLASSES, width=4)
  variables = _from_torch(torch, reference, _abstract_variables(model), _my_fcn_torch_name)
  x = np.random.default_rng(0).uniform(size=(1, 3, 37, 45)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  normalised = (x.transpose(0, 2, 3, 1) - 0.5) / 0.25  # The seed normalises inside its forward.
  actual = model.apply(variables, jnp.asarray(normalised))["logits"]
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", [unet.UNet(3, width=4), unet.UNet(3, width=4, bilinear=True),
                                   unet.UNetSmall(3, width=4)])
def test_unets_train_at_an_odd_size(model):
  variables = _random_variables(model)
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  out, updates = train_apply(variables, jnp.ones((2, 37, 45, 3)))
  assert out["logits"].shape == (2, 37, 45, 3) and out["logits"].dtype == jnp.float32
  assert out["aux"] == ()
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_unet_from_config():
  model = build_segmenter(_model_config("unet"), 19, bn_axis_name="data")
  assert isinstance(model, unet.UNet)
  assert (model.width, model.bilinear, model.bn_axis_name) == (64, False, "data")
  model = build_segmenter(_model_config("unet", width=16, bilinear=True), 19)
  assert (model.width, model.bilinear, model.bn_axis_name) == (16, True, None)
  model = build_segmenter(_model_config("unet_small"), 19)
  assert isinstance(model, unet.UNetSmall) and model.width == 32


# The fc7 domain classifier


def test_fc7_domain_classifier():
  config = ml_collections.ConfigDict(dict(name="fc7_domain", width=1024, dtype="float32",
                                          param_dtype="float32"))
  disc = build_discriminator(config, 19)
  features = jax.random.normal(jax.random.key(0), (2, 3, 5, 4096))
  variables = disc.init(jax.random.key(1), features)
  assert _num_params(variables) == 4096 * 1024 + 1024 + 1024 * 512 + 512 + 512 + 1 == 4_720_641
  logits = disc.apply(variables, features)
  assert logits.shape == (2, 3, 5, 1) and logits.dtype == jnp.float32
  dropped = disc.apply(variables, features, train=True, rngs={"dropout": jax.random.key(2)})
  assert dropped.shape == logits.shape and not np.allclose(dropped, logits)
