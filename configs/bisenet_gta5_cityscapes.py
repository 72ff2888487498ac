"""BiSeNet ResNet-18, GTA5 -> Cityscapes: the real-time UDA seed (output-space adversarial).

  python -m segjax.main --config=configs/bisenet_gta5_cityscapes.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=resnet18.safetensors --workdir=runs/bisenet

Recipe (UDA-REFERENCE.md 2f): GTA5 resized to 1280x720 and Cityscapes to
1024x512, batch 4; SGD momentum 0.9, weight decay 1e-4, lr 2.5e-4 (the UDA
runs' value), poly 0.9; CE with ignore 255 on the main head and both
auxiliary heads (weights 1, 1); discriminator on softmax(target) with Adam
1e-4, betas (0.9, 0.99), lambda_adv 0.001; `--config.disc.name=dsc` selects
the light depthwise-separable discriminator. 50 epochs of the 2,975
Cityscapes training images at batch 4 are 37,200 steps. Difference: the
seed steps the poly schedule once per epoch; here it decays every step.
"""

from configs import recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.parse_roots(arg, ("gta5", "cityscapes"))
  config = recipes.base("bisenet_r18")
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = 37_200
  config.log_every_steps = 100
  config.eval_every_steps = 3_700
  config.checkpoint_every_steps = 1_000
  config.data.source = recipes.dataset("gta5", roots, "train", "source", (720, 1280), 24_966)
  config.data.target = recipes.dataset("cityscapes", roots, "train", "target", (512, 1024), 2_975)
  config.data.eval = recipes.dataset("cityscapes", roots, "val", "target", (512, 1024), 500,
                                     full_res_labels=True)
  config.data.crop_size = (512, 1024)
  config.data.source.crop_size = (720, 1280)  # The whole resized GTA5 image, uncropped.
  config.data.augment.scale_range = (1.0, 1.0)
  config.loss.aux_weights = (1.0, 1.0)
  config.optim.seg.update(lr=2.5e-4, momentum=0.9, weight_decay=1e-4, power=0.9)
  config.optim.disc.update(lr=1e-4, b1=0.9, b2=0.99, power=0.9)
  config.adapt = methods.adapt_config("adaptsegnet", lambda_adv=0.001)
  config.disc.name = "fcd"
  return config
