"""VFM-UDA (Englert et al. 2024): self-training of a DINOv2 ViT with token masking.

  python -m segjax.main --config=configs/vfm_uda.py --workdir=runs/vfm_uda
  python -m segjax.main --config=configs/vfm_uda.py:gta5=ROOT,cityscapes=ROOT \\
      --config.model.backbone_weights=dinov2_vitb14_pretrain.pth --workdir=runs/vfm_uda_gta5
  # ViT-L (78.4 published): --config.model.name=vfm_vit_l14 and dinov2_vitl14_pretrain.pth

With roots (gta5= or synthia=, and cityscapes=): the published recipe
(tue-mps/vfm-uda `uda_vit_vanilla.yaml` and the code's defaults): DINOv2
ViT-B/14 with VFM-UDA's lightweight head (`segjax.models.vfm`: the 1024 crop
seen at 1120, an 80x80 token grid); GTA5's short side resized to 1440
(2620x1440), Cityscapes to 1024x2048, each image scaled by U(0.9, 1.1), random
1024x1024 crops with flips, batch 8 source + 8 target; AdamW, betas (0.9,
0.999), weight decay 0.01, the head at 5e-5 x sqrt(global batch 8) = 1.41e-4
and the encoder at 0.1x that; linear warm-up over 1,500 steps from 1e-3 of the
lr to the full lr (`np.linspace`, `optim.seg.warmup_mode="linspace"`), then
linear decay to 40,000 steps (0.9625 of the lr at step 1,500); EMA teacher
0.999 with its softmax averaged over a horizontal flip, pseudo-label threshold
0.968, the top 3% and bottom 25% of the rows ignored, the source and target
images weakly jittered (32/255, 0.5, 0.5, 18/360, p 0.9), ClassMix with colour
jitter 0.2 (p 0.8) and blur; token masking of the strongly augmented target
images (70% of the tokens, weight 1); rare-class sampling at temperature 0.05
(images with over 3,000 pixels of the class at the source's own size, crops
redrawn until they hold 6,000) with crops redrawn while one
class covers 75%; bf16 compute. Evaluation of the student on the whole
2048x1024 image in 1024x1024 windows at stride 512, their softmax averaged
where they overlap. Published: 77.1 mIoU GTA5 -> Cityscapes (ViT-B), 78.4
(ViT-L).

Differences from the published recipe: the learning rate is written for a
global batch of 8: with another --config.batch_size B, set
--config.optim.seg.lr to 5e-6 x sqrt(B) (the encoder's; the head's is 10x);
bf16 (the residual streams float32, as autocast keeps them) where VFM-UDA
uses fp16 mixed precision; the position embeddings' resampling
(`segjax.models.vfm`); the rare-class statistics as
configs/daformer.py says, and the crop retries as mmseg's (up to 11 crops until
no class covers 75%, redrawn up to 11 times until the class covers its pixels)
where VFM-UDA tries 20 crops that must pass both tests, then takes any; GTA5 is
resized to 2620x1440, then scaled by U(0.9, 1.1) (VFM-UDA scales the short side
to 1440 x U(0.9, 1.1) in one resize); SYNTHIA to 1520x2560 (VFM-UDA has no
SYNTHIA loader; VFM-UDA++ scales its short side to 1024); the pseudo labels'
confidence weight is the share over the global batch (VFM-UDA: per GPU, 2
images with its README's 4 GPUs), so that it is the same on any number of
devices; ClassMix takes half of the classes of each source image, ignore
excluded, where VFM-UDA's `dacs_utils.get_class_masks` (DAFormer's) draws them
from the classes of the whole per-GPU source batch, so a drawn class may be
absent from the image; the jitters apply brightness, contrast, saturation and
hue in that order, contrast about the input image's mean grey, where
torchvision's ColorJitter draws the order and pivots on the current image; the
hue jitter rotates the colours in YIQ where torchvision shifts the hue in HSV;
the head starts from flax's initialisation, not PyTorch's.
VFM-UDA's README trains on 4 GPUs with 2 images each; the config says batch 8
on one.

Without roots: the built-in scenes (64x128 crops, batch 8 + 8), ViT-S/14
from scratch (no DINOv2 weights) with the same head, AdamW with the head at
1e-3 and the encoder at 1e-4 over 1,500 steps with a 150-step warm-up,
float32; the other settings as above. A ViT from scratch on 1,500 steps of
small images (a 5x10 token grid) is expected to do badly: the recipe's
strength is the pretrained encoder.
"""

