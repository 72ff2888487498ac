"""FLOPs per training step of the transformer recipes, as traced for a GPU.

  python benchmarks/step_costs.py            # the published recipes (MiT-B5, DINOv2 ViT-B/L)
  python benchmarks/step_costs.py --tiny     # the built-in configs, at their crops (CI): the
                                             # MIC recipes, which hold the others' passes,
                                             # and VFM-UDA's

For each recipe, `segjax.tools.summary.step_costs` without compiling: XLA's
cost analysis of the whole training step (2 + 2 images: the student's
source, mixed and MIC passes with their gradients, the teacher's pass, the
frozen encoder's; VFM-UDA: 1 + 1 images, each device's share of its global
batch of 8 + 8 spread over 8 GPUs, half of what each of the 4 GPUs of
VFM-UDA's README holds), traced for CUDA. With `--memory` the step is compiled (by
this machine's XLA: minutes each for MiT-B5) and XLA's memory analysis of it
printed too, less the donated states; `--bf16 --remat` as a 24 GB GPU would
run them, `--recipes` picks some:

  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \
      python benchmarks/step_costs.py --memory --bf16 --remat --recipes HRDA "MIC on HRDA"

(XLA:CPU's default scheduler orders for concurrency and runs remat's
recomputations early, which undoes what remat saves; the flag turns it off.)

(XLA:CPU's compile of HRDA's unrolled MiT-B5 steps outgrows 24 GiB. `--scan` compiles them
with each MiT stage's blocks as one loop, `model.scan_blocks=True`, in under 3 minutes and
2.3 GiB: HRDA 10.45 GiB, MIC on HRDA 13.66 GiB. `--model hrda_mitb2` compiles the same step
on MiT-B2, MiT-B5's widths with 16 of its 52 blocks, in either layout.)
"""

import argparse
import os
import sys
import types
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import daformer, hrda, mic, vfm_uda  # pylint: disable=wrong-import-position
from segjax.tools import summary  # pylint: disable=wrong-import-position


class Recipe(NamedTuple):
  """A published recipe: its config at `side` x `side` crops of `batch` images per domain."""
  name: str
  module: types.ModuleType
  mic: bool | None  # None: the config's (VFM-UDA masks tokens).
  side: int
  batch: int | None = None  # None: the config's.
  model: str | None = None  # None: the config's.
  tiny: bool = False  # In the --tiny run, as the built-in config is.


RECIPES = (Recipe("DAFormer", daformer, False, 512),
           Recipe("DAFormer + MIC", daformer, True, 512, tiny=True),
           Recipe("HRDA", hrda, False, 1024),
           Recipe("MIC on HRDA", mic, True, 1024, tiny=True),
           Recipe("VFM-UDA ViT-B", vfm_uda, None, 1024, batch=1, tiny=True),
           Recipe("VFM-UDA ViT-L", vfm_uda, None, 1024, batch=1, model="vfm_vit_l14"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="The built-in configs (seconds).")
  parser.add_argument("--memory", action="store_true",
                      help="Compile each step and print XLA's memory analysis of it.")
  parser.add_argument("--bf16", action="store_true", help="model.dtype=bfloat16.")
  parser.add_argument("--remat", action="store_true", help="model.remat=True.")
  parser.add_argument("--scan", action="store_true",
                      help="model.scan_blocks=True (MiT): each stage's blocks one loop, compiled "
                      "once, which lets MiT-B5's step compile in this host's memory")
  parser.add_argument("--recipes", nargs="+", choices=[r.name for r in RECIPES],
                      default=[r.name for r in RECIPES])
  parser.add_argument("--model", help="another model.name for the recipes picked (hrda_mitb2: "
                      "HRDA's step with MiT-B5's widths and fewer blocks)")
  args = parser.parse_args()
  for recipe in RECIPES:
    if recipe.name not in args.recipes or (args.tiny and not recipe.tiny):
      continue
    config = recipe.module.get_config(None if args.tiny else "gta5=/g,cityscapes=/c")
    if recipe.mic is not None:
      config.adapt.mic = recipe.mic
    if recipe.model and not args.tiny:
      config.model.name = recipe.model
    config.model.name = args.model or config.model.name
    if config.model.name.startswith(("daformer_", "hrda_")):
      # Not read: the name turns DAFormer's ImageNet feature distance on.
      config.model.backbone_weights = "mit_b5.pth"
    config.model.dtype = "bfloat16" if args.bf16 else config.model.dtype
    config.model.remat = args.remat or config.model.get("remat", False)
    if args.scan and "scan_blocks" not in config.model:
      raise SystemExit(f"--scan: {config.model.name} has no scanned layout (the MiT models do).")
    config.model.scan_blocks = args.scan or config.model.get("scan_blocks", False)
    height, width = tuple(config.data.crop_size) if args.tiny else (recipe.side,) * 2
    if recipe.batch and not args.tiny:
      config.batch_size = recipe.batch
    record = summary.step_costs(config, height, width, config.batch_size, 19,
                                with_memory=args.memory)
    memory = f", {record['step_bytes'] / 2**30:.2f} GiB" if args.memory else ""
    print(f"{recipe.name:16s} {config.model.name:15s} {config.model.dtype} "
          f"remat={config.model.remat} scan={config.model.get('scan_blocks', False)} "
          f"{config.batch_size} + {config.batch_size} images of "
          f"{height}x{width}: {record['step_flops'] / 1e9:,.0f} GFLOPs{memory}", flush=True)


if __name__ == "__main__":
  main()
