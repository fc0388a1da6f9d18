"""The batch's keys are declared (lsync_jax.objectives.batch.Batch): every key the package reads or writes on a
batch is a declared field, and an undeclared one fails where it is written, not silently downstream."""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsync_jax.data import LoaderSpec, SyntheticSource, global_batch, make_loader
from lsync_jax.data.pipeline import EXTRA_FIELDS
from lsync_jax.models import get_model
from lsync_jax.objectives import REPA, Objective, objective_loss
from lsync_jax.objectives.batch import FIELDS, FILLED_BY, Batch, check_fields, make_batch
from lsync_jax.objectives.repa import FEATURES_KEY
from lsync_jax.sharding import batch_sharding, make_mesh
from lsync_jax.train.encoders import EncoderFeatures
from lsync_jax.transport import Transport

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lsync_jax"
# Names a batch goes by in the package (`batch`, `reg_batch`, `part_batch`, a source's `example`).
BATCH_NAME = re.compile(r"(^|_)batch$|^example$")


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


_CONSTANTS: dict[str, str] = {}  # the scanned module's string constants (FEATURES_KEY = "encoder_features")


def _key(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return _CONSTANTS.get(node.id)
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def batch_keys(tree: ast.Module):
    """(key, line) for every string key (a literal or a module's string constant) read or written on a
    batch-named variable, and every key of the dict an example-making function (`example`, `image_example`,
    ...) returns."""
    _CONSTANTS.clear()
    _CONSTANTS.update({t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                       and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                       for t in n.targets if isinstance(t, ast.Name)})
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and BATCH_NAME.search(_name(node.value)) and _key(node.slice):
            yield _key(node.slice), node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("get", "pop", "setdefault") and BATCH_NAME.search(_name(node.func.value)) \
                    and node.args and _key(node.args[0]):
                yield _key(node.args[0]), node.lineno
            if node.func.attr == "update" and BATCH_NAME.search(_name(node.func.value)):
                for arg in node.args:
                    if isinstance(arg, ast.Dict):
                        yield from ((_key(k), node.lineno) for k in arg.keys if k is not None and _key(k))
                yield from ((kw.arg, node.lineno) for kw in node.keywords if kw.arg)
        elif isinstance(node, ast.Call) and _name(node.func) in ("dict", "make_batch", "Batch") and node.args \
                and BATCH_NAME.search(_name(node.args[0])):
            yield from ((kw.arg, node.lineno) for kw in node.keywords if kw.arg)
        elif isinstance(node, ast.Compare) and _key(node.left) and len(node.ops) == 1 \
                and isinstance(node.ops[0], (ast.In, ast.NotIn)) and BATCH_NAME.search(_name(node.comparators[0])):
            yield _key(node.left), node.lineno
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) \
                and any(BATCH_NAME.search(_name(t)) for t in node.targets):
            yield from ((_key(k), node.lineno) for k in node.value.keys if k is not None and _key(k))
        elif isinstance(node, ast.FunctionDef) and node.name.endswith("example"):
            yield from _example_keys(node)
        if isinstance(node, ast.Assign) and any(_name(t) == "example_keys" for t in node.targets):
            # a data source's declared example keys (lsync_jax.data.registry.DataSource)
            yield from ((_key(c), node.lineno) for c in ast.walk(node.value) if _key(c))


def _example_keys(func: ast.FunctionDef):
    """The keys of what an example-making function returns: dict literals returned or assigned to the returned
    name, and the returned name's string subscripts."""
    returned = {_name(n.value) for n in ast.walk(func) if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)}
    for node in ast.walk(func):
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
            yield from ((_key(k), node.lineno) for k in node.value.keys if k is not None and _key(k))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) \
                and any(_name(t) in returned for t in node.targets):
            yield from ((_key(k), node.lineno) for k in node.value.keys if k is not None and _key(k))
        elif isinstance(node, ast.Subscript) and _name(node.value) in returned and _key(node.slice):
            yield _key(node.slice), node.lineno


