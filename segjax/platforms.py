"""The platform a computation is traced for, which picks CPU-only kernels.

`segjax.models.fast_ops` has convolution and max-pooling formulations that
are faster on XLA:CPU only; everywhere else the models use lax's operations
(cuDNN's on a GPU). The choice is made while tracing, from the platform the
trace will be compiled for: JAX's default backend (the devices every segjax
command builds its mesh from), unless `compiling_for` says otherwise, as a
test does when it lowers a step for CUDA on a machine without a GPU.
"""

import contextlib
import contextvars

import jax

_PLATFORM = contextvars.ContextVar("segjax_compile_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
  """Traces within this block are for `platform` ('cpu', 'cuda', 'rocm', 'tpu')."""
  token = _PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


# What `segjax.export` traces for: lax's operations (no XLA:CPU formulations), and resizes
# written as gathers and interpolations, which every converter maps to its own operations.
EXPORT = "export"


def compile_platform() -> str:
  """The platform being traced for: `compiling_for`'s, else the default backend."""
  return _PLATFORM.get() or jax.default_backend()


def cpu_kernels() -> bool:
  """Whether to trace the XLA:CPU formulations of `segjax.models.fast_ops`."""
  return compile_platform() == "cpu"


def exporting() -> bool:
  """Whether the trace is `segjax.export`'s (`compiling_for(EXPORT)`)."""
  return compile_platform() == EXPORT
