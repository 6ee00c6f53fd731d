"""Table formats: vector tables (`cluster_dim`), quantized tables (`lut_dtype`, CQAT) and
per-channel scales, end to end, against NumPy references."""

from __future__ import annotations

import json
import math
import struct

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fileformat import _check_accepted

import clusterjax as cj
from clusterjax._src import lut, vectors
from clusterjax._src.fileformat import file_size, file_version, loads, read_header

KEY = jax.random.key(0)


def heavy(shape, seed=0):
    return jax.random.t(jax.random.key(seed), 3.0, shape) * 0.05


def np_vectors(w, d, axis):
    """(index shape + (d,)) vectors of d consecutive weights along `axis` (NumPy)."""
    w = np.moveaxis(np.asarray(w), axis, -1)
    v = w.reshape(w.shape[:-1] + (w.shape[-1] // d, d))
    return np.moveaxis(v, -2, axis)


def np_decode(w_shape, table, indices, d, axis, scales=None, scale_axis=None, groups_axis=None):
    """The documented reconstruction, in NumPy: vector rows, then per-channel scales."""
    table = np.asarray(table, np.float32)
    idx = np.asarray(indices, np.int64)
    if groups_axis is None:
        rows = table.reshape(-1, d)[idx]
    else:
        g = np.arange(idx.shape[groups_axis]).reshape(
            [-1 if i == groups_axis else 1 for i in range(idx.ndim)]
        )
        rows = table.reshape(-1, table.shape[-2] if d > 1 else table.shape[-1], d)[g, idx]
    v = np.moveaxis(rows, axis, -2)  # (..., n/d, d) with the vector axis last
    dense = np.moveaxis(v.reshape(v.shape[:-2] + (-1,)), -1, axis)
    if scales is not None:
        view = [1] * dense.ndim
        view[scale_axis] = -1
        dense = dense * np.asarray(scales, np.float32).reshape(view)
    return dense.reshape(w_shape)


# --------------------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"cluster_dim": 2, "init": "linear"}, "scalar-only init"),
        ({"cluster_dim": 2, "init": "density"}, "scalar-only init"),
        ({"cluster_dim": 0}, "cluster_dim must be an int >= 1"),
        ({"cluster_dim": 2, "preserve_sparsity": True}, "fixed zero"),
        ({"cluster_dim": 2, "outliers": 0.01}, "need cluster_dim=1"),
        ({"per_channel_scale": True, "outliers": 0.01}, "cannot be combined"),
        ({"lut_dtype": "int4"}, "unknown lut_dtype"),
        ({"per_channel_scale": 1}, "must be a bool"),
    ],
)
def test_spec_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        cj.ClusterSpec(num_clusters=4, **kwargs)


def test_leaf_errors_name_the_leaf():
    params = {"layer": {"kernel": jnp.zeros((6, 4))}}
    spec = cj.ClusterSpec(num_clusters=2, cluster_dim=4)
    with pytest.raises(ValueError, match=r"'layer/kernel' has 6 weights along vector_axis=0"):
        cj.init(params, {".*": spec}, key=KEY)
    spec = cj.ClusterSpec(num_clusters=2, cluster_dim=2, granularity="channel", channel_axis=0)
    with pytest.raises(ValueError, match="channel_axis and vector_axis are both axis 0"):
        cj.init(params, {".*": spec}, key=KEY)
    spec = cj.ClusterSpec(num_clusters=2, cluster_dim=2, vector_axis=5)
    with pytest.raises(ValueError, match="vector_axis=5 is out of range"):
        cj.init(params, {".*": spec}, key=KEY)
    spec = cj.ClusterSpec(num_clusters=4, cluster_dim=2)
    with pytest.raises(ValueError, match="3 vectors of 2, fewer than num_clusters=4"):
        cj.init({"w": jnp.zeros((6, 1))}, {"w": spec}, key=KEY)
    with pytest.raises(ValueError, match="importance weighting is implemented for scalar"):
        cj.init(
            {"w": jnp.ones((8, 4))},
            {"w": cj.ClusterSpec(num_clusters=2, cluster_dim=2)},
            key=KEY,
            importance={"w": jnp.ones((8, 4))},
        )


