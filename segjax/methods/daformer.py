"""daformer: self-training (EMA teacher, ClassMix) plus DAFormer's ImageNet feature distance.

Hoyer et al. 2022 (`mmseg/models/uda/dacs.py` of lhoyer/DAFormer). The step is
`self_training`'s (the teacher, pseudo labels and their confidence weight,
ClassMix, strong augmentation and the EMA update are that module's code)
with DAFormer's defaults, pseudo labels ignoring the top 15 and bottom 120
of 512 rows, and one more term on the source batch:

  Thing-class ImageNet feature distance (FD). The student's last encoder
  stage on the source images is pulled towards that of a frozen copy of the
  encoder as the run starts (its ImageNet weights, `model.backbone_weights`):
  the L2 distance between the two feature vectors, averaged over the feature
  cells whose pooled source label is a thing class (`fd_classes`, by name;
  Cityscapes' traffic light, traffic sign, person, rider, car, truck, bus,
  train, motorcycle, bicycle), weighted by `fd_lambda` (0.005). A cell's
  label is the majority of the label pixels it covers (ignored pixels a class
  of their own), and ignored when that majority holds less than
  `fd_min_ratio` (0.75) of them (DAFormer's `downscale_label_ratio`). The
  average is over the global batch; with no such cell the term is 0. Without
  backbone weights the copy would be random: FD is off, with a log line.

  Masked image consistency (MIC, Hoyer et al. 2023, `adapt.mic`; MIC's
  `masking_consistency_module.py` with `mask_mode='separatetrgaug'` and the
  self-training's teacher and threshold, as its published config). Each
  target image, colour-jittered and blurred as the mixed images are (its own
  draws), is masked: a grid of round(H / `mic_block`) x round(W / `mic_block`)
  cells, each kept with probability 1 - `mic_ratio` (0.7 masked), scaled up to
  the image by nearest neighbour, and masked pixels set to 0 after
  normalisation (the mean colour). The student's prediction of the masked
  image learns the teacher's pseudo labels of the whole, unmasked image, with
  their weights (the share of confident pixels, the ignored rows at 0):
  `loss_mask`, weighted by `mic_lambda` (1). The masks are drawn per example
  from its index in the global batch.

The frozen encoder is the state 'imnet' ({'params': the encoder's}),
checkpointed with the others; a fresh run copies it from the student once the
backbone weights are loaded, before config.init_from replaces the student's
(`keep_pretrained`), so it holds the ImageNet weights either way. The
segmenter must have a pretrained encoder with an `encode` method (the MiT
segmenters). DAFormer's other parts are elsewhere: rare-class sampling in the
input pipeline (`data.rcs`), AdamW with warm-up, 10x head learning rate and no
decay on norms in `optim.seg`, the MiT segmenters in `segjax.models.segformer`
(configs/daformer.py sets them all).
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from segjax import data, losses, models, parallel
from segjax.data import pipeline
from segjax.methods import base, self_training
from segjax.models import layers, weights
from segjax.models.backbones import vit

CITYSCAPES_THINGS = ("traffic light", "traffic sign", "person", "rider", "car", "truck", "bus",
                     "train", "motorcycle", "bicycle")


def pooled_labels(labels: jax.Array, grid: tuple[int, int], num_classes: int,
                  min_ratio: float) -> jax.Array:
  """(N, h, w) labels of a feature grid: each cell's majority label, or -1 (ignored).

  Cell (i, j) covers the label pixels [i*s, (i+1)*s) x [j*t, (j+1)*t) with s, t
  the label size over the grid rounded up (exact for DAFormer's 512 / 16);
  pixels past the image count as ignored. A cell whose majority holds less
  than `min_ratio` of its pixels, or whose majority is the ignored pixels, is
  ignored.
  """
  n, height, width = labels.shape
  h, w = grid
  s, t = -(-height // h), -(-width // w)
  labels = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes)
  labels = jnp.pad(labels, ((0, 0), (0, h * s - height), (0, w * t - width)),
                   constant_values=num_classes)
  onehot = jax.nn.one_hot(labels, num_classes + 1, dtype=jnp.float32)
  ratios = onehot.reshape(n, h, s, w, t, num_classes + 1).mean(axis=(2, 4))
  majority, ratio = jnp.argmax(ratios, axis=-1), jnp.max(ratios, axis=-1)
  return jnp.where((majority == num_classes) | (ratio < min_ratio), -1, majority)


def block_mask(key: jax.Array, height: int, width: int, block: int, ratio: float) -> jax.Array:
  """(height, width) bool, True where kept: MIC's `BlockMaskGenerator`. A grid of
  round(height / block) x round(width / block) cells (at least 1 x 1), each kept when its
  uniform draw exceeds `ratio`, scaled up to the image by nearest neighbour (cell
  floor(i * rows / height))."""
  rows, cols = max(1, round(height / block)), max(1, round(width / block))
  keep = jax.random.uniform(key, (rows, cols)) > ratio
  return keep[(jnp.arange(height) * rows // height)[:, None],
              (jnp.arange(width) * cols // width)[None, :]]


def feature_distance(student: jax.Array, frozen: jax.Array, mask: jax.Array):
  """(sum, count) of the per-cell L2 distances between the two (N, h, w, C) maps over `mask`.

  The square root's gradient is 0 where the distance is 0 (as PyTorch's
  norm), not NaN: the copies are equal at the start.
  """
  squared = jnp.sum(jnp.square(student.astype(jnp.float32) - frozen.astype(jnp.float32)), -1)
  positive = squared > 0
  distance = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
  return jnp.sum(jnp.where(mask, distance, 0.0)), jnp.sum(mask)


class DAFormer(self_training.SelfTraining):
  """DACS self-training with DAFormer's feature distance: see the module docstring."""
  adapt_fields = {
      **self_training.SelfTraining.adapt_fields,
      "st_ignore_top": 15 / 512,
      "st_ignore_bottom": 120 / 512,
      "fd_lambda": 0.005,  # 0: no feature distance.
      "fd_classes": CITYSCAPES_THINGS,  # Class names; those the dataset lacks are left out.
      "fd_min_ratio": 0.75,
      "mic": False,  # Masked image consistency.
      "mic_ratio": 0.7,  # The share of masked blocks.
      "mic_block": 64,  # The blocks' size in pixels (of the training crop).
      "mic_lambda": 1.0,
  }

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    super().__init__(config, num_classes)
    adapt = self.adapt
    if adapt.fd_lambda < 0:
      raise ValueError(f"adapt.fd_lambda={adapt.fd_lambda} must be >= 0.")
    if not 0.0 <= adapt.fd_min_ratio <= 1.0:
      raise ValueError(f"adapt.fd_min_ratio={adapt.fd_min_ratio} must be in [0, 1].")
    names = data.dataset_info(config.data.source, "data.source").class_names
    self.fd_classes = tuple(names.index(c) for c in adapt.fd_classes if c in names)
    self.fd_lambda = adapt.fd_lambda
    if self.fd_lambda and not config.model.backbone_weights:
      logging.info("ImageNet feature distance off: model.backbone_weights is not set, so the "
                   "frozen encoder would be a random one.")
      self.fd_lambda = 0.0
    if self.fd_lambda and not hasattr(models.segmenter_class(config.model.name), "encode"):
      raise ValueError(f"adapt.fd_lambda={adapt.fd_lambda}: the feature distance needs a "
                       f"segmenter with a pretrained encoder (encode()); model.name="
                       f"{config.model.name!r} has none. Use a MiT segmenter "
                       f"(daformer_mitb5, ...) or set adapt.fd_lambda=0.")
    if not 0.0 <= adapt.mic_ratio < 1.0:
      raise ValueError(f"adapt.mic_ratio={adapt.mic_ratio} must be in [0, 1).")
    if adapt.mic_block < 1:
      raise ValueError(f"adapt.mic_block={adapt.mic_block} must be a positive number of pixels.")
    if adapt.mic_lambda < 0:
      raise ValueError(f"adapt.mic_lambda={adapt.mic_lambda} must be >= 0.")
    self.mic = bool(adapt.mic)
    if self.fd_lambda and not self.fd_classes:
      raise ValueError(f"adapt.fd_classes={tuple(adapt.fd_classes)}: none is a class of "
                       f"data.source ({', '.join(names)}).")

  def state_inits(self, rng, seg_init):
    inits = super().state_inits(rng, seg_init)
    if self.fd_lambda:
      inits["imnet"] = lambda: {"params": seg_init().params[weights.BACKBONE]}
    return inits

  def keep_pretrained(self, states: dict) -> dict:
    """The frozen encoder: the student's once the backbone weights are loaded, before
    config.init_from (a source-only run's weights, say) replaces the student's."""
    if not self.fd_lambda:
      return states
    # A copy: the step donates its states, and a buffer cannot be donated twice.
    return dict(states, imnet={"params": jax.tree.map(jnp.copy,
                                                      states["seg"].params[weights.BACKBONE])})

  def source_terms(self, states: dict, src: dict, src_out: dict, axis_name: str):
    """The feature distance of the student's source pass (`loss_fd`)."""
    if not self.fd_lambda:
      return 0.0, {}
    frozen = jax.lax.stop_gradient(states["seg"].apply_fn(
        {"params": {weights.BACKBONE: states["imnet"]["params"]}},
        self.preprocess(src["image"]), method="encode")[-1])
    student = src_out["features"]
    cells = pooled_labels(src["label"], student.shape[1:3], self.num_classes,
                          self.adapt.fd_min_ratio)
    total, count = feature_distance(student, frozen, jnp.isin(cells, jnp.asarray(self.fd_classes)))
    loss_fd = self.fd_lambda * losses.global_mean(total, count, axis_name)
    return loss_fd, {"loss_fd": loss_fd}

  def target_inputs(self, target_images, pseudo, weights, example_keys):
    """MIC's masked target images, with the teacher's pseudo labels of the unmasked ones."""
    if not self.mic:
      return {}
    keys = jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, 2)))(example_keys)
    images = self._strong_augment(target_images, keys[:, 0])
    return {"image": images, **self.draw_masks(keys[:, 1], images.shape[1:3]),
            "label": pseudo, "weight": weights}

  def draw_masks(self, keys: jax.Array, size: tuple[int, int]) -> dict:
    """One mask per example key, for images of `size`: MIC's kept blocks, {'keep': (N, H, W)}."""
    keep = jax.vmap(lambda key: block_mask(key, *size, self.adapt.mic_block,
                                           self.adapt.mic_ratio))(keys)
    return {"keep": keep}

  def masked_pass(self, seg, params, stats, inputs: dict, rng: jax.Array):
    """The student on the masked target images: (outputs, batch statistics). MIC's masked
    pixels are 0 after normalisation (the mean colour)."""
    images = self.preprocess(inputs["image"]) * inputs["keep"][..., None]
    return base.segment(seg, params, stats, images, rng)

  def target_terms(self, seg, params, stats, inputs, rng, axis_name):
    """MIC's `loss_mask`: the student on the masked target images."""
    if not self.mic:
      return 0.0, {}, stats
    out, stats = self.masked_pass(seg, params, stats, inputs, jax.random.fold_in(rng, 1))
    loss_mask, parts = self.weighted_loss(out, inputs["label"], inputs["weight"], axis_name,
                                          "loss_mask")
    return self.adapt.mic_lambda * loss_mask, parts, stats


