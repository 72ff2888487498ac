"""Tiny adaptation run for tests: seconds on a CPU, any number of (fake) devices up to 8.

  python -m segjax.main --config=configs/test.py --workdir=/tmp/segjax_test
"""

from configs import adapt


def get_config():
  config = adapt.get_config()
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 2
  config.num_eval_samples = 2
  for split in (config.data.source, config.data.target, config.data.eval):
    split.height, split.width = 32, 64
  config.data.source.num_examples = config.data.target.num_examples = 24
  config.data.eval.num_examples = 12
  config.data.crop_size = (32, 64)
  config.model.width = 8
  config.model.dropout_rate = 0.0
  config.disc.width = 8
  return config
