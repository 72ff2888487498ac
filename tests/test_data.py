"""Built-in street scenes, per-record augmentation and the Grain pipelines."""

import logging

import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from segjax.data import augment, files, pipeline, synthetic


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for domain in x:
      for key in x[domain]:
        np.testing.assert_array_equal(x[domain][key], y[domain][key])


def test_scenes_are_deterministic_and_domains_share_labels_not_looks():
  image, label = synthetic.generate("source", "train", 3, 64, 128)
  again, label_again = synthetic.generate("source", "train", 3, 64, 128)
  np.testing.assert_array_equal(image, again)
  np.testing.assert_array_equal(label, label_again)
  assert image.shape == (64, 128, 3) and image.dtype == np.uint8
  assert label.shape == (64, 128) and label.max() < synthetic.NUM_CLASSES
  other, _ = synthetic.generate("source", "val", 3, 64, 128)
  assert not np.array_equal(image, other)
  # The same layout rendered in the two domains: same labels, different pixels.
  rng = np.random.default_rng(0)
  layout = synthetic.sample_layout(rng, 64, 128)
  source = synthetic.render(layout, "source", np.random.default_rng(1))
  target = synthetic.render(layout, "target", np.random.default_rng(1))
  assert np.abs(source.astype(int) - target.astype(int)).mean() > 20


def test_scene_arguments_are_checked_with_clear_errors():
  with pytest.raises(ValueError, match="domain"):
    synthetic.generate("night", "train", 0, 64, 128)
  with pytest.raises(ValueError, match="height"):
    synthetic.StreetScenes("source", "train", num_examples=4, height=0)
  with pytest.raises(IndexError):
    synthetic.StreetScenes("source", "train", num_examples=4, height=32, width=64)[4]


def test_augment_is_per_record_deterministic_and_keeps_pixels_aligned_with_labels():
  label = np.tile(np.arange(8, dtype=np.uint8).repeat(8), (32, 1))          # 32x64 columns.
  image = np.stack([label * 30, label, np.zeros_like(label)], -1).astype(np.uint8)
  aug = augment.TrainAugment(crop_size=(24, 40), scale_range=(1.0, 1.0), flip=True)
  outs = [aug.random_map({"image": image, "label": label}, np.random.default_rng(s))
          for s in range(6)]
  for out in outs:
    assert out["image"].shape == (24, 40, 3) and out["label"].shape == (24, 40)
    np.testing.assert_array_equal(out["image"][..., 0], out["label"] * 30)
  flipped = [np.all(np.diff(o["label"][0].astype(int)) <= 0) for o in outs]
  assert any(flipped) and not all(flipped)
  again = aug.random_map({"image": image, "label": label}, np.random.default_rng(3))
  np.testing.assert_array_equal(again["image"], outs[3]["image"])


def test_augment_pads_with_ignore_when_scaled_below_the_crop():
  aug = augment.TrainAugment(crop_size=(32, 64), scale_range=(0.5, 0.5), flip=False)
  out = aug.random_map({"image": np.full((32, 64, 3), 9, np.uint8),
                        "label": np.zeros((32, 64), np.uint8)}, np.random.default_rng(0))
  assert (out["label"] == 255).sum() == 32 * 64 - 16 * 32
  assert np.all(out["image"][out["label"] == 255] == 0)


def test_pseudo_margins_are_the_images_margins_cropped_scaled_and_flipped_with_it():
  """HRDA's pseudo-label crop v2: the valid map is 0 on the image's margins (top, bottom, left,
  right), and follows the image through scaling, cropping and flipping, so a crop loses margins
  only where it reaches the image's border."""
  rows, cols = np.meshgrid(np.arange(40), np.arange(80), indexing="ij")
  image = np.stack([rows * 6, cols * 3, np.zeros_like(rows)], -1).astype(np.uint8)
  margins = (3, 10, 4, 5)
  expected = ((rows >= 3) & (rows < 30) & (cols >= 4) & (cols < 75)).astype(np.uint8)
  whole = augment.TrainAugment(crop_size=(40, 80), flip=False, pseudo_margins=margins)
  np.testing.assert_array_equal(
      whole.random_map({"image": image}, np.random.default_rng(0))["pseudo_valid"], expected)
  aug = augment.TrainAugment(crop_size=(24, 40), flip=True, pseudo_margins=margins)
  seen_flip = set()
  for seed in range(12):
    out = aug.random_map({"image": image}, np.random.default_rng(seed))
    # Each crop pixel's source row and column, read back from the image's first two channels.
    src_rows, src_cols = out["image"][..., 0] // 6, out["image"][..., 1] // 3
    np.testing.assert_array_equal(out["pseudo_valid"], expected[src_rows, src_cols])
    seen_flip.add(bool(src_cols[0, 0] > src_cols[0, -1]))
  assert seen_flip == {False, True}
  # Scaled by 2: the margins scale with the image.
  scaled = augment.TrainAugment(crop_size=(80, 160), scale_range=(2.0, 2.0), flip=False,
                                pseudo_margins=margins)
  valid = scaled.random_map({"image": image}, np.random.default_rng(0))["pseudo_valid"]
  np.testing.assert_array_equal(valid, expected.repeat(2, 0).repeat(2, 1))


