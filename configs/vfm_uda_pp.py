"""VFM-UDA++ (Englert et al. 2025): VFM-UDA on a ViT-Adapter, with a frozen DINOv2's features.

  python -m segjax.main --config=configs/vfm_uda_pp.py --workdir=runs/vfm_uda_pp
  python -m segjax.main --config=configs/vfm_uda_pp.py:gta5=ROOT,cityscapes=ROOT \\
      --config.model.backbone_weights=dinov2_large_with_vitadapter_pretraining_in1k_step50000.ckpt \\
      --config.adapt.fd_weights=dinov2_vitl14_reg4_pretrain.pth --workdir=runs/vfm_uda_pp_gta5

With roots (gta5= or synthia=, and cityscapes=): the published recipe
(tue-mps/vfm-uda-plusplus `vfmudaplusplus_large_gta2city.yaml` and
`training/uda/uda.py`): DINOv2 ViT-L/14 with the ViT-Adapter and the pyramid
head (`segjax.models.vit_adapter`: the 1024 crop seen at 1120), starting from
VFM-UDA++'s ImageNet-pretrained adapter checkpoint (`model.backbone_weights`:
the ViT and the adapter; a plain DINOv2 file gives the ViT only, the adapter
then starts from its initialisation); VFM-UDA's data (configs/vfm_uda.py:
GTA5's short side at 1440 (2620x1440), Cityscapes at 1024x2048, scale U(0.9,
1.1), 1024x1024 crops, rare-class sampling, batch 8 + 8, VFM-UDA's pseudo-label
margins); AdamW, weight decay 0.01 on every parameter, the decoder (adapter,
head, distillation head) at 1e-5 x sqrt(global batch 8) = 2.83e-5, the ViT's
block i of 24 at 0.1 x 0.9^(23 - i) of that and its embeddings at 0.1 x 0.9^24
(`optim.seg.layer_decay`), linear warm-up over 1,500 steps from 1e-3 of the lr
to the full lr (as configs/vfm_uda.py), linear decay to 0 at 40,000 steps; EMA
teacher 0.999, softmax averaged over a flip, threshold 0.968; ClassMix onto the
weakly jittered target images, then jitter 0.2 (p 0.8) and blur; strong
augmentation of the source images; MIC's 64-pixel block masking (0.7) of the
target images at the encoder's resolution; the feature distance to a frozen
DINOv2 ViT-L/14 with registers (`adapt.fd_weights`: the official
`dinov2_vitl14_reg4_pretrain.pth`, Hugging Face's or timm's files) at 406x406,
0.1 on source and 0.1 on target; bf16 compute. Evaluation in 1024x1024 windows
at stride 512. Published: 79.8 mIoU GTA5 -> Cityscapes (ViT-L).

The .ckpt files are Lightning checkpoints; torch reads them with
`weights_only=True`, and one that holds pickled Python objects besides its
tensors is refused. Then extract its state dict once, trusting the file:
python -c "import torch; torch.save(torch.load('IN.ckpt', weights_only=False)['state_dict'],
'OUT.pth')".

Differences from the published code: the learning rate is written for a global
batch of 8 (VFM-UDA++'s README: 4 GPUs x 2): with another --config.batch_size
B, scale --config.optim.seg.lr by sqrt(B / 8); bf16 (the residual streams
float32, as autocast keeps them) where it uses fp16 mixed precision; the
jitters apply brightness, contrast, saturation and hue in that order
(torchvision draws an order); the blur's kernel spans 3 sigma
(torchvision's a tenth of the image); the position embeddings' resampling (both
encoders: to the grid's size); the rare-class statistics as configs/daformer.py
says; the distillation head starts from segjax's initialisation, not PyTorch's,
and so do the pyramid head's transposed convolutions (flax's LeCun normal,
where VFM-UDA++ sets Kaiming uniform, fan out); the EMA covers the BatchNorm
running statistics too (VFM-UDA++'s the parameters only; the teacher normalises
with the target batch's statistics as VFM-UDA++'s, `adapt.st_teacher_bn`); the
training images' random horizontal flip is drawn per image (VFM-UDA++ flips the
whole source batch, and the target batch, at once).

Without roots: the built-in scenes (64x128 crops seen at 224x448 by the
encoder, `model.input_scale` 3.5: a 16x32 token grid), a ViT-S/14 of 4 blocks
from scratch with the adapter and head, batch 8 + 8, 1,500 steps with a
150-step warm-up, the decoder at 1e-3; no feature distance (no frozen DINOv2
to read; set adapt.fd_weights to a DINOv2 ViT-L file, or adapt.fd_model /
adapt.fd_registers and model.distill_features to another size, to switch it
on); float32. As configs/vfm_uda.py says, a ViT from scratch on small images
is expected to do badly. This is a GPU run: on a 2-core CPU (AMD EPYC,
2026-12-04) a step of 4 + 4 images took about a minute, so 8 + 8 over 1,500
steps is a day or more there; `--config.num_train_steps=3` makes a smoke run.
"""

import math

from configs import recipes, vfm_uda
from segjax import methods

FD_WIDTHS = {"vit_s14": 384, "vit_b14": 768, "vit_l14": 1024}


def _vfm_uda_pp_training(config, decoder_lr: float) -> None:
  """configs/vfm_uda.py's training with VFM-UDA++'s differences."""
  config.optim.seg.update(lr=0.1 * decoder_lr, head_lr_mult=10.0, layer_decay=0.9,
                          no_decay=())
  del config.model["drop_path_rate"]  # The adapter's ViT trains without stochastic depth.
  config.adapt = methods.adapt_config("vfm_uda_pp")
  config.model.distill_features = 0  # The published recipe sets its frozen model's width.


def get_config(arg: str | None = None):
  roots = recipes.uda_roots(arg)
  config = vfm_uda.get_config(arg)
  if not roots:
    config.model.name = "vfmpp_vit_s14"
    config.model.input_scale = 3.5  # 64x128 -> 224x448: multiples of 224 on both sides.
    config.model.depth = 4
    config.batch_size = 8
    _vfm_uda_pp_training(config, decoder_lr=1e-3)
    config.adapt.mic_block = 16  # 64 of 1120 pixels, scaled to the 224-row encoder input.
    return config
  config.model.name = "vfmpp_vit_l14"
  _vfm_uda_pp_training(config, decoder_lr=1e-5 * math.sqrt(config.batch_size))
  # VFM-UDA's pseudo-label margins of the whole image replace the crop's rows.
  config.adapt.update(mic_block=64, fd_model="vit_l14", fd_registers=4, fd_source=0.1,
                      fd_target=0.1, st_ignore_top=0.0, st_ignore_bottom=0.0)
  config.model.distill_features = FD_WIDTHS[config.adapt.fd_model]
  return config
