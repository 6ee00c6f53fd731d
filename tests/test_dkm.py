"""Differentiable k-means (`ClusterSpec(assignment="dkm")`) against a dense N x K
reference with the iterations unrolled and plain autodiff (which lives here only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from reference import nearest_reference

import clusterjax as cj
from clusterjax._src import dkm

KEY = jax.random.key(0)


def naive_soft(w, valid, c0, tau, iters):
    """Dense DKM of grouped weights `(G, n)`: the `(G, n, K)` attention, unrolled."""
    c = jax.lax.stop_gradient(c0)
    v = jnp.ones(w.shape, w.dtype) if valid is None else valid.astype(w.dtype)

    def attention(c):
        return jax.nn.softmax(-jnp.square(w[..., None] - c[:, None, :]) / tau[:, None, None], -1)

    for _ in range(iters):
        a = attention(c) * v[..., None]
        num, den = jnp.sum(a * w[..., None], 1), jnp.sum(a, 1)
        c = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), c)
    return jnp.sum(attention(c) * c[:, None, :], -1)


def naive_leaf(w, centroids, axis, k, iters, temperature=None, mask=None):
    """The reference of `cj.apply` on one DKM leaf, geometry derived here from scratch."""
    w32 = w.astype(jnp.float32)
    moved = w32 if axis is None else jnp.moveaxis(w32, axis, 0)
    grouped = moved.reshape(1 if axis is None else moved.shape[0], -1)
    tables = jnp.asarray(centroids, jnp.float32).reshape(-1, k)
    valid = None
    if mask is not None:
        m = mask if axis is None else jnp.moveaxis(mask, axis, 0)
        valid = m.reshape(grouped.shape)
        tables = tables[:, 1:]
    if temperature is None:
        tau = dkm.auto_temperature(tables)
    else:
        tau = jnp.full(tables.shape[:1], temperature, jnp.float32)
    out = naive_soft(grouped, valid, tables, tau, iters).reshape(moved.shape)
    out = out if axis is None else jnp.moveaxis(out, 0, axis)
    if mask is not None:
        out = jnp.where(mask, out, 0.0)
    return out.astype(w.dtype)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _state(params, spec):
    return cj.init(params, {"w": spec}, key=KEY)


# ---------------------------------------------------------------------------------------
# The spec.


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"assignment": "soft"}, r"assignment='soft'.*'hard', 'dkm'"),
        ({"assignment": "dkm", "temperature": 0.0}, r"temperature=0.0.*finite float > 0"),
        ({"assignment": "dkm", "temperature": float("nan")}, r"temperature=nan"),
        ({"assignment": "dkm", "temperature": True}, r"temperature=True"),
        ({"temperature": 0.1}, r"only applies to assignment='dkm'"),
        ({"assignment": "dkm", "dkm_iters": 0}, r"dkm_iters=0.*int >= 1"),
        ({"assignment": "dkm", "dkm_iters": 2.0}, r"dkm_iters=2.0"),
        ({"assignment": "dkm", "update_indices": False}, r"cannot be frozen"),
        ({"assignment": "dkm", "cluster_dim": 2}, r"plain scalar tables"),
        ({"assignment": "dkm", "lut_dtype": "int8"}, r"plain scalar tables"),
        ({"assignment": "dkm", "per_channel_scale": True}, r"plain scalar tables"),
    ],
)
def test_spec_rejects_bad_dkm_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cj.ClusterSpec(num_clusters=4, **kwargs)


def test_spec_defaults():
    spec = cj.ClusterSpec(num_clusters=4)
    assert (spec.assignment, spec.temperature, spec.dkm_iters) == ("hard", None, 3)
    spec = cj.ClusterSpec(num_clusters=4, assignment="dkm", temperature=np.float32(0.5))
    assert isinstance(spec.temperature, float) and spec.temperature == 0.5


def test_auto_temperature_is_half_the_squared_median_positive_gap():
    rng = np.random.default_rng(0)
    tables = np.sort(rng.normal(size=(5, 7)), axis=1).astype(np.float32)
    tables[1, 2:5] = tables[1, 2]  # coinciding centroids are ignored
    got = np.asarray(dkm.auto_temperature(jnp.asarray(tables)))
    for row, t in zip(tables, got):
        gaps = np.diff(np.sort(row))
        gaps = np.sort(gaps[gaps > 0])
        np.testing.assert_allclose(t, 0.5 * gaps[(len(gaps) - 1) // 2] ** 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Exactness against the dense reference.


@pytest.mark.parametrize(
    ("shape", "k"),
    [((400, 250), 16), pytest.param((317, 211), 8, marks=pytest.mark.slow)],
)
def test_matches_dense_reference_on_1e5_weights(shape, k):
    w = jax.random.normal(KEY, shape) * 0.05
    spec = cj.ClusterSpec(num_clusters=k, assignment="dkm")
    params = {"w": w}
    state = _state(params, spec)
    up = jax.random.normal(jax.random.key(1), shape)

    def ours(p):
        return jnp.sum(cj.apply(p, state)["w"] * up)

    def ref(p):
        return jnp.sum(naive_leaf(p["w"], state.centroids["w"], None, k, 3) * up)

    out = jax.jit(cj.apply)(params, state)["w"]
    assert rel(out, naive_leaf(w, state.centroids["w"], None, k, 3)) <= 1e-4
    g_ours, g_ref = jax.jit(jax.grad(ours))(params)["w"], jax.jit(jax.grad(ref))(params)["w"]
    assert rel(g_ours, g_ref) <= 1e-4
    # The soft map really is soft, and really is close to the hard one.
    hard = cj.strip(params, state)["w"]
    assert 0 < rel(out, hard) < 0.5


@settings(max_examples=3, deadline=None)
@given(
    g=st.integers(1, 3),
    n=st.integers(1, 300),
    k=st.integers(1, 6),
    iters=st.integers(1, 4),
    masked=st.booleans(),
    chunk=st.sampled_from([8, 64, 1 << 18]),
    seed=st.integers(0, 2**16),
)
def test_soft_map_any_chunking_matches_reference(g, n, k, iters, masked, chunk, seed):
    """Several chunks, a remainder, one chunk: the same values and gradients. In float64,
    so that only the algorithm is compared: at small temperatures the map is a steep
    staircase, and float32 rounding of the centroids moves weights near a step."""
    with pytest.MonkeyPatch.context() as mp, jax.enable_x64(True):
        mp.setattr(dkm, "_CHUNK_ENTRIES", chunk)
        rng = np.random.default_rng(seed)
        w = jnp.asarray(rng.normal(size=(g, n)))
        c0 = jnp.asarray(np.sort(rng.normal(size=(g, k)), axis=1))
        tau = dkm.auto_temperature(c0)
        valid = jnp.asarray(rng.random((g, n)) < 0.7) if masked else None
        up = jnp.asarray(rng.normal(size=(g, n)))

        def f(soft, x):
            return jnp.sum(soft(x, valid, c0, tau, iters) * up)

        ours = jax.jit(jax.value_and_grad(lambda x: f(dkm.soft_map, x)))
        ref = jax.jit(jax.value_and_grad(lambda x: f(naive_soft, x)))
        (v1, g1), (v2, g2) = ours(w), ref(w)
        np.testing.assert_allclose(v1, v2, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(g1, g2, rtol=1e-8, atol=1e-8 * float(jnp.max(jnp.abs(g2))))
        out = dkm.soft_map(w, valid, c0, tau, iters)
        np.testing.assert_allclose(out, naive_soft(w, valid, c0, tau, iters), rtol=1e-10)


def test_check_grads_float64():
    with jax.enable_x64(True):
        w = jax.random.normal(KEY, (6, 5), jnp.float64)
        for spec in (
            cj.ClusterSpec(num_clusters=3, assignment="dkm", dkm_iters=2),
            cj.ClusterSpec(num_clusters=2, assignment="dkm", granularity="channel"),
        ):
            state = _state({"w": w}, spec)
            assert state.centroids["w"].dtype == jnp.float64
            check_grads(
                lambda x, state=state: cj.apply({"w": x}, state)["w"],
                (w,),
                order=1,
                modes=["rev"],
                eps=1e-6,
            )


# ---------------------------------------------------------------------------------------
# The grid path: tables of many weights, against a float64 dense reference.


def _tables_of(dist, g, n, k, seed):
    rng = np.random.default_rng(seed)
    draw = {
        "normal": lambda: rng.normal(size=(g, n)),
        "truncated": lambda: np.clip(rng.normal(size=(g, n)), -2, 2),
        "uniform": lambda: rng.uniform(-1, 1, size=(g, n)),
        "student3": lambda: rng.standard_t(3, size=(g, n)),
    }[dist]
    w = (0.05 * draw()).astype(np.float32)
    c0 = np.stack([np.quantile(row, (np.arange(k) + 0.5) / k) for row in w]).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(c0), jnp.asarray(rng.normal(size=(g, n)), jnp.float32)


def _f64_soft(w, valid, c0, tau, iters, up):
    """The dense reference in float64: output and d sum(out * up) / dw."""
    with jax.enable_x64(True):
        f64 = jnp.float64
        args = (c0.astype(f64), tau.astype(f64))

        def loss(x):
            out = naive_soft(x, valid, *args, iters)
            return jnp.sum(out * up.astype(f64)), out

        (_, out), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(w.astype(f64))
        return np.asarray(out), np.asarray(g)


def _grid_used(w, valid, c0, tau, iters):
    assert dkm._uses_grid(w.shape[1], c0.shape[1])
    return bool(jax.jit(dkm._grid_setup, static_argnums=4)(w, valid, c0, tau, iters)[1])


@pytest.mark.parametrize(
    ("dist", "g", "n", "masked"),
    [("normal", 1, 150_000, False), ("truncated", 2, 70_000, True), ("uniform", 1, 40_000, False)],
)
def test_grid_path_matches_float64_reference(dist, g, n, masked):
    w, c0, up = _tables_of(dist, g, n, 16, seed=n)
    tau = dkm.auto_temperature(c0)
    valid = jax.random.uniform(KEY, w.shape) < 0.8 if masked else None
    assert _grid_used(w, valid, c0, tau, 3)
    out = jax.jit(lambda x: dkm.soft_map(x, valid, c0, tau, 3))(w)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(dkm.soft_map(x, valid, c0, tau, 3) * up)))(w)
    ref_out, ref_grad = _f64_soft(w, valid, c0, tau, 3, up)
    assert rel(out, ref_out) <= 1e-5
    assert rel(grad, ref_grad) <= 1e-4
    # Not the exact path in disguise: the chunked one is closer still.
    exact = jax.jit(jax.grad(lambda x: jnp.sum(dkm._exact_map(x, valid, c0, tau, 3) * up)))(w)
    assert rel(exact, ref_grad) < rel(grad, ref_grad)
    # The refreshed warm start: the same centroids as the dense iterations.
    with jax.enable_x64(True):
        f64 = jnp.float64
        cs = dkm._iterate(w.astype(f64), valid, c0.astype(f64), tau.astype(f64), 3)
        want = np.asarray(cs[0][-1])
    got = np.asarray(dkm.centroids_after(w, valid, c0, tau, 3))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.ptp(want)))


def test_heavy_tails_take_the_exact_path():
    """Far tail centroids make near-steps the nodes cannot resolve: the measured error
    sends the call to the exact chunked path, whose result it then is, bit for bit."""
    w, c0, up = _tables_of("student3", 1, 60_000, 16, seed=3)
    tau = dkm.auto_temperature(c0)
    assert not _grid_used(w, None, c0, tau, 3)

    def grad(fn):
        return jax.jit(jax.grad(lambda x: jnp.sum(fn(x, None, c0, tau, 3) * up)))(w)

    np.testing.assert_array_equal(grad(dkm.soft_map), grad(dkm._exact_map))
    np.testing.assert_array_equal(
        jax.jit(lambda x: dkm.soft_map(x, None, c0, tau, 3))(w),
        jax.jit(lambda x: dkm._exact_map(x, None, c0, tau, 3))(w),
    )
    got = dkm.centroids_after(w, None, c0, tau, 3)
    np.testing.assert_array_equal(got, dkm._iterate(w, None, c0, tau, 3)[0][-1])


@settings(max_examples=6, deadline=None)
@given(
    dist=st.sampled_from(["normal", "truncated", "uniform", "student3"]),
    k=st.sampled_from([4, 8, 16]),
    scale=st.sampled_from([None, 0.2, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_grid_is_used_only_when_accurate(dist, k, scale, seed):
    """Whatever the table and temperature: when the measured interpolation error lets
    the grid path run, its gradient is within the issue's 1e-4 of the float64 one."""
    w, c0, up = _tables_of(dist, 1, 40_000, k, seed)
    tau = dkm.auto_temperature(c0)
    if scale is not None:
        tau = tau * scale
    grad = jax.jit(jax.grad(lambda x: jnp.sum(dkm.soft_map(x, None, c0, tau, 2) * up)))(w)
    _, ref = _f64_soft(w, None, c0, tau, 2, up)
    assert rel(grad, ref) <= 1e-4, _grid_used(w, None, c0, tau, 2)


