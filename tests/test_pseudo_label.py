"""pseudo_label: offline pseudo labels (make_pseudo_labels), reading them in training, the method.

The pseudo labels are made from a checkpoint of configs/test.py trained for
two steps through the real entry point on one device; generation runs here
on the 8 fake devices, in fixed batches of 8 over 12 target images.
"""

import functools
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from PIL import Image

import e2e
from configs import pseudo_label as pseudo_label_config
from configs import test as test_config
from segjax import (checkpointing, data, evaluate, methods, parallel, pseudo_labels, steps,
                    validation)
from segjax import states as states_lib
from segjax.data import files, pipeline, pseudo_label_files
from segjax.tools import make_pseudo_labels as mpl_tool
from segjax.tools import self_training_rounds

import uda_testing  # pylint: disable=wrong-import-order

NUM_CLASSES = 8
NUM_TARGET = 12  # Two batches of 8, the second padded.
TRAINED_STEP = 2


def _quiet(iterable, **_):
  return iterable


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
  """A two-step adaptsegnet run of configs/test.py, by `python -m segjax.main`."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  proc = subprocess.run(
      [sys.executable, "-m", "segjax.main", "--config=configs/test.py", f"--workdir={workdir}",
       f"--config.num_train_steps={TRAINED_STEP}", "--config.log_every_steps=1",
       f"--config.eval_every_steps={TRAINED_STEP}",
       f"--config.checkpoint_every_steps={TRAINED_STEP}"],
      cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir


def _generation_config(**adapt):
  config = test_config.get_config()
  config.data.target.num_examples = NUM_TARGET
  config.adapt = methods.fields_of("pseudo_label", config.adapt)  # The thresholds' fields.
  for field, value in adapt.items():
    config.adapt[field] = value
  return config


def _probabilities(config, workdir):
  """The tool's probabilities of every target image, batch by batch as it predicts them."""
  images = data.build_source(config.data.target, "data.target")
  predictor = mpl_tool.CheckpointPredictor(config, workdir, TRAINED_STEP, images,
                                           config.eval_batch_size, parallel.make_mesh())
  return np.concatenate([predictor(list(range(start, min(start + 8, NUM_TARGET))))
                         for start in range(0, NUM_TARGET, 8)])


def _read_labels(out):
  return [np.asarray(Image.open(os.path.join(out, f"{i:06d}.png"))) for i in range(NUM_TARGET)]


def _folder_bytes(out):
  """Every file of a pseudo-label folder but statistics.npz (a zip, stamped with times)."""
  found = {}
  for path in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
    if os.path.isfile(path) and not path.endswith(mpl_tool.STATISTICS_FILE):
      with open(path, "rb") as f:
        found[os.path.relpath(path, out)] = f.read()
  return found


@pytest.fixture(scope="module")
def reference_labels(trained_run, tmp_path_factory):
  """Median thresholds over the dataset: (folder, its report, the probabilities)."""
  out = str(tmp_path_factory.mktemp("labels") / "median_dataset")
  config = _generation_config()
  report, activity = mpl_tool.make_pseudo_labels(config, trained_run, "latest", out, _quiet)
  assert activity == {"written": NUM_TARGET, "kept": 0, "statistics": "computed"}
  return out, report, _probabilities(config, trained_run)


# ---- Generation.

