"""pseudo_label: training on offline pseudo labels of the target set, plus AdaptSegNet's adversary.

The real-time seed's self-training (UDA-REFERENCE.md 2f, after BDL): pseudo
labels of the target training images are made once from a trained
checkpoint (`python -m segjax.tools.make_pseudo_labels`: class-wise median
thresholds capped at 0.9, or CBST's class-balanced ones) and read with the
images (`data.target.pseudo_labels`, `segjax.data.pseudo_label_files`). One
step:
  (a) the segmenter minimises its source loss + lambda_pl * the same loss on
      the target images against their pseudo labels (255 ignored; the seed
      puts CE on the main and both auxiliary heads of BiSeNet, weighted as on
      the source: loss.aux_weights) + lambda_adv * GAN(D(softmax(target
      logits)), source), the discriminator fixed: the seed's
      L_target = lambda_adv L_adv + L_seg(pseudo) with lambda_pl = 1;
  (b) the discriminator learns to tell the stop-gradient softmax maps of the
      two domains apart, as in adaptsegnet (`output_space.disc_update`).
lambda_adv = 0: self-training on source and pseudo labels only (CBST's
objective), without a discriminator. Adaptation is single-level, on the main
head (the seed's); `adapt.gan` selects the vanilla or least-squares GAN.
Rounds of CBST (labels made again from the last model with a growing
portion): `python -m segjax.tools.self_training_rounds`.
"""

import jax
import jax.numpy as jnp
import ml_collections

from segjax import losses
from segjax.methods import base, output_space

class PseudoLabel(base.Method):
  """See the module docstring; states 'seg' and, with lambda_adv > 0, 'disc'."""
  target_labels = True
  adapt_fields = {
      "lambda_pl": 1.0,  # The weight of the loss on the pseudo labels of the target images.
      "lambda_adv": 0.0,  # AdaptSegNet's adversarial term on the main head (0: no discriminator).
      "gan": "vanilla",  # Or "ls" (least squares).
      # How segjax.tools.make_pseudo_labels makes the labels: thresholds "median" (capped at
      # pl_cap) or "cbst" (class-balanced, at the portion min(pl_portion + pl_round *
      # pl_portion_step, pl_portion_max)), computed over the whole target set (pl_scope
      # "dataset", BDL) or each image alone ("image", the seed's code).
      "pl_threshold": "median",
      "pl_scope": "dataset",
      "pl_cap": 0.9,
      "pl_portion": 0.2,
      "pl_portion_step": 0.05,
      "pl_portion_max": 0.5,
      "pl_round": 0,
  }

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    super().__init__(config, num_classes)
    adapt = self.adapt
    self.lambda_pl = adapt.lambda_pl
    self.lambda_adv = adapt.lambda_adv
    if self.lambda_pl <= 0:
      raise ValueError(f"adapt.lambda_pl={self.lambda_pl} must be > 0 for pseudo_label "
                       "(without the pseudo labels it is adaptsegnet).")
    if self.lambda_adv < 0:
      raise ValueError(f"adapt.lambda_adv={self.lambda_adv} must be >= 0.")
    self.gan = losses.gan_loss(adapt.gan)
    # Read by validation.validate_config, which then checks config.disc.
    self.disc_names = {"main": "disc"} if self.lambda_adv > 0 else {}

  def state_inits(self, rng, seg_init):
    inits = {"seg": seg_init}
    if self.disc_names:
      height, width = self.config.data.crop_size
      inits["disc"] = self.discriminator_init(rng, (1, height, width, self.num_classes))
    return inits

  @property
  def schedules(self):
    return {"seg": self.seg_lr, **{name: self.disc_schedule for name in self.disc_names.values()}}

  @staticmethod
  def disc_input(logits: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  def step(self, states: dict, batch: dict, rng: jax.Array, *, axis_name: str):
    seg = states["seg"]
    src_rng, tgt_rng = jax.random.split(base.step_rng(rng, seg.step))

    def loss_fn(params):
      src_out, tgt_out, stats, loss, parts = self.source_then_target(
          seg, params, batch, src_rng, tgt_rng, axis_name)
      pl_loss, pl_parts = self.source_loss(tgt_out, batch["target"]["label"], axis_name)
      loss = loss + self.lambda_pl * pl_loss
      parts.update({name.replace("loss_seg", "loss_pl"): value
                    for name, value in pl_parts.items()})
      disc_inputs = {}
      if self.disc_names:
        adv, disc_inputs = output_space.adversarial(
            states["disc"], self.disc_input(src_out["logits"]), self.disc_input(tgt_out["logits"]),
            self.gan, axis_name)
        loss = loss + self.lambda_adv * adv
        parts["loss_adv"] = adv
      return loss, (stats, parts, disc_inputs)

    grads, (stats, parts, disc_inputs) = jax.grad(loss_fn, has_aux=True)(seg.params)
    new_states = {"seg": base.apply_seg_gradients(seg, grads, stats, axis_name)}
    if self.disc_names:
      new_states["disc"], parts["loss_disc"] = output_space.disc_update(
          states["disc"], disc_inputs, self.gan, axis_name)
    return new_states, dict(parts, lr=self.seg_lr(seg.step))
