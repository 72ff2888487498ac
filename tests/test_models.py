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


def test_segmenter_output_matches_an_odd_input_size():
  config = test_config.get_config().model
  config.sync_batch_stats = False  # Applied outside any mesh here.
  seg = models.build_segmenter(config, 8)
  variables = seg.init(jax.random.key(0), jnp.zeros((1, 97, 131, 3)))
  logits, _ = seg.apply(variables, jnp.zeros((2, 97, 131, 3)), train=True,
                        rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
  assert logits.shape == (2, 97, 131, 8) and logits.dtype == jnp.float32


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
