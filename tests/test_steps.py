"""The AdaptSegNet step that training runs (segjax.methods.output_space): what each half means.

The domain labels are the easiest thing to get silently wrong in an
adversarial step: swapped, the run still trains and only its scores tell.
So the step is run on a hand-built case whose losses and updates can be
written out by hand: a per-pixel linear segmenter and a per-pixel linear
discriminator, both trained by plain SGD. Normalised, source pixels are
(1, 0, 0) and target pixels (0, 1, 0), so the segmenter's source logits are
the first row of its kernel and its target logits the second: a gradient
through the source predictions shows as a change of the first row. Source
pixels are predicted among classes 0 and 1, target pixels among 2 and 3, so
the two domains' discriminator inputs never share a class channel and the
discriminator's score of each domain moves with its own parameters only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import test as test_config
from segjax import losses, methods, parallel, steps
from segjax import states as states_lib
from segjax.methods import output_space

import uda_testing  # pylint: disable=wrong-import-order

NUM_CLASSES = 4
LAMBDA_ADV = 0.5
SEG_LR, DISC_LR = 0.5, 0.5
SOURCE, TARGET = 0.0, 1.0  # The discriminator's domain labels (AdaptSegNet's).
# The segmenter's kernel (input channel, class): row 0 gives every source pixel's logits, row 1
# every target pixel's; -30 puts a class out of the softmax's reach (exp(-30) ~ 1e-13).
SEG_KERNEL = np.array([[0.3, -0.2, -30.0, -30.0],
                       [-30.0, -30.0, 0.4, -0.5],
                       [0.1, 0.2, 0.3, 0.4]], np.float32)
# (class channel, 1). D(source) > 0 and D(target) < 1: LS's gradient, too, moves them apart.
DISC_KERNEL = np.array([[0.6], [0.2], [-0.3], [0.5]], np.float32)

# name -> (config overrides, adapt.gan, the discriminator's input).
CASES = {
    "adaptsegnet": ({"adapt.method": "adaptsegnet"}, "vanilla", "softmax"),
    "adaptsegnet_ls": ({"adapt.method": "adaptsegnet", "adapt.gan": "ls"}, "ls", "softmax"),
    "advent": ({"adapt.method": "advent", "adapt.lambda_ent": 0.0}, "vanilla",
               "self_information"),
}


# ---- The hand-written definitions.

def _gan_by_hand(gan: str, d: jax.Array, label: float) -> jax.Array:
  """The mean adversarial loss of outputs `d` against the domain `label`."""
  if gan == "ls":
    return jnp.mean((d - label) ** 2)
  # BCE with logits: -y log sigmoid(d) - (1 - y) log(1 - sigmoid(d)).
  return jnp.mean(label * jax.nn.softplus(-d) + (1 - label) * jax.nn.softplus(d))


def _disc_input_by_hand(kind: str, logits: jax.Array) -> jax.Array:
  probs = jax.nn.softmax(logits, axis=-1)
  if kind == "softmax":
    return probs
  return -probs * jnp.log2(probs) / jnp.log2(NUM_CLASSES)  # ADVENT's weighted self-information.


# ---- The hand-built case.

def _linear_segmenter(variables, images, mutable=(), **_):
  """Per-pixel logits images @ kernel; its 'BatchNorm statistics' pass through unchanged."""
  outputs = {"logits": images @ variables["params"]["kernel"], "aux": ()}
  return (outputs, {"batch_stats": variables["batch_stats"]}) if mutable else outputs


def _linear_discriminator(variables, maps):
  return maps @ variables["params"]["kernel"]


def _domain_images(pixel, n: int = 2, size: int = 2) -> np.ndarray:
  return np.broadcast_to(np.asarray(pixel, np.uint8), (n, size, size, 3)).copy()


def _hand_built_step(overrides: dict):
  """Runs the method's step once on the hand-built case: (new kernels, metrics, old kernels)."""
  config = uda_testing.override(test_config.get_config(), dict(
      overrides, **{"adapt.lambda_adv": LAMBDA_ADV,
                    "data.mean": (0.0, 0.0, 0.0), "data.std": (1.0, 1.0, 1.0)}))
  method = methods.build(config, NUM_CLASSES)
  states = {
      "seg": steps.TrainState.create(apply_fn=_linear_segmenter,
                                     params={"kernel": jnp.asarray(SEG_KERNEL)},
                                     tx=optax.sgd(SEG_LR), batch_stats={"mean": jnp.zeros(3)}),
      "disc": steps.TrainState.create(apply_fn=_linear_discriminator,
                                      params={"kernel": jnp.asarray(DISC_KERNEL)},
                                      tx=optax.sgd(DISC_LR))}
  source = _domain_images((255, 0, 0))
  batch = {"source": {"image": source,
                      # Every source pixel ignored: the source loss has no gradient, and the
                      # segmenter's update is its adversarial term's alone.
                      "label": np.full(source.shape[:3], 255, np.uint8)},
           "target": {"image": _domain_images((0, 255, 0))}}
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  step = parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                                in_specs=(P(), P("data"), P()), out_specs=(P(), P()))
  new_states, metrics = step(states, parallel.to_global(batch, mesh), jax.random.key(0))
  assert set(new_states) == {"seg", "disc"}
  return (jax.device_get(new_states["seg"].params["kernel"]),
          jax.device_get(new_states["disc"].params["kernel"]), jax.device_get(metrics))


