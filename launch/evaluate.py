"""ADM metrics (FID, sFID, IS, precision, recall) of a sample batch, with the FID Inception in JAX.

    python launch/evaluate.py --ref_batch=VIRTUAL_imagenet256_labeled.npz --sample_batch=samples.npz
    python launch/evaluate.py --ref_config=configs/fashion_mnist.py --ref_split=test --sample_batch=samples.npz

Sample batches are ADM's layout (`arr_0`: uint8 NHWC), as launch/sample.py writes them.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from lsync_jax.configs.cli import parse_flags
from lsync_jax.eval.evaluator import evaluate
from lsync_jax.host import quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("sample_batch", None, "ADM-style .npz of samples (arr_0: uint8 NHWC).")
flags.DEFINE_string("ref_batch", None, "ADM reference batch .npz (mu, sigma, mu_s, sigma_s and/or arr_0 images).")
config_flags.DEFINE_config_file("ref_config", None, "Or: a training config whose data section is the reference.")
flags.DEFINE_string("ref_split", "test", "With --ref_config: the dataset split.")
flags.DEFINE_integer("ref_num", 0, "With --ref_config: how many reference images (0: the whole split).")
flags.DEFINE_string("inception_weights", None, "Converted .npz or a PyTorch FID Inception file (default: cache).")
flags.DEFINE_integer("batch_size", 256, "Images per Inception batch (split over all devices).")
flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"],
                  "sqrtm: ADM's matrix square root; eigh: the same trace by symmetric eigendecomposition (faster).")
flags.DEFINE_string("output", None, "JSON output (default: next to the sample batch, *_metrics.json).")
flags.mark_flags_as_required(["sample_batch"])


def main(argv):
    del argv
    quiet_library_logs()
    source = None
    if FLAGS.ref_config is not None:
        from lsync_jax.builders import build_source

        source = build_source(FLAGS.ref_config.data, split=FLAGS.ref_split)
    output = FLAGS.output or os.path.splitext(FLAGS.sample_batch)[0] + "_metrics.json"
    evaluate(FLAGS.sample_batch, ref_batch=FLAGS.ref_batch, ref_source=source, ref_num=FLAGS.ref_num,
             weights_path=FLAGS.inception_weights, batch_size=FLAGS.batch_size, output=output,
             fid_method=FLAGS.fid_method)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
