"""mpl (Meta Pseudo Labels): the feedback's sign on a toy problem, 8 devices == 1, exact resume,
and evaluating the teacher (and self_training's EMA teacher) with --state."""

import functools
import json
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from configs import mpl as mpl_config
from configs import test as test_config
from segjax import checkpointing, evaluate, methods, parallel, steps, validation
from segjax import states as states_lib
from segjax.methods import mpl

import uda_testing  # pylint: disable=wrong-import-order

NUM_CLASSES = 8
# The test config has lambda_adv > 0: the seed's discriminators of student and teacher.
STATE_NAMES = {"seg", "teacher", "mpl", "disc", "disc_teacher"}
METRIC_NAMES = {"loss_seg", "loss_pl", "mpl_feedback", "mpl_baseline", "loss_teacher_sup",
                "loss_teacher_uda", "loss_teacher_mpl", "lr", "lr_teacher", "loss_adv",
                "loss_teacher_adv", "loss_disc", "loss_disc_teacher"}


def _mesh(num_devices: int) -> Mesh:
  return Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))


def _step_fn(method, mesh):
  return parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                                in_specs=(P(), P("data"), P()), out_specs=(P(), P()))


# ---- The sign of the feedback, on a toy problem.

RED, BLUE = (255, 0, 0), (0, 0, 255)
# Plain SGD (no momentum, no weight decay): updates add, so the feedback's share can be split off.
TOY_STUDENT_TX, TOY_TEACHER_TX = optax.sgd(1.0), optax.sgd(20.0)


class PixelClassifier(nn.Module):
  """A per-pixel linear classifier of the colour (a 1x1 convolution): the toy segmenter."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train
    return {"logits": nn.Dense(2, name="classifier")(images), "aux": ()}


def _toy_state(kernel, tx) -> steps.TrainState:
  params = {"classifier": {"kernel": jnp.asarray(kernel, jnp.float32),
                           "bias": jnp.zeros(2, jnp.float32)}}
  return steps.TrainState.create(apply_fn=PixelClassifier().apply, params=params, batch_stats={},
                                 tx=tx)


def _toy_teacher(correct: bool) -> np.ndarray:
  """Logits (1, 0) for red and (0, 1) for blue (correct), or the two swapped."""
  kernel = np.zeros((3, 2), np.float32)
  kernel[0, 0 if correct else 1] = kernel[2, 1 if correct else 0] = 1.0
  return kernel


# Source (labelled): red pixels are class 0, blue ones class 1. Target: the same colours.
TOY_BATCH = {
    "source": {"image": np.array([[[RED, RED], [BLUE, BLUE]]], np.uint8),
               "label": np.array([[[0, 0], [1, 1]]], np.uint8)},
    "target": {"image": np.array([[[RED, BLUE], [BLUE, RED]]], np.uint8)}}


def _pixels(images) -> np.ndarray:
  return np.asarray(images, np.float32).reshape(-1, 3) / 255.0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = logits - logits.max(-1, keepdims=True)
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _student_labelled_loss(params) -> float:
  """The student's CE on the source pixels, computed here in numpy, independently of the method."""
  logits = _pixels(TOY_BATCH["source"]["image"]) @ np.asarray(params["classifier"]["kernel"])
  logits = logits + np.asarray(params["classifier"]["bias"])
  labels = TOY_BATCH["source"]["label"].reshape(-1)
  return float(-_log_softmax(logits)[np.arange(labels.size), labels].mean())


def _teacher_logits(kernel) -> np.ndarray:
  return _pixels(TOY_BATCH["target"]["image"]) @ np.asarray(kernel)


def _toy_method():
  config = test_config.get_config()
  config.adapt = methods.adapt_config(
      "mpl",
      mpl_student_weight=2.0,  # Pseudo labels outweigh the source labels.
      mpl_uda_weight=0.0,
      lambda_adv=0.0)  # The feedback alone: no discriminators.
  config.data.mean, config.data.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  return methods.build(config, 2)