def test_every_batch_key_in_the_package_is_declared():
    found, wrong = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        for key, line in batch_keys(ast.parse(path.read_text())):
            found += 1
            if key not in FIELDS:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {key!r}")
    assert found > 30  # the scan sees the data, encoder, objective and regulariser code
    assert not wrong, f"keys on a batch that lsync_jax.objectives.batch.Batch does not declare ({sorted(FIELDS)}):\n" \
        + "\n".join(wrong)


def test_the_scan_finds_a_misspelt_key():
    code = ("def f(batch, reg_batch):\n    batch.get('stpe')\n    reg_batch['token_msk'] = 1\n"
            "    return dict(batch, encoder_feature=2)\n"
            "def example(record):\n    out = {'x': 1, 'label': 2}\n    out['tag'] = 3\n    return out\n")
    keys = {k for k, _ in batch_keys(ast.parse(code))}
    assert keys - FIELDS == {"stpe", "token_msk", "encoder_feature", "label", "tag"}


def test_every_field_says_who_fills_it():
    assert set(FILLED_BY) == FIELDS and FEATURES_KEY in FIELDS and set(EXTRA_FIELDS) <= FIELDS
    assert Batch.__required_keys__ == {"x", "y"}
    doc = pathlib.Path(PACKAGE / "objectives" / "batch.py").read_text()
    assert all(f"| `{field}`" in doc for field in FIELDS)  # the docstring's table names each


def test_an_undeclared_key_fails_where_it_is_written():
    with pytest.raises(KeyError, match=r"undeclared key\(s\) \['labels'\]"):
        make_batch({"x": 0, "labels": 1}, "here")
    with pytest.raises(KeyError, match="here"):
        check_fields(("x", "stpe"), "here")
    assert make_batch({"x": 0, "y": 1}, "here") == {"x": 0, "y": 1}


def _tiny():
    model = get_model("SiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3, num_classes=4,
                      learn_sigma=False, z_dims=(16,), encoder_depth=1, projector_dim=32)
    params = model.init(jax.random.key(0), *model.init_inputs(1))["params"]
    return model, params


def test_objective_loss_refuses_a_misspelt_key_at_trace_time():
    model, params = _tiny()
    objective = Objective(Transport(), ())
    batch = {"x": jnp.zeros((2, 8, 8, 3)), "y": jnp.zeros((2,), jnp.int32), "tag": jnp.zeros((2, 3))}
    with pytest.raises(KeyError, match=r"\['tag'\]"):
        objective_loss(params, model.apply, batch, jax.random.key(0), objective)


def test_loader_encoder_and_objective_fill_declared_keys_only():
    """The path a training batch takes (loader -> global batch -> encoder -> objective -> regularisers), keys
    checked at each step, on a tiny image model with REPA's projector."""
    model, params = _tiny()
    mesh = make_mesh()
    loader = make_loader(SyntheticSource(8, (8, 8, 3), 4), LoaderSpec(4, seed=0, fields=("image",)),
                         process_index=0, process_count=1)
    local = next(iter(loader))
    assert set(local) == {"x", "y", "image"}
    batch = global_batch(local, batch_sharding(mesh))
    check_fields(batch, "the loader")
    encoder = EncoderFeatures(("image",), lambda images: jnp.ones((images.shape[0], 16, 16)), "ones")
    batch = encoder.add_to(batch)
    assert set(batch) == {"x", "y", FEATURES_KEY}
    seen = []

    class Spy(REPA):
        def __call__(self, features, reg_batch):
            seen.append(set(reg_batch))
            return super().__call__(features, reg_batch)

    loss, metrics = objective_loss(params, model.apply, batch, jax.random.key(1), Objective(Transport(), (Spy(),)),
                                   step=jnp.asarray(3))
    assert np.isfinite(float(loss)) and "loss/repa" in metrics
    assert seen == [{"x", "y", FEATURES_KEY, "step"}] and seen[0] <= FIELDS
