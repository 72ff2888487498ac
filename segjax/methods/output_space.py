"""Output-space adaptation: AdaptSegNet (adversarial on softmax maps) and ADVENT (AdvEnt, MinEnt).

AdaptSegNet (Tsai et al. 2018), an alternating minimax per level (the main
head, and with `lambda_adv_aux` > 0 the first auxiliary head: DeepLab-v2's
layer3 classifier, one discriminator per level):
  (a) the segmenter minimises the source loss (auxiliary heads weighted by
      loss.aux_weights, 0.1 for DeepLab-v2's) + sum over levels of
      lambda_adv_l * GAN(D_l(input(target logits_l)), source), the
      discriminators fixed;
  (b) each discriminator learns to tell the stop-gradient inputs of the two
      domains apart: 0.5 (GAN(D(source), 0) + GAN(D(target), 1)).
`adapt.gan`: 'vanilla' (BCE with logits) or 'ls' (least squares on the raw
outputs, AdaptSegNet's --gan LS). Domain labels: source 0, target 1.

ADVENT (Vu et al. 2019) changes the discriminators' input to the weighted
self-information map -p log2 p / log2 C (`adapt.disc_input='self_information'`,
the default for 'advent') and/or adds MinEnt, the mean normalised entropy of
the target predictions weighted by `lambda_ent` (main) and `lambda_ent_aux`.
AdvEnt alone: lambda_ent = 0; MinEnt alone: lambda_adv = 0 (no discriminator);
both: the two terms together (ADVENT's paper combines the two models' outputs
instead; this is the joint objective).
"""

import jax
import jax.numpy as jnp
import ml_collections

from segjax import losses
from segjax.methods import base

SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0
LEVELS = ("main", "aux")
DISC_INPUTS = ("softmax", "self_information")


def level_logits(outputs: dict, level: str) -> jax.Array:
  if level == "main":
    return outputs["logits"]
  if not outputs.get("aux"):
    raise ValueError("adapt.lambda_adv_aux / lambda_ent_aux need an auxiliary head, but the "
                     "segmenter has none (multi-level adaptation is for deeplabv2_r101).")
  return outputs["aux"][0]


def adversarial(disc, source_maps: jax.Array, target_maps: jax.Array, gan, axis_name: str):
  """The segmenter's adversarial loss, its target maps judged as source by `disc` (fixed), and
  the stop-gradient maps of both domains that `disc_update` then learns from."""
  d_out = disc.apply_fn({"params": disc.params}, target_maps)
  loss = base.global_mean(gan(d_out, SOURCE_DOMAIN), axis_name)
  return loss, {"source": jax.lax.stop_gradient(source_maps),
                "target": jax.lax.stop_gradient(target_maps)}


def disc_update(state, inputs: dict, gan, axis_name: str):
  """One discriminator update on stop-gradient maps: source labelled 0, target 1."""
  def loss_fn(params):
    d_src = state.apply_fn({"params": params}, inputs["source"])
    d_tgt = state.apply_fn({"params": params}, inputs["target"])
    return 0.5 * (base.global_mean(gan(d_src, SOURCE_DOMAIN), axis_name)
                  + base.global_mean(gan(d_tgt, TARGET_DOMAIN), axis_name))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


class OutputSpace(base.Method):
  """adaptsegnet and advent: see the module docstring."""
  adapt_fields = {
      # The adversarial weights on the main head and on the first auxiliary head (0: no
      # discriminator at that level).
      "lambda_adv": 0.0,
      "lambda_adv_aux": 0.0,
      # MinEnt's weights of the target entropy, main and auxiliary head.
      "lambda_ent": 0.0,
      "lambda_ent_aux": 0.0,
      "gan": "vanilla",  # Or "ls" (least squares).
      "disc_input": "",  # "softmax" or "self_information"; "": the method's (advent: the latter).
  }

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    super().__init__(config, num_classes)
    adapt = self.adapt
    default_input = "self_information" if adapt.method == "advent" else "softmax"
    self.input_kind = adapt.disc_input or default_input
    if self.input_kind not in DISC_INPUTS:
      raise ValueError(f"adapt.disc_input={self.input_kind!r}; expected one of {DISC_INPUTS}.")
    self.gan = losses.gan_loss(adapt.gan)
    self.lambda_adv = {"main": adapt.lambda_adv, "aux": adapt.lambda_adv_aux}
    self.lambda_ent = {"main": adapt.lambda_ent, "aux": adapt.lambda_ent_aux}
    for level in LEVELS:
      for name, value in (("lambda_adv", self.lambda_adv[level]),
                          ("lambda_ent", self.lambda_ent[level])):
        if value < 0:
          field = name if level == "main" else f"{name}_aux"
          raise ValueError(f"adapt.{field}={value} must be >= 0.")
    if not any(self.lambda_adv.values()) and not any(self.lambda_ent.values()):
      raise ValueError(f"adapt.method={adapt.method!r} with every lambda_adv and lambda_ent 0 "
                       "is source_only; set adapt.lambda_adv or adapt.lambda_ent.")
    # One discriminator per adversarial level.
    self.disc_names = {level: "disc" if level == "main" else "disc_aux"
                       for level in LEVELS if self.lambda_adv[level] > 0}

  def state_inits(self, rng, seg_init):
    inits = {"seg": seg_init}
    height, width = self.config.data.crop_size
    for i, (level, name) in enumerate(self.disc_names.items()):
      # The main discriminator takes `rng` itself, the auxiliary one a key folded from it.
      inits[name] = self.discriminator_init(jax.random.fold_in(rng, i) if i else rng,
                                            (1, height, width, self.num_classes))
    return inits

  @property
  def schedules(self):
    return {"seg": self.seg_lr, **{name: self.disc_schedule for name in self.disc_names.values()}}

  def disc_input(self, logits: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs if self.input_kind == "softmax" else losses.self_information(probs)

  def step(self, states: dict, batch: dict, rng: jax.Array, *, axis_name: str):
    seg = states["seg"]
    src_rng, tgt_rng = jax.random.split(base.step_rng(rng, seg.step))

    def loss_fn(params):
      src_out, tgt_out, stats, loss, parts = self.source_then_target(
          seg, params, batch, src_rng, tgt_rng, axis_name)
      disc_inputs = {}
      for level in LEVELS:
        suffix = "" if level == "main" else "_aux"
        if not (self.lambda_adv[level] or self.lambda_ent[level]):
          continue
        tgt_logits = level_logits(tgt_out, level)
        if self.lambda_ent[level]:
          ent = base.global_mean(losses.entropy(tgt_logits), axis_name)
          loss = loss + self.lambda_ent[level] * ent
          parts[f"loss_ent{suffix}"] = ent
        if self.lambda_adv[level]:
          adv, disc_inputs[level] = adversarial(
              states[self.disc_names[level]], self.disc_input(level_logits(src_out, level)),
              self.disc_input(tgt_logits), self.gan, axis_name)
          loss = loss + self.lambda_adv[level] * adv
          parts[f"loss_adv{suffix}"] = adv
      return loss, (stats, parts, disc_inputs)

    grads, (stats, parts, disc_inputs) = jax.grad(loss_fn, has_aux=True)(seg.params)
    new_states = {"seg": base.apply_seg_gradients(seg, grads, stats, axis_name)}
    for level, name in self.disc_names.items():
      suffix = "" if level == "main" else "_aux"
      new_states[name], parts[f"loss_disc{suffix}"] = disc_update(
          states[name], disc_inputs[level], self.gan, axis_name)
    return new_states, dict(parts, lr=self.seg_lr(seg.step))
