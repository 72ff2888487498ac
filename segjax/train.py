"""The training loop: build, restore, train, evaluate, checkpoint, report.

One linear function, `train_and_evaluate`, reads top to bottom; the pure steps
live in `segjax.steps`, the mesh in `segjax.parallel`, the input pipeline in
`segjax.data.pipeline`, the config checks in `segjax.validation`, the states
in `segjax.states`, evaluation in `segjax.evaluation`. Nothing imports this
module but the entry points that run training.
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from segjax import (checkpointing, data, errors, evaluation, methods, parallel, preemption,
                    reporting, validation)
from segjax import states as states_lib
from segjax import workdir as workdir_lib
from segjax.data import pipeline


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that it is writable, naming it if not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")  # One per process of a job.
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise workdir_lib.UnwritableWorkdirError(f"Cannot write to the workdir {workdir!r}: {e.strerror or e}. "
                                             "Pass a --workdir you can create files in.") from e


class NonFiniteError(errors.UserError, FloatingPointError):
  """Training produced a non-finite loss or parameter; nothing non-finite was saved."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the latest checkpoint in `workdir`); returns the final eval metrics.

  The workdir is locked for the run (`segjax.workdir.Lock`); SIGTERM, SIGUSR1
  and SIGINT stop it after the current step with a checkpoint of that step
  (`segjax.preemption.Preempted`).
  """
  validation.validate_config(config)
  prepare_workdir(workdir)
  is_primary = jax.process_index() == 0
  lock = None
  error = None
  if is_primary:
    try:
      lock = workdir_lib.Lock(workdir).acquire()
    except workdir_lib.WorkdirError as e:
      error = e
  if jax.process_count() > 1:  # Every process refuses with process 0.
    refused = multihost_utils.process_allgather(np.int32(error is not None)).max()
    if refused and error is None:
      error = workdir_lib.WorkdirError(f"Process 0 could not lock the workdir {workdir}.")
  if error is not None:
    raise error
  try:
    return _train(config, workdir, is_primary)
  finally:
    if lock is not None:
      lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, is_primary: bool) -> dict[str, float]:
  mesh = parallel.make_mesh()
  info = data.dataset_info(config.data.source, "data.source")
  method = methods.build(config, info.num_classes)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=config.keep_checkpoints)
  try:
    return _train_with(config, workdir, is_primary, mesh, info, method, ckpt)
  finally:
    # Whatever ends the run (a stop, an error), the good saves in flight complete.
    ckpt.wait_until_finished()
    ckpt.close()


def _train_with(config, workdir, is_primary, mesh, info, method, ckpt) -> dict[str, float]:
  if ckpt.all_steps():  # Before anything is built: a config that trains differently is refused.
    workdir_lib.check_resume_config(workdir, config, ckpt.all_steps()[-1], write=is_primary)
  if hasattr(method, "prepare"):  # Fixed inputs a method loads, or computes and saves, once.
    method.prepare(workdir, is_primary)
  subsets = evaluation.eval_subsets(config)

  # ---- States, input, restore.
  root_rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(root_rng)
  states, _ = states_lib.create_states(config, init_rng, info.num_classes, mesh)
  train_batches = pipeline.train_batches(config, with_target=method.uses_target,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count(),
                                         target_labels=method.target_labels,
                                         sampler=pipeline.rare_class_sampler(config, workdir,
                                                                             is_primary))
  train_iter = iter(pipeline.stream(train_batches, config.data.num_workers))
  eval_ds, num_eval = pipeline.eval_dataset(config, process_index=jax.process_index(),
                                            process_count=jax.process_count())
  start_step, restored, pending_records = ckpt.restore_latest(
      checkpointing.abstract_like(states), train_iter, is_primary)
  if is_primary:  # Lines past the restored step (all of them on a fresh start) are dropped.
    reporting.truncate_metrics(workdir, start_step)
  writer = reporting.create_writer(workdir, is_primary=is_primary)
  if restored is not None:
    states = restored
    logging.info("Resumed from the checkpoint at step %d in %s.", start_step, workdir)
  else:
    logging.info("No checkpoint in %s: training from scratch.", workdir)
    states = states_lib.initialise_segmenters(states, method, config, info.num_classes, mesh)
    if is_primary:
      workdir_lib.record_config(workdir, config)
    writer.write_hparams(dict(_flatten(config.to_dict())))

  # ---- Compiled steps.
  train_step = parallel.train_step(method.step, mesh)
  eval_step = evaluation.make_eval_step(config, info.num_classes, mesh)
  step_rng = parallel.make_replicated(lambda: step_rng, mesh)
  all_finite = jax.jit(_all_finite)
  to_compile, args = {"eval_step": eval_step}, {"eval_step": (
      states["seg"], parallel.global_batch_spec(eval_ds[0], mesh),
      evaluation.confusion_spec(info.num_classes, mesh))}
  if start_step < config.num_train_steps:  # A finished run only evaluates: no training compile.
    to_compile["train_step"] = train_step
    args["train_step"] = (states, parallel.global_batch_spec(train_batches[0], mesh), step_rng)
  compiled = parallel.compile_all(to_compile, args)
  train_step, eval_step = compiled.get("train_step"), compiled["eval_step"]

  def run_eval(state, step: int, write: bool = True) -> dict[str, float]:
    confusion, samples = evaluation.evaluate(eval_step, state, eval_ds, mesh, info.num_classes,
                                             config.num_eval_samples)
    summary = evaluation.eval_summary(confusion, info.class_names, subsets)
    logging.info("Step %d: target mIoU %.4f on %d images.", step, summary["eval/miou"], num_eval)
    if not write:
      return summary
    writer.write_scalars(step, summary)
    writer.write_images(step, {"eval/samples": reporting.sample_grid(
        samples["image"], samples["pred"], samples["label"], info.palette)})
    return summary

  def save(step: int, pending: list, eval_metrics=None) -> None:
    """A checkpoint of `step`, never of non-finite states."""
    if not bool(all_finite(states)):
      raise NonFiniteError(
          f"Non-finite parameters or optimizer state after step {step}; they were not saved. "
          f"{_last_good(ckpt)} Lower the learning rate, or check the inputs of that step.")
    writer.flush()
    ckpt.save(step, states, train_iter, metrics=eval_metrics,
              pending_metrics=[{k: float(v) for k, v in m.items()}
                               for m in jax.device_get(pending)])

  # ---- Train.
  report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                           every_steps=config.log_every_steps, every_secs=None)
  pending, last_log_time, summary = list(pending_records), time.monotonic(), {}
  with metric_writers.ensure_flushes(writer), preemption.StopSignals() as stop_signals:
    for step in range(start_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = parallel.to_global(next(train_iter), mesh)
        states, step_metrics = train_step(states, batch, step_rng)
      pending.append(step_metrics)
      report(step)
      last = step == config.num_train_steps
      if step % config.log_every_steps == 0 or last:
        means = {f"train/{k}": float(np.mean(v))
                 for k, v in jax.device_get(jax.tree.map(lambda *x: np.stack(x), *pending)).items()}
        if not all(np.isfinite(v) for v in means.values()):
          raise NonFiniteError(f"Non-finite training metrics at step {step}: {means}. "
                               f"Nothing after it was saved. {_last_good(ckpt)}")
        now = time.monotonic()
        means["train/steps_per_sec"] = len(pending) / (now - last_log_time)
        writer.write_scalars(step, means)
        pending, last_log_time = [], now
      eval_metrics = None
      if step % config.eval_every_steps == 0 or last:
        summary = run_eval(states["seg"], step)
        eval_metrics = {"miou": summary["eval/miou"]}
      saved = step % config.checkpoint_every_steps == 0 or eval_metrics is not None
      if saved:
        save(step, pending, eval_metrics)
      stop = stop_signals.agreed()
      if stop and not last:
        if not saved:
          save(step, pending)
        ckpt.wait_until_finished()
        writer.flush()
        if jax.process_count() > 1:
          # No process exits before every one has its part of the checkpoint on disk: a
          # scheduler may kill the others on the first exit (srun --kill-on-bad-exit).
          multihost_utils.sync_global_devices(f"segjax: saved step {step} before stopping")
        raise preemption.Preempted(step, stop, os.path.join(workdir, "checkpoints"))
    if start_step >= config.num_train_steps:
      logging.info("Training already finished at step %d; evaluating.", start_step)
      summary = run_eval(states["seg"], start_step, write=False)
  ckpt.wait_until_finished()
  logging.info("Best checkpoint by target mIoU: step %s.", ckpt.best_step())
  writer.close()
  if is_primary:
    workdir_lib.write_json_atomically(os.path.join(workdir, "final_metrics.json"), summary)
  return summary


def _all_finite(tree) -> jax.Array:
  """Whether every floating-point leaf of `tree` is finite (one reduction, on the device)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _last_good(ckpt: checkpointing.Checkpointer) -> str:
  steps = ckpt.all_steps()
  return (f"The last good checkpoint is step {steps[-1]}." if steps
          else "No checkpoint was written yet.")


def _flatten(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _flatten(value, name + ".")
    else:
      yield name, value if isinstance(value, (int, float, str, bool)) else str(value)
