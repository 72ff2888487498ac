"""The command-line behaviour every command shares (segjax.cli): help, user errors, exit status.

The commands run as `python -m` would run them, forked from one process that
imports the heavy libraries once (tests/commands.py), so that a dozen of them
cost seconds.
"""

import glob
import os

import pytest

import commands
import e2e
from configs import adapt, test
from segjax import cli

# Each command and the flags of its own that --help must list (absl lists only the main
# module's flags there; those of segjax.cli are adopted by cli.run).
OWN_FLAGS = {
    "segjax.main": ("config", "workdir", "coordinator_address", "num_processes", "process_id"),
    "segjax.evaluate": ("config", "workdir", "checkpoint", "state", "save_predictions"),
    "segjax.predict": ("config", "workdir", "checkpoint", "state", "model", "input", "video",
                       "output", "batch_size"),
    "segjax.export": ("config", "workdir", "checkpoint", "state", "format", "size", "batch",
                      "quantize", "calibration_images", "verify_images", "output", "platforms"),
    "segjax.tools.cache_data": ("config", "fields"),
    "segjax.tools.category_stats": ("config", "out", "max_examples"),
    "segjax.tools.check_data": ("config", "fields", "show"),
    "segjax.tools.collect_env": (),
    "segjax.tools.convert_weights": ("input", "output"),
    "segjax.tools.data_stats": ("config", "out", "field", "max_examples", "num_images"),
    "segjax.tools.make_pseudo_labels": ("config", "workdir", "checkpoint", "out"),
    "segjax.tools.rcs_stats": ("config", "out"),
    "segjax.tools.score_pseudo_labels": ("labels", "out"),
    "segjax.tools.self_training_rounds": ("config", "workdir", "init_from", "rounds",
                                          "steps_per_round", "checkpoint"),
    "segjax.tools.summary": ("config", "height", "width", "batch", "num_classes", "repeats",
                             "step", "step_for"),
}


def _commands_in_the_tree() -> set[str]:
  """The modules that are commands: those with a __main__ block."""
  found = set()
  for path in glob.glob(os.path.join(e2e.REPO_ROOT, "segjax", "**", "*.py"), recursive=True):
    with open(path, encoding="utf-8") as f:
      if 'if __name__ == "__main__":' in f.read():
        relative = os.path.relpath(path, e2e.REPO_ROOT)
        found.add(relative.removesuffix(".py").replace(os.sep, "."))
  return found


def _error_line(proc) -> str:
  """The stderr line of the error, checked to be the only report: no traceback."""
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr
  return lines[0]


@pytest.fixture(scope="module")
def ran(cache_dir, tmp_path_factory):
  """Every command's --help, then commands with user errors, run in one batch on 8 devices:
  {'help': {module: result}, 'errors': [result, ...], 'tmp': a folder they used}."""
  tmp = tmp_path_factory.mktemp("cli")
  (tmp / "a_file").write_text("not a folder")
  main = ["--config=configs/test.py", f"--workdir={tmp / 'run'}"]
  errors = [
      ("segjax.main", [*main, "--config.not_a_field=1"]),
      ("segjax.main", [*main, "--config.optim.seg.lr_typo=1"]),
      ("segjax.main", ["--config=configs/adapt.py", f"--workdir={tmp / 'run'}",
                       "--config.data.source.name=cityscapes", f"--config.data.source.root={tmp}"]),
      ("segjax.main", [*main, "--config.batch_size=7"]),
      ("segjax.main", ["--config=configs/test.py", f"--workdir={tmp / 'a_file' / 'run'}"]),
      ("segjax.main", [*main, "--config.data.source.name=cityscapes"]),
      ("segjax.main", [*main, "--no_such_flag=1"]),
      ("segjax.evaluate", ["--config=configs/test.py", f"--workdir={tmp / 'empty'}"]),
      ("segjax.predict", ["--config=configs/test.py", f"--workdir={tmp}", f"--input={tmp}",
                          f"--output={tmp / 'out'}", "extra"]),
      ("segjax.main", [*main, "--config.not_a_field=1"], {cli.DEBUG_ENV: "1"}),
      ("segjax.main", ["--config=configs/no_such_config.py", f"--workdir={tmp / 'run'}"]),
      ("segjax.main", ["--config=configs/adaptsegnet.py:nope=ROOT", f"--workdir={tmp / 'run'}"]),
      ("segjax.evaluate", ["--config=configs/test.py", f"--workdir={tmp / 'empty'}",
                           "--config.model.name=nope"]),
      ("segjax.tools.summary", ["--config=configs/test.py", "--config.model.name=nope"]),
      ("segjax.main", [*main, "--config.adapt.method=source_only"]),
      ("segjax.export", ["--config=configs/test.py", f"--workdir={tmp}", "--format=onnx",
                         "--size=512"]),
      ("segjax.predict", [f"--input={tmp}", f"--output={tmp / 'out'}"]),
  ]
  results = commands.run([(module, ["--help"]) for module in OWN_FLAGS] + errors, cache_dir,
                         devices=8)
  return {"help": dict(zip(OWN_FLAGS, results)), "errors": results[len(OWN_FLAGS):], "tmp": tmp}


