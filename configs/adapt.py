"""The main job: AdaptSegNet output-space adversarial adaptation on the built-in scenes.

  python -m segjax.main --config=configs/adapt.py --workdir=runs/adapt

Source: rendered street scenes (labelled); target: camera-like scenes
(unlabelled for training, labelled val split for evaluation).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.adapt.method = "adaptsegnet"
  config.adapt.lambda_adv = 0.01
  return config
