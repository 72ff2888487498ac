"""Pure, per-device pieces of the training and evaluation steps.

Every function here is written in the pmap programming model: it sees its
device's slice of the batch and uses explicit collectives over the mesh axis
`axis_name`. `segjax.parallel.data_parallel` maps them over the devices with
`jax.shard_map` inside `jax.jit`.

The training steps themselves belong to the adaptation methods
(`segjax.methods`, one `step` per method: AdaptSegNet's minimax is
`segjax.methods.output_space`); they share the pieces here: the segmenter's
state, preprocessing, forward pass and supervised loss. Evaluation
(`eval_step`, `predict_labels`, `eval_logits`) is the same for every method.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax.training import train_state

from segjax import inference as inference_lib
from segjax import losses, metrics


class TrainState(train_state.TrainState):
  """A TrainState that also carries BatchNorm running statistics."""
  batch_stats: Any = None


def preprocess(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
  """uint8 images (0-255) to normalised float32."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _segment(state: TrainState, params, batch_stats, images, rng, train: bool, **kwargs):
  """Segmenter forward pass; returns (outputs dict, updated batch_stats).

  The outputs follow the contract of `segjax.models`: 'logits', 'aux', ...
  `kwargs` go to the segmenter (a ViT segmenter's `token_mask`).
  """
  variables = {"params": params, "batch_stats": batch_stats}
  if not train:
    return state.apply_fn(variables, images, train=False, **kwargs), batch_stats
  outputs, updates = state.apply_fn(variables, images, train=True, rngs={"dropout": rng},
                                    mutable=["batch_stats"], **kwargs)
  return outputs, updates["batch_stats"]


def detail_crop(outputs: dict, maps: jax.Array) -> jax.Array:
  """Each example's (N, H, W, ...) map cropped to its detail window (HRDA's segmenter:
  'detail_offsets', and the window's size from 'detail_logits')."""
  height, width = outputs["detail_logits"].shape[1:3]
  return jax.vmap(lambda m, o: jax.lax.dynamic_slice(
      m, (o[0], o[1]) + (0,) * (m.ndim - 2), (height, width) + m.shape[2:]))(
          maps, outputs["detail_offsets"])


def supervised_loss(outputs: dict, labels: jax.Array, seg_loss: losses.SegLoss,
                    aux_weights: tuple[float, ...], axis_name: str,
                    detail_weight: float = 0.0) -> tuple[jax.Array, dict]:
  """The main head's loss plus the weighted losses of the auxiliary heads.

  BiSeNet weights its two supervision heads 1 each; DeepLab-v2 (AdaptSegNet,
  ADVENT) its layer3 head 0.1. Each head's loss is averaged over the global
  batch on its own. An HRDA segmenter's detail prediction adds its loss on the
  labels of its window (`loss_detail`), x `detail_weight` (HRDA's 0.1), and the
  fused prediction's loss then counts 1 - `detail_weight` (HRDA's `hrda_head.py`:
  `loss_seg *= 1 - lr_loss_weight - hr_loss_weight`, 0.9). Returns the total
  and the per-head losses (unweighted) for logging.
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
  if "detail_logits" in outputs:
    detail = losses.global_mean(*seg_loss(outputs["detail_logits"], detail_crop(outputs, labels)),
                                axis_name)
    parts["loss_detail"] = detail
    loss = loss - detail_weight * parts["loss_seg"] + detail_weight * detail
  return loss, parts


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