def test_the_target_stream_carries_the_valid_map_and_bad_margins_name_the_field():
  config = test_config.get_config()
  config.data.target.pseudo_margins = (2, 6, 3, 3)
  config.data.augment.scale_range = (1.0, 1.0)  # Crops of the whole image: all four margins.
  batch = next(iter(pipeline.train_dataset(config, with_target=True, process_index=0,
                                           process_count=1)))
  assert set(batch["target"]) == {"image", "pseudo_valid"} and "pseudo_valid" not in batch["source"]
  assert batch["target"]["pseudo_valid"].shape == (8, 32, 64)
  assert batch["target"]["pseudo_valid"].sum() == 8 * (32 - 8) * (64 - 6)
  for bad in ((2, 6, 3), (2, 6, 3, -1), (2.0, 6, 3, 3)):
    config.data.target.pseudo_margins = bad
    with pytest.raises(ValueError, match=r"data.target.pseudo_margins must be \(\) or \(top"):
      pipeline.train_dataset(config, with_target=True, process_index=0, process_count=1)


def test_target_stream_has_no_labels_and_domains_advance_in_lockstep():
  config = test_config.get_config()
  batch = next(iter(pipeline.train_dataset(config, with_target=True, process_index=0,
                                           process_count=1)))
  assert set(batch) == {"source", "target"}
  assert set(batch["target"]) == {"image"}
  assert batch["source"]["image"].shape == (8, 32, 64, 3)
  assert batch["source"]["label"].shape == (8, 32, 64)


def test_no_target_crop_depends_on_the_target_labels(monkeypatch):
  """With DAFormer's cat_max_ratio, source crops are redrawn by their labels; the target's
  labels are dropped before the augmentation reads them, so its crops are the same whatever
  the labels say (here: one class everywhere, which a redraw by labels could never pass)."""
  config = test_config.get_config()
  config.data.augment.cat_max_ratio = 0.75
  get = lambda: _take(iter(pipeline.train_dataset(config, with_target=True, process_index=0,
                                                  process_count=1)), 3)
  want = get()
  build = pipeline.data.build_source

  def one_class_target(sub, field, **kw):
    source = build(sub, field, **kw)
    if field != "data.target":
      return source
    relabel = lambda record: dict(record, label=np.zeros_like(record["label"]))
    return [relabel(source[i]) for i in range(len(source))]

  monkeypatch.setattr(pipeline.data, "build_source", one_class_target)
  got = get()
  _assert_batches_equal(got, want)
  # The source's crops do follow its labels: the same relabelling of the source changes them.
  monkeypatch.setattr(pipeline.data, "build_source", lambda sub, field, **kw: [
      dict(r, label=np.zeros_like(r["label"])) for r in build(sub, field, **kw)]
      if field == "data.source" else build(sub, field, **kw))
  relabelled = get()
  assert any(not np.array_equal(a["source"]["image"], b["source"]["image"])
             for a, b in zip(relabelled, want))


def test_each_domain_can_have_its_own_crop_and_bad_crops_name_the_field():
  config = test_config.get_config()
  config.data.source.crop_size = (24, 40)
  batch = next(iter(pipeline.train_dataset(config, with_target=True, process_index=0,
                                           process_count=1)))
  assert batch["source"]["image"].shape == (8, 24, 40, 3)
  assert batch["source"]["label"].shape == (8, 24, 40)
  assert batch["target"]["image"].shape == (8, 32, 64, 3)  # data.crop_size.
  config.data.target.crop_size = (32,)
  with pytest.raises(ValueError, match=r"data.target.crop_size must be \(height, width\)"):
    pipeline.train_batches(config, with_target=True, process_index=0, process_count=1)


