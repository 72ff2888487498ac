"""Inference at the labels' resolution: sliding windows, flip and multi-scale TTA, the eval step."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from configs import test as test_config
from segjax import evaluation, inference, parallel, steps

NUM_CLASSES = 5


def _pointwise_logits(seed=0):
  """A 1x1 linear map, 3 channels -> NUM_CLASSES logits: translation and flip equivariant."""
  weights = jnp.asarray(np.random.default_rng(seed).normal(size=(3, NUM_CLASSES)), jnp.float32)
  return lambda x: x @ weights


def _images(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("shape, window, stride", [
    ((2, 37, 53, 3), (16, 24), (10, 15)),   # Overlapping windows, the last ones flush.
    ((1, 12, 20, 3), (16, 24), (8, 8)),     # Smaller than the window: padded, then cropped.
    ((1, 12, 50, 3), (16, 24), (16, 13)),   # Smaller along one axis only.
])
def test_sliding_window_equals_whole_image_for_a_pointwise_map(shape, window, stride):
  logits_fn, images = _pointwise_logits(), _images(shape)
  whole = inference.predict(logits_fn, images, shape[1:3])
  slid = inference.predict(logits_fn, images, shape[1:3],
                           inference.Inference(window=window, stride=stride))
  assert slid.shape == (*shape[:3], NUM_CLASSES)
  np.testing.assert_allclose(slid, whole, rtol=1e-5, atol=1e-5)


def test_sliding_window_averages_the_overlaps():
  """Each pixel gets the mean of the windows covering it: counted by a window-constant map."""
  seen = []

  def logits_fn(x):
    seen.append(x.shape)
    return jnp.full((*x.shape[:3], 1), float(len(seen)))

  out = inference.sliding_window(logits_fn, jnp.zeros((1, 10, 7, 3)), (6, 7), (4, 7))
  assert seen == [(1, 6, 7, 3), (1, 6, 7, 3)]  # Starts 0 and 4 (flush with the end).
  column = np.asarray(out[0, :, 0, 0])
  np.testing.assert_array_equal(column, [1, 1, 1, 1, 1.5, 1.5, 2, 2, 2, 2])


def test_sliding_windows_can_average_their_probabilities_as_vfm_uda():
  """`average='probs'`: each window's softmax, averaged where they overlap (VFM-UDA's
  slide_inference_pre_cropped); the logits' mean has another argmax here."""
  outputs = iter([jnp.array([5.0, 0.0, 4.9]), jnp.array([0.0, 2.0, 0.0])])

  def logits_fn(x):
    return jnp.broadcast_to(next(outputs), (*x.shape[:3], 3))

  got = inference.predict(logits_fn, jnp.zeros((1, 4, 7, 3)), (4, 7),
                          inference.Inference(window=(4, 5), stride=(4, 2), average="probs"))
  first, second = jax.nn.softmax(jnp.array([5.0, 0.0, 4.9])), jax.nn.softmax(
      jnp.array([0.0, 2.0, 0.0]))
  np.testing.assert_allclose(got[0, 0, 0], first, rtol=1e-6)  # Columns 0-1: window 1 only.
  np.testing.assert_allclose(got[0, 0, 3], (first + second) / 2, rtol=1e-6)
  np.testing.assert_allclose(got[0, 0, 6], second, rtol=1e-6)
  assert int(jnp.argmax(got[0, 0, 3])) == 1 and int(jnp.argmax(
      (jnp.array([5.0, 0.0, 4.9]) + jnp.array([0.0, 2.0, 0.0])) / 2)) == 0
  # What predict returns, for its callers (make_pseudo_labels softmaxes logits only).
  assert inference.Inference(window=(4, 5), average="probs").returns_probs
  assert not inference.Inference(window=(4, 5)).returns_probs
  assert not inference.Inference(average="probs").returns_probs  # No windows: logits.
  assert inference.Inference(flip=True).returns_probs
  with pytest.raises(ValueError, match=r"inference.average='mean': expected 'logits'"):
    inference.Inference.from_config(ml_collections.ConfigDict(dict(average="mean")))


@pytest.mark.parametrize("length, window, stride", [
    (100, 40, 30), (101, 40, 30), (40, 40, 10), (7, 40, 10), (1024, 512, 341), (53, 24, 1)])
def test_window_starts_cover_the_image_with_the_last_window_flush(length, window, stride):
  starts = inference._window_starts(length, window, stride)  # pylint: disable=protected-access
  assert starts[0] == 0
  if length <= window:
    assert starts == [0]
    return
  assert starts[-1] == length - window
  assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
  covered = np.zeros(length, bool)
  for start in starts:
    covered[start:start + window] = True
  assert covered.all()


def test_window_starts_examples():
  window_starts = inference._window_starts  # pylint: disable=protected-access
  assert window_starts(100, 40, 30) == [0, 30, 60]
  assert window_starts(101, 40, 30) == [0, 30, 60, 61]


def test_flip_of_a_flip_equivariant_model_changes_nothing():
  """A symmetric horizontal blur after a pointwise map commutes with mirroring."""
  pointwise = _pointwise_logits()

  def logits_fn(x):
    y = pointwise(x)
    padded = jnp.pad(y, ((0, 0), (0, 0), (1, 1), (0, 0)))
    return padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]

  images = _images((2, 16, 24, 3))
  plain = inference.predict(logits_fn, images, (16, 24))
  flipped = inference.predict(logits_fn, images, (16, 24), inference.Inference(flip=True))
  np.testing.assert_array_equal(jnp.argmax(flipped, -1), jnp.argmax(plain, -1))
  np.testing.assert_allclose(flipped, jax.nn.softmax(plain), rtol=1e-5, atol=1e-6)


