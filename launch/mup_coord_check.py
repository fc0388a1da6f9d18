"""muP coordinate check: SiTs of several widths (fixed head dimension), sp and mup, a few Adam steps on
one batch; prints each layer's mean |activation| per width and step, writes a plot and a JSON.

    python launch/mup_coord_check.py --out_dir=/tmp/coord      # widths 64..512, 4 steps, 3 seeds

Under muP each curve of coord_check.png is flat in the width; under sp (same learning rate) the
later steps grow with the width. See lsync_jax/train/coord_check.py.
"""

import os

from absl import flags

from lsync_jax import cli
from lsync_jax.tools.coord_check import (
    CoordCheckSetup,
    coord_check,
    format_table,
    plot_coord_check,
    write_json,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "/tmp/mup_coord_check", "Where coord_check.png and coord_check.json go.")
flags.DEFINE_list("widths", ["64", "128", "256", "512"], "Hidden sizes (multiples of head_dim); the smallest is "
                  "muP's base width.")
flags.DEFINE_list("parametrizations", ["sp", "mup"], "Parametrisations to compare.")
flags.DEFINE_integer("num_steps", 4, "Adam steps (activations are recorded after 0 .. num_steps of them).")
flags.DEFINE_integer("num_seeds", 3, "Seeds averaged per width.")
flags.DEFINE_integer("head_dim", 16, "Fixed head dimension: width grows by heads.")
flags.DEFINE_integer("depth", 2, "Blocks.")
flags.DEFINE_integer("image_size", 8, "Input height = width (4 channels, patch 2).")
flags.DEFINE_integer("batch_size", 16, "The one training batch.")
flags.DEFINE_float("lr", 1e-2, "Base Adam learning rate, the same for every width and parametrisation.")
flags.DEFINE_float("output_multiplier", 1.0, "muP readout multiplier.")


def main(argv):
    del argv
    setup = CoordCheckSetup(head_dim=FLAGS.head_dim, depth=FLAGS.depth, image_size=FLAGS.image_size,
                            batch_size=FLAGS.batch_size, lr=FLAGS.lr, output_multiplier=FLAGS.output_multiplier)
    records = coord_check([int(w) for w in FLAGS.widths], FLAGS.parametrizations, num_steps=FLAGS.num_steps,
                          num_seeds=FLAGS.num_seeds, setup=setup)
    print(format_table(records))
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    plot_coord_check(records, os.path.join(FLAGS.out_dir, "coord_check.png"))
    write_json(records, setup, os.path.join(FLAGS.out_dir, "coord_check.json"))
    print(f"wrote {FLAGS.out_dir}/coord_check.png and coord_check.json")


if __name__ == "__main__":
    cli.run(main)
