"""HRDA's multi-resolution segmenter: detail windows, the scale-attention fusion, sliding windows."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from segjax import models, parallel
from segjax.models import hrda, layers


def test_detail_windows_lie_inside_the_input_on_the_8_pixel_grid():
  corners = np.stack([np.asarray(hrda.detail_offset(jax.random.key(i), 1024, 1024, (512, 512), 8))
                      for i in range(400)])
  assert (corners % 8 == 0).all() and (corners >= 0).all() and (corners + 512 <= 1024).all()
  # HRDA's get_crop_bbox: randint(0, (margin + 1) // 8) * 8: 0 ... 504 (not 512, as there).
  assert set(corners[:, 0]) == set(range(0, 512, 8))
  # Non-square, a margin that is not a multiple of 8, and a window as large as the input.
  corners = np.stack([np.asarray(hrda.detail_offset(jax.random.key(i), 72, 100, (32, 100), 8))
                      for i in range(100)])
  assert set(corners[:, 0]) == set(range(0, 40, 8)) and set(corners[:, 1]) == {0}


def _reference_fusion(context, attention, detail, offsets):
  """The formula written out with numpy loops: attention 0 outside the window's context cells,
  the detail pasted at offsets / 4, then up(a) * detail + up((1 - a) * context)."""
  n, h, w, _ = context.shape
  dh, dw = detail.shape[1:3]
  attention = np.array(attention)
  canvas = np.zeros((n, 2 * h, 2 * w, detail.shape[-1]), np.float32)
  for i, (y, x) in enumerate(offsets):
    keep = np.zeros((h, w), bool)
    keep[y // 8:y // 8 + dh // 2, x // 8:x // 8 + dw // 2] = True
    attention[i][~keep] = 0.0
    canvas[i, y // 4:y // 4 + dh, x // 4:x // 4 + dw] = detail[i]
  up = lambda x: np.asarray(jax.image.resize(x, (n, 2 * h, 2 * w, x.shape[-1]), "bilinear"))
  return up(attention) * canvas + up((1 - attention) * context), attention


def test_the_scale_attention_fusion_is_the_formula():
  rng = np.random.default_rng(0)
  context = rng.normal(size=(2, 16, 24, 5)).astype(np.float32)
  attention = rng.uniform(size=(2, 16, 24, 5)).astype(np.float32)
  detail = rng.normal(size=(2, 16, 24, 5)).astype(np.float32)  # A 64x96 window at 1/4.
  offsets = np.array([[16, 40], [64, 0]], np.int32)  # In input pixels (128x192).
  fused = np.asarray(hrda.fuse(jnp.asarray(context), jnp.asarray(attention), jnp.asarray(detail),
                               jnp.asarray(offsets)))
  expected, masked = _reference_fusion(context, attention, detail, offsets)
  np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)
  # Far from the window only the (upsampled) context; inside, where the attention is 1, only
  # the detail.
  up_context = np.asarray(jax.image.resize(context, (2, 32, 48, 5), "bilinear"))
  np.testing.assert_allclose(fused[1, :12], up_context[1, :12], rtol=1e-5, atol=1e-6)
  assert masked[1, :8].sum() == 0 and masked[1, 8:, 12:].sum() == 0
  assert masked[1, 8:, :12].min() > 0
  ones = np.ones_like(attention)
  fused = np.asarray(hrda.fuse(jnp.asarray(context), jnp.asarray(ones), jnp.asarray(detail),
                               jnp.asarray(offsets)))
  np.testing.assert_allclose(fused[0, 5:19, 11:33], detail[0, 1:15, 1:23], rtol=1e-5, atol=1e-6)


def test_without_a_window_the_detail_covers_the_whole_output_and_the_attention_is_unmasked():
  rng = np.random.default_rng(1)
  context = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
  attention = rng.uniform(size=(1, 8, 8, 1)).astype(np.float32)  # One map for all classes.
  detail = rng.normal(size=(1, 16, 16, 3)).astype(np.float32)
  up = lambda x: np.asarray(jax.image.resize(x, (1, 16, 16, x.shape[-1]), "bilinear"))
  np.testing.assert_allclose(
      hrda.fuse(jnp.asarray(context), jnp.asarray(attention), jnp.asarray(detail), None),
      up(attention) * detail + up((1 - attention) * context), rtol=1e-5, atol=1e-6)


def test_sliding_windows_cover_every_pixel_and_average_the_overlaps():
  # HRDA's inference: 512 windows at stride 256 over a 1024x1024 window, and an odd fit.
  assert hrda.slide_windows(1024, 1024, (512, 512)) == [
      (y, x) for y in (0, 256, 512) for x in (0, 256, 512)]
  corners = hrda.slide_windows(72, 200, (32, 64))
  assert {y for y, _ in corners} == {0, 16, 32, 40} and {x for _, x in corners} == {
      0, 32, 64, 96, 128, 136}
  windows = [jnp.full((1, 32, 64, 1), float(i)) for i in range(len(corners))]
  averaged = np.asarray(hrda.average_windows(windows, corners, 72, 200))[0, ..., 0]
  expected = np.zeros((72, 200))
  count = np.zeros((72, 200))
  for i, (y, x) in enumerate(corners):
    expected[y:y + 32, x:x + 64] += i
    count[y:y + 32, x:x + 64] += 1
  assert count.min() >= 1  # Every pixel covered.
  assert count.max() == 9  # Rows 40-47 and columns 136-159 lie in three windows each.
  np.testing.assert_allclose(averaged, expected / count, rtol=1e-6)


def _model(detail_crop=(32, 64)):
  config = ml_collections.ConfigDict(dict(
      name="hrda_mitb0", dropout_rate=0.0, drop_path_rate=0.0, dtype="float32",
      param_dtype="float32", remat=False, detail_crop=detail_crop, detail_divisible=8))
  return models.build_segmenter(config, 8)


def test_the_segmenter_fuses_its_own_two_scales():
  model = _model(detail_crop=(32, 64))
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)},
                                           mutable=["batch_stats"])[0])
  out = train(variables, images)
  assert out["logits"].shape == (2, 64, 64, 8) and out["detail_logits"].shape == (2, 32, 64, 8)
  offsets = np.asarray(out["detail_offsets"])
  assert (offsets % 8 == 0).all() and (offsets + [32, 64] <= [64, 64]).all()
  # Inference: the detail windows slide over the input (rows 0-31, 16-47, 32-63); 'features'
  # is the context's (scale 0.5), which `encode` (the frozen encoder's features) computes too.
  out = jax.jit(model.apply)(variables, images)
  assert out["logits"].shape == (2, 64, 64, 8) and "detail_logits" not in out
  assert out["features"].shape == (2, 1, 1, 256)
  np.testing.assert_allclose(jax.jit(functools.partial(model.apply, method="encode"))(
      variables, images)[-1], out["features"], rtol=1e-6)

  def parts(module, images):
    half = jax.image.resize(images, (2, 32, 32, 3), "bilinear", antialias=False)
    context, features = module._predict(half, False)  # pylint: disable=protected-access
    attention = jax.nn.sigmoid(module.scale_attention(features, False))
    # The three windows in one batch of 6, as HRDA's extract_slide_feat.
    crops = jnp.concatenate([images[:, y:y + 32] for y in (0, 16, 32)])
    windows = jnp.split(module._predict(crops, False)[0], 3)  # pylint: disable=protected-access
    return context, attention, windows

  def expected(variables):
    (context, attention, windows), _ = jax.jit(functools.partial(
        model.apply, method=parts, mutable=["batch_stats"]))(variables, images)
    detail = np.zeros((2, 16, 16, 8), np.float32)
    count = np.zeros((16, 1, 1))
    for window, y in zip(windows, (0, 4, 8)):
      detail[:, y:y + 8] += np.asarray(window)
      count[y:y + 8] += 1
    detail /= count
    up = lambda x: jax.image.resize(x, (2, 16, 16, x.shape[-1]), "bilinear")
    fused = up(attention) * detail + up((1 - attention) * context)
    return jax.image.resize(fused, (2, 64, 64, 8), "bilinear")

  np.testing.assert_allclose(out["logits"], expected(variables), rtol=1e-4, atol=1e-5)
  # DACS's teacher (BatchNorm on batch statistics): the windows are normalised as one batch,
  # with statistics other than each window's own.
  with layers.batch_statistics():
    teacher = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"])[0])(
        variables, images)
    np.testing.assert_allclose(teacher["logits"], expected(variables), rtol=1e-4, atol=1e-5)


def test_detail_windows_are_drawn_per_example_from_its_global_index():
  model = _model(detail_crop=(32, 32))
  images = jax.random.uniform(jax.random.key(0), (8, 64, 64, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images[:1])

  def offsets(num_devices):
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
    apply = lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(3)},
                                     mutable=["batch_stats"])[0]["detail_offsets"]
    return np.asarray(parallel.data_parallel(apply, mesh, in_specs=(P(), P("data")),
                                             out_specs=P("data"))(variables, images))

  one = offsets(1)
  np.testing.assert_array_equal(one, offsets(8))
  assert len({tuple(o) for o in one}) > 1


@pytest.mark.parametrize("field,value,message", [
    ("detail_crop", (30, 64), r"model.detail_crop=\(30, 64\) must be \(height, width\), "
                              r"multiples of 8"),
    ("detail_divisible", 4, "model.detail_divisible=4 must be a multiple of 8"),
])
def test_bad_detail_settings_are_refused(field, value, message):
  config = ml_collections.ConfigDict(dict(name="hrda_mitb0", dtype="float32",
                                          param_dtype="float32", detail_crop=(32, 64),
                                          detail_divisible=8))
  config[field] = value
  with pytest.raises(ValueError, match=message):
    models.build_segmenter(config, 8)


def test_inputs_off_the_8_pixel_grid_or_below_the_window_are_refused():
  model = _model()
  with pytest.raises(ValueError, match="multiple of 8 on each side; got 60x128"):
    model.init(jax.random.key(0), jnp.zeros((1, 60, 128, 3)))
  with pytest.raises(ValueError, match=r"input 24x128 is smaller than model.detail_crop"):
    model.init(jax.random.key(0), jnp.zeros((1, 24, 128, 3)))


def test_the_detail_loss_reads_the_labels_and_weights_of_each_window():
  """HRDA's detail loss: the detail prediction against the labels (and pixel weights) inside
  each example's window, x loss.detail_weight, beside the fused prediction's loss, x (1 -
  loss.detail_weight) as HRDA's head weights it (0.9)."""
  from segjax import losses, steps  # pylint: disable=import-outside-toplevel
  from segjax.methods import base  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 4, (2, 16, 24)).astype(np.int32)
  labels[0, :3] = 255
  weights = rng.uniform(size=(2, 16, 24)).astype(np.float32)
  offsets = np.array([[8, 0], [0, 16]], np.int32)
  outputs = {"logits": jnp.asarray(rng.normal(size=(2, 16, 24, 4)), jnp.float32),
             "aux": (), "detail_logits": jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32),
             "detail_offsets": jnp.asarray(offsets)}
  window_labels = np.stack([labels[0, 8:16, 0:8], labels[1, 0:8, 16:24]])
  window_weights = np.stack([weights[0, 8:16, 0:8], weights[1, 0:8, 16:24]])
  np.testing.assert_array_equal(steps.detail_crop(outputs, jnp.asarray(labels)), window_labels)
  ce = losses.cross_entropy
  loss, parts = steps.supervised_loss(outputs, jnp.asarray(labels), ce, (), None, 0.1)
  fused = losses.global_mean(*ce(outputs["logits"], jnp.asarray(labels)), None)
  detail = losses.global_mean(*ce(outputs["detail_logits"], jnp.asarray(window_labels)), None)
  np.testing.assert_allclose(parts["loss_detail"], detail, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.9 * fused + 0.1 * detail, rtol=1e-6)

  class _Weighted:  # base.Method.weighted_loss needs only detail_weight.
    detail_weight = 0.1
  loss, parts = base.Method.weighted_loss(_Weighted(), outputs, jnp.asarray(labels),
                                          jnp.asarray(weights), None, "loss_mix")
  wce = losses.weighted_cross_entropy
  detail = losses.global_mean(*wce(outputs["detail_logits"], jnp.asarray(window_labels),
                                   jnp.asarray(window_weights)), None)
  np.testing.assert_allclose(parts["loss_mix_detail"], detail, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.9 * parts["loss_mix"] + 0.1 * detail, rtol=1e-6)


