"""Host memory for XLA:CPU: glibc's malloc with transparent huge pages, for segjax's commands.

XLA:CPU takes each execution's temporary buffer, every intermediate of a
training step packed into one block, from malloc: 475 MB for BiSeNet-R18's
supervised step at batch 2, 256x512, and about 1 GB for its AdaptSegNet step.
glibc serves a block that large from a fresh mmap on every call and unmaps it
on free, so every step touches a gigabyte of new memory 4 KiB page by page:
270,000 page faults and 0.87 s of kernel time per adaptation step, beside 2.0
s of user time. With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks the
kernel for transparent huge pages for such blocks (2 MiB pages, in the
kernel's default `madvise` mode): about 1,500 faults and 0.13 s of kernel time
per step, and BiSeNet's AdaptSegNet step goes from about 1.6 s to 1.1 s
(benchmarks/speed_vs_torch.py, README "Speed against PyTorch").

A tunable is read when a process starts, so `restart_with_huge_pages` restarts
the command (execve: same PID, same arguments) with it in `GLIBC_TUNABLES`,
once: `python -m segjax.<command>` restarts while Python imports the segjax
package (`restart_segjax_command`, from segjax/__init__.py), before the
command's 5 s of imports. Nothing else restarts: not a program that imports
segjax, nor one that runs a command's module in its own process (the tests'
`commands.run`). It restarts only where the tunable helps: Linux with glibc
2.35 or later, transparent huge pages not switched off, and a JAX that can
only run on the CPU (no accelerator plugin installed, or JAX_PLATFORMS
starting with cpu). It allocates host memory differently and nothing more:
what XLA compiles, for any platform, is unchanged. `SEGJAX_HUGE_PAGES=0` turns
it off. Code that imports segjax as a library gets it by starting Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment.
"""

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OFF_ENV = "SEGJAX_HUGE_PAGES"
THP_SWITCH = "/sys/kernel/mm/transparent_hugepage/enabled"  # The kernel's setting (sysfs).


def _glibc_with_hugetlb() -> bool:
  """Linux with glibc 2.35 or later, the first with the `glibc.malloc.hugetlb` tunable."""
  if sys.platform != "linux":
    return False
  name, version = platform.libc_ver()
  try:
    major, minor = (int(part) for part in version.split(".")[:2])
  except ValueError:
    return False
  return name == "glibc" and (major, minor) >= (2, 35)


def huge_page_mode() -> str | None:
  """The kernel's transparent-huge-page setting ('always [madvise] never'), None if unreadable."""
  try:
    with open(THP_SWITCH, encoding="ascii") as f:
      return f.read().strip()
  except OSError:
    return None


def _huge_pages_allowed() -> bool:
  """Transparent huge pages are not switched off ('[never]') by the kernel's setting."""
  mode = huge_page_mode()
  return mode is not None and "[never]" not in mode


def _cpu_only_jax(environ) -> bool:
  """Whether JAX can only run on the CPU here, decided without starting any JAX backend.

  Starting one would be too early: `jax.distributed.initialize` must come
  first in a multi-process run.
  """
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
    return False
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    return True
  return not any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def huge_page_environment(environ=None) -> dict[str, str] | None:
  """`environ` with the huge-page tunable added, or None where it does not apply or is there."""
  environ = dict(os.environ if environ is None else environ)
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (environ.get(OFF_ENV) == "0" or TUNABLE in tunables or not _glibc_with_hugetlb()
      or not _huge_pages_allowed() or not _cpu_only_jax(environ)):
    return None
  environ["GLIBC_TUNABLES"] = f"{tunables}:{SETTING}" if tunables else SETTING
  return environ


def _command_module(orig_argv: list[str]) -> str | None:
  """The module of `python [options] -m MODULE ...`, else None (a script, -c, the REPL)."""
  args = iter(orig_argv[1:])
  for arg in args:
    if arg == "-m":
      return next(args, None)
    if arg.startswith("-m"):
      return arg[2:]
    if arg in ("-X", "-W"):
      next(args, None)
    elif not arg.startswith("-") or arg == "-c":
      return None
  return None


def restart_segjax_command() -> None:
  """`restart_with_huge_pages` if this process is `python -m segjax.<command>`."""
  module = _command_module(sys.orig_argv)
  if module is not None and module.startswith("segjax."):
    restart_with_huge_pages()


def restart_with_huge_pages() -> None:
  """Restarts this command with the tunable (module docstring); returns where it does not apply."""
  environ = huge_page_environment()
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)

