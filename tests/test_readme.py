"""The README's quick-start code runs as written."""

import pathlib
import re

import pytest

pytestmark = pytest.mark.slow

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs():
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert namespace["images"].shape == (10, 28, 28, 1)
    assert set(namespace["metrics"]) == {"loss", "loss/velocity", "loss/layersync", "layersync/block1_block3"}
