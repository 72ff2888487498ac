"""The alternating minimax step: its halves, its data parallelism, its BatchNorm switch."""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from segjax import parallel, steps, train

NUM_CLASSES = 8
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
LAMBDA_ADV = 0.1


@dataclasses.dataclass(frozen=True)
class Setup:
  mesh: Mesh
  initial: Any          # (seg_state, disc_state) as host copies.
  train_step: Callable  # Donates the states.
  seg_update: Callable
  disc_update: Callable

  def states(self):
    return jax.device_put(self.initial, parallel.replicated(self.mesh))


@functools.cache
def _setup(num_devices: int, sync_batch_stats: bool = True) -> Setup:
  """States and compiled steps, built once per (devices, BatchNorm mode)."""
  config = test_config.get_config()
  config.model.sync_batch_stats = sync_batch_stats
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
  states, schedules = train.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  common = dict(lr_fn=schedules["seg"], mean=MEAN, std=STD)
  return Setup(
      mesh=mesh,
      initial=jax.device_get((states["seg"], states["disc"])),
      train_step=parallel.data_parallel(
          functools.partial(steps.train_step, lambda_adv=LAMBDA_ADV, **common), mesh,
          in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P()), donate_argnums=(0, 1)),
      seg_update=parallel.data_parallel(
          functools.partial(steps.seg_update, lambda_adv=LAMBDA_ADV, axis_name="data", **common),
          mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P("data"))),
      disc_update=parallel.data_parallel(
          functools.partial(steps.disc_update, axis_name="data"), mesh,
          in_specs=(P(), P("data")), out_specs=(P(), P())))


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  h, w = test_config.get_config().data.crop_size
  labels = rng.integers(0, NUM_CLASSES, (n, h, w)).astype(np.uint8)
  labels[0, :, : w // 2] = 255  # Uneven numbers of ignored pixels across devices.
  return {"source": {"image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
                     "label": labels},
          "target": {"image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)}}


def _train(setup: Setup, batch, num_steps=2):
  seg, disc = setup.states()
  for i in range(num_steps):
    seg, disc, metrics = setup.train_step(seg, disc, parallel.to_global(batch, setup.mesh),
                                          jax.random.key(i))
  return jax.device_get((seg.params, seg.batch_stats, seg.opt_state, disc.params,
                         disc.opt_state)), jax.device_get(metrics)


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_segmenter_update_leaves_discriminator_untouched():
  setup = _setup(8)
  seg, disc = setup.states()
  disc_before, seg_before = jax.device_get(disc), jax.device_get(seg.params)
  new_seg, metrics, _ = setup.seg_update(seg, disc, parallel.to_global(_batch(), setup.mesh),
                                         jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(disc), disc_before)
  assert float(metrics["loss_adv"]) > 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(new_seg.params), seg_before)
  assert all(jax.tree.leaves(changed))


def test_discriminator_update_leaves_segmenter_untouched():
  """The discriminator trains on stop-gradient maps: its loss has no gradient into the segmenter."""
  setup = _setup(8)
  seg, disc = setup.states()
  batch = parallel.to_global(_batch(), setup.mesh)

  def disc_loss(seg_params):
    def per_device(seg_params, seg, disc, batch):
      _, _, probs = steps.seg_update(seg.replace(params=seg_params), disc, batch,
                                     jax.random.key(0), lambda_adv=LAMBDA_ADV,
                                     lr_fn=lambda step: 0.0, mean=MEAN, std=STD,
                                     axis_name="data")
      return steps.disc_update(disc, probs, axis_name="data")[1]["loss_disc"]
    return jax.shard_map(per_device, mesh=setup.mesh, in_specs=(P(), P(), P(), P("data")),
                         out_specs=P())(seg_params, seg, disc, batch)

  loss, grads = jax.jit(jax.value_and_grad(disc_loss))(seg.params)
  assert float(loss) > 0
  assert not any(np.any(g) for g in jax.tree.leaves(jax.device_get(grads)))

  _, _, probs = setup.seg_update(seg, disc, batch, jax.random.key(0))
  seg_before = jax.device_get(seg)
  new_disc, _ = setup.disc_update(disc, probs)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(seg), seg_before)
  assert not np.array_equal(jax.device_get(new_disc.params["Conv_0"]["kernel"]),
                            jax.device_get(disc.params["Conv_0"]["kernel"]))


@pytest.mark.slow  # The reference step's composition; CI tests the methods' steps.
def test_train_step_is_segmenter_then_discriminator_update():
  """(a) uses the old discriminator; (b) the softmax maps of the old segmenter."""
  setup = _setup(1)
  batch = parallel.to_global(_batch(), setup.mesh)
  seg, disc = setup.states()
  # train_step folds the step (1) and the device index (0 on one device) into the key.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 1), 0)
  want_seg, _, probs = setup.seg_update(seg, disc, batch, key)
  want_disc, _ = setup.disc_update(disc, probs)
  got_seg, got_disc, _ = setup.train_step(*setup.states(), batch, jax.random.key(3))
  _assert_trees_close(jax.device_get((got_seg.params, got_disc.params)),
                      jax.device_get((want_seg.params, want_disc.params)), rtol=1e-6, atol=0)


def test_eight_devices_equal_one_device():
  batch = _batch()
  state8, metrics8 = _train(_setup(8), batch)
  state1, metrics1 = _train(_setup(1), batch)
  _assert_trees_close(metrics8, metrics1, rtol=1e-5)
  # One image per device vs eight: the convolutions may be formulated differently for the
  # two shapes (segjax.models.fast_ops), which changes float rounding, not the sums.
  _assert_trees_close(state8, state1, atol=1e-5)


@pytest.mark.slow  # 45 s: benchmarks/slow_tests.py runs it.
def test_per_device_batch_norm_normalises_each_device_alone():
  """Per-device statistics: the 8-device losses are the means of 8 one-image runs."""
  batch = _batch()
  batch["source"]["label"][0] = 1  # No ignored pixels: every device counts the same.
  _, metrics8 = _train(_setup(8, sync_batch_stats=False), batch, num_steps=1)
  singles = [_train(_setup(1, sync_batch_stats=False), jax.tree.map(lambda x: x[i:i + 1], batch),
                    num_steps=1)[1] for i in range(8)]
  for key in ("loss_seg", "loss_adv", "loss_disc"):
    np.testing.assert_allclose(metrics8[key], np.mean([m[key] for m in singles]), rtol=1e-5)
  _, sync_metrics = _train(_setup(8), batch, num_steps=1)
  assert abs(float(sync_metrics["loss_seg"]) - float(metrics8["loss_seg"])) > 1e-4


def test_batch_size_must_divide_over_devices():
  with pytest.raises(ValueError, match=r"batch_size=12 must be a positive multiple .* 8"):
    parallel.check_batch_size(12)
