"""segjax: semantic segmentation and unsupervised domain adaptation in JAX/Flax."""

from segjax import hostmem as _hostmem

__version__ = "0.1.0"

# `python -m segjax.<command>` on a CPU-only host: restart with huge-page malloc before the
# command's imports (segjax.hostmem). Importing segjax as a library does nothing here.
_hostmem.restart_segjax_command()
