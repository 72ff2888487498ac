"""The dataset tools: check_data, data_stats, cache_data, on real fixtures and small broken trees.

Broken trees are written here in the datasets' exact layouts and formats (32x64
PNGs); the real samples are read from the shared fixtures (tests/needs.py), never copied.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import app
from PIL import Image

from configs import default, recipes
from segjax import data
from segjax.data import files, labels, readers, synthetic
from segjax.tools import cache_data, check_data, data_cli, data_stats

import needs  # pylint: disable=wrong-import-order

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def no_progress(iterable, **_):
  return iterable


def _png(path, array: np.ndarray, mode: str | None = None, palette=None) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
  if palette is not None:
    image.putpalette(palette)
  image.save(path, format="PNG")


def _image(height=32, width=64, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _cityscapes_example(root, city: str, stem: str, label_ids: np.ndarray | None,
                        image: np.ndarray | None = None, split: str = "train"):
  """Writes {stem}_leftImg8bit.png (and its labelIds PNG, unless None); returns both paths."""
  image_path = os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png")
  label_path = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
  _png(image_path, _image() if image is None else image)
  if label_ids is not None:
    _png(label_path, label_ids.astype(np.uint8), "L")
  return image_path, label_path


def _broken_cityscapes(root) -> dict[str, str]:
  """Five 32x64 examples: one good, then one of each problem. Returns the file at fault."""
  ids = np.full((32, 64), 7, np.uint8)  # Road.
  _cityscapes_example(root, "bad", "bad_000000_000000", ids)
  _, missing = _cityscapes_example(root, "bad", "bad_000001_000000", None)
  truncated, _ = _cityscapes_example(root, "bad", "bad_000002_000000", ids)
  with open(truncated, "rb") as f:
    content = f.read()
  with open(truncated, "wb") as f:
    f.write(content[:len(content) // 2])
  outside = ids.copy()
  outside[3:5, 10:20] = 200
  _, bad_values = _cityscapes_example(root, "bad", "bad_000003_000000", outside)
  _, wrong_size = _cityscapes_example(root, "bad", "bad_000004_000000", ids[:16, :32])
  return dict(missing=missing, truncated=truncated, bad_values=bad_values,
              wrong_size=wrong_size)


def _gta5_tree(root, label_sizes) -> list[str]:
  """GTA5 frames 00001.png...: 32x64 images, palette PNG labels of the given (H, W)."""
  palette = [c for l in labels.CITYSCAPES_LABELS for c in l.color]
  paths = []
  for i, (height, width) in enumerate(label_sizes, start=1):
    _png(os.path.join(root, "images", f"{i:05d}.png"), _image(seed=i))
    ids = np.random.default_rng(i).choice([7, 8, 11, 21, 23, 26], (height, width))
    paths.append(os.path.join(root, "labels", f"{i:05d}.png"))
    _png(paths[-1], ids.astype(np.uint8), "P", palette)
  return paths


def _config(source=None, target=None, eval_=None):
  """configs/default.py with the given dataset sub-configs (built-in scenes elsewhere)."""
  config = default.get_config()
  for field, sub in (("source", source), ("target", target), ("eval", eval_)):
    if sub is not None:
      config.data[field] = sub
  return config


CONFIG_FILE = '''from configs import default, recipes


def get_config():
  config = default.get_config()
{assignments}
  return config
'''


def _config_file(tmp_path, **datasets) -> str:
  """A config file: data.<field> = recipes.real_dataset(*args) for each field=args given."""
  lines = [f"  config.data.{field} = recipes.real_dataset{tuple(args)!r}"
           for field, args in datasets.items()]
  path = tmp_path / "config.py"
  path.write_text(CONFIG_FILE.format(assignments="\n".join(lines)))
  return str(path)


def _run_tool(tool: str, *flags) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"segjax.tools.{tool}", *flags], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


# ---- The kinds of DataError that segjax.data.files raises.

def test_file_problems_raise_a_data_error_of_their_kind(tmp_path):
  broken = _broken_cityscapes(str(tmp_path))
  fmt = readers.CITYSCAPES_IDS
  with pytest.raises(files.MissingFile, match="does not exist"):
    files.read_label(broken["missing"], fmt)
  with pytest.raises(files.UnreadableFile, match="truncated"):
    files.read_image(broken["truncated"])
  with pytest.raises(files.BadLabelValues, match=r"ids \[200\] outside the mapping"):
    files.read_label(broken["bad_values"], fmt)
  _png(str(tmp_path / "colour.png"), _image())
  with pytest.raises(files.BadLabelFormat, match="RGB image"):
    files.read_label(str(tmp_path / "colour.png"), fmt)
  pairs = [(broken["truncated"], broken["missing"])]
  with pytest.raises(files.MissingFile, match="1 file"):
    files.check_pairs("cityscapes", pairs, "here")
  with files.missing_files_fail_on_load():
    files.check_pairs("cityscapes", pairs, "here")
  source = files.FileSource("cityscapes", [(broken["truncated"].replace("000002", "000004"),
                                            broken["wrong_size"])], fmt)
  with pytest.raises(files.SizeMismatch, match="32x16"):
    source.load(0)
  assert all(issubclass(cls, files.DataError) for cls, _ in check_data.PROBLEM_KINDS)


# ---- check_data.

def test_check_data_reports_every_bad_file_by_kind(tmp_path, capsys):
  root = str(tmp_path / "cityscapes")
  broken = _broken_cityscapes(root)
  config = _config(source=recipes.real_dataset("cityscapes", root, "train"),
                   eval_=recipes.real_dataset("cityscapes", root, "train", cities=("nowhere",)))
  assert check_data.check(config, progress=no_progress) == 1
  out = capsys.readouterr().out
  assert "5 image/label pairs listed: 1 read without problems, 0 with warnings, 4 failed." in out
  assert "image sizes: 64x32 (1)" in out
  expected = [("missing files", broken["missing"], "it does not exist"),
              ("unreadable or truncated files", broken["truncated"], "truncated"),
              ("label values outside the mapping", broken["bad_values"], "ids [200]"),
              ("label/image size mismatches", broken["wrong_size"], "is 32x16 but its image")]
  for kind, path, problem in expected:
    assert f"FAIL  {kind}: 1\n" in out
    line = next(l for l in out.splitlines() if path in l)
    assert problem in line, line
  # A start-up problem is reported, not raised; the built-in scenes are not checked.
  assert "cities ['nowhere'] are not in" in out
  assert "Summary: data.source FAILED, data.target built in, data.eval FAILED." in out


def test_check_data_size_mismatch_is_a_warning_where_labels_are_resized(tmp_path, capsys):
  root = str(tmp_path / "gta5")
  label_paths = _gta5_tree(root, [(32, 64), (16, 32), (32, 64)])
  gta5 = recipes.real_dataset("gta5", root, "all")
  assert gta5.on_size_mismatch == "resize"
  calls = []

  def counting(iterable, **kwargs):
    calls.append(kwargs["desc"])
    return iterable

  # The same files under two fields are read once.
  assert check_data.check(_config(source=gta5, target=gta5), progress=counting) == 0
  out = capsys.readouterr().out
  assert calls == ["data.source"]
  assert "3 image/label pairs listed: 2 read without problems, 1 with warnings, 0 failed." in out
  assert ("WARN  label/image size mismatches: 1 (on_size_mismatch='resize': these labels are "
          "resized to their images)") in out
  assert f"example 1: The label {label_paths[1]} is 32x16" in out
  assert "the same files as data.source, checked above." in out
  assert ("Summary: data.source ok (with warnings), data.target ok (with warnings), "
          "data.eval built in.") in out

  gta5.on_size_mismatch = "fail"
  assert check_data.check(_config(source=gta5), ["data.source"], progress=no_progress) == 1
  assert "FAIL  label/image size mismatches: 1" in capsys.readouterr().out


def test_check_data_passes_the_real_fixtures(capsys):
  config = _config(
      source=recipes.real_dataset("cityscapes", needs.fixtures("cityscapes"), "train"),
      target=recipes.real_dataset("kitti_road", needs.fixtures("kitti_road"), "trainval"),
      eval_=recipes.real_dataset("voc", needs.fixtures("voc"), "all"))
  assert check_data.check(config, progress=no_progress) == 0
  out = capsys.readouterr().out
  assert "3 image/label pairs listed: 3 read without problems" in out
  assert "image sizes: 2048x1024 (3)" in out and "image sizes: 1242x375 (1)" in out
  assert "2 image/label pairs listed: 2 read without problems" in out
  assert "Summary: data.source ok, data.target ok, data.eval ok." in out


def test_check_data_command_exit_status(tmp_path):
  root = str(tmp_path / "cityscapes")
  broken = _broken_cityscapes(root)
  config = _config_file(tmp_path, source=("cityscapes", root, "train"))
  proc = _run_tool("check_data", f"--config={config}", "--fields=data.source")
  assert proc.returncode == 1, proc.stderr
  assert all(path in proc.stdout for path in broken.values()), proc.stdout
  assert "Traceback" not in proc.stderr
  proc = _run_tool("check_data", f"--config={config}", "--fields=data.source,data.nope")
  assert proc.returncode == 2
  assert "--fields: 'data.nope' is not a field of the config" in proc.stderr


# ---- data_stats.

def test_data_stats_counts_match_a_hand_count(tmp_path):
  root = str(tmp_path / "cityscapes")
  road, car, sky, unlabelled, ego = 7, 26, 23, 0, 1  # Label ids; train ids 0, 13, 10.
  first = np.full((8, 16), road, np.uint8)
  first[:, 8:] = car
  second = np.full((8, 16), road, np.uint8)
  second[0] = unlabelled
  third = np.full((8, 16), sky, np.uint8)
  third[4:] = ego
  for i, ids in enumerate([first, second, third]):
    _cityscapes_example(root, "city", f"city_00000{i}_000000", ids, _image(8, 16, seed=i))
  config = _config(source=recipes.real_dataset("cityscapes", root, "train"))
  out = str(tmp_path / "stats")

  stats = data_stats.write_stats(config, "data.source", out, num_images=2,
                                 progress=no_progress)
  with open(os.path.join(out, "class_stats.json"), encoding="utf-8") as f:
    assert json.load(f) == stats
  assert stats["num_images"] == 3 and stats["num_skipped"] == 0
  assert stats["total_pixels"] == 3 * 128 and stats["ignored_pixels"] == 16 + 64
  by_name = {c["name"]: c for c in stats["classes"]}
  assert [c["name"] for c in stats["classes"]] == list(labels.CITYSCAPES_CLASSES)
  assert (by_name["road"]["pixels"], by_name["car"]["pixels"], by_name["sky"]["pixels"]) == (
      64 + 112, 64, 64)
  assert sum(c["pixels"] for c in stats["classes"]) == stats["labelled_pixels"] == 304
  assert by_name["road"]["fraction"] == pytest.approx(176 / 304)
  assert by_name["road"]["image_frequency"] == pytest.approx(2 / 3)
  assert by_name["car"]["image_frequency"] == by_name["sky"]["image_frequency"] == \
      pytest.approx(1 / 3)
  assert by_name["person"]["pixels"] == by_name["person"]["image_frequency"] == 0
  assert sorted(os.listdir(out)) == ["class_distribution.png", "class_stats.json", "samples.png"]
  with Image.open(os.path.join(out, "class_distribution.png")) as image:
    assert image.format == "PNG" and image.width > 600 and image.height > 300
  with Image.open(os.path.join(out, "samples.png")) as image:  # 2 rows of image | label.
    assert image.format == "PNG" and image.width > 400 and image.height > image.width / 2

  # Evenly spaced examples: the first and the last.
  assert data.evenly_spaced(10, 4) == [0, 3, 6, 9]
  assert data.evenly_spaced(3, 0) == data.evenly_spaced(3, 8) == [0, 1, 2]
  stats = data_stats.write_stats(config, "data.source", out, max_examples=2, num_images=0,
                                 progress=no_progress)
  assert stats["num_images"] == 2 and stats["ignored_pixels"] == 64
  assert [c["pixels"] for c in stats["classes"] if c["pixels"]] == [64, 64, 64]


def test_data_stats_command_on_the_built_in_scenes(tmp_path):
  out = tmp_path / "stats"
  proc = _run_tool("data_stats", "--config=configs/adapt.py", f"--out={out}",
                   "--max_examples=16", "--num_images=3")
  assert proc.returncode == 0, proc.stderr
  stats = json.loads((out / "class_stats.json").read_text())
  assert stats["num_images"] == 16 and stats["total_pixels"] == 16 * 64 * 128
  assert [c["name"] for c in stats["classes"]] == list(synthetic.CLASS_NAMES)
  assert stats["ignored_pixels"] == 0
  assert sum(c["pixels"] for c in stats["classes"]) == stats["total_pixels"]
  assert "road" in proc.stdout and f"Wrote {out / 'class_stats.json'}" in proc.stdout
  for name in ("class_distribution.png", "samples.png"):
    with Image.open(out / name) as image:
      assert image.width > 400 and image.height > 300


# ---- cache_data.

def _assert_same_records(cached, original, exact: bool) -> None:
  assert len(cached) == len(original)
  for i in range(len(original)):
    got, want = cached.load(i), original.load(i)
    np.testing.assert_array_equal(got["label"], want["label"])
    assert got["image"].shape == want["image"].shape
    difference = np.abs(got["image"].astype(int) - want["image"].astype(int))
    if exact:
      assert difference.max() == 0
    else:  # JPEG at quality 95.
      assert difference.mean() < 3.0, difference.mean()


def test_cache_data_builds_the_cache_that_runs_then_read(tmp_path, capsys):
  cache_dir = str(tmp_path / "cache")
  root = needs.fixtures("cityscapes")
  config = _config(
      source=recipes.real_dataset("cityscapes", root, "train", resize=(256, 512),
                                  cache_dir=cache_dir),
      eval_=recipes.real_dataset("cityscapes", root, "val", resize_labels=False,
                                 cache_dir=cache_dir, cache_format="png"))
  assert cache_data.cache(config, progress=no_progress) == 0
  out = capsys.readouterr().out
  assert "3 examples: 3 written, 0 already cached." in out
  assert "runs with this config now read 'cityscapes (cache)'." in out
  assert "== data.target: street_scenes" in out and "skipped: built in" in out
  for field, exact in (("data.source", False), ("data.eval", True)):
    sub = config.data[field.split(".")[1]]
    cached = data.build_source(sub, field)
    original = data.build_source(sub, field, use_cache=False)
    assert cached.name == "cityscapes (cache)" and original.name == "cityscapes"
    assert cached.pairs[0][0].startswith(cache_dir)
    _assert_same_records(cached, original, exact)
  summary = cache_data.cache_field(config.data.source, "data.source", no_progress)
  assert summary["already_cached"] == 3
  assert summary["cache_bytes"] < summary["original_bytes"] / 5  # 1024x512 JPEGs: small.
  assert summary["directory"] == data.cache_directory(config.data.source,
                                                      data.build_source(config.data.source,
                                                                        "data.source",
                                                                        use_cache=False))

  with pytest.raises(app.UsageError, match=r"--config\.data\.source\.cache_dir="):
    cache_data.cache(_config(source=recipes.real_dataset("cityscapes", root, "train")))


def test_cache_data_command_resizes_mismatched_gta5_labels(tmp_path):
  root = str(tmp_path / "gta5")
  _gta5_tree(root, [(32, 64), (16, 32)])
  config = _config_file(tmp_path, source=("gta5", root, "all"))
  proc = _run_tool("cache_data", f"--config={config}",
                   f"--config.data.source.cache_dir={tmp_path / 'cache'}",
                   "--config.data.source.cache_format=png")
  assert proc.returncode == 0, proc.stderr
  assert "2 examples: 2 written, 0 already cached." in proc.stdout
  assert "runs with this config now read 'gta5 (cache)'." in proc.stdout
  assert "== data.target: street_scenes" in proc.stdout
  sub = recipes.real_dataset("gta5", root, "all", cache_dir=str(tmp_path / "cache"),
                             cache_format="png")
  cached = data.build_source(sub, "data.source")
  assert cached.name == "gta5 (cache)"
  _assert_same_records(cached, data.build_source(sub, "data.source", use_cache=False),
                       exact=True)
  assert cached.load(1)["label"].shape == (32, 64)  # Resized to its image, as runs do.


def test_tools_name_the_bad_field():
  with pytest.raises(app.UsageError, match=r"--field: 'data.crop_size' is not a dataset"):
    data_cli.dataset_configs(default.get_config(), ["data.crop_size"], "--field")
  with pytest.raises(app.UsageError, match="--fields is empty"):
    data_cli.dataset_configs(default.get_config(), [], "--fields")