def _feedback_experiment(correct_teacher: bool) -> dict:
  """One MPL step with a correct or a wrong teacher; what the feedback does to the teacher.

  The student starts at zero (CE log 2) and takes one SGD step on the source
  labels + 2 x the teacher's pseudo labels: correct labels lower its labelled
  loss, wrong ones raise it. The teacher's update is split: the same step with
  the baseline set to the feedback (so h - b = 0) gives the update without the
  feedback term, and the difference is the feedback's share (plain SGD, so
  updates add). Returns the student's labelled loss before and after (numpy),
  the mean log-probability of the pseudo labels under the teacher before and
  after the feedback's share alone, and the student's labelled loss after the
  same first step taken on the pseudo labels of that updated teacher.
  """
  method = _toy_method()
  step = _step_fn(method, _mesh(1))
  batch = parallel.to_global(TOY_BATCH, _mesh(1))
  key = jax.random.key(0)
  teacher_kernel = _toy_teacher(correct_teacher)

  def run(kernel, baseline):
    states = {"seg": _toy_state(np.zeros((3, 2)), TOY_STUDENT_TX),
              "teacher": _toy_state(kernel, TOY_TEACHER_TX),
              "mpl": {"baseline": jnp.asarray(baseline, jnp.float32)}}
    return jax.device_get(step(states, batch, key))

  with_feedback, metrics = run(teacher_kernel, 0.0)
  without_feedback, _ = run(teacher_kernel, metrics["mpl_feedback"])
  feedback_share = (np.asarray(with_feedback["teacher"].params["classifier"]["kernel"])
                    - np.asarray(without_feedback["teacher"].params["classifier"]["kernel"]))
  updated_kernel = teacher_kernel + feedback_share
  pseudo = _teacher_logits(teacher_kernel).argmax(-1)
  rows = np.arange(pseudo.size)
  relearned, _ = run(updated_kernel, 0.0)
  return {
      "loss_before": float(np.log(2.0)),
      "loss_after": _student_labelled_loss(with_feedback["seg"].params),
      "feedback": float(metrics["mpl_feedback"]),
      "log_prob_before": float(_log_softmax(_teacher_logits(teacher_kernel))[rows, pseudo].mean()),
      "log_prob_after": float(_log_softmax(_teacher_logits(updated_kernel))[rows, pseudo].mean()),
      "loss_after_updated_teacher": _student_labelled_loss(relearned["seg"].params),
  }


def _teacher_moved_the_right_way(result: dict) -> bool:
  """The pseudo labels that lowered the student's labelled loss became more likely (and the
  student trained on the updated teacher's labels does at least as well); those that raised it
  became less likely (and the updated teacher's labels lower the student's loss)."""
  helped = result["loss_after"] < result["loss_before"]
  more_likely = result["log_prob_after"] > result["log_prob_before"]
  if helped:
    return more_likely and result["loss_after_updated_teacher"] <= result["loss_after"] + 1e-6
  return not more_likely and result["loss_after_updated_teacher"] < result["loss_after"] - 1e-3


@pytest.mark.parametrize("correct_teacher", [True, False])
def test_feedback_makes_pseudo_labels_that_lowered_the_labelled_loss_more_likely(correct_teacher):
  """h = CE_l(old) - CE_l(new), and the teacher minimises (h - b) CE(y_hat, T(x_u)).

  With a correct teacher the student's labelled loss falls (h > 0) and the
  feedback makes the teacher surer of its pseudo labels; with a wrong one it
  rises (h < 0), the feedback makes the wrong labels less likely, and here
  flips them: the student trained on the updated teacher's labels reaches a
  lower labelled loss than on the old teacher's.
  """
  result = _feedback_experiment(correct_teacher)
  np.testing.assert_allclose(result["feedback"], result["loss_before"] - result["loss_after"],
                             rtol=1e-5)
  assert (result["feedback"] > 0) == correct_teacher
  assert _teacher_moved_the_right_way(result), result
  if not correct_teacher:
    assert result["loss_after_updated_teacher"] < result["loss_before"]


@pytest.mark.parametrize("correct_teacher", [True, False])
def test_the_official_codes_sign_fails_the_check(correct_teacher, monkeypatch):
  """With h = CE_l(new) - CE_l(old) (the official code's `dot_product`) in the same
  minimised teacher loss, the check above fails: the teacher reinforces wrong labels
  and unlearns correct ones."""
  monkeypatch.setattr(mpl, "feedback", lambda ce_old, ce_new: ce_new - ce_old)
  result = _feedback_experiment(correct_teacher)
  assert not _teacher_moved_the_right_way(result), result


