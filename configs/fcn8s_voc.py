"""FCN-8s VGG16 on PASCAL VOC 2011/2012 (Long et al. 2015), supervised.

  python -m segjax.main --config=configs/fcn8s_voc.py:voc=ROOT \
      --config.model.backbone_weights=vgg16.safetensors --workdir=runs/fcn8s_voc

Recipe (UDA-REFERENCE.md 2d, the paper): 21 classes; SGD momentum 0.9,
weight decay 5e-4, fixed lr 1e-4, minibatch 20; score layers zero-initialised,
the 2x deconvolutions bilinear-initialised and learned, the final 8x
upsampling fixed bilinear; conv1_1 padded by 100 and cropped, as the
reference. Images are up to 500x500, so crops of 500x500 padded with the
ignore label keep every pixel. Differences: one stage instead of the
32s -> 16s -> 8s staged training; biases share the weights' lr and decay.
The shelhamer repo's 'heavy' solver (batch 1, momentum 0.99, unnormalised
loss, lr 1e-14) is the same update in a different parameterisation.
"""

from configs import recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.parse_roots(arg, ("voc",))
  config = recipes.base("fcn8s_vgg16")
  config.batch_size = 20
  config.eval_batch_size = 20
  config.num_train_steps = 100_000
  config.log_every_steps = 100
  config.eval_every_steps = 4_000
  config.checkpoint_every_steps = 2_000
  # VOC images (at most 500x500) are read at their native size; evaluation pads them.
  config.data.source = recipes.dataset("voc", roots, "train", "target", (500, 500), 1_464,
                                       resize=())
  config.data.target = recipes.dataset("voc", roots, "train", "target", (500, 500), 1_464,
                                       resize=())
  config.data.eval = recipes.dataset("voc", roots, "val", "target", (500, 500), 1_449,
                                     resize=(), pad_to=(500, 500))
  config.data.crop_size = (500, 500)
  config.data.augment.scale_range = (1.0, 1.0)
  config.data.augment.brightness = config.data.augment.contrast = 0.0
  config.data.augment.saturation = config.data.augment.hue = 0.0
  config.model.conv1_padding = 100
  config.model.learned_upsampling = True
  config.model.dropout_rate = 0.5
  config.optim.seg.update(lr=1e-4, momentum=0.9, weight_decay=5e-4, power=0.0)
  config.adapt = methods.adapt_config("source_only")
  return config
