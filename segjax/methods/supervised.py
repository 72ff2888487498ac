"""source_only: the segmenter on source labels only, the lower bound of every adaptation method."""

import jax

from segjax.methods import base


class SourceOnly(base.Method):
  """Supervised training on `batch['source']`; target images are not read."""
  uses_target = False
  adapt_fields = {}  # Nothing but the segmenter's own fields (model, loss, optim.seg).

  def step(self, states: dict, batch: dict, rng: jax.Array, *, axis_name: str):
    seg = states["seg"]
    rng = base.step_rng(rng, seg.step)

    def loss_fn(params):
      outputs, stats = base.segment(seg, params, seg.batch_stats,
                                    self.preprocess(batch["source"]["image"]), rng)
      loss, parts = self.source_loss(outputs, batch["source"]["label"], axis_name)
      return loss, (stats, parts)

    grads, (stats, parts) = jax.grad(loss_fn, has_aux=True)(seg.params)
    new_seg = base.apply_seg_gradients(seg, grads, stats, axis_name)
    return {"seg": new_seg}, dict(parts, lr=self.seg_lr(seg.step))
