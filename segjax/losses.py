"""Losses, written for per-device code.

Each loss returns a (sum, count) pair so that callers can average over the
global batch across devices exactly (see `global_mean`): a per-device mean
followed by a mean over devices would weight devices with many ignored pixels
wrongly.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax import accumulate, global_batch

IGNORE_LABEL = 255


def global_mean(total: jax.Array, count: jax.Array, axis_name: str | None) -> jax.Array:
  """sum / count over the whole global batch; 0 when nothing counted.

  Called inside the differentiated function under `shard_map`, this gives
  gradients averaged exactly once over devices (STACK.md section 3).
  """
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
    count = jax.lax.psum(count, axis_name)
  return accumulate.normalise(total, count)


def cross_entropy(logits: jax.Array, labels: jax.Array, *,
                  ignore_label: int = IGNORE_LABEL,
                  class_weights: jax.Array | None = None,
                  avg_non_ignore: bool = True) -> tuple[jax.Array, jax.Array]:
  """Pixel-wise softmax cross-entropy; pixels labelled `ignore_label` count for nothing.

  With class weights, the count is the summed weight of the valid pixels, as in
  PyTorch's `CrossEntropyLoss(weight=..., reduction='mean')`. `avg_non_ignore=False`
  counts every pixel, ignored ones too (a loss of 0 each), as mmseg before 0.23
  (`avg_non_ignore=False`, DAFormer's, HRDA's and MIC's mmseg 0.16) averages.
  """
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * class_weights[safe_labels]
  count = jnp.sum(weights) if avg_non_ignore else jnp.asarray(losses.size, jnp.float32)
  return jnp.sum(losses * weights), count


def binary_cross_entropy(logits: jax.Array, target: float) -> tuple[jax.Array, jax.Array]:
  """Sigmoid cross-entropy of every logit against the constant domain label `target`."""
  losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                              jnp.full(logits.shape, target, jnp.float32))
  return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)


def least_squares(outputs: jax.Array, target: float) -> tuple[jax.Array, jax.Array]:
  """LS-GAN: squared error of every raw discriminator output against `target` (AdaptSegNet's MSE)."""
  errors = (outputs.astype(jnp.float32) - target) ** 2
  return jnp.sum(errors), jnp.asarray(errors.size, jnp.float32)


GAN_LOSSES = {"vanilla": binary_cross_entropy, "ls": least_squares}


def gan_loss(kind: str) -> Callable[[jax.Array, float], tuple[jax.Array, jax.Array]]:
  """The adversarial loss `kind`: 'vanilla' (BCE with logits) or 'ls' (least squares)."""
  if kind not in GAN_LOSSES:
    raise ValueError(f"Unknown GAN loss {kind!r} (config field adapt.gan); expected one of "
                     f"{sorted(GAN_LOSSES)}.")
  return GAN_LOSSES[kind]


def self_information(probs: jax.Array) -> jax.Array:
  """ADVENT's weighted self-information map -p log2(p) / log2(C), per class channel (last axis)."""
  num_classes = probs.shape[-1]
  probs = probs.astype(jnp.float32)
  return -probs * jnp.log2(probs + 1e-30) / jnp.log2(num_classes)


def entropy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MinEnt: the normalised entropy sum_c I_c of every pixel, as (sum, pixel count).

  Its global mean is ADVENT's -sum(p log2 p) / (n h w log2 C).
  """
  info = self_information(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
  per_pixel = jnp.sum(info, axis=-1)
  return jnp.sum(per_pixel), jnp.asarray(per_pixel.size, jnp.float32)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                           ignore_label: int = IGNORE_LABEL) -> tuple[jax.Array, jax.Array]:
  """CE with a weight per pixel (DACS's pseudo-label confidence), as (weighted sum, pixel count).

  The count is the number of pixels, valid or not, as in mmseg's mean over the
  image: a confidence weight of q on every pixel scales the loss by q.
  """
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  return (jnp.sum(losses * weights * valid),
          jnp.asarray(losses.size, jnp.float32))


def focal_loss(logits: jax.Array, labels: jax.Array, *, gamma: float = 2.0,
               alpha: float | jax.Array | None = None,
               ignore_label: int = IGNORE_LABEL) -> tuple[jax.Array, jax.Array]:
  """Softmax focal loss (Lin et al., 2017): -alpha_t (1 - p_t)^gamma log p_t per valid pixel.

  `alpha` is a scalar or a per-class weight vector; None means 1. gamma = 0
  and no alpha give the cross-entropy. The count is the number of valid pixels.
  """
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  losses = (1.0 - jnp.exp(-ce)) ** gamma * ce
  if alpha is not None:
    alpha = jnp.asarray(alpha, jnp.float32)
    losses = losses * (alpha[safe_labels] if alpha.ndim else alpha)
  weights = valid.astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


def ohem_cross_entropy(logits: jax.Array, labels: jax.Array, *, thresh: float = 0.7,
                       min_kept_fraction: float = 1 / 16,
                       ignore_label: int = IGNORE_LABEL) -> tuple[jax.Array, jax.Array]:
  """Online hard example mining CE, as in BiSeNet's recipe (CoinCheung/BiSeNet `OhemCELoss`).

  Keeps the pixels whose probability of the true class is below `thresh`
  (CE above -log thresh); if fewer than `min_kept_fraction` of the valid
  pixels qualify, keeps that many hardest pixels instead (of pixels tied
  with the last one, the first in the batch). Both are counted over the global batch
  (`global_batch`), as the reference does on its one GPU, so the pixels kept
  do not depend on the number of devices.
  """
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  num_valid = global_batch.psum(jnp.sum(valid))
  min_kept = jnp.floor(num_valid * min_kept_fraction).astype(jnp.int32)
  # Ranked as non-negative values (+0.0 for a CE rounded below 0), ignored pixels at -1.
  rank_values = jnp.where(valid, jnp.maximum(jax.lax.stop_gradient(ce), 0.0) + 0.0, -1.0)
  hardest = _kth_largest_over_batch(rank_values, min_kept)
  # Of the pixels tied with the k-th, the first ones in the global batch's order make up k.
  tied = rank_values == hardest
  wanted = min_kept - global_batch.psum(jnp.sum(rank_values > hardest))
  tie_rank = global_batch.count_before(jnp.sum(tied)) + jnp.cumsum(tied.reshape(-1)) - 1
  kept_by_rank = (rank_values > hardest) | (tied & (tie_rank.reshape(tied.shape) < wanted))
  kept = ((ce > -jnp.log(thresh)) | kept_by_rank) & valid
  return jnp.sum(jnp.where(kept, ce, 0.0)), jnp.sum(kept).astype(jnp.float32)


def _kth_largest_over_batch(values: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th largest of the non-negative `values` of the whole global batch (+inf if k is 0).

  Non-negative float32 values order as their bit patterns do, so a binary
  search over the 2^31 patterns finds it exactly, counting on each device and
  summing the counts (31 counting passes, no gather of the maps). Negative
  values (ignored pixels) are never counted.
  """
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)

  def halve(_, bounds):
    low, high = bounds  # count(>= low) >= k > count(>= high)
    middle = low + (high - low) // 2
    enough = global_batch.psum(jnp.sum(bits >= middle)) >= k
    return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

  inf_bits = jnp.int32(0x7F800000)
  low, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), inf_bits + 1))
  return jnp.where(k > 0, jax.lax.bitcast_convert_type(low, jnp.float32), jnp.inf)