class HRDA(DAFormer):
  """HRDA (Hoyer et al. 2022b): DAFormer's self-training of an HRDA segmenter.

  The multi-resolution training is the segmenter's (`segjax.models.hrda`:
  context at scale 0.5, a full-resolution detail window, the scale attention);
  its detail loss (x `loss.detail_weight`, 0.1) joins the source, mixed and
  MIC losses (`loss_detail`, `loss_mix_detail`, `loss_mask_detail`), each
  fused prediction's loss x 0.9 (HRDA's 1 - detail weight); the
  teacher's pseudo labels come from its sliding detail windows; the feature
  distance compares the context's features (scale 0.5). The fields are
  DAFormer's.
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    super().__init__(config, num_classes)
    if not config.model.name.startswith("hrda_"):
      raise ValueError(f"adapt.method='hrda' trains an HRDA segmenter (model.name hrda_mitb0 "
                       f"... hrda_mitb5); got model.name={config.model.name!r}.")


def token_mask(key: jax.Array, tokens: int, ratio: float) -> jax.Array:
  """(tokens,) bool, True where masked: each token masked on its own with probability `ratio`
  (VFM-UDA's `TokenMasking`: a Bernoulli draw per token, not an exact count)."""
  return jax.random.uniform(key, (tokens,)) < ratio


def weak_jitter(image: jax.Array, key: jax.Array) -> jax.Array:
  """VFM-UDA's weak augmentation (`random_aug_weak`): torchvision's ColorJitter(32/255, 0.5,
  0.5, 18/360) with probability 0.9, on an image in [0, 255]."""
  return self_training.color_jitter(image, key, 0.5, 0.9, brightness=32 / 255, hue=18 / 360)


def flip_averaged_probs(predict, images: jax.Array) -> jax.Array:
  """The mean of softmax(predict(x)) and its prediction of the mirrored image mirrored back:
  VFM-UDA's pseudo labels (N, H, W, classes) of images (N, H, W, 3)."""
  probs = jax.nn.softmax(predict(images), axis=-1)
  flipped = jax.nn.softmax(predict(images[:, :, ::-1]), axis=-1)[:, :, ::-1]
  return (probs + flipped) / 2


class VFMUDA(DAFormer):
  """VFM-UDA (Englert et al. 2024, tue-mps/vfm-uda `uda_vit_generic.py`): DAFormer's
  self-training of a DINOv2 ViT segmenter (`segjax.models.vfm`), with

    * pseudo labels from the teacher's softmax averaged over a horizontal flip
      (`flip_averaged_probs`); the confidence weight as DAFormer's;
    * MIC's consistency on masked *tokens*: each target image, strongly
      augmented (its own colour jitter and blur draws), goes through the
      student with each patch token replaced by the encoder's mask token with
      probability `mic_ratio` (0.7), drawn per example from its index in the
      global batch; its loss against the teacher's pseudo labels of the
      unmasked image, with their weights, is `loss_mask` (x `mic_lambda`, 1);
    * the target images weakly colour-jittered before ClassMix pastes the
      source pixels onto them (`st_target_weak`, VFM-UDA's `random_aug_weak`:
      brightness 32/255, contrast and saturation 0.5, hue 18/360, probability
      0.9), then the mixed image strongly augmented as DAFormer's; the source
      images of the source pass weakly jittered too (`st_source_weak`; ClassMix
      pastes the unjittered source pixels, as VFM-UDA);
    * no feature distance (`fd_lambda` 0: the vanilla recipe has none);
    * pseudo labels ignoring the top 3% and bottom 25% of the crop's rows;
      configs/vfm_uda.py's published recipe ignores VFM-UDA's margins of the
      whole image instead (those rows and 3% of the columns on each side,
      `data.target.pseudo_margins`), where a crop holds them.
  """
  adapt_fields = {
      **DAFormer.adapt_fields,
      "st_ignore_top": 0.03,
      "st_ignore_bottom": 0.25,
      "fd_lambda": 0.0,
      "mic": True,
      "mic_ratio": 0.7,
      "st_flip_teacher": True,  # Average the teacher's softmax over a horizontal flip.
      "st_target_weak": True,  # The weak jitter of the target images before ClassMix.
      "st_source_weak": True,  # The weak jitter of the source pass's images.
  }

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    super().__init__(config, num_classes)
    if not config.model.name.startswith("vfm_"):
      raise ValueError(f"adapt.method='vfm_uda' masks a ViT segmenter's tokens (model.name "
                       f"vfm_vit_s14 ... vfm_vit_l14_reg4); got model.name="
                       f"{config.model.name!r}.")
    if self.fd_lambda:
      raise ValueError(f"adapt.fd_lambda={self.adapt.fd_lambda}: VFM-UDA's segmenters have no "
                       "feature distance here; set it to 0.")
    self.token_grid = models.build_segmenter(config.model, num_classes).token_grid(
        *pipeline.crop_size(config, "target"))

  def mix_target_images(self, images, example_keys):
    if not self.adapt.st_target_weak:
      return images
    return jax.vmap(lambda image, key: weak_jitter(image, jax.random.fold_in(key, 6)))(
        images.astype(jnp.float32), example_keys)

  def source_images(self, images, example_keys):
    if not self.adapt.st_source_weak:
      return images
    return jax.vmap(lambda image, key: weak_jitter(image, jax.random.fold_in(key, 7)))(
        images.astype(jnp.float32), example_keys)

  def teacher_probs(self, seg, ema, images):
    if not self.adapt.st_flip_teacher:
      return super().teacher_probs(seg, ema, images)
    return flip_averaged_probs(functools.partial(self.teacher_logits, seg, ema), images)

  def draw_masks(self, keys, size):
    """The token masks of the target images: {'token_mask': (N, h*w)}, h x w the encoder's
    patch grid."""
    del size  # The grid of the target crop, fixed at construction.
    tokens = self.token_grid[0] * self.token_grid[1]
    return {"token_mask": jax.vmap(lambda key: token_mask(key, tokens, self.adapt.mic_ratio))(
        keys)}

  def masked_pass(self, seg, params, stats, inputs, rng):
    """The student on the target images with their masked tokens."""
    return base.segment(seg, params, stats, self.preprocess(inputs["image"]), rng,
                        token_mask=inputs["token_mask"])


def feature_distance_loss(student: jax.Array, frozen: jax.Array):
  """(sum, count) over the pixels of VFM-UDA++'s distillation loss between (N, h, w, C) maps:
  0.1 x smooth L1 (beta 1) averaged over channels + 0.9 x (1 - cosine similarity)."""
  student, frozen = student.astype(jnp.float32), frozen.astype(jnp.float32)
  diff = jnp.abs(student - frozen)
  smooth_l1 = jnp.mean(jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5), axis=-1)
  eps = 1e-8  # PyTorch's cosine_similarity: each norm at least eps.
  cosine = jnp.sum(student * frozen, -1) / (
      jnp.maximum(jnp.linalg.norm(student, axis=-1), eps)
      * jnp.maximum(jnp.linalg.norm(frozen, axis=-1), eps))
  per_pixel = 0.1 * smooth_l1 + 0.9 * (1.0 - cosine)
  return jnp.sum(per_pixel), per_pixel.size


