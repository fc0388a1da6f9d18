"""A folder of .npy sequences (audio VAE latents, motion, any (steps, channels) features) -> shards.

    python launch/preprocess_sequences.py --npy_dir=/data/jamendo_latents --length=256 --out=/data/jamendo_seq \
        [--labels=/data/labels.json] [--tags=/data/tags.json --num_tags=50] [--nopad]

Longer sequences keep their first --length steps; shorter ones are zero-padded (the loader masks the
padding) unless --nopad, which refuses them. Resumable: run the same command again after an
interruption; finished shards are kept. Then train with --config.data.dir=OUT.
"""

from absl import flags, logging

from lsync_jax import cli
from lsync_jax.tools.preprocess_sequences import SequenceSpec, preprocess_sequences

FLAGS = flags.FLAGS
flags.DEFINE_string("npy_dir", None, "A folder of .npy files, each (steps, channels), searched recursively.")
flags.DEFINE_string("out", None, "Output directory of sequence shards (local or gs://).")
flags.DEFINE_integer("length", None, "Steps per stored sequence: longer ones are cut after it, shorter ones padded.")
flags.DEFINE_bool("pad", True, "Zero-pad shorter sequences and store their length (a mask); --nopad refuses them.")
flags.DEFINE_string("labels", "", "Optional JSON {id: class number} (id: the file's path under --npy_dir, no .npy).")
flags.DEFINE_string("tags", "", "Optional JSON {id: [tag ids]}, stored multi-hot.")
flags.DEFINE_integer("num_classes", 0, "With --labels: the class count (0: the largest label + 1).")
flags.DEFINE_integer("num_tags", 0, "With --tags: the multi-hot width (0: the largest tag id + 1).")
flags.DEFINE_integer("shard_size", 1024, "Sequences per shard (the unit of resumption).")
flags.DEFINE_integer("limit", 0, "> 0: only the first N files.")
flags.DEFINE_integer("num_workers", 8, "Threads reading files.")
flags.DEFINE_integer("process_index", 0, "Several hosts: this one's index (writes shards i, i + count, ...).")
flags.DEFINE_integer("process_count", 1, "Several hosts: how many share the work.")
flags.mark_flags_as_required(["npy_dir", "out", "length"])


def main(argv):
    del argv
    spec = SequenceSpec(length=FLAGS.length, pad=FLAGS.pad, shard_size=FLAGS.shard_size,
                        num_classes=FLAGS.num_classes, num_tags=FLAGS.num_tags, limit=FLAGS.limit,
                        num_workers=FLAGS.num_workers, process_index=FLAGS.process_index,
                        process_count=FLAGS.process_count)
    summary = preprocess_sequences(FLAGS.npy_dir, FLAGS.out, spec, labels_path=FLAGS.labels, tags_path=FLAGS.tags,
                                   log=logging.info)
    print(f"{summary['written']} shard(s) written, {summary['skipped']} kept, {summary['sequences']:,} sequences "
          f"in {summary['seconds']:.1f} s; metadata {summary['metadata']}")


if __name__ == "__main__":
    cli.run(main)