# --------------------------------------------------------------------------- vectors


@settings(max_examples=15)
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 40),
    d=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_vector_assignment_is_the_nearest_vector(n, k, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, (1, n, d)).astype(np.float32)
    table = rng.standard_t(3, (1, k, d)).astype(np.float32)
    got = np.asarray(vectors.assign(jnp.asarray(x), jnp.asarray(table)))[0]
    dist = ((x[0, :, None, :].astype(np.float64) - table[0][None]) ** 2).sum(-1)  # brute force
    best = dist.min(axis=1)
    chosen = dist[np.arange(n), got]
    # Equal up to float32 rounding of the expanded distance.
    scale = (x[0].astype(np.float64) ** 2).sum(-1) + (table[0].astype(np.float64) ** 2).sum(
        -1
    ).max()
    assert np.all(chosen <= best + 1e-5 * scale)


def test_vector_assignment_in_chunks_equals_one_block(monkeypatch):
    x = heavy((2, 5000, 4), 1)
    table = heavy((2, 64, 4), 2)
    whole = np.asarray(vectors.assign(x, table))
    monkeypatch.setattr(vectors, "_CHUNK_ELEMENTS", 64 * 300)  # 300 rows per chunk
    vectors.assign.clear_cache()
    chunked = np.asarray(vectors.assign(x, table))
    vectors.assign.clear_cache()
    np.testing.assert_array_equal(whole, chunked)


def test_vector_kmeans_finds_separated_blobs_and_is_a_lloyd_fixed_point():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (6, 3))
    x = (centres[rng.integers(0, 6, 3000)] + rng.normal(0, 0.1, (3000, 3))).astype(np.float32)
    t = np.asarray(vectors.init_tables(x[None], num_clusters=6, method="kmeans", key=KEY))[0]
    found = sorted(map(tuple, np.round(t, 0)))
    assert found == sorted(
        map(tuple, np.round([x[np.argmin(((x - c) ** 2).sum(1))] for c in centres], 0))
    )
    # Lloyd fixed point: every centroid is the mean of its members (NumPy assignment).
    idx = np.argmin(((x[:, None] - t[None]) ** 2).sum(-1), axis=1)
    for j in range(6):
        np.testing.assert_allclose(t[j], x[idx == j].mean(0), atol=1e-4)


def test_vector_kmeans_beats_its_seeding_on_heavy_tails():
    x = np.asarray(heavy((1, 4000, 2), 3))
    pp = vectors.init_tables(x, num_clusters=16, method="kmeans++", key=KEY)
    km = vectors.init_tables(x, num_clusters=16, method="kmeans", key=KEY)
    rnd = vectors.init_tables(x, num_clusters=16, method="random", key=KEY)
    lo, hi = x[0].min(0), x[0].max(0)
    assert np.all((np.asarray(rnd[0]) >= lo) & (np.asarray(rnd[0]) <= hi))
    assert vectors.sse(x[0], km[0]) < vectors.sse(x[0], pp[0])


