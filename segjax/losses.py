"""Losses, written for per-device code.

Each loss returns a (sum, count) pair so that callers can average over the
global batch across devices exactly (see `global_mean`): a per-device mean
followed by a mean over devices would weight devices with many ignored pixels
wrongly.
"""

import jax
import jax.numpy as jnp
import optax

IGNORE_LABEL = 255


def global_mean(total: jax.Array, count: jax.Array, axis_name: str | None) -> jax.Array:
  """sum / count over the whole global batch; 0 when nothing counted.

  Called inside the differentiated function under `shard_map`, this gives
  gradients averaged exactly once over devices (STACK.md section 3).
  """
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
    count = jax.lax.psum(count, axis_name)
  return total / jnp.maximum(count, 1)


def cross_entropy(logits: jax.Array, labels: jax.Array, *,
                  ignore_label: int = IGNORE_LABEL,
                  class_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Pixel-wise softmax cross-entropy; pixels labelled `ignore_label` count for nothing.

  With class weights, the count is the summed weight of the valid pixels, as in
  PyTorch's `CrossEntropyLoss(weight=..., reduction='mean')`.
  """
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * class_weights[safe_labels]
  return jnp.sum(losses * weights), jnp.sum(weights)


def binary_cross_entropy(logits: jax.Array, target: float) -> tuple[jax.Array, jax.Array]:
  """Sigmoid cross-entropy of every logit against the constant domain label `target`."""
  losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                              jnp.full(logits.shape, target, jnp.float32))
  return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)
