"""The `clusterjax` command: compress -> inspect -> decompress, and one-line errors.

The main end-to-end run and a few errors use the installed console script in a
subprocess (falling back to `python -m clusterjax._src.cli`); the other cases call
`main()` in-process, which runs the same code without a second JAX start-up.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import pickle
import re
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_atomic import MASKS, open_mode, umask
from test_packing import bits_equal

import clusterjax as cj
from clusterjax._src.cli import main

_SCRIPT = pathlib.Path(sys.executable).with_name("clusterjax")
_COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "clusterjax._src.cli"]


def run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [*_COMMAND, *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def cli(*args) -> int:
    """`main()` in this process (cheaper than a subprocess: no second JAX start-up)."""
    return main([str(a) for a in args])


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "Dense_0/kernel": rng.normal(size=(64, 32)).astype(np.float32),
        "Dense_0/bias": np.zeros(32, np.float32),
        "Dense_1/kernel": rng.normal(size=(32, 10)).astype(np.float32),
    }


def _nested(flat):
    out = {}
    for key, value in flat.items():
        a, b = key.split("/")
        out.setdefault(a, {})[b] = value
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    np.savez(d / "model.npz", **_arrays())
    return d


def test_compress_inspect_decompress(checkpoint, capsys):
    d = checkpoint
    out, dense = d / "model.cjx", d / "dense.npz"
    r = run("compress", d / "model.npz", "-k", "8", "--init", "linear", "--per-channel",
            "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    assert "Dense_0/kernel" in r.stdout and "channel" in r.stdout
    assert "2 clustered leaves" in r.stdout and f"wrote {out}" in r.stdout

    r = run("inspect", out)
    assert r.returncode == 0, r.stderr
    assert "format version 1" in r.stdout and "Dense_1/kernel" in r.stdout
    assert "2 clustered leaves" in r.stdout and "total" in r.stdout
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["file_bytes"] == out.stat().st_size
    assert {row["path"]: row["num_clusters"] for row in report["rows"]} == {
        "Dense_0/bias": None, "Dense_0/kernel": 8, "Dense_1/kernel": 8,
    }  # fmt: skip

    r = run("decompress", out, "--out", dense)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "3 arrays" in r.stdout
    # The CLI gives exactly what the Python API gives for the same spec and seed.
    params = _nested(_arrays())
    spec = cj.ClusterSpec(num_clusters=8, init="linear", granularity="channel")
    expected = cj.strip(params, cj.init(params, spec, key=jax.random.key(0)))
    with np.load(dense, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(_arrays())
        for key in z.files:
            a, b = key.split("/")
            assert bits_equal(z[key], expected[a][b]), key
    assert bits_equal(cj.load(out)["Dense_0"]["kernel"], expected["Dense_0"]["kernel"])


def test_safetensors_bf16_rules_and_seed(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    arrays = {k: np.asarray(v, jnp.bfloat16) for k, v in _arrays().items()}
    save_file(arrays, str(tmp_path / "m.safetensors"))
    rules_json = {
        "Dense_1/.*": None,
        ".*kernel": {"num_clusters": 4, "granularity": "group", "group_size": 2},
        "nothing/.*": None,
    }
    (tmp_path / "rules.json").write_text(json.dumps(rules_json))
    out = tmp_path / "m.cjx"
    status = cli(
        "compress", tmp_path / "m.safetensors", "--rules", tmp_path / "rules.json",
        "--init", "random", "--seed", "3", "-q", "-o", out,
    )  # fmt: skip
    assert status == 0
    assert capsys.readouterr().err.strip() == (
        "clusterjax: warning: rule(s) 'nothing/.*' matched no leaf (rules are matched with "
        "re.fullmatch against paths such as 'Dense_0/bias', 'Dense_0/kernel', "
        "'Dense_1/kernel')."
    )
    packed = cj.load(out, packed=True)
    kernel = packed["Dense_0"]["kernel"]
    assert isinstance(kernel, cj.PackedArray) and kernel.dtype == "bfloat16"
    assert kernel.num_clusters == 4 and kernel.tables.shape == (16, 4)
    assert isinstance(packed["Dense_1"]["kernel"], np.ndarray)  # null rule: dense
    # Same leaves, settings and random keys as cj.init(params, rules, key=key(seed)).
    params = _nested(arrays)
    rules = {p: None if kw is None else cj.ClusterSpec(init="random", **kw)
             for p, kw in rules_json.items() if p != "nothing/.*"}  # fmt: skip
    expected = cj.strip(params, cj.init(params, rules, key=jax.random.key(3)))
    assert cli("decompress", out, "-o", tmp_path / "d.safetensors") == 0
    got = load_file(str(tmp_path / "d.safetensors"))
    for key, value in got.items():
        a, b = key.split("/")
        assert bits_equal(value, expected[a][b]), key


def test_flax_msgpack_in_and_out(tmp_path):
    from flax import serialization

    variables = {"params": _nested(_arrays())}
    (tmp_path / "m.msgpack").write_bytes(serialization.msgpack_serialize(variables))
    out = tmp_path / "m.cjx"
    assert cli("compress", tmp_path / "m.msgpack", "-k", "2", "--init", "linear", "-o", out) == 0
    assert len(np.unique(cj.load(out)["Dense_1"]["kernel"])) <= 2
    assert cli("decompress", out, "-o", tmp_path / "d.msgpack") == 0
    restored = serialization.msgpack_restore((tmp_path / "d.msgpack").read_bytes())
    assert bits_equal(restored["Dense_0"]["bias"], np.zeros(32, np.float32))
    assert bits_equal(restored["Dense_1"]["kernel"], cj.load(out)["Dense_1"]["kernel"])


@pytest.mark.parametrize(
    "args",
    [
        ("compress", "/no/such/file.npz", "-k", "4", "-o", "x.cjx"),
        ("compress", "IN", "--clusters", "four", "-o", "x.cjx"),
    ],
)
def test_errors_from_the_console_script(checkpoint, args):
    args = [str(checkpoint / "model.npz") if a == "IN" else a for a in args]
    r = run(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clusterjax: error: "), r.stderr


class _Evil:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path("pwned"),))


def _inputs(d: pathlib.Path) -> dict[str, pathlib.Path]:
    np.save(d / "obj.npy", np.array([_Evil()], dtype=object), allow_pickle=True)
    paths = {"npz": d / "model.npz", "dir": d, "pkl": d / "model.pkl"}
    paths["pkl"].write_bytes(pickle.dumps(_Evil()))
    with open(d / "obj.npz", "wb") as f:
        np.savez(f, w=np.array([_Evil()], dtype=object))
    paths["objnpz"] = d / "obj.npz"
    (d / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    paths["badst"] = d / "bad.safetensors"
    (d / "rules.json").write_text("{not json")
    paths["badrules"] = d / "rules.json"
    (d / "rules2.json").write_text(json.dumps({".*": {"num_clusters": 4, "colour": "red"}}))
    paths["unknownkey"] = d / "rules2.json"
    (d / "rules3.json").write_text(json.dumps({"(": None}))
    paths["badregex"] = d / "rules3.json"
    (d / "rules4.json").write_text(json.dumps({".*kernel": {"init": "linear"}}))
    paths["nok"] = d / "rules4.json"
    (d / "trunc.cjx").write_bytes(b"CLUSTJAX\x01\x00\x00\x00")
    paths["trunc"] = d / "trunc.cjx"
    from flax import serialization

    tree = {"w": np.ones((4, 4), jnp.bfloat16)}
    cj.save(d / "bf.cjx", tree)
    paths["bf16"] = d / "bf.cjx"
    (d / "small.msgpack").write_bytes(serialization.msgpack_serialize({"b": np.ones(3)}))
    paths["nothing"] = d / "small.msgpack"
    (d / "str.msgpack").write_bytes(serialization.msgpack_serialize({"name": "mlp"}))
    paths["strmsgpack"] = d / "str.msgpack"
    return paths


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["compress", "{npz}", "-k", "0", "-o", "{out}"], "num_clusters must be >= 1"),
        (["compress", "{npz}", "-o", "{out}"], "needs --clusters K"),
        (["compress", "{npz}", "-k", "4"], "required: --out"),
        (["compress", "{npz}", "-k", "4", "--init", "best", "-o", "{out}"], "invalid choice"),
        (["compress", "{npz}", "-k", "4", "-o", "x.npz"], "not .npz; name it e.g. model.cjx"),
        (["compress", "{npz}", "-k", "4", "-o", "/no/such/dir/x.cjx"], "no such directory"),
        (["compress", "{dir}", "-k", "4", "-o", "{out}"], "not a file"),
        (["compress", "{pkl}", "-k", "4", "-o", "{out}"], "unsupported input"),
        (["compress", "{objnpz}", "-k", "4", "-o", "{out}"], "cannot read .*pickle"),
        (["compress", "{badst}", "-k", "4", "-o", "{out}"], "cannot read"),
        (["compress", "{strmsgpack}", "-k", "4", "-o", "{out}"], "not a numeric array"),
        (["compress", "{npz}", "--rules", "{badrules}", "-o", "{out}"], "not valid JSON"),
        (["compress", "{npz}", "--rules", "{unknownkey}", "-o", "{out}"], "unknown key"),
        (["compress", "{npz}", "--rules", "{badregex}", "-o", "{out}"], "not a valid regex"),
        (["compress", "{npz}", "--rules", "{nok}", "-o", "{out}"], "has no num_clusters"),
        (["compress", "{npz}", "--rules", "/no/rules.json", "-o", "{out}"], "rules file"),
        (["compress", "{nothing}", "-k", "4", "-o", "{out}"], "no leaf was selected"),
        (["inspect", "{npz}"], "not a clusterjax file"),
        (["inspect", "{trunc}"], "truncated file"),
        (["inspect", "/no/such.cjx"], "no such file"),
        (["decompress", "{bf16}", "-o", "{tmp}/d.npz"], "cannot hold bfloat16"),
        (["decompress", "{bf16}", "-o", "{tmp}/d.txt"], "unsupported output"),
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["compress", "--help-me"], "unrecognized|required"),
    ],
)
def test_errors_are_one_line(checkpoint, tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    paths = {k: str(v) for k, v in _inputs(checkpoint).items()}
    paths.update(out=str(tmp_path / "o.cjx"), tmp=str(tmp_path))
    status = main([a.format(**paths) for a in argv])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("clusterjax: error: "), captured.err
    assert re.search(fragment, lines[0]), lines[0]
    assert not (tmp_path / "pwned").exists() and not pathlib.Path("pwned").exists()
    assert not (tmp_path / "o.cjx").exists()


def test_progress_bar_on_a_terminal(checkpoint, tmp_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    fake = Terminal()
    monkeypatch.setattr(sys, "stderr", fake)
    out = tmp_path / "m.cjx"
    assert main(["compress", str(checkpoint / "model.npz"), "-k", "2", "--init", "linear",
                 "-o", str(out)]) == 0  # fmt: skip
    assert "clustering:" in fake.getvalue() and "/3 [" in fake.getvalue()
    fake.truncate(0)
    assert main(["compress", str(checkpoint / "model.npz"), "-k", "2", "--init", "linear",
                 "--quiet", "-o", str(out)]) == 0  # fmt: skip
    assert fake.getvalue().strip("\0") == ""
    assert "2 clustered leaves" in capsys.readouterr().out


@pytest.mark.parametrize("mask", MASKS)
def test_every_output_gets_the_mode_of_a_plain_open(checkpoint, tmp_path, mask):
    # Not 0o600: a team's shared folder, or a server running as another user, reads them.
    outs = [tmp_path / f"d.{ext}" for ext in ("safetensors", "npz", "msgpack")]
    with umask(mask):
        assert cli("compress", checkpoint / "model.npz", "-k", "2", "--init", "linear", "-q",
                   "-o", tmp_path / "m.cjx") == 0  # fmt: skip
        for out in outs:
            assert cli("decompress", tmp_path / "m.cjx", "-o", out) == 0
        want = open_mode(tmp_path)
    assert want == 0o666 & ~mask
    for path in [tmp_path / "m.cjx", *outs]:
        assert stat.S_IMODE(path.stat().st_mode) == want, path.name
    assert cj.load(tmp_path / "m.cjx")["Dense_0"]["bias"].shape == (32,)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.cjx", *(p.name for p in outs)])


# ---------------------------------------------------------------------------------------
# A checkpoint like a real one (issue 17: all-MiniLM-L6-v2's model.safetensors): kernels
# and an embedding to cluster, a tiny 2-row embedding, an int64 buffer, 1-D norms.

_TINY = "embeddings.token_type_embeddings.weight"


def _mixed_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(17)

    def f32(*shape):
        return rng.normal(size=shape).astype(np.float32)

    # Two clustered shapes only: each new shape costs seconds of compilation at K = 256.
    return {
        "embeddings.word_embeddings.weight": f32(64, 32),
        # (2, 160): 320 weights >= K = 256, so the "fewer than K" rule keeps it, but
        # 320 one-byte indices + a 1,024-byte table (1,344 B) outweigh its 1,280 float
        # bytes; like the (2, 384) token-type table of MiniLM.
        _TINY: f32(2, 160),
        "embeddings.position_ids": np.arange(100, dtype=np.int64).reshape(1, 100),
        "embeddings.LayerNorm.weight": 1 + 0.1 * f32(32),
        "embeddings.LayerNorm.bias": 0.1 * f32(32),
        "encoder.layer.0.intermediate.dense.weight": f32(64, 32),
        "encoder.layer.0.intermediate.dense.bias": f32(64),
    }


def _run_main(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli(*args)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The checkpoint compressed as a new user would: `-k 256 --channel-axis 0`.

    With `--init linear`: the default kmeans takes about a minute here at K = 256 (most of
    it compiling), and the selection and the bytes do not depend on the init.
    """
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("mixed")
    save_file(_mixed_arrays(), str(d / "model.safetensors"))
    status, out, err = _run_main(
        "compress", d / "model.safetensors", "-k", "256", "--channel-axis", "0",
        "--init", "linear", "--out", d / "m.cjx",
    )  # fmt: skip
    assert status == 0, err
    return d, out, err


