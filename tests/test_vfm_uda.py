"""VFM-UDA: the DINOv2 ViT segmenter with its lightweight head, token masking, the flip-averaged
teacher and the recipe. (8 = 1 devices and resume: tests/test_methods.py's 'vfm_uda'.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import vfm_uda as vfm_uda_config
from segjax import global_batch, methods, models, parallel, validation
from segjax.data import pipeline
from segjax.methods import daformer
from segjax.models import vfm, weights

import test_vit  # pylint: disable=wrong-import-order


def _model(**kw):
  return vfm.VFMViTS14(num_classes=5, **kw)


def test_the_encoder_sees_the_image_scaled_by_1_1_and_cut_to_whole_patches():
  model = _model()
  # VFM-UDA's int(side * 1.1 // 14 * 14): 1024 -> 1120, an 80x80 grid.
  assert model.encoder_size(1024, 1024) == (1120, 1120) and model.token_grid(1024, 1024) == (80, 80)
  assert model.encoder_size(512, 1024) == (560, 1120)
  assert model.encoder_size(50, 75) == (42, 70) and model.token_grid(50, 75) == (3, 5)
  images = jax.random.uniform(jax.random.key(0), (2, 50, 75, 3))
  variables = model.init(jax.random.key(1), images)
  out = model.apply(variables, images)
  assert out["logits"].shape == (2, 50, 75, 5) and out["logits"].dtype == jnp.float32
  assert out["features"].shape == (2, 3, 5, 384) and out["aux"] == ()


def test_the_head_has_vfm_udas_layers_and_no_biases():
  """ViT-B's head: 2x2/2 transposed convs 768 -> 384 -> 192, a 3x3 conv 192 -> 192, three
  LayerNorms, a 1x1 classifier; no biases but the LayerNorms'. Counted by hand."""
  head = vfm.LightweightHead(19)
  params = head.init(jax.random.key(0), jnp.zeros((1, 3, 4, 768)))["params"]
  shapes = {f"{name}/{leaf}": value.shape for name, layer in params.items()
            for leaf, value in layer.items()}
  assert shapes == {
      "upscale_0/kernel": (2, 2, 768, 384), "upscale_1/scale": (384,), "upscale_1/bias": (384,),
      "upscale_3/kernel": (2, 2, 384, 192), "upscale_4/scale": (192,), "upscale_4/bias": (192,),
      "upscale_5/kernel": (3, 3, 192, 192), "upscale_6/scale": (192,), "upscale_6/bias": (192,),
      "out/kernel": (1, 1, 192, 19)}
  assert sum(v.size for v in jax.tree.leaves(params)) == (
      768 * 384 * 4 + 2 * 384 + 384 * 192 * 4 + 2 * 192 + 192 * 192 * 9 + 2 * 192 + 192 * 19)
  assert 0.08 < float(jnp.std(params["out"]["kernel"])) < 0.12  # N(0, 0.1).
  assert head.apply({"params": params}, jnp.zeros((1, 3, 4, 768))).shape == (1, 12, 16, 19)


def test_the_encoder_equals_hugging_face_dinov2_with_the_same_weights(tmp_path):
  """A Hugging Face file read into the segmenter (`model.backbone_weights`' loader): `encode`,
  with masked tokens, at a size the scaling leaves whole (input_scale 1), is Dinov2Model's last
  hidden state without the class token, with `bool_masked_pos`."""
  torch = test_vit._torch()  # pylint: disable=protected-access
  hf = test_vit._hf_model(0)  # pylint: disable=protected-access
  hf.save_pretrained(tmp_path)
  model = vfm.VFMSegmenter(num_classes=3, input_scale=1.0)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 70, 98, 3)).astype(np.float32)
  mask = rng.random((2, 35)) < 0.7
  variables = jax.device_get(jax.jit(model.init)(jax.random.key(0), images[:1]))
  loaded, report = weights.load_backbone(variables, str(tmp_path / "model.safetensors"),
                                         model.backbone_torch_key)
  assert report.layout == weights.HF_DINOV2 and not report.unused
  assert len(report.loaded) == len(jax.tree.leaves(loaded["params"]["backbone"]))
  got = model.apply(loaded, jnp.asarray(images), token_mask=jnp.asarray(mask), method="encode")
  with torch.no_grad():
    expected = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                  bool_masked_pos=torch.from_numpy(mask)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(got), expected[:, 1:].reshape(2, 5, 7, 384),
                             rtol=1e-4, atol=1e-4)


