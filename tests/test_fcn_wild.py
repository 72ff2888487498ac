"""fcn_wild (FCNs in the Wild): its step on 8 devices, its losses on hand-made arrays, the source
statistics command, the statistics kept in the workdir, its configs and their errors."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from PIL import Image

from configs import fcn_wild as fcn_wild_config
from configs import recipes
from configs import test as test_config
from segjax import methods, parallel, validation
from segjax import states as states_lib
from segjax.data import labels
from segjax.methods import fcn_wild
from segjax.data import category_stats

import uda_testing  # pylint: disable=wrong-import-order

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 8


def _config(**adapt):
  config = test_config.get_config()
  config.model.dropout_rate = 0.1  # On: masks are keyed by the global example index.
  config.adapt = methods.adapt_config("fcn_wild", **adapt)
  with config.unlocked():
    config.disc.name = "fc7_domain"
    config.disc.width = 8
  return config


# ---- The step: data parallelism.

_batch = uda_testing.random_batch


def _step(config, workdir, num_devices: int):
  """(the data-parallel step, its mesh, the global batch)."""
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
  method = methods.build(config, NUM_CLASSES)
  method.prepare(str(workdir))
  step = parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                                in_specs=(P(), P("data"), P()), out_specs=(P(), P()))
  return step, mesh, parallel.to_global(_batch(config), mesh)


def test_step_on_8_devices_equals_1_device(tmp_path):
  """Each step on 8 devices from the 1-device run's states (see uda_testing.steps_from)."""
  config = _config()
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  initial = jax.device_get(states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)[0])
  run1 = uda_testing.chain(*_step(config, tmp_path, 1), initial)

  def compare(states8, metrics8, states1, metrics1):
    assert set(states8) == {"seg", "disc"}
    assert set(metrics8) == set(metrics1) == {"loss_seg", "loss_da", "loss_ca", "loss_disc", "lr"}
    for key in metrics8:
      np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-4, atol=1e-6, err_msg=key)
      assert np.isfinite(metrics8[key]), key
    uda_testing.assert_states_close(uda_testing.arrays(states8), uda_testing.arrays(states1))

  (states8, _), _ = uda_testing.device_counts_agree(*_step(config, tmp_path, 8), initial, run1,
                                                     compare)
  # The discriminator's input is the segmenter's 32-channel (4 x width 8) context features.
  assert states8["disc"].params["Conv_0"]["kernel"].shape == (1, 1, 32, 8)


# ---- The losses on hand-made arrays.

def _stats(alpha, delta, gamma, images=None):
  images = [1] * len(alpha) if images is None else images
  return fcn_wild.SizeStats.from_record(dict(alpha=alpha, delta=delta, gamma=gamma,
                                             images=images))


def _logits():
  """One 4x4 image, 3 classes: argmax class 0 on 12 pixels, class 1 on 3, class 2 on 1."""
  argmax = np.array([0] * 12 + [1] * 3 + [2], np.int32).reshape(1, 4, 4)
  return jnp.asarray(2.0 * jax.nn.one_hot(argmax, 3) + 0.1 * np.arange(48).reshape(1, 4, 4, 3)
                     % 0.7)


SOLVER = dict(iterations=50, step_size=1.0, slack=1.0)
FREE = ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])  # alpha, delta, gamma: no bound binds.


def _grad(logits, stats, **kwargs):
  options = dict(SOLVER, **kwargs)
  return jax.grad(lambda x: fcn_wild.size_constraint_loss(x, stats, **options)[0])(logits)


def _mass(logits):
  return np.asarray(jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(0, 1, 2)))


