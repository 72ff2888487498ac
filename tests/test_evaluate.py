"""segjax.evaluate and segjax.predict on a checkpoint of a tiny run on the Cityscapes fixture.

The run (configs/test_cityscapes.py) trains CompactSeg for two steps on the
fixture's train split through the real entry point, on one device (a
checkpoint restores onto any number). Evaluation must agree with the official
cityscapesscripts on the predictions it saves: both count the same confusion
matrix, so per-class IoU and their mean agree to 1e-6 (in practice exactly).
"""

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import commands
import e2e
import needs
from configs import recipes, test_cityscapes
from segjax import checkpointing, data, evaluate, predict
from segjax.data import labels as labels_lib

FIXTURE = os.path.join(needs.fixtures_root(), "cityscapes")  # Checked by `trained_run`.
TRAINED_STEP = 2  # configs/test_cityscapes.py: num_train_steps, evaluated and checkpointed.
TOLERANCE = 1e-6


@pytest.fixture(name="trained_run")
def fixture_trained_run(cityscapes_run):
  """The workdir of a two-step run on the fixture, trained by `python -m segjax.main`."""
  return cityscapes_run


def _config(split: str = "val"):
  """The run's config, evaluating `split` read at 64x128 against full-resolution labels."""
  config = test_cityscapes.get_config(FIXTURE)
  config.data.eval = recipes.real_dataset("cityscapes", FIXTURE, split, resize=(64, 128),
                                          resize_labels=False)
  return config


def _ground_truth(split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(FIXTURE, "gtFine", split, "*", "*_gtFine_labelIds.png")))


def _prediction_for(ground_truth: str, predictions: str, kind: str) -> str:
  city = os.path.basename(os.path.dirname(ground_truth))
  stem = os.path.basename(ground_truth).replace("_gtFine_labelIds.png", "_leftImg8bit")
  return os.path.join(predictions, city, f"{stem}_{kind}.png")


def _cityscapesscripts_scores(predictions: list[str], ground_truth: list[str]) -> dict:
  """The official pixel-level evaluation of label-id PNGs, in-process and quiet."""
  from cityscapesscripts.evaluation import \
      evalPixelLevelSemanticLabeling as official  # pylint: disable=import-outside-toplevel
  args = official.args
  args.evalInstLevelScore = False  # Needs instanceIds files; nIoU is not segjax's business.
  args.evalPixelAccuracy = False
  args.JSONOutput = False
  args.quiet = True
  return official.evaluateImgLists(predictions, ground_truth, args)


@pytest.mark.parametrize("split", ["train", "val"])
def test_evaluation_agrees_with_cityscapesscripts(trained_run, tmp_path, split):
  """train: 3 images, 2 cities, 2048x1024 labels; val: 1 image whose absent classes are NaN."""
  out = str(tmp_path / "predictions")
  report = evaluate.evaluate_checkpoint(_config(split), trained_run, "best", out)
  ground_truth = _ground_truth(split)
  assert report["step"] == TRAINED_STEP and report["checkpoint"] == "best"
  assert report["num_images"] == len(ground_truth)
  assert report["data_eval"]["split"] == split and report["inference"]["flip"] is False
  with open(os.path.join(trained_run, "eval", f"{split}_step{TRAINED_STEP}.json"),
            encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(report))

  # One trainIds and one labelIds PNG per image, in its city folder; none for the padding.
  written = sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "**", "*.png"),
                                                               recursive=True))
  want = sorted(os.path.relpath(_prediction_for(gt, out, kind), out)
                for gt in ground_truth for kind in ("trainIds", "labelIds"))
  assert written == want
  to_label_id = np.zeros(256, np.uint8)
  for train_id, label_id in labels_lib.CITYSCAPES_TRAIN_TO_ID.items():
    to_label_id[train_id] = label_id
  valid_pixels = 0
  for gt in ground_truth:
    gt_ids = np.asarray(Image.open(gt))
    train_ids = np.asarray(Image.open(_prediction_for(gt, out, "trainIds")))
    label_ids = np.asarray(Image.open(_prediction_for(gt, out, "labelIds")))
    assert train_ids.shape == label_ids.shape == gt_ids.shape  # The labels' full resolution.
    np.testing.assert_array_equal(label_ids, to_label_id[train_ids])
    valid_pixels += np.isin(gt_ids, list(labels_lib.CITYSCAPES_ID_TO_TRAIN)).sum()
  assert np.sum(report["confusion_matrix"]) == valid_pixels

  official = _cityscapesscripts_scores(
      [_prediction_for(gt, out, "labelIds") for gt in ground_truth], ground_truth)
  differences = []
  for name, ours in report["iou"].items():
    theirs = official["classScores"][name]
    assert (ours is None) == math.isnan(theirs), name
    if ours is not None:
      differences.append(abs(ours - theirs))
  differences.append(abs(report["miou"] - official["averageScoreClasses"]))
  assert max(differences) <= TOLERANCE, differences
  if split == "val":
    assert any(iou is None for iou in report["iou"].values())


