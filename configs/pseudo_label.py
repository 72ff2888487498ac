"""Pseudo labels (segjax.methods.pseudo_label): CE on offline target pseudo labels + adversarial.

On the built-in scenes (CompactSeg, as configs/adapt.py), three commands: train
the adversarial model, make its pseudo labels, train on them:

  python -m segjax.main --config=configs/adapt.py --workdir=runs/adapt
  python -m segjax.tools.make_pseudo_labels --config=configs/pseudo_label.py \
      --workdir=runs/adapt --out=runs/adapt/pseudo_labels
  python -m segjax.main --config=configs/pseudo_label.py --workdir=runs/pseudo_label \
      --config.data.target.pseudo_labels=runs/adapt/pseudo_labels [--config.init_from=runs/adapt]

With roots (gta5= or synthia=, and cityscapes=): the real-time seed's recipe
(UDA-REFERENCE.md 2f) on configs/bisenet_gta5_cityscapes.py: BiSeNet
ResNet-18, GTA5 resized to 1280x720 (SYNTHIA 1280x760) and Cityscapes to
1024x512, batch 4, SGD lr 2.5e-4 (the code's; the report tuned the
pseudo-label run's to 1.25e-2: --config.optim.seg.lr=1.25e-2, its best, 32.3
mIoU), momentum 0.9, weight decay 1e-4, poly 0.9, CE on the main head and both
auxiliary heads (1, 1) on source labels and on pseudo labels (lambda_pl 1),
discriminator on softmax(target) with lambda_adv 0.001; pseudo labels by the
median thresholds capped at 0.9, per image as the seed's code computes them
(--config.adapt.pl_scope=dataset: over the whole target set, as BDL's SSL.py):

  python -m segjax.main --config=configs/bisenet_gta5_cityscapes.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=resnet18.safetensors --workdir=runs/bisenet
  python -m segjax.tools.make_pseudo_labels \
      --config=configs/pseudo_label.py:gta5=ROOT,cityscapes=ROOT --workdir=runs/bisenet \
      --checkpoint=best --out=runs/bisenet/pseudo_labels
  python -m segjax.main --config=configs/pseudo_label.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=resnet18.safetensors --workdir=runs/bisenet_pl \
      --config.data.target.pseudo_labels=runs/bisenet/pseudo_labels

--checkpoint=best is the seed's choice (selected on Cityscapes val labels;
'latest' uses none). The seed trains the pseudo-label run from the ImageNet
backbone again; --config.init_from=runs/bisenet starts it from the adapted
model instead. CBST (Zou et al. 2018): --config.adapt.pl_threshold=cbst
--config.adapt.lambda_adv=0, with rounds of growing portion (0.2, +0.05 a
round, at most 0.5; CBST's GTA5 command starts at 0.15) by
python -m segjax.tools.self_training_rounds.
"""

from configs import adapt, bisenet_gta5_cityscapes, recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if roots:
    config = bisenet_gta5_cityscapes.get_config()
    recipes.uda_data(config, roots)
    config.adapt = methods.adapt_config("pseudo_label", lambda_adv=0.001, pl_scope="image")
  else:
    config = adapt.get_config()
    config.adapt = methods.adapt_config("pseudo_label", lambda_adv=0.01)
  config.adapt.lambda_pl = 1.0
  config.adapt.pl_threshold = "median"
  config.adapt.pl_cap = 0.9
  # The folder of segjax.tools.make_pseudo_labels; training refuses to start without it.
  config.data.target.pseudo_labels = ""
  return config
