"""Train: python launch/train.py --config=configs/fashion_mnist.py --workdir=/tmp/run"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ as a package

from lsync_jax.train import train_and_evaluate  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A get_config() file, e.g. configs/fashion_mnist.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and sample grids go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