import math

from configs import adapt, daformer, recipes
from segjax import methods


def _vfm_uda_training(config, encoder_lr: float, num_steps: int, warmup_steps: int) -> None:
  """configs/daformer.py's training with VFM-UDA's differences."""
  daformer.daformer_training(config, encoder_lr, num_steps, warmup_steps)
  config.optim.seg.update(warmup_ratio=1e-3, warmup_mode="linspace", no_decay=())
  config.model.drop_path_rate = 0.0
  config.loss.avg_non_ignore = True  # PyTorch's cross_entropy: the mean over labelled pixels.
  del config.model["dropout_rate"]  # The head has no dropout.
  config.model.input_scale = 1.1
  config.adapt = methods.adapt_config("vfm_uda")
  # The published recipe's thresholds are set below (min_pixels, min_crop_ratio).
  config.data.rcs.update(temperature=0.05, min_crop_ratio=1.0)


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if not roots:
    config = adapt.get_config()
    config.model = recipes.base("vfm_vit_s14").model
    _vfm_uda_training(config, encoder_lr=1e-4, num_steps=1500, warmup_steps=150)
    config.data.rcs.min_pixels = 30  # As configs/daformer.py's built-in run.
    return config
  config = recipes.base("vfm_vit_b14")
  config.model.dtype = "bfloat16"
  config.batch_size = 8
  config.eval_batch_size = 1
  config.log_every_steps = 50
  config.eval_every_steps = 4_000
  config.checkpoint_every_steps = 2_000
  recipes.uda_data(config, roots)
  source = "synthia" if "synthia" in roots else "gta5"
  # VFM-UDA scales GTA5's short side to 1440 (1914x1052 -> 2620x1440), keeping the ratio: a
  # bound whose long side never binds.
  config.data.source.resize = (1520, 2560) if source == "synthia" else (1440, 10_000)
  config.data.source.keep_ratio = source == "gta5"
  config.data.target.resize = (1024, 2048)
  config.data.eval.resize = (1024, 2048)
  config.data.crop_size = (1024, 1024)
  config.data.source.crop_size = config.data.target.crop_size = ()
  config.data.augment.scale_range = (0.9, 1.1)
  config.data.augment.flip = True
  config.data.augment.brightness = config.data.augment.contrast = 0.0
  config.data.augment.saturation = config.data.augment.hue = 0.0
  head_lr = 5e-5 * math.sqrt(config.batch_size)
  _vfm_uda_training(config, encoder_lr=0.1 * head_lr, num_steps=40_000, warmup_steps=1_500)
  # VFM-UDA counts the class pixels at the source's own size (GTA5 1914x1052, SYNTHIA 1280x760),
  # draws images holding more than 3,000 of the class, then crops holding more than 6,000
  # (3,000 x 1024^2 / (512 x 1024)). segjax counts at the resized size: the image threshold
  # scaled by the resize's area, the crop's through min_crop_ratio.
  native, resized = ((760 * 1280, 1520 * 2560) if source == "synthia"
                     else (1052 * 1914, 1440 * 2620))
  config.data.rcs.min_pixels = round(3000 * resized / native)  # GTA5 5,621; SYNTHIA 12,000.
  config.data.rcs.min_crop_ratio = 6000 / config.data.rcs.min_pixels
  config.inference.window, config.inference.stride = (1024, 1024), (512, 512)
  config.inference.average = "probs"  # VFM-UDA averages the windows' softmax.
  # VFM-UDA's pseudo-label margins: 3% of the rows at the top, 25% at the bottom and 3% of the
  # columns on each side of the whole 2048x1024 image, cut where a crop holds them.
  config.adapt.st_ignore_top = config.adapt.st_ignore_bottom = 0.0
  config.data.target.pseudo_margins = (30, 256, 61, 61)
  return config
