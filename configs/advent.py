"""ADVENT (Vu et al. 2019): AdvEnt (a discriminator on self-information maps) and MinEnt.

  python -m segjax.main --config=configs/advent.py --workdir=runs/advent
  python -m segjax.main --config=configs/advent.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=DeepLab_resnet_pretrained_init-f81d91e8.pth \
      --workdir=runs/advent_gta5

AdvEnt by default; MinEnt alone with --config.adapt.lambda_adv=0
--config.adapt.lambda_adv_aux=0 --config.adapt.lambda_ent=0.001
--config.adapt.lambda_ent_aux=0.0002; both with the lambda_ent fields set too
(a joint objective: the paper averages the two models' outputs instead).

Without roots: the built-in scenes with CompactSeg (as configs/adapt.py,
lambda_adv 0.01 on the self-information map). With roots (gta5= or
synthia=, and cityscapes=): ADVENT's recipe (UDA-REFERENCE.md 2b) on
configs/deeplabv2_gta5_cityscapes.py: DeepLab-v2 R101 (ADVENT's fixed ASPP),
multi-level lambda_adv 0.001 / 0.0002, lambda_seg_aux 0.1, SGD 2.5e-4 poly over
250k and early stop at 120k. Published GTA5 -> Cityscapes mIoU: AdvEnt 43.8,
MinEnt 42.3, both (ensemble) 45.5 (UDA-REFERENCE.md 1a). ADVENT picks the best
of its snapshots on Cityscapes val; segjax keeps the best checkpoint too
(--checkpoint=best in segjax.evaluate), which is model selection on target labels.
"""

from configs import adapt, deeplabv2_gta5_cityscapes, recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if not roots:
    config = adapt.get_config()
    config.adapt = methods.adapt_config("advent", lambda_adv=0.01)
    return config
  config = deeplabv2_gta5_cityscapes.get_config(arg)
  config.num_train_steps = 120_000
  config.checkpoint_every_steps = config.eval_every_steps = 2_000
  config.adapt = methods.adapt_config("advent", lambda_adv=0.001, lambda_adv_aux=0.0002)
  return config
