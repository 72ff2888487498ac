"""The main job: AdaptSegNet output-space adversarial adaptation on the built-in scenes.

  python -m segjax.main --config=configs/adapt.py --workdir=runs/adapt

Source: rendered street scenes (labelled); target: camera-like scenes
(unlabelled for training, labelled val split for evaluation).
"""

from configs import default
from segjax import methods


def get_config():
  config = default.get_config()
  config.adapt = methods.adapt_config("adaptsegnet", lambda_adv=0.01)
  return config
