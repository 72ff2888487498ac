"""Registered networks: parameter counts of the references, shapes, training through them."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from segjax import models, parallel, steps, train


def _num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name, expected", [("fcd", 2_781_121), ("dsc", 189_424)])
def test_discriminator_parameter_counts_match_the_references(name, expected):
  """UDA-REFERENCE.md: FCD 2,781,121 and DSC 189,424 parameters with 19 input classes."""
  config = ml_collections.ConfigDict(dict(name=name, width=64, dtype="float32",
                                          param_dtype="float32"))
  disc = models.build_discriminator(config, 19)
  variables = disc.init(jax.random.key(0), jnp.zeros((1, 64, 64, 19)))
  assert _num_params(variables) == expected
  assert disc.apply(variables, jnp.zeros((2, 64, 128, 19))).shape == (2, 2, 4, 1)


@pytest.mark.parametrize("name", sorted(models.SEGMENTERS))
def test_every_segmenter_trains_at_an_odd_input_size(name):
  """Forward, backward and two SGD steps at 97x131; outputs come back at 97x131."""
  config = test_config.get_config()
  config.model.name = name
  config.model.sync_batch_stats = False  # The forward below runs outside a device mesh.
  config.data.crop_size = (97, 131)
  config.adapt.method = "source_only"
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  states, schedules = train.create_states(config, jax.random.key(0), 5, mesh)
  seg = states["seg"]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1, 97, 131, 3), dtype=np.uint8)
  outputs = seg.apply_fn({"params": seg.params, "batch_stats": seg.batch_stats},
                         jnp.asarray(images, jnp.float32) / 255, train=True,
                         rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])[0]
  for logits in (outputs["logits"], *outputs["aux"]):
    assert logits.shape == (1, 97, 131, 5) and logits.dtype == jnp.float32
  eval_outputs = seg.apply_fn({"params": seg.params, "batch_stats": seg.batch_stats},
                              jnp.zeros((1, 97, 131, 3)), train=False)
  assert eval_outputs["logits"].shape == (1, 97, 131, 5) and eval_outputs["aux"] == ()

  step = parallel.data_parallel(
      functools.partial(steps.train_step, lambda_adv=0.0, lr_fn=schedules["seg"],
                        mean=(0.5,) * 3, std=(0.25,) * 3,
                        aux_weights=(0.4,) * len(outputs["aux"])),
      mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P()))
  batch = {"source": {"image": images, "label": rng.integers(0, 5, (1, 97, 131)).astype(np.uint8)}}
  before = jax.tree.map(np.asarray, seg.params)
  for i in range(2):
    seg, _, metrics = step(seg, None, parallel.to_global(batch, mesh), jax.random.key(i))
    assert np.isfinite(float(metrics["loss_seg"]))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before, seg.params)
  assert any(jax.tree.leaves(changed))


def test_unknown_discriminator_name_is_a_clear_error():
  config = ml_collections.ConfigDict(dict(name="patchgan", width=64))
  with pytest.raises(ValueError, match=r"Unknown disc name 'patchgan' .*\['dsc', 'fcd'\]"):
    models.build_discriminator(config, 8)


def test_adaptation_trains_with_the_light_discriminator():
  config = test_config.get_config()
  config.disc.name = "dsc"
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  states, schedules = train.create_states(config, jax.random.key(0), 8, mesh)
  step = parallel.data_parallel(
      functools.partial(steps.train_step, lambda_adv=0.1, lr_fn=schedules["seg"],
                        mean=(0.5,) * 3, std=(0.25,) * 3),
      mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P()))
  rng = np.random.default_rng(0)
  batch = {"source": {"image": rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8),
                      "label": rng.integers(0, 8, (2, 32, 64)).astype(np.uint8)},
           "target": {"image": rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)}}
  seg, disc = states["seg"], states["disc"]
  losses = []
  for i in range(3):
    seg, disc, metrics = step(seg, disc, parallel.to_global(batch, mesh), jax.random.key(i))
    losses.append(float(metrics["loss_disc"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
