"""Adaptation methods: data parallelism (8 devices == 1), their states, and config errors."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from segjax import methods, parallel, steps, train

NUM_CLASSES = 8

# name -> config overrides (field path -> value).
VARIANTS = {
    "source_only": {"adapt.method": "source_only"},
    "adaptsegnet": {"adapt.method": "adaptsegnet"},
    "adaptsegnet_ls": {"adapt.method": "adaptsegnet", "adapt.gan": "ls", "adapt.lambda_adv": 0.01},
    "adaptsegnet_multi": {"adapt.method": "adaptsegnet", "model.aux_head": True,
                          "loss.aux_weights": (0.1,), "adapt.lambda_adv_aux": 0.0002},
    "advent": {"adapt.method": "advent", "adapt.lambda_ent": 0.001},
    "minent": {"adapt.method": "advent", "adapt.lambda_adv": 0.0, "adapt.lambda_ent": 0.001,
               "model.aux_head": True, "loss.aux_weights": (0.1,),
               "adapt.lambda_ent_aux": 0.0002},
}

# name -> (its states, its metrics).
EXPECTED = {
    "source_only": ({"seg"}, {"loss_seg", "lr"}),
    "adaptsegnet": ({"seg", "disc"}, {"loss_seg", "loss_adv", "loss_disc", "lr"}),
    "adaptsegnet_ls": ({"seg", "disc"}, {"loss_seg", "loss_adv", "loss_disc", "lr"}),
    "adaptsegnet_multi": ({"seg", "disc", "disc_aux"},
                          {"loss_seg", "loss_seg_aux1", "loss_adv", "loss_adv_aux", "loss_disc",
                           "loss_disc_aux", "lr"}),
    "advent": ({"seg", "disc"}, {"loss_seg", "loss_adv", "loss_ent", "loss_disc", "lr"}),
    "minent": ({"seg"}, {"loss_seg", "loss_seg_aux1", "loss_ent", "loss_ent_aux", "lr"}),
}


def _config(variant: str):
  config = test_config.get_config()
  config.model.dropout_rate = 0.0
  with config.unlocked():
    for path, value in VARIANTS[variant].items():
      section, field = path.split(".")
      config[section][field] = value
  return config


def _batch(config, n=8, seed=0):
  rng = np.random.default_rng(seed)
  h, w = config.data.crop_size
  labels = rng.integers(0, NUM_CLASSES, (n, h, w)).astype(np.uint8)
  labels[0, :, : w // 2] = 255
  return {"source": {"image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
                     "label": labels},
          "target": {"image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)}}


def _run(config, num_devices: int, num_steps: int = 2):
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
  states, _ = train.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  method = methods.build(config, NUM_CLASSES)
  step = parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                                in_specs=(P(), P("data"), P()), out_specs=(P(), P()))
  batch = _batch(config)
  if not method.uses_target:
    batch = {"source": batch["source"]}
  for i in range(num_steps):
    states, metrics = step(states, parallel.to_global(batch, mesh), jax.random.key(i))
  return jax.device_get(_arrays(states)), jax.device_get(metrics)


def _arrays(states: dict) -> dict:
  """The array leaves of each TrainState (not its apply_fn / tx, which are static)."""
  return {name: {"params": s.params, "batch_stats": s.batch_stats, "opt_state": s.opt_state,
                 "step": s.step} for name, s in states.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_method_step_on_8_devices_equals_1_device(variant):
  config = _config(variant)
  states8, metrics8 = _run(config, 8)
  states1, metrics1 = _run(config, 1)
  assert set(metrics8) == set(metrics1)
  for key in metrics8:
    np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-4, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
               states8, states1)
  assert all(np.isfinite(v) for v in metrics8.values())
  state_names, metric_names = EXPECTED[variant]
  assert set(states8) == state_names and set(metrics8) == metric_names


def test_adaptsegnet_method_equals_the_reference_step():
  """The method's step computes exactly what steps.train_step (AdaptSegNet) computes."""
  config = _config("adaptsegnet")
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
  states, schedules = train.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  initial = jax.device_get(states)
  method = methods.build(config, NUM_CLASSES)
  new = parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                               in_specs=(P(), P("data"), P()), out_specs=(P(), P()))
  reference = parallel.data_parallel(
      functools.partial(steps.train_step, lambda_adv=config.adapt.lambda_adv,
                        lr_fn=schedules["seg"], mean=tuple(config.data.mean),
                        std=tuple(config.data.std)),
      mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P(), P()))
  batch = parallel.to_global(_batch(config), mesh)
  replicate = lambda tree: jax.device_put(tree, parallel.replicated(mesh))
  got, got_metrics = new(replicate(initial), batch, jax.random.key(3))
  seg, disc, want_metrics = reference(replicate(initial["seg"]), replicate(initial["disc"]), batch,
                                      jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get((_arrays(got), got_metrics)),
               jax.device_get((_arrays({"seg": seg, "disc": disc}), want_metrics)))


@pytest.mark.parametrize("overrides, message", [
    ({"adapt.method": "dann"}, "Unknown adaptation method 'dann'"),
    ({"adapt.method": "adaptsegnet", "adapt.gan": "wgan"}, "adapt.gan"),
    ({"adapt.method": "advent", "adapt.disc_input": "logits"}, "adapt.disc_input='logits'"),
    ({"adapt.method": "advent", "adapt.lambda_adv": 0.0}, "is source_only"),
    ({"adapt.method": "adaptsegnet", "adapt.lambda_adv_aux": -1.0}, "adapt.lambda_adv_aux=-1.0"),
])
def test_method_config_errors_name_the_field(overrides, message):
  config = test_config.get_config()
  with config.unlocked():
    for path, value in overrides.items():
      section, field = path.split(".")
      config[section][field] = value
  with pytest.raises(ValueError, match=message):
    train.validate_config(config)


def test_multi_level_needs_an_auxiliary_head():
  config = _config("adaptsegnet")
  config.adapt.lambda_adv_aux = 0.0002
  with pytest.raises(ValueError, match="need an auxiliary head"):
    _run(config, 1, num_steps=1)
