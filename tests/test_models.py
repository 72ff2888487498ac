"""Registered networks: parameter counts of the references, shapes, training through them."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import test_recipes
from configs import test as test_config
from segjax import methods, models, parallel
from segjax import states as states_lib


def _num_params(variables):
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def _train_step(config, num_classes: int, mesh):
  """The data-parallel step of config.adapt.method, as training runs it."""
  method = methods.build(config, num_classes)
  return parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                                in_specs=(P(), P("data"), P()), out_specs=(P(), P()))


@pytest.mark.parametrize("name, expected", [("fcd", 2_781_121), ("dsc", 189_424)])
def test_discriminator_parameter_counts_match_the_references(name, expected):
  """UDA-REFERENCE.md: FCD 2,781,121 and DSC 189,424 parameters with 19 input classes."""
  config = ml_collections.ConfigDict(dict(name=name, width=64, dtype="float32",
                                          param_dtype="float32"))
  disc = models.build_discriminator(config, 19)
  variables = disc.init(jax.random.key(0), jnp.zeros((1, 64, 64, 19)))
  assert _num_params(variables) == expected
  assert disc.apply(variables, jnp.zeros((2, 64, 128, 19))).shape == (2, 2, 4, 1)


# The paper configs' end-to-end runs (tests/test_recipes.py) train the other
# registered segmenters at 97x131 through the entry point.
TRAINED_BY_RECIPES = {"fcn8s_vgg16", "bisenet_r18", "deeplabv3plus_r101", "unet", "deeplabv2_r101"}


def test_every_registered_segmenter_is_trained_by_a_test():
  assert TRAINED_BY_RECIPES <= set(models.SEGMENTERS)
  assert TRAINED_BY_RECIPES == {model for _, model in test_recipes.CONFIGS}


@pytest.mark.parametrize("name", [
    # 30-100 s each: benchmarks/slow_tests.py. FCN-16s (VGG16 and the pool4 skip) stands for
    # FCN-8s and FCN-32s in CI, whose paper recipes run with the slow tests; DeepLabV3+-R50's
    # forward at an odd size is checked in CI against the PyTorch peer by
    # tests/test_bisenet_deeplab.py; the MiT segmenters' outputs at an odd size by
    # tests/test_mit.py, their training step by tests/test_daformer.py's slow test. ViT-S/14
    # stands for VFM-UDA's other encoders in CI: the same code, wider, deeper or with register
    # tokens (ViT-L's took 76-89 s each in CI; the registers' forward is checked against Hugging
    # Face by tests/test_vit.py). VFM-UDA++'s segmenters took 82-221 s each (the adapter at
    # 224x224 at least); their forward at a non-square size is tests/test_vfm_uda_pp.py's.
    pytest.param(n, marks=pytest.mark.slow)
    if n in ("bisenet_r101", "fcn32s_vgg16", "deeplabv3plus_r50") or "_mitb" in n
    or n.startswith(("vfm_vit_b", "vfm_vit_l", "vfmpp_")) or n == "vfm_vit_s14_reg4"
    else n
    for n in sorted(set(models.SEGMENTERS) - TRAINED_BY_RECIPES)])
def test_segmenter_trains_at_an_odd_input_size(name):
  """Forward, backward and two SGD steps at an odd size (97x131; the FCNs at 37x53, since their
  100-pixel input padding makes even that a 237x253 map); outputs come back at that size."""
  height, width = (37, 53) if name.startswith("fcn") else (97, 131)
  config = test_config.get_config()
  config.model.name = name
  config.model.sync_batch_stats = False  # The forward below runs outside a device mesh.
  config.data.crop_size = (height, width)
  config.adapt = methods.adapt_config("source_only")
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  states, _ = states_lib.create_states(config, jax.random.key(0), 5, mesh)
  seg = states["seg"]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8)
  outputs = seg.apply_fn({"params": seg.params, "batch_stats": seg.batch_stats},
                         jnp.asarray(images, jnp.float32) / 255, train=True,
                         rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])[0]
  for logits in (outputs["logits"], *outputs["aux"]):
    assert logits.shape == (1, height, width, 5) and logits.dtype == jnp.float32
  eval_outputs = seg.apply_fn({"params": seg.params, "batch_stats": seg.batch_stats},
                              jnp.zeros((1, height, width, 3)), train=False)
  assert eval_outputs["logits"].shape == (1, height, width, 5) and eval_outputs["aux"] == ()

  config.loss.aux_weights = (0.4,) * len(outputs["aux"])
  step = _train_step(config, 5, mesh)
  labels = rng.integers(0, 5, (1, height, width)).astype(np.uint8)
  batch = {"source": {"image": images, "label": labels}}
  before = jax.tree.map(np.asarray, seg.params)
  for i in range(2):
    states, metrics = step(states, parallel.to_global(batch, mesh), jax.random.key(i))
    assert np.isfinite(float(metrics["loss_seg"]))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before,
                         states["seg"].params)
  assert any(jax.tree.leaves(changed))


def test_unknown_discriminator_name_is_a_clear_error():
  config = ml_collections.ConfigDict(dict(name="patchgan", width=64))
  with pytest.raises(ValueError,
                     match=r"Unknown disc name 'patchgan' .*\['dsc', 'fc7_domain', 'fcd'\]"):
    models.build_discriminator(config, 8)


def test_adaptation_trains_with_the_light_discriminator():
  config = test_config.get_config()
  config.disc.name = "dsc"
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  config.adapt.lambda_adv = 0.1
  states, _ = states_lib.create_states(config, jax.random.key(0), 8, mesh)
  step = _train_step(config, 8, mesh)
  rng = np.random.default_rng(0)
  batch = {"source": {"image": rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8),
                      "label": rng.integers(0, 8, (2, 32, 64)).astype(np.uint8)},
           "target": {"image": rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)}}
  losses = []
  for i in range(3):
    states, metrics = step(states, parallel.to_global(batch, mesh), jax.random.key(i))
    losses.append(float(metrics["loss_disc"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def _train_losses(dtype: str, num_steps: int) -> tuple[list[float], dict]:
  config = test_config.get_config()
  config.model.dtype = dtype
  config.num_train_steps = 100
  config.optim.seg.lr = 0.1
  config.adapt = methods.adapt_config("source_only")
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
  states, _ = states_lib.create_states(config, jax.random.key(0), 8, mesh)
  step = _train_step(config, 8, mesh)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 32, 64, 3), dtype=np.uint8)
  labels = (images[..., 0] // 32).astype(np.uint8)  # Learnable from the pixels.
  batch = parallel.to_global({"source": {"image": images, "label": labels}}, mesh)
  losses = []
  for i in range(num_steps):
    states, metrics = step(states, batch, jax.random.key(i))
    losses.append(float(metrics["loss_seg"]))
  return losses, states["seg"].params


def test_bfloat16_compute_trains_like_float32_with_float32_parameters():
  losses32, _ = _train_losses("float32", 25)
  losses16, params16 = _train_losses("bfloat16", 25)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
  assert np.all(np.isfinite(losses16))
  assert losses16[-1] < losses16[0] - 0.1  # Learning, not just finite.
  np.testing.assert_allclose(losses16, losses32, rtol=0.02)


@pytest.mark.parametrize("name", [  # BiSeNet-R18 37 s, DeepLabV3+-R50 25 s: the slow tests.
    "compact", pytest.param("bisenet_r18", marks=pytest.mark.slow),
    pytest.param("deeplabv3plus_r50", marks=pytest.mark.slow)])
def test_bfloat16_forward_stays_close_to_float32(name):
  config = test_config.get_config().model
  config.name = name
  config.sync_batch_stats = False
  images = jax.random.uniform(jax.random.key(1), (1, 64, 96, 3))
  seg32 = models.build_segmenter(config, 5)
  variables = seg32.init(jax.random.key(0), images)
  config.dtype = "bfloat16"
  seg16 = models.build_segmenter(config, 5)
  out32 = seg32.apply(variables, images)["logits"]
  out16 = seg16.apply(variables, images)["logits"]
  assert out16.dtype == jnp.float32
  error = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
  assert error < 0.05, error