def test_generation_is_deterministic_and_matches_the_thresholds(trained_run, reference_labels,
                                                                tmp_path):
  out, report, probs = reference_labels
  again, _ = mpl_tool.make_pseudo_labels(_generation_config(), trained_run, str(TRAINED_STEP),
                                         str(tmp_path / "again"), _quiet)
  assert again == report
  assert _folder_bytes(str(tmp_path / "again")) == _folder_bytes(out)
  assert sorted(_folder_bytes(out)) == sorted(
      [f"{i:06d}.png" for i in range(NUM_TARGET)] + ["settings.json", "thresholds.json"])

  # The thresholds and labels of segjax.pseudo_labels on the same probabilities.
  histogram = pseudo_labels.ConfidenceHistogram(NUM_CLASSES)
  for image_probs in probs:
    histogram.add(image_probs.max(-1), image_probs.argmax(-1))
  thresholds = histogram.median_thresholds(0.9)
  with open(os.path.join(out, "thresholds.json"), encoding="utf-8") as f:
    assert json.load(f) == report
  assert list(report["thresholds"].values()) == thresholds.tolist()
  labels = _read_labels(out)
  for image_probs, label in zip(probs, labels):
    np.testing.assert_array_equal(label, pseudo_labels.apply_median(image_probs, thresholds))
  counts = np.bincount(np.concatenate([label.ravel() for label in labels]), minlength=256)
  assert list(report["labelled_pixels"].values()) == counts[:NUM_CLASSES].tolist()
  assert report["ignored_pixels"] == counts[255] and report["total_pixels"] == counts.sum()
  assert 0 < report["ignored_pixels"] < report["total_pixels"]
  assert report["classes"] == list(data.STREET_SCENES.class_names)
  assert report["checkpoint"] == {"workdir": os.path.abspath(trained_run), "step": TRAINED_STEP}
  assert (report["kind"], report["scope"], report["cap"], report["portion"]) == (
      "median", "dataset", 0.9, None)
  assert report["num_images"] == NUM_TARGET and report["image_thresholds"] is None


def test_probabilities_are_the_segmenters_softmax(trained_run, reference_labels):
  """The tool's probabilities, against the evaluation logits on one device."""
  _, _, probs = reference_labels
  config = _generation_config()
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  state, step = evaluate.restore_segmenter(config, trained_run, "latest", mesh)
  images = data.build_source(config.data.target, "data.target")
  batch = np.stack([images[i]["image"] for i in range(NUM_TARGET)])
  logits = steps.eval_logits(state, batch, tuple(config.data.mean), tuple(config.data.std))
  assert step == TRAINED_STEP
  np.testing.assert_allclose(probs, jax.nn.softmax(logits, axis=-1), atol=1e-5)


def test_image_scope_uses_each_images_own_thresholds(trained_run, reference_labels, tmp_path):
  _, _, probs = reference_labels
  out = str(tmp_path / "image_scope")
  report, _ = mpl_tool.make_pseudo_labels(_generation_config(pl_scope="image"), trained_run,
                                          "latest", out, _quiet)
  assert report["scope"] == "image" and report["thresholds"] is None
  assert not os.path.exists(os.path.join(out, mpl_tool.STATISTICS_FILE))
  per_class = [[] for _ in range(NUM_CLASSES)]
  for i, image_probs in enumerate(probs):
    predictions = image_probs.argmax(-1)
    thresholds = pseudo_labels.median_thresholds(image_probs.max(-1), predictions, NUM_CLASSES)
    with Image.open(os.path.join(out, f"{i:06d}.png")) as png:
      written = json.loads(png.text["thresholds"])
      np.testing.assert_array_equal(np.asarray(png),
                                    pseudo_labels.apply_median(image_probs, thresholds))
    present = np.bincount(predictions.ravel(), minlength=NUM_CLASSES) > 0
    assert written == [t if p else None for t, p in zip(thresholds.tolist(), present)]
    for c in np.flatnonzero(present):
      per_class[c].append(thresholds[c])
  for name, values in zip(report["classes"], per_class):
    summary = report["image_thresholds"][name]
    if values:
      assert summary["images"] == len(values)
      assert summary["mean"] == pytest.approx(np.mean(values), abs=1e-12)
      assert (summary["min"], summary["max"]) == (min(values), max(values))
    else:
      assert summary is None


