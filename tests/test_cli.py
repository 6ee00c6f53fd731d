"""The `clusterjax` command: compress -> inspect -> decompress, and one-line errors.

The main end-to-end run and a few errors use the installed console script in a
subprocess (falling back to `python -m clusterjax._src.cli`); the other cases call
`main()` in-process, which runs the same code without a second JAX start-up.
"""

from __future__ import annotations

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
        "'Dense_1/kernel')"
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
