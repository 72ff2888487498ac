"""Readers of the real datasets: right images and train ids, on real fixtures and faithful files.

Real samples (Cityscapes, KITTI Road, VOC) come from the shared fixtures
(tests/needs.py); GTA5, SYNTHIA and NTHU cross-city files are written here in
their exact formats (palette PNGs, 16-bit multi-channel PNGs, the NTHU layout). The
expected train ids are checked against the published mappings written out
below as UDA-REFERENCE.md section 3 gives them, not against segjax's tables.
"""

import json
import os

import cv2
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import recipes
from segjax import data
from segjax.data import files, labels, pipeline, readers

import needs  # pylint: disable=wrong-import-order


# UDA-REFERENCE.md 3a / 3d (GTA5 id_to_trainid) and 3e (DAFormer/BDL SYNTHIA mapping).
ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SYNTHIA_TO_TRAINID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
                      10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def _map(ids: np.ndarray, mapping: dict) -> np.ndarray:
  out = np.full(ids.shape, 255, np.uint8)
  for key, value in mapping.items():
    out[ids == key] = value
  return out


def _source(name, root, split, **fields):
  return data.build_source(recipes.real_dataset(name, str(root), split, **fields), "data.source")


def _png(path, array, mode=None, palette=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
  if palette is not None:
    image.putpalette(palette)
  image.save(path)


# ---- Label tables.

def test_cityscapes_table_matches_the_published_mapping_and_cityscapesscripts():
  assert labels.CITYSCAPES_ID_TO_TRAIN == ID_TO_TRAINID
  assert len(labels.CITYSCAPES_CLASSES) == 19 and labels.CITYSCAPES_CLASSES[18] == "bicycle"
  table = readers.CITYSCAPES_IDS.table
  assert [table[i] for i in range(34)] == [ID_TO_TRAINID.get(i, 255) for i in range(34)]
  cs_labels = needs.package("cityscapesscripts.helpers.labels",
                            "the official Cityscapes label table")
  for label in cs_labels.labels:
    if label.id < 0:
      continue
    mine = next(l for l in labels.CITYSCAPES_LABELS if l.id == label.id)
    assert (mine.name, mine.train_id, mine.color) == (label.name, label.trainId, label.color)


def test_synthia_table_and_evaluation_subsets():
  assert labels.SYNTHIA_TO_TRAIN == SYNTHIA_TO_TRAINID
  names = [labels.CITYSCAPES_CLASSES[c] for c in labels.SYNTHIA_16]
  assert len(names) == 16 and not {"terrain", "truck", "train"} & set(names)
  assert len(labels.SYNTHIA_13) == 13 and not {3, 4, 5} & set(labels.SYNTHIA_13)
  assert [labels.CITYSCAPES_CLASSES[c] for c in labels.CROSSCITY_13] == [
      "road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky",
      "person", "rider", "car", "bus", "motorcycle", "bicycle"]


def test_voc_colormap_is_the_standard_one():
  cmap = labels.voc_colormap()
  assert cmap[1].tolist() == [128, 0, 0] and cmap[15].tolist() == [192, 128, 128]
  assert cmap[255].tolist() == [224, 224, 192]


# ---- Real fixtures.

def test_cityscapes_fixture_labels_are_the_mapped_label_ids():
  root = needs.fixtures("cityscapes")
  source = _source("cityscapes", root, "train")
  assert len(source) == 3
  with open(needs.fixtures("lists/adaptsegnet/cityscapes_list/info.json"),
            encoding="utf-8") as f:
    label2train = dict(json.load(f)["label2train"])
  for index, (image_path, label_path) in enumerate(source.pairs):
    assert image_path.endswith("_leftImg8bit.png") and label_path.endswith("_gtFine_labelIds.png")
    record = source[index]
    ids = np.asarray(Image.open(label_path))
    np.testing.assert_array_equal(record["label"], _map(ids, label2train))
    np.testing.assert_array_equal(record["image"], np.asarray(Image.open(image_path).convert("RGB")))
    # cityscapesScripts' re-rendered labelTrainIds differ at a fraction of a percent of pixels.
    train_ids = np.asarray(Image.open(label_path.replace("labelIds", "labelTrainIds")))
    assert (record["label"] == train_ids).mean() > 0.99
  assert record["image"].shape == (1024, 2048, 3)


def test_cityscapes_cities_lists_resize_and_test_split(tmp_path):
  root = needs.fixtures("cityscapes")
  bochum = _source("cityscapes", root, "train", cities=("bochum",), resize=(256, 512))
  assert len(bochum) == 1 and "bochum" in bochum.pairs[0][0]
  record = bochum[0]
  assert record["image"].shape == (256, 512, 3) and record["label"].shape == (256, 512)
  full = _source("cityscapes", root, "train", cities=("bochum",), resize=(256, 512),
                 resize_labels=False)[0]
  assert full["image"].shape == (256, 512, 3) and full["label"].shape == (1024, 2048)
  with pytest.raises(files.DataError, match=r"cities \['hamburg'\] are not in"):
    _source("cityscapes", root, "train", cities=("hamburg",))
  listed = tmp_path / "train.txt"  # AdaptSegNet's list format, relative to leftImg8bit/train.
  listed.write_text("bochum/bochum_000000_000313_leftImg8bit.png\n"
                    "aachen/aachen_000000_000019_leftImg8bit.png\n")
  source = _source("cityscapes", root, "train", list_file=str(listed))
  assert [os.path.basename(p[0])[:6] for p in source.pairs] == ["bochum", "aachen"]
  listed.write_text("hamburg/hamburg_000000_000042_leftImg8bit.png\n")
  with pytest.raises(files.DataError, match="hamburg_000000_000042_leftImg8bit.png"):
    _source("cityscapes", root, "train", list_file=str(listed))


def test_kitti_road_fixture_follows_the_devkit():
  source = _source("kitti_road", needs.fixtures("kitti_road"), "trainval")
  image_path, label_path = source.pairs[0]
  assert label_path.endswith("gt_image_2/um_road_000000.png")
  record = source[0]
  gt = np.asarray(Image.open(label_path).convert("RGB"))
  road, valid = gt[..., 2] > 0, gt[..., 0] > 0  # The devkit's BGR channels 0 and 2.
  np.testing.assert_array_equal(record["label"] == 1, road & valid)
  np.testing.assert_array_equal(record["label"] == 0, valid & ~road)
  np.testing.assert_array_equal(record["label"] == 255, ~valid)
  assert road.any() and (~valid).any() and (valid & ~road).any()
  assert record["image"].shape == (375, 1242, 3)
  assert len(_source("kitti_road", needs.fixtures("kitti_road/data_road"),
                     "testing")) == 1


def test_voc_fixture_reads_palette_indices_with_255_kept(tmp_path):
  root = needs.fixtures("voc")
  source = _source("voc", root, "all")
  assert len(source) == 2
  for index, (image_path, label_path) in enumerate(source.pairs):
    record = source[index]
    indices = np.asarray(Image.open(label_path))
    assert Image.open(label_path).mode == "P"
    np.testing.assert_array_equal(record["label"], indices)
    assert 255 in indices and record["image"].shape[:2] == indices.shape
  with pytest.raises(files.DataError, match="ImageSets/Segmentation/train.txt does not exist"):
    _source("voc", root, "train")
  ids = tmp_path / "seg11valid.txt"
  ids.write_text("2011_000006\n")
  assert len(_source("voc", root, "val", list_file=str(ids))) == 1


# ---- Files written in the exact formats.

def _cityscapes_palette() -> list[int]:
  palette = np.zeros((256, 3), np.uint8)
  for label in labels.CITYSCAPES_LABELS:
    palette[label.id] = label.color
  return palette.reshape(-1).tolist()


def _gta5_tree(root, sizes):
  rng = np.random.default_rng(0)
  for i, (image_size, label_size) in enumerate(sizes, start=1):
    image = rng.integers(0, 256, (*image_size, 3), dtype=np.uint8)
    ids = rng.integers(0, 34, label_size, dtype=np.uint8)
    _png(os.path.join(root, "images", f"{i:05d}.png"), image)
    _png(os.path.join(root, "labels", f"{i:05d}.png"), ids, "P", _cityscapes_palette())


def test_gta5_palette_labels_are_label_ids(tmp_path):
  _gta5_tree(tmp_path, [((20, 30), (20, 30)), ((20, 30), (20, 30))])
  source = _source("gta5", tmp_path, "all")
  assert [os.path.basename(p[0]) for p in source.pairs] == ["00001.png", "00002.png"]
  label_path = source.pairs[1][1]
  assert Image.open(label_path).mode == "P"
  ids = np.asarray(Image.open(label_path))  # The palette indices, not the colours.
  np.testing.assert_array_equal(source[1]["label"], _map(ids, ID_TO_TRAINID))
  listed = tmp_path / "train.txt"
  listed.write_text("00002.png\n")
  assert len(_source("gta5", tmp_path, "train", list_file=str(listed))) == 1


def test_gta5_size_mismatch_policies(tmp_path):
  _gta5_tree(tmp_path, [((20, 30), (20, 30)), ((20, 30), (22, 31)), ((20, 30), (20, 30))])
  resized = _source("gta5", tmp_path, "all")  # The recipe default for GTA5: resize, nearest.
  assert resized.on_size_mismatch == "resize" and resized[1]["label"].shape == (20, 30)
  failing = _source("gta5", tmp_path, "all", on_size_mismatch="fail")
  with pytest.raises(files.DataError, match=r"labels/00002.png is 31x22 but its image .* 30x20"):
    failing[1]  # pylint: disable=pointless-statement
  skipping = _source("gta5", tmp_path, "all", on_size_mismatch="skip")
  np.testing.assert_array_equal(skipping[1]["image"], skipping[2]["image"])
  assert skipping.skipped == 1


def test_synthia_16bit_labels_read_the_class_channel(tmp_path):
  rng = np.random.default_rng(1)
  classes = rng.integers(0, 23, (12, 16)).astype(np.uint16)
  instances = rng.integers(0, 4000, (12, 16)).astype(np.uint16)
  rgb16 = np.stack([classes, instances, np.zeros_like(classes)], -1)
  os.makedirs(tmp_path / "GT" / "LABELS")
  cv2.imwrite(str(tmp_path / "GT" / "LABELS" / "0000000.png"), rgb16[..., ::-1])  # OpenCV: BGR.
  _png(str(tmp_path / "RGB" / "0000000.png"), rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
  label_path = str(tmp_path / "GT" / "LABELS" / "0000000.png")
  assert Image.open(label_path).mode == "RGB"  # What Pillow would read: 8 bits, not the ids.
  source = _source("synthia", tmp_path, "all")
  np.testing.assert_array_equal(source[0]["label"], _map(classes, SYNTHIA_TO_TRAINID))
  listed = tmp_path / "train.txt"  # BDL's list format.
  listed.write_text("RGB/0000000.png\n")
  assert len(_source("synthia", tmp_path, "train", list_file=str(listed))) == 1
  assert data.dataset_info(recipes.real_dataset("synthia", "x", "all"), "f").eval_subsets == (
      ("miou16", labels.SYNTHIA_16), ("miou13", labels.SYNTHIA_13))


def test_crosscity_layout_and_13_classes(tmp_path):
  rng = np.random.default_rng(2)
  ids = rng.integers(0, 34, (10, 14), dtype=np.uint8)
  _png(str(tmp_path / "Rome" / "Images" / "Test" / "pano_00001_0_0.png"),
       rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
  _png(str(tmp_path / "Rome" / "Labels" / "Test" / "pano_00001_0_0_eval.png"), ids)
  _png(str(tmp_path / "Rome" / "Images" / "Train" / "pano_00002_0_0.png"),
       rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
  test = _source("crosscity", tmp_path, "test", city="Rome")
  thirteen = {k: v for k, v in ID_TO_TRAINID.items() if v in labels.CROSSCITY_13}
  np.testing.assert_array_equal(test[0]["label"], _map(ids, thirteen))
  train = _source("crosscity", tmp_path, "train", city="Rome")
  assert not train.labelled and set(train[0]) == {"image"}
  with pytest.raises(files.DataError, match="city 'Paris'"):
    _source("crosscity", tmp_path, "test", city="Paris")


def test_tfds_prepared_dataset_is_read_with_random_access(tmp_path):
  tfds = needs.package("tensorflow_datasets", "a dependency of segjax")
  import io  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (3, 8, 12, 3), dtype=np.uint8)
  ids = rng.integers(0, 34, (3, 8, 12, 1), dtype=np.uint8)

  def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze()).save(buffer, format="PNG")
    return buffer.getvalue()

  class TinyCityscapes(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image_left": tfds.features.Image(shape=(8, 12, 3)),
          "segmentation_label": tfds.features.Image(shape=(8, 12, 1), use_colormap=False)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {"image_left": png_bytes(images[i]), "segmentation_label": png_bytes(ids[i])}

  TinyCityscapes(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = recipes.real_dataset("tfds", "", "validation", tfds_name="tiny_cityscapes",
                                data_dir=str(tmp_path))
  source = data.build_source(config, "data.eval")
  assert len(source) == 3
  records = sorted((source[i] for i in range(3)), key=lambda r: r["image"].tobytes())
  expected = sorted(range(3), key=lambda i: images[i].tobytes())
  for record, i in zip(records, expected):
    np.testing.assert_array_equal(record["image"], images[i])
    np.testing.assert_array_equal(record["label"], _map(ids[i, ..., 0], ID_TO_TRAINID))
  # Resized as the file datasets are: to `resize`, or within it keeping the ratio (12x8 -> 6x4).
  for keep_ratio, size in ((False, (6, 6)), (True, (4, 6))):
    config.update(resize=(6, 6), keep_ratio=keep_ratio)
    record, native = data.build_source(config, "data.eval")[0], source[0]
    assert record["image"].shape == (*size, 3) and record["label"].shape == size
    np.testing.assert_array_equal(record["label"],
                                  files.resize_array(native["label"], size, Image.NEAREST))


# ---- Bad input.

def _cityscapes_tree(root, n=3, size=(16, 32)):
  rng = np.random.default_rng(4)
  for i in range(n):
    stem = f"city_{i:06d}_000019"
    _png(os.path.join(root, "leftImg8bit", "train", "city", f"{stem}_leftImg8bit.png"),
         rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    _png(os.path.join(root, "gtFine", "train", "city", f"{stem}_gtFine_labelIds.png"),
         rng.integers(0, 34, size, dtype=np.uint8))
  return [os.path.join(root, "leftImg8bit", "train", "city", f"city_{i:06d}_000019_leftImg8bit.png")
          for i in range(n)]


def test_start_up_errors_name_the_root_split_and_missing_files(tmp_path):
  with pytest.raises(files.DataError, match=f"data.source: cityscapes: the root {tmp_path}/nope"):
    _source("cityscapes", tmp_path / "nope", "train")
  with pytest.raises(files.DataError, match="leftImg8bit/val is not a directory"):
    _cityscapes_tree(tmp_path, 1)
    _source("cityscapes", tmp_path, "val")
  os.makedirs(tmp_path / "leftImg8bit" / "test")
  with pytest.raises(files.DataError, match="no examples found"):
    _source("cityscapes", tmp_path, "test")
  os.remove(tmp_path / "gtFine" / "train" / "city" / "city_000000_000019_gtFine_labelIds.png")
  with pytest.raises(files.DataError, match="(?s)1 file.* do not exist.*city_000000_000019_gtFine"):
    _source("cityscapes", tmp_path, "train")
  with pytest.raises(files.DataError, match="no root given"):
    data.build_source(ml_collections.ConfigDict({"name": "gta5", "root": "", "split": "all"}),
                      "data.source")


def test_truncated_images_and_bad_labels_fail_or_are_skipped_and_counted(tmp_path):
  images = _cityscapes_tree(tmp_path, 3)
  with open(images[1], "rb") as f:
    content = f.read()
  with open(images[1], "wb") as f:
    f.write(content[:len(content) // 2])
  failing = _source("cityscapes", tmp_path, "train")
  failing[0]  # pylint: disable=pointless-statement
  with pytest.raises(files.DataError, match=f"Cannot read the image {images[1]}"):
    failing[1]  # pylint: disable=pointless-statement
  skipping = _source("cityscapes", tmp_path, "train", on_error="skip")
  np.testing.assert_array_equal(skipping[1]["label"], skipping[2]["label"])
  assert skipping.skipped == 1
  label = images[2].replace("leftImg8bit", "gtFine").replace("gtFine.png", "gtFine_labelIds.png")
  _png(label, np.full((16, 32), 200, np.uint8))
  with pytest.raises(files.DataError, match=r"holds ids \[200\] outside the mapping; expected "
                                            "Cityscapes label ids 0-33"):
    failing[2]  # pylint: disable=pointless-statement
  _png(label, np.zeros((16, 32, 3), np.uint8))  # A colour image where ids are expected.
  with pytest.raises(files.DataError, match="is a RGB image; expected a single-channel PNG"):
    failing[2]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match="on_error='ignore'"):
    _source("cityscapes", tmp_path, "train", on_error="ignore")


# ---- Into the Grain pipeline.

def test_real_data_feeds_training_and_padded_evaluation():
  config = recipes.base("compact")
  root = needs.fixtures("cityscapes")
  config.data.source = recipes.real_dataset("cityscapes", root, "train", resize=(64, 128))
  config.data.target = recipes.real_dataset("cityscapes", root, "val", resize=(64, 128))
  config.data.crop_size = (48, 96)
  config.batch_size = 2
  batches = pipeline.train_batches(config, with_target=True, process_index=0, process_count=1)
  batch = batches[0]
  assert batch["source"]["image"].shape == (2, 48, 96, 3)
  assert batch["source"]["label"].shape == (2, 48, 96) and "label" not in batch["target"]
  assert set(np.unique(batch["source"]["label"])) <= set(range(19)) | {255}
  config.data.eval = recipes.real_dataset("voc", needs.fixtures("voc"), "all",
                                          pad_to=(500, 500))
  config.eval_batch_size = 4
  eval_ds, length = pipeline.eval_dataset(config, process_index=0, process_count=1)
  assert length == 2
  batch = eval_ds[0]
  assert batch["image"].shape == (4, 500, 500, 3) and batch["label"].shape == (4, 500, 500)
  assert (batch["label"][2:] == 255).all() and (batch["label"][0, -1] == 255).all()
