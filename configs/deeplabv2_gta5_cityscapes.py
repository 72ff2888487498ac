"""DeepLab-v2 ResNet-101, GTA5 -> Cityscapes: the AdaptSegNet / ADVENT baseline (Tsai et al. 2018).

  python -m segjax.main --config=configs/deeplabv2_gta5_cityscapes.py:gta5=ROOT,cityscapes=ROOT \
      --config.model.backbone_weights=DeepLab_resnet_pretrained_init-f81d91e8.pth \
      --workdir=runs/deeplabv2

Recipe (UDA-REFERENCE.md 2a, `train_gta2cityscapes_multi.py`): GTA5 resized to
1280x720, Cityscapes to 1024x512, batch 1 + 1; SGD lr 2.5e-4 (heads 10x),
momentum 0.9, weight decay 5e-4, poly 0.9 over 250k iterations stopped at
150k; frozen BatchNorm (with backbone weights); CE on the layer4 head plus 0.1 x the layer3 head;
output-space discriminator (FCD) with Adam 1e-4, betas (0.9, 0.99), lambda_adv
0.001 on the main head. configs/adaptsegnet.py adds the multi-level
adversarial term; configs/advent.py, self_training.py and source_only.py
build on this recipe (configs/pseudo_label.py and mpl.py on the BiSeNet one).

Weights (model.backbone_weights). The published runs start from DeepLab's
Caffe-converted ResNet-101: AdaptSegNet from
`DeepLab_resnet_pretrained_init-f81d91e8.pth` (ImageNet, then COCO; its
vllab.ucmerced.edu link is dead, layumi/AdaBoost_Seg#2 has a mirror), ADVENT
from `DeepLab_resnet_pretrained_imagenet.pth` (ImageNet only; valeoai/ADVENT
release v0.1). AdaptSegNet#56 reports 41.99 mIoU from the COCO init and
40.61 from ImageNet alone. Both files are in the Caffe layout ('Scale.' keys,
stride in each bottleneck's 1x1 conv) that model.resnet_style='caffe'
builds: the two repos' network, fed the BGR pixels less IMG_MEAN it was
trained on (converted inside the model from the usual data.mean/std
normalisation, which stays). Their classifier ('Scale.layer5', 21 classes)
is reported and skipped, as both repos drop it for 19 classes; the layer3
head starts from scratch. For torchvision's ImageNet resnet101 instead, add
--config.model.resnet_style=torchvision (stride in the 3x3 conv, floor-mode
pooling: torchvision's ResNet-101 dilated to output stride 8). A file whose
layout contradicts model.resnet_style is an error naming both.
`python -m segjax.tools.convert_weights` turns either .pth into a
.safetensors that needs no torch to read.
"""

from configs import recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  config = recipes.base("deeplabv2_r101")
  config.batch_size = 1
  config.eval_batch_size = 1
  config.num_train_steps = 150_000
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 5_000
  recipes.uda_data(config, roots)  # synthia=ROOT instead of gta5=ROOT: SYNTHIA at 1280x760.
  config.data.crop_size = (512, 1024)
  config.data.augment.scale_range = (1.0, 1.0)  # Resized, not scale-augmented.
  config.data.augment.flip = False
  config.data.augment.brightness = config.data.augment.contrast = 0.0
  config.data.augment.saturation = config.data.augment.hue = 0.0

  # BatchNorm is frozen, as in the reference, when backbone weights are given (and trained
  # otherwise: frozen statistics of an untrained network would be the identity).
  config.model.aspp_branches = 4  # 2 reproduces AdaptSegNet's early-return bug.
  config.model.resnet_style = "caffe"  # The published init's; 'torchvision' for torchvision's.
  config.loss.aux_weights = (0.1,)  # lambda_seg on the layer3 head.
  config.optim.seg.update(lr=2.5e-4, momentum=0.9, weight_decay=5e-4, power=0.9,
                          head_lr_mult=10.0, decay_steps=250_000)
  config.optim.disc.update(lr=1e-4, b1=0.9, b2=0.99, power=0.9)
  config.optim.disc.decay_steps = 250_000
  config.adapt = methods.adapt_config("adaptsegnet", lambda_adv=0.001)
  config.disc.name = "fcd"
  return config
