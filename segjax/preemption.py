"""Stopping a run cleanly when the scheduler or the user asks: SIGTERM, SIGUSR1, SIGINT.

SLURM sends SIGTERM at preemption and at the time limit (after `--signal`'s
SIGUSR1, if asked for); Ctrl-C is SIGINT. `StopSignals` turns each into a
request: the training loop finishes the step it is in, saves a checkpoint at
that step (with the data iterator), waits for every save in flight and raises
`Preempted`, on which `segjax.main` exits with `REQUEUE_EXIT_CODE`, which
launch/slurm.sbatch requeues. Every process of a job stops after the same step:
each one's request is shared with the others after every step (`agreed`). A
second SIGINT stops at once (KeyboardInterrupt); the checkpoints already
written stay whole (Orbax renames a checkpoint into place only when complete).
"""

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): "try again later". launch/slurm.sbatch requeues on it.
REQUEUE_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on request after `step`, with a checkpoint of that step saved."""

  def __init__(self, step: int, signal_name: str, checkpoint_dir: str):
    super().__init__(f"Stopped by {signal_name} after step {step}; the checkpoint of step {step} "
                     f"is in {checkpoint_dir}. Rerun the same command to resume (exit status "
                     f"{REQUEUE_EXIT_CODE} asks SLURM to requeue the job).")
    self.step = step
    self.signal_name = signal_name


class StopSignals:
  """While entered, SIGTERM / SIGUSR1 / SIGINT set a stop request instead of killing.

  Handlers can only be installed from the main thread; elsewhere (a test
  calling the loop from a worker thread) signals keep their default effect.
  """

  def __init__(self, signals=SIGNALS):
    self._signals = signals
    self._previous = {}
    self.received: str | None = None

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt(f"a second {name}: stopping without a final checkpoint")
    if self.received is None:
      self.received = name
      # No logging here: a handler may run inside the logging module's own lock.

  def agreed(self) -> str | None:
    """The signal that stops the run, once any process received one; the same on every
    process (a collective: call it from every process at the same step)."""
    if jax.process_count() == 1:
      return self.received
    index = SIGNALS_BY_NAME.index(self.received) + 1 if self.received else 0
    indices = multihost_utils.process_allgather(np.int32(index))
    first = int(np.max(indices))
    if first and self.received is None:
      logging.info("Another process received %s: stopping with it.", SIGNALS_BY_NAME[first - 1])
    return SIGNALS_BY_NAME[first - 1] if first else None


SIGNALS_BY_NAME = tuple(sig.name for sig in SIGNALS)
