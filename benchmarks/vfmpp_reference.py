"""segjax's VFM-UDA++ segmenter against the official PyTorch code, with the same weights.

  python benchmarks/vfmpp_reference.py --repo DIR   # a checkout of tue-mps/vfm-uda-plusplus

Builds the official `DinoV2ViTAdapter`, `_Upscale` and classifier of
VITAdapterLightweightPyramidHead (the repository's own modules, imported from
--repo, with its pure-PyTorch deformable attention) on a randomly initialised
DINOv2 ViT-S/14 of `--depth` blocks (Hugging Face's `Dinov2Layer`s in place of
torch.hub's blocks, which cannot be downloaded here), randomises every
parameter and BatchNorm statistic (the zero-initialised gammas, offsets and
attention weights included), saves them as a Lightning checkpoint in
VFM-UDA++'s key layout, reads that file into `vfmpp_vit_s14` through
`model.backbone_weights`' loader, and prints the largest absolute difference
of each adapter output and of the logits, in evaluation mode, float32, at
`--size` (a multiple of 224). The official code resamples the position
embeddings by the scale factor (grid + 0.1) / 37; the script replaces that one
method with resampling to the grid's size, as segjax (and Hugging Face) do.
"""

import argparse
import importlib
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--repo", required=True, help="a checkout of tue-mps/vfm-uda-plusplus")
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--size", type=int, default=448)
  args = parser.parse_args()
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.abspath(args.repo))
  try:
    importlib.import_module("timm.layers")
  except ImportError:  # The adapter imports timm for a patch-size resampling it does not use here.
    import types  # pylint: disable=import-outside-toplevel
    sys.modules["timm"] = types.ModuleType("timm")
    sys.modules["timm.layers"] = types.SimpleNamespace(resample_patch_embed=None)
  from models.multiscale_vfm import basic_pyramid_head  # pylint: disable=import-outside-toplevel
  from models.vit_adapter import dinov2_vit_adapter  # pylint: disable=import-outside-toplevel

  from segjax.models import vit_adapter, weights  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=args.depth,
                                     num_attention_heads=6, image_size=518, patch_size=14)

  class Block(transformers.models.dinov2.modeling_dinov2.Dinov2Layer):
    def forward(self, x):  # pylint: disable=arguments-differ
      out = super().forward(x)
      return out[0] if isinstance(out, tuple) else out

  class Hub(nn.Module):  # What torch.hub.load('facebookresearch/dinov2', ...) returns.
    def __init__(self):
      super().__init__()
      self.embed_dim = 384
      self.blocks = nn.ModuleList([Block(config) for _ in range(args.depth)])
      self.cls_token = nn.Parameter(torch.randn(1, 1, 384))
      self.pos_embed = nn.Parameter(torch.randn(1, 1 + 37 * 37, 384))
      self.patch_embed = transformers.models.dinov2.modeling_dinov2.Dinov2PatchEmbeddings(config)

  torch.hub.load = lambda *a, **k: Hub()

  def by_size(self, x, w, h):  # Resampling to the grid's size, as segjax and Hugging Face do.
    del x
    table = self.pos_embed.float()
    grid = table[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, size=(h // 14, w // 14), mode="bicubic",
                                     align_corners=False)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, table.shape[-1])], 1)

  dinov2_vit_adapter.DinoV2ViTAdapter.interpolate_pos_encoding_orig = by_size
  encoder = dinov2_vit_adapter.DinoV2ViTAdapter(args.size, "dinov2_vits14",
                                                initialize_resized_pos_embed=False)
  upscale = basic_pyramid_head._Upscale(384)  # pylint: disable=protected-access
  out = nn.Conv2d(384 // 8, 19, kernel_size=1, bias=False)
  with torch.no_grad():
    for module in (encoder, upscale, out):
      for p in module.parameters():
        p.add_(0.05 * torch.randn_like(p))
      for name, b in module.named_buffers():
        if name.endswith("running_mean"):
          b.copy_(0.1 * torch.randn_like(b))
        elif name.endswith("running_var"):
          b.copy_(0.5 + torch.rand_like(b))
  for module in (encoder, upscale, out):
    module.eval()

  state = {}
  for prefix, module in (("network.encoder.", encoder), ("network.upscale.", upscale),
                         ("network.out.", out)):
    for key, value in module.state_dict().items():
      state[prefix + key] = value
  renamed = {}  # The Hugging Face blocks under the official DINOv2 names.
  hf = {}
  for key, value in state.items():
    if key.startswith("network.encoder.blocks."):
      hf["encoder.layer." + key[len("network.encoder.blocks."):]] = value.numpy()
    elif key.startswith("network.encoder.patch_embed.projection."):
      renamed[key.replace("patch_embed.projection.", "patch_embed.proj.")] = value
    else:
      renamed[key] = value
  from segjax.models.backbones import vit  # pylint: disable=import-outside-toplevel
  for key, value in vit.from_hugging_face(hf).items():
    renamed["network.encoder." + key] = torch.from_numpy(np.ascontiguousarray(value))

  model = vit_adapter.VFMPPViTS14(num_classes=19, input_scale=1.0, depth=args.depth)
  images = np.random.default_rng(0).normal(size=(2, args.size, args.size, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), jnp.asarray(images))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "vfmpp.ckpt")
    torch.save({"state_dict": renamed, "epoch": 0}, path)
    variables, report = weights.load_backbone(dict(variables), path, vit_adapter.KEY_MAP)
  print(report.summary(path))
  ours = model.apply(variables, jnp.asarray(images), method=model.encode)
  logits = model.apply(variables, jnp.asarray(images))["logits"]
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    theirs = encoder(x)
    their_logits = nn.functional.interpolate(out(upscale(theirs)), (args.size, args.size),
                                             mode="bilinear", align_corners=False)
  vit_parts = ("blocks.", "cls_token", "pos_embed", "patch_embed.")
  their_adapter = sum(p.numel() for name, p in encoder.named_parameters()
                      if not name.startswith(vit_parts))
  their_head = sum(p.numel() for p in upscale.parameters()) + out.weight.numel()
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  print(f"parameters: adapter {count(variables['params']['adapter']):,} (official "
        f"{their_adapter:,}), head {count(variables['params']['head']):,} (official "
        f"{their_head:,})")
  worst = 0.0
  for i, (o, t) in enumerate(zip(ours, theirs)):
    t = t.numpy().transpose(0, 2, 3, 1)
    diff = float(np.abs(np.asarray(o) - t).max())
    worst = max(worst, diff / max(1.0, float(np.abs(t).max())))
    print(f"f{i + 1} {tuple(t.shape[1:3])}: max |difference| {diff:.2e} (max |value| "
          f"{float(np.abs(t).max()):.2f})")
  t = their_logits.numpy().transpose(0, 2, 3, 1)
  diff = float(np.abs(np.asarray(logits) - t).max())
  print(f"logits {tuple(t.shape[1:3])}: max |difference| {diff:.2e} (max |value| "
        f"{float(np.abs(t).max()):.2f})")
  worst = max(worst, diff / max(1.0, float(np.abs(t).max())))
  print(f"worst relative difference {worst:.2e}")


if __name__ == "__main__":
  main()
