"""Shared defaults: the built-in street scenes, CompactSeg, AdaptSegNet's optimizers.

Not run on its own: configs/adapt.py, source_only.py and oracle.py start from it.
"""

import ml_collections


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
  config.data.eval = _street_scenes("target", "val", 250)
  config.data.crop_size = (64, 128)
  config.data.augment = ml_collections.ConfigDict(dict(
      scale_range=(0.75, 1.5), flip=True, brightness=0.25, contrast=0.25, saturation=0.25,
      hue=0.05))
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
      head_lr_mult=1.0))  # Learning-rate factor for everything outside the backbone.
  config.optim.disc = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.99, power=0.9))
  # mpl's teacher: its own optimizer, the same fields as optim.seg.
  config.optim.teacher = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.01, momentum=0.9, b1=0.9, b2=0.999, weight_decay=5e-4, power=0.9,
      head_lr_mult=1.0))

  # The segmentation loss of every head: "ce", "focal", "ce+focal" or "ohem".
  config.loss = ml_collections.ConfigDict(dict(
      name="ce", class_weights=(), focal_gamma=2.0, focal_alpha=0.0, ohem_thresh=0.7,
      ohem_min_kept=1 / 16,
      aux_weights=()))  # One weight per auxiliary head of the segmenter.

  # Evaluation: test-time augmentation and sliding-window inference (segjax.inference).
  config.inference = ml_collections.ConfigDict(dict(
      scales=(1.0,), flip=False,
      window=(), stride=()))  # (height, width) sliding windows, () for whole images.

  # The adaptation method and its weights (segjax.methods). Output-space methods:
  # lambda_adv / lambda_ent on the main head, *_aux on the first auxiliary head.
  config.adapt = ml_collections.ConfigDict(dict(
      method="source_only", lambda_adv=0.0, lambda_adv_aux=0.0, lambda_ent=0.0,
      lambda_ent_aux=0.0,
      gan="vanilla",  # Or "ls" (least squares).
      disc_input="",  # "softmax" or "self_information"; "": the method's (AdvEnt: the latter).
      # self_training (DACS / DAFormer): teacher momentum, pseudo-label confidence threshold,
      # rows ignored at the top / bottom (fractions of the height), strong augmentation.
      st_alpha=0.999, st_threshold=0.968, st_ignore_top=0.0, st_ignore_bottom=0.0,
      st_jitter=0.2, st_jitter_p=0.2, st_blur=True,
      # fcn_wild (FCNs in the Wild): global-alignment and category-adaptation weights; the
      # source size statistics (a JSON file of segjax.tools.category_stats; "": computed from
      # data.source at start-up); the CA solver's dual-ascent iterations, step and lower slack.
      lambda_da=0.1, lambda_ca=1.0, category_stats="", ca_iterations=50, ca_step_size=1.0,
      ca_slack=1.0,
      # mpl (Meta Pseudo Labels): the student's pseudo-label weight; the teacher's UDA
      # (noise consistency) weight, ramped up over mpl_uda_steps (0: no ramp), its noise
      # std (normalised units); the rate of the feedback's moving baseline.
      mpl_student_weight=1.0, mpl_uda_weight=1.0, mpl_uda_steps=0, mpl_noise_std=1.0,
      mpl_baseline_rate=0.01,
      # The teacher starts as this run's segmenter ('WORKDIR[:latest|best|STEP]'; seed (c):
      # the adversarially adapted model); "": its own initialisation.
      mpl_teacher_from="",
      # pseudo_label (BDL, the real-time seed; CBST): the weight of the CE on the pseudo labels
      # of data.target.pseudo_labels, and how segjax.tools.make_pseudo_labels makes them:
      # thresholds "median" (capped at pl_cap) or "cbst" (class-balanced, at the portion
      # min(pl_portion + pl_round * pl_portion_step, pl_portion_max)), computed over the whole
      # target set (pl_scope "dataset", BDL) or each image alone ("image", the seed's code).
      lambda_pl=1.0, pl_threshold="median", pl_scope="dataset", pl_cap=0.9, pl_portion=0.2,
      pl_portion_step=0.05, pl_portion_max=0.5, pl_round=0))
  return config
