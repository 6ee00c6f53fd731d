"""Importance-weighted clustering: `cj.fisher_importance` and `cj.init(..., importance=)`.

* the Fisher helper equals a hand loop over single examples (mean / sum, uneven batches,
  chunking with padding, leaf selection, bfloat16 params);
* weighted `kmeans` init reaches the minimum of the importance-weighted SSE, checked
  against an exhaustive search over all K^n assignments on tiny groups (per tensor, per
  channel, per group);
* importance that is all zero, partly zero or `None` is handled.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clusterjax as cj

# ------------------------------------------------------------------------ references


def _brute_force_weighted_sse(x, w, k):
    """min over all k^n assignments of sum_i w_i (x_i - mean_w(cluster(i)))^2 (float64)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    labels = np.array(list(itertools.product(range(k), repeat=len(x))))  # (k^n, n)
    onehot = labels[..., None] == np.arange(k)  # (k^n, n, k)
    sw = np.einsum("ank,n->ak", onehot, w)
    sx = np.einsum("ank,n->ak", onehot, w * x)
    sxx = np.einsum("ank,n->ak", onehot, w * x * x)
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(sw > 0, sxx - sx * sx / np.where(sw > 0, sw, 1.0), 0.0)
    return float(np.maximum(cost, 0.0).sum(axis=1).min())


def _weighted_sse(params, state, importance, path="w"):
    dense = np.asarray(cj.strip(params, state)[path], np.float64)
    w = np.asarray(params[path], np.float64)
    imp = np.ones_like(w) if importance is None else np.asarray(importance, np.float64)
    return float(np.sum(imp * (w - dense) ** 2))


