"""Shared defaults: the built-in street scenes, CompactSeg, AdaptSegNet's optimizers.

Not run on its own: configs/adapt.py, source_only.py and oracle.py start from it.
"""

import ml_collections

from segjax import methods


def _street_scenes(domain: str, split: str, num_examples: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="street_scenes", domain=domain, split=split, num_examples=num_examples,
      height=64, width=128, seed=0,
      crop_size=()))  # () takes data.crop_size; (H, W) gives this domain its own crop.


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8  # Global, per domain: 8 source + 8 target images a step.
  config.eval_batch_size = 32
  config.num_train_steps = 1500
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 250
  config.keep_checkpoints = 2  # The latest K, plus the best by target mIoU.
  # A fresh run's segmenter (parameters, BatchNorm statistics) from another run's checkpoint:
  # "WORKDIR" (its latest), "WORKDIR:best" or "WORKDIR:STEP"; the optimizer starts afresh.
  config.init_from = ""
  config.num_eval_samples = 4  # Target images shown with predictions at each evaluation.

  config.data = ml_collections.ConfigDict()
  config.data.source = _street_scenes("source", "train", 2000)  # Labelled.
  config.data.target = _street_scenes("target", "train", 2000)  # Labels never read.
  # The self-training methods' pseudo labels lose these (top, bottom, left, right) pixels of each
  # target image where a crop holds them (HRDA's pseudo-label crop v2); () for none.
  config.data.target.pseudo_margins = ()
  config.data.eval = _street_scenes("target", "val", 250)
  config.data.crop_size = (64, 128)
  config.data.augment = ml_collections.ConfigDict(dict(
      scale_range=(0.75, 1.5), flip=True, brightness=0.25, contrast=0.25, saturation=0.25,
      hue=0.05,
      cat_max_ratio=1.0))  # < 1: mmseg's crop retries, until no class covers that share.
  # Rare-class sampling of the source images (DAFormer; segjax.data.rare_class): off at
  # temperature 0. stats: a file of segjax.tools.rcs_stats; "": computed into the workdir.
  config.data.rcs = ml_collections.ConfigDict(dict(
      temperature=0.0, min_pixels=3000, min_crop_ratio=0.5, stats=""))
  config.data.mean = (0.485, 0.456, 0.406)  # ImageNet statistics, RGB in [0, 1].
  config.data.std = (0.229, 0.224, 0.225)
  config.data.num_workers = 0  # Grain worker processes; 0 reads in the main process.

  config.model = ml_collections.ConfigDict(dict(
      name="compact", width=32, dropout_rate=0.1,
      sync_batch_stats=True,  # False: each device normalises with its own batch statistics.
      dtype="float32",  # Compute dtype: "bfloat16" for mixed precision.
      param_dtype="float32",  # Parameters (and the optimizer state) stay float32.
      # A torchvision-format state dict (.pth, .safetensors or .npz) for the backbone.
      backbone_weights=""))
  config.disc = ml_collections.ConfigDict(dict(
      name="fcd", width=64, dtype="float32", param_dtype="float32"))

  config.optim = ml_collections.ConfigDict()
  config.optim.seg = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.01, momentum=0.9, b1=0.9, b2=0.999, weight_decay=5e-4, power=0.9,
      head_lr_mult=1.0,  # Learning-rate factor for everything outside the backbone.
      warmup_steps=0, warmup_ratio=1e-6,  # Linear warm-up of the schedule from ratio x lr,
      warmup_mode="mmcv",  # times the poly schedule ("mmcv") or to the full lr ("linspace").
      no_decay=()))  # AdamW: parameters whose path contains one of these names do not decay.
  config.optim.disc = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.99, power=0.9))
  # The segmenter's gradient in this many micro-batches of each device's batch, one after
  # another (segjax.accumulate): the memory of a smaller batch, the update of the whole one.
  config.optim.accumulate_steps = 1
  # mpl's teacher: its own optimizer, the same fields as optim.seg.
  config.optim.teacher = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.01, momentum=0.9, b1=0.9, b2=0.999, weight_decay=5e-4, power=0.9,
      head_lr_mult=1.0, warmup_steps=0, warmup_ratio=1e-6, warmup_mode="mmcv", no_decay=()))

  # The segmentation loss of every head: "ce", "focal", "ce+focal" or "ohem".
  config.loss = ml_collections.ConfigDict(dict(
      name="ce", class_weights=(), focal_gamma=2.0, focal_alpha=0.0, ohem_thresh=0.7,
      ohem_min_kept=1 / 16,
      aux_weights=(),  # One weight per auxiliary head of the segmenter.
      detail_weight=0.1,  # HRDA's segmenters: the loss on their detail windows (lambda_d).
      # 'ce' averaged over the labelled pixels (PyTorch's), or with False over every pixel,
      # the ignored ones as 0 (mmseg 0.16's, DAFormer's, HRDA's and MIC's).
      avg_non_ignore=True))

  # Evaluation: test-time augmentation and sliding-window inference (segjax.inference).
  config.inference = ml_collections.ConfigDict(dict(
      scales=(1.0,), flip=False,
      window=(), stride=(),  # (height, width) sliding windows, () for whole images.
      average="logits"))  # What overlapping windows average: "logits" (mmseg) or "probs".

  # The adaptation method and its fields (segjax.methods): each method owns its fields
  # and their defaults, and config.adapt holds exactly those of adapt.method (a config that
  # switches method builds it anew with methods.adapt_config).
  config.adapt = methods.adapt_config("source_only")
  return config
