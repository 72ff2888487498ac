"""segjax: semantic segmentation and unsupervised domain adaptation in JAX/Flax."""

__version__ = "0.1.0"
