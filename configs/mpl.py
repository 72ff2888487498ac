"""Meta Pseudo Labels (segjax.methods.mpl): a teacher trained by its student's feedback.

As the seed, after an adversarial run whose model becomes the teacher:

  python -m segjax.main --config=configs/adapt.py --workdir=runs/adapt
  python -m segjax.main --config=configs/mpl.py --workdir=runs/mpl \
      --config.adapt.mpl_teacher_from=runs/adapt

  python -m segjax.main --config=configs/bisenet_gta5_cityscapes.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=resnet18.safetensors --config.disc.name=dsc \
      --workdir=runs/bisenet_dsc
  python -m segjax.main --config=configs/mpl.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=resnet18.safetensors \
      --config.adapt.mpl_teacher_from=runs/bisenet_dsc --workdir=runs/mpl_gta5

Without roots: the built-in scenes with CompactSeg (as configs/adapt.py); the
teacher has the student's optimizer (SGD 0.01, poly 0.9). Without
adapt.mpl_teacher_from the teacher starts from its own initialisation.

With roots (gta5= or synthia=, and cityscapes=): seed (c)'s MPL run
(UDA-REFERENCE.md 2f, `MPL.py`) on configs/bisenet_gta5_cityscapes.py: BiSeNet
ResNet-18, GTA5 resized to 1280x720 (SYNTHIA 1280x760) and Cityscapes to
1024x512, batch 4, CE on the main head and both auxiliary heads (1, 1), 50
epochs of Cityscapes (37,200 steps); student SGD lr 2.5e-4, teacher SGD lr
1.25e-2, both momentum 0.9, weight decay 1e-4, poly 0.9; the teacher's noise
term (N(0, 1) on a random rectangle) weighted 0.5, the seed's expectation (it
adds it with weight 1 on half of the steps); student and teacher each fool
their own output-space discriminator (config.disc, Adam 1e-4) with lambda_adv
0.001.

Differences from the seed (see segjax/methods/mpl.py): the teacher's pseudo-label
term is weighted by the MPL feedback h - b (the change of the student's
source loss, minus its moving average) instead of the seed's H = eta_S x
L_tgt x L_src x (exp(epoch / 40) - 1), which is always positive; pseudo labels from the teacher's training-mode pass; the
teacher's optimizer state starts fresh when it starts as the adapted model
(--config.model.backbone_weights loads into the student, and into the teacher
when adapt.mpl_teacher_from is unset); the poly schedules decay every step,
not every epoch. The seed's `MPL.py` passes --context_path resnet101:
--config.model.name=bisenet_r101 (with resnet101 weights) selects it.
"""

from configs import adapt, bisenet_gta5_cityscapes, recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  if not roots:
    config = adapt.get_config()
    config.adapt = methods.adapt_config("mpl", lambda_adv=0.01)
    return config
  config = bisenet_gta5_cityscapes.get_config()
  recipes.uda_data(config, roots)
  config.optim.seg.update(lr=2.5e-4, momentum=0.9, weight_decay=1e-4, power=0.9)
  config.optim.teacher.update(name="sgd", lr=1.25e-2, momentum=0.9, weight_decay=1e-4,
                              power=0.9)
  config.adapt = methods.adapt_config(
      "mpl",
      lambda_adv=0.001,  # Student and teacher, each with its discriminator.
      mpl_student_weight=1.0, mpl_uda_weight=0.5, mpl_uda_steps=0, mpl_noise_std=1.0)
  return config
