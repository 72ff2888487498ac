"""Tiny source-only run on a Cityscapes tree, for the evaluation tests: seconds on a CPU.

  python -m segjax.main --config=configs/test_cityscapes.py:/data/cityscapes --workdir=/tmp/cs
  python -m segjax.evaluate --config=configs/test_cityscapes.py:/data/cityscapes --workdir=/tmp/cs

Trains CompactSeg (width 8) on the train split read at 64x128 and evaluates
on the val split at 64x128 with full-resolution labels. The tests run it on
the fixture tree (3 train images, 1 val image), where it reaches no
meaningful mIoU: it exists to check evaluation, not accuracy.
"""

from configs import default, recipes


def get_config(root: str):
  config = default.get_config()
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 2
  config.log_every_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.num_eval_samples = 1
  size = (64, 128)
  config.data.source = recipes.real_dataset("cityscapes", root, "train", resize=size)
  config.data.target = recipes.real_dataset("cityscapes", root, "train", resize=size)
  config.data.eval = recipes.real_dataset("cityscapes", root, "val", resize=size,
                                          resize_labels=False)
  config.data.crop_size = size
  config.data.augment.scale_range = (1.0, 1.25)
  config.model.width = 8
  config.model.dropout_rate = 0.0
  config.optim.seg.lr = 0.05
  return config
