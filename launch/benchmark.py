"""Benchmark the core on the present devices; prints a table and writes JSON.

    python launch/benchmark.py --models=SiT-XL/2,SiT-B/2 --batch_size=32 --out=bench.json
    python launch/benchmark.py --config=configs/imagenet256.py --config.data.batch_size=32
    python launch/benchmark.py --models= --sample_steps=0 --inception_batch=256 --fid_samples=10000  # evaluator only
    python launch/benchmark.py --models= --sample_steps=0 --vae_batch=64 --image_size=256  # SD-VAE only
    python launch/benchmark.py --variants= --sample_steps=0 --checkpoint=local,emulator  # checkpoint cost only
    python launch/benchmark.py --config=configs/moving_fmnist.py --sample_steps=0  # the video demo's model and batch
    python launch/benchmark.py --models=SiT-Video-S/2x8,SiT-Seq-S/1 --input_size=32 --in_channels=1 --num_frames=8
        # clips of 8 frames of 32x32x1; sequences of 32 steps of 1 channel (--input_size is L for SiT-Seq-*)
"""


from absl import flags
from ml_collections import config_flags

from lsync_jax import cli
from lsync_jax.host import set_cpu_devices
from lsync_jax.tools.benchmark import BenchConfig, bench_config_from, run, write_json

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Optional training config: benchmark its model, batch and "
                                "LayerSync pairs (overrides --models, --batch_size, --dtype, shapes), on its "
                                "distributed.cpu_devices CPU devices.")
flags.DEFINE_list("models", ["SiT-B/2"], "Model names, e.g. SiT-XL/2,SiT-B/2.")
flags.DEFINE_integer("batch_size", 32, "Train-step batch size.")
flags.DEFINE_integer("input_size", 32, "Spatial size H = W of the (latent) images and clips; the length L of "
                     "sequences (SiT-Seq-*).")
flags.DEFINE_integer("in_channels", 4, "Input channels (4 for SD-VAE latents; C of sequences).")
flags.DEFINE_integer("num_frames", 0, "Frames per clip of video models (SiT-Video-*); 0: the model's default (8).")
flags.DEFINE_integer("num_classes", 1000, "Number of classes.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (parameters stay float32).")
flags.DEFINE_integer("steps", 10, "Timed train steps per row (after one warm-up).")
flags.DEFINE_integer("sample_steps", 50, "Sampler steps per row; 0 skips the sampler rows.")
flags.DEFINE_integer("sample_batch", 64, "Sampler batch size.")
flags.DEFINE_list("attention", ["auto"], "Attention implementations: auto (cuDNN where supported), xla, cudnn.")
flags.DEFINE_list("variants", ["baseline", "layersync"], "Train-step variants: baseline, layersync, repa, "
                  "layersync+repa (REPA variants add a DINOv2-B/14 encoder row), diversity, layersync+diversity "
                  "(DiverseDiT's loss over all blocks).")
flags.DEFINE_list("sample_cfg", ["1.0", "1.5"], "Guidance scales of the sampler rows.")
flags.DEFINE_integer("inception_batch", 0, "> 0: time the FID Inception pass on batches of this size.")
flags.DEFINE_integer("fid_samples", 0, "> 0: time a whole FID-N evaluation of this many images.")
flags.DEFINE_integer("vae_batch", 0, "> 0: time SD-VAE encode and decode on batches of this size.")
flags.DEFINE_integer("image_size", 256, "Pixel size of the images fed to the evaluator and VAE rows.")
flags.DEFINE_list("checkpoint", [], "Where to time saving and restoring each model's train state, and its train "
                  "step while a save runs: local (a temporary directory), emulator (gs:// on a local GCS emulator), "
                  "or directories / URLs (e.g. gs://bucket/tmp; a fresh folder under each, removed after).")
flags.DEFINE_integer("checkpoint_repeats", 3, "Saves and restores per checkpoint row (the median is reported).")
flags.DEFINE_integer("checkpoint_steps", 10, "Train steps timed with no save in flight, against those during "
                     "the saves; 0 skips the step rows.")
flags.DEFINE_string("official_dir", "", "A checkout of vita-epfl/LayerSync (needs torch, timm, torchdiffeq): time its "
                    "PyTorch train step against ours on the CPU comparison anchor (depth 6, hidden 192, batch 64, "
                    "28x28x1 patch 4, fp32, LayerSync 2 -> 4, EMA on both), interleaved rounds.")
flags.DEFINE_integer("official_rounds", 5, "Interleaved rounds of the official comparison (the median is reported).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads for the official step (0: torch's default).")
flags.DEFINE_integer("cpu_devices", -1, "Split the CPU into this many data-parallel devices before JAX starts, as "
                     "config.distributed.cpu_devices does for a run (-1: the --config's, else JAX's default).")
flags.DEFINE_string("out", "benchmark.json", "Where to write the JSON results.")


def main(argv):
    del argv
    common = dict(steps=FLAGS.steps, sample_steps=FLAGS.sample_steps, sample_batch=FLAGS.sample_batch,
                  attention=tuple(FLAGS.attention), variants=tuple(FLAGS.variants),
                  sample_cfg=tuple(float(s) for s in FLAGS.sample_cfg), inception_batch=FLAGS.inception_batch,
                  fid_samples=FLAGS.fid_samples, image_size=FLAGS.image_size, vae_batch=FLAGS.vae_batch,
                  checkpoint=tuple(FLAGS.checkpoint), checkpoint_repeats=FLAGS.checkpoint_repeats,
                  checkpoint_steps=FLAGS.checkpoint_steps, official_dir=FLAGS.official_dir,
                  official_rounds=FLAGS.official_rounds, torch_threads=FLAGS.torch_threads)
    cpu_devices = FLAGS.cpu_devices
    if cpu_devices == -1 and FLAGS.config is not None:
        cpu_devices = int(FLAGS.config.distributed.cpu_devices)  # as training splits the CPU
    set_cpu_devices(cpu_devices)  # before any JAX call
    if FLAGS.config is not None:
        cfg = bench_config_from(FLAGS.config, **common)
    else:
        cfg = BenchConfig(models=tuple(FLAGS.models), batch_size=FLAGS.batch_size, input_size=FLAGS.input_size,
                          in_channels=FLAGS.in_channels, num_frames=FLAGS.num_frames, num_classes=FLAGS.num_classes,
                          dtype=FLAGS.dtype, **common)
    write_json(run(cfg), FLAGS.out)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