def _groups(a, spec):
    """(G, n) view of a 2-D array for the spec's granularity (channel axis = -1)."""
    a = np.asarray(a, np.float64)
    if spec.granularity == "tensor":
        return a.reshape(1, -1)
    size = 1 if spec.granularity == "channel" else spec.group_size
    return a.T.reshape(a.shape[1] // size, -1)


# ------------------------------------------------------------------------ weighted init


# Tiny kernels with one table per tensor / per channel / per group of 2 channels.
_GRANULARITIES = pytest.mark.parametrize(
    "shape, spec",
    [
        ((2, 4), cj.ClusterSpec(num_clusters=3, init="kmeans")),
        ((8, 3), cj.ClusterSpec(num_clusters=3, init="kmeans", granularity="channel")),
        ((4, 4), cj.ClusterSpec(num_clusters=3, init="kmeans", granularity="group", group_size=2)),
    ],
    ids=["tensor", "channel", "group"],
)


@_GRANULARITIES
def test_weighted_kmeans_reaches_the_brute_force_optimum(shape, spec):
    rng = np.random.default_rng(0)
    for trial in range(4):
        w = rng.standard_t(3, size=shape).astype(np.float32)
        imp = (rng.pareto(1.5, size=shape) * rng.integers(0, 2, size=shape)).astype(np.float32)
        if trial == 3:
            imp[...] = 0.0
            imp.flat[0] = 5.0  # one dominant weight; the others carry no importance
        params = {"w": jnp.asarray(w)}
        state = cj.init(params, {".*": spec}, key=jax.random.key(trial), importance={"w": imp})
        got = _weighted_sse(params, state, imp)
        best = sum(
            _brute_force_weighted_sse(xg, wg, spec.num_clusters)
            for xg, wg in zip(_groups(w, spec), _groups(imp, spec))
        )
        assert got <= best * (1 + 1e-5) + 1e-6, (trial, got, best)
        # Indices are the nearest-centroid assignment, which minimizes the weighted SSE
        # for the centroids found; at most K distinct values per table.
        dense = _groups(cj.strip(params, state)["w"], spec)
        assert all(len(np.unique(row)) <= spec.num_clusters for row in dense)


def test_importance_moves_centroids_towards_important_weights():
    """Weighted init wins on the weighted SSE, plain init on the plain SSE."""
    rng = np.random.default_rng(1)
    w = rng.standard_t(4, size=(48, 4)).astype(np.float32)
    imp = np.where(np.abs(w) < 0.5, 50.0, 0.1).astype(np.float32) * rng.random(w.shape)
    params = {"w": jnp.asarray(w)}
    spec = cj.ClusterSpec(num_clusters=4, init="kmeans", granularity="channel")
    plain = cj.init(params, {".*": spec}, key=jax.random.key(0))
    weighted = cj.init(params, {".*": spec}, key=jax.random.key(0), importance={"w": imp})
    assert _weighted_sse(params, weighted, imp) < 0.9 * _weighted_sse(params, plain, imp)
    assert _weighted_sse(params, plain, None) < _weighted_sse(params, weighted, None)


def test_zero_and_none_importance():
    rng = np.random.default_rng(2)
    params = {
        "a": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
    }
    spec = cj.ClusterSpec(num_clusters=3, init="kmeans")
    key = jax.random.key(0)
    plain = cj.init(params, {".*": spec}, key=key)
    # None leaves and all-zero importance both mean uniform importance: the same optimum
    # (8 values per table: the weighted kmeans is exact there).
    mixed = cj.init(params, {".*": spec}, key=key, importance={"a": None, "b": jnp.zeros((4, 2))})
    for p in ("a", "b"):
        assert _weighted_sse(params, mixed, None, p) == pytest.approx(
            _weighted_sse(params, plain, None, p), rel=1e-5, abs=1e-7
        )
    np.testing.assert_array_equal(mixed.centroids["a"], plain.centroids["a"])
    # Partly zero importance: finite, sorted tables, nearest-centroid indices.
    imp = {"a": jnp.asarray([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]), "b": None}
    state = cj.init(params, {".*": spec}, key=key, importance=imp)
    assert np.isfinite(np.asarray(state.centroids["a"])).all()
    again = cj.update_indices(params, state)
    np.testing.assert_array_equal(again.indices["a"], state.indices["a"])
    # Wrong shape: a clear error naming the leaf.
    with pytest.raises(ValueError, match="'a'"):
        cj.init(params, {".*": spec}, key=key, importance={"a": jnp.ones((2, 4)), "b": None})


@_GRANULARITIES
def test_importance_damping_adds_each_tables_mean(shape, spec):
    """Damping = the weighted optimum for F + lambda * mean(F over the weight's table)."""
    rng = np.random.default_rng(5)
    for lam in (0.5, 3.0):
        w = rng.standard_t(3, size=shape).astype(np.float32)
        imp = (rng.pareto(1.5, size=shape) * rng.integers(0, 2, size=shape)).astype(np.float32)
        params = {"w": jnp.asarray(w)}
        state = cj.init(
            params, {".*": spec}, key=jax.random.key(0), importance={"w": imp},
            importance_damping=lam,
        )  # fmt: skip
        # Reference: the damped importance built by hand, table by table (float64).
        damped_groups = [g + lam * g.mean() for g in _groups(imp, spec)]
        got = sum(
            float(np.sum(dg * (xg - qg) ** 2))
            for dg, xg, qg in zip(
                damped_groups,
                _groups(w, spec),
                _groups(cj.strip(params, state)["w"], spec),
            )
        )
        best = sum(
            _brute_force_weighted_sse(xg, dg, spec.num_clusters)
            for xg, dg in zip(_groups(w, spec), damped_groups)
        )
        assert got <= best * (1 + 1e-5) + 1e-6, (lam, got, best)
    # Very strong damping is the plain (unweighted) objective.
    plain = cj.init(params, {".*": spec}, key=jax.random.key(0))
    strong = cj.init(
        params, {".*": spec}, key=jax.random.key(0), importance={"w": imp},
        importance_damping=1e6,
    )  # fmt: skip
    assert _weighted_sse(params, strong, None) == pytest.approx(
        _weighted_sse(params, plain, None), rel=1e-4
    )


def test_bad_importance_values_and_damping():
    params = {"layer": {"w": jnp.ones((4, 2)) * jnp.arange(8.0).reshape(4, 2)}}
    spec = cj.ClusterSpec(num_clusters=2, init="kmeans")
    key = jax.random.key(0)
    for value in (-1.0, np.nan, np.inf):
        imp = np.ones((4, 2), np.float32)
        imp[2, 1] = value
        with pytest.raises(ValueError, match=r"'layer/w'.*index \(2, 1\)"):
            cj.init(params, {".*": spec}, key=key, importance={"layer": {"w": imp}})
    for lam in (-1.0, np.nan, "1", True):
        with pytest.raises(ValueError, match="importance_damping"):
            cj.init(
                params,
                spec,
                key=key,
                importance={"layer": {"w": np.ones((4, 2))}},
                importance_damping=lam,
            )
    with pytest.raises(ValueError, match="needs an importance tree"):
        cj.init(params, {".*": spec}, key=key, importance_damping=1.0)


# ------------------------------------------------------------------------ Fisher helper


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(6)(x))
        return nn.Dense(3)(x)