def test_rerun_resumes_without_rewriting_or_recomputing(trained_run, reference_labels, tmp_path,
                                                        monkeypatch):
  out, _, _ = reference_labels
  calls = []
  predict = mpl_tool.CheckpointPredictor.__call__
  monkeypatch.setattr(mpl_tool.CheckpointPredictor, "__call__",
                      lambda self, indices: calls.append(indices) or predict(self, indices))

  # Some labels and thresholds.json lost: only their batches are predicted again.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(out, resumed)
  for name in ("000001.png", "000009.png", "thresholds.json"):
    os.remove(os.path.join(resumed, name))
  kept = {path: 1_000_000_000 for path in glob.glob(os.path.join(resumed, "*.png"))}
  for path, mtime in kept.items():
    os.utime(path, ns=(mtime, mtime))
  _, activity = mpl_tool.make_pseudo_labels(_generation_config(), trained_run, "latest",
                                            resumed, _quiet)
  assert activity == {"written": 2, "kept": NUM_TARGET - 2, "statistics": "reused"}
  assert calls == [list(range(8)), list(range(8, NUM_TARGET))]
  assert _folder_bytes(resumed) == _folder_bytes(out)
  assert all(os.stat(path).st_mtime_ns == mtime for path, mtime in kept.items())

  # Interrupted in pass 2, after pass 1 saved its statistics: pass 1 is not run again.
  interrupted = str(tmp_path / "interrupted")
  write_png = mpl_tool._write_png  # pylint: disable=protected-access

  def write_then_die(path, *args):
    if len(glob.glob(os.path.join(interrupted, "*.png"))) == 3:
      raise KeyboardInterrupt
    write_png(path, *args)

  monkeypatch.setattr(mpl_tool, "_write_png", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    mpl_tool.make_pseudo_labels(_generation_config(), trained_run, "latest", interrupted,
                                _quiet)
  assert os.path.isfile(os.path.join(interrupted, mpl_tool.STATISTICS_FILE))
  assert not os.path.exists(os.path.join(interrupted, "thresholds.json"))
  monkeypatch.setattr(mpl_tool, "_write_png", write_png)
  calls.clear()
  _, activity = mpl_tool.make_pseudo_labels(_generation_config(), trained_run, "latest",
                                            interrupted, _quiet)
  assert activity == {"written": NUM_TARGET - 3, "kept": 3, "statistics": "reused"}
  assert calls == [list(range(8)), list(range(8, NUM_TARGET))]
  assert _folder_bytes(interrupted) == _folder_bytes(out)

  # A complete folder is left alone; one made with other settings is refused.
  calls.clear()
  _, activity = mpl_tool.make_pseudo_labels(_generation_config(), trained_run, "latest",
                                            interrupted, _quiet)
  assert activity["written"] == 0 and not calls
  with pytest.raises(files.DataError, match=r"holds pseudo labels made with other settings "
                                            r"\(cap: 0.9 there, 0.8 now\)"):
    mpl_tool.make_pseudo_labels(_generation_config(pl_cap=0.8), trained_run, "latest",
                                interrupted, _quiet)


def _fake_predict(probs_by_index):
  return lambda indices: np.stack([probs_by_index[i] for i in indices])


def _two_classes(class0_confidences):
  """(1, W, 2) probabilities predicting class 0 with the given confidences."""
  p = np.asarray(class0_confidences, np.float32)[None]
  return np.stack([p, 1 - p], axis=-1)


def _settings(policy):
  return {**policy.describe(), "classes": ["a", "b"], "num_images": 2}


@pytest.mark.parametrize("scope", ["dataset", "image"])
def test_median_scopes_on_a_tiny_case(tmp_path, scope):
  """A confident and an unsure image: the dataset median keeps all of one and none of the other.

  Per image, BDL's index round(n / 2) of the 4 sorted confidences is the third:
  0.9 and 0.65, keeping two pixels of each. Over the 8 pixels it is the fifth, 0.7.
  """
  probs = [_two_classes([0.95, 0.7, 0.9, 0.8]), _two_classes([0.6, 0.68, 0.55, 0.65])]
  config = _generation_config(pl_scope=scope)
  policy = mpl_tool.Policy.from_config(config.adapt, 2)
  out = str(tmp_path / scope)
  report, _ = mpl_tool.write_pseudo_labels(out, ["0", "1"], _fake_predict(probs), policy,
                                           _settings(policy), ["a", "b"], 2, _quiet)
  labels = [np.asarray(Image.open(os.path.join(out, f"{i}.png")))[0] for i in range(2)]
  if scope == "dataset":
    np.testing.assert_array_equal(labels, [[0, 0, 0, 0], [255, 255, 255, 255]])
    assert report["thresholds"]["a"] == pytest.approx(0.7, abs=2 ** -16)
    assert report["thresholds"]["b"] == 0.0  # Never predicted.
  else:
    np.testing.assert_array_equal(labels, [[0, 255, 0, 255], [255, 0, 255, 0]])
    assert report["thresholds"] is None
    assert report["image_thresholds"]["a"] == {
        "mean": pytest.approx((0.9 + 0.65) / 2), "min": pytest.approx(0.65),
        "max": pytest.approx(0.9), "images": 2}
    assert report["image_thresholds"]["b"] is None
  assert report["labelled_pixels"] == {"a": 4, "b": 0} and report["ignored_pixels"] == 4


def test_cbst_portion_grows_with_the_round(tmp_path):
  portions = [mpl_tool.cbst_portion(_generation_config(pl_round=r).adapt) for r in (0, 1, 2, 9)]
  assert portions == pytest.approx([0.2, 0.25, 0.3, 0.5])
  rng = np.random.default_rng(0)
  probs = [rng.dirichlet(np.ones(3), size=(4, 5)).astype(np.float32) for _ in range(3)]
  config = _generation_config(pl_threshold="cbst", pl_round=2)
  policy = mpl_tool.Policy.from_config(config.adapt, 3)
  out = str(tmp_path / "cbst")
  report, _ = mpl_tool.write_pseudo_labels(out, ["x/0", "x/1", "y/2"], _fake_predict(probs),
                                           policy, _settings(policy), ["a", "b", "c"], 2, _quiet)
  assert (report["kind"], report["portion"], report["round"], report["cap"]) == (
      "cbst", pytest.approx(0.3), 2, None)
  histogram = pseudo_labels.ConfidenceHistogram(3)
  for p in probs:
    histogram.add(p.max(-1), p.argmax(-1))
  thresholds = histogram.cbst_thresholds(0.3)
  assert list(report["thresholds"].values()) == thresholds.tolist()
  for name, p in zip(["x/0", "x/1", "y/2"], probs):
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, name + ".png"))),
                                  pseudo_labels.apply_cbst(p, thresholds))