def test_round_trip_of_a_mixed_safetensors_checkpoint(mixed, capsys):
    from safetensors.numpy import load_file

    d, out, err = mixed
    arrays = _mixed_arrays()
    assert "error" not in err and f"wrote {d / 'm.cjx'}" in out
    # What the Python API gives for the same spec and seed (dotted keys stay flat).
    spec = cj.ClusterSpec(num_clusters=256, init="linear", channel_axis=0)
    state = cj.init(arrays, spec, key=jax.random.key(0))
    expected = cj.strip(arrays, state)
    clustered = {k for k, s in state.specs.items() if s is not None}
    assert {"embeddings.word_embeddings.weight", "encoder.layer.0.intermediate.dense.weight"} <= (
        clustered
    )
    assert not clustered & {k for k, v in arrays.items() if v.ndim == 1 or v.dtype.kind == "i"}

    assert main(["inspect", str(d / "m.cjx"), "--json"]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert sorted(rows) == sorted(arrays)
    for key, value in arrays.items():
        row = rows[key]
        assert row["dtype"] == value.dtype.name and tuple(row["shape"]) == value.shape, key
        assert row["original_bytes"] == value.nbytes, key  # int64: 8 bytes each
        assert row["num_clusters"] == (256 if key in clustered else None), key
        if key not in clustered:
            assert row["packed_bytes"] == value.nbytes and row["compression_ratio"] == 1.0, key
    assert main(["inspect", str(d / "m.cjx")]) == 0
    text = capsys.readouterr().out
    ids = next(line for line in text.splitlines() if line.startswith("embeddings.position_ids "))
    assert "int64" in ids and ids.split()[-2] == "1.00x", ids  # not 0.50x of float32

    assert main(["decompress", str(d / "m.cjx"), "-o", str(d / "dense.safetensors")]) == 0
    assert "7 arrays" in capsys.readouterr().out
    got = load_file(str(d / "dense.safetensors"))
    assert sorted(got) == sorted(arrays)
    for key, value in arrays.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert bits_equal(got[key], expected[key]), key
        if key in clustered:
            assert len(np.unique(got[key])) <= 256, key
        else:  # int buffer, norms, biases (and whatever else stays dense): untouched
            assert bits_equal(got[key], value), key
    assert bits_equal(got["embeddings.position_ids"], arrays["embeddings.position_ids"])


def test_default_selection_keeps_a_tiny_leaf_dense(mixed):
    d, out, err = mixed
    packed = cj.load(d / "m.cjx", packed=True)
    assert isinstance(packed[_TINY], np.ndarray)  # kept dense, not a PackedArray
    assert bits_equal(packed[_TINY], _mixed_arrays()[_TINY])
    # ... and the user is told once, in a warning or in the summary's footer (not only by
    # the leaf's own table row, which starts with its path).
    notes = [line for line in (err + out).splitlines() if _TINY in line]
    assert any(not line.startswith(_TINY) for line in notes), err + out


def test_an_explicit_rule_clusters_a_tiny_leaf(tmp_path):
    from safetensors.numpy import save_file

    arrays = _mixed_arrays()
    save_file(arrays, str(tmp_path / "model.safetensors"))
    rules = {re.escape(_TINY): {"num_clusters": 256}, ".*": None}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    status, _, err = _run_main(
        "compress", tmp_path / "model.safetensors", "--rules", tmp_path / "rules.json",
        "--init", "linear", "-o", tmp_path / "m.cjx",
    )  # fmt: skip
    assert status == 0, err
    packed = cj.load(tmp_path / "m.cjx", packed=True)
    assert isinstance(packed[_TINY], cj.PackedArray) and packed[_TINY].num_clusters == 256
    assert all(isinstance(v, np.ndarray) for k, v in packed.items() if k != _TINY)
    spec_rules = {
        p: None if kw is None else cj.ClusterSpec(init="linear", **kw) for p, kw in rules.items()
    }
    expected = cj.strip(arrays, cj.init(arrays, spec_rules, key=jax.random.key(0)))
    assert bits_equal(cj.load(tmp_path / "m.cjx")[_TINY], expected[_TINY])


def test_outliers_flag_writes_a_version_2_file(checkpoint, capsys):
    out = checkpoint / "outliers.cjx"
    assert cli("compress", checkpoint / "model.npz", "-k", "4", "--init", "linear",
               "--outliers", "0.01", "--quiet", "--out", out) == 0  # fmt: skip
    assert cli("inspect", out) == 0
    assert "format version 2" in capsys.readouterr().out
    params = _nested(_arrays())
    spec = cj.ClusterSpec(num_clusters=4, init="linear", outliers=0.01)
    expected = cj.strip(params, cj.init(params, spec, key=jax.random.key(0)))
    loaded = cj.load(out, packed=True)
    assert loaded["Dense_0"]["kernel"].num_outliers == 20  # 1% of 64 x 32
    assert bits_equal(cj.load(out)["Dense_0"]["kernel"], expected["Dense_0"]["kernel"])
    assert cli("compress", checkpoint / "model.npz", "-k", "4", "--outliers", "1.5",
               "--out", out) == 2  # fmt: skip
    assert "outliers=1.5" in capsys.readouterr().err


def test_table_format_flags_write_a_version_3_file(checkpoint, capsys):
    out = checkpoint / "formats.cjx"
    flags = ["--cluster-dim", "2", "--lut-dtype", "int8", "--per-channel-scale", "--quiet"]
    assert cli("compress", checkpoint / "model.npz", "-k", "16", *flags, "--out", out) == 0
    assert cli("inspect", out) == 0
    text = capsys.readouterr().out
    assert "format version 3" in text and "tensor d=2 int8 +scale" in text
    params = _nested(_arrays())
    spec = cj.ClusterSpec(num_clusters=16, cluster_dim=2, lut_dtype="int8", per_channel_scale=True)
    expected = cj.strip(params, cj.init(params, spec, key=jax.random.key(0)))
    for name in ("Dense_0", "Dense_1"):
        assert bits_equal(cj.load(out)[name]["kernel"], expected[name]["kernel"])
    packed = cj.load(out, packed=True)["Dense_0"]["kernel"]
    assert packed.cluster_dim == 2 and packed.lut_dtype == "int8" and packed.scale_axis == 1
    # 32 x 32 indices of 4 bits, an int8 table of 16 x 2, its scale, 32 float16 scales.
    assert packed.nbytes == 512 + 32 + 4 + 64
    assert cli("compress", checkpoint / "model.npz", "-k", "4", "--cluster-dim", "3",
               "--out", out) == 2  # fmt: skip
    assert "cluster_dim=3 does not divide" in capsys.readouterr().err
    assert cli("compress", checkpoint / "model.npz", "-k", "4", "--cluster-dim", "2",
               "--init", "linear", "--out", out) == 2  # fmt: skip
    assert "scalar-only init" in capsys.readouterr().err
