"""The walk of a config through `train_and_evaluate`: which functions take it (or a section of it), how
many times each runs, and how often the walk returns to a module it left.

    JAX_PLATFORMS=cpu python tools/walk_config.py [--config=lsync_jax/configs/tiny.py] [--json=walk.json]

A profile hook sees every call into lsync_jax while a tiny run trains two steps (a fresh workdir: a
start, not a resume). A call is part of the walk when one of its arguments is a ConfigDict (the config
or one of its sections): that is where the config is read and turned into pieces (dataclass constructors left out). The path is the
sequence of modules of those calls, consecutive repeats collapsed; a return is a visit to a module the
path had left. The closing note of issue 29 compares this before and after the restructuring.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import sys
import tempfile

import ml_collections


def _takes_config(frame) -> bool:
    code = frame.f_code
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    return any(isinstance(frame.f_locals.get(name), ml_collections.ConfigDict) for name in names)


def walk(config, workdir: str) -> dict:
    from lsync_jax.recipes import train_and_evaluate

    calls: collections.Counter = collections.Counter()
    path: list[str] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if module.startswith("lsync_jax") and frame.f_code.co_name != "__init__" and _takes_config(frame):
            calls[f"{module}.{frame.f_code.co_qualname}"] += 1
            if not path or path[-1] != module:
                path.append(module)

    sys.setprofile(profile)
    try:
        train_and_evaluate(config, workdir)
    finally:
        sys.setprofile(None)
    visits = collections.Counter(path)
    return {"calls": dict(sorted(calls.items())), "path": path,
            "returns": sum(v - 1 for v in visits.values()),
            "returns_by_module": {m: v - 1 for m, v in sorted(visits.items()) if v > 1}}


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
    print(f"{'function taking the config or a section':80s} calls")
    for name, count in result["calls"].items():
        print(f"{name:80s} {count}")
    print(f"\n{sum(result['calls'].values())} calls of {len(result['calls'])} functions; path: "
          f"{len(result['path'])} module visits, {result['returns']} returns to a module it had left")
    for name, count in result["returns_by_module"].items():
        print(f"  {name:78s} {count}")
    print("path: " + " > ".join(m.removeprefix("lsync_jax.") for m in result["path"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