def test_threshold_settings_are_checked():
  for field, value, message in (("pl_threshold", "mean", "adapt.pl_threshold='mean'"),
                                ("pl_scope", "batch", "adapt.pl_scope='batch'"),
                                ("pl_cap", 1.5, "adapt.pl_cap=1.5"),
                                ("pl_portion", 0.0, "adapt.pl_portion=0.0")):
    with pytest.raises(ValueError, match=message):
      mpl_tool.Policy.from_config(_generation_config(**{field: value}).adapt, NUM_CLASSES)


def test_the_config_is_built_in_by_default_and_the_seeds_recipe_with_roots():
  config = pseudo_label_config.get_config()
  assert (config.adapt.method, config.model.name, config.data.target.name) == (
      "pseudo_label", "compact", "street_scenes")
  assert config.data.target.pseudo_labels == "" and config.adapt.pl_scope == "dataset"
  config = pseudo_label_config.get_config("gta5=/d/gta5,cityscapes=/d/cityscapes")
  assert (config.model.name, config.batch_size, config.optim.seg.lr) == ("bisenet_r18", 4, 2.5e-4)
  assert (config.adapt.lambda_adv, config.adapt.lambda_pl, config.loss.aux_weights) == (
      0.001, 1.0, (1.0, 1.0))
  assert (config.adapt.pl_threshold, config.adapt.pl_cap, config.adapt.pl_scope) == (
      "median", 0.9, "image")
  assert (config.data.source.name, tuple(config.data.source.resize)) == ("gta5", (720, 1280))
  assert (config.data.target.name, config.data.target.split) == ("cityscapes", "train")
  assert tuple(config.data.target.resize) == (512, 1024)
  assert config.data.target.pseudo_labels == ""
  config = pseudo_label_config.get_config("synthia=/d/synthia,cityscapes=/d/cityscapes")
  assert (config.data.source.name, tuple(config.data.source.resize)) == ("synthia", (760, 1280))


