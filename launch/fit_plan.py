"""Which levers fit a config on a Cloud TPU slice, fastest first (compiled on this host, libtpu's compiler):

    python launch/fit_plan.py --config=configs/imagenet256.py --target=v5e-8 --out=/tmp/plan.json

prunes the candidates (mesh data x fsdp, remat, microbatches, Adam's first-moment dtype) analytically,
compiles the train step of those left in order of predicted speed until --want of them fit, and prints
a table, best (fastest by the compiler's estimate) first. Each compiled cell is cached as JSON in
--cache_dir, so a search stops and resumes. docs/pods.md's table is

    python launch/fit_plan.py --table=imagenet256,imagenet256_repa,imagenet256_uvit,imagenet512 \
        --target=v5e-8,v5e-16,v5p-8,v6e-8

(shipped configs by name; cells already compiled are read back, the rest compiled). Every time is a
compiler estimate; nothing is measured on a TPU.
"""

import importlib
import json
import os

from absl import flags
from ml_collections import config_flags

from lsync_jax import cli, storage
from lsync_jax.tools.fit_plan import markdown_table, plan, plan_lines, plans

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A get_config() file, e.g. configs/imagenet256.py.",
                                lock_config=True)
flags.DEFINE_list("target", None, "Cloud TPU accelerator type(s): v5e-8, v5litepod-16, v4-32, v5p-64, v6e-8, ...")
flags.DEFINE_list("table", None, "Shipped config names (lsync_jax/configs/NAME.py): print the markdown table of the "
                  "best plan for each config x target.")
flags.DEFINE_string("cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "lsync_jax", "fit"),
                    "Where compiled cells are cached (local or gs://).")
flags.DEFINE_string("out", None, "Write the plan(s) as JSON here.")
flags.DEFINE_integer("max_compiles", 6, "Compile at most this many new cells per config and target (0: only read "
                     "the cache).")
flags.DEFINE_integer("want", 2, "Stop once this many candidates fit (per config and target).")
flags.DEFINE_integer("num_steps", 400_000, "The table's days are to this many steps (the protocols' 400K).")
flags.mark_flags_as_required(["target"])


def main(argv):
    del argv
    if bool(FLAGS.table) == bool(FLAGS.config):
        raise ValueError("give either --config (one plan per target) or --table=NAME,... (shipped configs)")
    kw = dict(max_compiles=FLAGS.max_compiles, want=FLAGS.want)
    if FLAGS.table:
        configs = [(name, importlib.import_module(f"lsync_jax.configs.{name}").get_config()) for name in FLAGS.table]
        results = plans(configs, FLAGS.target, FLAGS.cache_dir, **kw)
        print("\n".join(markdown_table(results, FLAGS.target, FLAGS.num_steps)))
        payload = {f"{name} {target}": result for (name, target), result in results.items()}
    else:
        payload = {}
        for target in FLAGS.target:
            result = plan(FLAGS.config, target, FLAGS.cache_dir, **kw)
            print("\n".join(plan_lines(result)))
            payload[target] = result
    if FLAGS.out:
        storage.write_json_atomic(FLAGS.out, json.loads(json.dumps(payload, default=str)))
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
