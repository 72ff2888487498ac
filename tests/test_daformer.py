"""DAFormer: its schedule and parameter groups, the feature distance, and its step (8 == 1)."""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import daformer as daformer_config
from segjax import checkpointing, methods, models, optim, parallel
from segjax import states as states_lib
from segjax.methods import daformer
from segjax.models import layers, weights

from safetensors.numpy import load_file

import uda_testing  # pylint: disable=wrong-import-order


def test_warmup_then_linear_decay_is_mmcvs_poly10warm():
  """lr_t = poly_t * (1 - (1 - t / 1500) * (1 - 1e-6)) while t < 1500 (mmcv's linear warm-up
  of the regular lr), poly_t = 6e-5 * (1 - t / 40000)."""
  config = daformer_config.get_config("gta5=/g,cityscapes=/c")
  _, schedule = optim.segmenter_optimizer(config.optim.seg, config.num_train_steps)
  poly = lambda t: 6e-5 * (1 - t / 40_000)
  expected = {0: poly(0) * 1e-6, 750: poly(750) * (1 - 0.5 * (1 - 1e-6)), 1499:
              poly(1499) * (1 - (1 / 1500) * (1 - 1e-6)), 1500: poly(1500), 20_000: 3e-5,
              40_000: 0.0}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-5, atol=1e-14, err_msg=step)


def test_parameters_decay_and_learn_10x_by_name():
  """AdamW with zero gradients moves a parameter by -lr * weight_decay * value: by the head's
  10x lr outside the encoder, not at all for the norms (DAFormer's paramwise_cfg: head
  lr_mult 10, norm and pos_block decay_mult 0)."""
  config = daformer_config.get_config()
  model = models.build_segmenter(config.model, 5)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  params = jax.tree.map(lambda p: jnp.ones(p.shape, p.dtype), shapes)
  tx, schedule = optim.segmenter_optimizer(config.optim.seg, config.num_train_steps)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  lr = float(schedule(0))
  flat = traverse_util.flatten_dict(jax.device_get(updates))
  seen = set()
  for path, update in flat.items():
    name = "/".join(path)
    head = path[0] != weights.BACKBONE
    decays = "norm" not in name
    expected = -(10 * lr if head else lr) * 0.01 if decays else 0.0
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-20, err_msg=name)
    seen.add((head, decays))
  assert seen == {(False, True), (False, False), (True, True)}  # The head's BN is named bn.
  assert ("backbone", "block1_0", "norm1", "scale") in flat
  assert ("decode_head", "bottleneck", "bn", "scale") in flat


def test_no_decay_is_refused_for_an_optimizer_that_does_not_read_it():
  config = daformer_config.get_config()
  config.optim.seg.name = "sgd"
  with pytest.raises(ValueError, match=r"optim.seg.no_decay=\('norm', 'pos_block'\) is read "
                                       r"by AdamW only"):
    optim.segmenter_optimizer(config.optim.seg, 10)


def test_pooled_labels_take_the_majority_and_ignore_mixed_or_ignored_cells():
  """DAFormer's downscale_label_ratio on a 2x3 grid of 4x4 cells, 5 classes, ratio 0.75."""
  labels = np.full((1, 8, 12), 255, np.int64)
  labels[0, 0:4, 0:4] = 3  # All class 3.
  labels[0, 0:4, 4:8] = 1
  labels[0, 0:1, 4:8] = 2  # 12 of 16 pixels class 1: exactly 0.75, kept.
  labels[0, 0:4, 8:12] = 4
  labels[0, 0:2, 8:12] = 0  # Half and half: ignored.
  labels[0, 4:8, 0:4] = 2
  labels[0, 4:5, 0:4] = 255  # 12 of 16 class 2, 4 ignored: class 2.
  # Cells (1, 1): ignored pixels only; (1, 2): 10 class 0 and 6 ignored (0.625): ignored.
  labels[0, 4:8, 8:12] = 255
  labels[0, 4:6, 8:12] = 0
  labels[0, 6:7, 8:10] = 0
  cells = np.asarray(daformer.pooled_labels(jnp.asarray(labels), (2, 3), 5, 0.75))
  np.testing.assert_array_equal(cells, [[[3, 1, -1], [2, -1, -1]]])
  # A grid that does not divide the labels: cells are rounded up, the pixels past them ignored.
  cells = np.asarray(daformer.pooled_labels(jnp.asarray(labels[:, :7, :11]), (2, 3), 5, 0.75))
  np.testing.assert_array_equal(cells, [[[3, 1, -1], [-1, -1, -1]]])


