"""Orbax checkpoints of the training states and the data iterator, saved together.

A checkpoint holds every TrainState of the method (segmenter, discriminator,
...), whose `step` fields give the training step, and the Grain iterator state,
so a resumed run sees exactly the batches an uninterrupted run would have.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and
renames it when complete), so a crash never leaves a checkpoint half-written.
Kept: the latest `max_to_keep` and the best by the evaluation metric.
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as managers

DATA_ITEM = "data"


class Checkpointer:
  """Saves and restores {state name: TrainState} plus the data iterator."""

  def __init__(self, directory: str, *, max_to_keep: int, best_metric: str = "miou"):
    self._best_metric = best_metric
    preservation = managers.AnyPreservationPolicy([
        managers.LatestN(n=max_to_keep),
        managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=preservation, enable_async_checkpointing=True,
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest `best_metric` among checkpoints saved with metrics."""
    scored = [(m[self._best_metric], step) for step in self._manager.all_steps()
              if (m := self._manager.metrics(step)) is not None and self._best_metric in m]
    return max(scored)[1] if scored else None

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

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
