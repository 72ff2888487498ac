"""Flags shared by the commands that read a trained run (evaluate, predict, make_pseudo_labels)."""

from absl import flags
from ml_collections import config_flags


def define_run_flags(role: str = "training") -> None:
  """--config, --workdir and --checkpoint of a trained run (defined when a command runs:
  absl refuses a flag defined twice in one process)."""
  config_flags.DEFINE_config_file("config", None, f"The {role} run's configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, f"The {role} run's workdir (holding checkpoints/).")
  flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by mIoU) or a step number.")


def define_state_flag() -> None:
  """--state: which of the run's segmenters to read (evaluate, predict)."""
  flags.DEFINE_string(
      "state", "seg", "The run's segmenter to read: 'seg' (the network trained and evaluated "
      "during training: MPL's student), or another state holding the same model, such as MPL's "
      "'teacher' or self_training's EMA teacher 'ema'.")
