"""Starts N processes of segjax.main on this machine, as one multi-process JAX job.

  python launch/local.py --num_processes=2 -- --config=configs/adapt.py --workdir=runs/mp

Process 0 hosts the coordinator on 127.0.0.1. Arguments after `--` go to every
process. GPUs are split evenly between the processes (CUDA_VISIBLE_DEVICES)
when --gpus_per_process is given; --cpu_devices_per_process gives each process
that many (fake) CPU devices instead, to try multi-process runs without GPUs.
If any process fails, the others are stopped and its exit code is returned.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, default=None, help="Coordinator port (default: free).")
  parser.add_argument("--gpus_per_process", type=int, default=None)
  parser.add_argument("--cpu_devices_per_process", type=int, default=None)
  parser.add_argument("main_args", nargs=argparse.REMAINDER,
                      help="-- then the arguments of segjax.main")
  args = parser.parse_args()
  main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
  port = args.port or _free_port()

  procs = []
  for rank in range(args.num_processes):
    env = dict(os.environ)
    if args.gpus_per_process:
      first = rank * args.gpus_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(
          str(i) for i in range(first, first + args.gpus_per_process))
    if args.cpu_devices_per_process:
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                          f"{args.cpu_devices_per_process}").strip()
    cmd = [sys.executable, "-m", "segjax.main", f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={args.num_processes}", f"--process_id={rank}", *main_args]
    procs.append(subprocess.Popen(cmd, env=env))

  # Wait for all; on the first failure stop the rest (they would wait on it forever).
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed:
      for p in procs:
        if p.poll() is None:
          p.terminate()
      for p in procs:
        p.wait()
      return failed[0]
    if all(c == 0 for c in codes):
      return 0
    time.sleep(0.5)


if __name__ == "__main__":
  sys.exit(main())
