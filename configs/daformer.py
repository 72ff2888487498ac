"""DAFormer (Hoyer et al. 2022): self-training on a MiT encoder with the fusion decoder.

  python -m segjax.main --config=configs/daformer.py --workdir=runs/daformer
  python -m segjax.main --config=configs/daformer.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=mit_b5.pth --workdir=runs/daformer_gta5
  # DAFormer + MIC (masked image consistency: 64x64 blocks, 70% masked, weight 1):
  python -m segjax.main --config=configs/daformer.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=mit_b5.pth --config.adapt.mic=True --workdir=runs/mic

With roots (gta5= or synthia=, and cityscapes=): the published recipe
(`gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5_s0.py`): MiT-B5 with
DAFormer's context-aware fusion head (drop path 0.1, dropout 0.1), GTA5 resized
within 1280x720 keeping its aspect ratio (1280x704; SYNTHIA 1280x760),
Cityscapes to 1024x512, random 512x512 crops with flips, batch 2 source + 2
target; AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, 10x lr for the
head, no decay on norms; linear warm-up over 1,500 steps from 1e-6 of the lr,
then poly (power 1) to 40,000 steps; EMA teacher 0.999, pseudo-label threshold
0.968, the top 15 and bottom 120 rows of the pseudo labels ignored, ClassMix,
colour jitter 0.2 on 80% of the images (DAFormer's
`color_jitter_probability=0.2` is the share left unjittered: its test is
`uniform > p`) and blur; thing-class ImageNet feature distance 0.005 (needs
`model.backbone_weights`: the official `mit_b5.pth`, or a Hugging Face
`nvidia/mit-b5` file); rare-class sampling at temperature 0.01 (images with
over 3,000 pixels of the class, crops redrawn until it covers 1,500) and crops
redrawn while one class covers 75% (`cat_max_ratio`). Evaluation on the whole
1024x512 image, scored on the 2048x1024 labels. Published: 68.3 mIoU GTA5 ->
Cityscapes (mean of 3 seeds), 60.9 mIoU16 SYNTHIA -> Cityscapes.

Differences from the published recipe: the rare-class statistics count the
labels as training reads them (GTA5 at 1280x704), DAFormer's at their full
1914x1052, so `min_pixels` 3,000 selects fewer images; draws are keyed by the
stream position, not numpy's global state (the same on any number of
processes); `cat_max_ratio` applies to the source crops only (DAFormer's target
pipeline loads the Cityscapes labels for it; segjax never reads them in
training); the batch statistics of the head's BatchNorm are synchronised over
devices (DAFormer ran one GPU). Images are resized bicubic (mmseg: bilinear).
ClassMix takes half of the classes of each source image, ignore excluded
(DAFormer draws from the classes of the whole source batch, 255 among them, so
a drawn class may be absent from the image). The EMA covers the BatchNorm
running statistics too (DAFormer's the parameters only): the teacher normalises
with the target batch's statistics as DAFormer's, and the running ones serve an
evaluation of the teacher (`--state=ema`). The colour jitter takes
torchvision's factor ranges in the fixed order brightness, contrast,
saturation, hue (contrast about the input image's mean grey, hue as a rotation
in YIQ, one clip at the end), where DAFormer pins kornia 0.5.8, whose
ColorJitter predates kornia's PIL-aligned rewrite (the old one is kept as
ColorJiggle) and may differ in its formulas and order (not compared here); the
jitter and blur are drawn per image, not once per batch; the blur kernel spans
3 sigma of 1.15 (9 taps, edges repeated) where DAFormer's spans a tenth of the
image (reflected), alike for these sigmas.

Without roots: the built-in scenes (64x128 crops, batch 8 + 8), MiT-B0 from
scratch (no ImageNet weights, so no feature distance), AdamW at 6e-4 (10x
the published lr, which is for pretrained encoders) over 1,500 steps with a
150-step warm-up, rare-class sampling with images over 30 pixels of a class
(3,000 of 1280x720 scaled to 64x128); the other settings as above, the
row-crop fractions too; MIC's blocks (with `adapt.mic=True`) are 8 pixels,
its 64 of 512 scaled to the 64-row crops.
"""

from configs import adapt, recipes
from segjax import methods


def daformer_training(config, lr: float, num_steps: int, warmup_steps: int) -> None:
  config.num_train_steps = num_steps
  config.optim.seg.update(name="adamw", lr=lr, b1=0.9, b2=0.999, weight_decay=0.01, power=1.0,
                          head_lr_mult=10.0, warmup_steps=warmup_steps, warmup_ratio=1e-6,
                          no_decay=("norm", "pos_block"))
  config.model.drop_path_rate = 0.1
  config.model.dropout_rate = 0.1
  config.model.remat = False  # True: recompute each transformer block in the backward pass.
  config.model.scan_blocks = False  # True: each stage's blocks as one loop, compiled once.
  config.loss.aux_weights = ()
  config.loss.avg_non_ignore = False  # mmseg 0.16's source CE: the mean over every pixel.
  config.adapt = methods.adapt_config("daformer")
  # Rare-class sampling and mmseg's crop retries (DAFormer's GTA5 pipeline).
  config.data.rcs.update(temperature=0.01, min_pixels=3000, min_crop_ratio=0.5)
  config.data.augment.cat_max_ratio = 0.75


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if not roots:
    config = adapt.get_config()
    config.model = recipes.base("daformer_mitb0").model
    daformer_training(config, lr=6e-4, num_steps=1500, warmup_steps=150)
    config.data.rcs.min_pixels = 30  # 3,000 of 1280x720 pixels, scaled to the 64x128 scenes.
    config.adapt.mic_block = 8  # MIC's 64 of 512 pixels, scaled to the 64-row crops.
    return config
  config = recipes.base("daformer_mitb5")
  config.batch_size = 2
  config.eval_batch_size = 1
  config.log_every_steps = 50
  config.eval_every_steps = 4_000
  config.checkpoint_every_steps = 2_000
  recipes.uda_data(config, roots)
  config.data.source.keep_ratio = True  # mmseg's Resize(keep_ratio=True): GTA5 at 1280x704.
  config.data.crop_size = (512, 512)  # Both domains (ClassMix pastes source onto target).
  config.data.source.crop_size = config.data.target.crop_size = ()
  config.data.augment.scale_range = (1.0, 1.0)
  config.data.augment.flip = True
  config.data.augment.brightness = config.data.augment.contrast = 0.0
  config.data.augment.saturation = config.data.augment.hue = 0.0
  daformer_training(config, lr=6e-5, num_steps=40_000, warmup_steps=1_500)
  return config
