"""FCN-8s VGG16 on KITTI Road (seed a), supervised road / not-road segmentation.

  python -m segjax.main --config=configs/fcn8s_kitti_road.py:kitti_road=ROOT \
      --config.model.backbone_weights=vgg16.safetensors --workdir=runs/fcn8s_kitti

Recipe (the seed): inputs 160x576, batch 10, 75 epochs, lr 1e-4 (the seed's
Adam); pixels outside the valid area are ignored. FCN-8s with the reference
padding and crops. KITTI Road has no labelled validation split: segjax holds
out every 6th training image (split 'val', 48 images) and trains on the other
241 (split 'train'; 'trainval' is all 289), so 75 epochs are 1,808 steps.
Evaluation is at the seed's 160x576 (labels resized, nearest). KittiSeg's
train3.txt / val3.txt work as list files (data.source.list_file,
data.eval.list_file).
"""

from configs import recipes
from segjax import methods


def get_config(arg: str | None = None):
  roots = recipes.parse_roots(arg, ("kitti_road",))
  config = recipes.base("fcn8s_vgg16")
  config.batch_size = 10
  config.eval_batch_size = 10
  config.num_train_steps = 1_808  # 75 epochs of 241 images at batch 10.
  config.log_every_steps = 24
  config.eval_every_steps = 240
  config.checkpoint_every_steps = 240
  config.data.source = recipes.dataset("kitti_road", roots, "train", "target", (160, 576), 241)
  config.data.target = recipes.dataset("kitti_road", roots, "train", "target", (160, 576), 241)
  config.data.eval = recipes.dataset("kitti_road", roots, "val", "target", (160, 576), 48)
  config.data.crop_size = (160, 576)
  config.data.augment.scale_range = (1.0, 1.0)
  config.model.conv1_padding = 100
  config.model.learned_upsampling = True
  config.model.dropout_rate = 0.5
  config.optim.seg.update(name="adam", lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, power=0.0)
  config.adapt = methods.adapt_config("source_only")
  return config