# ---- Data parallelism and resuming, on CompactSeg.

def _config():
  config = test_config.get_config()
  config.adapt = methods.fields_of("mpl", config.adapt)
  config.adapt.mpl_uda_steps = 4  # Exercises the ramp.
  config.model.dropout_rate = 0.1  # On: masks are keyed by the global example index.
  return config


_batch = uda_testing.random_batch


def _run(step, mesh, initial: dict, between=None, num_steps: int = 2):
  """`num_steps` steps from the host states `initial`; `between(states)` (if given) replaces
  the states after each step."""
  states = jax.device_put(initial, parallel.replicated(mesh))
  batch = _global_batch(mesh)
  for i in range(num_steps):
    states, metrics = step(states, batch, jax.random.key(i))
    if between is not None:
      states = between(states)
  return jax.device_get(uda_testing.arrays(states)), jax.device_get(metrics)


@pytest.fixture(scope="module")
def one_device_run():
  """The initial states (host), the compiled 1-device step and two steps' (states, metrics)."""
  config, mesh = _config(), _mesh(1)
  initial = jax.device_get(states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)[0])
  step = _step_fn(methods.build(config, NUM_CLASSES), mesh)
  return initial, step, uda_testing.chain(step, mesh, _global_batch(mesh), initial)


def _global_batch(mesh):
  return parallel.to_global(_batch(_config()), mesh)


@pytest.mark.slow  # benchmarks/slow_tests.py runs it.
def test_mpl_step_on_8_devices_equals_1_device(one_device_run):
  """Each step on 8 devices from the 1-device run's states (see uda_testing.steps_from)."""
  initial, _, run1 = one_device_run
  mesh = _mesh(8)

  def compare(states8, metrics8, states1, metrics1):
    assert set(states8) == STATE_NAMES and set(metrics8) == METRIC_NAMES
    for key in metrics8:
      np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-4, atol=1e-6, err_msg=key)
    uda_testing.assert_states_close(uda_testing.arrays(states8), uda_testing.arrays(states1))
    assert all(np.isfinite(v) for v in metrics8.values())

  uda_testing.device_counts_agree(_step_fn(methods.build(_config(), NUM_CLASSES), mesh), mesh,
                                  _global_batch(mesh), initial, run1, compare)
  states1 = uda_testing.arrays(run1[-1][0])
  # The teacher has its own initialisation; both took two steps; the baseline has moved.
  kernels = lambda state: np.concatenate([x.ravel() for x in jax.tree.leaves(state.params)])
  assert not np.allclose(kernels(initial["seg"]), kernels(initial["teacher"]))
  assert states1["teacher"]["step"] == states1["seg"]["step"] == 2
  assert initial["mpl"]["baseline"] == 0 and states1["mpl"]["baseline"] != 0


def test_a_step_after_a_checkpoint_round_trip_continues_exactly(one_device_run, tmp_path):
  """Every state, the baseline included, is saved and restored; the next step is the same."""
  initial, step, run1 = one_device_run
  uninterrupted, metrics = run1[-1]
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=1)
  data_iterator = iter(grain.MapDataset.range(4).to_iter_dataset())

  def save_and_restore(states):
    ckpt.save(int(states["seg"].step), states, data_iterator)
    ckpt.wait_until_finished()
    return ckpt.restore(int(states["seg"].step), checkpointing.abstract_like(states),
                        data_iterator)

  resumed, resumed_metrics = _run(step, _mesh(1), initial, between=save_and_restore)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, (resumed, resumed_metrics),
               (uda_testing.arrays(uninterrupted), metrics))


