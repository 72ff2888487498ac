"""Optimizers and learning-rate schedules of the seeds' recipes."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from segjax.models import weights

OPTIMIZERS = ("sgd", "adam", "adamw")


def poly_schedule(base_lr: float, num_steps: int, power: float = 0.9) -> optax.Schedule:
  """lr = base * (1 - step / num_steps) ** power (DeepLab's 'poly' policy); power 0 is constant."""
  if power == 0:
    return optax.constant_schedule(base_lr)

  def schedule(step):
    # Clamped at 0: under jit, 1 - T/T can round to -1e-7, and its 0.9th power is NaN
    # (optax.polynomial_schedule gives NaN at step T for this reason).
    remaining = jnp.maximum(1.0 - jnp.asarray(step, jnp.float32) / num_steps, 0.0)
    return base_lr * remaining ** power
  return schedule


WARMUP_MODES = ("mmcv", "linspace")


def warmup_poly_schedule(base_lr: float, num_steps: int, power: float, warmup_steps: int,
                         warmup_ratio: float, mode: str = "mmcv") -> optax.Schedule:
  """The poly schedule with a linear warm-up over the first `warmup_steps`.

  'mmcv' (DAFormer's 'poly10warm'): the poly schedule times a factor rising
  linearly from `warmup_ratio` at step 0 to 1 at `warmup_steps`. 'linspace'
  (VFM-UDA's and VFM-UDA++'s `WarmupAndLinearScheduler`): base_lr x
  `np.linspace(warmup_ratio, 1, warmup_steps)` over the warm-up, so the full
  lr at its last step, undecayed, then the poly schedule.
  """
  if mode not in WARMUP_MODES:
    raise ValueError(f"optim.seg.warmup_mode={mode!r} must be one of {list(WARMUP_MODES)}.")
  poly = poly_schedule(base_lr, num_steps, power)
  if warmup_steps <= 0:
    return poly

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if mode == "mmcv":
      # = 1 - (1 - step / warmup_steps) * (1 - warmup_ratio), without float32's cancellation.
      factor = warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
      return poly(step) * jnp.where(step < warmup_steps, factor, 1.0)
    ramp = warmup_ratio + (1.0 - warmup_ratio) * step / max(warmup_steps - 1, 1)
    return jnp.where(step < warmup_steps, base_lr * ramp, poly(step))
  return schedule


def decays(path: tuple[str, ...], no_decay: tuple[str, ...]) -> bool:
  """Whether weight decay applies to the parameter at `path`: not when a name in `no_decay`
  is part of its '/'-joined path (mmcv's `custom_keys` with decay_mult 0 match so)."""
  joined = "/".join(path)
  return not any(name in joined for name in no_decay)


def _scaled(schedule: optax.Schedule, factor: float) -> optax.Schedule:
  return schedule if factor == 1 else (lambda step: factor * schedule(step))


def _base(config: ml_collections.ConfigDict, schedule: optax.Schedule,
          field: str) -> optax.GradientTransformation:
  """One optimizer by name. Weight decay is L2 added to the gradient (PyTorch's SGD and
  Adam `weight_decay`), except for 'adamw', where it is decoupled."""
  name = config.get("name", "sgd")
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum or None))
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.adam(schedule, b1=config.b1, b2=config.b2))
  if name == "adamw":
    no_decay = tuple(config.get("no_decay", ()))
    mask = None if not no_decay else lambda params: _decay_mask(params, no_decay)
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                       mask=mask)
  raise ValueError(f"Unknown optimizer {name!r} (config field {field}.name); expected one of "
                   f"{list(OPTIMIZERS)}.")


def _decay_mask(params, no_decay: tuple[str, ...]):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decays(tuple(str(getattr(k, "key", k)) for k in path), no_decay), params)