def test_masked_tokens_hide_the_image_and_no_mask_is_an_all_false_mask():
  model = _model(input_scale=1.0)
  images = jax.random.uniform(jax.random.key(0), (2, 28, 42, 3))
  other = jax.random.uniform(jax.random.key(1), (2, 28, 42, 3))
  variables = model.init(jax.random.key(2), images)
  everything = jnp.ones((2, 6), bool)
  np.testing.assert_allclose(model.apply(variables, images, token_mask=everything)["logits"],
                             model.apply(variables, other, token_mask=everything)["logits"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(model.apply(variables, images)["logits"],
                                model.apply(variables, images,
                                            token_mask=jnp.zeros((2, 6), bool))["logits"])


def test_token_masks_have_the_ratio_and_are_keyed_by_the_global_example_index():
  masks = jax.vmap(lambda k: daformer.token_mask(k, 6400, 0.7))(
      jax.random.split(jax.random.key(0), 16))
  assert masks.shape == (16, 6400) and abs(float(masks.mean()) - 0.7) < 0.005
  assert 0.66 < float(masks.mean(axis=1).min()) and float(masks.mean(axis=1).max()) < 0.74
  config = vfm_uda_config.get_config()
  method = methods.build(config, 8)
  grid = method.token_grid
  assert grid == _model().token_grid(*pipeline.crop_size(config, "target")) == (5, 10)
  images = jax.random.uniform(jax.random.key(1), (8, 64, 128, 3), maxval=255.0)
  labels = jnp.zeros((8, 64, 128), jnp.int32)

  def draw(num_devices):
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
    def one(x, y):
      keys = global_batch.example_keys(jax.random.key(5), x.shape[0])
      return method.target_inputs(x, y, jnp.ones(y.shape), keys)["token_mask"]
    return np.asarray(parallel.data_parallel(one, mesh, in_specs=(P("data"), P("data")),
                                             out_specs=P("data"))(images, labels))

  one = draw(1)
  assert one.shape == (8, 50)
  np.testing.assert_array_equal(one, draw(8))
  assert len({m.tobytes() for m in one}) == 8  # Each example its own mask.


def test_the_teacher_averages_its_softmax_over_a_horizontal_flip():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 4, 6, 3)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  # Not mirror-symmetric: each pixel's class scores depend on its column.
  predict = lambda x: x @ weight + 0.3 * jnp.outer(jnp.arange(x.shape[2]), jnp.arange(5))
  probs = jax.nn.softmax(predict(images), -1)
  mirrored = jax.nn.softmax(predict(images[:, :, ::-1]), -1)[:, :, ::-1]
  np.testing.assert_allclose(daformer.flip_averaged_probs(predict, images),
                             (probs + mirrored) / 2, rtol=1e-6)
  assert not np.allclose(probs, mirrored)
  # The method's teacher is that of the EMA weights.
  config = vfm_uda_config.get_config()
  config.data.crop_size = (28, 42)
  method = methods.build(config, 8)
  model = models.build_segmenter(config.model, 8)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 42, 3)))
  seg = type("Seg", (), {"apply_fn": model.apply})()
  x = jax.random.normal(jax.random.key(1), (2, 28, 42, 3))
  ema = {"params": variables["params"], "batch_stats": {}}
  expected = daformer.flip_averaged_probs(
      lambda v: model.apply(variables, v)["logits"], x)
  np.testing.assert_allclose(method.teacher_probs(seg, ema, x), expected, rtol=1e-6)
  config.adapt.st_flip_teacher = False
  plain = methods.build(config, 8).teacher_probs(seg, ema, x)
  np.testing.assert_allclose(plain, jax.nn.softmax(model.apply(variables, x)["logits"], -1),
                             rtol=1e-6)


def test_classmix_pastes_onto_weakly_jittered_target_images_and_the_source_pass_too():
  """VFM-UDA's `random_aug_weak` of the target images before mixing, and of the source pass's
  images: torchvision's ColorJitter(32/255, 0.5, 0.5, 18/360) with probability 0.9, drawn per
  example."""
  config = vfm_uda_config.get_config()
  method = methods.build(config, 19)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (64, 4, 6, 3)), jnp.float32)
  keys = global_batch.example_keys(jax.random.key(1), 64)
  got = np.asarray(method.mix_target_images(images, keys))
  changed = [not np.allclose(g, x) for g, x in zip(got, np.asarray(images))]
  assert 48 <= sum(changed) < 64  # 0.9 of 64 images: 57.6 expected, all 64 once in 800.
  for i in range(64):
    want = daformer.weak_jitter(images[i], jax.random.fold_in(keys[i], 6))
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-4)  # vmapped vs one by one.
  # The source pass's images: the same jitter with their own draws.
  source = np.asarray(method.source_images(images, keys))
  for i in range(64):
    want = daformer.weak_jitter(images[i], jax.random.fold_in(keys[i], 7))
    np.testing.assert_allclose(source[i], want, rtol=1e-5, atol=1e-4)
  config.adapt.st_target_weak = config.adapt.st_source_weak = False
  method = methods.build(config, 19)
  np.testing.assert_array_equal(method.mix_target_images(images, keys), images)
  np.testing.assert_array_equal(method.source_images(images, keys), images)


