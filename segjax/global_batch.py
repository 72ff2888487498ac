"""Where a device's examples sit in the global batch, for per-device code.

segjax's steps run per device under `jax.shard_map` over the data axes of the
mesh. Anything drawn per example (dropout masks, augmentation, masking) is
keyed by the example's index in the global batch, and anything counted over
the batch (OHEM's hardest pixels) is counted over all of it, so that a run
gives the same result on any number of devices and processes. Outside
`shard_map` (one device, no mesh axes) the local batch is the global batch.
"""

import contextlib
import threading

import jax
import jax.numpy as jnp

_MICRO_BATCH = threading.local()


def data_axes() -> tuple[str, ...]:
  """The mesh axes the current `shard_map` splits the batch over (none outside one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(axis for axis in mesh.axis_names if axis in mesh.manual_axes)


@contextlib.contextmanager
def micro_batch(local_size: int, offset: jax.Array | int):
  """Code inside sees one micro-batch of this device's `local_size` examples, starting at
  example `offset` (`segjax.accumulate`): `example_index` gives their global indices."""
  previous = getattr(_MICRO_BATCH, "value", None)
  _MICRO_BATCH.value = (local_size, offset)
  try:
    yield
  finally:
    _MICRO_BATCH.value = previous


def example_index(local_size: int) -> jax.Array:
  """The global batch indices (local_size,) int32 of this device's examples, in order (inside
  `micro_batch`, of the micro-batch's examples)."""
  axes = data_axes()
  device_size, offset = getattr(_MICRO_BATCH, "value", None) or (local_size, 0)
  start = jax.lax.axis_index(axes) * device_size if axes else 0
  return start + offset + jnp.arange(local_size, dtype=jnp.int32)


def example_keys(key: jax.Array, local_size: int) -> jax.Array:
  """One key per example of this device: `key` folded with the example's global index."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_index(local_size))


def psum(x: jax.Array) -> jax.Array:
  """`x` summed over the devices holding the global batch."""
  axes = data_axes()
  return jax.lax.psum(x, axes) if axes else x


def count_before(count: jax.Array) -> jax.Array:
  """The sum of `count` over the devices holding earlier parts of the global batch."""
  axes = data_axes()
  if not axes:
    return jnp.zeros_like(count)
  counts = jax.lax.all_gather(count, axes)
  return jnp.sum(jnp.where(jnp.arange(counts.shape[0]) < jax.lax.axis_index(axes), counts, 0))