def test_the_teacher_can_start_as_another_runs_segmenter(tmp_path):
  """adapt.mpl_teacher_from (seed (c): the adapted model) replaces the teacher's variables; the
  student, the optimizer states and the steps stay a fresh run's."""
  config, mesh = uda_testing.override(_config(), {"adapt.lambda_adv": 0.0}), _mesh(1)
  method = methods.build(config, NUM_CLASSES)
  fresh, _ = states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  # Another run's segmenter: different values, the same structure.
  other = {"seg": jax.tree.map(lambda x: x + 1, fresh["seg"])}
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1)
  ckpt.save(3, other, iter(grain.MapDataset.range(4).to_iter_dataset()))
  ckpt.wait_until_finished()
  ckpt.close()
  assert states_lib.initialise_segmenters(fresh, method, config, NUM_CLASSES, mesh) == fresh

  config.adapt.mpl_teacher_from = f"{tmp_path}:latest"
  method = methods.build(config, NUM_CLASSES)  # A method reads its fields when it is built.
  started = jax.device_get(states_lib.initialise_segmenters(fresh, method, config, NUM_CLASSES,
                                                            mesh))
  jax.tree.map(np.testing.assert_array_equal,
               (started["teacher"].params, started["teacher"].batch_stats),
               jax.device_get((other["seg"].params, other["seg"].batch_stats)))
  jax.tree.map(np.testing.assert_array_equal, uda_testing.arrays({"seg": started["seg"]}),
               jax.device_get(uda_testing.arrays({"seg": fresh["seg"]})))
  jax.tree.map(np.testing.assert_array_equal, started["teacher"].opt_state,
               jax.device_get(fresh["teacher"].opt_state))
  assert int(started["teacher"].step) == 0

  config.adapt.mpl_teacher_from = str(tmp_path / "nothing")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"config.adapt.mpl_teacher_from='.*nothing': No checkpoint"):
    validation.validate_config(config)


def _save(states: dict, workdir, step: int = 2) -> str:
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), max_to_keep=1)
  ckpt.save(step, states, iter(grain.MapDataset.range(4).to_iter_dataset()))
  ckpt.wait_until_finished()
  ckpt.close()
  return str(workdir)


# DAFormer's (35 s; the same EMA state as self_training's, beside the frozen ImageNet encoder)
# runs with the slow tests.
@pytest.mark.parametrize("method, state", [
    ("mpl", "teacher"), ("self_training", "ema"),
    pytest.param("daformer", "ema", marks=pytest.mark.slow)])
def test_evaluate_reads_the_teacher_with_state(method, state, tmp_path):
  """segjax.evaluate --state=teacher (MPL) or --state=ema (DACS's and DAFormer's EMA teacher, a
  plain dict) restores that state's variables as the segmenter; a state without the segmenter's
  model, or one the method does not keep, is an error naming the method's states."""
  overrides = {"adapt.method": method}
  if method == "daformer":  # A MiT segmenter, with the frozen ImageNet encoder among the states.
    overrides.update({"model.name": "daformer_mitb0", "model.backbone_weights": "mit_b0.pth"})
  config, mesh = uda_testing.override(_config(), overrides), _mesh(1)
  states, _ = states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  if method in ("self_training", "daformer"):  # The EMA teacher starts as the student.
    states[state] = jax.tree.map(lambda x: x * 0.5, states[state])
  workdir = _save(states, tmp_path)
  for name in ("seg", state):
    restored, step = evaluate.restore_segmenter(config, workdir, "latest", mesh, name)
    variables = states[name] if isinstance(states[name], dict) else {
        "params": states[name].params, "batch_stats": states[name].batch_stats}
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get((restored.params, restored.batch_stats)),
                 jax.device_get((variables["params"], variables["batch_stats"])))
    assert step == 2 and isinstance(restored, steps.TrainState)
  if method == "mpl":  # The command's outputs: beside the student's, not over them.
    report = evaluate.evaluate_checkpoint(config, workdir, state=state)
    assert report["state"] == state and report["step"] == 2
    assert os.listdir(os.path.join(workdir, "eval")).count(f"val_step2_{state}.json") == 1
    with open(os.path.join(workdir, "eval", "metrics.jsonl"), encoding="utf-8") as f:
      assert f"val/{state}/miou" in json.loads(f.readline())
  if method == "mpl":
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"--state='disc': .* not a segmenter of config.model \(compact\)"):
      evaluate.restore_segmenter(config, workdir, "latest", mesh, "disc")
  if method == "daformer":
    assert set(states) == {"seg", "ema", "imnet"}
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"--state='imnet': .* not a segmenter of config.model"):
      evaluate.restore_segmenter(config, workdir, "latest", mesh, "imnet")
  with pytest.raises(checkpointing.CheckpointError,
                     match=rf"--state='student': adapt.method '{method}' keeps the states"):
    evaluate.restore_segmenter(config, workdir, "latest", mesh, "student")