SegLoss = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
LOSSES = ("ce", "focal", "ce+focal", "ohem")


def from_config(config: ml_collections.ConfigDict) -> SegLoss:
  """The pixel-wise loss named by `config.name`, as a (logits, labels) -> (sum, count) function.

  'ce': cross-entropy (optional `class_weights`); 'focal': focal loss with
  `focal_gamma` and `focal_alpha` (<= 0: none); 'ce+focal': the sum of the
  two means, the UNet-vs-DeepLabV3+ seed's criterion; 'ohem': BiSeNet's OHEM cross-entropy
  with `ohem_thresh` and `ohem_min_kept` (a fraction of the valid pixels).
  `avg_non_ignore` False ('ce' only): the mean over every pixel, ignored ones
  counted as 0, as mmseg 0.16 (DAFormer, HRDA, MIC) averages.
  """
  class_weights = (jnp.asarray(config.class_weights, jnp.float32)
                   if config.class_weights else None)
  avg_non_ignore = config.get("avg_non_ignore", True)
  if not avg_non_ignore and config.name != "ce":
    raise ValueError(f"loss.avg_non_ignore=False (the mean over every pixel, mmseg 0.16's) is "
                     f"for loss.name='ce', got loss.name={config.name!r}.")
  ce = functools.partial(cross_entropy, class_weights=class_weights,
                         avg_non_ignore=avg_non_ignore)
  focal = functools.partial(focal_loss, gamma=config.focal_gamma,
                            alpha=config.focal_alpha if config.focal_alpha > 0 else None)
  if config.name == "ce":
    return ce
  if config.name == "focal":
    return focal
  if config.name == "ce+focal":
    if class_weights is not None:
      raise ValueError("loss.class_weights cannot be combined with loss.name='ce+focal'; "
                       "use focal_alpha for per-class weights.")

    def ce_plus_focal(logits, labels):
      (ce_sum, count), (focal_sum, _) = ce(logits, labels), focal(logits, labels)
      return ce_sum + focal_sum, count  # Both averaged over the same valid pixels.
    return ce_plus_focal
  if config.name == "ohem":
    return functools.partial(ohem_cross_entropy, thresh=config.ohem_thresh,
                             min_kept_fraction=config.ohem_min_kept)
  raise ValueError(f"Unknown loss {config.name!r} (config field loss.name); "
                   f"expected one of {list(LOSSES)}.")

