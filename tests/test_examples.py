"""Smoke runs of the examples with tiny settings, so that they never rot."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_demo_tiny(tmp_path, model):
    demo = _load("demo")
    out = demo.main(
        [
            "--models",
            model,
            "--clusters",
            "4",
            "--inits",
            "kmeans++",
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert (tmp_path / "results.md").exists() and (tmp_path / "accuracy_vs_k.png").exists()
    rows = out["rows"]
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= row[3] <= 1.0 and 0.0 <= row[4] <= 1.0
    assert rows[1][5] <= 4  # distinct values per kernel
