"""Lower bound: the same network and data as configs/adapt.py, trained on source labels only.

  python -m segjax.main --config=configs/source_only.py --workdir=runs/source_only
"""

from configs import default


def get_config():
  return default.get_config()
