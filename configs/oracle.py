"""Upper bound: trained with target labels (the target train split), no adaptation.

  python -m segjax.main --config=configs/oracle.py --workdir=runs/oracle
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source.domain = "target"
  return config
