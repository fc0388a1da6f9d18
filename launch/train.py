"""Train: python launch/train.py --config=configs/fashion_mnist.py --workdir=/tmp/run

--check runs every check a start makes (config, data, weights, storage access) on every process and
exits 0 before compiling: run it first on a pod, where a misconfigured job would otherwise fail only
after minutes of compiling.

--check --target=v5e-16 (any Cloud TPU accelerator type) compiles the run's programs for that slice on
this host (libtpu's compiler, the tpu-compile extra, Linux x86_64) from shapes alone, prints memory and
FLOPs per chip with estimated step time and MFU, and exits 1 when the run does not fit (docs/pods.md).
"""


from absl import app, flags, logging
from ml_collections import config_flags

from lsync_jax import cli
from lsync_jax.host import quiet_library_logs
from lsync_jax.recipes import PREEMPTED_EXIT_CODE, Preempted, check_run, train_and_evaluate
from lsync_jax.tools.fit import check_fit

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A get_config() file, e.g. configs/fashion_mnist.py.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and sample grids go (a local path or "
                    "gs://bucket/run). Required, except with --check --target.")
flags.DEFINE_bool("check", False, "Check the config, data, weights and storage access on every process, then exit "
                  "before compiling.")
flags.DEFINE_string("target", None, "With --check: compile the run's programs for this Cloud TPU accelerator type "
                    "(v5e-16, v5litepod-16, v4-32, v5p-64, v6e-8; 2xv5p-64 for two slices) on this host and say "
                    "whether they fit (exit 1 if not). Needs no data, weights or workdir; writes nothing.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    quiet_library_logs()
    if FLAGS.target:
        if not FLAGS.check:
            raise app.UsageError("--target is a fit check: give it with --check (nothing trains)")
        report = check_fit(FLAGS.config, FLAGS.target)
        print("\n".join(report.lines()), flush=True)
        return 0 if report.fits else 1
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (a local path or gs://bucket/run)")
    if FLAGS.check:
        logging.info("%s", check_run(FLAGS.config, FLAGS.workdir))
        return 0
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted:  # SIGTERM, checkpoint saved (logged): a code a scheduler requeues on (docs/training.md)
        return PREEMPTED_EXIT_CODE


if __name__ == "__main__":
    cli.run(main)
