"""EMA samples from a workdir: python launch/sample.py --config=configs/fashion_mnist.py --workdir=/tmp/run
--num_samples=1000 (writes an ADM-style .npz, arr_0 uint8 NHWC, and a PNG grid into --out_dir).

Video runs write arr_0 uint8 (N, F, H, W, C) clips and a PNG strip (one clip per row, frames along it);
sequence runs write arr_0 float32 (N, L, C) and no picture."""

import os

from absl import flags
from ml_collections import config_flags

from lsync_jax import cli
from lsync_jax.eval.sampling import sample_from_workdir

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's get_config() file (with the same overrides).")
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("out_dir", None, "Where to write the .npz and PNG (default: WORKDIR/samples).")
flags.DEFINE_integer("num_samples", 100, "How many samples.")
flags.DEFINE_integer("batch_size", 100, "Samples per batch (split over all devices).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    out = sample_from_workdir(FLAGS.config, FLAGS.workdir, FLAGS.out_dir or os.path.join(FLAGS.workdir, "samples"),
                              FLAGS.num_samples, FLAGS.batch_size, FLAGS.seed)
    print(f"wrote {out['npz']}" + (f" and {out['png']}" if out["png"] else ""))


if __name__ == "__main__":
    cli.run(main)
