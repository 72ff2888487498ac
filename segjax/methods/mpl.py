"""mpl: Meta Pseudo Labels (Pham et al. 2021): a teacher learns from its student's feedback.

Three states: 'seg', the student (the network evaluated and reported);
'teacher', a segmenter of the same architecture with its own optimizer
(`optim.teacher`) and its own initialisation; 'mpl', the moving baseline of the
feedback ({'baseline': float32 scalar}, starting at 0). With lambda_adv > 0,
as in seed (c), two more: 'disc' and 'disc_teacher', the output-space
discriminators of the student and of the teacher (AdaptSegNet's, on softmax
maps). One step, with the source batch as the labelled data (x_l, y_l) and
the target batch as the unlabelled data x_u:
  1. The teacher (training mode) segments x_u; the pseudo labels y_hat are its
     argmax (hard, no gradient, no threshold).
  2. The student minimises its source loss (every head) + mpl_student_weight x
     the same loss of its target outputs against y_hat (+ lambda_adv x its
     adversarial term, 'disc' fixed), one optimizer step.
     Its labelled loss before the step, CE_l(old), is the plain CE of the main
     head in that step's source pass.
  3. CE_l(new): the same CE, of the updated student, on the same source batch.
  4. Feedback h = CE_l(old) - CE_l(new) (see the sign below); the teacher uses
     h - b, with b the baseline before this step, then b <- b - rate (b - h)
     (the official `moving_dot_product`, rate 0.01).
  5. The teacher minimises its source loss (every head)
       + mpl_uda_weight min(1, t / mpl_uda_steps) x UDA
       + (h - b) x CE(y_hat, teacher(x_u))
       (+ lambda_adv x its adversarial term on x_u, 'disc_teacher' fixed),
     UDA being the seed's term: the teacher's loss (every head) on x_u with
     Gaussian noise (std mpl_noise_std, normalised units) on a random
     rectangle of each image, against its own clean pseudo labels y_hat (a
     consistency term), and t the step from 0. The (h - b) term uses the main head, which y_hat comes from.
  6. Each discriminator learns to tell its segmenter's stop-gradient source
     and target softmax maps apart (`output_space.disc_update`).

Both labelled losses are taken in training mode (batch statistics, the same
dropout key), so h measures the change of the parameters and nothing else: in
inference mode they would use running statistics, which lag the parameters,
and cost two more forward passes. The pass for CE_l(new) leaves the running
statistics alone. The teacher's three passes (source, x_u, noisy x_u) are
made once, before the student's step, and differentiated after it (`jax.vjp`)
with the feedback as the cotangent of the (h - b) term. Noise comes from the
run's key folded with the step and each image's index in the global batch, so
a step is the same on any number of devices.

The sign. The paper's feedback, h = eta_S grad L_l(theta'_S)^T grad
CE(y_hat, S(x_u; theta_S)), is to first order L_l(theta_S) - L_l(theta'_S),
since theta'_S - theta_S = -eta_S grad CE(y_hat, S(x_u)): h = old - new,
positive when the step on y_hat lowered the student's labelled loss. The
teacher's gradient of the expected labelled loss after the step, through its
distribution of y_hat (the score function; L_l(theta_S) drops out as a
baseline), is E[-h grad_T log P_T(y_hat)] = E[h grad_T CE(y_hat, T(x_u))], so
the teacher MINIMISES h x CE(y_hat, T(x_u)): pseudo labels that helped become
more likely, those that hurt less likely. The official code
(google-research/google-research `meta_pseudo_labels/training_utils.py`)
writes `dot_product = s_on_l_new - shadow` (new - old) and adds
`dot_product * cross_entropy['mpl']` to the minimised teacher loss, the
opposite sign; there the term's gradient is zero anyway, since its targets are
the stop-gradient softmax of its own logits (google-research/google-research
#534), so the released code never exercised its sign. The kekmodel PyTorch
port, whose hard pseudo labels make the term live, carries both: old - new as
the "theoretically correct formula" (kekmodel/MPL-pytorch#6) and new - old as
the "author's code formula", its versions and forks differing on which is
active. segjax uses old - new, the one that follows from the derivation;
tests/test_mpl.py checks on a toy problem that the feedback makes helpful
pseudo labels more likely and harmful ones less likely, and that new - old
fails that check.

The baseline. The student's step here also follows the source labels, so h
holds a part that does not depend on y_hat (about eta_S |grad L_l|^2 > 0); the
moving baseline removes its average, leaving the pseudo labels' share.

Differences from the official code: hard argmax pseudo labels for the student
and the feedback (the paper's large-scale setting; the code's soft labels make
the feedback term vanish); the baseline before its update is used (the
official code reads it after, which scales h - b by 0.99); the baseline starts
at 0 (TensorFlow's default initialiser drew it from U(-sqrt 3, sqrt 3), which
the ports copy); no gradient clipping, label smoothing or student EMA; the UDA
term is the seed's noise consistency, not UDA's RandAugment KL with
temperature and confidence mask. Differences from seed (c) (`MPL.py`,
UDA-REFERENCE.md 2f): the seed scales its teacher term by H = eta_S x
L_tgt x L_src x alpha, a product of the student's losses that is always
positive (so it only ever reinforces the teacher's pseudo labels), with the
heuristic alpha = exp(epoch / 40) - 1 (1 / H at epoch 0, 1 after epoch 25);
here by the MPL feedback h - b, which can be negative. The seed's pseudo
labels are the teacher's inference-mode predictions; here y_hat comes from the
teacher's training-mode pass that the (h - b) term differentiates. The seed draws one noise rectangle per batch and
adds the UDA term on half of the steps (weight 1); here every image has its
own rectangle on every step (configs/mpl.py weights it 0.5, the seed's
expectation). The seed's teacher starts from its adapted (adversarial)
checkpoint: adapt.mpl_teacher_from=WORKDIR[:latest|best|STEP] does the same
(the teacher's variables become that run's segmenter's; its optimizer state
and step start fresh); unset, the teacher has its own initialisation (with
model.backbone_weights, like the student).
"""