# ---- Reading pseudo labels in training.

def _pipeline_config(pseudo_labels_dir, num_examples=6):
  config = pseudo_label_config.get_config()
  config.batch_size = 4
  config.data.source.height, config.data.source.width = 32, 64
  config.data.target.update(height=48, width=96, num_examples=num_examples,
                            pseudo_labels=pseudo_labels_dir)
  config.data.crop_size = (32, 64)
  config.data.augment.update(scale_range=(1.0, 1.0), flip=True, brightness=0.0, contrast=0.0,
                             saturation=0.0, hue=0.0)
  return config


def _pixel_function(image):
  """A pseudo label that is a function of the image's pixels, so alignment can be checked."""
  return image[..., 0] >> 5


def _write_pixel_function_labels(config, out):
  """Pseudo labels = _pixel_function(image), through the writer (one-hot probabilities)."""
  images = data.build_source(config.data.target, "data.target")
  def predict(indices):
    return np.stack([np.eye(NUM_CLASSES, dtype=np.float32)[_pixel_function(images[i]["image"])]
                     for i in indices])
  policy = mpl_tool.Policy.from_config(config.adapt, NUM_CLASSES)
  names = pseudo_label_files.label_names(config.data.target, images)
  settings = {**policy.describe(), "classes": list(data.STREET_SCENES.class_names),
              "num_images": len(names)}
  mpl_tool.write_pseudo_labels(out, names, predict, policy, settings,
                               data.STREET_SCENES.class_names, 4, _quiet)


def test_training_batches_carry_pseudo_labels_aligned_under_crop_and_flip(tmp_path):
  out = str(tmp_path / "pixel_labels")
  config = _pipeline_config(out)
  _write_pixel_function_labels(config, out)
  batches = pipeline.train_batches(config, with_target=True, target_labels=True,
                                   process_index=0, process_count=1)
  own = data.build_source(config.data.target, "data.target")
  for batch in (batches[0], batches[1], batches[2]):
    target = batch["target"]
    assert target["label"].shape == target["image"].shape[:3] == (4, 32, 64)
    np.testing.assert_array_equal(target["label"], _pixel_function(target["image"]))
  # Never the scenes' own labels; and without target_labels, no target labels at all.
  assert not any(np.array_equal(_pixel_function(own[i]["image"]), own[i]["label"])
                 for i in range(len(own)))
  plain = pipeline.train_batches(config, with_target=True, process_index=0, process_count=1)
  assert set(plain[0]["target"]) == {"image"}


def test_missing_or_mismatched_pseudo_labels_are_clear_errors(tmp_path):
  def build(directory, num_examples=6):
    pipeline.train_batches(_pipeline_config(directory, num_examples), with_target=True,
                           target_labels=True, process_index=0, process_count=1)

  with pytest.raises(files.DataError, match=r"data.target.pseudo_labels is not set.*run python "
                                            r"-m segjax.tools.make_pseudo_labels first"):
    build("")
  with pytest.raises(files.DataError, match=r"data.target.pseudo_labels=.*nowhere is not a "
                                            r"directory; run python -m segjax.tools."
                                            r"make_pseudo_labels first"):
    build(str(tmp_path / "nowhere"))
  out = str(tmp_path / "labels")
  _write_pixel_function_labels(_pipeline_config(out), out)
  os.rename(os.path.join(out, "thresholds.json"), os.path.join(out, "later.json"))
  with pytest.raises(files.DataError, match=r"data.target.pseudo_labels=.*labels has no "
                                            r"thresholds.json \(written last\).*run python -m "
                                            r"segjax.tools.make_pseudo_labels first"):
    build(out)
  os.rename(os.path.join(out, "later.json"), os.path.join(out, "thresholds.json"))
  with pytest.raises(files.DataError, match=r"holds pseudo labels of 6 images but data.target "
                                            r"has 5"):
    build(out, num_examples=5)
  os.remove(os.path.join(out, "000004.png"))
  with pytest.raises(files.MissingFile, match=r"1 pseudo label\(s\) of the target images do "
                                              r"not exist, e.g.\n  .*000004.png"):
    build(out)