def test_flip_averages_the_mirrored_view_mirrored_back():
  """A model that is not flip-equivariant (a ramp across the width): the two views differ."""
  pointwise = _pointwise_logits()
  ramp = jnp.linspace(-3, 3, 24)[None, None, :, None] * jnp.arange(NUM_CLASSES)

  def logits_fn(x):
    return pointwise(x) + ramp

  images = _images((1, 8, 24, 3))
  got = inference.predict(logits_fn, images, (8, 24), inference.Inference(flip=True))
  mirrored = logits_fn(images[:, :, ::-1])[:, :, ::-1]
  want = (jax.nn.softmax(logits_fn(images)) + jax.nn.softmax(mirrored)) / 2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, jax.nn.softmax(logits_fn(images)), atol=1e-3)


@pytest.mark.parametrize("flip", [False, True])
def test_multi_scale_averages_probabilities(flip):
  """Logits that depend on the input height only: each scale gives known, constant logits."""
  def logits_fn(x):
    height = x.shape[1]
    per_class = jnp.asarray([height / 16, 0.0, -height / 16])
    return jnp.broadcast_to(per_class, (*x.shape[:3], 3))

  images = _images((2, 32, 48, 3))
  got = inference.predict(logits_fn, images, (64, 96),
                          inference.Inference(scales=(0.5, 1.0, 1.5), flip=flip))
  assert got.shape == (2, 64, 96, 3)

  def softmax(z):
    e = np.exp(np.asarray(z) - np.max(z))
    return e / e.sum()

  # Heights 16, 32 and 48: logits (1, 0, -1), (2, 0, -2), (3, 0, -3).
  want = (softmax([1, 0, -1]) + softmax([2, 0, -2]) + softmax([3, 0, -3])) / 3
  np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-6)
  assert not np.allclose(want, softmax([2, 0, -2]), atol=1e-3)  # Not the mean logits' softmax.


def test_inference_from_config():
  assert inference.Inference.from_config(None) == inference.Inference()
  config = ml_collections.ConfigDict(dict(scales=(0.75, 1), flip=True, window=(512, 1024),
                                          stride=()))
  assert inference.Inference.from_config(config) == inference.Inference(
      scales=(0.75, 1.0), flip=True, window=(512, 1024))


@pytest.mark.parametrize("fields, message", [
    (dict(scales=()), r"inference.scales=\(\): expected positive factors"),
    (dict(scales=(1.0, 0.0)), r"inference.scales=\(1.0, 0.0\): expected positive factors"),
    (dict(window=(512,)), r"inference.window=\(512,\): expected \(height, width\) > 0"),
    (dict(window=(512, 1024), stride=(0, 10)), r"inference.stride=\(0, 10\)"),
    (dict(stride=(10, 10)), "inference.stride is set but inference.window is not"),
])
def test_inference_config_errors_name_the_field(fields, message):
  config = ml_collections.ConfigDict(dict(scales=(1.0,), flip=False, window=(), stride=()))
  config.update(fields)
  with pytest.raises(ValueError, match=message):
    inference.Inference.from_config(config)


def test_eval_step_counts_every_labelled_pixel_at_twice_the_image_resolution():
  """Labels at 2x the images: scores are upsampled, each non-ignored label pixel counts once."""
  config = test_config.get_config()
  mesh = Mesh(np.asarray(jax.devices()), (parallel.DATA_AXIS,))
  n = jax.device_count()
  weights = jnp.asarray(np.random.default_rng(0).normal(size=(3, NUM_CLASSES)), jnp.float32)
  state = steps.TrainState.create(
      apply_fn=lambda variables, x, train: {"logits": x @ variables["params"]["w"]},
      params={"w": weights}, batch_stats={}, tx=optax.identity())
  state = jax.device_put(state, parallel.replicated(mesh))
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (n, 8, 12, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (n, 16, 24)).astype(np.uint8)
  labels[0, :5] = 255  # Ignored: on one device only.
  labels[-1] = 255     # An all-ignore record, like the eval split's padding.
  eval_step = evaluation.make_eval_step(config, NUM_CLASSES, mesh)
  zeros = jax.device_put(jnp.zeros((NUM_CLASSES, NUM_CLASSES), jnp.int32),
                         parallel.replicated(mesh))
  confusion, preds = eval_step(state, parallel.to_global({"image": images, "label": labels}, mesh),
                               zeros)
  confusion, preds = np.asarray(confusion), np.asarray(preds)
  assert preds.shape == (n, 16, 24)
  assert confusion.sum() == np.count_nonzero(labels != 255) == (n - 1) * 16 * 24 - 5 * 24
  valid = labels != 255
  want = np.bincount(labels[valid].astype(int) * NUM_CLASSES + preds[valid],
                     minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
  np.testing.assert_array_equal(confusion, want)
  # The same predictions as the host-side inference at the labels' resolution.
  predict = functools.partial(steps.predict_labels, mean=tuple(config.data.mean),
                              std=tuple(config.data.std))
  np.testing.assert_array_equal(preds, predict(jax.device_get(state), images, (16, 24)))