import jax
import jax.numpy as jnp
import ml_collections

from segjax import global_batch, losses, optim, steps
from segjax.methods import base, output_space


def feedback(ce_old: jax.Array, ce_new: jax.Array) -> jax.Array:
  """h = CE_l(old) - CE_l(new): positive when the student's step on the pseudo labels helped."""
  return ce_old - ce_new


def update_baseline(baseline: jax.Array, h: jax.Array, rate: float) -> jax.Array:
  """The official `moving_dot_product` update, b <- b - rate (b - h)."""
  return baseline - rate * (baseline - h)


def uda_ramp(step: jax.Array, uda_steps: int) -> jax.Array:
  """min(1, step / uda_steps) for the (0-based) step; 1 when uda_steps is 0."""
  if not uda_steps:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, step.astype(jnp.float32) / uda_steps)


def add_rectangle_noise(image: jax.Array, key: jax.Array, std: float) -> jax.Array:
  """N(0, std^2) noise on a random rectangle of one (H, W, C) image, as seed (c)'s `gaussian_noise`.

  The corner is uniform over the image and each side uniform up to the border.
  """
  height, width = image.shape[:2]
  keys = jax.random.split(key, 5)
  top = jax.random.randint(keys[0], (), 0, height)
  left = jax.random.randint(keys[1], (), 0, width)
  rows = jnp.floor(jax.random.uniform(keys[2]) * (height - top)).astype(jnp.int32)
  cols = jnp.floor(jax.random.uniform(keys[3]) * (width - left)).astype(jnp.int32)
  y, x = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
  inside = (y >= top) & (y < top + rows) & (x >= left) & (x < left + cols)
  return image + std * inside * jax.random.normal(keys[4], image.shape, image.dtype)


