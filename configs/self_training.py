"""Self-training with an EMA teacher and ClassMix (DACS; the DAFormer recipe's UDA part).

  python -m segjax.main --config=configs/self_training.py --workdir=runs/self_training
  python -m segjax.main --config=configs/self_training.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=DeepLab_resnet_pretrained_init-f81d91e8.pth \
      --workdir=runs/dacs_gta5

Teacher momentum 0.999 and pseudo-label threshold 0.968 (DAFormer's final
config), ClassMix of half the source classes, colour jitter (0.2, on 80% of
the images: DACS's p 0.2 is the share left alone) and Gaussian blur on the
mixed images (UDA-REFERENCE.md 2g).

Without roots: the built-in scenes with CompactSeg (as configs/adapt.py).
With roots (gta5= or synthia=, and cityscapes=): DACS's setting on
configs/deeplabv2_gta5_cityscapes.py: DeepLab-v2 R101, SGD 2.5e-4 (heads 10x),
poly 0.9, batch 2 + 2, random 512x512 crops with flips, 250k iterations.
Published GTA5 -> Cityscapes mIoU: DACS 52.1; DAFormer (MiT-B5 SegFormer,
AdamW 6e-5, rare-class sampling, ImageNet feature distance; not in segjax)
68.3. Add DAFormer's pseudo-label crop with --config.adapt.st_ignore_top=0.0293
--config.adapt.st_ignore_bottom=0.2344 (15 and 120 of 512 rows).
"""

from configs import adapt, deeplabv2_gta5_cityscapes, recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if not roots:
    config = adapt.get_config()
    config.adapt = methods.adapt_config("self_training")
    return config
  config = deeplabv2_gta5_cityscapes.get_config(arg)
  config.batch_size = 2
  config.num_train_steps = 250_000
  config.optim.seg.decay_steps = 250_000
  config.data.crop_size = (512, 512)  # Both domains (ClassMix pastes source onto target).
  config.data.source.crop_size = config.data.target.crop_size = ()
  config.data.augment.flip = True
  config.loss.aux_weights = (0.1,)
  config.adapt = methods.adapt_config("self_training")
  return config