def test_processes_read_their_slice_of_the_same_global_batches():
  config = test_config.get_config()
  whole = _take(iter(pipeline.train_dataset(config, with_target=True, process_index=0,
                                            process_count=1)), 3)
  halves = [_take(iter(pipeline.train_dataset(config, with_target=True, process_index=p,
                                              process_count=2)), 3) for p in range(2)]
  for step in range(3):
    for domain in whole[step]:
      for key in whole[step][domain]:
        np.testing.assert_array_equal(
            np.concatenate([halves[0][step][domain][key], halves[1][step][domain][key]]),
            whole[step][domain][key])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_resumes_the_exact_stream(num_workers):
  """Worker processes read the in-process stream (the reference), and resume it exactly."""
  config = test_config.get_config()

  def make(workers=num_workers):
    config.data.num_workers = workers
    return iter(pipeline.train_dataset(config, with_target=True, process_index=0,
                                       process_count=1))
  reference = _take(make(0), 5)
  first = make()
  _take(first, 2)
  state = first.get_state()
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), reference[2:])


def test_eval_split_is_padded_with_ignore_only_records():
  config = test_config.get_config()
  config.data.eval.num_examples = 11
  ds, length = pipeline.eval_dataset(config, process_index=0, process_count=1)
  batches = list(ds)
  assert length == 11 and len(batches) == 2
  labels = np.concatenate([b["label"] for b in batches])
  assert np.all(labels[11:] == 255) and np.all(labels[:11] != 255)


def test_keep_ratio_resizes_within_the_bound_as_mmseg(tmp_path):
  """mmseg's Resize((1280, 720), keep_ratio=True), mmcv.rescale_size: GTA5's 1914x1052 frame
  becomes 1280x704 (scale min(1280 / 1914, 720 / 1052)), labels with it; the cache tells the
  two resizes apart."""
  image, label = tmp_path / "00001.png", tmp_path / "00001_label.png"
  Image.fromarray(np.zeros((1052, 1914, 3), np.uint8)).save(image)
  Image.fromarray(np.zeros((1052, 1914), np.uint8)).save(label)
  fmt = files.LabelFormat("ids", "class ids", np.arange(256, dtype=np.uint8), np.ones(256, bool))
  kept = files.FileSource("gta5", [(str(image), str(label))], fmt, resize=(720, 1280),
                          keep_ratio=True)
  record = kept[0]
  assert record["image"].shape == (704, 1280, 3) and record["label"].shape == (704, 1280)
  assert kept.working_size((1052, 1914)) == (704, 1280)
  assert kept.working_size((1440, 2560)) == (720, 1280)  # Already in the ratio: the bound.
  # VFM-UDA's short side at 1440 (configs/vfm_uda.py's bound (1440, 10000)): 2620x1440.
  assert files.FileSource("gta5", [], fmt, resize=(1440, 10_000),
                          keep_ratio=True).working_size((1052, 1914)) == (1440, 2620)
  exact = files.FileSource("gta5", [(str(image), str(label))], fmt, resize=(720, 1280))
  assert exact[0]["image"].shape == (720, 1280, 3)
  assert files.cache_key(kept, {}) != files.cache_key(exact, {})


def test_a_skipped_file_is_warned_about_once_however_often_it_is_drawn(tmp_path, caplog):
  good = [str(tmp_path / f"good{i}.png") for i in range(2)]
  for i, path in enumerate(good):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path)
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG truncated")
  source = files.FileSource("toy", [(good[0], None), (str(bad), None), (good[1], None)], None,
                            on_error="skip")
  with caplog.at_level(logging.WARNING):
    drawn = [source[index % 3] for index in range(30)]  # The bad file drawn ten times.
  np.testing.assert_array_equal(drawn[1]["image"], drawn[2]["image"])  # Replaced by the next.
  assert source.skipped == 1
  warnings = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
  assert len(warnings) == 1 and "toy: skipping example 1 from now on" in warnings[0], warnings
