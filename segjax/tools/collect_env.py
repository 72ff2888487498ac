"""Prints what a bug report or a benchmark figure needs to know about this machine's set-up.

  python -m segjax.tools.collect_env

segjax's version and its libraries' (JAX, jaxlib, Flax, Optax, Orbax, Grain,
CLU), Python, the OS and C library, the CPU count, JAX's backend and devices,
`XLA_FLAGS`, and the host-memory set-up segjax's commands run with: the
kernel's transparent-huge-page mode and `GLIBC_TUNABLES`, which carries
`glibc.malloc.hugetlb=1` on a CPU-only host (`segjax.hostmem`; this command
restarts with it as every `python -m segjax.*` command does).
"""

import importlib.metadata
import os
import platform
import sys

from absl import app

from segjax import cli, hostmem

PACKAGES = ("segjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "clu")


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def report() -> list[tuple[str, str]]:
  """(name, value) lines of the report."""
  import jax  # pylint: disable=import-outside-toplevel  (after any restart, like the commands)
  lines = [(name, _version(name)) for name in PACKAGES]
  lines += [("python", sys.version.split()[0]),
            ("os", platform.platform()),
            ("libc", " ".join(platform.libc_ver()) or "unknown"),
            ("cpus", str(os.cpu_count())),
            ("jax backend", jax.default_backend()),
            ("devices", ", ".join(str(d) for d in jax.devices())),
            ("XLA_FLAGS", os.environ.get("XLA_FLAGS", "")),
            ("transparent huge pages",
             hostmem.huge_page_mode() or f"unknown (no {hostmem.THP_SWITCH})"),
            ("GLIBC_TUNABLES", os.environ.get("GLIBC_TUNABLES", ""))]
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  lines = report()
  width = max(len(name) for name, _ in lines)
  for name, value in lines:
    print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
  cli.run(main)