class VFMUDAPlusPlus(VFMUDA):
  """VFM-UDA++ (Englert et al. 2025, tue-mps/vfm-uda-plusplus `training/uda/uda.py`): VFM-UDA's
  self-training of a ViT-Adapter segmenter (`segjax.models.vit_adapter`, `vfmpp_vit_*`), with

    * MIC's block masking instead of token masking: the strongly augmented
      target image, resized to the encoder's input (1024 -> 1120), keeps each
      of round(side / `mic_block`) (64) cells per side with probability
      1 - `mic_ratio` (0.7); the rest is 0 after normalisation (`loss_mask`);
    * the source images of the student's source pass strongly augmented
      (`st_source_strong`): colour jitter 0.8/0.8/0.8/0.4 with probability
      0.8, grayscale with probability 0.1, a Gaussian blur (sigma 0.15-3) with
      probability 0.5;
    * the feature distance to a frozen DINOv2 (`fd_model`, `fd_registers`,
      read from `adapt.fd_weights`; VFM-UDA++: ViT-L/14 with registers) on
      the source and on the target images, each its own pass of the student:
      the image with VFM-UDA++'s weak colour jitter (brightness 32/255,
      contrast and saturation 0.5, hue 18/360, probability 0.9) through the
      student, its 1/32 adapter output through the distillation head, resized
      bilinearly to the frozen model's grid; the frozen model sees the
      un-jittered image resized to `fd_size` (406 x 406, a 29x29 grid) and
      gives its patch tokens after the final norm. Per pixel
      0.1 x smooth L1 (channel mean) + 0.9 x (1 - cosine), averaged over the
      global batch's pixels, x `fd_source` (0.1) and x `fd_target` (0.1):
      `loss_fd_source`, `loss_fd_target`. Without `adapt.fd_weights` the frozen
      model would be random: the distance is off, with a log line.
  The frozen model is the state 'vfm' ({'params': the ViT's}), read on a
  fresh run and checkpointed with the others.
  """
  adapt_fields = {
      **VFMUDA.adapt_fields,
      "mic_block": 64,
      "st_source_strong": True,
      "fd_source": 0.1,
      "fd_target": 0.1,
      "fd_model": "vit_l14",
      "fd_registers": 4,
      "fd_weights": "",
      "fd_size": (406, 406),
  }

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    # DAFormer's checks (MIC's fields among them); VFMUDA's are for token masking.
    DAFormer.__init__(self, config, num_classes)  # pylint: disable=non-parent-init-called
    adapt = self.adapt
    if not config.model.name.startswith("vfmpp_"):
      raise ValueError(f"adapt.method='vfm_uda_pp' trains a ViT-Adapter segmenter (model.name "
                       f"vfmpp_vit_s14, vfmpp_vit_b14, vfmpp_vit_l14); got model.name="
                       f"{config.model.name!r}.")
    if adapt.fd_lambda:
      raise ValueError(f"adapt.fd_lambda={adapt.fd_lambda}: VFM-UDA++'s feature distance is "
                       "adapt.fd_source / adapt.fd_target; set adapt.fd_lambda to 0.")
    if adapt.fd_source < 0 or adapt.fd_target < 0:
      raise ValueError(f"adapt.fd_source={adapt.fd_source} and adapt.fd_target="
                       f"{adapt.fd_target} must be >= 0.")
    if adapt.fd_model not in vit.SIZES:
      raise ValueError(f"adapt.fd_model={adapt.fd_model!r} must be one of {sorted(vit.SIZES)}.")
    self.fd_weights = adapt.fd_weights
    self.fd = bool(self.fd_weights) and (adapt.fd_source > 0 or adapt.fd_target > 0)
    if not self.fd_weights and (adapt.fd_source or adapt.fd_target):
      logging.info("VFM-UDA++'s feature distance off: adapt.fd_weights is not set, so the "
                   "frozen DINOv2 would be a random one.")
    width = vit.SIZES[adapt.fd_model][0]
    if self.fd and config.model.get("distill_features", 0) != width:
      raise ValueError(f"model.distill_features={config.model.get('distill_features', 0)}: the "
                       f"distillation head must give the frozen {adapt.fd_model}'s {width} "
                       f"channels (adapt.fd_model); set model.distill_features={width}.")
    self.segmenter = models.build_segmenter(config.model, num_classes)
    # In the student's compute dtype (VFM-UDA++ runs it under the same autocast).
    self.frozen = vit.VisionTransformer(adapt.fd_model, adapt.fd_registers,
                                        pos_antialias=adapt.fd_registers > 0,
                                        dtype=layers.dtype_of(config.model.dtype))

  def state_inits(self, rng, seg_init):
    inits = self_training.SelfTraining.state_inits(self, rng, seg_init)
    if self.fd:
      size = tuple(self.adapt.fd_size)
      inits["vfm"] = lambda: {"params": self.frozen.init(
          jax.random.key(0), jnp.zeros((1, *size, 3)))["params"]}
    return inits

  def load_initial(self, states, mesh):
    if not self.fd:
      return states
    path = self.fd_weights
    if not os.path.isfile(path):
      raise FileNotFoundError(f"adapt.fd_weights={path!r} (the frozen DINOv2 of VFM-UDA++'s "
                              "feature distance) does not exist.")
    host = jax.device_get({"params": {weights.BACKBONE: states["vfm"]["params"]}})
    loaded, report = weights.load_backbone(host, path, vit.KEY_MAP)
    logging.info("adapt.fd_weights: %s", report.summary(path))
    return dict(states, vfm=parallel.replicate_host(
        {"params": loaded["params"][weights.BACKBONE]}, mesh))

  def source_images(self, images, example_keys):
    """VFM-UDA++'s strong augmentation of the source images (`use_strong_aug_source`), else
    VFM-UDA's weak one."""
    if not self.adapt.st_source_strong:
      return super().source_images(images, example_keys)

    def one(image, key):
      jitter, gray, blur = jax.random.split(jax.random.fold_in(key, 3), 3)
      x = self_training.color_jitter(image, jitter, 0.8, 0.8, hue=0.4)
      luma = (x @ jnp.array([0.299, 0.587, 0.114], jnp.float32))[..., None]
      x = jnp.where(jax.random.uniform(gray) < 0.1, jnp.broadcast_to(luma, x.shape), x)
      return self_training.gaussian_blur(x, blur, 0.5, (0.15, 3.0))
    return jax.vmap(one)(images.astype(jnp.float32), example_keys)

  def draw_masks(self, keys, size):
    """MIC's kept blocks at the encoder's input size: {'keep': (N, H', W')}."""
    size = self.segmenter.encoder_size(*size)
    return {"keep": jax.vmap(lambda key: block_mask(key, *size, self.adapt.mic_block,
                                                    self.adapt.mic_ratio))(keys)}

  def masked_pass(self, seg, params, stats, inputs, rng):
    return base.segment(seg, params, stats, self.preprocess(inputs["image"]), rng,
                        keep=inputs["keep"])

  def extra_passes(self, states, src, tgt, example_keys, rng, axis_name):
    if not self.fd:
      return []
    seg = states["seg"]
    passes = []
    for i, (domain, images, weight) in enumerate((
        ("source", src["image"], self.adapt.fd_source),
        ("target", tgt["image"], self.adapt.fd_target))):
      if not weight:
        continue
      frozen_input = layers.resize_bilinear(self.preprocess(images), *self.adapt.fd_size)
      out = self.frozen.apply(states["vfm"], frozen_input)
      frozen = jax.lax.stop_gradient(self.frozen.patch_maps(out["tokens"], out["grid"]))
      keys = jax.vmap(lambda key, i=i: jax.random.fold_in(key, 4 + i))(example_keys)
      jittered = jax.vmap(weak_jitter)(images.astype(jnp.float32), keys)
      name = f"loss_fd_{domain}"

      def fd_pass(params, inputs, stats, weight=weight, name=name, i=i):
        out, stats = base.segment(seg, params, stats, self.preprocess(inputs["image"]),
                                  jax.random.fold_in(rng, 10 + i))
        student = seg.apply_fn({"params": params}, out["features"],
                               method="distill_features_of")
        student = layers.resize_bilinear(student.astype(jnp.float32),
                                         *inputs["frozen"].shape[1:3])
        loss = weight * losses.global_mean(*feature_distance_loss(student, inputs["frozen"]),
                                           axis_name)
        return loss, (stats, {name: loss})
      passes.append((fd_pass, {"image": jittered, "frozen": frozen}))
    return passes