# ---- The method.

# name -> (config overrides, its states, its metrics).
VARIANTS = {
    "adversarial": ({"model.aux_head": True, "loss.aux_weights": (0.1,), "adapt.gan": "ls"},
                    {"seg", "disc"},
                    {"loss_seg", "loss_seg_aux1", "loss_pl", "loss_pl_aux1", "loss_adv",
                     "loss_disc", "lr"}),
    "self_training": ({"adapt.lambda_adv": 0.0}, {"seg"}, {"loss_seg", "loss_pl", "lr"}),
}


def _method_config(overrides=(), method="pseudo_label"):
  config = test_config.get_config()
  config.model.dropout_rate = 0.1  # On: masks are keyed by the global example index.
  config.adapt = methods.fields_of(method, config.adapt)
  return uda_testing.override(config, overrides)


def _batch(config, seed=0, target_labels=None):
  rng = np.random.default_rng(seed)
  h, w = config.data.crop_size
  def labels():
    out = rng.integers(0, NUM_CLASSES, (8, h, w)).astype(np.uint8)
    out[0, :, : w // 2] = 255
    out[3] = 255
    return out
  return {"source": {"image": rng.integers(0, 256, (8, h, w, 3), dtype=np.uint8),
                     "label": labels()},
          "target": {"image": rng.integers(0, 256, (8, h, w, 3), dtype=np.uint8),
                     "label": labels() if target_labels is None else target_labels}}


def _setup(config, num_devices, batch):
  """(the data-parallel step, its mesh, the global batch, the initial states on the host)."""
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))
  states, _ = states_lib.create_states(config, jax.random.key(0), NUM_CLASSES, mesh)
  method = methods.build(config, NUM_CLASSES)
  step = parallel.data_parallel(functools.partial(method.step, axis_name="data"), mesh,
                                in_specs=(P(), P("data"), P()), out_specs=(P(), P()))
  if not method.target_labels:
    batch = {**batch, "target": {"image": batch["target"]["image"]}}
  return step, mesh, parallel.to_global(batch, mesh), jax.device_get(states)


def _run_steps(config, num_devices, batch, num_steps=2):
  states, metrics = uda_testing.chain(*_setup(config, num_devices, batch), num_steps)[-1]
  return uda_testing.arrays(states), metrics


@pytest.mark.parametrize("variant", [
    # Without the discriminator, a subset of the adversarial variant: benchmarks/slow_tests.py.
    pytest.param(v, marks=pytest.mark.slow) if v == "self_training" else v
    for v in sorted(VARIANTS)])
def test_method_step_on_8_devices_equals_1_device(variant):
  """Each step on 8 devices from the 1-device run's states (see uda_testing.steps_from)."""
  overrides, state_names, metric_names = VARIANTS[variant]
  config = _method_config(overrides)
  assert methods.build(config, NUM_CLASSES).target_labels
  batch = _batch(config)
  step1, mesh1, batch1, initial = _setup(config, 1, batch)
  run1 = uda_testing.chain(step1, mesh1, batch1, initial)

  def compare(states8, metrics8, states1, metrics1):
    assert set(states8) == state_names and set(metrics8) == metric_names
    for key in metrics8:
      np.testing.assert_allclose(metrics8[key], metrics1[key], rtol=2e-4, atol=1e-6, err_msg=key)
      assert np.isfinite(metrics8[key])
    assert metrics8["loss_pl"] > 0
    uda_testing.assert_states_close(uda_testing.arrays(states8), uda_testing.arrays(states1))

  step8, mesh8, batch8, _ = _setup(config, 8, batch)
  uda_testing.device_counts_agree(step8, mesh8, batch8, initial, run1, compare)


