"""Checks the dataset trees a config points at, before anyone trains on them.

  python -m segjax.tools.check_data \
      --config=configs/deeplabv2_gta5_cityscapes.py:gta5=/data/GTA5,cityscapes=/data/cityscapes \
      [--fields=data.source,data.target,data.eval] [--show=5]

For each dataset field, a real dataset's reader lists the split (a start-up
problem, such as a missing root, an empty split or an unknown city, is
reported, not raised), then every example is decoded from the original files
(never a cache) with `FileSource.load`, and the problems are counted by kind:
missing files, unreadable or truncated files, labels in the wrong format,
label values outside the mapping, label/image size mismatches. Size
mismatches are warnings, not failures, where the config's
on_size_mismatch='resize' resizes those labels (GTA5). The report gives per
field the counts, the image sizes and, per problem kind, its count and the
first `--show` examples with their message. The built-in street scenes are
reported as built in. Decoding a 2048x1024 Cityscapes pair takes about 80 ms,
so 3,000 images take a few minutes; a progress bar shows on stderr.

Exit status: 0 if no field has a failure, 1 if one has, 2 for a bad command
line.
"""

import collections
import dataclasses

import ml_collections
import tqdm
from absl import app, flags
from ml_collections import config_flags

from segjax import cli, data
from segjax.data import files
from segjax.tools import data_cli

FLAGS = flags.FLAGS

SIZE_MISMATCHES = "label/image size mismatches"
# (error class, title), in report order: an error takes the first class it is an instance of.
PROBLEM_KINDS = (
    (files.MissingFile, "missing files"),
    (files.UnreadableFile, "unreadable or truncated files"),
    (files.BadLabelFormat, "labels in the wrong format"),
    (files.BadLabelValues, "label values outside the mapping"),
    (files.SizeMismatch, SIZE_MISMATCHES),
    (files.DataError, "other problems"),
)


@dataclasses.dataclass
class Problem:
  index: int
  message: str


@dataclasses.dataclass
class FieldReport:
  """What checking one dataset field found."""
  field: str
  description: str
  built_in: bool = False
  startup_error: str = ""  # The reader could not list the split.
  num_examples: int = 0
  labelled: bool = False
  num_ok: int = 0  # Read without problems.
  image_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  failures: dict[str, list[Problem]] = dataclasses.field(default_factory=dict)
  warnings: dict[str, list[Problem]] = dataclasses.field(default_factory=dict)
  notes: dict[str, str] = dataclasses.field(default_factory=dict)  # Problem title -> note.
  same_as: str = ""  # An earlier field that lists the same files (checked once).

  @property
  def failed(self) -> bool:
    return bool(self.startup_error or self.failures)

  @property
  def status(self) -> str:
    if self.built_in:
      return "built in"
    if self.failed:
      return "FAILED"
    return "ok (with warnings)" if self.warnings else "ok"


def problem_kind(error: files.DataError) -> str:
  return next(title for cls, title in PROBLEM_KINDS if isinstance(error, cls))


def open_field(config: ml_collections.ConfigDict, field: str):
  """(report, source): the source over the original files, or None (built in, or start-up error)."""
  report = FieldReport(field, data.describe(config))
  if config.name == "street_scenes":
    report.built_in = True
    return report, None
  try:
    with files.missing_files_fail_on_load():  # Missing files are reported with the others.
      source = data.build_source(config, field, use_cache=False)
  except (ValueError, ImportError) as e:  # DataError, an unknown name or policy, no tfds.
    report.startup_error = str(e)
    return report, None
  return report, source


