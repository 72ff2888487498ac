"""Losses and metrics on hand-computed arrays."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import default
from segjax import losses, metrics, optim, steps


def test_cross_entropy_ignores_255_and_matches_hand_values():
  # Two classes; pixel logits (0, 0) -> CE ln 2; (0, ln 3) with label 1 -> CE ln(4/3).
  logits = jnp.array([[[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]]]])
  labels = jnp.array([[[0, 1, 255]]])
  total, count = losses.cross_entropy(logits, labels)
  assert float(count) == 2.0
  np.testing.assert_allclose(float(total), math.log(2.0) + math.log(4.0 / 3.0), rtol=1e-6)


def test_cross_entropy_class_weights_weight_the_mean_like_pytorch():
  logits = jnp.zeros((1, 1, 2, 2))  # Every pixel: CE = ln 2.
  labels = jnp.array([[[0, 1]]])
  total, count = losses.cross_entropy(logits, labels, class_weights=jnp.array([1.0, 3.0]))
  assert float(count) == 4.0
  np.testing.assert_allclose(float(total / count), math.log(2.0), rtol=1e-6)


def test_binary_cross_entropy_hand_values():
  total, count = losses.binary_cross_entropy(jnp.array([0.0, 2.0]), 1.0)
  assert float(count) == 2.0
  np.testing.assert_allclose(float(total), math.log(2.0) + math.log(1 + math.exp(-2.0)),
                             rtol=1e-6)


def test_global_mean_counts_pixels_across_devices():
  """Devices with different numbers of ignored pixels: the mean is over all valid pixels."""
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  n = len(jax.devices())
  values = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
  weights = np.ones_like(values)
  weights[0, 1:] = 0  # Device 0 counts one pixel, the others four.

  def per_device(v, w):
    return losses.global_mean(jnp.sum(v * w), jnp.sum(w), "data")

  got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                              out_specs=P()))(values, weights)
  np.testing.assert_allclose(float(got), (values * weights).sum() / weights.sum(), rtol=1e-6)


def test_confusion_matrix_rows_are_labels_and_255_is_skipped():
  labels = jnp.array([0, 0, 1, 2, 255, 2])
  preds = jnp.array([0, 1, 1, 0, 2, 2])
  expected = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
  np.testing.assert_array_equal(np.asarray(metrics.confusion_matrix(labels, preds, 3)), expected)


def test_scores_hand_values_and_absent_class_is_nan():
  confusion = np.array([[3, 1, 0, 0],
                        [2, 4, 0, 0],
                        [0, 0, 0, 0],   # Class 2: never in labels, never predicted -> NaN.
                        [0, 0, 0, 5]])
  result = metrics.scores(confusion)
  iou = [3 / (4 + 5 - 3), 4 / (6 + 5 - 4), np.nan, 1.0]
  np.testing.assert_allclose(result["iou"], iou, rtol=1e-12)
  np.testing.assert_allclose(result["miou"], np.nanmean(iou), rtol=1e-12)
  np.testing.assert_allclose(result["pixel_acc"], 12 / 15, rtol=1e-12)
  np.testing.assert_allclose(result["mean_acc"], np.mean([3 / 4, 4 / 6, 1.0]), rtol=1e-12)


def test_focal_loss_hand_values_and_reduction_to_cross_entropy():
  # p_t = 3/4 for pixel 0 (label 1), 1/2 for pixel 1 (label 0); pixel 2 ignored.
  logits = jnp.array([[[[0.0, math.log(3.0)], [0.0, 0.0], [9.0, 0.0]]]])
  labels = jnp.array([[[1, 0, 255]]])
  total, count = losses.focal_loss(logits, labels, gamma=2.0, alpha=jnp.array([0.25, 0.5]))
  want = 0.5 * (1 / 4) ** 2 * math.log(4 / 3) + 0.25 * (1 / 2) ** 2 * math.log(2.0)
  assert float(count) == 2.0
  np.testing.assert_allclose(float(total), want, rtol=1e-6)
  ce_total, _ = losses.cross_entropy(logits, labels)
  np.testing.assert_allclose(float(losses.focal_loss(logits, labels, gamma=0.0)[0]),
                             float(ce_total), rtol=1e-6)


def test_ohem_keeps_hard_pixels_or_the_hardest_sixteenth():
  # 32 valid pixels of 2 classes; p(true) = 0.5 for 4 of them (CE ln 2 > -ln 0.7), 0.9 else.
  easy, hard = math.log(9.0), 0.0
  logits = jnp.array([[hard] * 4 + [easy] * 28]).reshape(1, 1, 32, 1)
  logits = jnp.concatenate([logits, jnp.zeros_like(logits)], axis=-1)
  labels = jnp.zeros((1, 1, 32), jnp.int32)
  total, count = losses.ohem_cross_entropy(logits, labels, thresh=0.7)
  assert float(count) == 4.0
  np.testing.assert_allclose(float(total / count), math.log(2.0), rtol=1e-6)
  # Only 1 hard pixel, fewer than 32 // 16 = 2: the two hardest are kept.
  logits = logits.at[0, 0, 1:4, 0].set(easy)
  total, count = losses.ohem_cross_entropy(logits, labels, thresh=0.7)
  assert float(count) == 2.0
  np.testing.assert_allclose(float(total), math.log(2.0) + math.log(10 / 9), rtol=1e-5)


def test_poly_schedule_reaches_zero_without_nan_under_jit():
  schedule = optim.poly_schedule(0.01, 6, 0.9)
  values = jax.jit(jax.vmap(schedule))(jnp.arange(10))
  np.testing.assert_allclose(values[:3], [0.01, 0.01 * (5 / 6) ** 0.9, 0.01 * (4 / 6) ** 0.9],
                             rtol=1e-6)
  np.testing.assert_array_equal(values[6:], 0.0)


def _loss_config(**overrides):
  config = default.get_config().loss
  config.update(overrides)
  return config


def test_loss_by_config_name():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, (2, 5, 7)), jnp.int32).at[0, 0, :3].set(255)
  ce = losses.cross_entropy(logits, labels)
  focal = losses.focal_loss(logits, labels, gamma=2.0)
  np.testing.assert_allclose(losses.from_config(_loss_config(name="ce"))(logits, labels), ce)
  combined = losses.from_config(_loss_config(name="ce+focal"))(logits, labels)
  np.testing.assert_allclose(combined, (ce[0] + focal[0], ce[1]), rtol=1e-6)
  alpha = losses.from_config(_loss_config(name="focal", focal_alpha=0.25))(logits, labels)
  np.testing.assert_allclose(alpha[0], 0.25 * focal[0], rtol=1e-6)
  weighted = losses.from_config(_loss_config(name="ce", class_weights=(1.0, 2.0, 1.0, 1.0)))
  np.testing.assert_allclose(
      weighted(logits, labels),
      losses.cross_entropy(logits, labels, class_weights=jnp.asarray([1.0, 2.0, 1.0, 1.0])))
  with pytest.raises(ValueError, match=r"loss.name.*\['ce', 'focal', 'ce\+focal', 'ohem'\]"):
    losses.from_config(_loss_config(name="dice"))
  with pytest.raises(ValueError, match="class_weights cannot be combined"):
    losses.from_config(_loss_config(name="ce+focal", class_weights=(1.0,) * 4))
  # mmseg 0.16's mean (DAFormer, HRDA, MIC): the same sum over every pixel, 3 of 70 ignored.
  total, count = losses.from_config(_loss_config(name="ce", avg_non_ignore=False))(logits, labels)
  np.testing.assert_allclose((total, count), (ce[0], 70.0), rtol=1e-6)
  assert float(ce[1]) == 67.0
  with pytest.raises(ValueError, match=r"loss.avg_non_ignore=False .* got loss.name='focal'"):
    losses.from_config(_loss_config(name="focal", avg_non_ignore=False))


def test_auxiliary_heads_add_their_weighted_losses():
  """BiSeNet: main + aux16 + aux32 (weights 1, 1); DeepLab-v2: main + 0.1 x layer3 head."""
  rng = np.random.default_rng(1)
  heads = [jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32) for _ in range(3)]
  labels = jnp.asarray(rng.integers(0, 5, (2, 3, 4)), jnp.int32)
  outputs = {"logits": heads[0], "aux": tuple(heads[1:])}
  mean_ce = [float(losses.global_mean(*losses.cross_entropy(h, labels), None)) for h in heads]
  total, parts = steps.supervised_loss(outputs, labels, losses.cross_entropy, (1.0, 0.1), None)
  np.testing.assert_allclose(float(total), mean_ce[0] + mean_ce[1] + 0.1 * mean_ce[2], rtol=1e-6)
  assert sorted(parts) == ["loss_seg", "loss_seg_aux1", "loss_seg_aux2"]
  with pytest.raises(ValueError, match="2 auxiliary heads but loss.aux_weights has 1"):
    steps.supervised_loss(outputs, labels, losses.cross_entropy, (0.1,), None)
