"""Adaptation losses and pseudo-label thresholds on hand-made arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import losses, pseudo_labels


def test_self_information_and_entropy_follow_advent():
  probs = jnp.array([[[[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]]])  # (1, 1, 2, 4)
  info = losses.self_information(probs)
  np.testing.assert_allclose(info[0, 0, 0], 0.0, atol=1e-7)
  np.testing.assert_allclose(info[0, 0, 1], [0.25 * 2 / 2] * 4, rtol=1e-6)  # -p log2 p / log2 4.
  logits = jnp.log(probs + 1e-12)
  total, count = losses.entropy(logits)
  # ADVENT: -sum(p log2 p) / (n h w log2 C) = (0 + 1) / 2.
  np.testing.assert_allclose(total / count, 0.5, rtol=1e-5)
  assert count == 2


def test_gan_losses():
  outputs = jnp.array([[0.0, 2.0], [-1.0, 0.5]])
  total, count = losses.least_squares(outputs, 1.0)
  np.testing.assert_allclose(total / count, np.mean((np.array([0, 2, -1, 0.5]) - 1) ** 2))
  total, count = losses.gan_loss("vanilla")(outputs, 0.0)
  np.testing.assert_allclose(total / count, np.mean(np.log1p(np.exp([0, 2, -1, 0.5]))),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="adapt.gan"):
    losses.gan_loss("wgan")


def test_weighted_cross_entropy_scales_by_pixel_weights_and_ignores():
  logits = jnp.zeros((1, 1, 3, 2))
  labels = jnp.array([[[0, 1, 255]]])
  total, count = losses.weighted_cross_entropy(logits, labels, jnp.array([[[0.5, 1.0, 1.0]]]))
  np.testing.assert_allclose(total, 1.5 * np.log(2), rtol=1e-6)
  assert count == 3


def test_median_thresholds_from_known_lists():
  conf = np.array([0.2, 0.4, 0.6, 0.95, 0.97, 0.99, 0.5])
  pred = np.array([0, 0, 0, 1, 1, 1, 2])
  # Class 0: sorted [0.2, 0.4, 0.6], index round(1.5) = 2 -> 0.6; class 1: 0.99 capped at 0.9;
  # class 2: one value, index round(0.5) = 0 -> 0.5; class 3 absent -> 0.
  np.testing.assert_allclose(pseudo_labels.median_thresholds(conf, pred, 4),
                             [0.6, 0.9, 0.5, 0.0])
  hist = pseudo_labels.ConfidenceHistogram(4)
  hist.add(conf[:4], pred[:4])
  hist.add(conf[4:], pred[4:])
  np.testing.assert_allclose(hist.median_thresholds(), [0.6, 0.9, 0.5, 0.0],
                             atol=1 / pseudo_labels.NUM_BINS)


def test_cbst_thresholds_from_known_lists():
  conf = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.99, 0.3])
  pred = np.array([0, 0, 0, 0, 0, 1, 1])
  # Class 0 (n=5), p=0.4: decreasing [0.9, 0.8, ...], index floor(2) - 1 = 1 -> 0.8.
  # Class 1 (n=2): floor(0.8) - 1 = -1 -> 1 (keeps nothing); class 2 absent -> 1.
  np.testing.assert_allclose(pseudo_labels.cbst_thresholds(conf, pred, 3, 0.4), [0.8, 1.0, 1.0])
  hist = pseudo_labels.ConfidenceHistogram(3)
  hist.add(conf, pred)
  np.testing.assert_allclose(hist.cbst_thresholds(0.4), [0.8, 1.0, 1.0],
                             atol=1 / pseudo_labels.NUM_BINS)


def test_applying_thresholds():
  probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.3, 0.6]])
  np.testing.assert_array_equal(pseudo_labels.apply_median(probs, np.array([0.5, 0.5, 0.7])),
                                [0, 255, 255])
  # CBST: ratios prob / k; row 2: 0.3/0.25 = 1.2 beats 0.6/0.9 -> class 1.
  np.testing.assert_array_equal(pseudo_labels.apply_cbst(probs, np.array([0.6, 0.25, 0.9])),
                                [0, 1, 1])
  np.testing.assert_array_equal(pseudo_labels.apply_cbst(probs, np.array([0.9, 0.9, 0.9])),
                                [255, 255, 255])


def test_entropy_gradient_sharpens_predictions():
  logits = jnp.array([[[[0.3, 0.1, -0.2]]]])
  grad = jax.grad(lambda x: losses.entropy(x)[0])(logits)
  assert grad[0, 0, 0, 0] < 0  # Raising the top logit lowers the entropy.
