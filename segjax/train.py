"""The training loop: build, restore, train, evaluate, checkpoint, report.

One linear function, `train_and_evaluate`, reads top to bottom; the pure steps
live in `segjax.steps`, the mesh in `segjax.parallel`, the input pipeline in
`segjax.data.pipeline`.
"""

import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from segjax import (checkpointing, data, errors, inference, losses, methods, metrics, models,
                    optim, parallel, preemption, reporting, steps)
from segjax import workdir as workdir_lib
from segjax.data import pipeline
from segjax.models import weights


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails early with a ConfigError (or CheckpointError) naming the field, on settings that
  cannot work."""
  with errors.config_checks():
    method = methods.build(config, 1)
    for field in ("num_train_steps", "log_every_steps", "eval_every_steps",
                  "checkpoint_every_steps"):
      if config[field] <= 0:
        raise ValueError(f"config.{field}={config[field]} must be positive.")
    for field in ("eval_every_steps", "checkpoint_every_steps"):
      if config[field] % config.log_every_steps:
        raise ValueError(
            f"config.{field}={config[field]} must be a multiple of config.log_every_steps="
            f"{config.log_every_steps}, so that a resumed run logs the same averages.")
    parallel.check_batch_size(config.batch_size, "batch_size")
    parallel.check_batch_size(config.eval_batch_size, "eval_batch_size")
    models.build_segmenter(config.model, 1)
    losses.from_config(config.loss)
    optim.segmenter_optimizer(config.optim.seg, config.num_train_steps)
    inference.Inference.from_config(config.get("inference"))
    if config.model.backbone_weights and not os.path.isfile(config.model.backbone_weights):
      raise errors.ConfigError(f"config.model.backbone_weights={config.model.backbone_weights!r} "
                               "is not a file.")
    if getattr(method, "disc_names", None):
      models.build_discriminator(config.disc, 1)
    for field, source in segmenter_sources(method, config).values():
      init_from_step(source, field)
    source_info = data.dataset_info(config.data.source, "data.source")
    for field in ("data.target", "data.eval"):
      info = data.dataset_info(config.data[field.split(".")[1]], field)
      if info.class_names != source_info.class_names:
        raise ValueError(f"{field} ({config.data[field.split('.')[1]].name}) and data.source do "
                         "not share one label space.")


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


def segmenter_init(config: ml_collections.ConfigDict, rng: jax.Array, num_classes: int):
  """A function building the segmenter's TrainState, and its learning-rate schedule."""
  height, width = config.data.crop_size
  seg_model = models.build_segmenter(config.model, num_classes)
  seg_tx, seg_lr = optim.segmenter_optimizer(config.optim.seg, config.num_train_steps)

  def init_seg():
    variables = seg_model.init(rng, jnp.zeros((1, height, width, 3)), train=False)
    return steps.TrainState.create(apply_fn=seg_model.apply, params=variables["params"],
                                   batch_stats=variables.get("batch_stats", {}), tx=seg_tx)

  return init_seg, seg_lr


def abstract_seg_state(config: ml_collections.ConfigDict, num_classes: int,
                       mesh) -> steps.TrainState:
  """The segmenter's TrainState as shapes with replicated shardings: a restore target.

  Nothing is initialised (`jax.eval_shape`), so it costs no memory or compute.
  """
  return abstract_replicated(segmenter_init(config, jax.random.key(0), num_classes)[0], mesh)


def abstract_replicated(init_fn, mesh):
  """What `init_fn()` builds, as shapes with replicated shardings on `mesh` (`jax.eval_shape`:
  nothing is initialised): a restore target."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(init_fn))


def create_states(config: ml_collections.ConfigDict, rng: jax.Array, num_classes: int,
                  mesh) -> tuple[dict, dict]:
  """Builds the method's TrainStates (replicated on the mesh) and their learning-rate schedules."""
  method = methods.build(config, num_classes)
  seg_rng, other_rng = jax.random.split(rng)
  init_seg, _ = segmenter_init(config, seg_rng, num_classes)
  inits = method.state_inits(other_rng, init_seg)
  states = {name: parallel.make_replicated(init, mesh) for name, init in inits.items()}
  return states, method.schedules


def load_backbone_weights(seg_state: steps.TrainState, model_config: ml_collections.ConfigDict,
                          mesh) -> steps.TrainState:
  """Replaces the segmenter's backbone variables with `model_config.backbone_weights`.

  The optimizer state does not depend on the parameter values at step 0
  (momentum and moments start at zero), so only params and batch_stats change.
  """
  path = model_config.backbone_weights
  seg_class = models.segmenter_class(model_config.name)
  if not hasattr(seg_class, "backbone_torch_key"):
    raise ValueError(f"model.backbone_weights is set, but {model_config.name!r} has no "
                     "pretrained backbone; unset it.")
  host = jax.device_get({"params": seg_state.params, "batch_stats": seg_state.batch_stats})
  loaded, report = weights.load_backbone(host, path, seg_class.backbone_torch_key)
  logging.info(report.summary(path))
  loaded = parallel.replicate_host(loaded, mesh)
  return seg_state.replace(params=loaded["params"], batch_stats=loaded["batch_stats"])


