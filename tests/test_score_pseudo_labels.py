"""segjax.tools.score_pseudo_labels: pseudo labels against the target's own labels."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import e2e
from configs import test as test_config
from segjax import data
from segjax.tools import score_pseudo_labels

NAMES = ["a", "b", "c"]


def test_confusion_and_scores_on_a_hand_made_label():
  truth = np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8)
  pseudo = np.array([[0, 1, 1, 255], [0, 255, 2, 0]], np.uint8)
  counts = score_pseudo_labels.confusion(truth, pseudo, 3)
  np.testing.assert_array_equal(counts, [[1, 1, 0, 0],    # true 0: one right, one as 1.
                                         [0, 1, 0, 1],    # true 1: one right, one ignored.
                                         [1, 0, 0, 1]])   # true 2: one as 0, one ignored.
  record = score_pseudo_labels.scores(counts, NAMES)
  assert record["pixels"] == 6 and record["coverage"] == pytest.approx(4 / 6)
  assert record["accuracy"] == pytest.approx(2 / 4)
  a, b, c = (record["classes"][name] for name in NAMES)
  assert (a["labelled"], a["precision"], a["recall"]) == pytest.approx((2 / 6, 1 / 2, 1 / 2))
  assert (b["labelled"], b["precision"], b["recall"]) == pytest.approx((2 / 6, 1 / 2, 1 / 2))
  assert (c["labelled"], c["precision"], c["recall"]) == (0.0, None, 0.0)
  assert a["mistaken"] == {"class": "b", "share": 0.5} and b["mistaken"] is None
  assert c["mistaken"] == {"class": "a", "share": 0.5}
  assert record["confusion"] == counts.tolist()
  with pytest.raises(data.DataError, match="a true label above 2"):
    score_pseudo_labels.confusion(np.array([[3]], np.uint8), np.array([[0]], np.uint8), 3)


def _folder(tmp_path, corrupt):
  """A pseudo-label folder of the test config's 4 target images: their true labels, with
  `corrupt(index, label)` applied, and a thresholds.json naming that target set."""
  target = test_config.get_config().data.target
  target.num_examples = 4
  source = data.build_source(target, "data.target")
  class_names = list(data.dataset_info(target, "data.target").class_names)
  folder = tmp_path / "labels"
  folder.mkdir()
  truths = []
  for i in range(4):
    truth = source[i]["label"]
    truths.append(truth)
    Image.fromarray(corrupt(i, truth.copy())).save(folder / f"{i:06d}.png")
  report = {"classes": class_names, "num_images": 4, "target": target.to_dict(),
            "checkpoint": {"workdir": "w", "step": 1}}
  (folder / "thresholds.json").write_text(json.dumps(report))
  return str(folder), truths, class_names


def test_scores_a_folder_against_its_target_set(tmp_path):
  def corrupt(i, label):
    if i == 0:
      label[:] = 255  # Nothing labelled.
    if i == 1:
      label[label == 0] = 1  # Every road pixel called sidewalk.
    return label
  folder, truths, names = _folder(tmp_path, corrupt)
  record = score_pseudo_labels.score(folder, progress=lambda x, **_: x)
  kept = np.concatenate([t.ravel() for t in truths[1:]])
  kept = kept[kept != 255]
  roads = np.sum(truths[1] == 0)
  assert record["num_images"] == 4 and record["checkpoint"]["step"] == 1
  assert record["coverage"] == pytest.approx(
      kept.size / sum(np.sum(t != 255) for t in truths))
  assert record["accuracy"] == pytest.approx(1 - roads / kept.size)
  road = record["classes"][names[0]]
  assert road["precision"] == 1.0  # The road labels left (images 2, 3) are right.
  assert road["recall"] == pytest.approx(
      np.sum(np.concatenate([t.ravel() for t in truths[2:]]) == 0)
      / sum(np.sum(t == 0) for t in truths))
  assert record["classes"][names[1]]["precision"] < 1.0
  assert record["classes"][names[0]]["mistaken"] == {"class": names[1],
                                                     "share": pytest.approx(roads / sum(
                                                         np.sum(t == 0) for t in truths))}


def test_the_command_writes_json_and_refuses_an_incomplete_folder(tmp_path, cache_dir):
  folder, _, _ = _folder(tmp_path, lambda i, label: label)
  out = str(tmp_path / "scores.json")
  command = [sys.executable, "-m", "segjax.tools.score_pseudo_labels", f"--labels={folder}",
             f"--out={out}"]
  proc = subprocess.run(command, cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "coverage 100.0% of the pixels, accuracy 100.0%" in proc.stdout
  with open(out, encoding="utf-8") as f:
    assert json.load(f)["accuracy"] == 1.0
  os.remove(os.path.join(folder, "thresholds.json"))
  proc = subprocess.run(command, cwd=e2e.REPO_ROOT, env=e2e.env(1, cache_dir),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "has no thresholds.json" in proc.stderr
