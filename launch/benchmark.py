"""Benchmark the core on the present devices; prints a table and writes JSON.

    python launch/benchmark.py --models=SiT-XL/2,SiT-B/2 --batch_size=32 --out=bench.json
"""

from absl import app, flags

from lsync_jax.benchmark import BenchConfig, run, write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["SiT-B/2"], "Model names, e.g. SiT-XL/2,SiT-B/2.")
flags.DEFINE_integer("batch_size", 32, "Train-step batch size.")
flags.DEFINE_integer("input_size", 32, "Spatial size of the (latent) input.")
flags.DEFINE_integer("in_channels", 4, "Input channels (4 for SD-VAE latents).")
flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (parameters stay float32).")
flags.DEFINE_integer("steps", 10, "Timed train steps per row (after one warm-up).")
flags.DEFINE_integer("sample_steps", 50, "Sampler steps per row; 0 skips the sampler rows.")
flags.DEFINE_integer("sample_batch", 64, "Sampler batch size.")
flags.DEFINE_list("attention", ["auto"], "Attention implementations: auto (cuDNN where supported), xla, cudnn.")
flags.DEFINE_list("variants", ["baseline", "layersync"], "Train-step variants: baseline, layersync.")
flags.DEFINE_list("sample_cfg", ["1.0", "1.5"], "Guidance scales of the sampler rows.")
flags.DEFINE_string("out", "benchmark.json", "Where to write the JSON results.")


def main(argv):
    del argv
    cfg = BenchConfig(models=tuple(FLAGS.models), batch_size=FLAGS.batch_size, input_size=FLAGS.input_size,
                      in_channels=FLAGS.in_channels, num_classes=FLAGS.num_classes, dtype=FLAGS.dtype,
                      steps=FLAGS.steps, sample_steps=FLAGS.sample_steps, sample_batch=FLAGS.sample_batch,
                      attention=tuple(FLAGS.attention), variants=tuple(FLAGS.variants),
                      sample_cfg=tuple(float(s) for s in FLAGS.sample_cfg))
    write_json(run(cfg), FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