def test_vector_layout_apply_gradient_and_optimizer_against_numpy():
    w = heavy((12, 6), 4)
    params = {"w": w}
    spec = cj.ClusterSpec(num_clusters=5, cluster_dim=3, gradient_aggregation="mean")
    state = cj.init(params, {"w": spec}, key=KEY)
    table, idx = np.asarray(state.centroids["w"]), np.asarray(state.indices["w"])
    assert table.shape == (5, 3) and idx.shape == (4, 6) and idx.dtype == np.uint8
    vecs = np_vectors(w, 3, 0)  # (4, 6, 3): rows 3i..3i+2 of column j
    np.testing.assert_array_equal(vecs[1, 2], np.asarray(w)[3:6, 2])
    # Indices: nearest vector by brute force.
    dist = ((vecs[..., None, :] - table) ** 2).sum(-1)
    np.testing.assert_array_equal(idx, dist.argmin(-1))
    expected = np_decode(w.shape, table, idx, 3, 0)
    np.testing.assert_array_equal(np.asarray(cj.apply(params, state)["w"]), expected)
    np.testing.assert_array_equal(np.asarray(cj.strip(params, state)["w"]), expected)
    # Gradients: the weight gets the cotangent; a centroid the sum of its members' vectors.
    cot = np.asarray(heavy((12, 6), 5))

    def loss(p, c):
        return jnp.sum(cj.apply(p, state._replace(centroids=c))["w"] * cot)

    gw, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, state.centroids)
    np.testing.assert_allclose(gw["w"], cot)
    cvec = np_vectors(cot, 3, 0).reshape(-1, 3)
    want = np.zeros((5, 3))
    np.add.at(want, idx.reshape(-1), cvec)
    np.testing.assert_allclose(gc["w"], want, rtol=1e-5, atol=1e-7)
    # "mean": the optimizer divides by cluster sizes (empty clusters get 0).
    tx = cj.optimizer(optax.sgd(1.0))
    opt = tx.init((params, state.centroids))
    (_, uc), _ = tx.update((gw, gc), opt, (params, state.centroids), cluster_state=state)
    sizes = np.bincount(idx.reshape(-1), minlength=5)[:, None]
    np.testing.assert_allclose(
        -np.asarray(uc["w"]), np.where(sizes, want / np.maximum(sizes, 1), 0), rtol=1e-5, atol=1e-7
    )


def test_vector_channel_tables_and_update_indices():
    w = heavy((8, 6, 4), 6)  # conv-like (h, in, out): vectors along in, tables per out
    params = {"w": w}
    spec = cj.ClusterSpec(num_clusters=4, cluster_dim=2, granularity="channel", init="kmeans++")
    state = cj.init(params, {"w": spec}, key=KEY)
    assert state.centroids["w"].shape == (4, 4, 2) and state.indices["w"].shape == (8, 3, 4)
    moved = {"w": w * 1.3 + 0.01}
    new = np.asarray(cj.update_indices(moved, state).indices["w"])
    vecs = np_vectors(moved["w"], 2, 1)  # (8, 3, 4, 2)
    t = np.asarray(state.centroids["w"])  # (out, K, 2)
    dist = ((vecs[..., None, :] - t[None, None]) ** 2).sum(-1)  # (8, 3, 4, K)
    np.testing.assert_array_equal(new, dist.argmin(-1))
    dense = np.asarray(cj.strip(params, state)["w"])
    np.testing.assert_array_equal(
        dense, np_decode(w.shape, t, state.indices["w"], 2, 1, groups_axis=2)
    )


def test_vector_tables_train_on_a_regression():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
    w_true = heavy((16, 8), 7) * 20
    y = x @ w_true
    params = {"w": w_true + heavy((16, 8), 8) * 5}
    state = cj.init(params, {"w": cj.ClusterSpec(num_clusters=16, cluster_dim=2)}, key=KEY)
    tx = cj.optimizer(optax.adam(3e-3))
    opt = tx.init((params, state.centroids))

    def loss(p, c, s):
        return jnp.mean((x @ cj.apply(p, s._replace(centroids=c))["w"] - y) ** 2)

    @jax.jit
    def step(params, state, opt):
        grads = jax.grad(loss, argnums=(0, 1))(params, state.centroids, state)
        u, opt = tx.update(grads, opt, (params, state.centroids), cluster_state=state)
        params, c = optax.apply_updates((params, state.centroids), u)
        return params, cj.update_indices(params, state._replace(centroids=c)), opt

    before = float(loss(params, state.centroids, state))
    for _ in range(60):
        params, state, opt = step(params, state, opt)
    assert float(loss(params, state.centroids, state)) < 0.9 * before


# --------------------------------------------------------------------------- lut / CQAT