def test_size_constraints_push_each_class_into_its_bounds():
  logits = _logits()
  mass = _mass(logits)
  assert mass[0] > 0.5 and mass[1] < 0.4
  total, count = fcn_wild.size_constraint_loss(logits, _stats(*FREE), **SOLVER)
  assert count == 16
  # Every present class within its bounds: P* = p, no gradient (the value is the entropy).
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(total, -jnp.sum(probs * jnp.log(probs)), rtol=1e-5)
  np.testing.assert_allclose(_grad(logits, _stats(*FREE)), 0.0, atol=1e-7)

  # Class 0 above its upper bound, class 1 below its lower bound.
  stats = _stats([0.05] * 3, [0.0, 0.4, 0.0], [0.5, 1.0, 1.0])
  latent = fcn_wild.latent_distribution(logits, stats, **SOLVER)
  latent_mass = np.asarray(jnp.mean(latent, axis=(0, 1, 2)))
  assert latent_mass[0] <= 0.5 + 1e-3  # The upper bound is hard.
  assert mass[1] < latent_mass[1] < 0.4  # The lower one, with slack 1, is approached.
  descended = logits - 0.5 * _grad(logits, stats)
  assert _mass(descended)[0] < mass[0] and _mass(descended)[1] > mass[1]

  # With a large slack and enough steps the lower bound is met too.
  latent = fcn_wild.latent_distribution(logits, stats, iterations=300, step_size=1.0, slack=20.0)
  assert np.mean(np.asarray(latent)[..., 1]) >= 0.4 - 1e-3


def test_absent_classes_are_not_constrained():
  logits = _logits()  # Class 2 is the argmax on 1 of 16 pixels: a share of 0.0625.
  far_below = dict(delta=[0.0, 0.0, 0.8], gamma=[1.0, 1.0, 1.0])
  absent = _stats([0.0, 0.0, 0.7], **far_below)  # 0.0625 <= 0.1 * 0.7: absent.
  present = _stats([0.0, 0.0, 0.5], **far_below)  # 0.0625 > 0.1 * 0.5: present.
  assert not fcn_wild.present_classes(logits, absent)[0, 2]
  assert fcn_wild.present_classes(logits, present)[0, 2]
  np.testing.assert_allclose(_grad(logits, absent), 0.0, atol=1e-7)
  assert _mass(logits - 5.0 * _grad(logits, present))[2] > _mass(logits)[2]
  # A class no source image contains (statistics all 0) is never present, whatever its share.
  unseen = _stats([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], images=[1, 1, 0])
  assert not fcn_wild.present_classes(logits, unseen)[0, 2]
  np.testing.assert_allclose(_grad(logits, unseen), 0.0, atol=1e-7)