def parse_init_from(init_from: str) -> tuple[str, str]:
  """config.init_from, 'WORKDIR[:latest|best|STEP]', as (workdir, checkpoint choice)."""
  workdir, sep, choice = init_from.rpartition(":")
  if sep and (choice in ("latest", "best") or choice.isdigit()):
    return workdir, choice
  return init_from, "latest"


def init_from_step(init_from: str, field: str = "config.init_from") -> tuple[str, int]:
  """The workdir and checkpoint step `init_from` names; CheckpointError naming `field` if none."""
  workdir, choice = parse_init_from(init_from)
  try:
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1,
                                      read_only=True)
    try:
      return workdir, ckpt.select_step(choice)
    finally:
      ckpt.close()
  except checkpointing.CheckpointError as e:
    raise checkpointing.CheckpointError(f"{field}={init_from!r}: {e}") from e


def segmenter_sources(method, config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
  """The states that start as another run's segmenter: {state: (config field, its value)}.

  config.init_from for the segmenter 'seg'; a method may name more (MPL's
  teacher: adapt.mpl_teacher_from). Unset fields are left out.
  """
  sources = {"seg": ("config.init_from", config.get("init_from", "")),
             **method.segmenter_sources}
  return {name: source for name, source in sources.items() if source[1]}


def initialise_segmenters(states: dict, method, config: ml_collections.ConfigDict,
                          num_classes: int, mesh) -> dict:
  """A fresh run's segmenters: backbone weights in each (`method.pretrained_states`), then
  those with a source (`segmenter_sources`) replaced by that run's segmenter."""
  states = dict(states)
  if config.model.backbone_weights:
    for name in method.pretrained_states:
      states[name] = load_backbone_weights(states[name], config.model, mesh)
  for name, (field, source) in segmenter_sources(method, config).items():
    states[name] = init_segmenter_from(states[name], config, num_classes, mesh, source, field)
  return states


def init_segmenter_from(seg_state: steps.TrainState, config: ml_collections.ConfigDict,
                        num_classes: int, mesh, init_from: str | None = None,
                        field: str = "config.init_from") -> steps.TrainState:
  """`seg_state` with the parameters and BatchNorm statistics of the segmenter of `init_from`
  ('WORKDIR[:latest|best|STEP]'; default config.init_from), `field` naming it in errors.

  The other run must have trained the same model with the same kind of
  optimizer (the restore target is this config's segmenter state); the
  optimizer state and the step stay those of a fresh run.
  """
  init_from = config.init_from if init_from is None else init_from
  workdir, step = init_from_step(init_from, field)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1,
                                    read_only=True)
  try:
    restored = ckpt.restore_states(step, {"seg": abstract_seg_state(config, num_classes, mesh)})
  except ValueError as e:
    raise ValueError(f"{field}={init_from!r}: the segmenter of step {step} in "
                     f"{workdir} does not fit this config's model ({config.model.name}) and "
                     f"optimizer ({config.optim.seg.get('name', 'sgd')}): {e}") from e
  finally:
    ckpt.close()
  logging.info("Initialised a segmenter from step %d of %s (%s).", step, workdir, field)
  return seg_state.replace(params=restored["seg"].params,
                           batch_stats=restored["seg"].batch_stats)


def make_eval_step(config: ml_collections.ConfigDict, num_classes: int, mesh):
  """The data-parallel evaluation step, (seg_state, global batch, confusion) -> (confusion, preds).

  Test-time augmentation and sliding windows come from `config.inference`.
  """
  return parallel.data_parallel(
      functools.partial(steps.eval_step, num_classes=num_classes, mean=tuple(config.data.mean),
                        std=tuple(config.data.std),
                        inference=inference.Inference.from_config(config.get("inference"))),
      mesh, in_specs=(P(), P(parallel.DATA_AXIS), P()), out_specs=(P(), P(parallel.DATA_AXIS)))


def confusion_spec(num_classes: int, mesh) -> jax.ShapeDtypeStruct:
  """The evaluation step's running confusion matrix, for ahead-of-time compilation."""
  return jax.ShapeDtypeStruct((num_classes,) * 2, jnp.int32, sharding=parallel.replicated(mesh))


