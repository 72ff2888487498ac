"""What some tests need from outside the repository, and what happens when it is missing.

The real-data fixtures (samples of the real datasets, not ours to commit) and
the PyTorch peers live in the `shared/` folder beside the clone; the fixtures
are found at $SEGJAX_FIXTURES if set, else at <repo root>/../shared/fixtures.
torch and cityscapesscripts come with the test extra (`pip install -e ".[test]"`).

Outside CI a missing one skips the test, saying what was looked for. CI
(CI=true) runs a fresh clone with a copy of shared/ beside it and the test
extra installed, so there the same absence fails the test: a skip would let
the run pass green without the checks against real data and the references.
"""

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")


def in_ci() -> bool:
  return os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> NoReturn:
  """Skips the calling test (or module) for `reason`, or fails it under CI=true."""
  if in_ci():
    pytest.fail(f"{reason}. CI=true, where it must be present: failing rather than skipping.",
                pytrace=False)
  pytest.skip(reason, allow_module_level=True)


def fixtures_root() -> str:
  return os.environ.get("SEGJAX_FIXTURES") or os.path.join(SHARED, "fixtures")


def fixtures(subpath: str = "") -> str:
  """The path of `subpath` in the real-data fixtures; skips or fails (`missing`) if absent."""
  path = os.path.join(fixtures_root(), subpath)
  if not os.path.exists(path):
    missing(f"The real-data fixtures are absent: no {path}. Set SEGJAX_FIXTURES to the "
            "fixtures folder (default: shared/fixtures beside the clone)")
  return path


def shared(subpath: str) -> str:
  """The path of `subpath` in the shared/ folder beside the clone; skips or fails if absent."""
  path = os.path.join(SHARED, subpath)
  if not os.path.exists(path):
    missing(f"No {path}: these tests read shared/{subpath} from the shared/ folder beside the "
            "clone")
  return path


def package(name: str, reason: str) -> ModuleType:
  """`pytest.importorskip(name)`, except that under CI=true a missing package fails."""
  try:
    return importlib.import_module(name)
  except ImportError as error:
    missing(f"{name} cannot be imported ({error}); {reason}. Install the test extra: "
            'pip install -e ".[test]"')
