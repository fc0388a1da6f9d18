"""The walk of a config through `train_and_evaluate`: how many times each builder runs, and how often
the path returns to a module it left.

    JAX_PLATFORMS=cpu python tools/walk_config.py [--config=configs/tiny.py] [--json=walk.json]

A profile hook records every call into lsync_jax while a tiny run trains (a fresh workdir: a start,
not a resume). Builders are the functions that turn config into objects or check it
(`build_*`, `make_*`, `create_*`, `validate_*`, `check_*`, `setup`, `abstract_state`, ...). The path
is the sequence of lsync_jax modules entered by calls at most DEPTH lsync_jax frames below
`train_and_evaluate`, consecutive repeats collapsed; a return is a visit to a module the path had left.
The closing note of issue 29 compares this before and after the restructuring.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import tempfile

DEPTH = 5  # train_and_evaluate -> run_phases -> train -> setup -> its callees
BUILDER_PREFIXES = ("build_", "make_", "create_", "validate_", "check_", "setup", "abstract_state", "get_model")


def walk(config, workdir: str) -> dict:
    from lsync_jax.recipes import train_and_evaluate

    builders: collections.Counter = collections.Counter()
    path: list[str] = []
    depth = [0]
    inside = [False]

    def profile(frame, event, arg):
        if event not in ("call", "return"):
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("lsync_jax"):
            return
        name = frame.f_code.co_name
        if event == "call":
            if name == "train_and_evaluate":
                inside[0] = True
            if not inside[0]:
                return
            depth[0] += 1
            if name.startswith(BUILDER_PREFIXES) and not name.startswith("check_finite"):
                builders[f"{module}.{name}"] += 1
            if depth[0] <= DEPTH and (not path or path[-1] != module):
                path.append(module)
        else:
            if inside[0]:
                depth[0] -= 1
            if name == "train_and_evaluate":
                inside[0] = False

    sys.setprofile(profile)
    try:
        train_and_evaluate(config, workdir)
    finally:
        sys.setprofile(None)
    visits = collections.Counter(path)
    return {"builders": dict(sorted(builders.items())), "path": path,
            "returns": sum(v - 1 for v in visits.values()),
            "returns_by_module": {m: v - 1 for m, v in sorted(visits.items()) if v > 1},
            "validate_config": sum(v for k, v in builders.items() if k.endswith(".validate_config"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lsync_jax/configs/tiny.py")
    parser.add_argument("--json", default=None, help="also write the walk here")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("walk_config_file", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.num_steps = 2
    with tempfile.TemporaryDirectory() as workdir:
        result = walk(config, os.path.join(workdir, "run"))
    print(f"{'builder':70s} calls")
    for name, count in result["builders"].items():
        print(f"{name:70s} {count}")
    print(f"\npath (depth <= {DEPTH}): {len(result['path'])} module visits, {result['returns']} returns to a module "
          "it had left")
    for name, count in result["returns_by_module"].items():
        print(f"  {name:68s} {count}")
    print("path: " + " > ".join(m.removeprefix("lsync_jax.") for m in result["path"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
