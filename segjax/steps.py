"""Pure, per-device training and evaluation steps.

Every function here is written in the pmap programming model: it sees its
device's slice of the batch and uses explicit collectives over the mesh axis
`axis_name`. `segjax.parallel.data_parallel` maps them over the devices with
`jax.shard_map` inside `jax.jit`.

The adaptation step is AdaptSegNet's alternating minimax (Tsai et al., 2018):
  (a) `seg_update`: the segmenter minimises CE(source) + lambda_adv *
      BCE(D(softmax(target logits)), SOURCE_DOMAIN), the discriminator fixed;
  (b) `disc_update`: the discriminator learns to tell the (stop-gradient)
      softmax maps of the two domains apart.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from segjax import inference as inference_lib
from segjax import losses, metrics

SOURCE_DOMAIN = 0.0
TARGET_DOMAIN = 1.0


class TrainState(train_state.TrainState):
  """A TrainState that also carries BatchNorm running statistics."""
  batch_stats: Any = None


def preprocess(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  """uint8 images (0-255) to normalised float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _segment(state: TrainState, params, batch_stats, images, rng, train: bool):
  """Segmenter forward pass; returns (outputs dict, updated batch_stats).

  The outputs follow the contract of `segjax.models`: 'logits', 'aux', ...
  """
  variables = {"params": params, "batch_stats": batch_stats}
  if not train:
    return state.apply_fn(variables, images, train=False), batch_stats
  outputs, updates = state.apply_fn(variables, images, train=True, rngs={"dropout": rng},
                                    mutable=["batch_stats"])
  return outputs, updates["batch_stats"]


def supervised_loss(outputs: dict, labels: jax.Array, seg_loss: losses.SegLoss,
                    aux_weights: tuple[float, ...], axis_name: str) -> tuple[jax.Array, dict]:
  """The main head's loss plus the weighted losses of the auxiliary heads.

  BiSeNet weights its two supervision heads 1 each; DeepLab-v2 (AdaptSegNet,
  ADVENT) its layer3 head 0.1. Each head's loss is averaged over the global
  batch on its own. Returns the total and the per-head losses for logging.
  """
  aux = outputs.get("aux", ())
  if len(aux) != len(aux_weights):
    raise ValueError(f"The segmenter has {len(aux)} auxiliary heads but loss.aux_weights has "
                     f"{len(aux_weights)} entries; give one weight per head.")
  loss = losses.global_mean(*seg_loss(outputs["logits"], labels), axis_name)
  parts = {"loss_seg": loss}
  for i, (logits, weight) in enumerate(zip(aux, aux_weights), start=1):
    aux_loss = losses.global_mean(*seg_loss(logits, labels), axis_name)
    parts[f"loss_seg_aux{i}"] = aux_loss
    loss = loss + weight * aux_loss
  return loss, parts


def seg_update(seg_state: TrainState, disc_state: TrainState | None, batch: dict, rng: jax.Array,
               *, lambda_adv: float, lr_fn: optax.Schedule, mean, std, axis_name: str,
               seg_loss: losses.SegLoss = losses.cross_entropy,
               aux_weights: tuple[float, ...] = ()) -> tuple[TrainState, dict, dict]:
  """One segmenter update; the discriminator's parameters are constants here.

  With `disc_state` None this is plain supervised training on `batch['source']`.
  Returns the new state, scalar metrics, and the stop-gradient softmax maps the
  discriminator update needs.
  """
  src_rng, tgt_rng = jax.random.split(rng)

  def loss_fn(params):
    src_out, stats = _segment(seg_state, params, seg_state.batch_stats,
                              preprocess(batch["source"]["image"], mean, std), src_rng, True)
    loss_seg, parts = supervised_loss(src_out, batch["source"]["label"], seg_loss, aux_weights,
                                      axis_name)
    aux = {"metrics": parts, "probs": {}}
    if disc_state is None:
      return loss_seg, (stats, aux)
    tgt_out, stats = _segment(seg_state, params, stats,
                              preprocess(batch["target"]["image"], mean, std), tgt_rng, True)
    tgt_prob = jax.nn.softmax(tgt_out["logits"])
    d_out = disc_state.apply_fn({"params": disc_state.params}, tgt_prob)
    loss_adv = losses.global_mean(*losses.binary_cross_entropy(d_out, SOURCE_DOMAIN), axis_name)
    aux["metrics"]["loss_adv"] = loss_adv
    aux["probs"] = {"source": jax.lax.stop_gradient(jax.nn.softmax(src_out["logits"])),
                    "target": jax.lax.stop_gradient(tgt_prob)}
    return loss_seg + lambda_adv * loss_adv, (stats, aux)

  grads, (batch_stats, aux) = jax.grad(loss_fn, has_aux=True)(seg_state.params)
  # Per-device BatchNorm leaves each device with its own running statistics;
  # averaging keeps the state replicated (a no-op for synchronised statistics).
  new_state = seg_state.apply_gradients(
      grads=grads, batch_stats=jax.lax.pmean(batch_stats, axis_name))
  step_metrics = dict(aux["metrics"], lr=lr_fn(seg_state.step))
  return new_state, step_metrics, aux["probs"]


