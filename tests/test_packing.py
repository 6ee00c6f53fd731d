"""Bit-packing, pack/unpack, save/load round trips and file sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterjax as cj
from clusterjax._src.packing import pack_bits, unpack_bits


@given(bits=st.integers(1, 16), n=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_bits_round_trip(bits, n, seed):
    values = np.random.default_rng(seed).integers(0, 2**bits, size=n)
    stream = pack_bits(values, bits)
    assert stream.dtype == np.uint8 and stream.size == -(-n * bits // 8)
    np.testing.assert_array_equal(unpack_bits(stream, bits, n), values)


def test_bit_order_is_documented_little_endian():
    # 3 two-bit values 1, 2, 3 -> bits 10 01 11 (LSB first) -> 0b00111001 = 57.
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3]), 2), [57])
    np.testing.assert_array_equal(pack_bits(np.array([5]), 3), [5])


def _tree(seed, dtype):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "a": {"kernel": jax.random.normal(k[0], (20, 12), dtype), "bias": jnp.ones(12, dtype)},
        "conv": jax.random.normal(k[1], (3, 3, 4, 6), dtype),
        "count": jnp.arange(5, dtype=jnp.int32),
    }


@settings(max_examples=25)
@given(
    k=st.sampled_from([2, 3, 16, 17, 256]),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    sparse=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_save_load_equals_strip_exactly(tmp_path_factory, k, granularity, dtype, sparse, seed):
    params = _tree(seed, dtype)
    if sparse:
        params["conv"] = params["conv"] * (jnp.abs(params["conv"]) > 0.5)
    group = {"granularity": granularity, "group_size": 2 if granularity == "group" else None}
    rules = {
        "a/kernel": cj.ClusterSpec(
            num_clusters=min(k, 20), init="density", preserve_sparsity=sparse, **group
        ),
        "conv": cj.ClusterSpec(num_clusters=min(k, 36), init="linear", **group),
    }
    state = cj.init(params, rules, key=jax.random.key(seed))
    path = tmp_path_factory.mktemp("pack") / "m.cjx"
    cj.save(path, params, state)
    loaded = cj.load(path)
    expected = cj.strip(params, state)
    for name in ("a/kernel", "a/bias", "conv", "count"):
        parts = name.split("/")
        got, want = loaded, expected
        for p in parts:
            got, want = got[p], want[p]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8)
        )  # bit for bit
    packed = cj.load(path, packed=True)
    assert isinstance(packed["a"]["kernel"], cj.PackedArray)
    np.testing.assert_array_equal(packed["a"]["kernel"].indices(), state.indices["a"]["kernel"])


def test_file_size_is_n_bits_plus_tables(tmp_path):
    n = 1 << 20
    params = {"w": jax.random.normal(jax.random.key(0), (1024, 1024))}
    state = cj.init(params, cj.ClusterSpec(num_clusters=16, init="linear"), key=jax.random.key(1))
    size = cj.save(tmp_path / "m.cjx", params, state)
    assert size == (tmp_path / "m.cjx").stat().st_size
    payload = n // 2 + 16 * 4
    assert payload <= size <= 1.01 * payload
    ratio = (n * 4) / size
    assert ratio > 7.9


def test_summary_rows_and_totals():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.zeros(32)}
    state = cj.init(
        params, cj.ClusterSpec(num_clusters=8, granularity="channel"), key=jax.random.key(1)
    )
    report = cj.summary(params, state)
    rows = {r["path"]: r for r in report.rows}
    w = rows["w"]
    assert w["num_clusters"] == 8 and w["granularity"] == "channel"
    assert w["distinct_values"] <= 8 * 32
    expected_bytes = 64 * 32 * 3 // 8 + 32 * 8 * 4
    assert w["packed_bytes"] == expected_bytes
    dense = np.asarray(cj.strip(params, state)["w"], np.float64)
    ref = np.linalg.norm(dense - np.asarray(params["w"])) / np.linalg.norm(np.asarray(params["w"]))
    assert w["relative_l2_error"] == pytest.approx(ref, rel=1e-6)
    assert rows["b"]["num_clusters"] is None and rows["b"]["packed_bytes"] == 32 * 4
    t = report.totals
    assert t["compression_ratio"] == pytest.approx((64 * 32 * 4 + 128) / (expected_bytes + 128))
    text = str(report)
    assert "w" in text and "compression:" in text and "channel" in text