def test_large_classes_get_a_tenth_of_the_gradient():
  logits = _logits()
  stats = _stats([0.3, 0.05, 0.05], [0.0, 0.4, 0.0], [0.5, 1.0, 1.0])  # Class 0 is large.
  grad = _grad(logits, stats)
  full = _grad(logits, stats, large_class_gradient=1.0)
  np.testing.assert_allclose(grad[..., 0], 0.1 * full[..., 0], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(grad[..., 1:], full[..., 1:], rtol=1e-6)
  assert np.abs(full).max() > 1e-3
  # The full gradient of the summed loss is that of the cross-entropy against P*: p - P*.
  latent = fcn_wild.latent_distribution(logits, stats, **SOLVER)
  np.testing.assert_allclose(full, jax.nn.softmax(logits) - latent, atol=1e-6)


def test_slack_zero_leaves_the_lower_bound_unenforced():
  logits = _logits()
  below = _stats([0.05] * 3, [0.0, 0.4, 0.0], [1.0, 1.0, 1.0])  # Only class 1's lower bound.
  np.testing.assert_allclose(_grad(logits, below, slack=0.0), 0.0, atol=1e-7)
  assert _mass(logits - 5.0 * _grad(logits, below, slack=1.0))[1] > _mass(logits)[1]


def test_domain_losses():
  zeros = jnp.zeros((2, 3, 4, 1))
  np.testing.assert_allclose(fcn_wild.domain_loss(zeros, zeros, None), 2 * np.log(2), rtol=1e-6)
  # D sure that source is source and target is target: L_D ~ 0, L_Dinv ~ 2 * 20.
  src, tgt = jnp.full((1, 2, 2, 1), 20.0), jnp.full((1, 2, 2, 1), -20.0)
  assert fcn_wild.domain_loss(src, tgt, None) < 1e-8
  np.testing.assert_allclose(fcn_wild.domain_loss(src, tgt, None, inverted=True), 40.0,
                             rtol=1e-6)


# ---- Source statistics.

def _png(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)


def _cityscapes_tree(root) -> None:
  """Five 8x16 images; label ids road 7, car 26, sky 23, unlabelled 0 (ignored)."""
  road, car, sky, unlabelled = 7, 26, 23, 0
  rows = [[road] * 8, [road] * 6 + [car] * 2, [road] * 4 + [unlabelled] * 4,
          [road] * 2 + [sky] * 6, [sky] * 8]
  for i, ids in enumerate(rows):
    stem = f"city_{i:06d}_000000"
    _png(os.path.join(root, "leftImg8bit", "train", "city", f"{stem}_leftImg8bit.png"),
         np.full((8, 16, 3), 40 * i, np.uint8))
    _png(os.path.join(root, "gtFine", "train", "city", f"{stem}_gtFine_labelIds.png"),
         np.repeat(np.asarray(ids, np.uint8)[:, None], 16, axis=1), "L")


CONFIG_FILE = '''from configs import fcn_wild, recipes


def get_config():
  config = fcn_wild.get_config()
  config.data.source = recipes.real_dataset("cityscapes", {root!r}, "train")
  return config
'''


def test_category_stats_command_matches_a_hand_count(tmp_path):
  root = str(tmp_path / "cityscapes")
  _cityscapes_tree(root)
  config_file = tmp_path / "config.py"
  config_file.write_text(CONFIG_FILE.format(root=root))
  out = tmp_path / "stats" / "gta5.json"
  proc = subprocess.run([sys.executable, "-m", "segjax.tools.category_stats",
                         f"--config={config_file}", f"--out={out}"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert f"Wrote {out}" in proc.stdout and "road" in proc.stdout
  record = json.loads(out.read_text())
  assert record["class_names"] == list(labels.CITYSCAPES_CLASSES)
  assert record["num_images"] == 5 and record["percentiles"] == [10, 90]
  by_name = {name: [record[k][c] for k in ("alpha", "delta", "gamma", "images")]
             for c, name in enumerate(record["class_names"])}
  # Road covers 1, 0.75, 0.5 (the other half is ignored, and counts) and 0.25 of four images:
  # P10 = 0.25 + 0.3 * 0.25, P90 = 0.75 + 0.7 * 0.25 (linear interpolation).
  np.testing.assert_allclose(by_name["road"], [0.325, 0.625, 0.925, 4])
  np.testing.assert_allclose(by_name["sky"], [0.775, 0.875, 0.975, 2])  # 0.75 and 1.
  np.testing.assert_allclose(by_name["car"], [0.25, 0.25, 0.25, 1])
  assert by_name["person"] == [0.0, 0.0, 0.0, 0]  # Never seen: never present.
  assert not os.path.exists(str(out) + ".tmp")

  # Evenly spaced examples: the first and the last.
  config = fcn_wild_config.get_config()
  config.data.source = recipes.real_dataset("cityscapes", root, "train")
  two = category_stats.compute(config.data.source, "data.source", max_examples=2, progress=lambda x, **_: x)
  assert two["num_images"] == 2 and two["images"][:3] == [1, 0, 0] and two["delta"][0] == 1.0
  assert category_stats.read(str(out), labels.CITYSCAPES_CLASSES, "adapt.category_stats") == \
      record
  with pytest.raises(ValueError, match=r"adapt.category_stats='.*' has 19 classes.*has 8"):
    category_stats.read(str(out), tuple("abcdefgh"), "adapt.category_stats")


def test_statistics_are_kept_in_the_workdir(tmp_path):
  """A fresh run copies adapt.category_stats into the workdir; a resumed run reads the copy."""
  stats_file = tmp_path / "stats.json"
  record = category_stats.compute(_config().data.source, "data.source", progress=lambda x, **_: x)
  category_stats.write(record, str(stats_file))
  config = _config(category_stats=str(stats_file))
  workdir = tmp_path / "run"
  workdir.mkdir()
  first = methods.build(config, NUM_CLASSES)
  first.prepare(str(workdir))
  assert json.loads((workdir / fcn_wild.STATS_FILE).read_text()) == record
  stats_file.unlink()
  resumed = methods.build(config, NUM_CLASSES)
  resumed.prepare(str(workdir))
  jax.tree.map(np.testing.assert_array_equal, resumed.size_stats, first.size_stats)
  # Without a file, the statistics of data.source are computed and saved.
  computed = methods.build(_config(), NUM_CLASSES)
  computed.prepare(str(tmp_path / "fresh"), is_primary=True)
  assert json.loads((tmp_path / "fresh" / fcn_wild.STATS_FILE).read_text()) == record


# ---- Configs.

@pytest.mark.parametrize("overrides, error, message", [
    ({"disc.name": "fcd"}, ValueError, "disc.name='fcd'"),
    ({"adapt.lambda_da": 0.0, "adapt.lambda_ca": 0.0}, ValueError, "is source_only"),
    ({"adapt.lambda_ca": -1.0}, ValueError, "adapt.lambda_ca=-1.0"),
    ({"adapt.ca_iterations": 0}, ValueError, "adapt.ca_iterations=0"),
    ({"optim.disc.name": "rmsprop"}, ValueError, "optim.disc.name"),
])
def test_config_errors_name_the_field(overrides, error, message):
  config = uda_testing.override(_config(), overrides)
  with pytest.raises(error, match=message):
    validation.validate_config(config)


def test_statistics_file_errors_name_the_field(tmp_path):
  missing = str(tmp_path / "missing.json")
  method = methods.build(_config(category_stats=missing), NUM_CLASSES)
  with pytest.raises(FileNotFoundError, match=f"adapt.category_stats='{missing}' is not a file"):
    method.prepare(str(tmp_path / "run"))
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  method = methods.build(_config(category_stats=str(bad)), NUM_CLASSES)
  with pytest.raises(ValueError, match="adapt.category_stats=.* cannot be read as JSON"):
    method.prepare(str(tmp_path / "run"))
  city = tmp_path / "cityscapes.json"
  category_stats.write(dict(class_names=list(labels.CITYSCAPES_CLASSES),
                            **{k: [0.0] * 19 for k in category_stats.STAT_FIELDS}), str(city))
  method = methods.build(_config(category_stats=str(city)), NUM_CLASSES)
  with pytest.raises(ValueError, match="adapt.category_stats=.* has 19 classes"):
    method.prepare(str(tmp_path / "run"))


def test_configs_built_in_and_published_recipe():
  built_in = fcn_wild_config.get_config()
  validation.validate_config(built_in)
  assert (built_in.model.name, built_in.data.source.name) == ("compact", "street_scenes")
  assert (built_in.adapt.method, built_in.disc.name) == ("fcn_wild", "fc7_domain")

  config = fcn_wild_config.get_config("gta5=/data/gta5,cityscapes=/data/cityscapes")
  on_8_devices = config.copy_and_resolve_references()
  on_8_devices.batch_size = on_8_devices.eval_batch_size = 8  # The recipe's 1 + 1 needs 1 device.
  validation.validate_config(on_8_devices)
  assert config.model.name == "fcn8s_vgg16" and config.disc.width == 1024
  assert (config.data.source.name, tuple(config.data.source.resize)) == ("gta5", (720, 1280))
  assert tuple(config.data.target.resize) == (512, 1024)
  assert not config.data.eval.resize_labels
  assert tuple(config.data.crop_size) == (512, 768) and config.batch_size == 1
  assert config.num_train_steps == 100_000
  for optimizer in (config.optim.seg, config.optim.disc):
    assert (optimizer.name, optimizer.lr, optimizer.momentum, optimizer.power) == (
        "sgd", 1e-5, 0.99, 0.0)
  assert (config.adapt.lambda_da, config.adapt.lambda_ca) == (0.1, 1.0)
  method = methods.build(config, 19)
  assert method.feature_shape()[-1] == 4096  # fc7.
  synthia = fcn_wild_config.get_config("synthia=/data/synthia,cityscapes=/data/cityscapes")
  assert synthia.data.source.name == "synthia"
