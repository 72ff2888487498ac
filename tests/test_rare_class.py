"""Rare-class sampling: the class probabilities, the draws, the crop retries, the resumable
statistics, and a stream that resumes exactly."""

import json

import numpy as np
import pytest

from configs import test as test_config
from segjax import errors
from segjax.data import augment, pipeline, rare_class


def test_class_probabilities_are_the_softmax_of_one_minus_frequency_over_temperature():
  """DAFormer's get_rcs_class_probs on a known label set: 3 images, 4 classes."""
  counts = np.array([[6000, 0, 4000, 0],
                     [5000, 3500, 0, 0],
                     [9000, 2500, 1000, 0]])  # Class 3 never occurs.
  sampler = rare_class.Sampler(counts, ["a", "b", "c", "d"], temperature=0.01, min_pixels=3000)
  freq = np.array([20000, 6000, 5000]) / 31000
  expected = np.exp((1 - freq) / 0.01) / np.exp((1 - freq) / 0.01).sum()
  np.testing.assert_array_equal(sampler.classes, [0, 1, 2])
  np.testing.assert_allclose(sampler.probs, expected, rtol=1e-12)
  assert sampler.probs[2] > 0.5 > sampler.probs[0]  # The rarest class dominates at T = 0.01.
  # Images holding more than min_pixels of each class.
  assert {c: list(v) for c, v in sampler.images.items()} == {0: [0, 1, 2], 1: [1], 2: [0]}
  # Drawn in those proportions, each from its images.
  rng = np.random.default_rng(0)
  draws = [sampler.draw(rng) for _ in range(20000)]
  shares = np.bincount([c for _, c in draws], minlength=3) / len(draws)
  np.testing.assert_allclose(shares, expected, atol=0.01)
  assert all(image in sampler.images[c] for image, c in draws)


def test_a_class_without_an_image_over_min_pixels_is_left_out_and_renormalised():
  counts = np.array([[5000, 100], [4000, 200]])
  sampler = rare_class.Sampler(counts, ["a", "b"], temperature=0.1, min_pixels=3000)
  np.testing.assert_array_equal(sampler.classes, [0])
  np.testing.assert_allclose(sampler.probs, [1.0])
  with pytest.raises(errors.ConfigError, match="no source image holds more than 9000 pixels"):
    rare_class.Sampler(counts, ["a", "b"], temperature=0.1, min_pixels=9000)


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
  """mmseg's RandomCrop(cat_max_ratio=0.75): a crop where one class holds 75% or more of the
  labelled pixels is redrawn (up to 10 times)."""
  label = np.zeros((40, 40), np.uint8)
  label[:, 30:] = 1  # Class 1 in the right quarter.
  image = np.zeros((40, 40, 3), np.uint8)
  aug = augment.TrainAugment(crop_size=(20, 20), flip=False, cat_max_ratio=0.75)
  plain = augment.TrainAugment(crop_size=(20, 20), flip=False)
  balanced = []
  for seed in range(50):
    out = aug.random_map({"image": image, "label": label}, np.random.default_rng(seed))
    share = np.bincount(out["label"].ravel(), minlength=2).max() / out["label"].size
    balanced.append(share < 0.75)
  plain_balanced = [np.bincount(plain.random_map({"image": image, "label": label},
                                                 np.random.default_rng(s))["label"].ravel(),
                                minlength=2).max() / 400 < 0.75 for s in range(50)]
  assert sum(balanced) > 45 and sum(plain_balanced) < 25


def _rcs_config(tmp_path):
  config = test_config.get_config()
  config.data.rcs.update(temperature=0.01, min_pixels=30, min_crop_ratio=0.5)
  return config


