"""The five init methods against NumPy references (hand-computed cases and properties)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterjax._src.centroid_init import init_tables

KEY = jax.random.key(0)


def table(x, k, method, **kw):
    x = np.asarray(x, np.float32)
    out = init_tables(jnp.asarray(x.reshape(1, -1)), num_clusters=k, method=method, key=KEY, **kw)
    return np.asarray(out[0])


def sse(x, c, w=None):
    d = (np.asarray(x, np.float64)[:, None] - np.asarray(c, np.float64)[None]) ** 2
    best = d.min(axis=1)
    return float(np.sum(best if w is None else best * w))


def optimal_sse(x, k, w=None):
    """Exact 1-D k-means by dynamic programming over the sorted values (O(k n^2))."""
    order = np.argsort(x)
    x = np.asarray(x, np.float64)[order]
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)[order]
    n = len(x)
    cw, cx, cxx = (np.concatenate([[0], np.cumsum(v)]) for v in (w, w * x, w * x * x))

    def cost(i, j):  # cluster x[i:j]
        ww = cw[j] - cw[i]
        if ww <= 0:
            return 0.0
        s = cx[j] - cx[i]
        return cxx[j] - cxx[i] - s * s / ww

    best = np.full((k + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        for j in range(1, n + 1):
            best[m, j] = min(best[m - 1, i] + cost(i, j) for i in range(j))
    return float(min(best[m, n] for m in range(1, k + 1)))


def test_linear_hand_case():
    np.testing.assert_allclose(table([3.0, -1.0, 0.5, 1.0], 3, "linear"), [-1.0, 1.0, 3.0])
    np.testing.assert_allclose(table([2.0, 4.0], 1, "linear"), [3.0])


@given(st.lists(st.floats(-100, 100, width=32), min_size=2, max_size=64), st.integers(2, 9))
@settings(max_examples=30)
def test_linear_spans_min_max_evenly(values, k):
    t = table(values, k, "linear")
    x = np.asarray(values, np.float32)
    np.testing.assert_allclose([t[0], t[-1]], [x.min(), x.max()], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.diff(t), (x.max() - x.min()) / (k - 1), rtol=1e-4, atol=1e-4)


def test_density_hand_case_and_np_quantile():
    # Sorted 0, 1, 2, 3; K = 2 -> quantiles at 0.25 and 0.75 -> 0.75 and 2.25.
    np.testing.assert_allclose(table([3.0, 0.0, 2.0, 1.0], 2, "density"), [0.75, 2.25])
    x = np.random.default_rng(0).standard_t(3, size=501).astype(np.float32)
    for k in (1, 4, 16):
        expected = np.quantile(x.astype(np.float64), (np.arange(k) + 0.5) / k)
        np.testing.assert_allclose(table(x, k, "density"), expected, rtol=1e-5, atol=1e-5)


def test_density_weighted_by_importance():
    # Weight 3 on the value 10 and 1 on the value 0: weighted quantiles lean to 10.
    x = np.array([0.0, 10.0], np.float32)
    w = jnp.asarray([[1.0, 3.0]])
    out = np.asarray(
        init_tables(jnp.asarray(x[None]), num_clusters=1, method="density", key=KEY, importance=w)
    )
    plain = table(x, 1, "density")
    assert out[0, 0] > plain[0]


def test_random_in_range_and_key_dependent():
    x = np.random.default_rng(1).normal(size=300).astype(np.float32)
    a = table(x, 8, "random")
    b = np.asarray(
        init_tables(jnp.asarray(x[None]), num_clusters=8, method="random", key=jax.random.key(7))[0]
    )
    assert np.all(a >= x.min()) and np.all(a <= x.max()) and np.all(np.diff(a) >= 0)
    assert not np.allclose(a, b)


def test_kmeanspp_finds_separated_blobs():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(-5, 0.1, 100), rng.normal(5, 0.1, 100)]).astype(np.float32)
    for method in ("kmeans++", "kmeans"):
        t = table(x, 2, method)
        assert t[0] < -4 and t[1] > 4, method


@given(seed=st.integers(0, 10_000), heavy=st.booleans())
@settings(max_examples=15)
@pytest.mark.parametrize("k", [3, 8])
def test_kmeans_no_worse_than_its_seeding(k, seed, heavy):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, 80) if heavy else rng.normal(size=80)).astype(np.float32)
    pp = sse(x, table(x, k, "kmeans++"))
    km = sse(x, table(x, k, "kmeans"))
    assert km <= pp * (1 + 1e-6)
    assert km >= optimal_sse(x, k) * (1 - 1e-5)  # sanity: never below the exact optimum


def test_kmeans_near_optimum_on_larger_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=400).astype(np.float32)
    for k in (4, 8):
        km = sse(x, table(x, k, "kmeans"))
        assert km <= 1.08 * optimal_sse(x, k)


def test_weighted_kmeans_minimizes_weighted_sse():
    rng = np.random.default_rng(4)
    x = rng.normal(size=60).astype(np.float32)
    w = rng.exponential(size=60).astype(np.float32) ** 2
    t = np.asarray(
        init_tables(
            jnp.asarray(x[None]),
            num_clusters=3,
            method="kmeans",
            key=KEY,
            importance=jnp.asarray(w[None]),
        )[0]
    )
    weighted = sse(x, t, w)
    unweighted_t = table(x, 3, "kmeans")
    assert weighted <= sse(x, unweighted_t, w) + 1e-9
    assert weighted <= 1.05 * optimal_sse(x, 3, w)
    # Lloyd's fixed point: every centroid is the weighted mean of its cell.
    idx = np.abs(x[:, None] - t[None]).argmin(1)
    for j in range(3):
        sel = idx == j
        if sel.any():
            np.testing.assert_allclose(
                t[j], np.average(x[sel], weights=w[sel]), rtol=1e-4, atol=1e-5
            )


def test_kmeans_precision_with_offset():
    rng = np.random.default_rng(5)
    x = (0.5 + 0.02 * rng.normal(size=1_000_000)).astype(np.float32)
    t = table(x, 16, "kmeans")
    idx = np.abs(x[:, None][:200_000] - t[None]).argmin(1)
    for j in range(16):
        sel = idx == j
        if sel.sum() > 1000:
            assert abs(t[j] - x[:200_000][sel].mean()) < 5e-4


@pytest.mark.parametrize("method", ["linear", "random", "density", "kmeans++", "kmeans"])
def test_sparsity_aware_layout(method):
    # 6 negatives, 3 zeros, 3 positives; K = 4 -> zero + 2 negative + 1 positive.
    x = np.array([-6, -5, -4, -3, -2, -1, 0, 0, 0, 1, 2, 3], np.float32)
    t = table(x, 4, method, preserve_sparsity=True)
    assert t[0] == 0.0
    assert np.all(t[1:3] < 0) and t[3] > 0
    if method == "linear":
        np.testing.assert_allclose(t, [0.0, -6.0, -1.0, 2.0])  # positive side: one = midpoint


@pytest.mark.parametrize("method", ["linear", "random", "density", "kmeans++", "kmeans"])
@pytest.mark.parametrize("sparse", [False, True])
def test_degenerate_inputs_are_finite(method, sparse):
    for x in (
        np.full(10, 0.3),
        np.zeros(10),
        np.array([1.0, 1.0, 2.0, 2.0]),
        np.array([-1.0, 0, 0, 0]),
    ):
        t = table(x, 3, method, preserve_sparsity=sparse)
        assert np.all(np.isfinite(t)), (x, t)
        assert t.min() >= min(x.min(), 0) - 1e-6 and t.max() <= max(x.max(), 0) + 1e-6


def test_per_group_equals_separate_calls():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 50)).astype(np.float32)
    both = np.asarray(init_tables(jnp.asarray(x), num_clusters=4, method="kmeans", key=KEY))
    for g in range(3):
        np.testing.assert_allclose(both[g], table(x[g], 4, "kmeans"), rtol=1e-5, atol=1e-6)
