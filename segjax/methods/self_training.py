"""self_training: an EMA teacher, confidence-weighted pseudo labels and ClassMix (DACS / DAFormer).

Beyond the seeds: the strongest widely used UDA baseline (Tranheden et al.
2021; Hoyer et al. 2022, `mmseg/models/uda/dacs.py`). One step:
  1. The teacher, an exponential moving average of the student, predicts the
     target batch without dropout or drop path, its BatchNorm normalising with
     the batch's statistics (`st_teacher_bn` 'batch', synchronised over devices
     as in training: DACS's, DAFormer's and VFM-UDA's EMA model stays in
     training mode with dropout and drop path off) or its running statistics
     ('running'); pseudo labels are its argmax. Their weight is the share of
     target pixels whose confidence exceeds `st_threshold` (0.968), over the
     global batch, as DACS computes it per batch; rows `st_ignore_top` /
     `st_ignore_bottom` (fractions of the crop's height: DAFormer ignores 15
     and 120 of 512 rows, the ego car and the rectification border) get weight
     0, and so do the pixels of the image's margins
     `data.target.pseudo_margins` that a crop holds (HRDA's pseudo-label crop
     v2: 30, 240, 30, 30 pixels of the 2048x1024 image, top, bottom, left,
     right; `segjax.data.augment`).
  2. ClassMix: for each (source, target) pair, half of the classes present in
     the source label (rounded up) are drawn at random; their source pixels
     are pasted onto the target image, with the source labels (weight 1) over
     the pseudo labels (weight above).
  3. Strong augmentation of the mixed images as DACS: colour jitter (strength
     `st_jitter`, applied with probability `st_jitter_p` 0.8) and a Gaussian
     blur (sigma from [0.15, 1.15], probability 0.5). DACS's and DAFormer's
     `color_jitter_probability=0.2` is the probability of *no* jitter: their
     test is `if color_jitter > p` on a uniform draw, so they jitter 80% of
     the mixed images, as `st_jitter_p=0.8` does here.
  4. The student minimises its source loss + the confidence-weighted CE on the
     mixed images (weighted sum over every pixel / number of pixels). As in
     DACS and DAFormer, which call backward() once per loss, each pass is
     differentiated on its own and the next starts once its gradient is done
     (an optimisation barrier), so a step keeps one pass's activations at a
     time; the gradients add up.
  5. The teacher follows: after step t (from 0),
     teacher = alpha * teacher + (1 - alpha) * student, alpha = min(1 - 1 / (t + 2), st_alpha):
     DACS's update at the start of its iteration t + 1, so the teacher of step
     t is the mean of the students s_0 ... s_t until the momentum reaches
     st_alpha. It covers the parameters and the BatchNorm running statistics
     (which the 'running' teacher and an evaluation of the teacher,
     `--state=ema`, normalise with). At step 0 the teacher is the student
     itself, so backbone weights loaded into the student are the teacher's too.
Random draws come from the run's key folded with the step and each example's
index in the global batch, so a step is the same on any number of devices.
The student (states['seg']) is the network evaluated.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from segjax import global_batch, steps
from segjax.data import augment, pipeline
from segjax.methods import base
from segjax.models import layers

_BLUR_SIGMA = (0.15, 1.15)


def ema_alpha(step: jax.Array, alpha: float) -> jax.Array:
  """DACS's teacher momentum at (0-based) iteration `step`; the update after step t uses
  `ema_alpha(t + 1)` (see the module docstring)."""
  return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), alpha)


def ema_update(teacher: dict, student: dict, alpha: jax.Array) -> dict:
  return jax.tree.map(lambda t, s: alpha * t + (1.0 - alpha) * s, teacher, student)


def classmix_mask(label: jax.Array, key: jax.Array, num_classes: int) -> jax.Array:
  """(H, W) bool: the pixels of a random half (rounded up) of the classes present in `label`."""
  present = jnp.zeros(num_classes + 1, bool).at[
      jnp.where(label < num_classes, label, num_classes).reshape(-1)].set(True)[:num_classes]
  count = jnp.sum(present)
  chosen_count = (count + count % 2) // 2
  scores = jnp.where(present, jax.random.uniform(key, (num_classes,)), -1.0)
  rank = jnp.argsort(jnp.argsort(-scores))  # 0 for the highest score.
  chosen = present & (rank < chosen_count)
  return chosen[jnp.clip(label, 0, num_classes - 1).astype(jnp.int32)] & (label < num_classes)


def color_jitter(image: jax.Array, key: jax.Array, strength: float, prob: float, *,
                 brightness: float | None = None, contrast: float | None = None,
                 saturation: float | None = None, hue: float | None = None) -> jax.Array:
  """ColorJitter(b, c, s, h = strength) with probability `prob`; image in [0, 255]: brightness
  scales, contrast blends with the input's mean grey, saturation with each pixel's grey, hue
  rotates the colours in YIQ, in that order, clipped once at the end.

  `brightness`, `contrast`, `saturation`, `hue` set one factor's range apart from the
  others' `strength` (torchvision's ColorJitter(32/255, 0.5, 0.5, 18/360), VFM-UDA++'s weak
  augmentation); the factors are applied in that order.
  """
  pick = lambda value: strength if value is None else value
  b, c, s, h = pick(brightness), pick(contrast), pick(saturation), pick(hue)
  keys = jax.random.split(key, 5)
  apply = jax.random.uniform(keys[0]) < prob
  x = image
  gray = x @ jnp.array([0.299, 0.587, 0.114], jnp.float32)
  x = x * jax.random.uniform(keys[1], minval=1 - b, maxval=1 + b)
  mean = jnp.mean(gray)
  x = (x - mean) * jax.random.uniform(keys[2], minval=1 - c, maxval=1 + c) + mean
  gray = (x @ jnp.array([0.299, 0.587, 0.114], jnp.float32))[..., None]
  x = (x - gray) * jax.random.uniform(keys[3], minval=1 - s, maxval=1 + s) + gray
  angle = jax.random.uniform(keys[4], minval=-h, maxval=h) * 2 * jnp.pi
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  rotation = jnp.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], jnp.float32)
  x = x @ (augment.YIQ_TO_RGB @ rotation @ augment.RGB_TO_YIQ).T  # Constants, not an LU.
  return jnp.where(apply, jnp.clip(x, 0, 255), image)


def gaussian_blur(image: jax.Array, key: jax.Array, prob: float = 0.5,
                  sigma_range: tuple[float, float] = _BLUR_SIGMA) -> jax.Array:
  """A separable Gaussian blur, sigma from `sigma_range` ([0.15, 1.15]), with probability
  `prob`; the kernel spans 3 sigma of the range's top (edges clamped)."""
  radius = math.ceil(3 * sigma_range[1])
  apply_key, sigma_key = jax.random.split(key)
  sigma = jax.random.uniform(sigma_key, minval=sigma_range[0], maxval=sigma_range[1])
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  x = jnp.pad(image, ((radius,) * 2, (radius,) * 2, (0, 0)), mode="edge")
  height, width = image.shape[:2]
  x = sum(kernel[i] * x[i:i + height] for i in range(kernel.size))
  x = sum(kernel[i] * x[:, i:i + width] for i in range(kernel.size))
  return jnp.where(jax.random.uniform(apply_key) < prob, x, image)