def test_feature_distance_is_the_mean_l2_over_the_mask_with_zero_gradient_at_equality():
  student = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0]))
  frozen = jnp.zeros((1, 2, 2, 3)).at[0, 1, 1].set(jnp.array([0.0, 0.0, 2.0]))
  mask = jnp.array([[[True, False], [True, True]]])
  total, count = daformer.feature_distance(student, frozen, mask)
  assert (float(total), int(count)) == (7.0, 3)  # 5 + 0 + 2; cell (0, 1) is not in the mask.
  grad = jax.grad(lambda s: daformer.feature_distance(s, student, mask)[0])(student)
  assert np.all(np.isfinite(np.asarray(grad))) and not np.any(np.asarray(grad))


def _fd_config(tmp_path, model_name="daformer_mitb0"):
  """configs/daformer.py on the test's small scenes, with (random) backbone weights: FD on."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from configs import test as test_config  # pylint: disable=import-outside-toplevel
  config = daformer_config.get_config()
  small = test_config.get_config()
  config.data, config.batch_size = small.data, small.batch_size
  config.data.crop_size = (64, 64)
  config.adapt.fd_classes = ("car", "person", "pole")
  config.adapt.st_threshold = 0.2
  config.model.name = model_name
  model = models.build_segmenter(config.model, 8)
  # Jitted: eager initialisation dispatches op by op, 20 s of the tests that use this.
  params = jax.jit(model.init)(jax.random.key(7), jnp.zeros((1, 64, 64, 3)))["params"][
      weights.BACKBONE]
  key = models.segmenter_class(config.model.name).backbone_torch_key
  tensors = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif value.ndim == 2:
      value = value.T
    tensors[key(path)] = np.ascontiguousarray(value)
  config.model.backbone_weights = str(tmp_path / "mit_b0.safetensors")
  save_file(tensors, config.model.backbone_weights)
  return config


@pytest.mark.slow  # 160 s on 2 cores: benchmarks/slow_tests.py.
def test_daformer_step_on_8_devices_equals_1_device_with_the_feature_distance(tmp_path):
  config = _fd_config(tmp_path)
  num_classes = 8
  method = methods.build(config, num_classes)
  assert method.fd_lambda == 0.005 and method.fd_classes == (5, 6, 7)
  batch = uda_testing.random_batch(config, n=config.batch_size, seed=3)
  # Source labels in 32x32 blocks (MiT-B0's last stage is 1/32): cells of one class each.
  blocks = np.random.default_rng(3).integers(0, num_classes, (config.batch_size, 2, 2))
  batch["source"]["label"] = np.kron(blocks, np.ones((32, 32), np.int64)).astype(
      batch["source"]["label"].dtype)

  def run(num_devices):
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
    states, _ = states_lib.create_states(config, jax.random.key(0), num_classes, mesh)
    states = states_lib.initialise_segmenters(states, method, config, num_classes, mesh)
    step = parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                                  in_specs=(P(), P("data"), P()), out_specs=(P(), P()))
    history = []
    for i in range(2):
      states, metrics = step(states, parallel.to_global(batch, mesh), jax.random.key(i))
      history.append(jax.device_get(metrics))
    return history, jax.device_get(states)

  history8, states8 = run(8)
  history1, states1 = run(1)
  assert set(states1) == {"seg", "ema", "imnet"}
  assert set(history1[0]) == {"loss_seg", "loss_mix", "loss_fd", "pseudo_weight", "lr"}
  # The frozen encoder holds the file's weights (copied from the loaded student).
  frozen = traverse_util.flatten_dict(states1["imnet"]["params"])
  key = models.segmenter_class(config.model.name).backbone_torch_key
  saved = load_file(config.model.backbone_weights)
  for path, value in frozen.items():
    np.testing.assert_array_equal(value, weights.convert(saved[key(path)], value.shape, ""))
  # Drop path makes the student's training-mode features differ from the frozen ones at once.
  assert history1[0]["loss_fd"] > 0 and history1[1]["loss_fd"] > 0
  for m8, m1 in zip(history8, history1):
    for key in m1:
      np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
  # AdamW's first updates are about lr * sign(gradient): a weight whose gradient is a
  # cancellation at rounding size moves by +-lr either way (measured: 5 of 262,144 entries of an
  # encoder kernel 5e-6 apart in one run, 1 of a head kernel's 8,192 4.8e-5 apart in another).
  # At step 2 the encoder's lr is 4e-6 (warm-up), the head's 4e-5: 1e-4 is 2.5 head steps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               states8["seg"].params, states1["seg"].params)


def test_the_frozen_encoder_holds_the_imagenet_weights_when_the_student_starts_from_a_run(
    tmp_path):
  """config.init_from (a source-only run, say) replaces the student's weights after the frozen
  encoder has copied the backbone file's, as DAFormer's frozen model is the ImageNet one."""
  config, num_classes = _fd_config(tmp_path, "segformer_mitb0"), 8  # The lighter head.
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  method = methods.build(config, num_classes)
  fresh, _ = states_lib.create_states(config, jax.random.key(0), num_classes, mesh)
  other = {"seg": jax.tree.map(lambda x: x + 1, fresh["seg"])}  # Another run's segmenter.
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints"), max_to_keep=1)
  ckpt.save(5, other, iter(grain.MapDataset.range(4).to_iter_dataset()))
  ckpt.wait_until_finished()
  ckpt.close()
  config.init_from = str(tmp_path / "run")
  started = jax.device_get(states_lib.initialise_segmenters(fresh, method, config, num_classes,
                                                            mesh))
  saved = load_file(config.model.backbone_weights)
  key = models.segmenter_class(config.model.name).backbone_torch_key
  frozen = traverse_util.flatten_dict(started["imnet"]["params"])
  for path, value in frozen.items():
    np.testing.assert_array_equal(value, weights.convert(saved[key(path)], value.shape, ""))
  jax.tree.map(np.testing.assert_array_equal, started["seg"].params,
               jax.device_get(other["seg"].params))


def test_without_backbone_weights_the_feature_distance_is_off():
  config = daformer_config.get_config()
  method = methods.build(config, 8)
  assert method.fd_lambda == 0.0
  assert "imnet" not in method.state_inits(None, lambda: None)


def test_the_feature_distance_needs_a_segmenter_with_an_encoder(tmp_path):
  config = daformer_config.get_config()
  config.model.name = "compact"
  config.model.backbone_weights = str(tmp_path / "w.safetensors")
  with pytest.raises(ValueError, match=r"needs a segmenter with a pretrained encoder"):
    methods.build(config, 8)


def test_the_published_recipe():
  config = daformer_config.get_config("gta5=/g,cityscapes=/c")
  assert config.model.name == "daformer_mitb5" and config.num_train_steps == 40_000
  assert tuple(config.data.crop_size) == (512, 512) and config.batch_size == 2
  adapt = config.adapt
  assert (adapt.method, adapt.st_alpha, adapt.st_threshold, adapt.fd_lambda,
          adapt.fd_min_ratio) == ("daformer", 0.999, 0.968, 0.005, 0.75)
  assert round(adapt.st_ignore_top * 512) == 15 and round(adapt.st_ignore_bottom * 512) == 120
  seg = config.optim.seg
  assert (seg.name, seg.lr, seg.b1, seg.b2, seg.weight_decay, seg.head_lr_mult, seg.power,
          seg.warmup_steps, seg.warmup_ratio) == ("adamw", 6e-5, 0.9, 0.999, 0.01, 10.0, 1.0,
                                                   1500, 1e-6)
  # mmseg 0.16's CE over every pixel; the mixed images jittered 4 times in 5 (`uniform > 0.2`).
  assert config.loss.avg_non_ignore is False and adapt.st_jitter_p == 0.8
  assert tuple(config.data.source.resize) == (720, 1280) and config.data.source.keep_ratio


# ---- MIC: masked image consistency.

def test_block_mask_has_the_block_size_and_ratio_asked_for():
  masks = np.stack([np.asarray(daformer.block_mask(jax.random.key(i), 512, 512, 64, 0.7))
                    for i in range(200)])
  blocks = masks.reshape(200, 8, 64, 8, 64)
  # Constant on each 64x64 block.
  assert (blocks == blocks[:, :, :1, :, :1]).all()
  kept = blocks[:, :, 0, :, 0].mean()  # 12,800 blocks: 0.3 +- 0.004 (one standard deviation).
  assert 0.28 < kept < 0.32, kept
  # A size that is not a multiple of the block: round(100 / 64) x round(150 / 64) = 2 x 2
  # cells, scaled up by nearest neighbour (cell floor(i * 2 / 100): rows 0-49 and 50-99).
  mask = np.asarray(daformer.block_mask(jax.random.key(3), 100, 150, 64, 0.5))
  assert (mask[:50, :75] == mask[0, 0]).all() and (mask[50:, 75:] == mask[99, 149]).all()
  assert (mask[:50, 75:] == mask[0, 149]).all() and (mask[50:, :75] == mask[99, 0]).all()
  # A block larger than the image: one cell.
  mask = np.asarray(daformer.block_mask(jax.random.key(4), 20, 30, 64, 0.5))
  assert (mask == mask[0, 0]).all()


def _mic_config():
  from configs import test as test_config  # pylint: disable=import-outside-toplevel
  config = daformer_config.get_config()
  small = test_config.get_config()
  config.model, config.data, config.batch_size = small.model, small.data, small.batch_size
  config.model.dropout_rate = 0.0
  config.adapt.update(mic=True, mic_block=8, st_threshold=0.2)
  return config


def test_mic_masks_are_keyed_by_the_global_example_index():
  config = _mic_config()
  method = methods.build(config, 8)
  batch = uda_testing.random_batch(config, n=8)
  images = jnp.asarray(batch["target"]["image"])
  pseudo = jnp.zeros(images.shape[:3], jnp.int32)
  weights = jnp.ones(images.shape[:3])

  def inputs(num_devices):
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))

    def per_device(key, images, pseudo, weights):
      from segjax import global_batch  # pylint: disable=import-outside-toplevel
      keys = global_batch.example_keys(key, images.shape[0])
      return method.target_inputs(images, pseudo, weights, keys)
    return jax.device_get(parallel.data_parallel(
        per_device, mesh, in_specs=(P(), P("data"), P("data"), P("data")),
        out_specs=P("data"))(jax.random.key(0), images, pseudo, weights))

  one, eight = inputs(1), inputs(8)
  np.testing.assert_array_equal(one["keep"], eight["keep"])
  np.testing.assert_allclose(one["image"], eight["image"], atol=1e-4)  # Of 0-255.
  assert np.abs(one["image"] - np.asarray(images, np.float32)).max() > 1  # Augmented.
  assert not (one["keep"][0] == one["keep"][1]).all()  # Each example its own mask.
  assert 0.1 < one["keep"].mean() < 0.5


class _FixedMask(daformer.DAFormer):
  """MIC with a fixed checkerboard of kept 8x8 blocks and no colour augmentation."""

  def target_inputs(self, target_images, pseudo, weights, example_keys):
    inputs = super().target_inputs(target_images, pseudo, weights, example_keys)
    height, width = target_images.shape[1:3]
    rows, cols = np.arange(height)[:, None] // 8, np.arange(width)[None, :] // 8
    keep = jnp.asarray(np.broadcast_to((rows + cols) % 2 == 0, target_images.shape[:3]))
    return dict(inputs, image=target_images.astype(jnp.float32), keep=keep)


def test_the_mask_loss_learns_the_teachers_labels_of_the_unmasked_image():
  """loss_mask = the confidence-weighted CE of the student on the masked target images (masked
  pixels 0 after normalisation) against the teacher's pseudo labels of the whole images; the
  weights are 0 on the ignored top rows and where the input's `pseudo_valid` map is 0 (HRDA's
  pseudo-label margins)."""
  config = _mic_config()
  config.adapt.st_ignore_top = 0.25
  config.model.sync_batch_stats = False  # One device; the model is applied outside shard_map.
  method = _FixedMask(config, 8)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  states, _ = states_lib.create_states(config, jax.random.key(0), 8, mesh)
  batch = uda_testing.random_batch(config, n=config.batch_size, seed=5)
  pseudo_valid = np.ones(batch["target"]["image"].shape[:3], np.uint8)
  pseudo_valid[:, :, :5] = 0  # A crop holding the image's left margin.
  batch["target"]["pseudo_valid"] = pseudo_valid
  step = parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                                in_specs=(P(), P("data"), P()), out_specs=(P(), P()))
  seg = jax.device_get(states["seg"])
  _, metrics = step(states, parallel.to_global(batch, mesh), jax.random.key(1))

  variables = {"params": seg.params, "batch_stats": seg.batch_stats}
  target = method.preprocess(jnp.asarray(batch["target"]["image"]))
  def teacher_logits(images):  # At step 0 the student; BatchNorm on the batch's statistics.
    with layers.batch_statistics():
      return seg.apply_fn(variables, images, train=False, mutable=["batch_stats"])[0]["logits"]

  teacher = teacher_logits(target)
  probs = jax.nn.softmax(teacher, axis=-1)
  pseudo, confidence = jnp.argmax(probs, -1), jnp.max(probs, -1)
  weight = jnp.mean(confidence >= 0.2)
  np.testing.assert_allclose(metrics["pseudo_weight"], weight, rtol=1e-6)
  height, width = pseudo.shape[1:]
  rows = np.arange(height)[None, :, None]
  weights = jnp.where((rows >= height // 4) & (rows < height - round(120 / 512 * height))
                      & (pseudo_valid == 1), weight, 0.0)
  rows, cols = np.arange(height)[:, None] // 8, np.arange(width)[None, :] // 8
  masked = target * ((rows + cols) % 2 == 0)[None, :, :, None]
  student, _ = seg.apply_fn(variables, masked, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(0)})
  ce = -jnp.take_along_axis(jax.nn.log_softmax(student["logits"], -1), pseudo[..., None], -1)
  expected = jnp.sum(ce[..., 0] * weights) / ce.size
  assert metrics["loss_mask"] > 0.1
  np.testing.assert_allclose(metrics["loss_mask"], expected, rtol=1e-5)
  # The same with the pseudo labels of the masked images is another number.
  masked_teacher = jnp.argmax(teacher_logits(masked), -1)
  assert (masked_teacher != pseudo).mean() > 0.05


def test_mic_settings_are_checked():
  for field, value, message in (("mic_ratio", 1.0, r"adapt.mic_ratio=1.0 must be in \[0, 1\)"),
                                ("mic_block", 0, "adapt.mic_block=0 must be a positive"),
                                ("mic_lambda", -1.0, "adapt.mic_lambda=-1.0 must be >= 0")):
    config = _mic_config()
    config.adapt[field] = value
    with pytest.raises(ValueError, match=message):
      methods.build(config, 8)