@settings(max_examples=15)
@given(
    g=st.integers(1, 4),
    k=st.integers(1, 20),
    seed=st.integers(0, 2**16),
    dt=st.sampled_from(["int8", "uint8"]),
)
def test_lut_quantization_against_numpy(g, k, seed, dt):
    rng = np.random.default_rng(seed)
    t = (rng.standard_t(3, (g, k)) * rng.choice([0.0, 1e-3, 1.0])).astype(np.float32)
    q, s, z = lut.quantize(jnp.asarray(t), dt, g)
    q, s = np.asarray(q), np.asarray(s)
    if dt == "int8":
        top = np.abs(t).max(1)
        want_s = np.where(top > 0, np.float32(top) / np.float32(127), 1).astype(np.float32)
        want_q = np.clip(np.round(t / s[:, None]), -127, 127)
        deq = q.astype(np.float32) * s[:, None]
        assert z is None
    else:
        lo, hi = np.minimum(t.min(1), 0), np.maximum(t.max(1), 0)
        want_s = np.where(hi > lo, (hi - lo) / np.float32(255), 1).astype(np.float32)
        zp = np.clip(np.round(-lo / s), 0, 255)
        want_q = np.clip(np.round(t / s[:, None]) + zp[:, None], 0, 255)
        np.testing.assert_array_equal(np.asarray(z), zp)
        deq = (q.astype(np.float32) - zp[:, None].astype(np.float32)) * s[:, None]
    # XLA may divide by the constant 127 / 255 as a multiplication by its reciprocal.
    np.testing.assert_allclose(s, want_s, rtol=3e-7)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(np.asarray(lut.dequantize(q, s, z, num_groups=g)), deq)
    # Within half a step of the float table.
    assert np.all(np.abs(deq - t) <= 0.5 * s[:, None] * (1 + 1e-5))


@pytest.mark.parametrize("dt", ["int8", "uint8"])
def test_cqat_forward_is_the_quantized_table_with_a_straight_through_gradient(dt):
    w = heavy((32, 8), 9)
    params = {"w": w}
    spec = cj.ClusterSpec(num_clusters=8, lut_dtype=dt, granularity="channel")
    state = cj.init(params, {"w": spec}, key=KEY)
    c = state.centroids["w"]
    q, s, z = lut.quantize(c, dt, 8)
    deq = np.asarray(lut.dequantize(q, s, z, num_groups=8))
    idx = np.asarray(state.indices["w"])
    want = deq[np.arange(8)[None, :], idx]
    np.testing.assert_array_equal(np.asarray(cj.apply(params, state)["w"]), want)
    # Indices are nearest to the quantized values (what the model reads).
    dist = np.abs(np.asarray(w)[..., None] - deq[None])
    assert np.all(dist[np.arange(32)[:, None], np.arange(8)[None], idx] <= dist.min(-1))
    cot = np.asarray(heavy((32, 8), 10))
    gc = jax.grad(lambda c: jnp.sum(cj.apply(params, state._replace(centroids=c))["w"] * cot))(
        state.centroids
    )["w"]
    want_g = np.zeros((8, 8))
    np.add.at(want_g, (np.broadcast_to(np.arange(8), idx.shape), idx), cot)
    np.testing.assert_allclose(gc, want_g, rtol=1e-5, atol=1e-7)


def test_uint8_tables_keep_the_zero_centroid_exact():
    w = np.asarray(heavy((64, 4), 11)).copy()
    w[::3] = 0.0
    params = {"w": jnp.asarray(w)}
    spec = cj.ClusterSpec(num_clusters=6, lut_dtype="uint8", preserve_sparsity=True)
    state = cj.init(params, {"w": spec}, key=KEY)
    dense = np.asarray(cj.strip(params, state)["w"])
    assert np.all(dense[w == 0] == 0) and np.all(dense[w != 0] != 0)


# --------------------------------------------------------------------------- scales


