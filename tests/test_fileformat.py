"""The packed file: exact round trips, sizes, the documented layout, and hostile files.

Every malformed input must raise `cj.FormatError` (a `ValueError`) naming the problem:
never another exception, never code execution, never a garbage tree.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import stat
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import hand_state
from test_atomic import MASKS, open_mode, umask
from test_packing import bits_equal, cases, make_case, make_leaf, reference_tree

import clusterjax as cj
from clusterjax._src.fileformat import MAGIC, file_size, loads, read_header
from clusterjax._src.packing import is_packed

# ---------------------------------------------------------------------------------------
# Round trips.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fileformat")


def _flat(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_packed)[0]
    return {cj.path_str(p): leaf for p, leaf in flat}


@settings(max_examples=40)
@given(case=cases(dtypes=("float32", "bfloat16", "float16")))
def test_load_of_save_equals_strip_bit_for_bit(workdir, case):
    params, state = case
    path = workdir / "case.cjx"
    size = cj.save(path, params, state)
    assert size == path.stat().st_size == file_size(cj.pack(params, state))
    dense = _flat(cj.strip(params, state))
    reference = reference_tree(params, state)
    loaded = _flat(cj.load(path))
    assert set(loaded) == set(dense)
    for name, want in dense.items():
        assert isinstance(loaded[name], np.ndarray)
        assert bits_equal(loaded[name], want), name
        assert bits_equal(loaded[name], reference[name]), name
    packed = _flat(cj.load(path, packed=True))
    for name, leaf in _flat(cj.pack(params, state)).items():
        if isinstance(leaf, cj.PackedArray):
            got = packed[name]
            assert isinstance(got, cj.PackedArray) and repr(got) == repr(leaf)
            assert bits_equal(got.packed, leaf.packed) and bits_equal(got.tables, leaf.tables)
            assert (got.outlier_positions is None) == (leaf.outlier_positions is None)
            if leaf.outlier_positions is not None:
                assert bits_equal(got.outlier_positions, leaf.outlier_positions)
                assert bits_equal(got.outlier_values, leaf.outlier_values)
        else:
            assert bits_equal(packed[name], leaf)


def test_round_trip_of_a_real_init(workdir):
    k = jax.random.split(jax.random.key(0), 2)
    params = {
        "embed": jax.random.normal(k[0], (32, 16)),
        "sparse": jax.random.normal(k[1], (12, 6)) * (jax.random.uniform(k[1], (12, 6)) > 0.4),
        "bias": jnp.arange(8.0),
    }
    rules = {
        "embed": cj.ClusterSpec(num_clusters=256, init="linear"),
        "sparse": cj.ClusterSpec(num_clusters=16, init="linear", preserve_sparsity=True),
    }
    state = cj.init(params, rules, key=jax.random.key(1))
    cj.save(workdir / "real.cjx", params, state)
    loaded, dense = cj.load(workdir / "real.cjx"), cj.strip(params, state)
    for name in params:
        assert bits_equal(loaded[name], dense[name]), name
    assert np.all((loaded["sparse"] == 0) == (np.asarray(params["sparse"]) == 0))
    packed = cj.load(workdir / "real.cjx", packed=True)
    assert packed["embed"].bits == 8 and packed["embed"].tables.shape == (256,)
    assert bits_equal(packed["sparse"].indices(), state.indices["sparse"])


def test_packed_tree_and_params_state_write_identical_files(workdir):
    params, state = make_case(
        np.random.default_rng(0),
        {"a": dict(shape=(5, 4), dtype="float32", k=3), "b": np.arange(3.0)},
    )
    cj.save(workdir / "1.cjx", params, state)
    cj.save(workdir / "2.cjx", cj.pack(params, state))
    assert (workdir / "1.cjx").read_bytes() == (workdir / "2.cjx").read_bytes()


def test_size_of_a_million_weights_at_k16(workdir, capsys):
    n, k = 1 << 20, 16
    params, state = make_case(
        np.random.default_rng(1), {"w": dict(shape=(1024, 1024), dtype="float32", k=k)}
    )
    path = workdir / "big.cjx"
    size = cj.save(path, params, state)
    blob = path.read_bytes()
    hlen = struct.unpack_from("<Q", blob, 12)[0]
    payload = n // 2 + k * 4
    assert size == 20 + hlen + payload  # nothing else: no padding needed here
    assert size <= 1.01 * payload and hlen < 512
    assert bits_equal(cj.load(path)["w"], cj.strip(params, state)["w"])
    with capsys.disabled():
        print(
            f"\n1M weights, K=16: file {size:,} B = N/2 {n // 2:,} + table {k * 4} + "
            f"prefix/header {20 + hlen}; {(size / payload - 1) * 100:.3f}% over N/2 + "
            f"table; {4 * n / size:.2f}x vs float32"
        )


def test_int_keys_lists_and_bare_arrays(workdir):
    rng = np.random.default_rng(2)
    params, state = make_case(rng, {"w": dict(shape=(4, 4), dtype="float32", k=2)})
    tree = {"layers": {0: params["w"], 1: [np.int8(3), np.ones(2, bool)]}}
    st_tree = hand_state(
        tree,
        {"layers": {0: state.centroids["w"], 1: [None, None]}},
        {"layers": {0: state.indices["w"], 1: [None, None]}},
        {"layers": {0: None, 1: [None, None]}},
        {"layers": {0: state.specs["w"], 1: [None, None]}},
    )
    cj.save(workdir / "keys.cjx", tree, st_tree)
    out = cj.load(workdir / "keys.cjx")
    assert sorted(out["layers"]) == [0, 1] and sorted(out["layers"][1]) == [0, 1]
    assert bits_equal(out["layers"][0], cj.strip(params, state)["w"])
    assert bits_equal(out["layers"][1][0], np.int8(3))
    assert bits_equal(out["layers"][1][1], np.ones(2, bool))
    cj.save(workdir / "bare.cjx", np.arange(5, dtype=np.uint16))
    assert bits_equal(cj.load(workdir / "bare.cjx"), np.arange(5, dtype=np.uint16))
    cj.save(workdir / "empty.cjx", {})
    assert cj.load(workdir / "empty.cjx") == {}


def test_nnx_state_round_trip(workdir):
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    _, variables = nnx.split(model)
    rng = np.random.default_rng(3)
    fields = ({}, {}, {}, {})
    for i, shape in enumerate([(6, 8), (8, 3)]):
        _, c, idx, _, spec = make_leaf(rng, shape, "float32", 4, granularity="channel")
        for f, v in zip(fields, (c, idx, None, spec)):
            f[i] = {"kernel": v, "bias": None}
    # A dict-shaped state fits the nnx State by path.
    state = hand_state(variables, *({"layers": f} for f in fields))
    cj.save(workdir / "nnx.cjx", variables, state)
    loaded = cj.load(workdir / "nnx.cjx")
    assert sorted(loaded["layers"]) == [0, 1]  # int keys, as nnx.Sequential has them
    fresh = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(7)), nnx.Linear(8, 3, rngs=nnx.Rngs(8)))
    nnx.update(fresh, nnx.State(loaded))
    dense = cj.strip(variables, state)
    _, restored = nnx.split(fresh)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(dense), strict=True):
        assert bits_equal(a, b)


def test_save_errors(workdir):
    with pytest.raises(ValueError, match="leaf 'z' has dtype complex64"):
        cj.save(workdir / "c.cjx", {"z": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="two leaves have the same path 'a/b'"):
        cj.save(workdir / "d.cjx", {"a/b": np.zeros(1), "a": {"b": np.zeros(1)}})
    # A failed save leaves an existing file alone and no temporary file behind.
    (workdir / "keep.cjx").write_bytes(b"old")
    with pytest.raises(ValueError):
        cj.save(workdir / "keep.cjx", {"z": np.zeros(2, np.complex64)})
    assert (workdir / "keep.cjx").read_bytes() == b"old"
    assert not [p for p in os.listdir(workdir) if p.endswith(".tmp")]
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        cj.save(workdir / "no-such-dir" / "x.cjx", {"a": np.zeros(1)})


@pytest.mark.parametrize("mask", MASKS)
def test_save_gives_the_mode_of_a_plain_open(tmp_path, mask):
    # Not 0o600 as a tempfile.mkstemp would: a server running as another user reads it.
    params = {"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)}
    state = cj.init(params, cj.ClusterSpec(num_clusters=4, init="linear"), key=jax.random.key(0))
    with umask(mask):
        cj.save(tmp_path / "m.cjx", params, state)
        want = open_mode(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "m.cjx").st_mode) == want == 0o666 & ~mask
    os.chmod(tmp_path / "m.cjx", 0o640)  # a replaced file keeps its mode, as with open()
    with umask(mask):
        cj.save(tmp_path / "m.cjx", params, state)
    assert stat.S_IMODE(os.stat(tmp_path / "m.cjx").st_mode) == 0o640
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ---------------------------------------------------------------------------------------
# The layout documented in BUILD.md, read by an independent reader.


def spec_reader(blob: bytes) -> dict:
    """A reader written from BUILD.md alone (np.unpackbits for the bit stream)."""
    magic, version, hlen = struct.unpack_from("<8sIQ", blob, 0)
    assert magic == b"CLUSTJAX" and version in (1, 2, 3) and (20 + hlen) % 8 == 0
    header = json.loads(blob[20 : 20 + hlen])
    data = blob[20 + hlen :]
    assert len(data) == header["data_nbytes"]

    def dtype(name):
        return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)

    out = {}
    for e in header["leaves"]:
        name = "/".join(str(p) for p in e["path"])
        shape = e["shape"]
        if e["kind"] == "dense":
            count = math.prod(shape)
            arr = np.frombuffer(data, dtype(e["dtype"]), count=count, offset=e["offset"])
            out[name] = arr.reshape(shape)
            continue
        k, b = e["num_clusters"], e["bits"]
        table = np.frombuffer(
            data, e["table_dtype"], count=math.prod(e["table_shape"]), offset=e["table_offset"]
        )
        if "lut" in e:  # version 3: an int8/uint8 table, a float32 scale (+ zero point) per table
            assert version == 3
            lut = e["lut"]
            scale = np.frombuffer(data, "<f4", count=lut["count"], offset=lut["scale_offset"])
            zp = np.zeros(lut["count"], np.float32)
            if e["table_dtype"] == "uint8":
                zp = np.frombuffer(
                    data, np.uint8, count=lut["count"], offset=lut["zero_point_offset"]
                )
            t = table.reshape(lut["count"], -1).astype(np.float32)
            table = (t - zp.astype(np.float32)[:, None]) * scale[:, None]
        d, vshape = 1, list(shape)
        if "vectors" in e:  # version 3: d consecutive weights along vector_axis share an index
            assert version == 3
            d, va = e["vectors"]["cluster_dim"], e["vectors"]["vector_axis"]
            vshape[va] //= d
        table = table.reshape(-1, k, d)
        raw = np.frombuffer(data, np.uint8, count=e["indices_nbytes"], offset=e["indices_offset"])
        n = math.prod(vshape)
        bit_matrix = np.unpackbits(raw, bitorder="little")[: n * b].reshape(n, b)
        idx = (bit_matrix.astype(np.int64) << np.arange(b)).sum(axis=1).reshape(vshape)
        if e["granularity"] == "tensor":
            group = np.zeros(vshape, np.int64)
        else:
            axis = e["channel_axis"]
            pos = np.arange(vshape[axis]).reshape(
                [-1 if i == axis else 1 for i in range(len(vshape))]
            )
            group = np.broadcast_to(pos // e["group_size"], vshape)
        value = table[group, idx]  # vshape + (d,)
        if d > 1:
            value = np.moveaxis(
                np.moveaxis(value, va, -2).reshape(
                    [s for i, s in enumerate(vshape) if i != va] + [shape[va]]
                ),
                -1,
                va,
            )
        else:
            value = value[..., 0]
        if "scales" in e:  # version 3: float16 scales along an axis, multiplied in float32
            sc = e["scales"]
            scale = np.frombuffer(data, "<f2", count=sc["count"], offset=sc["values_offset"])
            view = [-1 if i == sc["axis"] else 1 for i in range(len(shape))]
            value = value * scale.astype(np.float32).reshape(view)
        value = value.astype(dtype(e["dtype"]))
        if "outliers" in e:  # version 2: COO positions (int32) and values (float16)
            assert version >= 2
            o = e["outliers"]
            pos = np.frombuffer(data, "<i4", count=o["count"], offset=o["positions_offset"])
            val = np.frombuffer(data, "<f2", count=o["count"], offset=o["values_offset"])
            value = value.reshape(-1)
            value[pos] = val.astype(dtype(e["dtype"]))
            value = value.reshape(shape)
        out[name] = value
    return out


def test_an_independent_reader_of_the_documented_layout(workdir):
    params, state = make_case(
        np.random.default_rng(4),
        {
            "t": dict(shape=(7, 5), dtype="bfloat16", k=17),
            "c": dict(shape=(3, 4, 6), dtype="float32", k=3, granularity="channel", axis=1),
            "g": dict(shape=(5, 8), dtype="float16", k=256, granularity="group", group_size=4),
            "s": dict(shape=(9, 2), dtype="float32", k=2, sparse=True),
            "dense": np.arange(6, dtype=np.int32).reshape(2, 3),
        },
    )
    cj.save(workdir / "spec.cjx", params, state)
    blob = (workdir / "spec.cjx").read_bytes()
    got = spec_reader(blob)
    for name, want in _flat(cj.strip(params, state)).items():
        assert bits_equal(got[name], want), name
    header = read_header(blob)
    entry = next(e for e in header["leaves"] if e["path"] == ["g"])
    assert entry["granularity"] == "group" and entry["group_size"] == 4
    assert entry["table_shape"] == [2, 256] and entry["bits"] == 8
    assert struct.unpack_from("<I", blob, 8)[0] == 1  # no outliers: version 1


def test_an_independent_reader_of_version_3(workdir):
    rng = np.random.default_rng(5)
    params = {
        "v": jnp.asarray(rng.standard_t(3, (8, 6)), jnp.bfloat16),
        "c": jnp.asarray(rng.standard_t(3, (3, 8, 4)), jnp.float32),
        "q": jnp.asarray(rng.standard_t(3, (16, 4)), jnp.float16),
        "o": jnp.asarray(rng.standard_t(3, (16, 4)), jnp.float32),
    }
    rules = {
        "v": cj.ClusterSpec(num_clusters=5, cluster_dim=2, per_channel_scale=True),
        "c": cj.ClusterSpec(
            num_clusters=3, cluster_dim=4, granularity="channel", lut_dtype="uint8", vector_axis=1
        ),
        "q": cj.ClusterSpec(num_clusters=6, lut_dtype="int8", per_channel_scale=True),
        "o": cj.ClusterSpec(num_clusters=4, lut_dtype="uint8", outliers=0.05),
    }
    state = cj.init(params, rules, key=jax.random.key(3))
    cj.save(workdir / "v3.cjx", params, state)
    blob = (workdir / "v3.cjx").read_bytes()
    assert struct.unpack_from("<I", blob, 8)[0] == 3
    got = spec_reader(blob)
    for name, want in _flat(cj.strip(params, state)).items():
        assert bits_equal(got[name], want), name


def test_an_independent_reader_of_version_2(workdir):
    params, state = make_case(
        np.random.default_rng(14),
        {
            "o": dict(shape=(9, 7), dtype="float32", k=5, granularity="channel", outliers=0.1),
            "b": dict(shape=(4, 6), dtype="bfloat16", k=2, outliers=0.2, sparse=True),
            "t": dict(shape=(3, 5), dtype="float16", k=3),
        },
    )
    cj.save(workdir / "v2.cjx", params, state)
    blob = (workdir / "v2.cjx").read_bytes()
    assert struct.unpack_from("<I", blob, 8)[0] == 2
    got = spec_reader(blob)
    for name, want in _flat(cj.strip(params, state)).items():
        assert bits_equal(got[name], want), name
    entry = next(e for e in read_header(blob)["leaves"] if e["path"] == ["o"])
    assert entry["outliers"]["count"] == 6 and "outliers" not in _clustered_named(blob, "t")


def _clustered_named(blob, name):
    return next(e for e in read_header(blob)["leaves"] if e["path"] == [name])


# ---------------------------------------------------------------------------------------
# Hostile files.


@pytest.fixture(scope="module")
def blob(workdir):
    """A small valid file: a clustered leaf (K=3, 2 bits) and a dense one."""
    params, state = make_case(
        np.random.default_rng(5),
        {"w": dict(shape=(6, 5), dtype="float32", k=3), "b": np.arange(3, dtype=np.float32)},
    )
    cj.save(workdir / "small.cjx", params, state)
    return (workdir / "small.cjx").read_bytes()


@pytest.fixture(scope="module")
def blob2(workdir):
    """A small valid version-2 file: a clustered leaf with 3 outliers, and a dense one."""
    params, state = make_case(
        np.random.default_rng(6),
        {
            "w": dict(shape=(6, 5), dtype="float32", k=3, outliers=0.1),
            "b": np.arange(3, dtype=np.float32),
        },
    )
    cj.save(workdir / "small2.cjx", params, state)
    return (workdir / "small2.cjx").read_bytes()


def _outliers(header):
    return _clustered(header)["outliers"]


def _split(blob):
    _, _, hlen = struct.unpack_from("<8sIQ", blob)
    return json.loads(blob[20 : 20 + hlen]), blob[20 + hlen :]


def _join(header, data, version=1, align=True):
    raw = json.dumps(header).encode()
    if align:
        raw += b" " * (-(20 + len(raw)) % 8)
    return struct.pack("<8sIQ", MAGIC, version, len(raw)) + raw + data


def _clustered(header):
    return next(e for e in header["leaves"] if e["kind"] == "clustered")


def _dense(header):
    return next(e for e in header["leaves"] if e["kind"] == "dense")


def test_the_small_file_is_valid(blob):
    out = loads(blob)
    assert out["w"].shape == (6, 5) and len(np.unique(out["w"])) <= 3
    assert bits_equal(out["b"], np.arange(3, dtype=np.float32))
    header, data = _split(blob)
    assert loads(_join(header, data)).keys() == out.keys()  # the helpers are faithful


def test_every_truncation_is_rejected(blob, blob2):
    for b in (blob, blob2):
        for cut in range(len(b)):
            with pytest.raises(cj.FormatError):
                loads(b[:cut])


def test_appended_bytes_are_rejected(blob):
    with pytest.raises(cj.FormatError, match="header says .* data bytes, the file has"):
        loads(blob + b"\0")


def test_wrong_magic_and_versions(blob):
    with pytest.raises(cj.FormatError, match="not a clusterjax file: magic"):
        loads(b"NOTCLUST" + blob[8:])
    header, data = _split(blob)
    with pytest.raises(cj.FormatError, match="version 4.*newer clusterjax"):
        loads(_join(header, data, version=4))
    for version in (2, 3):  # a newer reader reads the older layout as it is
        assert bits_equal(loads(_join(header, data, version=version))["w"], loads(blob)["w"])
    with pytest.raises(cj.FormatError, match="unsupported clusterjax format version 0"):
        loads(_join(header, data, version=0))


def test_header_lengths_that_disagree_with_the_file(blob):
    header, data = _split(blob)
    raw = blob[20 : -len(data)]
    for hlen, fragment in [
        (len(raw) + 8, "data bytes|not valid"),
        (len(raw) - 8, "not valid"),
        (len(raw) + 1, "8-byte boundary"),
        (2**63, "exceeds"),
        (len(blob), "exceeds"),
    ]:
        bad = struct.pack("<8sIQ", MAGIC, 1, hlen) + raw + data
        with pytest.raises(cj.FormatError, match=fragment):
            loads(bad)


def test_malicious_pickles_are_rejected_without_executing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    for name, raw in [
        ("model.cjx", pickle.dumps(Payload())),
        ("model.cjx", pickle.dumps({"w": Payload()}, protocol=0)),
        ("old.cjx", MAGIC + pickle.dumps(Payload())),  # magic, then junk
    ]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(cj.FormatError):
            cj.load(tmp_path / name)
    np.save(tmp_path / "obj.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    (tmp_path / "obj.npy").rename(tmp_path / "obj.cjx")
    with pytest.raises(cj.FormatError, match="magic"):
        cj.load(tmp_path / "obj.cjx")
    assert not marker.exists()


def test_other_formats_and_empty_files_are_rejected(tmp_path):
    np.savez(tmp_path / "a.npz", w=np.ones(3))
    from safetensors.numpy import save_file

    save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "a.safetensors"))
    for name in ("a.npz", "a.safetensors"):
        with pytest.raises(cj.FormatError, match="not a clusterjax file"):
            cj.load(tmp_path / name)
    with pytest.raises(cj.FormatError, match="truncated"):
        loads(b"")


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda h: _clustered(h).update(shape=[6, 6]), "does not match the 9 bytes"),
        (lambda h: _clustered(h).update(shape=[5, 5]), "does not match"),
        (lambda h: _clustered(h).update(shape=[6, -5]), "non-negative"),
        (lambda h: _clustered(h).update(shape="6x5"), "bad shape"),
        (lambda h: _clustered(h).update(shape=[1] * 100), "bad shape"),
        (lambda h: _dense(h).update(shape=[4]), "does not match the 16 bytes"),
        (lambda h: _dense(h).update(nbytes=16), "nbytes=16"),
        (lambda h: _dense(h).update(dtype="float64"), "does not match the 24 bytes"),
        (lambda h: _clustered(h).update(num_clusters=5), "bits=2 does not match num_clusters=5"),
        (lambda h: _clustered(h).update(num_clusters=0), "bad num_clusters"),
        (lambda h: _clustered(h).update(num_clusters=True), "bad num_clusters"),
        (lambda h: _clustered(h).update(bits=3), "bits=3"),
        (lambda h: _clustered(h).update(table_shape=[4]), "table_shape"),
        (lambda h: _clustered(h).update(table_dtype="float16"), "unsupported table dtype"),
        (lambda h: _clustered(h).update(dtype="int32"), "must be floating"),
        (lambda h: _clustered(h).update(dtype="object"), "unsupported dtype 'object'"),
        (lambda h: _clustered(h).update(dtype=["float32"]), "unsupported dtype"),
        (lambda h: _dense(h).update(dtype="|O"), "unsupported dtype"),
        (lambda h: _dense(h).update(dtype=">f4"), "unsupported dtype"),
        (lambda h: _clustered(h).update(granularity="row"), "unknown granularity"),
        (lambda h: _clustered(h).update(granularity=["tensor"]), "unknown granularity"),
        (lambda h: _clustered(h).update(channel_axis=0), "channel_axis null"),
        (
            lambda h: _clustered(h).update(granularity="channel", channel_axis=2),
            "channel_axis 2 out of range",
        ),
        (
            lambda h: _clustered(h).update(granularity="group", channel_axis=1, group_size=2),
            "group_size 2 is invalid for 5 groups",
        ),
        (lambda h: _clustered(h).update(indices_offset=10**9), "indices_offset=1000000000"),
        (lambda h: _clustered(h).update(table_offset=24), "table_offset=24, expected 16"),
        (lambda h: _dense(h).update(offset=-8), "offset=-8"),
        (lambda h: _dense(h).update(offset=1.5), "must be integers"),
        (lambda h: _clustered(h).update(kind="sparse"), "unknown kind"),
        (lambda h: _clustered(h).update(extra=1), r"unknown \['extra'\]"),
        (lambda h: _clustered(h).pop("bits"), r"missing \['bits'\]"),
        (lambda h: _clustered(h).update(path=[]), "bad leaf path"),
        (lambda h: _clustered(h).update(path=["a", ""]), "bad leaf path"),
        (lambda h: _clustered(h).update(path="w"), "bad leaf path"),
        (lambda h: _clustered(h).update(path=[None]), "bad leaf path"),
        (lambda h: _clustered(h).update(path=["b"]), "duplicate path 'b'"),
        (lambda h: _clustered(h).update(path=["b", "x"]), "below the leaf 'b'"),
        (lambda h: _dense(h).update(path=["w", 0]), "below the leaf 'w'|conflicts"),
        (lambda h: h.update(data_nbytes=1), "data bytes"),
        (lambda h: h.update(data_nbytes="112"), "data bytes"),
        (lambda h: h.update(leaves={}), "must be a list"),
        (lambda h: h.update(leaves=[1]), "not a JSON object"),
        (lambda h: h.update(format="other"), "format 'clusterjax'"),
        (lambda h: h.update(extra=True), "fields"),
        (lambda h: h.pop("leaves"), "fields"),
        (lambda h: h["leaves"].reverse(), "expected 0"),
    ],
)
def test_inconsistent_headers(blob, mutate, fragment):
    header, data = _split(blob)
    mutate(header)
    with pytest.raises(cj.FormatError, match=fragment):
        loads(_join(header, data))


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"[1, 2]", "not a JSON object"),
        (b"{'single': 'quotes'}", "not valid"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid|not a JSON object"),
        (b'{"data_nbytes": 1' + b"0" * 5000 + b"}", "not valid"),
    ],
)
def test_unparseable_headers(raw, fragment):
    raw += b" " * (-(20 + len(raw)) % 8)
    with pytest.raises(cj.FormatError, match=fragment):
        loads(struct.pack("<8sIQ", MAGIC, 1, len(raw)) + raw)


def _with_data(blob, edit, version=1):
    header, data = _split(blob)
    data = bytearray(data)
    edit(header, data)
    return _join(header, bytes(data), version=version)


def test_the_small_version_2_file_is_valid(blob2):
    out = loads(blob2, packed=True)
    assert struct.unpack_from("<I", blob2, 8)[0] == 2 and out["w"].num_outliers == 3
    header, data = _split(blob2)
    assert _outliers(header)["count"] == 3
    assert bits_equal(loads(_join(header, data, version=2))["w"], loads(blob2)["w"])
    with pytest.raises(cj.FormatError, match="part 'outliers' needs format version 2"):
        loads(_join(header, data, version=1))


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda h: _outliers(h).update(count=5), "positions_nbytes=12 does not match 5"),
        (lambda h: _outliers(h).update(count=0), "count 0 must be an integer in"),
        (lambda h: _outliers(h).update(count=31), "count 31 must be an integer in"),
        (lambda h: _outliers(h).update(count=True), "count True"),
        (lambda h: _outliers(h).update(count=3.0), "count 3.0"),
        (lambda h: _outliers(h).update(positions_dtype="int64"), "positions_dtype 'int64'"),
        (lambda h: _outliers(h).update(values_dtype="float32"), "values_dtype 'float32'"),
        (lambda h: _outliers(h).update(values_dtype=None), "values_dtype None"),
        (lambda h: _outliers(h).update(positions_offset=8), "positions_offset=8, expected"),
        (lambda h: _outliers(h).update(values_nbytes=8), "values_nbytes=8"),
        (lambda h: _outliers(h).update(values_offset="1"), "must be integers"),
        (lambda h: _outliers(h).update(extra=1), "must be an object with fields"),
        (lambda h: _outliers(h).pop("count"), "must be an object with fields"),
        (lambda h: _clustered(h).update(outliers=[]), "must be an object with fields"),
        (lambda h: _clustered(h).update(outliers=None), "must be an object with fields"),
        (lambda h: _dense(h).update(outliers=_outliers(h)), r"unknown \['outliers'\]"),
        (lambda h: _clustered(h).update(Outliers=_outliers(h)), r"unknown \['Outliers'\]"),
        (lambda h: h["leaves"].reverse(), "expected 0"),
    ],
)
def test_inconsistent_outlier_parts(blob2, mutate, fragment):
    header, data = _split(blob2)
    mutate(header)
    with pytest.raises(cj.FormatError, match=fragment):
        loads(_join(header, data, version=2))


@pytest.mark.parametrize(
    "positions, values, fragment",
    [
        ([3, 1, 7], None, "strictly increasing"),
        ([1, 1, 7], None, "strictly increasing"),
        ([-1, 1, 7], None, "strictly increasing in \\[0, 30\\)"),
        ([1, 2, 30], None, "strictly increasing in \\[0, 30\\)"),
        ([1, 2, 2**31 - 1], None, "strictly increasing"),
        (None, [1.0, np.nan, 0.0], "outlier values hold NaN/Inf"),
        (None, [1.0, np.inf, 0.0], "outlier values hold NaN/Inf"),
    ],
)
def test_bad_outlier_data_is_rejected(blob2, positions, values, fragment):
    def edit(header, data):
        o = _outliers(header)
        if positions is not None:
            off = o["positions_offset"]
            data[off : off + 12] = np.asarray(positions, "<i4").tobytes()
        if values is not None:
            off = o["values_offset"]
            data[off : off + 6] = np.asarray(values, "<f2").tobytes()

    with pytest.raises(cj.FormatError, match=fragment):
        loads(_with_data(blob2, edit, version=2))


def test_padding_before_outlier_arrays_must_be_zero(blob2):
    def edit(header, data):
        o = _outliers(header)  # 12 position bytes, then 4 padding bytes before the values
        assert o["values_offset"] == o["positions_offset"] + 16
        data[o["positions_offset"] + 13] = 1

    with pytest.raises(cj.FormatError, match="non-zero padding bytes before outliers/values"):
        loads(_with_data(blob2, edit, version=2))


def test_out_of_range_indices_are_rejected(blob):
    def edit(header, data):
        data[_clustered(header)["indices_offset"]] = 0b11  # K=3: index 3 is out of range

    with pytest.raises(cj.FormatError, match="'w': index 3 out of range for num_clusters=3"):
        loads(_with_data(blob, edit))


def test_padding_bits_and_bytes_must_be_zero(blob):
    def pad_bits(header, data):
        e = _clustered(header)  # 30 indices x 2 bits = 60 bits: the last 4 bits are padding
        data[e["indices_offset"] + e["indices_nbytes"] - 1] |= 0x40

    with pytest.raises(cj.FormatError, match="non-zero padding bits"):
        loads(_with_data(blob, pad_bits))

    def pad_bytes(header, data):
        e = _clustered(header)
        data[e["table_offset"] + e["table_nbytes"]] = 1  # 12 table bytes, then 4 padding

    with pytest.raises(cj.FormatError, match="non-zero padding bytes"):
        loads(_with_data(blob, pad_bytes))


def test_non_finite_centroids_are_rejected(blob):
    def edit(header, data):
        off = _clustered(header)["table_offset"]
        data[off : off + 4] = np.array([np.nan], "<f4").tobytes()

    with pytest.raises(cj.FormatError, match="NaN/Inf"):
        loads(_with_data(blob, edit))


def _check_accepted(out, blob):
    """A mutated file that loads must give a self-consistent tree that matches its header."""
    header = read_header(blob)
    flat = _flat(out)
    assert len(flat) == len(header["leaves"])
    for entry in header["leaves"]:
        leaf = flat["/".join(str(p) for p in entry["path"])]
        assert tuple(leaf.shape) == tuple(entry["shape"])
        if isinstance(leaf, cj.PackedArray):
            assert int(leaf.indices().max(initial=0)) < leaf.num_clusters
            assert np.isfinite(leaf.tables).all()
            if leaf.num_outliers:
                pos = np.asarray(leaf.outlier_positions)
                assert pos.dtype == np.int32 and np.all(np.diff(pos) > 0)
                assert 0 <= pos[0] and pos[-1] < leaf.size
                assert np.isfinite(np.asarray(leaf.outlier_values, np.float32)).all()
                assert leaf.unpack().shape == leaf.shape


@settings(max_examples=1000)
@given(data=st.data(), version=st.sampled_from([1, 2]))
def test_fuzz_byte_mutations(blob, blob2, data, version):
    mutated = bytearray(blob if version == 1 else blob2)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    mutated = bytes(mutated)
    try:
        out = loads(mutated, packed=True)
    except cj.FormatError:
        return
    _check_accepted(out, mutated)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["float32", "bfloat16", "int8", "tensor", "channel", "group", "w"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@settings(max_examples=1000)
@given(data=st.data(), version=st.sampled_from([1, 2]))
def test_fuzz_header_fields(blob, blob2, data, version):
    header, raw = _split(blob if version == 1 else blob2)
    targets = [header, *header["leaves"]]
    if version == 2:
        targets.append(_outliers(header))
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(targets))
        key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=4))
        if data.draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = data.draw(_json)
    mutated = _join(header, raw, version=version, align=data.draw(st.booleans()))
    try:
        out = loads(mutated, packed=True)
    except cj.FormatError:
        return
    _check_accepted(out, mutated)
    expanded = loads(mutated)
    assert all(isinstance(x, np.ndarray) for x in _flat(expanded).values())


def test_a_format_error_is_a_value_error():
    assert issubclass(cj.FormatError, ValueError)
    with pytest.raises(ValueError):
        loads(b"garbage" * 10)


def test_bf16_dense_leaves_round_trip(workdir):
    tree = {"e": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3), "f": np.float64(2.5)}
    cj.save(workdir / "bf.cjx", tree)
    out = cj.load(workdir / "bf.cjx")
    assert bits_equal(out["e"], np.asarray(tree["e"])) and bits_equal(out["f"], tree["f"])
