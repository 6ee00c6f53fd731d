"""README.md's Python blocks run, in order, in one namespace: the docs cannot rot."""

import pathlib
import re
import warnings

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the README must not trigger warnings either
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md[block {i}]", "exec"), namespace)
    assert float(namespace["loss"]) > 0