def evaluate(eval_fn, seg_state, eval_ds, mesh, num_classes: int, num_samples: int,
             on_predictions: Callable[[int, np.ndarray], None] | None = None
             ) -> tuple[np.ndarray, dict]:
  """Runs the evaluation split once; returns the confusion matrix and a few samples.

  `on_predictions(i, preds)`, if given, receives this process's rows of the
  predictions of its i-th local batch (padding records included).
  """
  def zeros():
    return parallel.make_replicated(lambda: jnp.zeros((num_classes, num_classes), jnp.int32),
                                    mesh)

  confusion = zeros()
  total = np.zeros((num_classes, num_classes), np.int64)
  pixels_on_device, samples = 0, {}
  for batch_index, local_batch in enumerate(eval_ds):
    batch_pixels = local_batch["label"].size * jax.process_count()
    if pixels_on_device + batch_pixels >= 2 ** 31:  # Flush before the int32 sum could overflow.
      total += np.asarray(confusion)
      confusion, pixels_on_device = zeros(), 0
    confusion, preds = eval_fn(seg_state, parallel.to_global(local_batch, mesh), confusion)
    pixels_on_device += batch_pixels
    if on_predictions is not None:
      on_predictions(batch_index, parallel.local_rows(preds))
    if not samples:
      n = min(num_samples, len(local_batch["image"]))
      samples = {"image": local_batch["image"][:n], "label": local_batch["label"][:n],
                 "pred": parallel.local_rows(preds)[:n]}
  total += np.asarray(confusion)
  return total, samples


def eval_subsets(config: ml_collections.ConfigDict) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """The extra mIoU subsets of the source and evaluation datasets (SYNTHIA's 16/13 classes...)."""
  subsets = dict(data.dataset_info(config.data.source, "data.source").eval_subsets)
  subsets.update(data.dataset_info(config.data.eval, "data.eval").eval_subsets)
  return tuple(subsets.items())


def eval_summary(confusion: np.ndarray, class_names: tuple[str, ...],
                 subsets: tuple = ()) -> dict[str, float]:
  """The scalars written for an evaluation: mIoU, accuracies, subsets, per-class IoU."""
  result = metrics.scores(confusion, subsets)
  summary = {"eval/miou": result["miou"], "eval/pixel_acc": result["pixel_acc"],
             "eval/mean_acc": result["mean_acc"]}
  summary.update({f"eval/{name}": result[name] for name, _ in subsets})
  summary.update({f"eval/iou/{name}": float(iou) for name, iou in zip(class_names, result["iou"])})
  return summary


class NonFiniteError(errors.UserError, FloatingPointError):
  """Training produced a non-finite loss or parameter; nothing non-finite was saved."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from the latest checkpoint in `workdir`); returns the final eval metrics.

  The workdir is locked for the run (`segjax.workdir.Lock`); SIGTERM, SIGUSR1
  and SIGINT stop it after the current step with a checkpoint of that step
  (`segjax.preemption.Preempted`).
  """
  validate_config(config)
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
  subsets = eval_subsets(config)

  # ---- States, input, restore.
  root_rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(root_rng)
  states, _ = create_states(config, init_rng, info.num_classes, mesh)
  train_batches = pipeline.train_batches(config, with_target=method.uses_target,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count(),
                                         target_labels=method.target_labels)
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
    states = initialise_segmenters(states, method, config, info.num_classes, mesh)
    if is_primary:
      workdir_lib.record_config(workdir, config)
    writer.write_hparams(dict(_flatten(config.to_dict())))

  # ---- Compiled steps.
  train_step = parallel.data_parallel(
      functools.partial(method.step, axis_name=parallel.DATA_AXIS), mesh,
      in_specs=(P(), P(parallel.DATA_AXIS), P()), out_specs=(P(), P()), donate_argnums=(0,))
  eval_step = make_eval_step(config, info.num_classes, mesh)
  step_rng = parallel.make_replicated(lambda: step_rng, mesh)
  all_finite = jax.jit(_all_finite)
  compiled = parallel.compile_all(
      {"train_step": train_step, "eval_step": eval_step},
      {"train_step": (states, parallel.global_batch_spec(train_batches[0], mesh), step_rng),
       "eval_step": (states["seg"], parallel.global_batch_spec(eval_ds[0], mesh),
                     confusion_spec(info.num_classes, mesh))})
  train_step, eval_step = compiled["train_step"], compiled["eval_step"]

  def run_eval(state, step: int, write: bool = True) -> dict[str, float]:
    confusion, samples = evaluate(eval_step, state, eval_ds, mesh, info.num_classes,
                                  config.num_eval_samples)
    summary = eval_summary(confusion, info.class_names, subsets)
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