class MetaPseudoLabels(base.Method):
  """Meta Pseudo Labels with a student ('seg'), a teacher and a feedback baseline: see above."""
  pretrained_states = ("seg", "teacher")
  adapt_fields = {
      # Student and teacher each fool their own output-space discriminator, on the main head's
      # softmax, with this weight (0: no discriminators).
      "lambda_adv": 0.0,
      "gan": "vanilla",  # Or "ls" (least squares).
      "mpl_student_weight": 1.0,  # The student's loss on the teacher's pseudo labels.
      # The teacher's UDA (noise consistency) weight, ramped up over mpl_uda_steps (0: no
      # ramp), and its noise std (normalised units).
      "mpl_uda_weight": 1.0,
      "mpl_uda_steps": 0,
      "mpl_noise_std": 1.0,
      "mpl_baseline_rate": 0.01,  # The rate of the feedback's moving baseline.
      # The teacher starts as this run's segmenter ('WORKDIR[:latest|best|STEP]'; seed (c):
      # the adversarially adapted model); "": its own initialisation.
      "mpl_teacher_from": "",
  }

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    super().__init__(config, num_classes)
    adapt = self.adapt
    for field in ("mpl_student_weight", "mpl_uda_weight", "mpl_uda_steps", "mpl_noise_std"):
      if adapt[field] < 0:
        raise ValueError(f"adapt.{field}={adapt[field]} must be >= 0.")
    if not 0.0 < adapt.mpl_baseline_rate <= 1.0:
      raise ValueError(f"adapt.mpl_baseline_rate={adapt.mpl_baseline_rate} must be in (0, 1].")
    self.student_weight = adapt.mpl_student_weight
    self.uda_weight = adapt.mpl_uda_weight
    self.uda_steps = adapt.mpl_uda_steps
    self.noise_std = adapt.mpl_noise_std
    self.baseline_rate = adapt.mpl_baseline_rate
    name = config.optim.teacher.get("name", "sgd")
    if name not in optim.OPTIMIZERS:
      raise ValueError(f"Unknown optimizer {name!r} (config field optim.teacher.name); "
                       f"expected one of {list(optim.OPTIMIZERS)}.")
    self.teacher_tx, self.teacher_lr = optim.segmenter_optimizer(config.optim.teacher,
                                                                 config.num_train_steps)
    self.lambda_adv = adapt.lambda_adv
    if self.lambda_adv < 0:
      raise ValueError(f"adapt.lambda_adv={self.lambda_adv} must be >= 0.")
    self.gan = losses.gan_loss(adapt.gan)
    # The student's discriminator and the teacher's; read by validation.validate_config.
    self.disc_names = ({"student": "disc", "teacher": "disc_teacher"} if self.lambda_adv > 0
                       else {})

  def state_inits(self, rng, seg_init):
    model = base.build_segmenter(self.config, self.num_classes)
    height, width = self.config.data.crop_size

    def init_teacher():
      # `rng` is not the student's key (states.create_states splits them), so the two differ.
      variables = model.init(rng, jnp.zeros((1, height, width, 3)), train=False)
      return steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                     batch_stats=variables.get("batch_stats", {}),
                                     tx=self.teacher_tx)

    def init_feedback():
      return {"baseline": jnp.zeros((), jnp.float32)}

    inits = {"seg": seg_init, "teacher": init_teacher, "mpl": init_feedback}
    for i, name in enumerate(self.disc_names.values()):
      inits[name] = self.discriminator_init(jax.random.fold_in(rng, i + 1),
                                            (1, height, width, self.num_classes))
    return inits

  @property
  def segmenter_sources(self):
    return {"teacher": ("config.adapt.mpl_teacher_from", self.adapt.mpl_teacher_from)}

  @property
  def schedules(self):
    return {"seg": self.seg_lr, "teacher": self.teacher_lr,
            **{name: self.disc_schedule for name in self.disc_names.values()}}

  def _adversarial(self, states: dict, who: str, src_logits, tgt_logits, axis_name: str):
    """`who`'s adversarial loss on its target softmax (its discriminator fixed) and the
    stop-gradient maps its discriminator learns from; (0, None) without discriminators."""
    if not self.disc_names:
      return jnp.zeros((), jnp.float32), None
    softmax = lambda logits: jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return output_space.adversarial(states[self.disc_names[who]], softmax(src_logits),
                                    softmax(tgt_logits), self.gan, axis_name)

  def _noisy(self, images: jax.Array, rng: jax.Array) -> jax.Array:
    """Each image with its rectangle of noise, keyed by its index in the global batch."""
    keys = global_batch.example_keys(rng, images.shape[0])
    return jax.vmap(add_rectangle_noise, in_axes=(0, 0, None))(images, keys, self.noise_std)

  def _labelled_ce(self, state, images, labels, rng, axis_name: str) -> jax.Array:
    """The student's labelled loss: plain CE of the main head, training mode, global mean."""
    outputs, _ = base.segment(state, state.params, state.batch_stats, images, rng)
    return base.global_mean(losses.cross_entropy(outputs["logits"], labels), axis_name)

  def step(self, states: dict, batch: dict, rng: jax.Array, *, axis_name: str):
    student, teacher, baseline = states["seg"], states["teacher"], states["mpl"]["baseline"]
    keys = jax.random.split(base.step_rng(rng, student.step), 5)
    # Folding 0 branches off the step keys (folded from 1 on) for the device-independent noise.
    noise_rng = jax.random.fold_in(jax.random.fold_in(rng, 0), student.step)
    src_images = self.preprocess(batch["source"]["image"])
    src_labels = batch["source"]["label"]
    tgt_images = self.preprocess(batch["target"]["image"])
    noisy_images = self._noisy(tgt_images, noise_rng)

    # 1. The teacher's passes; differentiated in 5, once the feedback is known.
    def teacher_terms(params):
      src_out, stats = base.segment(teacher, params, teacher.batch_stats, src_images, keys[0])
      sup, _ = self.source_loss(src_out, src_labels, axis_name)
      tgt_out, stats = base.segment(teacher, params, stats, tgt_images, keys[1])
      pseudo = jax.lax.stop_gradient(jnp.argmax(tgt_out["logits"], axis=-1))
      pseudo_ce = base.global_mean(losses.cross_entropy(tgt_out["logits"], pseudo), axis_name)
      noisy_out, stats = base.segment(teacher, params, stats, noisy_images, keys[2])
      uda, _ = self.source_loss(noisy_out, pseudo, axis_name)
      adv, maps = self._adversarial(states, "teacher", src_out["logits"], tgt_out["logits"],
                                    axis_name)
      return (sup, uda, pseudo_ce, adv), (pseudo, stats, maps)

    (t_sup, t_uda, t_pseudo, t_adv), teacher_vjp, (pseudo, t_stats, t_maps) = jax.vjp(
        teacher_terms, teacher.params, has_aux=True)

    # 2. The student's step on source labels and pseudo labels.
    def student_loss(params):
      src_out, stats = base.segment(student, params, student.batch_stats, src_images, keys[3])
      loss, parts = self.source_loss(src_out, src_labels, axis_name)
      ce_old = base.global_mean(losses.cross_entropy(src_out["logits"], src_labels), axis_name)
      tgt_out, stats = base.segment(student, params, stats, tgt_images, keys[4])
      loss_pl, pl_parts = self.source_loss(tgt_out, pseudo, axis_name)
      parts["loss_pl"] = pl_parts["loss_seg"]
      adv, maps = self._adversarial(states, "student", src_out["logits"], tgt_out["logits"],
                                    axis_name)
      if maps is not None:
        parts["loss_adv"] = adv
      loss = loss + self.student_weight * loss_pl + self.lambda_adv * adv
      return loss, (stats, parts, ce_old, maps)

    grads, (s_stats, parts, ce_old, s_maps) = jax.grad(student_loss, has_aux=True)(
        student.params)
    new_student = base.apply_seg_gradients(student, grads, s_stats, axis_name)

    # 3-4. The feedback: the change of the labelled loss (same batch, mode and dropout key).
    ce_new = self._labelled_ce(new_student, src_images, src_labels, keys[3], axis_name)
    h = feedback(ce_old, ce_new)
    centred = jax.lax.stop_gradient(h - baseline)

    # 5. The teacher's step.
    uda_weight = self.uda_weight * uda_ramp(teacher.step, self.uda_steps)
    (t_grads,) = teacher_vjp((jnp.ones_like(t_sup), uda_weight, centred,
                              jnp.asarray(self.lambda_adv, jnp.float32)))
    new_teacher = base.apply_seg_gradients(teacher, t_grads, t_stats, axis_name)
    new_feedback = {"baseline": update_baseline(baseline, h, self.baseline_rate)}
    new_states = {"seg": new_student, "teacher": new_teacher, "mpl": new_feedback}

    # 6. The discriminators.
    if self.disc_names:
      parts["loss_teacher_adv"] = t_adv
      for who, maps in (("student", s_maps), ("teacher", t_maps)):
        name = self.disc_names[who]
        new_states[name], parts[f"loss_{name}"] = output_space.disc_update(
            states[name], maps, self.gan, axis_name)

    # mpl_baseline is the b this step used; loss_teacher_uda and _mpl are unweighted.
    metrics = dict(parts, mpl_feedback=h, mpl_baseline=baseline, loss_teacher_sup=t_sup,
                   loss_teacher_uda=t_uda, loss_teacher_mpl=t_pseudo,
                   lr=self.seg_lr(student.step), lr_teacher=self.teacher_lr(teacher.step))
    return new_states, metrics
