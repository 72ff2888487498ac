"""FLOPs per training step of the transformer recipes, as traced for a GPU.

  python benchmarks/step_costs.py            # the published recipes (MiT-B5)
  python benchmarks/step_costs.py --tiny     # the built-in configs, at their crops (CI): the
                                             # MIC recipes, which hold the others' passes

For each recipe, `segjax.tools.summary.step_costs` without compiling: XLA's
cost analysis of the whole training step (2 + 2 images: the student's
source, mixed and MIC passes with their gradients, the teacher's pass, the
frozen encoder's), traced for CUDA. Memory needs a compile (`python -m
segjax.tools.summary --step`).
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
  args = parser.parse_args()
  for name, module, use_mic, size in (r for r in RECIPES if r[2] or not args.tiny):
    config = module.get_config(None if args.tiny else "gta5=/g,cityscapes=/c")
    config.adapt.mic = use_mic
    config.model.backbone_weights = "mit_b5.pth"  # Not read: turns the feature distance on.
    height, width = tuple(config.data.crop_size) if args.tiny else (size, size)
    record = summary.step_costs(config, height, width, config.batch_size, 19, with_memory=False)
    print(f"{name:16s} {config.model.name:15s} {config.batch_size} + {config.batch_size} images "
          f"of {height}x{width}: {record['step_flops'] / 1e9:,.0f} GFLOPs", flush=True)


if __name__ == "__main__":
  main()