def segmenter_optimizer(config: ml_collections.ConfigDict,
                        num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The segmenter's optimizer with poly decay (SGD with momentum and L2 by default).

  The poly decay spans `decay_steps` (AdaptSegNet decays over 250k steps and
  stops at 150k) or, when that is 0 or absent, the whole run. `head_lr_mult`
  scales the learning rate of everything outside the pretrained backbone (the
  heads learn 10x faster in AdaptSegNet, ADVENT, BiSeNet and DAFormer).
  `warmup_steps` / `warmup_ratio` warm the schedule up linearly (DAFormer:
  1,500 steps from 1e-6 of the lr), as `warmup_mode` ('mmcv', 'linspace':
  `warmup_poly_schedule`) says; `no_decay` (AdamW) names parameters
  without weight decay (DAFormer: 'norm', 'pos_block'). Returns the
  transformation and the backbone's schedule (the one logged as lr).
  `layer_decay` (VFM-UDA++: 0.9) scales the backbone's learning rate by
  layer, as BEiT's layer-wise decay (`scale_by_layer`).
  """
  if config.get("no_decay") and config.get("name", "sgd") != "adamw":
    raise ValueError(f"optim.seg.no_decay={tuple(config.no_decay)} is read by AdamW only "
                     f"(optim.seg.name='adamw'), not {config.get('name', 'sgd')!r}.")
  schedule = warmup_poly_schedule(config.lr, config.get("decay_steps", 0) or num_steps,
                                  config.power, config.get("warmup_steps", 0),
                                  config.get("warmup_ratio", 1e-6),
                                  config.get("warmup_mode", "mmcv"))
  mult = config.get("head_lr_mult", 1.0)
  decay = config.get("layer_decay", 1.0)
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"optim.seg.layer_decay={decay} must be in (0, 1].")
  if decay != 1.0:
    return optax.chain(_base(config, schedule, "optim.seg"),
                       scale_by_layer(mult, decay)), schedule
  if mult == 1.0:
    return _base(config, schedule, "optim.seg"), schedule

  def label(params):
    return {k: jax.tree.map(lambda _: "backbone" if k == weights.BACKBONE else "head", v)
            for k, v in params.items()}

  tx = optax.multi_transform(
      {"backbone": _base(config, schedule, "optim.seg"),
       "head": _base(config, _scaled(schedule, mult), "optim.seg")}, label)
  return tx, schedule


def layer_multiplier(path: tuple[str, ...], blocks: int, head_mult: float,
                     decay: float) -> float:
  """The learning-rate multiplier of the parameter at `path` under layer-wise decay: outside
  the backbone `head_mult`; in its block i of `blocks` decay^(blocks - 1 - i); the rest of
  the backbone (patch and position embeddings, class token) decay^blocks."""
  if path[0] != weights.BACKBONE:
    return head_mult
  block = re.fullmatch(r"blocks_(\d+)", path[1]) if len(path) > 1 else None
  return decay ** (blocks - 1 - int(block[1])) if block else decay ** blocks


def scale_by_layer(head_mult: float, decay: float) -> optax.GradientTransformation:
  """Scales each update by its `layer_multiplier` (the number of blocks counted from the
  backbone's `blocks_<i>`). After AdamW, whose update already holds the decoupled weight
  decay, this is PyTorch's AdamW with one parameter group per layer (VFM-UDA++'s
  `configure_optimizers`: the decoder at the lr, block i of n at lr x 0.1 x 0.9^(n-1-i),
  the embeddings at lr x 0.1 x 0.9^n)."""
  def update(updates, state, params=None):
    del params
    flat = traverse_util.flatten_dict(updates)
    blocks = 1 + max((int(m[1]) for path in flat if path[0] == weights.BACKBONE
                      for m in [re.fullmatch(r"blocks_(\d+)", path[1])] if m), default=-1)
    scaled = {path: value * layer_multiplier(path, blocks, head_mult, decay)
              for path, value in flat.items()}
    return traverse_util.unflatten_dict(scaled), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def discriminator_optimizer(config: ml_collections.ConfigDict,
                            num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with AdaptSegNet's betas (0.9, 0.99), poly decay."""
  schedule = poly_schedule(config.lr, config.get("decay_steps", 0) or num_steps, config.power)
  return optax.adam(schedule, b1=config.b1, b2=config.b2), schedule