def test_per_channel_scales_against_numpy():
    w = heavy((16, 6), 12) * jnp.arange(1, 7)[None, :]  # channels of very different ranges
    w = w.at[:, 3].set(0.0)
    params = {"w": w}
    spec = cj.ClusterSpec(num_clusters=4, per_channel_scale=True)
    state = cj.init(params, {"w": spec}, key=KEY)
    scales = np.asarray(state.scales["w"])
    rms = np.sqrt(np.mean(np.square(np.asarray(w, np.float64)), axis=0))
    assert scales.dtype == np.float16
    np.testing.assert_array_equal(scales, np.where(rms > 0, rms.astype(np.float16), 1))
    t, idx = np.asarray(state.centroids["w"]), np.asarray(state.indices["w"])
    want = (t[idx] * scales.astype(np.float32)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(cj.strip(params, state)["w"]), want)
    np.testing.assert_array_equal(np.asarray(cj.apply(params, state)["w"]), want)
    # Indices: nearest centroid to w / scale.
    x = np.asarray(w) / scales.astype(np.float32)
    assert np.all(np.abs(x - t[idx]) <= np.abs(x[..., None] - t).min(-1) + 1e-7)
    cot = np.asarray(heavy((16, 6), 13))
    gc = jax.grad(lambda c: jnp.sum(cj.apply(params, state._replace(centroids=c))["w"] * cot))(
        state.centroids
    )
    want_g = np.zeros(4)
    np.add.at(want_g, idx, cot * scales.astype(np.float32))
    np.testing.assert_allclose(gc["w"], want_g, rtol=1e-5, atol=1e-7)
    # The per-tensor table with scales beats one without on these channels.
    plain = cj.init(params, {"w": cj.ClusterSpec(num_clusters=4)}, key=KEY)
    err = lambda s: float(jnp.linalg.norm(cj.strip(params, s)["w"] - w))  # noqa: E731
    assert err(state) < err(plain)


def test_state_with_scales_round_trips_through_flax_serialization():
    params = {"w": heavy((16, 4), 14)}
    spec = cj.ClusterSpec(num_clusters=4, per_channel_scale=True, cluster_dim=2)
    state = cj.init(params, {"w": spec}, key=KEY)
    restored = flax.serialization.from_bytes(state, flax.serialization.to_bytes(state))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    assert restored.plan == state.plan and len(jax.tree.leaves(state)) == 3
    bad = state._replace(scales={"w": jnp.ones(4, jnp.float32)})
    with pytest.raises(ValueError, match="float16 scales of shape"):
        cj.strip(params, bad)


# --------------------------------------------------------------------------- files and sizes

FORMATS = {
    "vec2": cj.ClusterSpec(num_clusters=16, cluster_dim=2),
    "vec4_channel": cj.ClusterSpec(num_clusters=8, cluster_dim=4, granularity="channel"),
    "vec2_axis0_group": cj.ClusterSpec(
        num_clusters=4,
        cluster_dim=2,
        vector_axis=0,
        granularity="group",
        group_size=4,
        channel_axis=1,
    ),
    "int8": cj.ClusterSpec(num_clusters=8, lut_dtype="int8"),
    "uint8_channel": cj.ClusterSpec(num_clusters=8, lut_dtype="uint8", granularity="channel"),
    "scale": cj.ClusterSpec(num_clusters=8, per_channel_scale=True),
    "all": cj.ClusterSpec(
        num_clusters=16,
        cluster_dim=2,
        lut_dtype="uint8",
        per_channel_scale=True,
        granularity="group",
        group_size=4,
    ),
    "int8_outliers": cj.ClusterSpec(num_clusters=4, lut_dtype="int8", outliers=0.02),
}