def test_the_schedule_is_vfm_udas_warmup_and_linear_scheduler():
  """VFM-UDA's (and VFM-UDA++'s) lr factor: np.linspace(1e-3, 1, 1500) over the warm-up, then
  np.linspace(1, 0, 40001)[1500:], each x the group's lr."""
  from segjax import optim  # pylint: disable=import-outside-toplevel
  config = vfm_uda_config.get_config("gta5=/g,cityscapes=/c")
  _, schedule = optim.segmenter_optimizer(config.optim.seg, config.num_train_steps)
  official = np.concatenate([np.linspace(1e-3, 1, 1500), np.linspace(1, 0, 40_001)[1500:]])
  steps = np.array([0, 1, 700, 1498, 1499, 1500, 1501, 20_000, 39_999, 40_000])
  got = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
  np.testing.assert_allclose(got, config.optim.seg.lr * official[steps], rtol=2e-5, atol=1e-12)


def test_the_published_recipe_and_the_built_in_one():
  config = vfm_uda_config.get_config("gta5=/data/gta5,cityscapes=/data/cityscapes")
  assert config.eval_batch_size == 1
  config.eval_batch_size = 8  # The test's 8 devices.
  validation.validate_config(config)
  assert (config.adapt.method, config.model.name, config.model.dtype) == (
      "vfm_uda", "vfm_vit_b14", "bfloat16")
  adapt = config.adapt
  assert (adapt.st_alpha, adapt.st_threshold, adapt.mic, adapt.mic_ratio, adapt.mic_lambda,
          adapt.st_flip_teacher, adapt.fd_lambda) == (0.999, 0.968, True, 0.7, 1.0, True, 0.0)
  assert (adapt.st_ignore_top, adapt.st_ignore_bottom) == (0.0, 0.0)
  # PyTorch's CE over the labelled pixels; torchvision's jitter 0.2 with p 0.8.
  assert config.loss.avg_non_ignore is True and (adapt.st_jitter, adapt.st_jitter_p) == (0.2, 0.8)
  # VFM-UDA's margins of the 2048x1024 image: int(0.03 h), int(0.25 h), int(0.03 w) twice.
  assert tuple(config.data.target.pseudo_margins) == (30, 256, 61, 61)
  seg = config.optim.seg
  # Head 5e-5 x sqrt(8), the encoder 0.1 x that; warm-up 1,500 steps from 1e-3; 40k steps.
  assert seg.name == "adamw" and seg.weight_decay == 0.01 and seg.head_lr_mult == 10.0
  np.testing.assert_allclose(seg.lr * seg.head_lr_mult, 5e-5 * np.sqrt(8))
  assert (seg.warmup_steps, seg.warmup_ratio, seg.power, config.num_train_steps) == (
      1500, 1e-3, 1.0, 40_000)
  assert config.batch_size == 8 and tuple(config.data.crop_size) == (1024, 1024)
  # The short side at 1440, the aspect ratio kept: GTA5's 1914x1052 at 2620x1440.
  assert tuple(config.data.source.resize) == (1440, 10_000) and config.data.source.keep_ratio
  assert tuple(config.data.target.resize) == (1024, 2048)
  assert tuple(config.data.augment.scale_range) == (0.9, 1.1)
  # Images with over 3,000 pixels of the class at GTA5's own 1914x1052 (5,621 at 2620x1440),
  # crops with over 6,000 (VFM-UDA's rare_class_sampler_dataset.py).
  rcs = config.data.rcs
  assert (rcs.temperature, rcs.min_pixels, rcs.min_pixels * rcs.min_crop_ratio) == (
      0.05, 5621, pytest.approx(6000))
  rcs = vfm_uda_config.get_config("synthia=/s,cityscapes=/c").data.rcs
  assert (rcs.min_pixels, rcs.min_pixels * rcs.min_crop_ratio) == (12000, pytest.approx(6000))
  assert (tuple(config.inference.window), tuple(config.inference.stride)) == ((1024, 1024),
                                                                              (512, 512))
  assert config.inference.average == "probs"  # slide_inference_pre_cropped's softmax.
  built_in = vfm_uda_config.get_config()
  validation.validate_config(built_in)
  assert built_in.model.name == "vfm_vit_s14" and built_in.data.source.name == "street_scenes"
  assert not built_in.model.backbone_weights


@pytest.mark.parametrize("field, value, message", [
    ("model.name", "daformer_mitb0", r"adapt.method='vfm_uda' masks a ViT segmenter's tokens"),
    ("adapt.fd_lambda", 0.005, r"adapt.fd_lambda=0.005: VFM-UDA's segmenters have no feature"),
])
def test_the_method_refuses_what_it_cannot_do(field, value, message):
  config = vfm_uda_config.get_config()
  section, name = field.split(".")
  config[section][name] = value
  config.model.backbone_weights = "x.pth" if field == "adapt.fd_lambda" else ""
  with pytest.raises(ValueError, match=message):
    methods.build(config, 8)
