"""What the dataset tools (check_data, data_stats, cache_data) share: their config fields.

The tools define their flags when run as programs (`python -m
segjax.tools.NAME`), not on import: each has a `--config` flag, like
`segjax.main` and `segjax.tools.summary`, and absl refuses a flag defined
twice, so only then can tests import them all into one process. Their logic
is in plain functions that take a config and return an exit status.
"""

import ml_collections
from absl import app

DATASET_FIELDS = ("data.source", "data.target", "data.eval")


def dataset_config(config: ml_collections.ConfigDict, field: str) -> ml_collections.ConfigDict:
  """The dataset sub-config at `field` (e.g. 'data.source'); ValueError naming it if none."""
  node = config
  for part in field.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(f"{field!r} is not a field of the config; expected dataset fields such "
                       f"as {', '.join(DATASET_FIELDS)}.")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or "name" not in node:
    raise ValueError(f"{field!r} is not a dataset sub-config (it has no name field); expected "
                     f"dataset fields such as {', '.join(DATASET_FIELDS)}.")
  return node


def dataset_configs(config: ml_collections.ConfigDict, fields: list[str],
                    flag: str) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(field, sub-config) for each of `fields`; app.UsageError (exit 2) naming `flag` if bad."""
  if not fields:
    raise app.UsageError(f"{flag} is empty; expected dataset fields such as "
                         f"{','.join(DATASET_FIELDS)}.")
  try:
    return [(field, dataset_config(config, field)) for field in fields]
  except ValueError as e:
    raise app.UsageError(f"{flag}: {e}") from e
