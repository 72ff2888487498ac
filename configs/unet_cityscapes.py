"""UNet on Cityscapes (seed d: "UNet vs DeepLabV3+"), supervised, from scratch.

  python -m segjax.main --config=configs/unet_cityscapes.py:cityscapes=ROOT --workdir=runs/unet

The recipe of configs/deeplabv3plus_cityscapes.py (Adam 1e-3, weight decay
1e-5, batch 8, CE + focal, Hamburg/Frankfurt at 512x256) with the reference
UNet. `--config.model.name=unet_small` trains the seed's shallow "my_FCN".
"""

from configs import deeplabv3plus_cityscapes


def get_config(arg: str | None = None):
  return deeplabv3plus_cityscapes.seed_d("unet", arg)
