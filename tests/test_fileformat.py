"""Hostile packed files: every malformed input is a FormatError, never garbage or code."""

import json
import pickle
import struct

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterjax as cj
from clusterjax._src.fileformat import MAGIC, loads


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    params = {
        "w": jax.random.normal(jax.random.key(0), (6, 5)),
        "b": np.arange(3, dtype=np.float32),
    }
    state = cj.init(params, cj.ClusterSpec(num_clusters=3), key=jax.random.key(1))
    path = tmp_path_factory.mktemp("f") / "m.cjx"
    cj.save(path, params, state)
    return path.read_bytes()


def _split(blob):
    magic, version, hlen = struct.unpack_from("<8sIQ", blob)
    return json.loads(blob[20 : 20 + hlen]), blob[20 + hlen :]


def _join(header, data, version=1):
    raw = json.dumps(header).encode()
    return struct.pack("<8sIQ", MAGIC, version, len(raw)) + raw + data


def test_valid_blob_loads(blob):
    out = loads(blob)
    assert out["w"].shape == (6, 5) and len(np.unique(out["w"])) <= 3


def test_every_truncation_is_rejected(blob):
    for cut in range(len(blob)):
        with pytest.raises(cj.FormatError):
            loads(blob[:cut])


def test_wrong_magic_and_future_version(blob):
    with pytest.raises(cj.FormatError, match="magic"):
        loads(b"NOTCLUST" + blob[8:])
    header, data = _split(blob)
    with pytest.raises(cj.FormatError, match="version 2"):
        loads(_join(header, data, version=2))


def test_pickle_file_is_rejected_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle executed')",))

    path = tmp_path / "evil.cjx"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(cj.FormatError):
        cj.load(path)


def _clustered(header):
    return next(e for e in header["leaves"] if e["kind"] == "clustered")


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda h: _clustered(h).update(shape=[6, 6]), "does not match"),
        (lambda h: _clustered(h).update(num_clusters=5), "bits=2 does not match num_clusters=5"),
        (lambda h: _clustered(h).update(table_shape=[4]), "table_shape"),
        (lambda h: _clustered(h).update(dtype="object"), "unsupported dtype"),
        (lambda h: _clustered(h).update(indices_offset=10**9), "beyond"),
        (lambda h: _clustered(h).update(granularity="row"), "unknown granularity"),
        (lambda h: _clustered(h).update(path=[]), "bad leaf path"),
        (lambda h: h.update(data_nbytes=1), "data bytes"),
        (lambda h: h.update(leaves={}), "must be a list"),
        (lambda h: h["leaves"].append(dict(h["leaves"][0])), "duplicate"),
    ],
)
def test_inconsistent_headers(blob, mutate, fragment):
    header, data = _split(blob)
    mutate(header)
    with pytest.raises(cj.FormatError, match=fragment):
        loads(_join(header, data))


def test_out_of_range_index_is_rejected(blob):
    header, data = _split(blob)
    entry = _clustered(header)
    data = bytearray(data)
    off = entry["indices_offset"]
    data[off] = 0xFF  # K = 3 -> 2 bits; 0b11 = 3 is out of range
    with pytest.raises(cj.FormatError, match="out of range for num_clusters=3"):
        loads(_join(header, bytes(data)))


@settings(max_examples=3000)
@given(data=st.data())
def test_fuzz_never_crashes_otherwise(blob, data):
    mutated = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(mutated) - 1))
        mutated[pos] = data.draw(st.integers(0, 255))
    try:
        out = loads(bytes(mutated))
    except cj.FormatError:
        return
    # Accepted files must be self-consistent: every leaf a finite-shaped array.
    for leaf in jax.tree.leaves(out):
        assert isinstance(leaf, np.ndarray)
