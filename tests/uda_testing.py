"""Helpers shared by the adaptation-method tests: config overrides and a random two-domain batch."""

import contextlib

import jax
import ml_collections
import numpy as np

from segjax import methods, parallel, steps
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


def arrays(states: dict) -> dict:
  """The array leaves of each state (a TrainState's apply_fn and tx are static, not compared)."""
  return {name: ({"params": s.params, "batch_stats": s.batch_stats, "opt_state": s.opt_state,
                  "step": s.step} if isinstance(s, steps.TrainState) else s)
          for name, s in states.items()}


def steps_from(step, mesh, batch, starts: list) -> list[tuple]:
  """One `step` on `mesh` from each host state of `starts` (the i-th with key i), as (states,
  metrics) on the host. A device-count test runs the 8-device step from each state of the
  1-device run, not as a chain of its own: tests/test_methods.py's
  test_method_step_on_8_devices_equals_1_device says why."""
  results = []
  for i, start in enumerate(starts):
    states, metrics = step(jax.device_put(start, parallel.replicated(mesh)), batch,
                           jax.random.key(i))
    results.append(jax.device_get((states, metrics)))
  return results


def chain(step, mesh, batch, initial, num_steps: int = 2) -> list[tuple]:
  """`num_steps` steps of `step` on `mesh` from the host state `initial` (step i with key i), as
  [(states, metrics)] on the host after each."""
  states, results = jax.device_put(initial, parallel.replicated(mesh)), []
  for i in range(num_steps):
    states, metrics = step(states, batch, jax.random.key(i))
    results.append(jax.device_get((states, metrics)))
  return results


def device_counts_agree(step8, mesh8, batch8, initial, run1: list[tuple], compare) -> list[tuple]:
  """The 8-device step from `initial` and from each state of the 1-device chain `run1` but its
  last; `compare(states8, metrics8, states1, metrics1)` on each step's pair. Returns the 8-device
  (states, metrics) of each step."""
  starts = [initial] + [states for states, _ in run1[:-1]]
  run8 = steps_from(step8, mesh8, batch8, starts)
  for (states8, metrics8), (states1, metrics1) in zip(run8, run1):
    compare(states8, metrics8, states1, metrics1)
  return run8


def assert_states_close(actual, desired, rtol: float = 1e-2, atol: float = 2e-5):
  """Each array of `actual` is within rtol of `desired`'s L2 norm, plus atol per entry (RMS).

  For the device-count tests, whose arrays are a training step's states: how
  far apart a step on 8 devices and on 1 end up is float rounding amplified by
  the step. The measured worst arrays (2026-12-04): 1e-4 and less for the
  adversarial and self-training steps of CompactSeg (but 1.34% for a BatchNorm
  scale's momentum in AdvEnt's step on another AMD EPYC, 2026-12-05, a ReLU flip:
  test_methods.py bounds those steps at 2%); 1.2e-3 for MPL's teacher,
  whose gradient scales by the difference of two student losses (a
  cancellation); 4.6e-3 at HRDA + MIC's second step (MiT-B0 and DAFormer's
  head under SGD; 2.9e-4 at its first), not traced to one operation. A ReLU
  whose input is within that rounding of 0 moves single entries further (as
  much as 2% of an entry: test_methods.py), hence a norm, not each entry. The
  absolute term covers arrays whose exact gradient is 0 (a bias that
  BatchNorm's mean removes), which rounding alone sets. Errors of a step's
  parallelism (an average taken per device, a dropout mask keyed by device)
  move these arrays by tens of percent.
  """
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree.leaves(desired)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (jax.tree_util.keystr(path), a.shape, b.shape)
    error, bound = np.linalg.norm(a - b), rtol * np.linalg.norm(b) + atol * np.sqrt(a.size)
    assert error <= bound, (f"{jax.tree_util.keystr(path)}: |actual - desired| = {error:.3g} > "
                            f"{bound:.3g} ({rtol} of |desired| = {np.linalg.norm(b):.3g}, "
                            f"+ {atol} per entry); largest entry difference "
                            f"{np.abs(a - b).max():.3g}")
