"""Optimizers and learning-rate schedules of the UDA recipes."""

import ml_collections
import optax


def poly_schedule(base_lr: float, num_steps: int, power: float = 0.9) -> optax.Schedule:
  """lr = base * (1 - step / num_steps) ** power (DeepLab's 'poly' policy)."""
  return optax.polynomial_schedule(init_value=base_lr, end_value=0.0, power=power,
                                   transition_steps=num_steps)


def segmenter_optimizer(config: ml_collections.ConfigDict,
                        num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and L2 weight decay (PyTorch's `SGD(weight_decay=...)`), poly decay."""
  schedule = poly_schedule(config.lr, num_steps, config.power)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum))
  return tx, schedule


def discriminator_optimizer(config: ml_collections.ConfigDict,
                            num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with AdaptSegNet's betas (0.9, 0.99), poly decay."""
  schedule = poly_schedule(config.lr, num_steps, config.power)
  return optax.adam(schedule, b1=config.b1, b2=config.b2), schedule
