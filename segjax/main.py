"""Entry point: python -m segjax.main --config=configs/adapt.py --workdir=DIR.

Any config field can be overridden on the command line, e.g.
`--config.batch_size=16 --config.adapt.lambda_adv=0.01`. Rerunning the same
command on the same workdir resumes from its latest checkpoint. As one process
of several (a SLURM job, or launch/local.py), it joins the job before JAX is
touched. A config or workdir that cannot work stops it before anything is
built, with one message naming the field or folder (exit status 1; 2 for a
bad command line; `segjax.cli`). SIGTERM, SIGUSR1 or SIGINT stop it after the
current step with a checkpoint of that step, exit status 75
(`segjax.preemption`), which launch/slurm.sbatch requeues.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from segjax import cli, parallel, preemption, reporting, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard files.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process jobs not started by SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process job.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process job.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  reporting.quiet_libraries()
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  parallel.log_topology()
  logging.info("Config:\n%s", FLAGS.config)
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    return preemption.REQUEUE_EXIT_CODE
  return 0


if __name__ == "__main__":
  cli.run(main)