@pytest.mark.slow  # 35 s: benchmarks/slow_tests.py runs it.
def test_without_pseudo_labelled_pixels_the_step_is_adaptsegnets():
  config = _method_config()
  h, w = config.data.crop_size
  batch = _batch(config, target_labels=np.full((8, h, w), 255, np.uint8))
  states, metrics = _run_steps(config, 2, batch, num_steps=1)
  reference_states, reference_metrics = _run_steps(
      _method_config(method="adaptsegnet"), 2, batch, num_steps=1)
  assert metrics.pop("loss_pl") == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               (states, metrics), (reference_states, reference_metrics))


@pytest.mark.parametrize("overrides, message", [
    ({"adapt.lambda_pl": 0.0}, r"adapt.lambda_pl=0.0 must be > 0"),
    ({"adapt.lambda_adv": -1.0}, r"adapt.lambda_adv=-1.0 must be >= 0"),
    ({"adapt.lambda_ent": 0.01}, r"config.adapt.lambda_ent: adapt.method='pseudo_label' does "
                                 r"not read it"),
    ({"init_from": "/nonexistent/run:best"},
     r"config.init_from='/nonexistent/run:best': No checkpoint in /nonexistent/run/checkpoints"),
])
def test_method_config_errors_name_the_field(overrides, message):
  config = uda_testing.override(_method_config(), overrides)
  with pytest.raises(ValueError, match=message):
    validation.validate_config(config)


def test_init_from_takes_the_segmenter_and_leaves_the_optimizer_fresh(trained_run):
  assert states_lib.parse_init_from(f"{trained_run}:best") == (trained_run, "best")
  assert states_lib.parse_init_from(f"{trained_run}:2") == (trained_run, "2")
  assert states_lib.parse_init_from("/runs/a:b/x") == ("/runs/a:b/x", "latest")
  config = _method_config()
  config.init_from = trained_run
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  states, _ = states_lib.create_states(config, jax.random.key(7), NUM_CLASSES, mesh)
  initialised = states_lib.init_segmenter_from(states["seg"], config, NUM_CLASSES, mesh)
  trained, _ = evaluate.restore_segmenter(config, trained_run, "latest", mesh)
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get((initialised.params, initialised.batch_stats)),
               jax.device_get((trained.params, trained.batch_stats)))
  assert int(initialised.step) == 0 and int(trained.step) == TRAINED_STEP
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(initialised.opt_state),
               jax.device_get(states["seg"].opt_state))
  config.init_from = f"{trained_run}:5"
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"config.init_from=.*:5': --checkpoint=5: no checkpoint of step 5"):
    states_lib.init_segmenter_from(states["seg"], config, NUM_CLASSES, mesh)


# ---- The commands, end to end.

TINY = ("--config.batch_size=2", "--config.eval_batch_size=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=1", "--config.checkpoint_every_steps=1",
        "--config.num_eval_samples=1", "--config.data.crop_size=(32, 64)",
        "--config.model.width=8", "--config.model.dropout_rate=0.0", "--config.disc.width=8",
        *(f"--config.data.{split}.{field}={value}" for split in ("source", "target", "eval")
          for field, value in (("height", 32), ("width", 64), ("num_examples", 4))))
STEPS_PER_ROUND = 2


