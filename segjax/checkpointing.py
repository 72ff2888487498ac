"""Orbax checkpoints of the training states and the data iterator, saved together.

A checkpoint holds every TrainState of the method (segmenter, discriminator,
...), whose `step` fields give the training step, and the Grain iterator state,
so a resumed run sees exactly the batches an uninterrupted run would have.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and
renames it when complete), so a crash never leaves a checkpoint half-written.
Kept: the latest `max_to_keep` and the best by the evaluation metric.
Evaluation and prediction open the directory read-only and restore only the
segmenter (`select_step`, `restore_states`).
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

DATA_ITEM = "data"


class CheckpointError(ValueError):
  """No checkpoint matches the request; the message says what the directory holds."""


class Checkpointer:
  """Saves and restores {state name: TrainState} plus the data iterator.

  `read_only` opens a directory another run may still be writing to: nothing
  is created, deleted or cleaned up (a training run's in-flight save stays).
  """

  def __init__(self, directory: str, *, max_to_keep: int, best_metric: str = "miou",
               read_only: bool = False):
    self._directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self._directory):
      raise CheckpointError(f"No checkpoint in {self._directory}: the directory does not exist. "
                            "Is --workdir the one a training run (python -m segjax.main) used?")
    self._best_metric = best_metric
    preservation = managers.AnyPreservationPolicy([
        managers.LatestN(n=max_to_keep),
        managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    self._manager = ocp.CheckpointManager(
        self._directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            # Orbax writes a checkpoint's metrics only when best_fn is set.
            best_fn=lambda m: m[best_metric], best_mode="max",
            enable_async_checkpointing=not read_only,
            cleanup_tmp_directories=not read_only, create=not read_only,
            read_only=read_only))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the highest `best_metric` among checkpoints saved with metrics."""
    scored = [(m[self._best_metric], step) for step in self._manager.all_steps()
              if (m := self._manager.metrics(step)) is not None and self._best_metric in m]
    return max(scored)[1] if scored else None

  def select_step(self, choice: str) -> int:
    """The step of `choice`: 'latest', 'best' (by `best_metric`) or a step number.

    CheckpointError, naming the directory and what it holds, when none matches.
    """
    available = self.all_steps()
    if not available:
      raise CheckpointError(f"No checkpoint in {self._directory}; train first "
                            "(python -m segjax.main) with the same --workdir.")
    if choice == "latest":
      return available[-1]
    if choice == "best":
      step = self.best_step()
      if step is None:
        raise CheckpointError(
            f"--checkpoint=best: no checkpoint in {self._directory} was saved with the metric "
            f"{self._best_metric!r} (saved at evaluations); use --checkpoint=latest or one of "
            f"the steps {available}.")
      return step
    if not str(choice).isdigit():
      raise CheckpointError(f"--checkpoint={choice!r}: expected 'latest', 'best' or a step "
                            f"number, one of {available}.")
    if int(choice) not in available:
      raise CheckpointError(f"--checkpoint={choice}: no checkpoint of step {choice} in "
                            f"{self._directory}; the available steps are {available}.")
    return int(choice)

  def save(self, step: int, states: dict[str, Any], data_iterator: grain.DatasetIterator,
           metrics: dict[str, float] | None = None) -> None:
    items = {name: ocp.args.StandardSave(state) for name, state in states.items()}
    items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_states: dict[str, Any],
              data_iterator: grain.DatasetIterator) -> dict[str, Any]:
    """Restores the states into the shardings of `abstract_states` and the iterator in place."""
    items = {name: ocp.args.StandardRestore(abstract)
             for name, abstract in abstract_states.items()}
    items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return {name: restored[name] for name in abstract_states}

  def restore_states(self, step: int, abstract_states: dict[str, Any]) -> dict[str, Any]:
    """Restores only the named states (e.g. {'seg': ...}), leaving the other items unread."""
    items = {name: ocp.args.StandardRestore(abstract)
             for name, abstract in abstract_states.items()}
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return {name: restored[name] for name in abstract_states}

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
