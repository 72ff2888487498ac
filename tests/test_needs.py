"""tests/needs.py: where the shared fixtures are; a skip outside CI, a failure under CI=true."""

import os

import pytest

import needs

FAILED, SKIPPED = pytest.fail.Exception, pytest.skip.Exception


@pytest.fixture(name="no_fixtures")
def fixture_no_fixtures(tmp_path, monkeypatch):
  """$SEGJAX_FIXTURES pointing at a folder that does not exist; returns that path."""
  absent = str(tmp_path / "absent")
  monkeypatch.setenv("SEGJAX_FIXTURES", absent)
  return absent


@pytest.mark.parametrize("ci, outcome", [
    ("true", FAILED), ("TRUE", FAILED), ("True", FAILED),
    (None, SKIPPED), ("", SKIPPED), ("false", SKIPPED), ("1", SKIPPED)])
def test_missing_fixtures_fail_only_under_ci_true(no_fixtures, monkeypatch, ci, outcome):
  if ci is None:
    monkeypatch.delenv("CI", raising=False)
  else:
    monkeypatch.setenv("CI", ci)
  with pytest.raises(outcome) as raised:
    needs.fixtures("cityscapes")
  message = str(raised.value)
  assert os.path.join(no_fixtures, "cityscapes") in message and "SEGJAX_FIXTURES" in message
  assert ("CI=true" in message) == (outcome is FAILED)


def test_fixtures_are_found_at_segjax_fixtures(tmp_path, monkeypatch):
  (tmp_path / "voc").mkdir()
  monkeypatch.setenv("SEGJAX_FIXTURES", str(tmp_path))
  monkeypatch.setenv("CI", "true")
  assert needs.fixtures("voc") == str(tmp_path / "voc")


def test_fixtures_default_to_shared_beside_the_clone(monkeypatch):
  monkeypatch.delenv("SEGJAX_FIXTURES", raising=False)
  assert os.path.isfile(os.path.join(needs.REPO_ROOT, "pyproject.toml"))
  assert needs.fixtures_root() == os.path.join(os.path.dirname(needs.REPO_ROOT), "shared",
                                               "fixtures")


@pytest.mark.parametrize("ci, outcome", [("true", FAILED), (None, SKIPPED)])
def test_a_missing_package_or_shared_file_fails_only_under_ci(monkeypatch, ci, outcome):
  if ci is None:
    monkeypatch.delenv("CI", raising=False)
  else:
    monkeypatch.setenv("CI", ci)
  with pytest.raises(outcome, match="segjax_no_such_package"):
    needs.package("segjax_no_such_package", "a test of tests/needs.py")
  with pytest.raises(outcome, match="no_such_file.py"):
    needs.shared("bench/no_such_file.py")
  assert needs.package("json", "present").dumps([1]) == "[1]"
