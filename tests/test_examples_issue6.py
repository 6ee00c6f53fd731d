"""Smoke runs (tiny settings) of the issue #6 examples: fisher_groups.py and sharded.py.

`fisher_groups.main(argv)` runs in-process; `sharded.py` runs as a subprocess because it
sets `XLA_FLAGS` for 8 fake devices before importing jax.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # example smoke run; the library parts are tested elsewhere
def test_fisher_groups(tmp_path):
    argv = [
        "--epochs", "1", "--clusters", "4", "--groups", "1,8,tensor", "--init", "density",
        "--fisher-examples", "128", "--seeds", "2", "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    out = _load("fisher_groups").main(argv)
    text = (tmp_path / "results.md").read_text()
    assert "acc damped" in text and "| group 8 | 4 |" in text
    assert (tmp_path / "fisher_groups.png").stat().st_size > 0
    assert len(out["fisher_rows"]) == 2 and len(out["group_rows"]) == 3
    # The mean row is the mean of the two models' rows (acc plain / Fisher / damped).
    (mean_row,) = out["mean_rows"]
    for col in (2, 3, 4):
        expected = (out["fisher_rows"][0][col] + out["fisher_rows"][1][col]) / 2
        assert abs(mean_row[col] - expected) < 1e-9
    for (_, k, _), row in out["results"].items():
        assert row["distinct"] <= k
        assert 0.0 <= row["acc"] <= 1.0
    # Fewer tables -> smaller: per tensor < group 8 < per channel.
    size = {g: out["results"][(g, 4, False)]["size"] for g in ("1", "8", "tensor")}
    assert size["tensor"] < size["8"] < size["1"]


@pytest.mark.slow  # example smoke run; the library parts are tested elsewhere
def test_sharded(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    argv = [
        "--steps", "3", "--pretrain-steps", "2", "--init", "linear", "--granularity", "group",
        "--group-size", "32", "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "sharded.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "results.md").read_text()
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert "| Dense_1/kernel | (256, 256) | P(None, 'model') | P(None, 'model') | group |" in text
    equal = float(re.search(r"indices equal after training \| ([0-9.]+)", text).group(1))
    diff = float(re.search(r"max abs diff, final params \| ([0-9.e+-]+)", text).group(1))
    assert equal >= 0.999 and diff < 1e-4, text
