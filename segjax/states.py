"""The run's TrainStates: built from the config, as restore targets, and their starting weights.

`create_states` builds the method's states replicated on the mesh; a fresh
run then gives its segmenters their starting weights (`initialise_segmenters`:
model.backbone_weights, and config.init_from or a method's own sources such as
MPL's teacher, each 'WORKDIR[:latest|best|STEP]'). The training loop
(`segjax.train`), evaluation (`segjax.evaluate`) and the tools build their
states here, so that all of them restore what training saved.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from segjax import checkpointing, methods, models, optim, parallel, steps
from segjax.methods import base
from segjax.models import weights


def segmenter_init(config: ml_collections.ConfigDict, rng: jax.Array, num_classes: int):
  """A function building the segmenter's TrainState, and its learning-rate schedule."""
  height, width = config.data.crop_size
  seg_model = base.build_segmenter(config, num_classes)
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
  """A fresh run's segmenters: backbone weights in each (`method.pretrained_states`), copied
  where the method keeps them (`method.keep_pretrained`), then those with a source
  (`segmenter_sources`) replaced by that run's segmenter, then the method's own files
  (`method.load_initial`)."""
  states = dict(states)
  if config.model.backbone_weights:
    for name in method.pretrained_states:
      states[name] = load_backbone_weights(states[name], config.model, mesh)
    states = method.keep_pretrained(states)
  for name, (field, source) in segmenter_sources(method, config).items():
    states[name] = init_segmenter_from(states[name], config, num_classes, mesh, source, field)
  return method.load_initial(states, mesh)


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
