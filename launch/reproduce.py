"""A paper's number, measured on our run: sample as the protocol says, evaluate, print ours beside it.

    python launch/reproduce.py --list                                   # every protocol, with the paper's value
    python launch/reproduce.py --protocol=layersync-sit-xl2-400k-heun --workdir=/runs/layersync_xl2 \\
        --ref_batch=/data/VIRTUAL_imagenet256_labeled.npz
    python launch/reproduce.py --protocol=sit-xl2-7m-sde --workdir=/ckpt/sit_xl2_converted \\
        --ref_batch=/data/VIRTUAL_imagenet256_labeled.npz               # a converted official checkpoint

Sampling is resumable: rerun the same command after a kill (same devices and --batch_size).
`--set.KEY=VALUE` changes a protocol setting, as `--config.KEY=VALUE` changes a config
(--set.num_samples=10000 --set.sampler.method=heun --set.guidance_interval=0.3,1.0; the older
--set=num_samples=10000 still works); the result is then marked "not comparable" and goes to its own
directory (WORKDIR/protocols/NAME-custom-<hash>). The run's config defaults to the protocol's
(configs/paper.py:NAME); pass --config for a run trained with another one.
"""

from absl import app, flags
from ml_collections import config_flags

from lsync_jax import cli
from lsync_jax.configs.cli import define_inline_config
from lsync_jax.configs.protocols import PROTOCOLS, settings_template
from lsync_jax.eval.reproduce import reproduce

FLAGS = flags.FLAGS
flags.DEFINE_string("protocol", None, "The protocol's name (--list prints them).")
flags.DEFINE_bool("list", False, "Print every protocol with the paper's value, and exit.")
flags.DEFINE_string("workdir", None, "The run's workdir, or the directory launch/convert_checkpoint.py wrote.")
config_flags.DEFINE_config_file("config", None, "The run's get_config() file (default: configs/paper.py:PROTOCOL).")
flags.DEFINE_string("ref_batch", None, "The ADM reference batch the protocol names "
                    "(e.g. VIRTUAL_imagenet256_labeled.npz).")
flags.DEFINE_string("out_dir", None, "Where samples and results go (default: WORKDIR/protocols/PROTOCOL).")
define_inline_config("set", settings_template(), "--set.KEY=VALUE changes a protocol setting (num_samples, cfg_scale, "
                     "guidance_interval, class_balance, seed, sampler.<field>); the result is marked not comparable.")
flags.DEFINE_integer("batch_size", 250, "Samples per batch, over all devices (keep it for a resume).")
flags.DEFINE_integer("eval_batch_size", 256, "Images per Inception batch.")
flags.DEFINE_string("inception_weights", None, "Converted .npz or a PyTorch FID Inception file (default: cache).")
flags.DEFINE_bool("skip_small_metrics", False, "Skip a metric (never the protocol's) that the sample or reference "
                  "count is too small for, with one line, instead of refusing before sampling.")
flags.DEFINE_enum("fid_method", "sqrtm", ["sqrtm", "eigh"], "sqrtm: ADM's; eigh: the same trace, faster.")


def main(argv):
    del argv
    if FLAGS.list:
        for name in sorted(PROTOCOLS):
            print(f"{name}\n    {PROTOCOLS[name].describe()}")
        return
    if not FLAGS.protocol or not FLAGS.workdir:
        raise app.UsageError("--protocol and --workdir are required (or --list)")
    overrides = config_flags.get_override_values(FLAGS["set"])  # {'sampler.method': 'heun', ...}: what was given
    reproduce(FLAGS.protocol, FLAGS.workdir, config=FLAGS.config, ref_batch=FLAGS.ref_batch, out_dir=FLAGS.out_dir,
              overrides=overrides, batch_size=FLAGS.batch_size, weights_path=FLAGS.inception_weights,
              eval_batch_size=FLAGS.eval_batch_size, fid_method=FLAGS.fid_method,
              skip_small_metrics=FLAGS.skip_small_metrics)


if __name__ == "__main__":
    cli.run(main)
