"""The package's layers (../shared/docs/STYLE.md), read from the import statements of segjax/.

The training loop (segjax.train) is imported only by the commands that run it;
library code never imports a command-line tool (segjax.tools); models take
their collective's axis name as a field instead of importing segjax.parallel.
"""

import ast
import glob
import os

import e2e

# The commands that run the training loop.
TRAIN_IMPORTERS = {"segjax.main", "segjax.tools.self_training_rounds"}


def _imports() -> dict[str, set[str]]:
  """module -> the segjax modules it imports (`from segjax import x` counts as segjax.x)."""
  found = {}
  for path in glob.glob(os.path.join(e2e.REPO_ROOT, "segjax", "**", "*.py"), recursive=True):
    module = os.path.relpath(path, e2e.REPO_ROOT).removesuffix(".py").replace(os.sep, ".")
    module = module.removesuffix(".__init__")
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names.add(node.module)
        names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found[module] = {name for name in names if name.split(".")[0] == "segjax"}
  return found


def test_only_the_commands_that_train_import_the_training_loop():
  importers = {module for module, names in _imports().items() if "segjax.train" in names}
  assert importers == TRAIN_IMPORTERS


def test_library_code_never_imports_a_command_line_tool():
  wrong = {module: sorted(name for name in names if name.startswith("segjax.tools."))
           for module, names in _imports().items() if not module.startswith("segjax.tools")}
  assert not {module: names for module, names in wrong.items() if names}


def test_models_take_the_axis_name_as_a_field():
  wrong = {module for module, names in _imports().items()
           if module.startswith("segjax.models") and "segjax.parallel" in names}
  assert not wrong