def test_every_commands_help_lists_its_own_flags(ran):
  assert _commands_in_the_tree() == set(OWN_FLAGS)
  for module, own in OWN_FLAGS.items():
    proc = ran["help"][module]
    listed = proc.stdout.split("Try --helpfull")[0]
    missing = [flag for flag in own if f"--{flag}:" not in listed]
    assert not missing, f"{module} --help lacks {missing}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


def test_user_errors_are_one_message_with_the_exit_status_of_their_kind(ran):
  results, tmp = ran["errors"], ran["tmp"]
  codes = [proc.returncode for proc in results]
  assert codes == [2, 2, 2, 1, 1, 1, 2, 1, 2, 1, 2, 2, 1, 1, 1, 1, 1], \
      [p.stderr[-2000:] for p in results]
  assert _error_line(results[0]).startswith(
      "error: segjax.main: --config.not_a_field: config.not_a_field is not a field; the fields "
      "of config are adapt, batch_size,")
  assert _error_line(results[1]) == (
      "error: segjax.main: --config.optim.seg.lr_typo: config.optim.seg.lr_typo is not a field; "
      "did you mean config.optim.seg.lr?")
  assert _error_line(results[2]).startswith(
      "error: segjax.main: --config.data.source.root: config.data.source.root is not a field: "
      "config.data.source is the built-in street scenes")
  assert "--config=configs/adaptsegnet.py:gta5=ROOT,cityscapes=ROOT" in results[2].stderr
  assert "config.batch_size=7 must be a positive multiple of the number of devices (8" \
      in _error_line(results[3])
  assert f"Cannot write to the workdir '{tmp / 'a_file' / 'run'}'" in _error_line(results[4])
  assert "data.source.name='cityscapes': data.source has the fields of the built-in street " \
      "scenes" in _error_line(results[5])
  assert "Unknown command line flag 'no_such_flag'" in _error_line(results[6])
  assert "error: segjax.evaluate: No checkpoint in" in _error_line(results[7])
  assert "Unexpected arguments: ['extra']" in _error_line(results[8])
  debug = results[9].stderr  # SEGJAX_DEBUG=1: the traceback of the original error.
  assert "Traceback" in debug and "AttributeError" in debug and "error: " not in debug
  assert _error_line(results[10]).startswith(
      "error: segjax.main: Configuration is not available because of an earlier failure to load")
  assert "configs/no_such_config.py" in results[10].stderr
  assert _error_line(results[11]) == (
      "error: segjax.main: flag --config=configs/adaptsegnet.py:nope=ROOT: Error whilst parsing "
      "config file: ValueError: Bad dataset root 'nope=ROOT' in the config string; expected "
      "NAME=PATH with NAME one of ['gta5', 'synthia', 'cityscapes'].")
  for proc in results[12:14]:  # evaluate, summary: the model is checked before anything is read.
    assert "Unknown model name 'nope' (config field model.name)" in _error_line(proc)
  # A method switched on a config built for another: its fields would be ignored.
  assert _error_line(results[14]) == (
      "error: segjax.main: config.adapt.disc_input, config.adapt.gan, config.adapt.lambda_adv, "
      "config.adapt.lambda_adv_aux, config.adapt.lambda_ent, config.adapt.lambda_ent_aux: "
      "adapt.method='source_only' does not read them. The fields of "
      "source_only are none, and config.adapt must hold them and no others: use a config built "
      "for source_only (configs/source_only.py), or build config.adapt with "
      "segjax.methods.adapt_config('source_only', FIELD=VALUE, ...).")
  assert _error_line(results[15]) == (
      "error: segjax.export: --size='512': expected HEIGHTxWIDTH, e.g. --size=512x1024.")
  assert _error_line(results[16]) == (
      "error: segjax.predict: No model: give --config and --workdir (a training run's "
      "checkpoint), or --model (a folder written by segjax.export).")


@pytest.mark.parametrize("path,expected", [
    ("optim.seg.lr_typo", "config.optim.seg.lr_typo is not a field; did you mean "
                          "config.optim.seg.lr?"),
    ("lr", "config.lr is not a field; did you mean config.optim.disc.lr or config.optim.seg.lr "
           "or config.optim.teacher.lr?"),
    ("optim.sg.lr", "config.optim.sg is not a field; did you mean config.optim.seg.lr?"),
    ("data.source.num_example", "config.data.source.num_example is not a field; did you mean "
                                "config.data.source.num_examples?"),
    ("model.width.x", "config.model.width.x is not a field: config.model.width is 8, not a "
                      "sub-config."),
    ("optim.seg.lr", None),
])
def test_unknown_config_fields_name_the_closest(path, expected):
  assert cli.unknown_config_field(test.get_config(), path) == expected


def test_a_real_dataset_field_on_the_built_in_scenes_says_how_to_read_one():
  message = cli.unknown_config_field(adapt.get_config(), "data.eval.resize")
  assert message.startswith("config.data.eval.resize is not a field: config.data.eval is the "
                            "built-in street scenes, whose fields are ")
  assert "from the config string of a config that takes dataset roots" in message
