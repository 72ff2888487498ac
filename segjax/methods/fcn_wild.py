"""fcn_wild: FCNs in the Wild (Hoffman et al. 2016), global and category adaptation.

Objective (UDA-REFERENCE.md 2c): L = L_seg(source) + lambda_da L_da + lambda_ca L_ca.

Global alignment (GA, `adapt.lambda_da`): every cell of the segmenter's last
hidden map (outputs['features']: fc7 of the FCNs, CompactSeg's stride-8
context features) is one instance for the `fc7_domain` classifier D, whose
logit is the log-odds of "source" (domain labels: source 1, target 0, the
paper's convention; AdaptSegNet's are the other way round). With b(x, y) the
sigmoid cross-entropy of logit x against label y, and each domain's term a
mean over its cells in the global batch:
  L_D    = mean b(D(src), 1) + mean b(D(tgt), 0)
  L_Dinv = mean b(D(src), 0) + mean b(D(tgt), 1)
D minimises L_D on stop-gradient features (logged as loss_disc); the
segmenter minimises 0.5 (L_D + L_Dinv) with D fixed (loss_da), which is
smallest when D cannot tell the domains apart, on both domains' features.
D runs in training mode (channel dropout) in both updates, as in CyCADA's
trainer; its masks come from the step's key and the device.

Category adaptation (CA, `adapt.lambda_ca`), from per-class statistics of the
source labels (`segjax.data.category_stats`): alpha_c (10th percentile of
the fraction of an image covered by c, over the images containing c),
delta_c (mean), gamma_c (90th percentile). In each target image, class c is
present when the share of pixels whose argmax is c exceeds 0.1 alpha_c
(classes never seen in the source never are). The predicted mass of a present
class, s_c = mean over pixels of p(c), is held to delta_c <= s_c <= gamma_c,
the lower bound with a slack, the upper one hard, CCNN-style (Pathak et al.
2015): the latent distribution P* closest to the prediction,
  P* = argmin_P mean_pixels KL(P || p) + ca_slack * sum_c max(0, delta_c - S_c(P))
       subject to S_c(P) <= gamma_c,   S_c(P) = mean over pixels of P(c),
has the form P*(c) proportional to p(c) exp(lo_c - up_c), with dual variables
0 <= lo_c <= ca_slack and up_c >= 0 (0 for classes not present). They are
found by `ca_iterations` steps of projected gradient ascent on the dual,
  lo_c <- clip(lo_c + ca_step_size (delta_c - S_c(P)), 0, ca_slack)
  up_c <- max(0, up_c + ca_step_size (S_c(P) - gamma_c)),
from 0, on stop-gradient predictions. The dual's gradient is Lipschitz with
constant at most 1 (the covariance of a one-hot vector has eigenvalues at most
1/2, and lo and up enter as lo - up), so step 1 is the textbook 1/L. Then
L_ca is the cross-entropy -mean_pixels sum_c P*(c) log p(c), whose gradient
on the logits, p - P*, is scaled by 0.1 for the large classes (alpha_c > 0.1)
and is exactly 0 in images where every present class is within its bounds.
ca_slack is the price of a unit of lower-bound violation: the lower bound can
raise a class's odds by at most exp(ca_slack); with 0 it is not enforced.

The paper's CCNN solver settings are not public: the iteration count, step
size and slack above are this implementation's choices. The statistics are
read from `adapt.category_stats` (a file written by the command), or, when it
is empty, computed from data.source at start-up (on every process alike); in
both cases they are copied into the workdir at the first start, and a run
that finds that copy uses it, so a resumed run has the same statistics.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from segjax import data, losses, models, optim, steps
from segjax.data import category_stats
from segjax.methods import base

SOURCE_DOMAIN = 1.0  # D's logit is the log-odds of "source".
TARGET_DOMAIN = 0.0
DISCRIMINATOR = "fc7_domain"
STATS_FILE = "category_stats.json"  # The workdir's copy of the statistics.
PRESENCE_FACTOR = 0.1  # c is present in a target image when its argmax share > 0.1 alpha_c.
LARGE_CLASS_ALPHA = 0.1  # Classes with alpha_c above this are "large"...
LARGE_CLASS_GRADIENT = 0.1  # ...and their CA gradient is scaled by this.


class SizeStats(NamedTuple):
  """The per-class size statistics of the source labels, as fractions of an image."""
  alpha: np.ndarray  # (C,) 10th percentile.
  delta: np.ndarray  # (C,) mean.
  gamma: np.ndarray  # (C,) 90th percentile.
  seen: np.ndarray  # (C,) bool: some source image contains the class.

  @classmethod
  def from_record(cls, record: dict) -> "SizeStats":
    return cls(*(np.asarray(record[k], np.float32) for k in ("alpha", "delta", "gamma")),
               np.asarray(record["images"]) > 0)


def domain_loss(d_source: jax.Array, d_target: jax.Array, axis_name: str | None,
                inverted: bool = False) -> jax.Array:
  """L_D (or L_Dinv): each domain's mean cross-entropy against its (inverted) label, summed."""
  src_label, tgt_label = ((TARGET_DOMAIN, SOURCE_DOMAIN) if inverted
                          else (SOURCE_DOMAIN, TARGET_DOMAIN))
  return (losses.global_mean(*losses.binary_cross_entropy(d_source, src_label), axis_name)
          + losses.global_mean(*losses.binary_cross_entropy(d_target, tgt_label), axis_name))


