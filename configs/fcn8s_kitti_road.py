"""FCN-8s VGG16 on KITTI Road (seed a), supervised road / not-road segmentation.

  python -m segjax.main --config=configs/fcn8s_kitti_road.py:kitti_road=ROOT \
      --config.model.backbone_weights=vgg16.safetensors --workdir=runs/fcn8s_kitti

Recipe (the seed): inputs 160x576, batch 10, 75 epochs of the 289 training
images, lr 1e-4 (the seed's Adam); pixels outside the valid area are
ignored. FCN-8s with the reference padding and crops.
"""

from configs import recipes


def get_config(arg: str | None = None):
  roots = recipes.parse_roots(arg, ("kitti_road",))
  config = recipes.base("fcn8s_vgg16")
  config.batch_size = 10
  config.eval_batch_size = 10
  config.num_train_steps = 2_175  # 75 epochs x 29 batches.
  config.log_every_steps = 29
  config.eval_every_steps = 290
  config.checkpoint_every_steps = 290
  config.data.source = recipes.dataset("kitti_road", roots, "train", "target", (160, 576), 289)
  config.data.target = recipes.dataset("kitti_road", roots, "train", "target", (160, 576), 289)
  config.data.eval = recipes.dataset("kitti_road", roots, "val", "target", (160, 576), 50)
  config.data.crop_size = (160, 576)
  config.data.augment.scale_range = (1.0, 1.0)
  config.model.conv1_padding = 100
  config.model.learned_upsampling = True
  config.model.dropout_rate = 0.5
  config.optim.seg.update(name="adam", lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, power=0.0)
  config.adapt.method = "source_only"
  return config
