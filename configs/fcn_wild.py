"""FCNs in the Wild (Hoffman et al. 2016): fc7 global alignment and category (size) adaptation.

  python -m segjax.main --config=configs/fcn_wild.py --workdir=runs/fcn_wild
  python -m segjax.tools.category_stats --config=configs/fcn_wild.py:gta5=ROOT,cityscapes=ROOT \
      --out=runs/gta5_category_stats.json
  python -m segjax.main --config=configs/fcn_wild.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=vgg16.safetensors \
      --config.adapt.category_stats=runs/gta5_category_stats.json --workdir=runs/fcn_wild_gta5

The method is segjax/methods/fcn_wild.py (its docstring has the losses and
the size-constraint solver). GA only (the paper's second row):
--config.adapt.lambda_ca=0; CA only: --config.adapt.lambda_da=0. Without
adapt.category_stats the statistics are computed from data.source at
start-up (seconds on the built-in scenes; for GTA5's 24,966 frames, write
them once with the command above). Either way a copy lands in the workdir,
and a resumed run uses it.

Without roots: the built-in scenes with CompactSeg, as configs/adapt.py (SGD
0.01, Adam 1e-4 discriminator, batch 8 + 8), but random scales from 1 to 1.5
rather than from 0.75: a shrunk image is zero-padded to the crop, padding the
domain classifier could tell apart and CA would count as image pixels. The
fc7_domain classifier reads CompactSeg's 128-channel stride-8 features, with
hidden width 512 (CyCADA's width for inputs other than 4096 channels).

With roots (gta5= or synthia=, and cityscapes=), the published setting
(UDA-REFERENCE.md 2c): FCN-8s on VGG16 (CyCADA's VGG16_FCN8s: conv1 padded by
100, fixed bilinear upsampling, pool4 / pool3 scaled by 0.01 / 1e-4, dropout
0.5) with the fc7_domain classifier 4096 -> 1024 -> 512 -> 1 (dropout 0.5);
CyCADA's `train_fcn_adda.sh`: SGD lr 1e-5, momentum 0.99, weight decay 5e-4,
constant, for the segmenter and the classifier, lambda_g = 0.1 (here
lambda_da) and lambda_d = 1, batch 1 + 1, 100k iterations, random flips;
lambda_ca = 1, the paper's unweighted sum of the terms. GTA5 resized to 1280x720
(SYNTHIA 1280x760), Cityscapes to 1024x512; evaluation on Cityscapes val
upsampled to the labels' 2048x1024. Published GTA5 -> Cityscapes mIoU (VGG16,
UDA-REFERENCE.md 1a): source only 21.1, GA 25.5, GA + CA 27.1; SYNTHIA ->
Cityscapes mIoU16 14.7 / 16.6 / 17.0.

Differences from the paper and CyCADA:
  * the paper's network is the dilated VGG16 front-end of Yu & Koltun; segjax
    has none, so FCN-8s, the network of CyCADA's feature-level trainer;
  * crops are 512x768, not 768x768: CyCADA crops images whose short side is
    1024 pixels, here Cityscapes is 512 rows high, and a taller crop would pad
    the target with zeros, which the domain classifier could use and CA would
    count as image pixels;
  * CyCADA starts adaptation from a source-trained FCN; by default segjax
    starts from ImageNet VGG16 (model.backbone_weights) and trains the source
    loss alongside from step 0 (the paper's joint objective). For CyCADA's
    start, train the source model first with this config's model and data
    and source labels only (a config file whose get_config calls this one's
    and sets config.adapt = segjax.methods.adapt_config("source_only"): the
    fcn_wild fields cannot ride along with another method), then adapt with
    --config.init_from=THAT_WORKDIR;
  * CyCADA's lambda_g weights a target-only inverted-label loss; lambda_da
    weights the paper's symmetric 0.5 (L_D + L_Dinv) over both domains;
  * CyCADA's discriminator loss is a mean over the concatenated source and
    target cells, L_D / 2 here, so at the same learning rate its steps are
    half of segjax's; and CyCADA updates the segmenter only while the
    classifier's domain accuracy exceeds 60%, segjax at every step;
  * the paper's CCNN solver settings are not public (the method's docstring
    gives segjax's: 50 dual-ascent steps of size 1, lower-bound slack 1).
"""

from configs import adapt, recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if not roots:
    config = adapt.get_config()
    config.data.augment.scale_range = (1.0, 1.5)
    config.disc.width = 512
  else:
    config = recipes.base("fcn8s_vgg16")
    recipes.uda_data(config, roots)
    config.batch_size = 1
    config.eval_batch_size = 1
    config.num_train_steps = 100_000
    config.log_every_steps = 100
    config.eval_every_steps = 5_000
    config.checkpoint_every_steps = 5_000
    config.data.crop_size = (512, 768)  # Both domains, as CyCADA's crop.
    config.data.source.crop_size = config.data.target.crop_size = ()
    config.data.augment.scale_range = (1.0, 1.0)
    config.data.augment.flip = True
    config.data.augment.brightness = config.data.augment.contrast = 0.0
    config.data.augment.saturation = config.data.augment.hue = 0.0
    config.model.update(dict(conv1_padding=100, learned_upsampling=False, skip_scaling=True,
                             dropout_rate=0.5))
    config.optim.seg.update(name="sgd", lr=1e-5, momentum=0.99, weight_decay=5e-4, power=0.0,
                            head_lr_mult=1.0)
    config.optim.disc.update(name="sgd", lr=1e-5, momentum=0.99, weight_decay=5e-4, power=0.0)
    config.disc.width = 1024
  config.adapt = methods.adapt_config("fcn_wild", lambda_da=0.1, lambda_ca=1.0)
  config.disc.name = "fc7_domain"
  config.disc.dropout_rate = 0.5
  return config
