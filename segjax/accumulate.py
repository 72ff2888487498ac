"""Gradient accumulation: a step's gradient over its batch, computed in micro-batches, exactly.

`optim.accumulate_steps` = k splits each device's share of the batch into k
micro-batches that the segmenter processes one after another (a `lax.scan`),
so that a step keeps the activations of one micro-batch for its backward pass
instead of the whole batch's: the memory of a k times smaller batch, the
update of the whole one.

Exactness. Every loss term in segjax is a sum over the global batch divided by
a count over it (`losses.global_mean`), and the counts (labelled pixels, the
pixels of a confidence-weighted map, masked feature cells) do not depend on
the parameters. A first pass collects each term's count for every
micro-batch; only counts leave that pass, so XLA drops its network
computation. The second pass runs the network on each micro-batch with each
term divided by its count over the whole batch, and sums the gradients: the
gradient of the whole batch's loss, up to the order of float additions.
Anything drawn per example (dropout masks, drop path) is keyed by the
example's index in the global batch (`global_batch.micro_batch`), so the
draws are the same as without accumulation too.

What is not the same: BatchNorm's batch statistics are each micro-batch's
(as with accumulation in any framework), and its running statistics are
updated once per micro-batch. OHEM is refused: the pixels it keeps depend on
the predictions for the whole batch.
"""

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from segjax import global_batch

_MODE = threading.local()


class _Collect:
  """The first pass: each term's count, in the order the terms are computed."""

  def __init__(self):
    self.counts = []

  def normalise(self, total: jax.Array, count: jax.Array) -> jax.Array:
    self.counts.append(jnp.asarray(count, jnp.float32))
    return total / jnp.maximum(count, 1)


class _Normalise:
  """The second pass: each term divided by its count over the whole batch."""

  def __init__(self, counts: list[jax.Array]):
    self.counts, self.index = counts, 0

  def normalise(self, total: jax.Array, count: jax.Array) -> jax.Array:
    del count
    if self.index >= len(self.counts):
      raise RuntimeError("A micro-batch computed more loss terms than the counting pass found.")
    whole = self.counts[self.index]
    self.index += 1
    return total / jnp.maximum(whole, 1)


@contextlib.contextmanager
def _mode(mode):
  previous = getattr(_MODE, "value", None)
  _MODE.value = mode
  try:
    yield mode
  finally:
    _MODE.value = previous


def normalise(total: jax.Array, count: jax.Array) -> jax.Array:
  """`total / count` of one loss term, both already summed over devices (`losses.global_mean`);
  inside an accumulated gradient, the micro-batch's total over the whole batch's count."""
  mode = getattr(_MODE, "value", None)
  if mode is None:
    return total / jnp.maximum(count, 1)
  return mode.normalise(total, count)


def _varying_like(x, shape: jax.ShapeDtypeStruct):
  """`x` marked as varying over the mesh axes that `shape` varies over (under `shard_map`, a
  loop's carry keeps its type: per-device BatchNorm statistics vary over devices)."""
  manual = getattr(shape, "manual_axis_type", None)
  wanted = manual.varying if manual is not None else frozenset()
  have = getattr(jax.typeof(x), "manual_axis_type", None)
  missing = tuple(sorted(wanted - (have.varying if have is not None else frozenset())))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


LossFn = Callable[[Any, Any, Any], tuple[jax.Array, tuple[Any, dict]]]


def value_and_grad(loss_fn: LossFn, params, inputs, carry, steps: int):
  """((loss, (carry, parts)), grads) of `loss_fn(params, inputs, carry)` over the batch.

  `inputs` is a tree of this device's per-example arrays (leading axis: the
  examples), `carry` what the passes thread through (BatchNorm statistics),
  `parts` the loss terms to log. With `steps` > 1 the examples are processed
  in `steps` micro-batches of consecutive examples, as the module docstring
  says; the loss and parts are the whole batch's, the carry the last
  micro-batch's.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if steps == 1:
    return grad_fn(params, inputs, carry)
  local = {x.shape[0] for x in jax.tree.leaves(inputs)}
  if len(local) != 1:
    raise ValueError(f"The inputs of an accumulated gradient differ in batch size: {local}.")
  local = local.pop()
  if local % steps:
    raise ValueError(f"optim.accumulate_steps={steps} must divide each device's batch "
                     f"({local} examples: batch_size / the number of devices).")
  size = local // steps
  micro = jax.tree.map(lambda x: x.reshape(steps, size, *x.shape[1:]), inputs)
  indices = jnp.arange(steps)

  def counts_of(args):
    j, batch = args
    with global_batch.micro_batch(local, j * size), _mode(_Collect()) as collect:
      loss_fn(params, batch, carry)
    return collect.counts

  counts = [jnp.sum(c, axis=0) for c in jax.lax.map(counts_of, (indices, micro))]

  def micro_step(acc, args):
    j, batch = args
    loss_sum, parts_sum, grads_sum, carry = acc
    with global_batch.micro_batch(local, j * size), _mode(_Normalise(counts)) as mode:
      (loss, (carry, parts)), grads = grad_fn(params, batch, carry)
    if mode.index != len(counts):
      raise RuntimeError("A micro-batch computed fewer loss terms than the counting pass found.")
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    return (loss_sum + loss, add(parts_sum, parts), add(grads_sum, grads), carry), None

  # The accumulators start at zero, shaped as one micro-batch's results.
  shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), carry)
  (loss_shape, (carry_shape, parts_shape)), grads_shape = shapes
  zeros = lambda tree: jax.tree.map(lambda s: _varying_like(jnp.zeros(s.shape, s.dtype), s), tree)
  init = (zeros(loss_shape), zeros(parts_shape), zeros(grads_shape),
          jax.tree.map(_varying_like, carry, carry_shape))
  (loss, parts, grads, carry), _ = jax.lax.scan(micro_step, init, (indices, micro))
  return (loss, (carry, parts)), grads
