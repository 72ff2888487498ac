"""AdaptSegNet (Tsai et al. 2018): output-space adversarial adaptation.

  python -m segjax.main --config=configs/adaptsegnet.py --workdir=runs/adaptsegnet
  python -m segjax.main --config=configs/adaptsegnet.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=DeepLab_resnet_pretrained_init-f81d91e8.pth \
      --workdir=runs/adaptsegnet_gta5

Without roots: the main job on the built-in scenes (configs/adapt.py: CompactSeg,
single level, lambda_adv 0.01). With roots (gta5= or synthia=, and
cityscapes=): the published multi-level recipe (UDA-REFERENCE.md 2a) on
configs/deeplabv2_gta5_cityscapes.py: DeepLab-v2 R101, one FCD per level,
lambda_adv 0.001 (layer4) and 0.0002 (layer3), lambda_seg 0.1 on the layer3
head, 150k of a 250k-step poly schedule. Published GTA5 -> Cityscapes mIoU:
42.4 multi-level, 41.4 single-level (UDA-REFERENCE.md 1a). Options:
--config.adapt.gan=ls (LS-GAN; the paper's single-level LS weight is 0.01),
--config.adapt.lambda_adv_aux=0 (single level), --config.disc.name=dsc (the
seed's light depthwise-separable discriminator).
"""

from configs import adapt, deeplabv2_gta5_cityscapes, recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if not roots:
    return adapt.get_config()
  config = deeplabv2_gta5_cityscapes.get_config(arg)
  config.adapt = methods.adapt_config("adaptsegnet", lambda_adv=0.001, lambda_adv_aux=0.0002)
  return config
