"""What the methods share: the segmenter's supervised update and discriminator plumbing."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax import accumulate, losses, methods, models, optim, parallel, steps


class Method:
  """Base class: the segmenter trained on source labels; subclasses add their terms and states."""
  uses_target: bool = True
  target_labels: bool = False
  # The segmenter TrainStates that receive model.backbone_weights on a fresh run.
  pretrained_states: tuple[str, ...] = ("seg",)
  # The fields of config.adapt the method reads, with their defaults (segjax.methods).
  adapt_fields: dict[str, Any] = {}
  # Whether the step computes the segmenter's gradient in optim.accumulate_steps micro-batches.
  accumulates: bool = False

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    self.config = config
    self.num_classes = num_classes
    self.adapt = methods.fields_of(config.adapt.method, config.adapt)
    self.seg_loss = losses.from_config(config.loss)
    self.aux_weights = tuple(config.loss.aux_weights)
    self.detail_weight = config.loss.get("detail_weight", 0.1)
    self.mean, self.std = tuple(config.data.mean), tuple(config.data.std)
    self.seg_tx, self.seg_lr = optim.segmenter_optimizer(config.optim.seg, config.num_train_steps)
    self.accumulate_steps = config.optim.get("accumulate_steps", 1)
    check_accumulation(config, type(self))

  # ---- States.

  def state_inits(self, rng: jax.Array, seg_init: Callable) -> dict[str, Callable]:
    """Functions creating each TrainState, by name; 'seg' is the segmenter."""
    del rng
    return {"seg": seg_init}

  @property
  def segmenter_sources(self) -> dict[str, tuple[str, str]]:
    """Segmenters besides 'seg' (config.init_from) that can start as another run's:
    {state: (config field, 'WORKDIR[:latest|best|STEP]' or '')}."""
    return {}

  def keep_pretrained(self, states: dict) -> dict:
    """A fresh run's states once the backbone weights are loaded, before any segmenter starts
    as another run's (`segmenter_sources`): DAFormer copies its frozen ImageNet encoder here."""
    return states

  def load_initial(self, states: dict, mesh) -> dict:
    """A fresh run's states once its segmenters have their starting weights: here the
    method loads files of its own (VFM-UDA++'s frozen DINOv2)."""
    del mesh
    return states

  @property
  def schedules(self) -> dict[str, optax.Schedule]:
    return {"seg": self.seg_lr}

  def discriminator_init(self, rng: jax.Array, input_shape: tuple[int, ...]) -> Callable:
    """A function creating a discriminator TrainState (config.disc, optim.disc)."""
    model = models.build_discriminator(self.config.disc, self.num_classes)
    tx, _ = optim.discriminator_optimizer(self.config.optim.disc, self.config.num_train_steps)

    def init():
      variables = model.init(rng, jnp.zeros(input_shape))
      return steps.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
    return init

  @property
  def disc_schedule(self) -> optax.Schedule:
    return optim.discriminator_optimizer(self.config.optim.disc, self.config.num_train_steps)[1]

  # ---- Pieces of steps.

  def value_and_grad(self, loss_fn: accumulate.LossFn, params, inputs, carry):
    """((loss, (carry, parts)), grads) of `loss_fn(params, inputs, carry)` over this device's
    batch, in `optim.accumulate_steps` micro-batches (`segjax.accumulate`)."""
    return accumulate.value_and_grad(loss_fn, params, inputs, carry, self.accumulate_steps)

  def preprocess(self, images: jax.Array) -> jax.Array:
    return steps.preprocess(images, self.mean, self.std)

  def source_loss(self, outputs: dict, labels: jax.Array, axis_name: str):
    return steps.supervised_loss(outputs, labels, self.seg_loss, self.aux_weights, axis_name,
                                 self.detail_weight)

  def weighted_loss(self, outputs: dict, labels: jax.Array, weights: jax.Array, axis_name: str,
                    name: str) -> tuple[jax.Array, dict]:
    """The confidence-weighted CE of pseudo-labelled (or mixed) images: `name`, and with an
    HRDA segmenter `name`_detail on the detail windows, x loss.detail_weight, the fused
    prediction's x (1 - loss.detail_weight) (`segjax.steps.supervised_loss`)."""
    loss = global_mean(losses.weighted_cross_entropy(outputs["logits"], labels, weights),
                       axis_name)
    parts = {name: loss}
    if "detail_logits" in outputs:
      detail = global_mean(losses.weighted_cross_entropy(
          outputs["detail_logits"], steps.detail_crop(outputs, labels),
          steps.detail_crop(outputs, weights)), axis_name)
      parts[f"{name}_detail"] = detail
      loss = (1.0 - self.detail_weight) * loss + self.detail_weight * detail
    return loss, parts

  def source_then_target(self, seg: steps.TrainState, params, batch: dict, src_rng: jax.Array,
                         tgt_rng: jax.Array, axis_name: str):
    """The segmenter on the source batch (its supervised loss) then on the target batch.

    Both passes in training mode, the target's BatchNorm update following the
    source's. Returns (source outputs, target outputs, batch statistics,
    source loss, its parts).
    """
    src_out, stats = segment(seg, params, seg.batch_stats,
                             self.preprocess(batch["source"]["image"]), src_rng)
    loss, parts = self.source_loss(src_out, batch["source"]["label"], axis_name)
    tgt_out, stats = segment(seg, params, stats, self.preprocess(batch["target"]["image"]),
                             tgt_rng)
    return src_out, tgt_out, stats, loss, parts

  def step(self, states: dict, batch: dict, rng: jax.Array, *, axis_name: str):
    """One training iteration: (new states, scalar metrics). Every method defines its own."""
    raise NotImplementedError(f"{type(self).__name__} defines no step.")