def disc_update(disc_state: TrainState, probs: dict, *,
                axis_name: str) -> tuple[TrainState, dict]:
  """One discriminator update on stop-gradient softmax maps (source 0, target 1)."""
  def loss_fn(params):
    d_src = disc_state.apply_fn({"params": params}, probs["source"])
    d_tgt = disc_state.apply_fn({"params": params}, probs["target"])
    loss_src = losses.global_mean(*losses.binary_cross_entropy(d_src, SOURCE_DOMAIN), axis_name)
    loss_tgt = losses.global_mean(*losses.binary_cross_entropy(d_tgt, TARGET_DOMAIN), axis_name)
    return 0.5 * (loss_src + loss_tgt)

  loss, grads = jax.value_and_grad(loss_fn)(disc_state.params)
  return disc_state.apply_gradients(grads=grads), {"loss_disc": loss}


def train_step(seg_state: TrainState, disc_state: TrainState | None, batch: dict,
               rng: jax.Array, *, lambda_adv: float, lr_fn: optax.Schedule, mean, std,
               axis_name: str = "data", seg_loss: losses.SegLoss = losses.cross_entropy,
               aux_weights: tuple[float, ...] = ()) -> tuple[TrainState, TrainState | None, dict]:
  """One training iteration: (a) the segmenter, then (b) the discriminator if there is one.

  `rng` is the run's training key; the step (counted from 1) and the device
  index are folded into it, so every step and device draws its own dropout masks.
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, seg_state.step + 1),
                           jax.lax.axis_index(axis_name))
  seg_state, step_metrics, probs = seg_update(
      seg_state, disc_state, batch, rng, lambda_adv=lambda_adv, lr_fn=lr_fn, mean=mean, std=std,
      axis_name=axis_name, seg_loss=seg_loss, aux_weights=aux_weights)
  if disc_state is not None:
    disc_state, disc_metrics = disc_update(disc_state, probs, axis_name=axis_name)
    step_metrics.update(disc_metrics)
  return seg_state, disc_state, step_metrics


def eval_step(seg_state: TrainState, batch: dict, confusion: jax.Array, *, num_classes: int,
              mean, std, axis_name: str = "data",
              inference: inference_lib.Inference = inference_lib.Inference()
              ) -> tuple[jax.Array, jax.Array]:
  """Adds the batch's confusion matrix (summed over devices) to `confusion`; returns predictions.

  Predictions are made at the labels' resolution, which may be larger than
  the images' (evaluation at full resolution): the scores are upsampled to it.
  """
  preds = predict_labels(seg_state, batch["image"], batch["label"].shape[1:3], mean=mean,
                         std=std, inference=inference)
  batch_confusion = metrics.confusion_matrix(batch["label"], preds, num_classes)
  return confusion + jax.lax.psum(batch_confusion, axis_name), preds


def predict_labels(seg_state: TrainState, images: jax.Array, out_size: tuple[int, int], *,
                   mean, std,
                   inference: inference_lib.Inference = inference_lib.Inference()) -> jax.Array:
  """Predicted classes (N, *out_size) int32 of uint8 images (N, H, W, 3), in inference mode.

  BatchNorm uses its running statistics and dropout is off; the scores of
  `inference` (test-time augmentation, sliding windows) are resized to `out_size`.
  """
  scores = inference_lib.predict(lambda x: _eval_outputs(seg_state, x)["logits"],
                                 preprocess(images, mean, std), out_size, inference)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def _eval_outputs(seg_state: TrainState, x: jax.Array) -> dict:
  outputs, _ = _segment(seg_state, seg_state.params, seg_state.batch_stats, x, None, False)
  return outputs


def eval_logits(seg_state: TrainState, images: jax.Array, mean, std) -> jax.Array:
  """Inference: the main head's logits for uint8 images."""
  outputs, _ = _segment(seg_state, seg_state.params, seg_state.batch_stats,
                        preprocess(images, mean, std), None, False)
  return outputs["logits"]