@pytest.mark.parametrize(
    ("granularity", "axis", "group_size"),
    [("channel", -1, None), pytest.param("channel", 0, None, marks=pytest.mark.slow)],
)
def test_per_channel_tables(granularity, axis, group_size):
    w = jax.random.normal(KEY, (24, 6, 4))
    spec = cj.ClusterSpec(
        num_clusters=4,
        assignment="dkm",
        granularity=granularity,
        channel_axis=axis,
        group_size=group_size,
    )
    state = _state({"w": w}, spec)
    cen = state.centroids["w"]
    a = axis % 3
    up = jax.random.normal(jax.random.key(3), w.shape)

    def ref(x):
        return naive_leaf(x, cen, a, 4, 3, spec.temperature)

    np.testing.assert_allclose(cj.apply({"w": w}, state)["w"], ref(w), rtol=1e-5, atol=1e-6)
    g1 = jax.grad(lambda x: jnp.sum(cj.apply({"w": x}, state)["w"] * up))(w)
    g2 = jax.grad(lambda x: jnp.sum(ref(x) * up))(w)
    assert rel(g1, g2) <= 1e-4


@pytest.mark.slow
def test_grouped_tables_pool_their_channels():
    """A group's table is re-estimated from all its channels: the reference moves the
    group axis next to the table (group_size channels = one table of their weights)."""
    w = jax.random.normal(KEY, (10, 6))
    spec = cj.ClusterSpec(num_clusters=3, assignment="dkm", granularity="group", group_size=2)
    state = _state({"w": w}, spec)
    grouped = jnp.moveaxis(w, 1, 0).reshape(3, 20)  # channels 2g, 2g+1 -> table g
    tables = state.centroids["w"]
    want = naive_soft(grouped, None, tables, dkm.auto_temperature(tables), 3)
    got = jnp.moveaxis(cj.apply({"w": w}, state)["w"], 1, 0).reshape(3, 20)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_jit_equals_eager_and_centroids_get_zero_gradient():
    w = jax.random.normal(KEY, (32, 16))
    state = _state({"w": w}, cj.ClusterSpec(num_clusters=4, assignment="dkm"))

    def loss(p, c):
        return jnp.sum(jnp.sin(cj.apply(p, state._replace(centroids=c))["w"]))

    eager = jax.grad(loss, argnums=(0, 1))({"w": w}, state.centroids)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))({"w": w}, state.centroids)
    np.testing.assert_allclose(eager[0]["w"], jitted[0]["w"], rtol=1e-5, atol=1e-7)
    assert not np.any(eager[1]["w"]) and not np.any(jitted[1]["w"])
    np.testing.assert_allclose(
        jax.jit(cj.apply)({"w": w}, state)["w"], cj.apply({"w": w}, state)["w"], rtol=1e-6
    )


