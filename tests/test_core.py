"""init / apply / strip / update_indices against NumPy references."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import nearest_reference

import clusterjax as cj

KEY = jax.random.key(0)


def _params(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "conv": {
            "kernel": jax.random.normal(k[0], (3, 3, 4, 8), dtype),
            "bias": jnp.zeros(8, dtype),
        },
        "dense": {"kernel": jax.random.normal(k[1], (32, 16), dtype), "bias": jnp.zeros(16, dtype)},
        "step": jnp.array(3, jnp.int32),
    }


def _group_ids(shape, axis, group_size):
    ids = np.arange(shape[axis]) // group_size
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(ids.reshape(view), shape)


def _np_lookup(table, idx, groups):
    table = np.asarray(table)
    return table.reshape(-1, table.shape[-1])[groups, np.asarray(idx, np.int64)]


# --- selection -------------------------------------------------------------------------


def test_default_selection_clusters_kernels_only():
    params = _params()
    state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=KEY)
    assert state.centroids["conv"]["kernel"].shape == (4,)
    assert state.centroids["dense"]["kernel"].shape == (4,)
    assert state.centroids["conv"]["bias"] is None and state.centroids["dense"]["bias"] is None
    assert state.centroids["step"] is None
    assert state.indices["dense"]["kernel"].dtype == jnp.uint8
    assert all(m is None for m in jax.tree.leaves(state.masks, is_leaf=lambda x: x is None))


def test_regex_rules_first_match_wins_and_none_leaves_alone():
    params = _params()
    rules = {
        "conv/kernel": None,
        r".*/kernel": cj.ClusterSpec(num_clusters=3, granularity="channel"),
        r"dense/.*": cj.ClusterSpec(num_clusters=2),  # never reached for dense/kernel
    }
    state = cj.init(params, rules, key=KEY)
    assert state.centroids["conv"]["kernel"] is None
    assert state.centroids["dense"]["kernel"].shape == (16, 3)
    assert state.centroids["dense"]["bias"].shape == (2,)  # explicit: biases can be clustered


def test_rule_matching_nothing_warns():
    with pytest.warns(UserWarning, match=re.escape("'Dense_0/kernel'")):
        cj.init(_params(), {"Dense_0/kernel": cj.ClusterSpec(num_clusters=4)}, key=KEY)


def test_callable_rules():
    def rules(path, leaf):
        return (
            cj.ClusterSpec(num_clusters=5) if path.startswith("dense") and leaf.ndim == 2 else None
        )

    state = cj.init(_params(), rules, key=KEY)
    assert state.centroids["dense"]["kernel"].shape == (5,)
    assert state.centroids["conv"]["kernel"] is None


def test_nnx_state_paths_and_structure():
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), nnx.Linear(5, 3, rngs=nnx.Rngs(1)))
    _, params = nnx.split(model, nnx.Param)
    seen = []
    state = cj.init(params, lambda p, w: seen.append(p) or cj.ClusterSpec(num_clusters=2), key=KEY)
    assert sorted(seen) == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
    out = cj.apply(params, state)
    assert jax.tree.structure(out) == jax.tree.structure(params)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rules, fragment",
    [
        ({"step": cj.ClusterSpec(num_clusters=2)}, "leaf 'step' has dtype int32"),
        ({"dense/bias": cj.ClusterSpec(num_clusters=17)}, "leaf 'dense/bias'"),
        (
            {"dense/kernel": cj.ClusterSpec(num_clusters=33, granularity="channel")},
            "32 elements per channel",
        ),
        (
            {"dense/kernel": cj.ClusterSpec(num_clusters=2, granularity="channel", channel_axis=2)},
            "channel_axis=2 is out of range",
        ),
        (
            {"dense/kernel": cj.ClusterSpec(num_clusters=2, granularity="group", group_size=5)},
            "group_size=5 does not divide",
        ),
        ({"dense/kernel": "not a spec"}, "maps to 'not a spec'"),
        ({"dense/[": cj.ClusterSpec(num_clusters=2)}, "not a valid regex"),
    ],
)
def test_bad_selection_raises_naming_the_leaf(rules, fragment):
    with pytest.raises(ValueError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cj.init(_params(), rules, key=KEY)
    assert fragment in str(err.value)


def test_default_selection_keeps_leaves_dense_where_clustering_does_not_pay():
    params = {
        "token_type": jax.random.normal(KEY, (2, 384)),  # 768 weights < 4 x 256
        "tiny": jnp.ones((2, 2)),  # fewer weights than K
        "bf16": jax.random.normal(KEY, (16, 64), jnp.bfloat16),  # 8-bit indices + table
        "big": jax.random.normal(KEY, (64, 384)),
    }
    spec = cj.ClusterSpec(num_clusters=256)
    with pytest.warns(UserWarning, match="left 3 default-selected") as record:
        state = cj.init(params, spec, key=KEY)
    assert len(record) == 1  # said once, for all of them
    message = str(record[0].message)
    assert "'token_type' (shape (2, 384): 768 weights < 4 x K = 1024)" in message
    assert "'tiny' (shape (2, 2): 4 weights < K = 256)" in message
    # bf16: 1,024 B of 8-bit indices + 1,024 B float32 table >= 2,048 B of bf16 weights.
    assert "'bf16' (shape (16, 64): 2,048 packed bytes >= 2,048 dense bytes)" in message
    assert [lp.path for lp in state.plan.clustered] == ["big"]
    assert [p for p, _ in state.plan.kept_dense] == ["bf16", "tiny", "token_type"]
    footer = str(cj.summary(params, state)).splitlines()[-1]
    assert footer.startswith("kept dense") and "token_type (shape (2, 384)" in footer
    # An explicit rule still wins (and is an error where K exceeds the leaf).
    rules = {"token_type|bf16": spec, ".*": None}
    state = cj.init(params, rules, key=KEY)
    assert state.centroids["token_type"].shape == (256,) and state.centroids["bf16"] is not None
    with pytest.raises(ValueError, match="'tiny' .* has 4 elements, fewer than num_clusters"):
        cj.init(params, {"tiny": spec}, key=KEY)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_raise(bad):
    params = _params()
    params["dense"]["kernel"] = params["dense"]["kernel"].at[2, 3].set(bad)
    with pytest.raises(
        ValueError, match=r"'dense/kernel' holds 1 NaN/Inf value\(s\), e.g. at index \(2, 3\)"
    ):
        cj.init(params, cj.ClusterSpec(num_clusters=4), key=KEY)


def test_mismatched_state_raises_naming_the_path():
    params = _params()
    state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=KEY)
    other = dict(params, extra={"kernel": jnp.ones((4, 4))})
    with pytest.raises(ValueError, match="'extra/kernel' has no entry in state.centroids"):
        cj.apply(other, state)
    smaller = dict(params)
    del smaller["conv"]
    with pytest.raises(ValueError, match="state.centroids has 'conv/bias'"):
        cj.strip(smaller, state)
    reshaped = jax.tree.map(lambda x: x, params)
    reshaped["dense"]["kernel"] = jnp.ones((16, 32))
    with pytest.raises(ValueError, match=r"param 'dense/kernel' has shape \(16, 32\), but"):
        cj.update_indices(reshaped, state)
    dense = {**state.indices["dense"], "kernel": jnp.zeros((2, 2))}
    bad_indices = state._replace(indices={**state.indices, "dense": dense})
    with pytest.raises(ValueError, match=r"state.indices at 'dense/kernel' has shape \(2, 2\)"):
        cj.strip(params, bad_indices)
    with pytest.raises(ValueError, match="expected a ClusterState"):
        cj.apply(params, state.centroids)


# --- apply / strip -----------------------------------------------------------------------


@pytest.mark.parametrize("init", ["linear", "random", "density", "kmeans++", "kmeans"])
@pytest.mark.parametrize(
    "granularity, axis, group_size",
    [("tensor", -1, None), ("channel", -1, None), ("channel", 0, None), ("group", -1, 4)],
)
def test_at_most_k_values_per_table_and_nearest(init, granularity, axis, group_size):
    k = 5
    w = jax.random.normal(jax.random.key(3), (24, 16))
    spec = cj.ClusterSpec(
        num_clusters=k, init=init, granularity=granularity, channel_axis=axis, group_size=group_size
    )
    state = cj.init({"w": w}, spec, key=KEY)
    out = np.asarray(cj.apply({"w": w}, state)["w"])
    np.testing.assert_array_equal(out, np.asarray(cj.strip({"w": w}, state)["w"]))
    c = np.asarray(state.centroids["w"])
    if granularity == "tensor":
        groups = np.zeros(w.shape, np.int64)
    else:
        groups = _group_ids(w.shape, axis % 2, group_size or 1)
    assert c.shape == ((k,) if granularity == "tensor" else (groups.max() + 1, k))
    for g in np.unique(groups):
        assert len(np.unique(out[groups == g])) <= k
    # The indices are the brute-force nearest centroids, and apply == table[index].
    tables = c.reshape(-1, k)
    np.testing.assert_array_equal(state.indices["w"], nearest_reference(w, tables, groups))
    np.testing.assert_array_equal(out, _np_lookup(c, state.indices["w"], groups))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_keeps_leaf_dtype(dtype):
    params = _params(dtype=dtype)
    state = cj.init(params, cj.ClusterSpec(num_clusters=8), key=KEY)
    assert state.centroids["dense"]["kernel"].dtype == jnp.float32
    for fn in (cj.apply, cj.strip):
        out = fn(params, state)
        assert out["dense"]["kernel"].dtype == dtype
        assert out["conv"]["kernel"].dtype == dtype
        assert bool(jnp.all(jnp.isfinite(out["dense"]["kernel"].astype(jnp.float32))))
    g = jax.grad(
        lambda p: jnp.sum(cj.apply(p, state)["dense"]["kernel"].astype(jnp.float32)), allow_int=True
    )(params)
    assert g["dense"]["kernel"].dtype == dtype


@pytest.mark.parametrize("init", ["linear", "random", "density", "kmeans++", "kmeans"])
@pytest.mark.parametrize("sparse", [False, True])
def test_constant_and_zero_tensors_give_no_nan(init, sparse):
    params = {"const": jnp.full((6, 6), 0.7), "zero": jnp.zeros((6, 6))}
    state = cj.init(
        params, cj.ClusterSpec(num_clusters=4, init=init, preserve_sparsity=sparse), key=KEY
    )
    for leaf in jax.tree.leaves(state.centroids):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    out = cj.strip(params, state)
    np.testing.assert_allclose(out["const"], 0.7, rtol=1e-6)
    np.testing.assert_array_equal(out["zero"], 0.0)
    g = jax.grad(lambda c: jnp.sum(cj.apply(params, state._replace(centroids=c))["const"]))(
        state.centroids
    )
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


# --- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_are_ste_and_segment_sum(aggregation, granularity, sparse):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(10, 6)).astype(np.float32)
    if sparse:
        w[rng.random(w.shape) < 0.4] = 0.0
    spec = cj.ClusterSpec(
        num_clusters=3,
        granularity=granularity,
        preserve_sparsity=sparse,
        gradient_aggregation=aggregation,
    )
    params = {"w": jnp.asarray(w)}
    state = cj.init(params, spec, key=KEY)
    upstream = rng.normal(size=w.shape).astype(np.float32)

    def loss(p, c):
        return jnp.sum(cj.apply(p, state._replace(centroids=c))["w"] * upstream)

    gw, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, state.centroids)
    mask = (w != 0) if sparse else np.ones(w.shape, bool)
    np.testing.assert_allclose(gw["w"], upstream * mask, rtol=1e-6)
    idx = np.asarray(state.indices["w"], np.int64)
    groups = np.zeros(w.shape, np.int64) if granularity == "tensor" else _group_ids(w.shape, 1, 1)
    expected = np.zeros((groups.max() + 1, 3), np.float64)
    np.add.at(expected, (groups, idx), upstream)
    if sparse:
        assert np.all(idx[~mask] == 0) and np.all(idx[mask] > 0)
        expected[:, 0] = 0.0  # only pruned weights sit on the zero centroid; their grad is masked
    np.testing.assert_allclose(np.asarray(gc["w"]).reshape(-1, 3), expected, rtol=1e-5, atol=1e-6)


# --- update_indices ----------------------------------------------------------------------


def test_moving_past_a_midpoint_changes_cluster_only_when_not_frozen():
    w = jnp.array([[-1.0, -0.9, 0.0, 0.1], [0.9, 1.0, 1.1, -1.1]])
    for frozen in (False, True):
        spec = cj.ClusterSpec(num_clusters=3, init="linear", update_indices=not frozen)
        state = cj.init({"w": w}, {"w": spec}, key=KEY)
        np.testing.assert_allclose(state.centroids["w"], [-1.1, 0.0, 1.1], atol=1e-6)
        before = np.asarray(state.indices["w"])
        # 0.1 -> 0.6 crosses the midpoint 0.55 between centroids 0.0 and 1.1.
        moved = {"w": w.at[0, 3].set(0.6)}
        after = np.asarray(cj.update_indices(moved, state).indices["w"])
        expected = before.copy()
        if not frozen:
            expected[0, 3] = 2
        np.testing.assert_array_equal(after, expected)
        forced = np.asarray(cj.update_indices(moved, state, force=True).indices["w"])
        assert forced[0, 3] == 2


_update_jit = jax.jit(cj.update_indices)


@settings(max_examples=8)
@given(shift=st.floats(-3, 3))
@pytest.mark.parametrize("k, sparse", [(2, False), (5, True), (9, False), (9, True)])
def test_update_indices_is_nearest_nonzero_assignment(k, sparse, shift):
    rng = np.random.default_rng(k)
    w = rng.normal(size=(12, 7)).astype(np.float32)
    w[:, 0] = 0.0
    spec = cj.ClusterSpec(num_clusters=k, preserve_sparsity=sparse)
    state = cj.init({"w": jnp.asarray(w)}, spec, key=KEY)
    moved = w + np.float32(shift) * (w != 0)
    idx = np.asarray(_update_jit({"w": jnp.asarray(moved)}, state).indices["w"])
    c = np.asarray(state.centroids["w"])
    if sparse:
        assert c[0] == 0.0
        ref = nearest_reference(moved, c[None, 1:]) + 1
        ref[w == 0] = 0
    else:
        ref = nearest_reference(moved, c[None])
    np.testing.assert_array_equal(idx, ref)


def test_sparse_init_layout():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(40, 10)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    state = cj.init(
        {"w": jnp.asarray(w)}, cj.ClusterSpec(num_clusters=8, preserve_sparsity=True), key=KEY
    )
    c = np.asarray(state.centroids["w"])
    assert c[0] == 0.0 and np.all(c[1:] != 0.0)
    np.testing.assert_array_equal(state.masks["w"], w != 0)
    out = np.asarray(cj.strip({"w": jnp.asarray(w)}, state)["w"])
    np.testing.assert_array_equal(out == 0, w == 0)  # zeros exactly kept, none created


def test_everything_jits_without_retracing():
    params = _params()
    spec = cj.ClusterSpec(num_clusters=4, granularity="channel")
    state = cj.init(params, spec, key=KEY)
    traces = []

    @jax.jit
    def f(params, state):
        traces.append(1)
        state = cj.update_indices(params, state)
        return cj.apply(params, state), cj.strip(params, state), state

    for i in range(3):
        factor = 1.0 + 0.01 * i
        params = jax.tree.map(lambda x, f=factor: x * f if x.dtype == jnp.float32 else x, params)
        out, dense, state = f(params, state)
    assert len(traces) == 1
    init_jit = jax.jit(lambda p, k: cj.init(p, spec, key=k))
    s2 = init_jit(params, KEY)
    np.testing.assert_array_equal(
        s2.indices["dense"]["kernel"], cj.init(params, spec, key=KEY).indices["dense"]["kernel"]
    )
