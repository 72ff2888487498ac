"""Builds the caches of decoded, resized records that a config's datasets ask for.

  python -m segjax.tools.cache_data \
      --config=configs/deeplabv2_gta5_cityscapes.py:gta5=/data/GTA5,cityscapes=/data/cityscapes \
      --config.data.source.cache_dir=/fast/cache --config.data.target.cache_dir=/fast/cache \
      [--fields=data.source,data.target,data.eval]

For each dataset field whose sub-config sets cache_dir, every example is read
from the original files, mapped to train ids, resized to the working
resolution and written by `segjax.data.files.build_cache` into
`segjax.data.cache_directory(config, source)`, a folder under cache_dir named
by the dataset and a hash of what changes the records: images as JPEG
(quality 95) or PNG (the sub-config's cache_format), labels as train-id PNGs.
A progress bar shows on stderr. It resumes: after an interruption, the same
command writes only the missing files. It prints per field the cache folder,
the examples written and the size on disk against the original files' (the
point of the cache: GTA5's 1914x1052 PNGs become 1280x720 JPEGs). A run
with the same config then reads the cache: its dataset is named
'<name> (cache)'. Fields without cache_dir are skipped; a config without any
is a usage error naming the field to set.

Exit status: 0 when every requested cache is complete, 1 if a dataset could
not be read, 2 for a bad command line (a config without cache_dir included).
"""

import os

import ml_collections
import tqdm
from absl import app, flags
from ml_collections import config_flags

from segjax import cli, data, errors
from segjax.data import files
from segjax.tools import data_cli

FLAGS = flags.FLAGS

CACHE_FORMATS = ("jpeg", "png")


def format_bytes(size: int) -> str:
  exponent = min(3, max(0, (int(size).bit_length() - 1) // 10))
  if exponent == 0:
    return f"{size} B"
  return f"{size / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def directory_bytes(directory: str) -> int:
  """Bytes of the files under `directory`."""
  return sum(os.path.getsize(os.path.join(folder, name))
             for folder, _, names in os.walk(directory) for name in names)


def _cached_images(directory: str) -> int:
  folder = os.path.join(directory, "images")
  if not os.path.isdir(folder):
    return 0
  return sum(1 for name in os.listdir(folder) if not name.endswith(".tmp"))


def cache_field(config: ml_collections.ConfigDict, field: str, progress=tqdm.tqdm) -> dict:
  """Builds (or completes) the cache of the dataset at `field`; a summary of what it did.

  Raises DataError if the dataset cannot be listed or one of its files read,
  ValueError for a bad cache_format or a dataset that is not read from files.
  """
  image_format = config.get("cache_format", "jpeg")
  if image_format not in CACHE_FORMATS:
    raise errors.ConfigError(f"{field}.cache_format={image_format!r}; expected one of "
                             f"{list(CACHE_FORMATS)}.")
  source = data.build_source(config, field, use_cache=False)
  if not isinstance(source, files.FileSource):
    raise errors.ConfigError(f"{field}: {config.name} is not read from image files, so it has no "
                             f"cache; unset {field}.cache_dir.")
  directory = data.cache_directory(config, source)
  already = min(_cached_images(directory), len(source))
  files.build_cache(source, directory, image_format, progress=progress)
  cached = data.build_source(config, field)
  if cached.name != f"{source.name} (cache)":
    raise files.DataError(f"{field}: the cache in {directory} was written but is not read back.")
  originals = {path for pair in source.pairs for path in pair if path is not None}
  return dict(field=field, directory=directory, image_format=image_format,
              resize=source.resize, num_examples=len(source), already_cached=already,
              original_bytes=sum(os.path.getsize(path) for path in originals),
              cache_bytes=directory_bytes(directory), read_as=cached.name)


def format_summary(summary: dict) -> str:
  resize = "x".join(map(str, summary["resize"][::-1])) if summary["resize"] else "native size"
  ratio = summary["cache_bytes"] / max(summary["original_bytes"], 1)
  written = summary["num_examples"] - summary["already_cached"]
  return "\n".join([
      f"   cache: {summary['directory']} ({summary['image_format']}, {resize})",
      f"   {summary['num_examples']} examples: {written} written, "
      f"{summary['already_cached']} already cached.",
      f"   on disk: {format_bytes(summary['original_bytes'])} of original files -> "
      f"{format_bytes(summary['cache_bytes'])} cached ({ratio:.1%}).",
      f"   runs with this config now read {summary['read_as']!r}."])


def cache(config: ml_collections.ConfigDict, fields=data_cli.DATASET_FIELDS,
          progress=tqdm.tqdm) -> int:
  """Caches each of `fields` that sets cache_dir; the exit status (1 if one failed)."""
  selected = data_cli.dataset_configs(config, list(fields), "--fields")
  if not any(sub.get("cache_dir") for _, sub in selected):
    cacheable = [field for field, sub in selected if "cache_dir" in sub]
    if not cacheable:
      raise app.UsageError(f"None of {','.join(fields)} is a dataset read from files (the "
                           "built-in street scenes are generated): nothing to cache.")
    raise app.UsageError(f"No cache_dir is set for {','.join(fields)}: set one, e.g. "
                         f"--config.{cacheable[0]}.cache_dir=/path/to/cache.")
  status = 0
  for field, sub in selected:
    print(f"== {field}: {data.describe(sub)}", flush=True)
    if sub.name == "street_scenes":
      print("   skipped: built in, generated on the fly.", flush=True)
    elif not sub.get("cache_dir"):
      print(f"   skipped: no cache_dir (set --config.{field}.cache_dir=DIR to cache it).",
            flush=True)
    else:
      try:
        print(format_summary(cache_field(sub, field, progress)), flush=True)
      except (ValueError, ImportError) as e:  # DataError included.
        print(f"   FAIL  {e}\n   (python -m segjax.tools.check_data lists every problem of "
              "the dataset; rerunning this command resumes the cache.)", flush=True)
        status = 1
  return status


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  return cache(FLAGS.config, FLAGS.fields)


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
  flags.DEFINE_list("fields", list(data_cli.DATASET_FIELDS),
                    "Dataset fields to cache (those with a cache_dir).")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
