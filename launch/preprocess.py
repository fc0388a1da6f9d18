"""ImageNet (or any class-folder tree / tfds dataset) -> SD-VAE latent shards for training.

    python launch/preprocess.py --images=/data/ILSVRC2012/train --vae=/models/sd-vae-ft-ema \
        --image_size=256 --out=/data/imagenet256_latents [--num_classes=1000] [--store_flip] [--store_images]
    python launch/preprocess.py --tfds_name=imagenet2012 --tfds_dir=/data/tfds --vae=... --out=...

Resumable: run the same command again after an interruption; finished shards are kept.
Then train with --config.data.dir=OUT.
"""


from absl import app, flags, logging

from lsync_jax import cli, storage
from lsync_jax.data.sources import ImageFolderSource, TfdsSource
from lsync_jax.tools.preprocess import PreprocessSpec, check_classes, preprocess_latents

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "An ImageNet-style class-folder tree (ILSVRC2012's train/).")
flags.DEFINE_string("tfds_name", None, "Or a tfds dataset prepared as ArrayRecord, e.g. imagenet2012.")
flags.DEFINE_string("tfds_dir", None, "The tfds data_dir holding --tfds_name.")
flags.DEFINE_string("split", "train", "tfds split.")
flags.DEFINE_string("vae", None, "diffusers AutoencoderKL weights: a file or directory (sd-vae-ft-ema).")
flags.DEFINE_string("out", None, "Output directory of latent shards.")
flags.DEFINE_integer("image_size", 256, "Centre-crop size in pixels (256 or 512).")
flags.DEFINE_integer("shard_size", 1024, "Images per shard (the unit of resumption).")
flags.DEFINE_integer("batch_size", 64, "Images per encoder call, split over this process's devices.")
flags.DEFINE_bool("store_flip", False, "Also store the encoding of the mirrored crop (exact random flips).")
flags.DEFINE_bool("store_images", False, "Also store the uint8 crops (REPA encoders, probes, FID references).")
flags.DEFINE_integer("num_workers", 16, "Threads decoding and cropping images.")
flags.DEFINE_integer("num_classes", None, "The classes the data must have (e.g. 1000 for ImageNet); checked before "
                     "the VAE loads. Default: not checked (the classes found are logged).")
flags.DEFINE_integer("limit", 0, "> 0: only the first N images.")
flags.DEFINE_string("encoder_path", "", "REPA: also store DINOv2's tokens of each crop (torch hub or Hugging Face "
                    "weights), so training runs no encoder (--config.objective.repa.precomputed=True).")
flags.DEFINE_integer("encoder_grid", 0, "Their token grid, the diffusion model's (0: latent side / 2, as SiT-*/2).")
flags.DEFINE_integer("process_index", -1, "Several hosts: this one's index (writes shards i, i + count, ...).")
flags.DEFINE_integer("process_count", -1, "Several hosts: how many share the work (-1: JAX's, 1 without "
                     "jax.distributed).")
flags.mark_flags_as_required(["vae", "out"])


def main(argv):
    del argv
    if (FLAGS.images is None) == (FLAGS.tfds_name is None):
        raise app.UsageError("give exactly one of --images (class-folder tree) or --tfds_name")
    if not storage.exists(FLAGS.vae):  # before listing a million files (local or gs://)
        raise FileNotFoundError(f"--vae={FLAGS.vae!r} not found (diffusers AutoencoderKL weights, file or directory)")
    if FLAGS.images is not None:
        source = ImageFolderSource(FLAGS.images)
        info = {"kind": "folder", "path": source.root, "num_classes": len(source.classes),
                "classes": list(source.classes)}
    else:
        source = TfdsSource(FLAGS.tfds_name, split=FLAGS.split, data_dir=FLAGS.tfds_dir)
        info = {"kind": "tfds", "name": FLAGS.tfds_name, "split": FLAGS.split, "path": FLAGS.tfds_dir,
                "num_classes": len(source.classes)}
    check_classes(source, FLAGS.num_classes, log=logging.info)  # before the VAE loads or anything is written
    spec = PreprocessSpec(image_size=FLAGS.image_size, shard_size=FLAGS.shard_size, batch_size=FLAGS.batch_size,
                          store_flip=FLAGS.store_flip, store_images=FLAGS.store_images,
                          num_workers=FLAGS.num_workers, limit=FLAGS.limit, encoder_path=FLAGS.encoder_path,
                          encoder_grid=FLAGS.encoder_grid, process_index=FLAGS.process_index,
                          process_count=FLAGS.process_count)
    summary = preprocess_latents(source, FLAGS.out, FLAGS.vae, spec, info, log=logging.info)
    print(f"{summary['written']} shard(s) written, {summary['skipped']} kept, {summary['images']:,} images "
          f"in {summary['seconds']:.1f} s ({summary['images_per_second']:.1f} img/s after the first batch); "
          f"metadata {summary['metadata']}")


if __name__ == "__main__":
    cli.run(main)
