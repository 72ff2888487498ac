"""source_only: the segmenter on source labels only, the lower bound of every adaptation method."""

import jax

from segjax.methods import base


class SourceOnly(base.Method):
  """Supervised training on `batch['source']`; target images are not read."""
  uses_target = False
  adapt_fields = {}  # Nothing but the segmenter's own fields (model, loss, optim.seg).
  accumulates = True

  def step(self, states: dict, batch: dict, rng: jax.Array, *, axis_name: str):
    seg = states["seg"]
    rng = base.step_rng(rng, seg.step)

    def loss_fn(params, src, stats):
      outputs, stats = base.segment(seg, params, stats, self.preprocess(src["image"]), rng)
      loss, parts = self.source_loss(outputs, src["label"], axis_name)
      return loss, (stats, parts)

    (_, (stats, parts)), grads = self.value_and_grad(loss_fn, seg.params, batch["source"],
                                                     seg.batch_stats)
    new_seg = base.apply_seg_gradients(seg, grads, stats, axis_name)
    return {"seg": new_seg}, dict(parts, lr=self.seg_lr(seg.step))
