"""Train: python launch/train.py --config=configs/fashion_mnist.py --workdir=/tmp/run

--check runs every check a start makes (config, data, weights, storage access) on every process and
exits 0 before compiling: run it first on a pod, where a misconfigured job would otherwise fail only
after minutes of compiling.
"""


from absl import app, flags, logging
from ml_collections import config_flags

from lsync_jax.configs.cli import parse_flags
from lsync_jax.host import quiet_library_logs, restart_with_host_tunables
from lsync_jax.recipes import PREEMPTED_EXIT_CODE, Preempted, check_run, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A get_config() file, e.g. configs/fashion_mnist.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and sample grids go (a local path or "
                    "gs://bucket/run).")
flags.DEFINE_bool("check", False, "Check the config, data, weights and storage access on every process, then exit "
                  "before compiling.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    quiet_library_logs()
    if FLAGS.check:
        logging.info("%s", check_run(FLAGS.config, FLAGS.workdir))
        return 0
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted:  # SIGTERM, checkpoint saved (logged): a code a scheduler requeues on (docs/training.md)
        return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    restart_with_host_tunables()  # before JAX starts: glibc tuned for XLA on CPU (lsync_jax.host)
    app.run(main, flags_parser=parse_flags)