def present_classes(logits: jax.Array, stats: SizeStats,
                    presence_factor: float = PRESENCE_FACTOR) -> jax.Array:
  """(N, C) bool: classes whose argmax share in each image exceeds presence_factor * alpha."""
  num_classes = logits.shape[-1]
  argmax = jnp.argmax(logits.reshape(logits.shape[0], -1, num_classes), axis=-1)
  share = jnp.mean(jax.nn.one_hot(argmax, num_classes, dtype=jnp.float32), axis=1)
  return (share > presence_factor * jnp.asarray(stats.alpha)) & jnp.asarray(stats.seen)


def latent_distribution(logits: jax.Array, stats: SizeStats, *, iterations: int,
                        step_size: float, slack: float,
                        presence_factor: float = PRESENCE_FACTOR) -> jax.Array:
  """P* (N, H, W, C) for predictions `logits` (N, H, W, C): see the module docstring.

  Per image, the present classes' mass is pulled towards [delta, gamma]
  (lower bound with slack `slack`) by projected dual ascent; no gradient
  flows through P*.
  """
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  n, num_classes = logits.shape[0], logits.shape[-1]
  log_p = jax.nn.log_softmax(logits, axis=-1).reshape(n, -1, num_classes)
  present = present_classes(logits, stats, presence_factor)
  delta, gamma = jnp.asarray(stats.delta), jnp.asarray(stats.gamma)

  def distribution(lower, upper):
    return jax.nn.softmax(log_p + (lower - upper)[:, None, :], axis=-1)

  def ascent(_, duals):
    lower, upper = duals
    mass = jnp.mean(distribution(lower, upper), axis=1)
    lower = jnp.where(present, jnp.clip(lower + step_size * (delta - mass), 0.0, slack), 0.0)
    upper = jnp.where(present, jnp.maximum(upper + step_size * (mass - gamma), 0.0), 0.0)
    return lower, upper

  zeros = jnp.zeros_like(present, jnp.float32)  # Varying over devices, as `present` is.
  lower, upper = jax.lax.fori_loop(0, iterations, ascent, (zeros, zeros))
  return distribution(lower, upper).reshape(logits.shape)


def size_constraint_loss(logits: jax.Array, stats: SizeStats, *, iterations: int,
                         step_size: float, slack: float,
                         presence_factor: float = PRESENCE_FACTOR,
                         large_class_alpha: float = LARGE_CLASS_ALPHA,
                         large_class_gradient: float = LARGE_CLASS_GRADIENT
                         ) -> tuple[jax.Array, jax.Array]:
  """CA's loss on target logits (N, H, W, C), as (sum over pixels, pixel count).

  The cross-entropy of the predictions against the constrained latent
  distribution P*; the gradient on the logits of each class c, p(c) - P*(c),
  is scaled by `large_class_gradient` where alpha_c > `large_class_alpha`.
  """
  latent = latent_distribution(logits, stats, iterations=iterations, step_size=step_size,
                               slack=slack, presence_factor=presence_factor)
  scale = jnp.where(jnp.asarray(stats.alpha) > large_class_alpha, large_class_gradient, 1.0)
  logits = logits.astype(jnp.float32)
  # Same values as `logits`; the gradient through them is scaled per class.
  scaled = scale * logits + jax.lax.stop_gradient((1.0 - scale) * logits)
  per_pixel = -jnp.sum(latent * jax.nn.log_softmax(scaled, axis=-1), axis=-1)
  return jnp.sum(per_pixel), jnp.asarray(per_pixel.size, jnp.float32)


