"""FLOPs per training step of the transformer recipes, as traced for a GPU.

  python benchmarks/step_costs.py            # the published recipes (MiT-B5)
  python benchmarks/step_costs.py --tiny     # the built-in configs, at their crops (CI): the
                                             # MIC recipes, which hold the others' passes

For each recipe, `segjax.tools.summary.step_costs` without compiling: XLA's
cost analysis of the whole training step (2 + 2 images: the student's
source, mixed and MIC passes with their gradients, the teacher's pass, the
frozen encoder's), traced for CUDA. With `--memory` the step is compiled (by
this machine's XLA: minutes each for MiT-B5) and XLA's memory analysis of it
printed too, less the donated states; `--bf16 --remat` as a 24 GB GPU would
run them, `--recipes` picks some:

  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \
      python benchmarks/step_costs.py --memory --bf16 --remat --recipes HRDA "MIC on HRDA"

(XLA:CPU's default scheduler orders for concurrency and runs remat's
recomputations early, which undoes what remat saves; the flag turns it off.)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import daformer, hrda, mic  # pylint: disable=wrong-import-position
from segjax.tools import summary  # pylint: disable=wrong-import-position

RECIPES = (("DAFormer", daformer, False, 512), ("DAFormer + MIC", daformer, True, 512),
           ("HRDA", hrda, False, 1024), ("MIC on HRDA", mic, True, 1024))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="The built-in configs (seconds).")
  parser.add_argument("--memory", action="store_true",
                      help="Compile each step and print XLA's memory analysis of it.")
  parser.add_argument("--bf16", action="store_true", help="model.dtype=bfloat16.")
  parser.add_argument("--remat", action="store_true", help="model.remat=True.")
  parser.add_argument("--recipes", nargs="+", choices=[r[0] for r in RECIPES],
                      default=[r[0] for r in RECIPES])
  args = parser.parse_args()
  for name, module, use_mic, size in RECIPES:
    if name not in args.recipes or (args.tiny and not use_mic):
      continue
    config = module.get_config(None if args.tiny else "gta5=/g,cityscapes=/c")
    config.adapt.mic = use_mic
    config.model.backbone_weights = "mit_b5.pth"  # Not read: turns the feature distance on.
    config.model.dtype = "bfloat16" if args.bf16 else config.model.dtype
    config.model.remat = args.remat or config.model.get("remat", False)
    height, width = tuple(config.data.crop_size) if args.tiny else (size, size)
    record = summary.step_costs(config, height, width, config.batch_size, 19,
                                with_memory=args.memory)
    memory = f", {record['step_bytes'] / 2**30:.2f} GiB" if args.memory else ""
    print(f"{name:16s} {config.model.name:15s} {config.model.dtype} remat={config.model.remat} "
          f"{config.batch_size} + {config.batch_size} images of {height}x{width}: "
          f"{record['step_flops'] / 1e9:,.0f} GFLOPs{memory}", flush=True)


if __name__ == "__main__":
  main()
