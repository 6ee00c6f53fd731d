"""The clusterjax command line, run as a subprocess: compress -> inspect -> decompress."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import clusterjax as cj


def run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "clusterjax._src.cli", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(0)
    arrays = {
        "Dense_0/kernel": rng.normal(size=(64, 32)).astype(np.float32),
        "Dense_0/bias": np.zeros(32, np.float32),
        "Dense_1/kernel": rng.normal(size=(32, 10)).astype(np.float32),
    }
    path = d / "model.npz"
    np.savez(path, **arrays)
    return d, path, arrays


def test_compress_inspect_decompress(checkpoint):
    d, path, arrays = checkpoint
    out = d / "model.cjx"
    r = run("compress", str(path), "--clusters", "8", "--per-channel", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Dense_0/kernel" in r.stdout and "compression:" in r.stdout
    r = run("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "Dense_1/kernel" in r.stdout and "total:" in r.stdout
    dense = d / "dense.npz"
    r = run("decompress", str(out), "--out", str(dense))
    assert r.returncode == 0, r.stderr
    with np.load(dense, allow_pickle=False) as z:
        k0 = z["Dense_0/kernel"]
        np.testing.assert_array_equal(z["Dense_0/bias"], arrays["Dense_0/bias"])
    assert k0.shape == (64, 32)
    assert max(len(np.unique(k0[:, c])) for c in range(32)) <= 8
    # Equal to loading the packed file in Python.
    np.testing.assert_array_equal(k0, cj.load(out)["Dense_0"]["kernel"])


def test_safetensors_and_rules(checkpoint, tmp_path):
    from safetensors.numpy import save_file

    _, _, arrays = checkpoint
    src = tmp_path / "m.safetensors"
    save_file(arrays, str(src))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"Dense_1/.*": None, ".*kernel": {"num_clusters": 4}}))
    out = tmp_path / "m.cjx"
    r = run("compress", str(src), "--rules", str(rules), "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    packed = cj.load(out, packed=True)
    assert isinstance(packed["Dense_0"]["kernel"], cj.PackedArray)
    assert packed["Dense_0"]["kernel"].num_clusters == 4
    assert isinstance(packed["Dense_1"]["kernel"], np.ndarray)


@pytest.mark.parametrize(
    "args",
    [
        ("compress", "/no/such/file.npz", "--clusters", "4", "--out", "x.cjx"),
        ("compress", "IN", "--clusters", "0", "--out", "OUT"),
        ("compress", "IN", "--out", "OUT"),
        ("compress", "IN", "--clusters", "4"),
        ("inspect", "/no/such/file.cjx"),
        ("inspect", "IN"),  # an npz is not a packed file
        ("frobnicate",),
    ],
)
def test_bad_input_is_one_line_error(checkpoint, tmp_path, args):
    _, path, _ = checkpoint
    args = [str(path) if a == "IN" else str(tmp_path / "o.cjx") if a == "OUT" else a for a in args]
    r = run(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clusterjax: error:"), r.stderr
