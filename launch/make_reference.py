"""An ADM-style reference batch (arr_0 uint8 NHWC, arr_1 labels, and the FID statistics mu, sigma, mu_s,
sigma_s) from your own images, for launch/evaluate.py --ref_batch and launch/reproduce.py --ref_batch.

    python launch/make_reference.py --images=/data/ILSVRC2012/train --image_size=256 --num=10000 --out=ref256.npz
    python launch/make_reference.py --latents=/data/imagenet256_latents --num=10000 --out=ref256.npz  # stored crops
    python launch/make_reference.py --tfds=imagenet2012 --tfds_dir=/data/tfds --split=validation --image_size=256 \\
        --num=50000 --order=first --out=val256.npz
    python launch/make_reference.py --config=configs/fashion_mnist.py --split=test --num=1000 --order=first --out=fm.npz

Class folders and tfds images are centre-cropped as ADM does (--image_size); stored crops are used as
they are. --order=random (default) takes a seeded random subset, as ADM's VIRTUAL_* batches are random
training images; --order=first the first --num in the source's order.
"""

from absl import flags
from ml_collections import config_flags

from lsync_jax import cli
from lsync_jax.tools.reference import ORDERS, make_reference_batch, open_source

FLAGS = flags.FLAGS
flags.DEFINE_string("images", "", "A class-folder tree root/<class>/<images> (ImageNet's train/).")
flags.DEFINE_string("latents", "", "launch/preprocess.py's output, made with --store_images.")
flags.DEFINE_string("tfds", "", "A tfds dataset prepared as ArrayRecord (never downloaded).")
flags.DEFINE_string("tfds_dir", "", "The tfds data_dir.")
config_flags.DEFINE_config_file("config", None, "Or: a training config whose data section gives the images.")
flags.DEFINE_string("split", "train", "The split (tfds, --config).")
flags.DEFINE_integer("image_size", None, "Centre-crop (ADM) to this size; required for images of several sizes.")
flags.DEFINE_integer("num", 10_000, "How many images.")
flags.DEFINE_enum("order", "random", list(ORDERS), "random: a seeded random subset; first: the first --num.")
flags.DEFINE_integer("seed", 0, "The subset's seed (--order=random).")
flags.DEFINE_string("out", None, "The reference batch .npz to write.")
flags.DEFINE_string("inception_weights", None, "Converted .npz or a PyTorch FID Inception file (default: cache).")
flags.DEFINE_integer("batch_size", 256, "Images per Inception batch.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out (refused otherwise).")
flags.mark_flags_as_required(["out"])


def main(argv):
    del argv
    source, what = open_source(images=FLAGS.images, latents=FLAGS.latents, tfds=FLAGS.tfds, tfds_dir=FLAGS.tfds_dir,
                               split=FLAGS.split, config=FLAGS.config)
    print(f"reference batch from {what}: {len(source):,} images, taking {FLAGS.num:,} ({FLAGS.order})")
    make_reference_batch(FLAGS.out, source, num=FLAGS.num, image_size=FLAGS.image_size, order=FLAGS.order,
                         seed=FLAGS.seed, weights_path=FLAGS.inception_weights, batch_size=FLAGS.batch_size,
                         overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    cli.run(main)