def test_make_pseudo_labels_command(trained_run, cache_dir, tmp_path):
  out = str(tmp_path / "cli")
  command = [sys.executable, "-m", "segjax.tools.make_pseudo_labels",
             "--config=configs/pseudo_label.py", f"--workdir={trained_run}", f"--out={out}",
             "--config.adapt.pl_scope=image", *TINY]
  proc = subprocess.run(command, cwd=e2e.REPO_ROOT, env=e2e.env(2, cache_dir),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert f"{out}: pseudo labels of 4 images by step 2 of {trained_run}" in proc.stdout
  assert "median thresholds, image scope, cap 0.9" in proc.stdout
  assert "4 written, 0 already there" in proc.stdout and "\n  road " in proc.stdout
  assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png", "000003.png",
                                     "settings.json", "thresholds.json"]
  proc = subprocess.run([*command[:5], "--checkpoint=9", f"--out={tmp_path / 'other'}"],
                        cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 1
  assert "segjax.tools.make_pseudo_labels: --checkpoint=9: no checkpoint of step 9" in proc.stderr


def _rounds_command(workdir, init_from):
  return [sys.executable, "-m", "segjax.tools.self_training_rounds",
          "--config=configs/pseudo_label.py", f"--workdir={workdir}", f"--init_from={init_from}",
          "--rounds=2", f"--steps_per_round={STEPS_PER_ROUND}",
          "--config.adapt.pl_threshold=cbst", "--config.adapt.lambda_adv=0", *TINY]


@pytest.fixture(scope="module")
def rounds_run(trained_run, cache_dir, tmp_path_factory):
  """Two CBST rounds of configs/pseudo_label.py from the trained run: (workdir, stdout)."""
  workdir = str(tmp_path_factory.mktemp("rounds"))
  proc = subprocess.run(_rounds_command(workdir, trained_run), cwd=e2e.REPO_ROOT,
                        env=e2e.env(1, cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir, proc.stdout


def test_self_training_rounds_grow_the_portion_and_skip_finished_rounds(trained_run, rounds_run,
                                                                        cache_dir):
  workdir, stdout = rounds_run
  for r, portion, source in ((0, 0.2, f"{trained_run}:{TRAINED_STEP}"),
                             (1, 0.25, f"{workdir}/round_0/train:{STEPS_PER_ROUND}")):
    labels, run = self_training_rounds.round_dirs(workdir, r)
    with open(os.path.join(labels, "thresholds.json"), encoding="utf-8") as f:
      report = json.load(f)
    assert (report["kind"], report["round"], report["num_images"]) == ("cbst", r, 4)
    assert report["portion"] == pytest.approx(portion)
    assert f"{report['checkpoint']['workdir']}:{report['checkpoint']['step']}" == source
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
      run_config = json.load(f)
    assert run_config["data"]["target"]["pseudo_labels"] == labels
    assert run_config["init_from"] == (trained_run if r == 0
                                       else f"{workdir}/round_0/train:latest")
    train_records = [record for record in e2e.comparable_metrics(run)
                     if "train/loss_pl" in record]
    assert [record["step"] for record in train_records] == [1, 2]
    assert all(np.isfinite(record["train/loss_pl"]) for record in train_records)
    assert os.path.isfile(os.path.join(run, "final_metrics.json"))
  assert "round  thresholds" in stdout and "cbst p=0.25" in stdout

  final = os.path.join(workdir, "round_1", "train", "final_metrics.json")
  finished = os.stat(final).st_mtime_ns
  again = subprocess.run(_rounds_command(workdir, trained_run), cwd=e2e.REPO_ROOT,
                         env=e2e.env(1, cache_dir), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-5000:]
  assert "Round 0 is finished" in again.stderr and "Round 1 is finished" in again.stderr
  assert again.stdout == stdout and os.stat(final).st_mtime_ns == finished


def test_an_interrupted_round_resumes_exactly(trained_run, rounds_run, cache_dir, tmp_path):
  """Round 1 stopped after its first checkpoint: the rerun ends where the whole run ended."""
  workdir, stdout = rounds_run
  copy = str(tmp_path / "rounds")
  shutil.copytree(workdir, copy)
  _, run = self_training_rounds.round_dirs(copy, 1)
  os.remove(os.path.join(run, "final_metrics.json"))
  shutil.rmtree(os.path.join(run, "checkpoints", str(STEPS_PER_ROUND)))
  proc = subprocess.run(_rounds_command(copy, trained_run), cwd=e2e.REPO_ROOT,
                        env=e2e.env(1, cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "Round 0 is finished" in proc.stderr
  assert "Resumed from the checkpoint at step 1" in proc.stderr
  _, original = self_training_rounds.round_dirs(workdir, 1)
  assert e2e.comparable_metrics(run) == e2e.comparable_metrics(original)
  with open(os.path.join(run, "final_metrics.json"), encoding="utf-8") as f, \
       open(os.path.join(original, "final_metrics.json"), encoding="utf-8") as g:
    assert json.load(f) == json.load(g)
  assert proc.stdout == stdout  # The table: the copied labels' sources, the same mIoU.