def test_preserve_sparsity():
    w = jax.random.normal(KEY, (40, 30))
    w = jnp.where(jax.random.uniform(jax.random.key(5), w.shape) < 0.3, 0.0, w)
    spec = cj.ClusterSpec(num_clusters=5, assignment="dkm", preserve_sparsity=True)
    state = _state({"w": w}, spec)
    mask = state.masks["w"]
    # Whatever the state holds at the zero centroid, it stays pinned and unread.
    bumped = state._replace(centroids={"w": state.centroids["w"].at[0].set(0.3)})
    up = jax.random.normal(jax.random.key(6), w.shape)
    out = cj.apply({"w": w}, bumped)["w"]
    assert np.all(np.asarray(out)[~np.asarray(mask)] == 0)
    ref = naive_leaf(w, state.centroids["w"], None, 5, 3, mask=mask)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(cj.apply({"w": x}, bumped)["w"] * up))(w)
    g_ref = jax.grad(
        lambda x: jnp.sum(naive_leaf(x, state.centroids["w"], None, 5, 3, None, mask) * up)
    )(w)
    assert np.all(np.asarray(g)[~np.asarray(mask)] == 0)
    assert rel(g, g_ref) <= 1e-4
    new = cj.update_indices({"w": w}, bumped)
    assert float(new.centroids["w"][0]) == 0.0
    assert np.all(np.asarray(new.indices["w"])[~np.asarray(mask)] == 0)
    assert np.all(np.asarray(new.indices["w"])[np.asarray(mask)] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_params(dtype):
    w = (jax.random.normal(KEY, (64, 32)) * 0.1).astype(dtype)
    state = _state({"w": w}, cj.ClusterSpec(num_clusters=4, assignment="dkm"))
    assert state.centroids["w"].dtype == jnp.float32
    out = cj.apply({"w": w}, state)["w"]
    assert out.dtype == dtype
    # Computed in float32 from the half-precision values, rounded once at the end.
    want = naive_leaf(w.astype(jnp.float32), state.centroids["w"], None, 4, 3).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    g = jax.grad(lambda x: jnp.sum(cj.apply({"w": x}, state)["w"].astype(jnp.float32)))(w)
    assert g.dtype == dtype and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.slow  # outliers: the same code path as the masked sums
def test_outliers_keep_their_value_and_stay_out_of_the_sums():
    w = jax.random.normal(KEY, (50, 20))
    w = w.at[3, 4].set(25.0)
    spec = cj.ClusterSpec(num_clusters=4, assignment="dkm", outliers=0.01)
    state = _state({"w": w}, spec)
    pos = np.asarray(state.outliers["w"])
    assert 3 * 20 + 4 in pos
    out = np.asarray(cj.apply({"w": w}, state)["w"]).reshape(-1)
    np.testing.assert_array_equal(
        out[pos], np.asarray(w.reshape(-1)[pos].astype(jnp.float16), np.float32)
    )
    valid = jnp.ones(w.size, bool).at[pos].set(False).reshape(1, -1)
    tables = state.centroids["w"].reshape(1, -1)
    want = naive_soft(w.reshape(1, -1), valid, tables, dkm.auto_temperature(tables), 3)[0]
    keep = np.ones(w.size, bool)
    keep[pos] = False
    np.testing.assert_allclose(out[keep], np.asarray(want)[keep], rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(cj.apply({"w": x}, state)["w"]))(w).reshape(-1)
    np.testing.assert_array_equal(np.asarray(g)[pos], 1.0)  # the plain gradient


def test_update_indices_refreshes_centroids_and_hard_indices():
    w = jax.random.normal(KEY, (30, 20))
    spec = cj.ClusterSpec(num_clusters=4, assignment="dkm", init="linear")
    state = _state({"w": w}, spec)
    new = cj.update_indices({"w": w}, state)
    c0 = state.centroids["w"].reshape(1, -1)
    tau = dkm.auto_temperature(c0)
    c = c0
    for _ in range(3):  # the reference iterations, by hand
        a = jax.nn.softmax(-jnp.square(w.reshape(1, -1, 1) - c[:, None, :]) / tau[0], -1)
        c = jnp.sum(a * w.reshape(1, -1, 1), 1) / jnp.sum(a, 1)
    np.testing.assert_allclose(new.centroids["w"], c[0], rtol=1e-5)
    want = nearest_reference(np.asarray(w), np.asarray(new.centroids["w"])[None])
    np.testing.assert_array_equal(new.indices["w"], want)
    np.testing.assert_array_equal(
        cj.strip({"w": w}, new)["w"], np.asarray(new.centroids["w"])[want]
    )
    # Repeated refreshes settle towards the soft k-means fixed point.
    second = cj.update_indices({"w": w}, new)
    first_move = np.abs(np.asarray(second.centroids["w"] - new.centroids["w"])).max()
    for _ in range(20):
        new = cj.update_indices({"w": w}, new)
    again = cj.update_indices({"w": w}, new)
    last_move = np.abs(np.asarray(again.centroids["w"] - new.centroids["w"])).max()
    assert last_move < 0.05 * first_move


def test_train_step_with_adamw_trains_weights_not_centroids():
    w = jax.random.normal(KEY, (32, 16)) * 0.1
    w = jnp.where(jnp.abs(w) < 0.03, 0.0, w)
    params = {"w": w}
    spec = cj.ClusterSpec(num_clusters=4, assignment="dkm", preserve_sparsity=True)
    state = _state(params, spec)
    x = jax.random.normal(jax.random.key(7), (8, 32))
    target = jax.random.normal(jax.random.key(8), (8, 16))
    tx = cj.optimizer(optax.adamw(1e-2, weight_decay=0.1))
    opt_state = tx.init((params, state.centroids))

    @jax.jit
    def step(params, state, opt_state):
        def loss_fn(p, c):
            out = x @ cj.apply(p, state._replace(centroids=c))["w"]
            return jnp.mean((out - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, state.centroids)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        assert updates[1]["w"] is not None
        new_params, centroids = optax.apply_updates((params, state.centroids), updates)
        return new_params, centroids, updates[1], opt_state, loss

    losses = []
    for _ in range(20):
        params, centroids, c_updates, opt_state, loss = step(params, state, opt_state)
        assert not np.any(c_updates["w"])  # no decay or momentum on DKM centroids
        np.testing.assert_array_equal(centroids["w"], state.centroids["w"])
        state = cj.update_indices(params, state._replace(centroids=centroids))
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    assert np.all(np.asarray(params["w"])[~np.asarray(state.masks["w"])] == 0)
    dense = cj.strip(params, state)["w"]
    assert len(np.unique(np.asarray(dense))) <= 4


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import clusterjax as cj

mesh = Mesh(np.array(jax.devices()[:4]), ("model",))
w = jax.random.normal(jax.random.key(0), (48, 16))
rules = {"w": cj.ClusterSpec(num_clusters=4, assignment="dkm", granularity="channel")}
state = cj.init({"w": w}, rules, key=jax.random.key(1))
up = jax.random.normal(jax.random.key(2), w.shape)

def loss(p, s):
    return jnp.sum(cj.apply(p, s)["w"] * up)

step = jax.jit(lambda p, s: (jax.value_and_grad(loss)(p, s), cj.update_indices(p, s)))
(l1, g1), s1 = step({"w": w}, state)
ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
cs = state._replace(
    centroids={"w": jax.device_put(state.centroids["w"], NamedSharding(mesh, P("model")))},
    indices={"w": jax.device_put(state.indices["w"], NamedSharding(mesh, P(None, "model")))},
)
(l2, g2), s2 = step({"w": ws}, cs)
assert len(g2["w"].sharding.device_set) == 4
np.testing.assert_allclose(l1, l2, rtol=1e-5)
np.testing.assert_allclose(g1["w"], g2["w"], rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(s1.centroids["w"], s2.centroids["w"], rtol=1e-5, atol=1e-6)
np.testing.assert_array_equal(s1.indices["w"], s2.indices["w"])
print("sharded dkm: ok")
"""


@pytest.mark.slow
def test_sharded_params_give_the_unsharded_result():
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=600
    )
    assert "sharded dkm: ok" in proc.stdout, proc.stderr[-4000:]
