"""`cj.summary`: rows and totals against NumPy references, text table, packed trees."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import hand_state
from test_packing import make_case, reference_strip

import clusterjax as cj


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    params, state = make_case(
        rng,
        {
            "tensor": dict(shape=(40, 6), dtype="float32", k=16),
            "channel": dict(shape=(3, 8, 5), dtype="bfloat16", k=3, granularity="channel", axis=1),
            "group": dict(shape=(20, 8), dtype="float32", k=17, granularity="group", group_size=4),
            "sparse": dict(shape=(30, 4), dtype="float32", k=4, sparse=True),
            "bias": np.array([0.0, 1.0, 0.0, 2.0], np.float32),
            "count": np.arange(3, dtype=np.int64),
        },
    )
    return params, state


def _expected_row(params, state, name):
    w = np.asarray(params[name])
    c, i, spec = state.centroids[name], state.indices[name], state.specs[name]
    n = w.size
    if c is None:
        return {
            "num_clusters": None,
            "sparsity": np.mean(w == 0),
            "packed_bytes": w.nbytes,
            "original_bytes": w.nbytes,
            "compression_ratio": 1.0,
            "relative_l2_error": 0.0,
        }
    dense = reference_strip(w, c, i, spec).astype(np.float64)
    wf = w.astype(np.float64)
    nbytes = math.ceil(n * spec.bits / 8) + np.asarray(c).nbytes
    return {
        "num_clusters": spec.num_clusters,
        "granularity": spec.granularity,
        "bits": spec.bits,
        "distinct_values": len(np.unique(dense)),
        "sparsity": np.mean(dense == 0),
        "packed_bytes": nbytes,
        "bits_per_weight": 8 * nbytes / n,
        "original_bytes": w.nbytes,  # the leaf's own dtype: 2 bytes per bfloat16
        "compression_ratio": w.nbytes / nbytes,
        "relative_l2_error": np.linalg.norm(dense - wf) / np.linalg.norm(wf),
    }


def test_rows_match_numpy_references(case):
    params, state = case
    report = cj.summary(params, state)
    rows = {r["path"]: r for r in report.rows}
    assert [r["path"] for r in report.rows] == sorted(params)  # tree order
    for name in params:
        row, want = rows[name], _expected_row(params, state, name)
        assert row["shape"] == np.shape(params[name])
        assert row["dtype"] == np.asarray(params[name]).dtype.name
        assert row["float32_bytes"] == 4 * np.size(params[name])
        for key, value in want.items():
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-9), (name, key)
            else:
                assert row[key] == value, (name, key)
    assert rows["sparse"]["sparsity"] > 0.1  # the pruned weights stay exactly zero
    assert rows["bias"]["sparsity"] == 0.5


def test_totals(case, tmp_path):
    params, state = case
    report = cj.summary(params, state)
    t = report.totals
    assert t["packed_bytes"] == sum(r["packed_bytes"] for r in report.rows)
    assert t["float32_bytes"] == sum(r["float32_bytes"] for r in report.rows)
    assert t["weights"] == sum(np.size(w) for w in params.values())
    assert t["float32_bytes"] == 4 * t["weights"]
    original = sum(np.asarray(w).nbytes for w in params.values())
    assert t["original_bytes"] == original == sum(r["original_bytes"] for r in report.rows)
    assert t["clustered_leaves"] == 4
    assert t["compression_ratio"] == pytest.approx(original / t["packed_bytes"])
    assert t["file_bytes"] == cj.save(tmp_path / "m.cjx", params, state)
    assert t["file_compression_ratio"] == pytest.approx(original / t["file_bytes"])
    dense = cj.strip(params, state)
    clustered = [n for n in params if state.specs[n] is not None]
    err2 = sum(
        np.sum((np.asarray(dense[n], np.float64) - np.asarray(params[n], np.float64)) ** 2)
        for n in clustered
    )
    norm2 = sum(np.sum(np.asarray(params[n], np.float64) ** 2) for n in clustered)
    assert t["relative_l2_error"] == pytest.approx(math.sqrt(err2 / norm2), rel=1e-9)


def test_data_is_plain_and_json_serializable(case):
    report = cj.summary(*case)
    decoded = json.loads(json.dumps({"rows": report.rows, "totals": report.totals}))
    assert decoded["rows"][0]["path"] == "bias"
    assert all(isinstance(v, (int, float, type(None))) for v in report.totals.values())


def test_text_table(case):
    report = cj.summary(*case)
    text = str(report)
    assert text == report.to_text()
    lines = text.splitlines()
    header = lines[0].split()
    assert header[:5] == ["path", "shape", "dtype", "K", "granularity"]
    assert "rel" in header and "ratio" in header
    for name in case[0]:
        assert any(line.startswith(name + " ") for line in lines), name
    row = next(line for line in lines if line.startswith("tensor "))
    assert "(40, 6)" in row and " 16 " in row and "tensor" in row
    assert next(line for line in lines if line.startswith("count ")).split()[4] == "-"
    total = next(line for line in lines if line.startswith("total "))
    assert f"{report.totals['packed_bytes']:,}" in total
    assert f"{report.totals['compression_ratio']:.2f}x" in lines[-1]
    assert f"file {report.totals['file_bytes']:,} bytes" in lines[-1]
    widths = {len(line) for line in lines[:2]}
    assert len(widths) == 1  # header and rule aligned


def test_summary_of_a_packed_tree(case, tmp_path):
    params, state = case
    full = cj.summary(params, state)
    packed = cj.pack(params, state)
    from_packed = cj.summary(packed)
    cj.save(tmp_path / "m.cjx", packed)
    from_file = cj.summary(cj.load(tmp_path / "m.cjx", packed=True))
    assert from_packed.rows == from_file.rows
    for a, b in zip(full.rows, from_packed.rows, strict=True):
        if a["num_clusters"] is not None:
            assert b["relative_l2_error"] is None  # unknown without the original weights
        assert {k: v for k, v in a.items() if k != "relative_l2_error"} == {
            k: v for k, v in b.items() if k != "relative_l2_error"
        }
    assert from_packed.totals["relative_l2_error"] is None
    assert from_packed.totals["file_bytes"] == full.totals["file_bytes"]
    assert "  -" in str(from_packed).splitlines()[-2]


def test_zero_and_constant_weights():
    params = {"z": np.zeros((4, 4), np.float32), "c": np.full((4, 4), 3.0, np.float32)}
    state = hand_state(
        params,
        {"z": np.zeros(2, np.float32), "c": np.array([3.0, 1.0], np.float32)},
        {"z": np.zeros((4, 4), np.uint8), "c": np.zeros((4, 4), np.uint8)},
        {"z": None, "c": None},
        {"z": cj.ClusterSpec(num_clusters=2), "c": cj.ClusterSpec(num_clusters=2)},
    )
    rows = {r["path"]: r for r in cj.summary(params, state).rows}
    assert rows["z"]["relative_l2_error"] == 0.0 and rows["z"]["sparsity"] == 1.0
    assert rows["z"]["distinct_values"] == 1 and rows["c"]["distinct_values"] == 1
    assert rows["c"]["relative_l2_error"] == 0.0


def test_with_a_real_init():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.zeros(32)}
    spec = cj.ClusterSpec(num_clusters=8, init="linear", granularity="channel")
    state = cj.init(params, spec, key=jax.random.key(1))
    w = {r["path"]: r for r in cj.summary(params, state).rows}["w"]
    assert w["num_clusters"] == 8 and w["granularity"] == "channel"
    assert 8 <= w["distinct_values"] <= 8 * 32
    assert w["packed_bytes"] == 64 * 32 * 3 // 8 + 32 * 8 * 4
    assert 0 < w["relative_l2_error"] < 0.2


def test_each_leaf_is_compared_with_its_own_bytes(tmp_path):
    # A dense leaf of any dtype stays itself: ratio 1.00x (an int64 buffer is 8 bytes
    # per element, not "0.50x of float32"). The bytes below are counted by hand.
    rng = np.random.default_rng(1)
    params, state = make_case(
        rng,
        {
            "emb": dict(shape=(32, 16), dtype="bfloat16", k=4),
            "position_ids": np.arange(100, dtype=np.int64).reshape(1, 100),
            "steps": np.arange(7, dtype=np.int32),
            "flags": np.ones((3, 5), bool),
            "scale": np.ones(10, jnp.bfloat16),
            "half": np.ones((4, 4), np.float16),
        },
    )
    report = cj.summary(params, state)
    rows = {r["path"]: r for r in report.rows}
    dense = {  # name: (weights, bytes per weight)
        "position_ids": (100, 8), "steps": (7, 4), "flags": (15, 1), "scale": (10, 2),
        "half": (16, 2),
    }  # fmt: skip
    for name, (n, itemsize) in dense.items():
        row = rows[name]
        assert row["num_clusters"] is None, name
        assert row["packed_bytes"] == row["original_bytes"] == n * itemsize, name
        assert row["compression_ratio"] == 1.0, name
        assert row["bits_per_weight"] == 8 * itemsize, name
        assert row["float32_bytes"] == 4 * n, name
    # bfloat16 kernel, 512 weights at K = 4: 2 bits each plus a float32 table of 4.
    emb = rows["emb"]
    packed = 512 * 2 // 8 + 4 * 4
    assert (emb["packed_bytes"], emb["original_bytes"], emb["float32_bytes"]) == (
        packed, 512 * 2, 512 * 4,
    )  # fmt: skip
    assert emb["compression_ratio"] == pytest.approx(1024 / packed)
    t = report.totals
    original = 512 * 2 + sum(n * size for n, size in dense.values())
    assert t["original_bytes"] == original
    assert t["packed_bytes"] == packed + sum(n * size for n, size in dense.values())
    assert t["float32_bytes"] == 4 * (512 + sum(n for n, _ in dense.values()))
    assert t["compression_ratio"] == pytest.approx(original / t["packed_bytes"])
    assert t["file_compression_ratio"] == pytest.approx(
        original / cj.save(tmp_path / "m.cjx", params, state)
    )
    # The table shows the same: a column named for what it holds, 1.00x for kept leaves.
    lines = str(report).splitlines()
    header = lines[0]
    assert "original B" in header and "float32" not in header
    column = header.index("original B") + len("original B")  # numbers are right-aligned
    for name, (n, itemsize) in dense.items():
        line = next(line for line in lines if line.startswith(name + " "))
        assert line[:column].endswith(f"{n * itemsize:,}"), line
        assert line.split()[-2] == "1.00x", line
    assert lines[-1].split("; ")[1] == (
        f"{t['packed_bytes']:,} bytes packed vs {original:,} original: "
        f"{original / t['packed_bytes']:.2f}x"
    )
    # A packed file holds the dtypes, so inspecting it gives the same bytes.
    from_file = cj.summary(cj.load(tmp_path / "m.cjx", packed=True))
    assert [(r["original_bytes"], r["compression_ratio"]) for r in from_file.rows] == [
        (r["original_bytes"], r["compression_ratio"]) for r in report.rows
    ]
