"""Helpers shared by the adaptation-method tests: config overrides and a random two-domain batch."""

import contextlib

import jax
import ml_collections
import numpy as np

from segjax import methods
from segjax.data import pipeline

NUM_CLASSES = 8  # The built-in scenes' label space.


def override(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Sets each dotted field of `overrides` (e.g. 'optim.teacher.name'), new fields allowed.

  A known 'adapt.method' first makes config.adapt that method's fields (keeping the values of
  those it shares with the current method), as a config built for it would hold.
  """
  overrides = dict(overrides)
  if overrides.get("adapt.method") in methods.METHODS:
    config.adapt = methods.fields_of(overrides.pop("adapt.method"), config.adapt)
  with config.unlocked():
    for path, value in overrides.items():
      *sections, field = path.split(".")
      node = config
      for section in sections:
        node = node[section]
      node[field] = value
  return config


def random_batch(config: ml_collections.ConfigDict, n: int = 8, seed: int = 0) -> dict:
  """Labelled source and unlabelled target images at each domain's crop size; one image half
  ignored, so devices see uneven numbers of labelled pixels."""
  rng = np.random.default_rng(seed)
  h, w = pipeline.crop_size(config, "source")
  labels = rng.integers(0, NUM_CLASSES, (n, h, w)).astype(np.uint8)
  labels[0, :, : w // 2] = 255
  th, tw = pipeline.crop_size(config, "target")
  return {"source": {"image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
                     "label": labels},
          "target": {"image": rng.integers(0, 256, (n, th, tw, 3), dtype=np.uint8)}}


@contextlib.contextmanager
def xla_optimizations():
  """XLA's optimisations on inside the block, as users compile (tests/conftest.py turns them
  off for the test session)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
