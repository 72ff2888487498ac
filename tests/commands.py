"""Runs many segjax commands for the price of one start-up (shared by the command-line tests).

`run([(module, args), ...])` starts one process that imports the heavy
libraries (JAX, TensorFlow through CLU, Orbax) once and then forks a child
per command, which runs `module` as `python -m module args` does: runpy sets
sys.argv[0] and __main__, and the child's exit status, stdout and stderr are
the command's. A command's start-up costs about 6 s on CI's 2 cores, almost
all of it those imports, so a dozen commands take seconds instead of a
minute. Each child is a separate process: flags, configs and JAX state never
leak from one command to the next.
"""

import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

import e2e


def run(commands: list[tuple], cache_dir: str, devices: int = 1,
        timeout: int = 300) -> list[subprocess.CompletedProcess]:
  """Each command's CompletedProcess (args, returncode, stdout, stderr), in order.

  A command is (module, args) or (module, args, environment variables to set).
  """
  with tempfile.TemporaryDirectory() as folder:
    spec = os.path.join(folder, "commands.json")
    with open(spec, "w", encoding="utf-8") as f:
      json.dump({"commands": commands, "folder": folder}, f)
    subprocess.run([sys.executable, os.path.abspath(__file__), spec], cwd=e2e.REPO_ROOT,
                   env=e2e.env(devices, cache_dir), check=True, timeout=timeout)
    results = []
    for i, (module, args, *_) in enumerate(commands):
      with open(os.path.join(folder, f"{i}.json"), encoding="utf-8") as f:
        code = json.load(f)["returncode"]
      outputs = []
      for stream in ("stdout", "stderr"):
        with open(os.path.join(folder, f"{i}.{stream}"), encoding="utf-8") as f:
          outputs.append(f.read())
      results.append(subprocess.CompletedProcess([module, *args], code, *outputs))
    return results


def _exit_code(error: SystemExit) -> int:
  """What the interpreter makes of SystemExit(code): a message is printed and exits 1."""
  if error.code is None or isinstance(error.code, int):
    return error.code or 0
  print(error.code, file=sys.stderr)
  return 1


def _run_child(module: str, args: list[str], env: dict, out: str, err: str) -> int:
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  os.environ.update(env)
  sys.argv = [module, *args]
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0
  except SystemExit as e:
    return _exit_code(e)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    return 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()


def _main(spec_path: str) -> None:
  with open(spec_path, encoding="utf-8") as f:
    spec = json.load(f)
  import segjax.train  # pylint: disable=import-outside-toplevel,unused-import  # What segjax.main imports.
  for i, (module, args, *env) in enumerate(spec["commands"]):
    base = os.path.join(spec["folder"], str(i))
    pid = os.fork()
    if pid == 0:
      os._exit(_run_child(module, args, env[0] if env else {}, base + ".stdout",
                          base + ".stderr"))
    _, status = os.waitpid(pid, 0)
    with open(base + ".json", "w", encoding="utf-8") as f:
      json.dump({"returncode": os.waitstatus_to_exitcode(status)}, f)


if __name__ == "__main__":
  sys.path.insert(0, e2e.REPO_ROOT)
  _main(sys.argv[1])
