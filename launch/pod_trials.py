"""Measure what pod-scale training rests on, on this machine; prints the rows and writes JSON.

    python launch/pod_trials.py --parts=storage,preemption,elastic,kills --trials=5 --out=pod_trials.json

storage: GCS round trips (the localhost emulator) and local disk; preemption: two JAX processes, one
SIGTERMed, the cost of the per-step sync point; elastic: 1 -> 2 -> 1 processes against a straight
run; kills: runs SIGKILLed at random moments, then resumed (local disk and a bucket); hold: the workdir
hold of a 2-process run in a bucket under 20 SIGKILLs (about 10 minutes; not in the default parts).
"""


from absl import app, flags

from lsync_jax import cli
from lsync_jax.storage import write_json_atomic
from lsync_jax.tools.pod_trials import PARTS, run

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", ["storage", "preemption", "elastic", "kills"], f"What to measure, of {', '.join(PARTS)}.")
flags.DEFINE_integer("trials", 5, "Kill trials per storage (local disk, bucket).")
flags.DEFINE_string("out", "pod_trials.json", "Where to write the JSON results.")


def main(argv):
    del argv
    unknown = sorted(set(FLAGS.parts) - set(PARTS))
    if unknown:
        raise app.UsageError(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    result = run(FLAGS.parts, trials=FLAGS.trials)
    write_json_atomic(FLAGS.out, result)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