class SelfTraining(base.Method):
  """DACS self-training with an EMA teacher and ClassMix: see the module docstring."""
  adapt_fields = {
      "st_alpha": 0.999,  # The teacher's momentum.
      "st_threshold": 0.968,  # The confidence of a pixel counted in the pseudo labels' weight.
      # Rows of the pseudo labels ignored at the top / bottom, as fractions of the height.
      "st_ignore_top": 0.0,
      "st_ignore_bottom": 0.0,
      # The strong augmentation of the mixed images: colour jitter's strength and probability,
      # and the Gaussian blur.
      "st_jitter": 0.2,
      "st_jitter_p": 0.8,  # DACS's color_jitter_probability=0.2 is the share left unjittered.
      "st_blur": True,
      # The teacher's BatchNorm: the target batch's statistics ("batch", DACS's training-mode
      # EMA model) or the running statistics ("running").
      "st_teacher_bn": "batch",
  }
  accumulates = True

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    super().__init__(config, num_classes)
    adapt = self.adapt
    self.alpha = adapt.st_alpha
    self.threshold = adapt.st_threshold
    self.ignore_top, self.ignore_bottom = adapt.st_ignore_top, adapt.st_ignore_bottom
    self.jitter, self.jitter_p = adapt.st_jitter, adapt.st_jitter_p
    self.blur = adapt.st_blur
    for field in ("st_alpha", "st_threshold", "st_ignore_top", "st_ignore_bottom", "st_jitter",
                  "st_jitter_p"):
      if not 0.0 <= adapt[field] <= 1.0:
        raise ValueError(f"adapt.{field}={adapt[field]} must be in [0, 1].")
    if adapt.st_teacher_bn not in ("batch", "running"):
      raise ValueError(f"adapt.st_teacher_bn={adapt.st_teacher_bn!r} must be 'batch' (the "
                       f"target batch's statistics) or 'running'.")
    if self.ignore_top + self.ignore_bottom >= 1.0:
      raise ValueError("adapt.st_ignore_top + adapt.st_ignore_bottom must be below 1.")
    crops = {domain: pipeline.crop_size(config, domain) for domain in ("source", "target")}
    if crops["source"] != crops["target"]:
      raise ValueError(f"self_training pastes source pixels onto target images (ClassMix), so "
                       f"both domains need one crop size; got data.source.crop_size -> "
                       f"{crops['source']} and data.target.crop_size -> {crops['target']}. "
                       f"Set both to () to use data.crop_size.")

  def state_inits(self, rng, seg_init):
    def init_teacher():
      student = seg_init()
      return {"params": student.params, "batch_stats": student.batch_stats}
    return {"seg": seg_init, "ema": init_teacher}

  def _strong_augment(self, images: jax.Array, keys: jax.Array) -> jax.Array:
    def one(image, key):
      jitter_key, blur_key = jax.random.split(key)
      x = color_jitter(image, jitter_key, self.jitter, self.jitter_p)
      return gaussian_blur(x, blur_key) if self.blur else x
    return jax.vmap(one)(images.astype(jnp.float32), keys)

  def teacher_logits(self, seg: steps.TrainState, ema: dict, images: jax.Array) -> jax.Array:
    """The teacher's (N, H, W, classes) logits of the preprocessed `images`: inference mode,
    its BatchNorm on the batch's statistics with `st_teacher_bn` 'batch'."""
    if self.adapt.st_teacher_bn == "running":
      out, _ = base.segment(seg, ema["params"], ema["batch_stats"], images, None, train=False)
      return out["logits"]
    with layers.batch_statistics():  # The statistics it would update are not kept.
      out, _ = seg.apply_fn({"params": ema["params"], "batch_stats": ema["batch_stats"]},
                            images, train=False, mutable=["batch_stats"])
    return out["logits"]

  def teacher_probs(self, seg: steps.TrainState, ema: dict, images: jax.Array) -> jax.Array:
    """The teacher's softmax of the preprocessed target `images`, from which the pseudo labels
    come (`segjax.methods.daformer.VFMUDA` averages it over a horizontal flip)."""
    return jax.nn.softmax(self.teacher_logits(seg, ema, images), axis=-1)

  def source_terms(self, states: dict, src: dict, src_out: dict, axis_name: str):
    """More loss terms of the student's source pass: (loss, {name: value}); none here
    (`segjax.methods.daformer` adds its feature distance)."""
    del states, src, src_out, axis_name
    return 0.0, {}

  def target_inputs(self, target_images: jax.Array, pseudo: jax.Array, weights: jax.Array,
                    example_keys: jax.Array) -> dict:
    """Per-example inputs of `target_terms`, made outside the differentiated function from the
    target images, the teacher's pseudo labels and their weights; none here (`daformer`'s
    masked image consistency makes its masked images)."""
    del target_images, pseudo, weights, example_keys
    return {}

  def mix_target_images(self, images: jax.Array, example_keys: jax.Array) -> jax.Array:
    """The target images ClassMix pastes the source pixels onto (VFM-UDA jitters them)."""
    del example_keys
    return images

  def source_images(self, images: jax.Array, example_keys: jax.Array) -> jax.Array:
    """The source images the student's source pass sees (VFM-UDA++ augments them)."""
    del example_keys
    return images

  def extra_passes(self, states: dict, src: dict, tgt: dict, example_keys: jax.Array,
                   rng: jax.Array, axis_name: str) -> list:
    """More passes of the student, each differentiated on its own after the others:
    [(loss_fn(params, inputs, stats) -> (loss, (stats, parts)), inputs)]; none here
    (VFM-UDA++'s feature distances)."""
    del states, src, tgt, example_keys, rng, axis_name
    return []

  def target_terms(self, seg: steps.TrainState, params, stats, inputs: dict, rng: jax.Array,
                   axis_name: str):
    """More loss terms of the student on target images: (loss, {name: value}, batch
    statistics); none here."""
    del seg, params, inputs, rng, axis_name
    return 0.0, {}, stats

  def step(self, states: dict, batch: dict, rng: jax.Array, *, axis_name: str):
    seg, ema = states["seg"], states["ema"]
    # The teacher starts as the student (DACS's alpha_0 = 0), pretrained weights included.
    ema = jax.tree.map(lambda e, s: jnp.where(seg.step == 0, s, e), ema,
                       {"params": seg.params, "batch_stats": seg.batch_stats})
    # Mixing and augmentation draw from their own stream (not the dropout keys of step_rng).
    rng_step = jax.random.fold_in(jax.random.split(rng)[1], seg.step + 1)
    src_rng, mix_rng = jax.random.split(base.step_rng(rng, seg.step))
    src, tgt = batch["source"], batch["target"]
    example_keys = global_batch.example_keys(rng_step, src["image"].shape[0])
    mask_keys, aug_keys = jax.vmap(jax.random.split, out_axes=1)(example_keys)

    # 1. Pseudo labels of the EMA teacher, weighted by the share of confident pixels.
    probs = jax.lax.stop_gradient(self.teacher_probs(seg, ema, self.preprocess(tgt["image"])))
    confidence, pseudo = jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1)
    height = pseudo.shape[1]
    rows = jnp.arange(height)[None, :, None]
    valid = ((rows >= round(self.ignore_top * height))
             & (rows < height - round(self.ignore_bottom * height)))
    if "pseudo_valid" in tgt:  # data.target.pseudo_margins: the image's margins in this crop.
      valid = valid & tgt["pseudo_valid"].astype(bool)
    confident = jax.lax.psum(jnp.sum(confidence >= self.threshold), axis_name)
    total = jax.lax.psum(confidence.size, axis_name)
    pseudo_weight = confident / total
    weights = jnp.where(valid, pseudo_weight, 0.0) * jnp.ones_like(confidence)

    # 2-3. ClassMix of source pixels onto target images, then strong augmentation.
    masks = jax.vmap(classmix_mask, in_axes=(0, 0, None))(src["label"], mask_keys,
                                                          self.num_classes)
    mixed_images = jnp.where(masks[..., None], src["image"],
                             self.mix_target_images(tgt["image"], example_keys))
    mixed_images = self._strong_augment(mixed_images, aug_keys)
    mixed_labels = jnp.where(masks, src["label"], pseudo)
    mixed_weights = jnp.where(masks, 1.0, weights)

    # 4. The student: one pass after another, each differentiated on its own, in
    # optim.accumulate_steps micro-batches.
    def source_pass(params, inputs, stats):
      src_out, stats = base.segment(seg, params, stats, self.preprocess(inputs["image"]), src_rng)
      loss, parts = self.source_loss(src_out, inputs["label"], axis_name)
      extra, extra_parts = self.source_terms(states, inputs, src_out, axis_name)
      return loss + extra, (stats, dict(parts, **extra_parts))

    def mixed_pass(params, inputs, stats):
      mix_out, stats = base.segment(seg, params, stats,
                                    steps.preprocess(inputs["image"], self.mean, self.std),
                                    mix_rng)
      loss_mix, parts = self.weighted_loss(mix_out, inputs["label"], inputs["weight"], axis_name,
                                           "loss_mix")
      return loss_mix, (stats, parts)

    def target_pass(params, inputs, stats):
      loss, parts, stats = self.target_terms(seg, params, stats, inputs, mix_rng, axis_name)
      return loss, (stats, parts)

    mixed = {"image": mixed_images, "label": mixed_labels, "weight": mixed_weights}
    passes = [(source_pass, dict(src, image=self.source_images(src["image"], example_keys))),
              (mixed_pass, mixed)]
    extra_inputs = self.target_inputs(tgt["image"], pseudo, weights, example_keys)
    if extra_inputs:
      passes.append((target_pass, extra_inputs))
    passes += self.extra_passes(states, src, tgt, example_keys, mix_rng, axis_name)
    grads, stats, parts = None, seg.batch_stats, {}
    for loss_fn, inputs in passes:
      if grads is not None:
        # The next pass starts once the gradient so far is complete, as DAFormer's separate
        # backward passes: the activations of one pass are kept at a time, not of all.
        _, inputs = jax.lax.optimization_barrier((grads, inputs))
      (_, (stats, pass_parts)), pass_grads = self.value_and_grad(loss_fn, seg.params, inputs,
                                                                 stats)
      grads = pass_grads if grads is None else jax.tree.map(jnp.add, grads, pass_grads)
      parts.update(pass_parts)
    new_seg = base.apply_seg_gradients(seg, grads, stats, axis_name)

    # 5. The teacher follows the updated student.
    alpha = ema_alpha(seg.step + 1, self.alpha)  # DACS's update at its next iteration.
    new_ema = ema_update(ema, {"params": new_seg.params, "batch_stats": new_seg.batch_stats},
                         alpha)
    metrics = dict(parts, pseudo_weight=pseudo_weight, lr=self.seg_lr(seg.step))
    return dict(states, seg=new_seg, ema=new_ema), metrics