def test_statistics_continue_an_interrupted_computation_and_are_checked(tmp_path):
  config = _rcs_config(tmp_path)
  path = str(tmp_path / "rcs_stats.json")
  full = rare_class.compute(config.data.source, "data.source")
  assert len(full["counts"]) == config.data.source.num_examples == 24
  partial = dict(full, counts=full["counts"][:10])
  partial["counts"][0] = [-1] * len(partial["counts"][0])  # Marks a row kept from before.
  with open(path, "w", encoding="utf-8") as f:
    json.dump(partial, f)
  resumed = rare_class.compute(config.data.source, "data.source", path=path)
  assert resumed["counts"][0] == partial["counts"][0] and resumed["counts"][1:] == full["counts"][1:]
  assert rare_class.read(path, config.data.source, "data.source")["counts"] == resumed["counts"]
  # Counts of labels at another size select other images: an error, and no continuation.
  sized = config.data.source.copy_and_resolve_references()
  sized.resize, sized.keep_ratio = (32, 48), True
  with pytest.raises(errors.ConfigError, match=r"counts labels sized \{'resize': \[\], 'keep_ratio': "
                     r"False, 'resize_labels': True\}, not data.source's \{'resize': \[32, 48\], "
                     r"'keep_ratio': True"):
    rare_class.read(path, sized, "data.source")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(partial, f)
  assert rare_class.compute(sized, "data.source", path=path)["counts"][0] != partial["counts"][0]
  # A record written before the sizing was kept continues (a workdir's config fixes it).
  with open(path, "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in partial.items() if k != "sizing"}, f)
  assert rare_class.compute(config.data.source, "data.source", path=path)["counts"][0] == [-1] * 8
  config.data.source.num_examples = 30
  with pytest.raises(errors.ConfigError, match=r"counts 24 of 24 images; data.source has 30"):
    rare_class.read(path, config.data.source, "data.source")


def test_the_stream_draws_rare_classes_and_resumes_exactly(tmp_path):
  config = _rcs_config(tmp_path)
  sampler = pipeline.rare_class_sampler(config, str(tmp_path))
  assert (tmp_path / pipeline.RCS_STATS_FILE).exists()

  def make():
    batches = pipeline.train_batches(config, with_target=True, process_index=0,
                                     process_count=1, sampler=sampler)
    return iter(pipeline.stream(batches, 0))

  reference = [next(it) for it in [make()] for _ in range(4)]
  first = make()
  for _ in range(2):
    next(first)
  resumed = make()
  resumed.set_state(first.get_state())
  for want in reference[2:]:
    got = next(resumed)
    for domain in want:
      for key in want[domain]:
        np.testing.assert_array_equal(got[domain][key], want[domain][key])
  # The rarest classes are over-represented against the plain stream.
  plain = iter(pipeline.stream(pipeline.train_batches(config, with_target=True, process_index=0,
                                                      process_count=1), 0))
  rare = int(sampler.classes[np.argmax(sampler.probs)])
  pixels = lambda batches: sum(int(np.sum(b["source"]["label"] == rare)) for b in batches)
  assert pixels(reference) > 2 * pixels([next(plain) for _ in range(4)])


def test_rare_class_sampling_is_off_at_temperature_zero():
  assert pipeline.rare_class_sampler(test_config.get_config()) is None


def test_rcs_stats_command_writes_the_record_and_prints_the_probabilities(tmp_path):
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  import e2e  # pylint: disable=import-outside-toplevel
  out = tmp_path / "stats.json"
  proc = subprocess.run([sys.executable, "-m", "segjax.tools.rcs_stats", "--config=configs/test.py",
                         f"--out={out}", "--config.data.rcs.min_pixels=30"], cwd=e2e.REPO_ROOT,
                        env=e2e.env(1, str(tmp_path / "cache")), capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(out.read_text())
  assert len(record["counts"]) == 24 and record["class_names"][0] == "road"
  lines = proc.stdout.splitlines()
  assert "images with more than 30 pixels" in lines[0] and lines[-1] == f"Wrote {out}."
  probs = [float(line.split()[-1]) for line in lines[2:-1]]
  assert len(probs) == 8 and abs(sum(probs) - 1) < 1e-4