def _setup(dtype=jnp.float32):
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (11, 5))
    y = jnp.arange(11) % 3
    params = model.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda a: a.astype(dtype), params)

    def loss_fn(params, batch):
        xb, yb = batch
        logits = model.apply({"params": params}, xb.astype(dtype)).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    return params, loss_fn, x, y


def _hand_loop(loss_fn, params, x, y):
    acc = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
    grad = jax.jit(jax.grad(loss_fn))
    for i in range(len(x)):
        g = grad(params, (x[i : i + 1], y[i : i + 1]))
        acc = jax.tree.map(lambda a, gi: a + np.asarray(gi, np.float64) ** 2, acc, g)
    return acc


def test_fisher_matches_a_hand_loop_over_examples():
    params, loss_fn, x, y = _setup()
    ref = _hand_loop(loss_fn, params, x, y)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # uneven batches: 4 + 7
    fisher = cj.fisher_importance(loss_fn, params, batches)
    summed = cj.fisher_importance(loss_fn, params, batches, reduction="sum", chunk_size=3)
    for path in (("Dense_0", "kernel"), ("Dense_0", "bias"), ("Dense_1", "kernel")):
        r = ref[path[0]][path[1]]
        f = fisher[path[0]][path[1]]
        s = summed[path[0]][path[1]]
        assert f.dtype == jnp.float32 and f.shape == r.shape
        np.testing.assert_allclose(f, r / len(x), rtol=2e-5, atol=1e-9)
        np.testing.assert_allclose(s, r, rtol=2e-5, atol=1e-9)
        assert (np.asarray(f) >= 0).all()
    # Not the squared gradient of the whole batch (that would be much smaller).
    g = jax.grad(loss_fn)(params, (x, y))["Dense_1"]["kernel"]
    assert not np.allclose(fisher["Dense_1"]["kernel"], np.asarray(g) ** 2, rtol=0.1)


def test_fisher_selection_and_dtypes():
    params, loss_fn, x, y = _setup()
    batches = [(x, y)]
    only = cj.fisher_importance(loss_fn, params, batches, select=r".*/kernel")
    assert only["Dense_0"]["bias"] is None and only["Dense_1"]["bias"] is None
    full = cj.fisher_importance(loss_fn, params, batches)
    np.testing.assert_allclose(only["Dense_1"]["kernel"], full["Dense_1"]["kernel"], rtol=1e-6)
    rules = {r"Dense_1/kernel": cj.ClusterSpec(num_clusters=2)}
    by_rules = cj.fisher_importance(loss_fn, params, batches, select=rules)
    assert by_rules["Dense_0"]["kernel"] is None and by_rules["Dense_1"]["kernel"] is not None
    by_spec = cj.fisher_importance(loss_fn, params, batches, select=cj.ClusterSpec(num_clusters=2))
    assert by_spec["Dense_0"]["bias"] is None and by_spec["Dense_0"]["kernel"] is not None
    by_fn = cj.fisher_importance(loss_fn, params, batches, select=lambda p, w: w.ndim == 1)
    assert by_fn["Dense_0"]["kernel"] is None and by_fn["Dense_0"]["bias"] is not None
    # The result feeds cj.init directly.
    state = cj.init(params, rules, key=jax.random.key(0), importance=by_rules)
    assert state.centroids["Dense_1"]["kernel"].shape == (2,)
    # bfloat16 params: accumulated in float32.
    bf, bf_loss, _, _ = _setup(jnp.bfloat16)
    out = cj.fisher_importance(bf_loss, bf, batches)
    assert out["Dense_0"]["kernel"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out["Dense_0"]["kernel"])).all()


def test_fisher_bad_input():
    params, loss_fn, x, y = _setup()
    with pytest.raises(ValueError, match="reduction"):
        cj.fisher_importance(loss_fn, params, [(x, y)], reduction="max")
    with pytest.raises(ValueError, match="chunk_size"):
        cj.fisher_importance(loss_fn, params, [(x, y)], chunk_size=0)
    with pytest.raises(ValueError, match="no example"):
        cj.fisher_importance(loss_fn, params, [])
    with pytest.raises(ValueError, match="matches no floating leaf"):
        cj.fisher_importance(loss_fn, params, [(x, y)], select="nope")
    with pytest.raises(ValueError, match="wrap a single batch in a list"):
        cj.fisher_importance(loss_fn, params, (x, y))
