"""Train: python launch/train.py --config=configs/fashion_mnist.py --workdir=/tmp/run"""


from absl import app, flags
from ml_collections import config_flags

from lsync_jax.configs.cli import parse_flags
from lsync_jax.host import quiet_library_logs
from lsync_jax.recipes import PREEMPTED_EXIT_CODE, Preempted, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A get_config() file, e.g. configs/fashion_mnist.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and sample grids go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    quiet_library_logs()
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted:  # SIGTERM, checkpoint saved (logged): a code a scheduler requeues on (docs/training.md)
        return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
