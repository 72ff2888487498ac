"""MIC on HRDA (Hoyer et al. 2023): HRDA plus masked image consistency.

  python -m segjax.main --config=configs/mic.py --workdir=runs/mic
  python -m segjax.main --config=configs/mic.py:gta5=ROOT,cityscapes=ROOT \\
      --config.model.backbone_weights=mit_b5.pth --workdir=runs/mic_gta5

configs/hrda.py with `adapt.mic=True` (`gtaHR2csHR_mic_hrda.py`): each target
image, colour-jittered and blurred with its own draws, masked in 64x64 blocks
of which 70% are masked, and the student's (fused and detail) prediction of
it learns the teacher's confidence-weighted pseudo labels of the unmasked
image, weight 1. Published: 75.9 mIoU GTA5 -> Cityscapes (reruns 75.62 /
76.03 / 75.90). MIC on DAFormer is configs/daformer.py with
`--config.adapt.mic=True`.

Differences from the published recipe: configs/hrda.py's; the colour
augmentation of the masked images is drawn per image (MIC draws it per batch).

Without roots: configs/hrda.py's built-in settings with MIC's blocks of 4
pixels (its 64 of 1024 scaled to the 64-row crops).
"""

from configs import hrda, recipes


def get_config(arg: str | None = None):
  config = hrda.get_config(arg)
  config.adapt.mic = True
  config.adapt.mic_block = 64 if recipes.uda_roots(arg) else 4
  return config
