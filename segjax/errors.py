"""Errors a user can act on: what the commands print as one message, without a traceback.

A `UserError` names what is wrong (a config field, a file, a folder, a
checkpoint) and says what to write instead; `segjax.cli.run` prints it as
`error: <command>: <message>` and exits with status 1. Any other exception is
a bug in segjax and keeps its traceback. `segjax.data.DataError` and
`ConfigError` are UserErrors; both are ValueErrors too, so code that caught
ValueError before they existed still catches them.
"""

import contextlib


class UserError(Exception):
  """A problem the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
  """A config field whose value cannot work; the message names the field."""


@contextlib.contextmanager
def config_checks():
  """Within it, a ValueError is a ConfigError with the same message: for checks of a config
  made by code whose ValueErrors all name a config field (model and optimizer builders,
  segjax.parallel.check_batch_size) but that raises plain ValueErrors."""
  try:
    yield
  except UserError:  # Already says what is wrong (a ConfigError, DataError, CheckpointError).
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e


# How to read a real dataset where a config has the built-in scenes: a sub-config of the built-in
# scenes has none of a real dataset's fields (root, resize, ...) to override.
REAL_DATASETS = ("a real dataset comes with all its fields from the config string of a config "
                 "that takes dataset roots, which sets data.source, data.target and data.eval "
                 "together, e.g. --config=configs/adaptsegnet.py:gta5=ROOT,cityscapes=ROOT "
                 "(each config's docstring names the roots it takes)")
