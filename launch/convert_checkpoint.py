"""Convert an official PyTorch SiT / LayerSync / REPA checkpoint into a workdir-like directory that
launch/sample.py (--workdir=OUT) and training (--config.train.init_from=OUT) read.

    python launch/convert_checkpoint.py --checkpoint=SiT-XL-2-256x256.pt --model=SiT-XL/2 --out=/runs/sit_xl2
    python launch/convert_checkpoint.py --checkpoint=repa/last.pt --model=SiT-XL/2 --out=/runs/repa_xl2 \
        --override encoder_depth=8
"""

import ast

from absl import app, flags

from lsync_jax import cli
from lsync_jax.porting.official import CHECKPOINT_KEYS, CONVENTIONS
from lsync_jax.tools.convert import convert_to_workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Official .pt/.pth/.safetensors file: a raw state dict or a training "
                    "checkpoint {'model', 'ema', ...}.")
flags.DEFINE_string("model", None, "Model name, e.g. SiT-XL/2.")
flags.DEFINE_string("out", None, "Output directory (OUT/checkpoints must be empty or absent).")
flags.DEFINE_enum("which", "ema", CHECKPOINT_KEYS, "Entry of a training checkpoint to convert.")
flags.DEFINE_enum("convention", "auto", CONVENTIONS, "'sit' (SiT, LayerSync: t = 1 data), 'repa' (t = 0 data, "
                  "folded into the weights) or 'auto' (REPA when the file has projectors).")
flags.DEFINE_multi_string("override", [], "Model override key=value (a Python literal, else a string), "
                          "e.g. depth=4 or z_dims='(768,)'; repeatable.")
flags.DEFINE_bool("allow_pickle", False, "torch.load with weights_only=False (only for files you trust).")
flags.mark_flags_as_required(["checkpoint", "model", "out"])


def parse_override(text):
    key, sep, value = text.partition("=")
    if not sep:
        raise app.UsageError(f"--override {text!r} is not key=value")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def main(argv):
    del argv
    overrides = dict(parse_override(text) for text in FLAGS.override)
    done = convert_to_workdir(FLAGS.checkpoint, FLAGS.model, FLAGS.out, which=FLAGS.which,
                              convention=FLAGS.convention, allow_pickle=FLAGS.allow_pickle, **overrides)
    print(f"converted {FLAGS.checkpoint} ({done['source']}, {done['convention']} convention) into {done['model']} "
          f"with {done['num_params']:,} parameters: {done['checkpoint_dir']}")
    flags_needed = [f"--config.model.name={done['model']}"]
    flags_needed += [f"--config.model.overrides.{k}=" + (f'"{v}"' if isinstance(v, tuple) else str(v))
                     for k, v in sorted(done["overrides"].items())]
    print("the checkpoint records this model; a config must name exactly these overrides (ml_collections only "
          "sets keys the config file defines):\n  " + " \\\n  ".join(flags_needed))
    if done["transport"]:
        print("trained with (from the file's args, recorded in the workdir: sampling or fine-tuning it with another "
              "transport is refused): " + " ".join(f"--config.transport.{k}={v}"
                                                  for k, v in sorted(done["transport"].items())))
    print(f"sample: python launch/sample.py --config=... --workdir={FLAGS.out}; "
          f"fine-tune: --config.train.init_from={FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