def ideal_bytes(spec, shape):
    """Indices at ceil(log2 K) bits per d weights + tables + lut scales + scales, by hand."""
    n, k, d = math.prod(shape), spec.num_clusters, spec.cluster_dim
    g = 1 if spec.granularity == "tensor" else shape[spec.channel_axis] // (spec.group_size or 1)
    out = math.ceil(n // d * math.ceil(math.log2(k)) / 8)
    out += g * k * d * (1 if spec.lut_dtype else 4)
    out += {None: 0, "int8": 4 * g, "uint8": 5 * g}[spec.lut_dtype]
    out += 2 * shape[spec.channel_axis] if spec.per_channel_scale else 0
    return out + 6 * round(spec.outliers * n)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_strip_equals_load_of_save_and_sizes_are_ideal(tmp_path, name, dtype):
    spec = FORMATS[name]
    shape = (128, 32)
    params = {"w": heavy(shape, 15).astype(dtype), "b": jnp.ones(32)}
    state = cj.init(params, {"w": spec}, key=KEY)
    dense = cj.strip(params, state)["w"]
    assert dense.dtype == dtype
    path = tmp_path / "m.cjx"
    nbytes = cj.save(path, params, state)
    blob = path.read_bytes()
    loaded = cj.load(path)
    np.testing.assert_array_equal(
        np.asarray(loaded["w"]).view(np.uint8), np.asarray(dense).view(np.uint8)
    )
    packed = cj.load(path, packed=True)["w"]
    np.testing.assert_array_equal(packed.indices(), state.indices["w"])
    ideal = ideal_bytes(spec, shape)
    assert packed.nbytes == ideal == state.plan.leaves[1].stored_nbytes(dtype)
    hlen = struct.unpack_from("<Q", blob, 12)[0]
    assert nbytes == len(blob) == file_size(cj.pack(params, state))
    assert len(blob) <= 1.01 * (20 + hlen + ideal + 32 * 4)  # + the dense float32 bias
    version = file_version(blob)
    assert version == 3
    report = cj.summary(params, state)
    row = report.rows[1]
    assert row["packed_bytes"] == ideal
    assert row["bits_per_weight"] == pytest.approx(8 * ideal / math.prod(shape))
    assert row["relative_l2_error"] == pytest.approx(
        float(jnp.linalg.norm(dense.astype(jnp.float32) - params["w"].astype(jnp.float32)))
        / float(jnp.linalg.norm(params["w"].astype(jnp.float32))),
        rel=1e-4,
    )
    assert row["distinct_values"] == len(np.unique(np.asarray(dense, np.float64)))


def test_scalar_float_files_stay_version_1(tmp_path):
    params = {"w": heavy((64, 8), 16)}
    path = tmp_path / "m.cjx"
    cj.save(path, params, cj.init(params, cj.ClusterSpec(num_clusters=4), key=KEY))
    assert file_version(path.read_bytes()) == 1


def test_vector_file_is_ideal_at_a_million_weights(tmp_path):
    params = {"w": heavy((1024, 1024), 17)}
    spec = cj.ClusterSpec(num_clusters=16, cluster_dim=2, init="kmeans++")
    state = cj.init(params, spec, key=KEY)
    nbytes = cj.save(tmp_path / "m.cjx", params, state)
    ideal = 1024 * 1024 // 2 * 4 // 8 + 16 * 2 * 4  # 2 bits per weight plus the table
    assert ideal <= nbytes <= 1.01 * ideal


@pytest.fixture(scope="module")
def blob3(tmp_path_factory):
    params = {"w": heavy((8, 6), 18), "v": heavy((8, 4), 19)}
    rules = {
        "w": cj.ClusterSpec(
            num_clusters=4, cluster_dim=2, lut_dtype="uint8", per_channel_scale=True
        ),
        "v": cj.ClusterSpec(num_clusters=3, lut_dtype="int8", granularity="channel"),
    }
    path = tmp_path_factory.mktemp("v3") / "m.cjx"
    cj.save(path, params, cj.init(params, rules, key=KEY))
    return path.read_bytes()


def _split(blob):
    hlen = struct.unpack_from("<Q", blob, 12)[0]
    return json.loads(blob[20 : 20 + hlen]), blob[20 + hlen :]


def _join(header, data, version=3):
    raw = json.dumps(header).encode()
    raw += b" " * (-(20 + len(raw)) % 8)
    return struct.pack("<8sIQ", b"CLUSTJAX", version, len(raw)) + raw + data


def _leaf(header, name):
    return next(e for e in header["leaves"] if e["path"] == [name])


def test_the_version_3_header(blob3):
    header = read_header(blob3)
    w, v = _leaf(header, "w"), _leaf(header, "v")
    assert w["vectors"] == {"cluster_dim": 2, "vector_axis": 0}
    assert w["table_dtype"] == "uint8" and w["table_shape"] == [4, 2]
    assert set(w["lut"]) == {
        "count",
        "scale_dtype",
        "scale_offset",
        "scale_nbytes",
        "zero_point_dtype",
        "zero_point_offset",
        "zero_point_nbytes",
    }
    assert w["scales"]["axis"] == 1 and w["scales"]["count"] == 6
    assert w["indices_nbytes"] == 8 * 6 // 2 * 2 // 8
    assert v["table_dtype"] == "int8" and set(v["lut"]) == {
        "count",
        "scale_dtype",
        "scale_offset",
        "scale_nbytes",
    }
    assert v["lut"]["count"] == 4


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda h: _leaf(h, "w")["vectors"].update(cluster_dim=3), "vector_axis"),
        (lambda h: _leaf(h, "w")["vectors"].update(cluster_dim=1), "cluster_dim 1"),
        (lambda h: _leaf(h, "w")["vectors"].update(vector_axis=2), "vector_axis 2"),
        (lambda h: _leaf(h, "w")["vectors"].pop("vector_axis"), "part 'vectors' must be"),
        (lambda h: _leaf(h, "w").pop("vectors"), "table_shape"),
        (lambda h: _leaf(h, "w")["lut"].update(count=2), "count 2"),
        (lambda h: _leaf(h, "w")["lut"].pop("zero_point_dtype"), "part 'lut' must be"),
        (lambda h: _leaf(h, "v").update(table_dtype="float32"), "'v': unsupported table dtype"),
        (lambda h: _leaf(h, "w").update(table_dtype="float32"), "'w': part 'lut' must be"),
        (lambda h: _leaf(h, "v").update(table_dtype="uint8"), "part 'lut' must be"),
        (lambda h: _leaf(h, "v").pop("lut"), "unsupported table dtype 'int8'"),
        (lambda h: _leaf(h, "w")["scales"].update(axis=0), "count 6"),
        (lambda h: _leaf(h, "w")["scales"].update(axis=3), "part 'scales': axis 3"),
        (lambda h: _leaf(h, "w")["scales"].update(values_dtype="float32"), "values_dtype"),
    ],
)
def test_inconsistent_version_3_parts(blob3, mutate, fragment):
    header, data = _split(blob3)
    mutate(header)
    with pytest.raises(cj.FormatError, match=fragment):
        loads(_join(header, data))


