"""The alternating minimax step: its halves, its data parallelism, its BatchNorm switch."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from segjax import parallel, steps, train

NUM_CLASSES = 8
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _config(**model):
  config = test_config.get_config()
  config.model.update(model)
  return config


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  h, w = test_config.get_config().data.crop_size
  labels = rng.integers(0, NUM_CLASSES, (n, h, w)).astype(np.uint8)
  labels[0, :, : w // 2] = 255  # Uneven ignored pixels across devices.
  return {"source": {"image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
                     "label": labels},
          "target": {"image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)}}


def _mesh(num_devices):
  return Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))


def _states(config, mesh):
  states, schedules = train.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  return states["seg"], states["disc"], schedules["seg"]


def _copy(tree):
  return jax.tree.map(np.array, tree)


def _run_train_steps(config, mesh, batch, num_steps=2):
  seg, disc, lr_fn = _states(config, mesh)
  step = parallel.data_parallel(
      functools.partial(steps.train_step, lambda_adv=0.1, lr_fn=lr_fn, mean=MEAN, std=STD),
      mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P()),
      donate_argnums=(0, 1))
  for i in range(num_steps):
    seg, disc, metrics = step(seg, disc, parallel.to_global(batch, mesh), jax.random.key(i))
  return _copy((seg.params, seg.batch_stats, seg.opt_state, disc.params, disc.opt_state)), \
      jax.device_get(metrics)


def _halves(config, mesh):
  """seg_update and disc_update, each mapped over `mesh` on its own."""
  seg, disc, lr_fn = _states(config, mesh)
  seg_fn = parallel.data_parallel(
      functools.partial(steps.seg_update, lambda_adv=0.1, lr_fn=lr_fn, mean=MEAN, std=STD,
                        axis_name="data"),
      mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P("data")))
  disc_fn = parallel.data_parallel(functools.partial(steps.disc_update, axis_name="data"),
                                   mesh, in_specs=(P(), P("data")), out_specs=(P(), P()))
  return seg, disc, seg_fn, disc_fn


def test_segmenter_update_leaves_discriminator_untouched():
  mesh = _mesh(8)
  seg, disc, seg_fn, _ = _halves(_config(), mesh)
  disc_before, seg_before = _copy(disc), _copy(seg.params)
  new_seg, metrics, _ = seg_fn(seg, disc, parallel.to_global(_batch(), mesh), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, _copy(disc), disc_before)
  assert float(metrics["loss_adv"]) > 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), _copy(new_seg.params), seg_before)
  assert all(jax.tree.leaves(changed))


def test_discriminator_update_leaves_segmenter_untouched():
  """The discriminator sees stop-gradient maps: its loss has no gradient into the segmenter."""
  mesh = _mesh(8)
  seg, disc, _, disc_fn = _halves(_config(), mesh)
  batch = parallel.to_global(_batch(), mesh)

  def disc_loss_through_segmenter(seg_params):
    def per_device(seg_params, seg, disc, batch):
      _, _, probs = steps.seg_update(seg.replace(params=seg_params), disc, batch,
                                     jax.random.key(0), lambda_adv=0.1, lr_fn=lambda s: 0.0,
                                     mean=MEAN, std=STD, axis_name="data")
      _, out = steps.disc_update(disc, probs, axis_name="data")
      return out["loss_disc"]
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P("data")),
                         out_specs=P())(seg_params, seg, disc, batch)

  grads = jax.jit(jax.grad(disc_loss_through_segmenter))(seg.params)
  assert all(not np.any(g) for g in jax.tree.leaves(_copy(grads)))
  seg_before = _copy(seg)
  _, probs = seg_fn_probs(seg, disc, batch, mesh)
  new_disc, _ = disc_fn(disc, probs)
  jax.tree.map(np.testing.assert_array_equal, _copy(seg), seg_before)
  assert not np.array_equal(_copy(new_disc.params)["Conv_0"]["kernel"],
                            _copy(disc.params)["Conv_0"]["kernel"])


def seg_fn_probs(seg, disc, batch, mesh):
  fn = parallel.data_parallel(
      functools.partial(steps.seg_update, lambda_adv=0.1, lr_fn=lambda s: 0.0, mean=MEAN,
                        std=STD, axis_name="data"),
      mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P("data")))
  new_seg, _, probs = fn(seg, disc, batch, jax.random.key(0))
  return new_seg, probs


def test_train_step_is_segmenter_then_discriminator_update():
  """(a) uses the old discriminator; (b) uses the softmax maps of the old segmenter."""
  mesh = _mesh(8)
  config = _config()
  batch = parallel.to_global(_batch(), mesh)
  seg, disc, seg_fn, disc_fn = _halves(config, mesh)
  want_seg, _, probs = seg_fn(seg, disc, batch, jax.random.fold_in(jax.random.key(3), 0))
  want_disc, _ = disc_fn(disc, probs)
  want = _copy((want_seg.params, want_disc.params))

  seg, disc, lr_fn = _states(config, mesh)
  step = parallel.data_parallel(
      functools.partial(steps.train_step, lambda_adv=0.1, lr_fn=lr_fn, mean=MEAN, std=STD),
      mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P()))

  # train_step folds the device index into the key; on one device that index is 0.
  mesh1 = _mesh(1)
  seg1, disc1, _ = _states(config, mesh1)
  step1 = parallel.data_parallel(
      functools.partial(steps.train_step, lambda_adv=0.1, lr_fn=lr_fn, mean=MEAN, std=STD),
      mesh1, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P()))
  got_seg, got_disc, _ = step1(seg1, disc1, parallel.to_global(_batch(), mesh1), jax.random.key(3))
  del step, seg, disc
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               _copy((got_seg.params, got_disc.params)), want)


@pytest.mark.parametrize("num_steps", [2])
def test_eight_devices_equal_one_device(num_steps):
  config = _config(sync_batch_stats=True)
  batch = _batch()
  state8, metrics8 = _run_train_steps(config, _mesh(8), batch, num_steps)
  state1, metrics1 = _run_train_steps(config, _mesh(1), batch, num_steps)
  for key in metrics1:
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state8, state1)


def test_per_device_batch_norm_normalises_each_device_alone():
  """Per-device statistics: the 8-device loss is the mean of 8 one-image runs."""
  config = _config(sync_batch_stats=False)
  batch = _batch()
  batch["source"]["label"][0] = 1  # No ignored pixels: every device counts the same.
  _, metrics8 = _run_train_steps(config, _mesh(8), batch, num_steps=1)
  singles = [_run_train_steps(config, _mesh(1), jax.tree.map(lambda x: x[i:i + 1], batch),
                              num_steps=1)[1] for i in range(8)]
  for key in ("loss_seg", "loss_adv", "loss_disc"):
    np.testing.assert_allclose(metrics8[key], np.mean([m[key] for m in singles]), rtol=1e-5)
  sync_metrics = _run_train_steps(_config(sync_batch_stats=True), _mesh(8), batch, 1)[1]
  assert abs(float(sync_metrics["loss_seg"]) - float(metrics8["loss_seg"])) > 1e-4


def test_batch_size_must_divide_over_devices():
  with pytest.raises(ValueError, match=r"batch_size=12 must be a positive multiple .* 8"):
    parallel.check_batch_size(12)
