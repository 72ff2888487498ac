"""What segjax's commands share: `run` (absl.app.run with clear errors), a trained run's flags.

Every command (segjax.main, evaluate, predict, segjax.tools.*) starts with
`cli.run(main)`, which gives them one behaviour (`python -m segjax.<command>`
has already restarted with huge-page malloc on a CPU-only host, while the
segjax package was imported: `segjax.hostmem`):

  exit status 2   the command line is wrong, and nothing ran: an unknown flag
                  or config field, a bad flag value, a missing required flag,
                  an unexpected argument (`app.UsageError`);
  exit status 1   a user error found while running: a config value that
                  cannot work, data, the workdir, a checkpoint
                  (`segjax.errors.UserError`, which CheckpointError and WorkdirError are);
                  or a bug in segjax, which alone prints a traceback.

Either error prints one message on stderr, `error: <command>: <message>`,
without a traceback; SEGJAX_DEBUG=1 in the environment shows the traceback
instead. An unknown config field names the closest valid ones. `--help` lists
the flags defined here beside the command's own (absl shows only the main
module's flags there).
"""

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from segjax import errors

FLAGS = flags.FLAGS
USAGE_EXIT_CODE = 2
ERROR_EXIT_CODE = 1
DEBUG_ENV = "SEGJAX_DEBUG"
CONFIG_FLAG = "config"


def define_run_flags(role: str = "training") -> None:
  """--config, --workdir and --checkpoint of a trained run (defined when a command runs:
  absl refuses a flag defined twice in one process)."""
  config_flags.DEFINE_config_file(CONFIG_FLAG, None, f"The {role} run's configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, f"The {role} run's workdir (holding checkpoints/).")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by mIoU) or a step number.")


def define_state_flag() -> None:
  """--state: which of the run's segmenters to read (evaluate, predict)."""
  flags.DEFINE_string(
      "state", "seg", "The run's segmenter to read: 'seg' (the network trained and evaluated "
      "during training: MPL's student), or another state holding the same model, such as MPL's "
      "'teacher' or self_training's EMA teacher 'ema'.")


def run(main: Callable[[list[str]], int | None]) -> None:
  """Runs a command's `main` as `absl.app.run` does, with the errors and help described above."""
  for flag in FLAGS.flags_by_module_dict().get(__name__, []):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)  # What --help lists.
  app.run(functools.partial(_run_main, main), flags_parser=_parse_flags)


def command_name() -> str:
  """'segjax.evaluate' for `python -m segjax.evaluate`, else the script's file name."""
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  return spec.name if spec is not None else os.path.basename(sys.argv[0])


def _debug() -> bool:
  return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(message: str, exit_code: int) -> NoReturn:
  """Prints the error as one message and exits; under SEGJAX_DEBUG, re-raises the exception
  being handled instead, with its traceback."""
  if _debug():
    raise  # pylint: disable=misplaced-bare-raise
  sys.stderr.write(f"error: {command_name()}: {message}\n")
  sys.exit(exit_code)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    remaining = FLAGS(argv)
  except flags.Error as e:
    _fail(f"{_without_traceback(str(e))}\nPass --help to see the command's flags.",
          USAGE_EXIT_CODE)
  except (AttributeError, KeyError):
    # ml_collections raises these, unwrapped, for an override of a field the config lacks.
    message = _unknown_override(argv)
    if message is None:
      raise
    _fail(message, USAGE_EXIT_CODE)
  if CONFIG_FLAG in FLAGS and FLAGS[CONFIG_FLAG].value is not None:
    try:  # A config file that failed to load parses as a stand-in that raises on any use.
      FLAGS[CONFIG_FLAG].value.get("seed")
    except OSError as e:
      _fail(str(e), USAGE_EXIT_CODE)
  return remaining


def _without_traceback(message: str) -> str:
  """ml_collections puts the traceback of a config file's get_config into its error message:
  the message without it, ending with the exception's own line."""
  head, marker, trace = message.partition("Traceback (most recent call last):")
  if not marker:
    return message
  last = [line for line in trace.splitlines() if line.strip()][-1]
  return f"{head.strip()} {last.strip()}"


