"""Lower bound: the segmenter trained on source labels only (adapt.method='source_only').

  python -m segjax.main --config=configs/source_only.py --workdir=runs/source_only
  python -m segjax.main --config=configs/source_only.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=DeepLab_resnet_pretrained_init-f81d91e8.pth \
      --workdir=runs/source_gta5

Without roots: the network and data of configs/adapt.py. With roots (gta5= or
synthia=, and cityscapes=): configs/deeplabv2_gta5_cityscapes.py without the
discriminator (published: 36.6 mIoU GTA5 -> Cityscapes, UDA-REFERENCE.md 1a).
"""

from configs import default, deeplabv2_gta5_cityscapes, recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if not roots:
    return default.get_config()
  config = deeplabv2_gta5_cityscapes.get_config(arg)
  config.adapt = methods.adapt_config("source_only")
  return config
