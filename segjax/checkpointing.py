"""Orbax checkpoints of the training states and the data iterator, saved together.

A checkpoint holds every TrainState of the method (segmenter, discriminator,
...), whose `step` fields give the training step, and the Grain iterator state,
so a resumed run sees exactly the batches an uninterrupted run would have.
Saves are asynchronous and atomic (Orbax writes to a temporary directory and
renames it when complete), so a crash never leaves a checkpoint half-written.
Kept: the latest `max_to_keep` and the best by the evaluation metric.
A resume reads the latest checkpoint that can be read (`restore_latest`): one
that cannot (a truncated file, a disk error) is reported with the reason and
moved to `<workdir>/unreadable_checkpoints/`, and the one before it is used.
Evaluation and prediction open the directory read-only and restore only the
segmenter (`select_step`, `restore_states`).
"""

import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as managers

from segjax import errors

DATA_ITEM = "data"
# The per-step training metrics since the last log line: a run stopped between two log steps
# logs, after resuming, the same averages as an uninterrupted one.
PENDING_ITEM = "pending_metrics"


class CheckpointError(errors.UserError, ValueError):
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
    self._max_to_keep = max_to_keep
    self._read_only = read_only
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    best_metric, max_to_keep, read_only = self._best_metric, self._max_to_keep, self._read_only
    preservation = managers.AnyPreservationPolicy([
        managers.LatestN(n=max_to_keep),
        managers.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    return ocp.CheckpointManager(
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
           metrics: dict[str, float] | None = None,
           pending_metrics: list[dict[str, float]] | None = None) -> None:
    items = {name: ocp.args.StandardSave(state) for name, state in states.items()}
    items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    items[PENDING_ITEM] = ocp.args.JsonSave({"metrics": pending_metrics or []})
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_states: dict[str, Any],
              data_iterator: grain.DatasetIterator) -> dict[str, Any]:
    """Restores the states into the shardings of `abstract_states` and the iterator in place."""
    return self._restore(step, abstract_states, data_iterator)[0]

  def _restore(self, step, abstract_states, data_iterator):
    """(states, the per-step metrics not yet logged: empty in checkpoints of earlier versions)."""
    items = {name: ocp.args.StandardRestore(abstract)
             for name, abstract in abstract_states.items()}
    items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    has_pending = os.path.isdir(os.path.join(self._directory, str(step), PENDING_ITEM))
    if has_pending:
      items[PENDING_ITEM] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    pending = restored[PENDING_ITEM]["metrics"] if has_pending else []
    return {name: restored[name] for name in abstract_states}, pending

  def restore_latest(self, abstract_states: dict[str, Any],
                     data_iterator: grain.DatasetIterator,
                     is_primary: bool = True) -> tuple[int, dict[str, Any] | None, list]:
    """(step, states, metrics not yet logged) of the latest readable checkpoint, or
    (0, None, []) if there is none.

    A checkpoint that cannot be restored is named with the reason (a
    warning), moved aside by the primary process to
    `../unreadable_checkpoints/<step>-<time>` (so that the step can be saved
    again), and the one before it is tried. CheckpointError, naming each
    step's reason, if none can be read: then nothing is moved.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        states, pending = self._restore(step, abstract_states, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logging.warning("The checkpoint of step %d in %s cannot be read (%s); trying the one "
                        "before it.", step, self._directory, reason)
        failures.append((step, reason))
        continue
      if failures:
        self._set_aside([failed for failed, _ in failures], is_primary)
      return step, states, pending
    if failures:
      raise CheckpointError(
          f"No checkpoint in {self._directory} can be read: "
          + "; ".join(f"step {step}: {reason}" for step, reason in failures)
          + ". If the config changed since they were written, resume with the run's config "
          "(config.json); otherwise move the directory away to train from scratch.")
    return 0, None, []

  def _set_aside(self, steps: list[int], is_primary: bool) -> None:
    aside = os.path.join(os.path.dirname(self._directory), "unreadable_checkpoints")
    self._manager.close()
    if is_primary:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(os.path.join(self._directory, str(step)), target)
        logging.warning("Moved the unreadable checkpoint of step %d to %s.", step, target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("segjax_unreadable_checkpoints_moved", timeout=600)
    self._manager = self._open()

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