def test_evaluation_reports_the_source_datasets_subsets(trained_run, tmp_path):
  """A SYNTHIA -> Cityscapes run also reports mIoU16 and mIoU13 (SYNTHIA's protocol)."""
  config = _config()
  config.data.source = recipes.real_dataset("synthia", str(tmp_path / "unused"), "all")
  report = evaluate.evaluate_checkpoint(config, trained_run)
  for name, classes in (("miou16", labels_lib.SYNTHIA_16), ("miou13", labels_lib.SYNTHIA_13)):
    assert report["subsets"][name] == list(classes)
    ious = [list(report["iou"].values())[c] for c in classes]
    assert report[name] == pytest.approx(np.mean([iou for iou in ious if iou is not None]))
  table = evaluate.format_table(report)
  assert f"mIoU16{100 * report['miou16']:22.2f}" in table
  assert f"mIoU13{100 * report['miou13']:22.2f}" in table


def test_evaluate_command_line(trained_run, cache_dir):
  """The entry point with TTA overrides: exit 0, the table, the JSON and the metric writers."""
  json_path = os.path.join(trained_run, "eval", f"val_step{TRAINED_STEP}.json")
  if os.path.exists(json_path):
    os.remove(json_path)
  proc = subprocess.run(
      [sys.executable, "-m", "segjax.evaluate", f"--config=configs/test_cityscapes.py:{FIXTURE}",
       f"--workdir={trained_run}", "--checkpoint=latest", "--config.inference.flip=True",
       "--config.inference.scales=0.75,1.0"],
      cwd=e2e.REPO_ROOT, env=e2e.env(2, cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "cityscapes val: 1 images, step 2 (--checkpoint=latest)" in proc.stdout
  for row in ("road", "bicycle", "mIoU", "pixel accuracy", "mean accuracy"):
    assert f"\n{row}" in proc.stdout
  with open(json_path, encoding="utf-8") as f:
    report = json.load(f)
  assert report["checkpoint"] == "latest" and report["step"] == TRAINED_STEP
  assert report["inference"]["flip"] is True and report["inference"]["scales"] == [0.75, 1.0]
  assert report["data_eval"]["resize"] == [64, 128] and report["num_images"] == 1
  with open(os.path.join(trained_run, "eval", "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert records[-1]["step"] == TRAINED_STEP and "val/miou" in records[-1]
  assert "val/iou/road" in records[-1]

  proc = subprocess.run(
      [sys.executable, "-m", "segjax.evaluate", f"--config=configs/test_cityscapes.py:{FIXTURE}",
       f"--workdir={trained_run}", "--checkpoint=7"],
      cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  assert "segjax.evaluate: --checkpoint=7: no checkpoint of step 7" in proc.stderr
  assert f"the available steps are [{TRAINED_STEP}]" in proc.stderr


def test_evaluate_errors_say_what_the_workdir_holds(trained_run, tmp_path):
  config = _config()
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"No checkpoint in .*/empty/checkpoints: the directory does not exist"):
    evaluate.evaluate_checkpoint(config, str(tmp_path / "empty"))
  os.makedirs(tmp_path / "no_steps" / "checkpoints")
  with pytest.raises(checkpointing.CheckpointError, match=r"No checkpoint in .*no_steps"):
    evaluate.evaluate_checkpoint(config, str(tmp_path / "no_steps"))
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"--checkpoint=3: no checkpoint of step 3 .* the available steps are "
                           r"\[2\]"):
    evaluate.evaluate_checkpoint(config, trained_run, "3")
  with pytest.raises(checkpointing.CheckpointError, match=r"--checkpoint='first': expected "
                                                          r"'latest', 'best' or a step number"):
    evaluate.evaluate_checkpoint(config, trained_run, "first")

  # Checkpoints saved between evaluations have no metrics: no 'best' among them.
  unscored = tmp_path / "unscored"
  shutil.copytree(os.path.join(trained_run, "checkpoints"), unscored / "checkpoints")
  for metrics_dir in glob.glob(str(unscored / "checkpoints" / "*" / "metrics")):
    shutil.rmtree(metrics_dir)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"--checkpoint=best: no checkpoint in .* was saved with the metric "
                           r"'miou'.*use --checkpoint=latest or one of the steps \[2\]"):
    evaluate.evaluate_checkpoint(config, str(unscored), "best")


def test_evaluating_an_unlabelled_split_is_a_clear_error(trained_run, tmp_path):
  root = tmp_path / "cityscapes"
  os.makedirs(root / "leftImg8bit" / "test" / "berlin")
  Image.new("RGB", (64, 32)).save(
      root / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png")
  config = _config()
  config.data.eval = recipes.real_dataset("cityscapes", str(root), "test", resize=(32, 64))
  with pytest.raises(data.DataError, match=r"data.eval: the split 'test' of cityscapes has no "
                                           r"labels \(config field data.eval.split\)"):
    evaluate.evaluate_checkpoint(config, trained_run)


def _write_inputs(folder) -> dict[str, tuple[int, int]]:
  """Images of three sizes, modes and formats, two of them in subfolders: {path: (h, w)}."""
  rng = np.random.default_rng(0)
  images = {"gray.png": ((40, 70), "L"), "sub/street.jpg": ((70, 100), "RGB"),
            "sub/deeper/rgba.png": ((64, 128), "RGBA")}
  for relative, ((height, width), mode) in images.items():
    os.makedirs(os.path.dirname(os.path.join(folder, relative)), exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(
        os.path.join(folder, relative))
  (folder / "notes.txt").write_text("not an image")
  return {relative: size for relative, (size, _) in images.items()}


def test_predict_writes_label_maps_colours_and_overlays(trained_run, tmp_path):
  inputs, out = tmp_path / "inputs", tmp_path / "out"
  sizes = _write_inputs(inputs)
  predictor = predict.CheckpointPredictor(_config(), trained_run, "best")
  done = predict.predict_folder(predictor, str(inputs), str(out))
  assert done == predict.Predicted(written=len(sizes), unreadable=[])
  to_label_id = np.zeros(256, np.uint8)
  for train_id, label_id in labels_lib.CITYSCAPES_TRAIN_TO_ID.items():
    to_label_id[train_id] = label_id
  palette = data.CITYSCAPES.palette
  written = sorted(os.path.relpath(p, out) for p in glob.glob(str(out / "**" / "*.png"),
                                                              recursive=True))
  assert written == sorted(f"{os.path.splitext(relative)[0]}_{kind}.png" for relative in sizes
                           for kind in ("trainIds", "labelIds", "color", "overlay"))
  for relative, size in sizes.items():
    stem = str(out / os.path.splitext(relative)[0])
    train_ids = np.asarray(Image.open(stem + "_trainIds.png"))
    assert train_ids.shape == size and train_ids.max() < len(palette)
    np.testing.assert_array_equal(np.asarray(Image.open(stem + "_labelIds.png")),
                                  to_label_id[train_ids])
    color = np.asarray(Image.open(stem + "_color.png"))
    np.testing.assert_array_equal(color, palette[train_ids])
    image = np.asarray(Image.open(inputs / relative).convert("RGB")).astype(np.float32)
    overlay = np.asarray(Image.open(stem + "_overlay.png")).astype(np.float32)
    assert overlay.shape == (*size, 3)
    np.testing.assert_allclose(overlay, (image + color) / 2, atol=1)


def test_predict_errors_name_the_folder_or_file(trained_run, tmp_path):
  predictor = predict.CheckpointPredictor(_config(), trained_run)
  with pytest.raises(data.DataError, match=r"--input=.*missing is not a directory"):
    predict.predict_folder(predictor, str(tmp_path / "missing"), str(tmp_path / "o"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("no images here")
  with pytest.raises(data.DataError,
                     match=r"No images \(.png, .jpg, .jpeg\) under --input=.*empty"):
    predict.predict_folder(predictor, str(tmp_path / "empty"), str(tmp_path / "o"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(data.DataError, match=r"Cannot read the image .*bad/broken.png"):
    predict.predict_folder(predictor, str(tmp_path / "bad"), str(tmp_path / "o"))


def test_a_checkpoint_of_another_model_names_what_differs(trained_run):
  config = _config()
  config.model.width = 16
  with pytest.raises(checkpointing.CheckpointError) as error:
    evaluate.evaluate_checkpoint(config, trained_run)
  message = str(error.value)
  assert message.startswith(f"--checkpoint=latest (step {TRAINED_STEP} of {trained_run}) does "
                            "not fit this config: the state 'seg': params/")
  assert "is (8,) in the checkpoint and (16,) for this config" in message
  assert message.endswith("These fields differ from the run's config.json: model.width: 8 in the "
                          "run, 16 here. Pass the run's values: --config.model.width=8")
  config = _config()
  config.model.name = "unet_small"
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"and absent for this config\. These fields differ from the run's "
                           r"config\.json: model\.name: 'compact' in the run, 'unet_small' here"):
    evaluate.evaluate_checkpoint(config, trained_run)


def test_the_commands_skip_unreadable_images_and_name_what_differs(trained_run, cache_dir,
                                                                    tmp_path):
  """predict writes every readable image's outputs, then exits 1 counting the others; evaluate
  with another model width exits 1 naming the field (one message each, no traceback)."""
  inputs, out = tmp_path / "inputs", tmp_path / "out"
  inputs.mkdir()
  Image.fromarray(np.full((32, 64, 3), 90, np.uint8)).save(inputs / "good.png")
  (inputs / "broken.png").write_bytes(b"\x89PNG truncated")
  config = f"--config=configs/test_cityscapes.py:{FIXTURE}"
  predicted, mismatched = commands.run([
      ("segjax.predict", [config, f"--workdir={trained_run}", f"--input={inputs}",
                          f"--output={out}"]),
      ("segjax.evaluate", [config, f"--workdir={trained_run}", "--config.model.width=16"]),
  ], cache_dir)
  assert predicted.returncode == 1 and "Traceback" not in predicted.stderr, predicted.stderr
  assert f"Wrote the predictions of 1 images to {out}." in predicted.stdout
  assert sorted(os.listdir(out)) == [f"good_{kind}.png" for kind in
                                     ("color", "labelIds", "overlay", "trainIds")]
  assert (f"error: segjax.predict: 1 of 2 images under --input={inputs} could not be read, so "
          f"they have no predictions:\n  Cannot read the image {inputs / 'broken.png'}"
          ) in predicted.stderr
  assert mismatched.returncode == 1 and "Traceback" not in mismatched.stderr, mismatched.stderr
  assert "Pass the run's values: --config.model.width=8\n" in mismatched.stderr
