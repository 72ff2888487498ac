"""The device mesh, data-parallel mapping of per-device steps, and multi-process start-up."""

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from segjax import platforms

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Joins a multi-process job; must run before any other JAX call.

  Explicit arguments (the local launcher passes them) win; otherwise a SLURM job
  with several tasks is detected from its environment. A single process does
  nothing.
  """
  if num_processes is not None and num_processes > 1:
    if coordinator_address is None or process_id is None:
      raise ValueError("--num_processes > 1 needs --coordinator_address and --process_id.")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    jax.distributed.initialize()  # JAX reads the coordinator, rank and size from SLURM.


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, in process order."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate_host(tree: Any, mesh: Mesh) -> Any:
  """Host numpy arrays (identical in every process) to arrays replicated over the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index]),
      tree)


# XLA:CPU optimises a network's initialiser (a random draw per parameter, each a threefry hash
# and an inverse-erf polynomial) for 10-40 s, to run it once in milliseconds: unoptimised it
# compiles in 2-5 s. Its values then differ by float rounding (at most 2e-7 relative, from
# fused multiply-adds), the same on any number of devices. Other platforms compile it as usual.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                             "xla_llvm_disable_expensive_passes": True}


def init_compiler_options() -> dict | None:
  """The compiler options of a run-once initialiser on the platform being compiled for."""
  return CPU_INIT_COMPILER_OPTIONS if platforms.compile_platform() == "cpu" else None


def make_replicated(make: Callable[[], Any], mesh: Mesh) -> Any:
  """Evaluates `make()` into arrays replicated over the mesh (any number of processes), as an
  initialiser that runs once (`init_compiler_options`)."""
  lowered = jax.jit(make, out_shardings=replicated(mesh)).lower()
  return lowered.compile(compiler_options=init_compiler_options())()


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, field: str = "batch_size") -> None:
  """The global batch must split evenly over processes and devices."""
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size <= 0 or batch_size % devices:
    raise ValueError(
        f"config.{field}={batch_size} must be a positive multiple of the number of devices "
        f"({devices} over {processes} process(es)); e.g. {devices * max(1, batch_size // devices)}.")


def data_parallel(per_device_fn: Callable, mesh: Mesh, in_specs: tuple, out_specs: Any,
                  donate_argnums: tuple[int, ...] = ()) -> Callable:
  """jit(shard_map(per_device_fn)): per-device code with explicit collectives."""
  return jax.jit(jax.shard_map(per_device_fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs),
                 donate_argnums=donate_argnums)


def train_step(method_step: Callable, mesh: Mesh) -> Callable:
  """A method's `step(states, batch, rng, *, axis_name)` as training compiles it: states and
  key replicated, the batch split over `data`, the states donated (updated in place)."""
  return data_parallel(functools.partial(method_step, axis_name=DATA_AXIS), mesh,
                       in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()),
                       donate_argnums=(0,))


def to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's slice of the batch into one array sharded over `data`."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def global_batch_spec(local_batch: Any, mesh: Mesh) -> Any:
  """Shapes, dtypes and sharding of the global batch that `to_global` makes of `local_batch`."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(), *x.shape[1:]), x.dtype,
                                     sharding=sharding), local_batch)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in global order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards], axis=0)


def compile_all(named_steps: dict[str, Callable], named_args: dict[str, tuple]) -> dict:
  """Compiles each step ahead of time, then waits for every process to have done so.

  Processes reach their first collective together, however long each one's
  compilation took (CPU collectives give up on a peer after 30 s).
  """
  compiled = {}
  for name, step in named_steps.items():
    start = time.monotonic()
    compiled[name] = step.lower(*named_args[name]).compile()
    logging.info("Compiled %s in %.1f s.", name, time.monotonic() - start)
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes("segjax_compiled", timeout=3600)
  return compiled


def log_topology() -> None:
  logging.info("JAX process %d of %d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