def discriminator_optimizer(config: ml_collections.ConfigDict, num_steps: int
                            ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """optim.disc: Adam (the default, segjax.optim's) or 'sgd' (CyCADA's: momentum, weight decay)."""
  name = config.get("name", "adam")
  if name == "adam":
    return optim.discriminator_optimizer(config, num_steps)
  if name != "sgd":
    raise ValueError(f"Unknown discriminator optimizer {name!r} (config field optim.disc.name); "
                     "expected 'adam' or 'sgd'.")
  schedule = optim.poly_schedule(config.lr, config.get("decay_steps", 0) or num_steps,
                                 config.power)
  return optax.chain(optax.add_decayed_weights(config.get("weight_decay", 0.0)),
                     optax.sgd(schedule, momentum=config.get("momentum", 0.0) or None)), schedule


class FcnWild(base.Method):
  """FCNs in the Wild: see the module docstring."""
  adapt_fields = {
      "lambda_da": 0.1,  # Global alignment (0: no domain classifier).
      "lambda_ca": 1.0,  # Category adaptation (0: no size constraints).
      # The source size statistics: a JSON file of segjax.tools.category_stats; "": computed
      # from data.source at start-up.
      "category_stats": "",
      # The CA solver's dual-ascent iterations, step size and lower-bound slack.
      "ca_iterations": 50,
      "ca_step_size": 1.0,
      "ca_slack": 1.0,
  }

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
    super().__init__(config, num_classes)
    adapt = self.adapt
    self.lambda_da, self.lambda_ca = adapt.lambda_da, adapt.lambda_ca
    for field in ("lambda_da", "lambda_ca", "ca_step_size", "ca_slack"):
      if adapt[field] < 0:
        raise ValueError(f"adapt.{field}={adapt[field]} must be >= 0.")
    if not (self.lambda_da or self.lambda_ca):
      raise ValueError("adapt.method='fcn_wild' with adapt.lambda_da and adapt.lambda_ca both 0 "
                       "is source_only; set one of them.")
    if self.lambda_ca and adapt.ca_iterations < 1:
      raise ValueError(f"adapt.ca_iterations={adapt.ca_iterations} must be at least 1.")
    if self.lambda_ca and adapt.ca_step_size <= 0:
      raise ValueError(f"adapt.ca_step_size={adapt.ca_step_size} must be positive.")
    if self.lambda_da and config.disc.name != DISCRIMINATOR:
      raise ValueError(f"disc.name={config.disc.name!r}: fcn_wild's global alignment uses the "
                       f"per-cell feature classifier; set disc.name={DISCRIMINATOR!r}.")
    self.disc_tx, self.disc_lr = discriminator_optimizer(config.optim.disc,
                                                         config.num_train_steps)
    self.size_stats: SizeStats | None = None

  # ---- Statistics.

  def prepare(self, workdir: str, is_primary: bool = True) -> None:
    """Loads the category statistics (see the module docstring); saves the workdir's copy."""
    if not self.lambda_ca:
      return
    saved = os.path.join(workdir, STATS_FILE)
    class_names = data.dataset_info(self.config.data.source, "data.source").class_names
    path = self.adapt.category_stats
    if os.path.isfile(saved):
      record = category_stats.read(saved, class_names, "the workdir's category statistics")
      logging.info("Category statistics: %s (saved at the run's first start).", saved)
    elif path:
      record = category_stats.read(path, class_names, "adapt.category_stats")
      logging.info("Category statistics: %s (adapt.category_stats).", path)
    else:
      logging.info("adapt.category_stats is empty: computing the category statistics of "
                   "data.source (python -m segjax.tools.category_stats writes them once).")
      record = category_stats.compute(
          self.config.data.source, "data.source",
          progress=tqdm.tqdm if is_primary else (lambda iterable, **_: iterable))
    if is_primary and not os.path.isfile(saved):
      category_stats.write(record, saved)
    self.size_stats = SizeStats.from_record(record)

  # ---- States.

  def feature_shape(self) -> tuple[int, ...]:
    """The shape of the segmenter's 'features' for one crop (traced, not computed)."""
    height, width = self.config.data.crop_size
    model = base.build_segmenter(self.config, self.num_classes)
    outputs = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, height, width, 3)),
                                       train=False)[0])
    if "features" not in outputs:
      raise ValueError(f"model.name={self.config.model.name!r} returns no 'features'; fcn_wild "
                       "aligns the last hidden map (fcn*_vgg16's fc7, compact's context features).")
    return outputs["features"].shape

  def discriminator(self):
    return models.build_discriminator(self.config.disc, self.num_classes).clone(
        dropout_rate=self.config.disc.get("dropout_rate", 0.5))

  def state_inits(self, rng, seg_init):
    inits = {"seg": seg_init}
    if not self.lambda_da:
      return inits
    model, channels = self.discriminator(), self.feature_shape()[-1]

    def init_disc():
      variables = model.init(rng, jnp.zeros((1, 1, 1, channels)))
      return steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                     tx=self.disc_tx)
    inits["disc"] = init_disc
    return inits

  @property
  def schedules(self):
    return {"seg": self.seg_lr, **({"disc": self.disc_lr} if self.lambda_da else {})}

  # ---- The step.

  def ca_loss(self, logits: jax.Array, axis_name: str) -> jax.Array:
    if self.size_stats is None:
      raise RuntimeError("fcn_wild's category statistics are not loaded: call "
                         "method.prepare(workdir) before its step (train_and_evaluate does).")
    adapt = self.adapt
    return losses.global_mean(*size_constraint_loss(
        logits, self.size_stats, iterations=adapt.ca_iterations, step_size=adapt.ca_step_size,
        slack=adapt.ca_slack), axis_name)

  def step(self, states: dict, batch: dict, rng: jax.Array, *, axis_name: str):
    seg = states["seg"]
    src_rng, tgt_rng, seg_d_rng, disc_rng = jax.random.split(
        base.step_rng(rng, seg.step), 4)

    def discriminate(params, features: dict, key) -> dict:
      disc = states["disc"]
      return {domain: disc.apply_fn({"params": params}, features[domain], train=True,
                                    rngs={"dropout": jax.random.fold_in(key, i)})
              for i, domain in enumerate(("source", "target"))}

    def loss_fn(params):
      src_out, tgt_out, stats, loss, parts = self.source_then_target(
          seg, params, batch, src_rng, tgt_rng, axis_name)
      features = {"source": src_out["features"], "target": tgt_out["features"]}
      if self.lambda_da:
        d_out = discriminate(states["disc"].params, features, seg_d_rng)
        da = 0.5 * (domain_loss(d_out["source"], d_out["target"], axis_name)
                    + domain_loss(d_out["source"], d_out["target"], axis_name, inverted=True))
        loss = loss + self.lambda_da * da
        parts["loss_da"] = da
      if self.lambda_ca:
        ca = self.ca_loss(tgt_out["logits"], axis_name)
        loss = loss + self.lambda_ca * ca
        parts["loss_ca"] = ca
      return loss, (stats, parts, jax.lax.stop_gradient(features))

    grads, (stats, parts, features) = jax.grad(loss_fn, has_aux=True)(seg.params)
    new_states = {"seg": base.apply_seg_gradients(seg, grads, stats, axis_name)}
    if self.lambda_da:
      disc = states["disc"]

      def disc_loss_fn(params):
        d_out = discriminate(params, features, disc_rng)
        return domain_loss(d_out["source"], d_out["target"], axis_name)

      parts["loss_disc"], disc_grads = jax.value_and_grad(disc_loss_fn)(disc.params)
      new_states["disc"] = disc.apply_gradients(grads=disc_grads)
    return new_states, dict(parts, lr=self.seg_lr(seg.step))