def test_the_hrda_method_trains_an_hrda_segmenter():
  from configs import hrda as hrda_config  # pylint: disable=import-outside-toplevel
  from segjax import methods  # pylint: disable=import-outside-toplevel
  config = hrda_config.get_config()
  assert methods.build(config, 8).detail_weight == 0.1
  config.model.name = "daformer_mitb0"
  with pytest.raises(ValueError, match=r"adapt.method='hrda' trains an HRDA segmenter .*"
                                       r"got model.name='daformer_mitb0'"):
    methods.build(config, 8)


def test_the_published_hrda_and_mic_recipes():
  from configs import hrda as hrda_config  # pylint: disable=import-outside-toplevel
  from configs import mic as mic_config  # pylint: disable=import-outside-toplevel
  for module, mic in ((hrda_config, False), (mic_config, True)):
    config = module.get_config("gta5=/g,cityscapes=/c")
    assert (config.model.name, tuple(config.model.detail_crop), config.model.detail_divisible,
            config.loss.detail_weight) == ("hrda_mitb5", (512, 512), 8, 0.1)
    assert tuple(config.data.crop_size) == (1024, 1024) and config.batch_size == 2
    assert tuple(config.data.source.resize) == (1440, 2560) and config.data.source.keep_ratio
    assert tuple(config.data.target.resize) == tuple(config.data.eval.resize) == (1024, 2048)
    assert (tuple(config.inference.window), tuple(config.inference.stride)) == (
        (1024, 1024), (512, 512))
    assert config.data.rcs.min_crop_ratio == 2.0 and config.data.rcs.temperature == 0.01
    adapt = config.adapt
    assert (adapt.method, adapt.fd_lambda, adapt.st_alpha, adapt.st_threshold) == (
        "hrda", 0.005, 0.999, 0.968)
    assert adapt.st_ignore_top == adapt.st_ignore_bottom == 0.0
    assert tuple(config.data.target.pseudo_margins) == (30, 240, 30, 30)
    assert (adapt.mic, adapt.mic_block, adapt.mic_ratio, adapt.mic_lambda) == (mic, 64, 0.7, 1.0)
    assert config.num_train_steps == 40_000 and config.optim.seg.lr == 6e-5
  synthia = hrda_config.get_config("synthia=/s,cityscapes=/c")
  assert tuple(synthia.data.source.resize) == (1520, 2560)
