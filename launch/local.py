"""Starts N processes of segjax.main on this machine, as one multi-process JAX job.

  python launch/local.py --num_processes=2 -- --config=configs/adapt.py --workdir=runs/mp

Process 0 hosts the coordinator on 127.0.0.1. Arguments after `--` go to every
process. GPUs are split evenly between the processes (CUDA_VISIBLE_DEVICES)
when --gpus_per_process is given; --cpu_devices_per_process gives each process
that many (fake) CPU devices instead, to try multi-process runs without GPUs.
SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) sent to the launcher go to every process
(which run in their own session, so that a terminal's Ctrl-C reaches them once,
through the launcher); a signal sent to one process alone stops every process
after the same step, as under SLURM. Processes that stop on a signal save and
exit with status 75 (segjax.preemption.REQUEUE_EXIT_CODE), which is returned
once all of them have; if a process fails otherwise, the others are stopped
(they would wait on it forever) and its exit code is returned.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

REQUEUE_EXIT_CODE = 75  # segjax.preemption.REQUEUE_EXIT_CODE (not imported: no JAX here).
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


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
  parser.add_argument("--stop_grace_secs", type=float, default=600.0,
                      help="After one process stops on a signal, how long the others may take "
                           "to save and exit before they are killed.")
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
    procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  for sig in FORWARDED:
    signal.signal(sig, forward)
  return wait(procs, args.stop_grace_secs)


def wait(procs: list[subprocess.Popen], stop_grace_secs: float) -> int:
  """The job's exit status: 0 when every process succeeded, 75 when they stopped on a signal,
  else the first failure's status (after stopping the others)."""
  stopping_since = None
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0, REQUEUE_EXIT_CODE)]
    if failed:
      _stop(procs, signal.SIGTERM)
      return failed[0]
    if all(c is not None for c in codes):
      return REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 0
    if REQUEUE_EXIT_CODE in codes:
      # The others stop after the same step and save with it: give them time.
      stopping_since = stopping_since or time.monotonic()
      if time.monotonic() - stopping_since > stop_grace_secs:
        print(f"launch/local.py: processes still running {stop_grace_secs:.0f} s after one "
              "stopped on a signal; killing them.", file=sys.stderr)
        _stop(procs, signal.SIGKILL)
        return REQUEUE_EXIT_CODE
    time.sleep(0.5)


def _stop(procs: list[subprocess.Popen], sig: int) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(sig)
  for p in procs:
    p.wait()


if __name__ == "__main__":
  sys.exit(main())
