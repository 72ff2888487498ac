"""The start-up checks of a training config: what cannot work fails before anything is built.

`validate_config` runs first in `segjax.train.train_and_evaluate`, so that a
wrong field costs seconds rather than a compilation, and its message names
the field.
"""

import os

import ml_collections

from segjax import data, errors, inference, losses, methods, models, optim, parallel, states


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails early with a ConfigError (or CheckpointError) naming the field, on settings that
  cannot work."""
  with errors.config_checks():
    methods.check_adapt(config.adapt)
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
    for field, source in states.segmenter_sources(method, config).values():
      states.init_from_step(source, field)
    source_info = data.dataset_info(config.data.source, "data.source")
    for field in ("data.target", "data.eval"):
      info = data.dataset_info(config.data[field.split(".")[1]], field)
      if info.class_names != source_info.class_names:
        raise ValueError(f"{field} ({config.data[field.split('.')[1]].name}) and data.source do "
                         "not share one label space.")
