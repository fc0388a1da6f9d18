"""The declared interfaces stay declared: data sources are asked through `DataSource`, never sniffed; a
section given in part is completed by one function."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lsync_jax"


def _lines(pattern: str, *, skip: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in skip:
            continue
        found += [f"{rel}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                  if re.search(pattern, line)]
    return found


def test_data_sources_are_not_sniffed():
    """`lsync_jax.data.registry.check_source` is the one place that looks for the interface's members.
    (Preprocessing reads labels without decoding through the declared `ImageRecords.first_labels`.)"""
    found = _lines(r"(hasattr|getattr)\((source|src|ref_source|self\.source)\b",
                   skip=("lsync_jax/data/registry.py",))
    assert not found, "a data source's interface guessed with hasattr/getattr:\n" + "\n".join(found)


def test_defaults_are_filled_by_one_function():
    """`lsync_jax.objectives.sections.with_defaults` completes every section given in part; nothing
    defines a second one."""
    found = _lines(r"def with_defaults\(|def check_keys\(", skip=("lsync_jax/objectives/sections.py",))
    assert not found, "a second home for filling defaults:\n" + "\n".join(found)
    found = _lines(r"import .*\bwith_defaults\b")
    assert all("from lsync_jax.objectives.sections import" in line for line in found), "\n".join(found)