def read_all(report: FieldReport, source, config: ml_collections.ConfigDict,
             progress=tqdm.tqdm) -> None:
  """Decodes every example of `source` into `report`: counts, image sizes, problems by kind."""
  resize_mismatches = config.get("on_size_mismatch", "fail") == "resize"
  if isinstance(source, files.FileSource):
    # At native size, and failing on every problem: the config's policy only sorts them.
    source = dataclasses.replace(source, resize=(), on_error="fail", on_size_mismatch="fail")
    load = source.load
  else:
    load = source.__getitem__
  report.num_examples = len(source)
  report.labelled = getattr(source, "labelled", True)
  for index in progress(range(len(source)), desc=report.field, unit="img"):
    try:
      record = load(index)
    except files.DataError as e:
      kind = problem_kind(e)
      warning = resize_mismatches and isinstance(e, files.SizeMismatch)
      (report.warnings if warning else report.failures).setdefault(kind, []).append(
          Problem(index, str(e)))
      continue
    report.num_ok += 1
    height, width = record["image"].shape[:2]
    report.image_sizes[f"{width}x{height}"] += 1
  if resize_mismatches:
    report.notes[SIZE_MISMATCHES] = ("on_size_mismatch='resize': these labels are resized to "
                                     "their images")
  elif config.get("on_size_mismatch") == "skip":
    report.notes[SIZE_MISMATCHES] = "on_size_mismatch='skip': training skips these examples"


def format_report(report: FieldReport, show: int) -> str:
  lines = [f"== {report.field}: {report.description}"]
  if report.built_in:
    lines.append("   built in: generated on the fly, nothing to check.")
    return "\n".join(lines)
  if report.startup_error:
    lines.append("   FAIL  the split cannot be listed:")
    lines += ["     " + line for line in report.startup_error.splitlines()]
    return "\n".join(lines + [f"   -> {report.status}"])
  if report.same_as:
    lines.append(f"   the same files as {report.same_as}, checked above.")
    return "\n".join(lines + [f"   -> {report.status}"])
  num_failed = sum(len(p) for p in report.failures.values())
  num_warned = sum(len(p) for p in report.warnings.values())
  what = "image/label pairs" if report.labelled else "images (unlabelled)"
  lines.append(f"   {report.num_examples} {what} listed: {report.num_ok} read without "
               f"problems, {num_warned} with warnings, {num_failed} failed.")
  if report.image_sizes:
    sizes = ", ".join(f"{size} ({n})" for size, n in report.image_sizes.most_common(5))
    more = len(report.image_sizes) - 5
    lines.append(f"   image sizes: {sizes}" + (f" and {more} more" if more > 0 else ""))
  for level, problems in (("FAIL", report.failures), ("WARN", report.warnings)):
    for _, title in PROBLEM_KINDS:
      if title not in problems:
        continue
      note = f" ({report.notes[title]})" if title in report.notes else ""
      lines.append(f"   {level}  {title}: {len(problems[title])}{note}")
      for problem in problems[title][:show]:
        lines.append(f"     example {problem.index}: {problem.message}")
      if len(problems[title]) > show:
        lines.append(f"     ... and {len(problems[title]) - show} more.")
  return "\n".join(lines + [f"   -> {report.status}"])


def check(config: ml_collections.ConfigDict, fields=data_cli.DATASET_FIELDS, show: int = 5,
          progress=tqdm.tqdm) -> int:
  """Checks and reports each of `fields`; the exit status: 1 if a field failed, else 0."""
  reports, checked = [], {}
  for field, sub in data_cli.dataset_configs(config, list(fields), "--fields"):
    report, source = open_field(sub, field)
    if source is not None:
      key = (tuple(source.pairs), sub.get("on_size_mismatch")) if isinstance(
          source, files.FileSource) else id(source)
      if key in checked:
        first = checked[key]
        report = dataclasses.replace(first, field=field, description=report.description,
                                     same_as=first.field)
      else:
        read_all(report, source, sub, progress)
        checked[key] = report
    reports.append(report)
    print(format_report(report, show), flush=True)
  print("Summary: " + ", ".join(f"{r.field} {r.status}" for r in reports) + ".", flush=True)
  return int(any(r.failed for r in reports))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.show < 0:
    raise app.UsageError(f"--show={FLAGS.show}; expected 0 or more.")
  return check(FLAGS.config, FLAGS.fields, FLAGS.show)


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
  flags.DEFINE_list("fields", list(data_cli.DATASET_FIELDS), "Dataset fields to check.")
  flags.DEFINE_integer("show", 5, "Examples shown per problem kind.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  define_flags()
  cli.run(main)
