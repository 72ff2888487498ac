"""DeepLabV3+ ResNet-101 on Cityscapes (seed d: "UNet vs DeepLabV3+"), supervised.

  python -m segjax.main --config=configs/deeplabv3plus_cityscapes.py:cityscapes=ROOT \
      --config.model.backbone_weights=resnet101.safetensors --workdir=runs/deeplabv3plus

Recipe (UDA-REFERENCE.md 2i and the seed's table): Cityscapes Hamburg and
Frankfurt subsets at low resolution (512x256), resize + random crop + colour
jitter; Adam lr 1e-3 with weight decay 1e-5, batch 8, 500 epochs; loss
CE + focal (gamma 2); reported metrics: global accuracy, mean accuracy, IoU.
DeepLabV3+ at output stride 16 (ASPP rates 6/12/18). The seed's schedule is
constant; so is this one (poly power 0).
"""

from configs import recipes
from segjax import methods


def get_config(arg: str | None = None):
  return seed_d("deeplabv3plus_r101", arg)


def seed_d(model: str, arg: str | None):
  """Seed d's supervised Cityscapes recipe, shared by DeepLabV3+ and UNet."""
  roots = recipes.parse_roots(arg, ("cityscapes",))
  config = recipes.base(model)
  config.batch_size = 8
  config.eval_batch_size = 8
  # Hamburg (248 images) + Frankfurt's val images, 500 epochs at batch 8.
  config.num_train_steps = 15_500
  config.log_every_steps = 50
  config.eval_every_steps = 1_550
  config.checkpoint_every_steps = 1_550
  config.data.source = recipes.dataset("cityscapes", roots, "train", "target", (256, 512), 248)
  config.data.target = recipes.dataset("cityscapes", roots, "train", "target", (256, 512), 248)
  config.data.eval = recipes.dataset("cityscapes", roots, "val", "target", (256, 512), 267,
                                     full_res_labels=True)
  if "cityscapes" in roots:
    config.data.source.cities = ("hamburg",)
    config.data.eval.cities = ("frankfurt",)
  config.data.crop_size = (256, 512)
  config.loss.name = "ce+focal"
  config.loss.focal_gamma = 2.0
  config.optim.seg.update(name="adam", lr=1e-3, b1=0.9, b2=0.999, weight_decay=1e-5, power=0.0)
  config.adapt = methods.adapt_config("source_only")
  return config
