"""Metrics of a sample batch, by what it holds: ADM metrics (FID, sFID, IS, precision, recall) of images,
per-frame FID and temporal scores of video clips, a Frechet distance over an embedder of sequences.

    python launch/evaluate.py --ref_batch=VIRTUAL_imagenet256_labeled.npz --sample_batch=samples.npz
    python launch/evaluate.py --ref_config=configs/fashion_mnist.py --ref_split=test --sample_batch=samples.npz
    python launch/evaluate.py --ref_config=configs/moving_fmnist.py --ref_split=test --ref_num=1000 \\
        --sample_batch=clips.npz                                      # video: per-frame FID over the clips' frames
    python launch/evaluate.py --ref_batch=ref_sequences.npz --embedder=my_eval/fad.py --sample_batch=seq.npz

Sample batches are as launch/sample.py writes them: `arr_0` uint8 (N, H, W, C) images (ADM's layout),
uint8 (N, F, H, W, C) clips or float (N, L, C) sequences; the reference must hold the same kind.
"""

import os

from absl import flags
from ml_collections import config_flags

from lsync_jax import cli
from lsync_jax.builders import build_source
from lsync_jax.eval.sample_batch import evaluate_sample_batch

FLAGS = flags.FLAGS
flags.DEFINE_string("sample_batch", None, "Sample batch .npz (arr_0: uint8 NHWC images, uint8 (N, F, H, W, C) clips "
                    "or float (N, L, C) sequences).")
flags.DEFINE_string("ref_batch", None, "Reference .npz of the same kind: ADM reference batch (mu, sigma, mu_s, sigma_s "
                    "and/or arr_0 images), arr_0 clips or saved clip statistics, arr_0 sequences (optional 'mask') or "
                    "saved sequence statistics.")
config_flags.DEFINE_config_file("ref_config", None, "Or: a training config whose data section is the reference.")
flags.DEFINE_string("ref_split", "test", "With --ref_config: the dataset split.")
flags.DEFINE_integer("ref_num", 0, "With --ref_config: how many reference images, clips or sequences (0: the whole "
                     "split).")
flags.DEFINE_string("embedder", None, "Sequences only (and required for them): the embedding model, "
                    "'package.module:factory', 'path/to/file.py[:factory]' or 'mean_std' (a smoke test, no standard "
                    "metric); see docs/evaluation.md.")
flags.DEFINE_string("inception_weights", None, "Converted .npz or a PyTorch FID Inception file (default: cache).")
flags.DEFINE_integer("batch_size", 256, "Images (or frames, or sequences) per batch (split over all devices).")
flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"],
                  "sqrtm: ADM's matrix square root; eigh: the same trace by symmetric eigendecomposition (faster).")
flags.DEFINE_bool("skip_small_metrics", False, "Images: skip a metric the sample or reference count is too small "
                  "for (FID and sFID need 2 images, precision and recall 4 on each side), with one line saying so, "
                  "instead of refusing before any Inception work.")
flags.DEFINE_string("output", None, "JSON output (default: next to the sample batch, *_metrics.json).")
flags.mark_flags_as_required(["sample_batch"])


def main(argv):
    del argv
    source = None
    if FLAGS.ref_config is not None:
        source = build_source(FLAGS.ref_config.data, split=FLAGS.ref_split)
    output = FLAGS.output or os.path.splitext(FLAGS.sample_batch)[0] + "_metrics.json"
    evaluate_sample_batch(FLAGS.sample_batch, ref_batch=FLAGS.ref_batch, ref_source=source, ref_num=FLAGS.ref_num,
                          weights_path=FLAGS.inception_weights, batch_size=FLAGS.batch_size, output=output,
                          fid_method=FLAGS.fid_method, embedder=FLAGS.embedder,
                          skip_small_metrics=FLAGS.skip_small_metrics)


if __name__ == "__main__":
    cli.run(main)
