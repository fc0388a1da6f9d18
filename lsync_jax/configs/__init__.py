"""The shipped configs: `get_config()` files, one per target, each starting from `base.base_config()`.

`python launch/train.py --config=configs/imagenet256.py` loads one by path (the repository's
`configs/` is this directory); Python code imports them as `lsync_jax.configs.<name>`. They import
model and objective definitions only, never training machinery. Beside them: `base.py` (every
default, the schema), `cli.py` (flag parsing) and `protocols.py`, the registry of paper protocols,
whose training configs are `paper.py:NAME`.
"""
