"""A training run's workdir: one run at a time, and a resume only with the config it trained.

* `Lock`: a second run on a live workdir refuses to start and names the
  holder (host, PID, since when). The lock is an advisory `flock` on
  `<workdir>/.lock`, which the kernel releases when its holder dies, however
  it dies: a lock file left by a dead run is stale, taken over with a log line.
  (On a network filesystem without lock support, two hosts are not kept
  apart; local disks, Lustre and NFSv4 honour it.)
* `check_resume_config`: on resume, the config must train the same way as the
  one in `config.json`. Fields that cannot change the trained weights
  (`MAY_CHANGE_ON_RESUME`: evaluation, logging, checkpoint cadence; fields read
  only at a fresh start, such as init_from; the locations of inputs, such as
  dataset roots, which move with a dataset or a copied workdir) may differ;
  the changes are appended to `config_changes.jsonl` and `config.json` is
  rewritten (atomically). Any other change is an error naming the fields.
"""

import fcntl
import json
import os
import socket
import time
from typing import Any

import ml_collections
from absl import logging

from segjax import errors

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"

# Dotted config fields (and whole sections) that a resumed run may change: they decide what is
# evaluated, logged and kept, never what is trained.
MAY_CHANGE_ON_RESUME = (
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
    "num_eval_samples", "eval_batch_size", "inference", "data.eval",
)


class WorkdirError(errors.UserError, RuntimeError):
  """The workdir cannot be used by this run (held by another, or trained with another config)."""


class UnwritableWorkdirError(WorkdirError, PermissionError):
  """The workdir cannot be created or written to."""


class Lock:
  """Holds `<workdir>/.lock` for this process's lifetime (or until `release`)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def acquire(self) -> "Lock":
    handle = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "an unknown process"
      handle.close()
      raise WorkdirError(
          f"The workdir {os.path.dirname(self.path)} is in use by another run ({holder}). "
          "Wait for it to end, stop it, or pass another --workdir.") from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
      logging.info("Took over the stale workdir lock of a run that ended (%s).", previous)
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()}, PID {os.getpid()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    self._file = handle
    return self

  def release(self) -> None:
    """Empties the lock file (a clean end) and releases it."""
    if self._file is None:
      return
    self._file.truncate(0)
    self._file.flush()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None

  def __enter__(self) -> "Lock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def write_json_atomically(path: str, value: Any) -> None:
  """Writes JSON to a temporary file, syncs it, then renames it over `path`."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def config_as_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (tuples as lists), as `config.json` holds it."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) and value
                         else f"{prefix}{key}"))
  return flat


def config_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (saved value, current value)} for every field that differs or is new/gone."""
  old, new = _flatten(saved), _flatten(current)
  return {field: (old.get(field, _ABSENT), new.get(field, _ABSENT))
          for field in sorted(old.keys() | new.keys())
          if old.get(field, _ABSENT) != new.get(field, _ABSENT)}


# Fields read only when a run starts from scratch (a resume restores what they gave).
READ_ONLY_AT_START = ("init_from", "model.backbone_weights", "adapt.mpl_teacher_from",
                      "adapt.fd_weights")
# Fields that locate inputs (a dataset, a cache, pseudo labels, statistics): moving them, or the
# workdir holding them, changes where the same files are read from, not what is trained.
LOCATIONS = ("root", "data_dir", "cache_dir", "pseudo_labels", "category_stats")


# Fields segjax gained after workdirs were recorded, each with the value that trains as before
# it existed: a recorded config without the field resumes when the field has that value.
ADDED_FIELDS = {
    "optim.seg.warmup_steps": 0, "optim.seg.warmup_ratio": 1e-6, "optim.seg.no_decay": [],
    "optim.teacher.warmup_steps": 0, "optim.teacher.warmup_ratio": 1e-6,
    "optim.teacher.no_decay": [], "optim.accumulate_steps": 1,
    "loss.detail_weight": 0.1, "adapt.mic": False, "adapt.mic_ratio": 0.7, "adapt.mic_block": 64, "adapt.mic_lambda": 1.0,
    "data.augment.cat_max_ratio": 1.0, "loss.avg_non_ignore": True,
    "optim.seg.warmup_mode": "mmcv", "optim.teacher.warmup_mode": "mmcv",
    "data.source.keep_ratio": False, "data.target.keep_ratio": False,
    # The self-training teacher as it was before these fields (2026-12-04).
    "adapt.st_teacher_bn": "running", "adapt.st_target_weak": False,
    "adapt.st_source_weak": False,
    "data.rcs.temperature": 0.0, "data.rcs.min_pixels": 3000, "data.rcs.min_crop_ratio": 0.5,
    "data.rcs.stats": "",
}
_ABSENT = object()


def _unchanged_by_addition(field: str, old: Any, new: Any) -> bool:
  return old is _ABSENT and field in ADDED_FIELDS and new == ADDED_FIELDS[field]


def may_change(field: str) -> bool:
  return (field in READ_ONLY_AT_START or field.rsplit(".", 1)[-1] in LOCATIONS
          or any(field == allowed or field.startswith(allowed + ".")
                 for allowed in MAY_CHANGE_ON_RESUME))


def _shown(value: Any) -> str:
  return "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) \
      else json.dumps(value)


def record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A fresh run's `config.json`."""
  write_json_atomically(os.path.join(workdir, CONFIG_FILE), config_as_json(config))


def check_resume_config(workdir: str, config: ml_collections.ConfigDict, step: int,
                        write: bool = True) -> None:
  """Refuses a resume whose config would train differently; records the allowed changes
  (`write`: the primary process of a job)."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = config_as_json(config)
  if not os.path.exists(path):
    logging.warning("%s has checkpoints but no %s (an older run?): recording this config "
                    "without comparing it.", workdir, CONFIG_FILE)
    if write:
      write_json_atomically(path, current)
    return
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} cannot be read ({e}); it records the config the checkpoints "
                       "were trained with. Restore it, or pass another --workdir.") from e
  differences = config_differences(saved, current)
  refused = {field: values for field, values in differences.items()
             if not may_change(field) and not _unchanged_by_addition(field, *values)}
  if refused:
    listed = "; ".join(f"config.{field}: {_shown(old)} in {CONFIG_FILE}, now {_shown(new)}"
                       for field, (old, new) in refused.items())
    raise WorkdirError(
        f"The checkpoints in {workdir} were trained with another config, and resuming with "
        f"this one would change training: {listed}. Resume with the recorded values, or start "
        "a new --workdir (config.init_from=WORKDIR starts from this run's weights).")
  if differences and write:
    logging.info("Resuming with changed evaluation/logging fields: %s.",
                 ", ".join(f"{field} {_shown(old)} -> {_shown(new)}"
                           for field, (old, new) in differences.items()))
    with open(os.path.join(workdir, CONFIG_CHANGES_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "changes": {k: [_jsonable(o), _jsonable(n)]
                                      for k, (o, n) in differences.items()}}) + "\n")
    write_json_atomically(path, current)


def _jsonable(value: Any) -> Any:
  return value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else None
