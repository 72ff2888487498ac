"""segjax.hostmem: commands restart once with glibc's huge-page malloc, on CPU-only hosts only."""

import os
import subprocess
import sys

import pytest

from segjax import hostmem
from segjax.tools import collect_env


@pytest.fixture(name="capable_host")
def fixture_capable_host(monkeypatch):
  """A Linux/glibc >= 2.35 host with transparent huge pages available, whatever runs the test."""
  monkeypatch.setattr(hostmem, "_glibc_with_hugetlb", lambda: True)
  monkeypatch.setattr(hostmem, "_huge_pages_allowed", lambda: True)


def _tunables(environ):
  restarted = hostmem.huge_page_environment(environ)
  return None if restarted is None else restarted["GLIBC_TUNABLES"]


def test_the_tunable_is_added_for_a_cpu_only_jax(capable_host):
  del capable_host
  assert _tunables({"JAX_PLATFORMS": "cpu"}) == "glibc.malloc.hugetlb=1"
  assert _tunables({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == (
      "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("environ", [
    {"JAX_PLATFORMS": "cuda"},                         # A GPU run: host memory as JAX has it.
    {"JAX_PLATFORMS": "tpu,cpu"},
    {"JAX_PLATFORMS": "cpu", "SEGJAX_HUGE_PAGES": "0"},  # Turned off.
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # The user's choice.
    {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},  # Restarted already.
], ids=str)
def test_no_restart(capable_host, environ):
  del capable_host
  assert _tunables(environ) is None


def test_an_installed_accelerator_plugin_means_no_restart(capable_host, monkeypatch):
  del capable_host
  monkeypatch.setattr(hostmem.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  assert _tunables({}) is None


def test_no_restart_without_glibc_or_huge_pages(monkeypatch):
  monkeypatch.setattr(hostmem, "_glibc_with_hugetlb", lambda: False)
  monkeypatch.setattr(hostmem, "_huge_pages_allowed", lambda: True)
  assert _tunables({"JAX_PLATFORMS": "cpu"}) is None
  monkeypatch.setattr(hostmem, "_glibc_with_hugetlb", lambda: True)
  monkeypatch.setattr(hostmem, "_huge_pages_allowed", lambda: False)
  assert _tunables({"JAX_PLATFORMS": "cpu"}) is None


@pytest.mark.parametrize("argv, module", [
    (["python", "-m", "segjax.main", "--config=c.py"], "segjax.main"),
    (["python", "-X", "importtime", "-msegjax.evaluate"], "segjax.evaluate"),
    (["python", "-u", "-m", "segjax.tools.summary"], "segjax.tools.summary"),
    (["python", "train.py", "-m", "segjax.main"], None),
    (["python", "-c", "import segjax"], None),
    (["python"], None),
])
def test_command_module(argv, module):
  assert hostmem._command_module(argv) == module  # pylint: disable=protected-access


def test_a_command_restarts_with_the_tunable():
  """`python -m segjax.tools.collect_env` runs with what `huge_page_environment` gives here.

  On this kind of host (Linux, glibc >= 2.35, huge pages in madvise or always mode,
  CPU-only JAX) that is the restarted process's GLIBC_TUNABLES; elsewhere, none.
  """
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SEGJAX_HUGE_PAGES")}
  env["JAX_PLATFORMS"] = "cpu"
  expected = _tunables(env) or ""
  out = subprocess.run([sys.executable, "-m", "segjax.tools.collect_env"], env=env, check=True,
                       capture_output=True, text=True).stdout
  lines = dict(line.split(None, 1) if " " in line.strip() else (line.strip(), "")
               for line in out.splitlines() if line.startswith("GLIBC_TUNABLES"))
  assert lines["GLIBC_TUNABLES"].strip() == expected, out
  off = subprocess.run([sys.executable, "-m", "segjax.tools.collect_env"],
                       env=dict(env, SEGJAX_HUGE_PAGES="0"), check=True, capture_output=True,
                       text=True).stdout
  assert [line.split()[1:] for line in off.splitlines() if line.startswith("GLIBC_TUNABLES")] == [
      []], off


def test_collect_env_reports_the_libraries_and_backend():
  names = [name for name, _ in collect_env.report()]
  assert names[:len(collect_env.PACKAGES)] == list(collect_env.PACKAGES)
  assert {"jax backend", "devices", "transparent huge pages", "GLIBC_TUNABLES"} <= set(names)