def check_accumulation(config: ml_collections.ConfigDict, method_class: type) -> None:
  """optim.accumulate_steps: a positive integer, for a method and loss that accumulate exactly."""
  steps_ = config.optim.get("accumulate_steps", 1)
  if isinstance(steps_, bool) or not isinstance(steps_, int) or steps_ < 1:
    raise ValueError(f"optim.accumulate_steps={steps_!r} must be a positive integer (1: none).")
  if steps_ == 1:
    return
  if not method_class.accumulates:
    able = sorted(name for name in methods.METHODS if methods.method_class(name).accumulates)
    raise ValueError(f"optim.accumulate_steps={steps_}: adapt.method={config.adapt.method!r} "
                     f"does not accumulate gradients; the methods that do: {', '.join(able)}.")
  if config.loss.name == "ohem":
    raise ValueError(f"optim.accumulate_steps={steps_} with loss.name='ohem': OHEM keeps the "
                     f"hardest pixels of the whole batch, which micro-batches cannot count; use "
                     f"another loss or optim.accumulate_steps=1.")
  if config.batch_size % steps_:
    raise ValueError(f"optim.accumulate_steps={steps_} must divide batch_size="
                     f"{config.batch_size} (and each device's share of it).")


def build_segmenter(config: ml_collections.ConfigDict, num_classes: int):
  """The segmenter of config.model as the steps apply it, inside the data-parallel mesh: its
  BatchNorm averages the batch statistics over the data axis with model.sync_batch_stats, so
  that they do not depend on the number of devices, else each device keeps its own."""
  bn_axis_name = parallel.DATA_AXIS if config.model.sync_batch_stats else None
  return models.build_segmenter(config.model, num_classes, bn_axis_name)


def step_rng(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The run's key folded with the step (from 1): the same on every device.

  Dropout folds in each example's global index (`layers.Dropout`), so every
  step and example draws its own masks, whatever the number of devices.
  """
  return jax.random.fold_in(rng, step + 1)


def segment(state: steps.TrainState, params, batch_stats, images: jax.Array, rng,
            train: bool = True, **kwargs) -> tuple[dict, dict]:
  """The segmenter's outputs and updated batch statistics (see steps._segment)."""
  return steps._segment(state, params, batch_stats, images, rng, train, **kwargs)  # pylint: disable=protected-access


def apply_seg_gradients(state: steps.TrainState, grads, batch_stats,
                        axis_name: str) -> steps.TrainState:
  """The segmenter's update; per-device BatchNorm statistics are averaged to stay replicated."""
  return state.apply_gradients(grads=grads, batch_stats=jax.lax.pmean(batch_stats, axis_name))


def global_mean(pair: tuple[jax.Array, jax.Array], axis_name: str) -> jax.Array:
  return losses.global_mean(*pair, axis_name)