# ---- Pieces and configuration.

def test_uda_ramp_and_baseline_update():
  ramp = [float(mpl.uda_ramp(jnp.asarray(t), 4)) for t in (0, 2, 4, 9)]
  np.testing.assert_allclose(ramp, [0.0, 0.5, 1.0, 1.0])
  assert float(mpl.uda_ramp(jnp.asarray(0), 0)) == 1.0
  np.testing.assert_allclose(mpl.update_baseline(jnp.asarray(1.0), jnp.asarray(3.0), 0.01), 1.02)
  assert float(mpl.feedback(jnp.asarray(2.0), jnp.asarray(1.5))) == 0.5  # Improvement > 0.


def test_noise_covers_one_rectangle_and_std_zero_is_identity():
  image = jnp.zeros((16, 20, 3))
  np.testing.assert_array_equal(mpl.add_rectangle_noise(image, jax.random.key(0), 0.0), image)
  sizes = set()
  for seed in range(10):
    noisy = np.asarray(mpl.add_rectangle_noise(image, jax.random.key(seed), 1.0))
    rows, cols = np.nonzero(np.any(noisy != 0, axis=-1))
    if rows.size:
      box = noisy[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
      assert np.all(box != 0)  # Noise fills the rectangle and nothing outside it.
      sizes.add(box.shape)
  assert len(sizes) > 2


@pytest.mark.parametrize("overrides, message", [
    ({"adapt.mpl_baseline_rate": 0.0}, "adapt.mpl_baseline_rate=0.0"),
    ({"adapt.mpl_uda_weight": -1.0}, "adapt.mpl_uda_weight=-1.0"),
    ({"optim.teacher.name": "rmsprop"}, "optim.teacher.name"),
    ({"adapt.lambda_adv": -0.1}, "adapt.lambda_adv=-0.1"),
    ({"adapt.lambda_ent": 0.001}, "config.adapt.lambda_ent: adapt.method='mpl' does not read it"),
])
def test_config_errors_name_the_field(overrides, message):
  config = uda_testing.override(_config(), overrides)
  with pytest.raises(ValueError, match=message):
    validation.validate_config(config)


def test_config_runs_built_in_by_default_and_takes_gta5_or_synthia_roots():
  built_in = mpl_config.get_config()
  validation.validate_config(built_in)
  assert built_in.adapt.method == "mpl" and built_in.model.name == "compact"
  assert built_in.data.source.name == "street_scenes"
  for source, size in (("gta5", (720, 1280)), ("synthia", (760, 1280))):
    config = mpl_config.get_config(f"{source}=/data/{source},cityscapes=/data/cityscapes")
    assert config.model.name == "bisenet_r18" and config.batch_size == 4
    assert config.data.source.name == source and tuple(config.data.source.resize) == size
    assert config.data.target.name == "cityscapes" and config.data.eval.name == "cityscapes"
    assert config.optim.seg.lr == 2.5e-4 and config.optim.teacher.lr == 1.25e-2
    assert config.adapt.lambda_adv == 0.001  # The seed's, for student and teacher.
    config.batch_size = config.eval_batch_size = 8  # 4 would not split over 8 devices.
    validation.validate_config(config)


@pytest.mark.slow  # A variant of the step the 8-device test covers; benchmarks/slow_tests.py.
def test_without_lambda_adv_there_are_no_discriminators():
  config = uda_testing.override(_config(), {"adapt.lambda_adv": 0.0})
  mesh = _mesh(1)
  states, schedules = states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  assert set(states) == set(schedules) | {"mpl"} == {"seg", "teacher", "mpl"}
  states, metrics = _step_fn(methods.build(config, NUM_CLASSES), mesh)(
      states, parallel.to_global(_batch(config), mesh), jax.random.key(0))
  assert set(metrics) == METRIC_NAMES - {"loss_adv", "loss_teacher_adv", "loss_disc",
                                         "loss_disc_teacher"}
  assert all(np.isfinite(v) for v in jax.device_get(metrics).values())