def _run_main(main: Callable[[list[str]], int | None], argv: list[str]) -> int | None:
  try:
    return main(argv)
  except app.UsageError as e:
    _fail(f"{e}\nPass --help to see the command's flags.", USAGE_EXIT_CODE)
  except errors.UserError as e:
    _fail(str(e), ERROR_EXIT_CODE)


# ---- Unknown config fields.

def _unknown_override(argv: list[str]) -> str | None:
  """The message for the first --config.<path> override naming no field of the config, or
  None when every override names a field (the error was something else)."""
  if CONFIG_FLAG not in FLAGS:
    return None
  argument, paths = None, []
  for i, arg in enumerate(argv):
    if (match := re.match(rf"^--?{CONFIG_FLAG}(=(.*))?$", arg)):
      argument = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    elif (match := re.match(rf"^--?(no)?{CONFIG_FLAG}\.([^=]+)", arg)):
      paths.append(match.group(2))
  if argument is None:
    return None
  try:
    config = FLAGS[CONFIG_FLAG].parser.parse(argument)
  except Exception:  # pylint: disable=broad-except
    return None  # The config itself does not load: the original error says more.
  for path in paths:
    message = unknown_config_field(config, path)
    if message is not None:
      return f"--{CONFIG_FLAG}.{path}: {message}"
  return None


def unknown_config_field(config: ml_collections.ConfigDict, path: str,
                         prefix: str = CONFIG_FLAG) -> str | None:
  """Why `path` (dotted, e.g. 'optim.seg.lr_typo') is not a field of `config`, naming the
  closest fields; None if it is one.

  The closest fields are, in order: the misspelt name's siblings that difflib
  finds close or that start like it (lr_typo -> lr); fields of the same name
  elsewhere (lr -> optim.seg.lr); failing both, the dotted paths difflib finds
  close. A name missing from a sub-config of the built-in scenes, and close to
  none of its fields, is most likely a real dataset's (root, resize, ...): the
  message says how to get those.
  """
  parts = path.split(".")
  node, depth = config, 0
  while depth < len(parts) and isinstance(node, ml_collections.ConfigDict) \
      and parts[depth] in node:
    node = node[parts[depth]]
    depth += 1
  if depth == len(parts):
    return None
  name, rest = parts[depth], parts[depth + 1:]
  parent = ".".join(parts[:depth])
  message = f"{prefix}.{'.'.join(parts[:depth + 1])} is not a field"
  where = f"{prefix}.{parent}" if parent else prefix
  if not isinstance(node, ml_collections.ConfigDict):
    return message + f": {where} is {node!r}, not a sub-config."
  fields = _field_paths(config)
  siblings = list(node.keys())
  close_siblings = difflib.get_close_matches(name, siblings, n=3, cutoff=0.75) + [
      s for s in siblings if min(len(s), len(name)) >= 2
      and (s.startswith(name) or name.startswith(s))]
  candidates = [f"{parent}.{s}" if parent else s for s in close_siblings]
  candidates += [f for f in fields if f.rsplit(".", 1)[-1] == name]
  built_in = node.get("name") == "street_scenes"
  if not candidates and not built_in:
    ancestors = {".".join(parts[:i]) for i in range(1, depth + 1)}
    candidates = difflib.get_close_matches(".".join(parts[:depth + 1]),
                                           [f for f in fields if f not in ancestors], n=2,
                                           cutoff=0.8)
  suggestions = []
  for candidate in candidates:
    full = ".".join([candidate, *rest])
    if full in fields and full not in suggestions:
      suggestions.append(full)
  if suggestions:
    return message + f"; did you mean {' or '.join(f'{prefix}.{s}' for s in suggestions[:3])}?"
  if built_in:
    return message + (f": {where} is the built-in street scenes, whose fields are "
                      f"{', '.join(siblings)}; {errors.REAL_DATASETS}.")
  return message + f"; the fields of {where} are {', '.join(siblings)}."


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every field of `config` as a dotted path, sub-configs included."""
  paths = []
  for key, value in config.items():
    path = f"{prefix}{key}"
    paths.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      paths += _field_paths(value, path + ".")
  return paths