def test_version_3_parts_in_an_older_version_are_rejected(blob3):
    header, data = _split(blob3)
    with pytest.raises(cj.FormatError, match="needs format version 3, the file is 2"):
        loads(_join(header, data, version=2))


def _edit_array(blob, leaf, part, array, values):
    header, data = _split(blob)
    entry = _leaf(header, leaf)[part]
    off = entry[f"{array}_offset"]
    raw = np.asarray(values, entry[f"{array}_dtype"]).tobytes()
    data = data[:off] + raw + data[off + len(raw) :]
    return _join(header, data)


def test_non_finite_lut_and_channel_scales_are_rejected(blob3):
    with pytest.raises(cj.FormatError, match="lut scales hold NaN/Inf"):
        loads(_edit_array(blob3, "w", "lut", "scale", [np.inf]))
    with pytest.raises(cj.FormatError, match="per-channel scales hold NaN/Inf"):
        loads(_edit_array(blob3, "w", "scales", "values", [np.nan] * 6))


@settings(max_examples=400)
@given(data=st.data())
def test_fuzz_version_3_byte_mutations(blob3, data):
    mutated = bytearray(blob3)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    try:
        out = loads(bytes(mutated), packed=True)
    except cj.FormatError:
        return
    _check_accepted(out, bytes(mutated))
    for leaf in out.values():
        if isinstance(leaf, cj.PackedArray):
            assert leaf.unpack().shape == leaf.shape


_values = (
    st.none()
    | st.booleans()
    | st.integers(-3, 9)
    | st.sampled_from(["int8", "uint8", "float16", "float32", [], {}])
)


@settings(max_examples=200)
@given(data=st.data())
def test_fuzz_version_3_header_fields(blob3, data):
    header, raw = _split(blob3)
    w = _leaf(header, "w")
    targets = [
        w,
        w["vectors"],
        w["lut"],
        w["scales"],
        _leaf(header, "v"),
        _leaf(header, "v")["lut"],
    ]
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(targets))
        key = data.draw(st.sampled_from(sorted(target) or ["count"]))
        if data.draw(st.booleans()) and key in target:
            del target[key]
        else:
            target[key] = data.draw(_values)
    mutated = _join(header, raw)
    try:
        out = loads(mutated, packed=True)
    except cj.FormatError:
        return
    _check_accepted(out, mutated)
    for leaf in out.values():
        if isinstance(leaf, cj.PackedArray):
            assert np.isfinite(np.asarray(leaf.unpack(), np.float32)).all()