def _check_meaning(case: str):
  """Asserts the step's losses and updates are AdaptSegNet's, source 0 and target 1."""
  overrides, gan, kind = CASES[case]
  new_seg, new_disc, metrics = _hand_built_step(overrides)
  source_logits, target_logits = SEG_KERNEL[0], SEG_KERNEL[1]  # Every pixel's, per domain.
  source_maps = _disc_input_by_hand(kind, source_logits)
  target_maps = _disc_input_by_hand(kind, target_logits)

  # (a) The segmenter: its target maps judged as source by the old discriminator.
  def adversarial(target_row):
    return _gan_by_hand(gan, _disc_input_by_hand(kind, target_row) @ DISC_KERNEL, SOURCE)

  np.testing.assert_allclose(metrics["loss_adv"], adversarial(target_logits), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_seg"], 0.0, atol=0)
  target_grad = jax.grad(adversarial)(target_logits)
  assert np.abs(target_grad).max() > 1e-3  # A gradient through the target predictions.
  np.testing.assert_allclose(new_seg[1], target_logits - SEG_LR * LAMBDA_ADV * target_grad,
                             rtol=1e-5, atol=1e-7)
  # None through the source predictions, although judging them would have given one.
  source_grad = jax.grad(lambda row: _gan_by_hand(
      gan, _disc_input_by_hand(kind, row) @ DISC_KERNEL, SOURCE))(source_logits)
  assert np.abs(source_grad).max() > 1e-3
  np.testing.assert_array_equal(new_seg[0], source_logits)
  np.testing.assert_array_equal(new_seg[2], SEG_KERNEL[2])  # A channel no pixel has.

  # (b) The discriminator: the old segmenter's maps, source labelled 0 and target 1.
  def disc_loss(kernel):
    return 0.5 * (_gan_by_hand(gan, source_maps @ kernel, SOURCE)
                  + _gan_by_hand(gan, target_maps @ kernel, TARGET))

  np.testing.assert_allclose(metrics["loss_disc"], disc_loss(DISC_KERNEL), rtol=1e-5)
  np.testing.assert_allclose(new_disc, DISC_KERNEL - DISC_LR * jax.grad(disc_loss)(DISC_KERNEL),
                             rtol=1e-5, atol=1e-7)
  assert (source_maps @ new_disc).item() < (source_maps @ DISC_KERNEL).item()  # D(source) down,
  assert (target_maps @ new_disc).item() > (target_maps @ DISC_KERNEL).item()  # D(target) up.


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_space_step_labels_source_0_and_target_1(case):
  _check_meaning(case)


@pytest.mark.parametrize("source, target", [(1.0, 0.0), (1.0, 1.0), (0.0, 0.0)],
                         ids=["swapped", "both_target", "both_source"])
def test_a_wrong_domain_label_in_the_step_fails_the_meaning_check(monkeypatch, source, target):
  """The check above is able to fail: any wrong label in the production step breaks it."""
  monkeypatch.setattr(output_space, "SOURCE_DOMAIN", source)
  monkeypatch.setattr(output_space, "TARGET_DOMAIN", target)
  with pytest.raises(AssertionError):
    _check_meaning("adaptsegnet")


def test_adversarial_term_has_no_gradient_through_the_source_maps_or_the_returned_maps():
  """output_space.adversarial alone: the loss reads the target maps only, and the maps it
  hands to the discriminator update are stop-gradient (the discriminator cannot train the
  segmenter)."""
  disc = steps.TrainState.create(apply_fn=_linear_discriminator,
                                 params={"kernel": jnp.asarray(DISC_KERNEL)}, tx=optax.sgd(1.0))
  gan = losses.gan_loss("vanilla")
  rng = np.random.default_rng(0)
  source_maps, target_maps = (jnp.asarray(rng.random((2, 3, 5, NUM_CLASSES)), jnp.float32)
                              for _ in range(2))

  def loss(source_maps, target_maps):
    return output_space.adversarial(disc, source_maps, target_maps, gan, None)[0]

  np.testing.assert_allclose(loss(source_maps, target_maps),
                             _gan_by_hand("vanilla", target_maps @ DISC_KERNEL, SOURCE), rtol=1e-6)
  source_grad, target_grad = jax.grad(loss, argnums=(0, 1))(source_maps, target_maps)
  assert not np.any(source_grad) and np.abs(target_grad).max() > 0

  def returned_maps_total(source_maps, target_maps):
    inputs = output_space.adversarial(disc, source_maps, target_maps, gan, None)[1]
    return jnp.sum(inputs["source"]) + jnp.sum(inputs["target"])

  grads = jax.grad(returned_maps_total, argnums=(0, 1))(source_maps, target_maps)
  assert not any(np.any(g) for g in grads)


# ---- Data parallelism.

@pytest.mark.slow  # 45 s: benchmarks/slow_tests.py runs it.
def test_per_device_batch_norm_normalises_each_device_alone():
  """Per-device statistics: the 8-device losses of the AdaptSegNet step are the means of 8
  one-image runs, and differ from those of synchronised statistics."""
  batch = uda_testing.random_batch(test_config.get_config())
  batch["source"]["label"][0] = 1  # No ignored pixels: every device counts the same.

  def first_step(num_devices: int, sync_batch_stats: bool):
    """A function of a batch: the metrics of one step from the initial states."""
    config = test_config.get_config()
    config.model.sync_batch_stats = sync_batch_stats
    mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
    states, _ = states_lib.create_states(config, jax.random.key(0), uda_testing.NUM_CLASSES, mesh)
    step = parallel.data_parallel(
        functools.partial(methods.build(config, uda_testing.NUM_CLASSES).step, axis_name="data"),
        mesh, in_specs=(P(), P("data"), P()), out_specs=(P(), P()))
    return lambda batch: jax.device_get(
        step(states, parallel.to_global(batch, mesh), jax.random.key(0))[1])

  metrics8 = first_step(8, sync_batch_stats=False)(batch)
  one_device = first_step(1, sync_batch_stats=False)
  singles = [one_device(jax.tree.map(lambda x: x[i:i + 1], batch)) for i in range(8)]
  for key in ("loss_seg", "loss_adv", "loss_disc"):
    np.testing.assert_allclose(metrics8[key], np.mean([m[key] for m in singles]), rtol=1e-5)
  synchronised = first_step(8, sync_batch_stats=True)(batch)
  assert abs(float(synchronised["loss_seg"]) - float(metrics8["loss_seg"])) > 1e-4


def test_batch_size_must_divide_over_devices():
  with pytest.raises(ValueError, match=r"batch_size=12 must be a positive multiple .* 8"):
    parallel.check_batch_size(12)
