"""Per-block representations of a run's checkpoints: CKA heatmaps, probe curves, JSON, TensorBoard.

    python launch/analyze.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
    python launch/analyze.py --config=configs/imagenet256.py --config.data.dir=... --workdir=RUN \
        --steps=100000,200000 --encoder_path=dinov2_vitb14.pth   # + mutual k-NN / CKNNA with DINOv2

Writes into --out_dir (default WORKDIR/analysis): analysis.json, step_S/cka_linear_t*.png,
step_S/probe.png, probe_by_step.png (alignment_by_step.png with an encoder) and TensorBoard events.
"""

import os

from absl import flags
from ml_collections import config_flags

from lsync_jax import cli
from lsync_jax.eval.analysis import MeasureSettings, analyze_workdir
from lsync_jax.train import writers

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's get_config() file (with the same overrides).")
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("out_dir", None, "Where to write (default: WORKDIR/analysis).")
flags.DEFINE_list("steps", [], "Checkpoint steps to measure (default: every checkpoint in the workdir).")
flags.DEFINE_enum("params", "ema", ["ema", "params"], "Which weights: the EMA (that samples) or the online ones.")
DEFAULTS = MeasureSettings()
flags.DEFINE_integer("num_samples", DEFAULTS.num_samples, "Examples measured (a seeded subset of the split).")
flags.DEFINE_list("t", [f"{t:g}" for t in DEFAULTS.t_values], "Noise levels (lsync-jax time: 1 is data, 0 is noise).")
flags.DEFINE_string("split", "", "Data split (default: the config's data.split).")
flags.DEFINE_integer("batch_size", DEFAULTS.batch_size, "Examples per forward pass (split over all devices).")
flags.DEFINE_integer("seed", DEFAULTS.seed, "Seed of the subset, the noise and the probe's train/test split.")
flags.DEFINE_integer("k", DEFAULTS.k, "Neighbours for mutual k-NN and CKNNA.")
flags.DEFINE_enum("condition", DEFAULTS.condition, ["null", "label"],
                  "Feed the null class (the image's representation alone) or the true labels (probes then read "
                  "the label off the adaLN conditioning).")
flags.DEFINE_string("encoder_path", "", "A DINOv2 file (torch hub .pth or HF) for mutual k-NN / CKNNA alignment.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    out_dir = FLAGS.out_dir or os.path.join(FLAGS.workdir, "analysis")
    settings = MeasureSettings(num_samples=FLAGS.num_samples, t_values=tuple(float(t) for t in FLAGS.t),
                               batch_size=FLAGS.batch_size, seed=FLAGS.seed, k=FLAGS.k, split=FLAGS.split,
                               condition=FLAGS.condition)
    import jax

    writer = writers.create_default_writer(out_dir, just_logging=jax.process_index() > 0)
    results = analyze_workdir(FLAGS.config, FLAGS.workdir, out_dir, settings,
                              steps=[int(s) for s in FLAGS.steps], which=FLAGS.params,
                              encoder_path=FLAGS.encoder_path, writer=writer)
    for step, measured in results["steps"].items():
        print(f"step {step}: probe accuracy per block (mean over t) "
              + " ".join(f"{b}:{a:.3f}" for b, a in zip(measured["blocks"], measured["probe_accuracy_mean"])))
    print(f"wrote {os.path.join(out_dir, 'analysis.json')} and the figures beside it")


if __name__ == "__main__":
    cli.run(main)
