"""HRDA (Hoyer et al. 2022b): DAFormer's self-training at two resolutions with a scale attention.

  python -m segjax.main --config=configs/hrda.py --workdir=runs/hrda
  python -m segjax.main --config=configs/hrda.py:gta5=ROOT,cityscapes=ROOT \\
      --config.model.backbone_weights=mit_b5.pth --workdir=runs/hrda_gta5

With roots (gta5= or synthia=, and cityscapes=): the published recipe
(`gtaHR2csHR_hrda.py`): configs/daformer.py's (AdamW, warm-up, EMA teacher,
ClassMix, feature distance, rare-class sampling, 40,000 steps, batch 2 + 2) on
HRDA's segmenter (`hrda_mitb5`): GTA5 resized within 2560x1440 keeping its
aspect ratio (2560x1407; SYNTHIA 2560x1520), Cityscapes to 2048x1024, random
1024x1024 crops; the context seen at scale 0.5, a 512x512 detail window at full
resolution with its corner on the 8-pixel grid, a class-wise scale attention,
the detail loss x 0.1; the feature distance on the context's features;
rare-class sampling with crops redrawn until the class covers min_crop_ratio
2.0 x 3,000 pixels; evaluation on the whole 2048x1024 image in 1024x1024
windows at stride 512, each window fused from its two scales (the detail
sliding in 512x512 windows at stride 256). Published: 73.8 mIoU GTA5 ->
Cityscapes, 65.8 mIoU16 SYNTHIA -> Cityscapes.

HRDA's pseudo-label crop v2: the margins of the whole Cityscapes image (30 rows
at the top, 240 at the bottom, 30 columns on each side) are cut out of each
crop's pseudo-label weights where the crop holds them
(`data.target.pseudo_margins`). Differences from the published recipe:
configs/daformer.py's, except that counting the rare classes at 2560x1407 (HRDA
at 1914x1052) selects more images, not fewer; each example draws its own detail
window (HRDA draws one per batch).

Without roots: the built-in scenes at 64x128 crops (batch 8 + 8), HRDA's
segmenter on MiT-B0 from scratch with a 32x64 detail window, otherwise
configs/daformer.py's built-in settings.
"""

from configs import daformer, recipes


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  config = daformer.get_config(arg)
  config.adapt.method = "hrda"
  size = config.model.name.removeprefix("daformer_")
  with config.model.unlocked():
    config.model.name = f"hrda_{size}"
    config.model.detail_divisible = 8
    config.model.detail_crop = (512, 512) if roots else (32, 64)
  if not roots:
    return config
  source = "synthia" if "synthia" in roots else "gta5"
  config.data.source.resize = (1520, 2560) if source == "synthia" else (1440, 2560)
  config.data.target.resize = (1024, 2048)
  config.data.eval.resize = (1024, 2048)
  config.data.crop_size = (1024, 1024)
  config.data.rcs.min_crop_ratio = 2.0
  # HRDA's pseudo-label crop v2: the margins of the whole image, ignored where a crop holds them.
  config.adapt.st_ignore_top = config.adapt.st_ignore_bottom = 0.0
  config.data.target.pseudo_margins = (30, 240, 30, 30)
  config.inference.window, config.inference.stride = (1024, 1024), (512, 512)
  return config
