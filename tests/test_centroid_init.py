"""Centroid initialization against independent NumPy references.

Compilation dominates the cost of these tests (kmeans / kmeans++ compile in seconds, run in
milliseconds), so shapes are shared between tests on purpose: the kmeans tests use
``N = 120`` values and K in the power-of-two buckets 4 and 8 (K is traced inside one
compilation per bucket).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterjax._src import centroid_init
from clusterjax._src.centroid_init import init_tables

KEY = jax.random.key(0)
N = 120
METHODS = ["linear", "random", "density", "kmeans++", "kmeans"]


def table(x, k, method, key=KEY, **kw):
    """The (K,) table of a single group."""
    x = np.asarray(x, np.float32).reshape(1, -1)
    if kw.get("importance") is not None:
        kw["importance"] = jnp.asarray(np.asarray(kw["importance"], np.float32).reshape(1, -1))
    return np.asarray(init_tables(jnp.asarray(x), num_clusters=k, method=method, key=key, **kw)[0])


def sse(x, c, w=None):
    """Weighted squared distance of every value to its nearest centroid (float64)."""
    d = (np.asarray(x, np.float64)[:, None] - np.asarray(c, np.float64)[None]) ** 2
    best = d.min(axis=1)
    return float(np.sum(best if w is None else best * np.asarray(w, np.float64)))


def exact_sse(x, k, w=None):
    """Exact (weighted) 1-D k-means optimum: DP over all cut points of the sorted values.

    O(k n^2) with the full (n + 1) x (n + 1) matrix of cluster costs; uses at most k
    clusters (more cannot hurt).
    """
    order = np.argsort(x, kind="stable")
    x = np.asarray(x, np.float64)[order]
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)[order]
    cw, cx, cxx = (np.concatenate([[0.0], np.cumsum(v)]) for v in (w, w * x, w * x * x))
    i, j = np.meshgrid(np.arange(len(x) + 1), np.arange(len(x) + 1), indexing="ij")
    ww, sx, sxx = cw[j] - cw[i], cx[j] - cx[i], cxx[j] - cxx[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(ww > 0, sxx - sx * sx / ww, 0.0)
    cost = np.where(j >= i, np.maximum(cost, 0.0), np.inf)
    best = np.where(np.arange(len(x) + 1) == 0, 0.0, np.inf)
    for _ in range(k):
        best = np.min(best[:, None] + cost, axis=0)
    return float(best[-1])


def weighted_quantiles(x, w, q):
    """Reference for weighted density: piecewise-linear CDF through the plotting positions
    (C_i + w_i / 2 - w_0 / 2) / (W - w_0 / 2 - w_last / 2)."""
    order = np.argsort(x, kind="stable")
    x, w = np.asarray(x, np.float64)[order], np.asarray(w, np.float64)[order]
    before = np.concatenate([[0.0], np.cumsum(w)[:-1]])
    pos = (before + w / 2 - w[0] / 2) / (w.sum() - w[0] / 2 - w[-1] / 2)
    return np.interp(q, pos, x)


def data(seed, heavy=False, n=N):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, n) if heavy else rng.normal(size=n)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# linear, random, density
# ---------------------------------------------------------------------------------------


def test_linear_hand_cases():
    np.testing.assert_array_equal(table([3.0, -1.0, 0.5, 1.0], 3, "linear"), [-1.0, 1.0, 3.0])
    np.testing.assert_array_equal(table([2.0, 4.0, 3.0, 2.5], 1, "linear"), [3.0])  # midpoint
    np.testing.assert_array_equal(table([0.0, 1.0, 0.5, 0.25], 5, "linear"), np.arange(5) / 4)


@given(
    st.lists(st.floats(-1e3, 1e3, width=32), min_size=48, max_size=48),
    st.sampled_from([2, 3, 7, 16]),
)
@settings(max_examples=25)
def test_linear_spans_min_max_evenly(values, k):
    x = np.asarray(values, np.float32)
    t = table(x, k, "linear")
    assert t[0] == x.min() and t[-1] == x.max()  # exactly
    step = (np.float64(x.max()) - x.min()) / (k - 1)
    np.testing.assert_allclose(np.diff(t), step, rtol=1e-5, atol=1e-4)


def test_density_hand_cases():
    # Sorted 0, 1, 2, 3. K = 2: quantiles at 1/4 and 3/4 -> positions 0.75 and 2.25.
    np.testing.assert_allclose(table([3.0, 0.0, 2.0, 1.0], 2, "density"), [0.75, 2.25])
    # K = 3: quantiles at 1/6, 1/2, 5/6 -> positions 0.5, 1.5, 2.5.
    np.testing.assert_allclose(table([3.0, 0.0, 2.0, 1.0], 3, "density"), [0.5, 1.5, 2.5])


@pytest.mark.parametrize("k", [1, 4, 16])
def test_density_equals_np_quantile(k):
    x = data(1, heavy=True, n=501)
    expected = np.quantile(x.astype(np.float64), (np.arange(k) + 0.5) / k)
    np.testing.assert_allclose(table(x, k, "density"), expected, rtol=1e-6, atol=1e-6)


def test_density_position_exact_on_large_data():
    # Positions q (m - 1) ~ 5e5 are not representable in float32 with a fraction: the
    # implementation splits them in integer arithmetic.
    x = np.random.default_rng(2).random(2**20 + 3).astype(np.float32)
    expected = np.quantile(x.astype(np.float64), (np.arange(16) + 0.5) / 16)
    np.testing.assert_allclose(table(x, 16, "density"), expected, rtol=0, atol=3e-7)


def test_density_weighted_hand_case():
    # Sorted 0, 1, 2, 3 with weights 1, 1, 1, 3: positions 0, 1/4, 1/2, 1.
    # K = 2 -> q = 1/4 gives 1, q = 3/4 gives 2.5 (halfway between 2 and 3).
    out = table([3.0, 0.0, 2.0, 1.0], 2, "density", importance=[3.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(out, [1.0, 2.5], rtol=1e-6)


def test_density_weighted_matches_reference_and_equal_weights_match_np_quantile():
    x = data(3, heavy=True, n=301)
    w = np.random.default_rng(3).exponential(size=301).astype(np.float32)
    q = (np.arange(8) + 0.5) / 8
    np.testing.assert_allclose(
        table(x, 8, "density", importance=w), weighted_quantiles(x, w, q), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        table(x, 8, "density", importance=np.full(301, 3.0)),
        np.quantile(x.astype(np.float64), q),
        rtol=1e-5,
        atol=1e-5,
    )


def test_random_in_range_sorted_and_key_dependent():
    x = data(4)
    a = table(x, 8, "random")
    b = table(x, 8, "random", key=jax.random.key(7))
    assert np.all(a >= x.min()) and np.all(a <= x.max()) and np.all(np.diff(a) >= 0)
    assert np.all(b >= x.min()) and np.all(b <= x.max())
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, table(x, 8, "random"))  # same key, same table


# ---------------------------------------------------------------------------------------
# kmeans++ and kmeans (mostly N = 120 values, sharing compilations)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kmeans++", "kmeans"])
def test_kmeans_family_finds_separated_blobs(method):
    rng = np.random.default_rng(5)
    centres = np.array([-50.0, -5.0, 5.0, 50.0])
    x = (centres[:, None] + rng.normal(0, 0.1, (4, N // 4))).ravel()
    for seed in range(3):
        t = table(x, 4, method, key=jax.random.key(seed))
        np.testing.assert_allclose(t, centres, atol=0.5, err_msg=f"{method} seed {seed}")


@given(seed=st.integers(0, 10_000), k=st.sampled_from([3, 4, 6, 8]), heavy=st.booleans())
@settings(max_examples=20)
def test_kmeans_no_worse_than_kmeanspp_and_equal_to_exact_optimum(seed, k, heavy):
    x = data(seed, heavy)
    key = jax.random.key(seed)
    pp = sse(x, table(x, k, "kmeans++", key=key))
    km = sse(x, table(x, k, "kmeans", key=key))
    assert km <= pp * (1 + 1e-6) + 1e-9
    # Up to 2048 values the refinement's DP runs on the values themselves: the exact
    # optimum (up to float32 rounding of the centroids).
    best = exact_sse(x, k)
    assert km <= best * (1 + 1e-5) + 1e-9
    assert best <= km * (1 + 1e-6) + 1e-9  # sanity of the reference


@given(
    seed=st.integers(0, 10_000),
    n=st.sampled_from([137, 520]),
    k=st.sampled_from([2, 5, 16]),
    kind=st.sampled_from(["heavy", "ties", "outliers", "weighted"]),
)
@settings(max_examples=12, deadline=None)
def test_kmeans_exact_on_rows_that_take_every_dp_level(seed, n, k, kind):
    # 137 and 520 values: the DP's coarse-to-fine layers take two and three levels, with
    # blocks that do not divide the row; ties (few distinct values), isolated outliers
    # (one value per cluster at the ends) and weights stress the windowed argmin.
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, n)
    w = None
    if kind == "ties":
        x = np.round(x * 2) / 2
    elif kind == "outliers":
        x[: k // 2] = 40.0 + 10.0 * np.arange(k // 2)
    elif kind == "weighted":
        w = (rng.exponential(size=n) ** 2).astype(np.float32)
    x = x.astype(np.float32)
    got = sse(x, table(x, k, "kmeans", importance=w), w)
    best = exact_sse(x, k, w)
    assert best <= got * (1 + 1e-6) + 1e-9
    assert got <= best * (1 + 1e-5) + 1e-9


def test_kmeans_within_one_percent_of_optimum_beyond_exact_size():
    # 2400 > 2048 values: the DP runs on bins cut from the Lloyd cells (not exact), but
    # must stay within 1% of the optimum (in practice within 0.1%).
    x = data(6, heavy=True, n=2400)
    t = table(x, 8, "kmeans")
    assert sse(x, t) <= 1.01 * exact_sse(x, 8)


def test_weighted_kmeans_minimizes_weighted_sse():
    x = data(7, heavy=True)
    w = (np.random.default_rng(7).exponential(size=N) ** 2).astype(np.float32)
    t = table(x, 4, "kmeans", importance=w)
    weighted = sse(x, t, w)
    # Exact weighted optimum (brute-force DP over all cut points).
    best = exact_sse(x, 4, w)
    assert best <= weighted <= best * (1 + 1e-5) + 1e-9
    # Better, for the weighted error, than the unweighted solution.
    assert weighted <= sse(x, table(x, 4, "kmeans"), w) + 1e-9
    # Lloyd's fixed point: every centroid is the weighted mean of its cell.
    idx = np.abs(x[:, None] - t[None]).argmin(1)
    for j in range(4):
        sel = idx == j
        if w[sel].sum() > 0:
            np.testing.assert_allclose(
                t[j], np.average(x[sel], weights=w[sel]), rtol=1e-5, atol=1e-6
            )


def test_weighted_kmeanspp_ignores_zero_importance_values():
    # Zero-importance values are never drawn: all centroids come from the weighted blob.
    x = np.concatenate([np.linspace(-10, -9, N // 2), np.linspace(1, 2, N // 2)])
    w = np.concatenate([np.zeros(N // 2), np.ones(N // 2)])
    for seed in range(3):
        t = table(x, 4, "kmeans++", key=jax.random.key(seed), importance=w)
        assert np.all(t >= 1) and np.all(t <= 2), t


def test_kmeans_precision_with_small_scale_offset():
    # 1e6 values 0.5 + 0.02 N(0, 1): float32 prefix sums would be off by ~1e-3 here.
    n = 1_000_000
    x = (0.5 + 0.02 * np.random.default_rng(8).normal(size=n)).astype(np.float32)
    t = table(x, 16, "kmeans").astype(np.float64)
    xs = np.sort(x.astype(np.float64))
    # Lloyd's fixed point, checked in float64: each centroid is the mean of its cell
    # (to ~1 float32 ulp of 0.5 = 6e-8).
    cut = np.searchsorted(xs, (t[1:] + t[:-1]) / 2, side="right")
    bounds = np.concatenate([[0], cut, [n]])
    means = np.array([xs[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_allclose(t, means, rtol=0, atol=1.5e-7)
    # Close to the optimum too: the float64 SSE of a long Lloyd run from density init.
    c = np.quantile(xs, (np.arange(16) + 0.5) / 16)
    for _ in range(300):
        cut = np.searchsorted(xs, (c[1:] + c[:-1]) / 2, side="right")
        bounds = np.concatenate([[0], cut, [n]])
        c = np.array([xs[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])

    def total(c):
        mids = (c[1:] + c[:-1]) / 2
        return float(np.sum((xs - c[np.searchsorted(mids, xs)]) ** 2))

    assert total(t) <= total(c) * (1 + 1e-4)


# ---------------------------------------------------------------------------------------
# preserve_sparsity
# ---------------------------------------------------------------------------------------

# -6..-1, three zeros, 1..3, each ten times (N = 120 values).
SPARSE_X = np.repeat(np.array([-6, -5, -4, -3, -2, -1, 0, 0, 0, 1, 2, 3], np.float32), 10)


@pytest.mark.parametrize(
    "method, expected",
    [
        ("linear", [0.0, -6.0, -1.0, 2.0]),  # one positive centroid: midpoint of [1, 3]
        # Quantiles of the 60 negatives at 1/4 and 3/4: positions 14.75 and 44.25 -> -5, -2.
        ("density", [0.0, -5.0, -2.0, 2.0]),
        ("kmeans", [0.0, -5.0, -2.0, 2.0]),  # optimal 2-split of the negatives; mean of 1..3
        ("kmeans++", None),
        ("random", None),
    ],
)
def test_sparsity_layout_hand_case(method, expected):
    # 60 negatives, 30 zeros, 30 positives, K = 4: zero + round(3 * 60/90) = 2 negatives + 1.
    t = table(SPARSE_X, 4, method, preserve_sparsity=True)
    assert t[0] == 0.0 and not np.signbit(t[0])
    assert np.all((t[1:3] >= -6) & (t[1:3] <= -1)) and np.all(np.diff(t[1:3]) >= 0)
    assert 1 <= t[3] <= 3
    if expected is not None:
        np.testing.assert_allclose(t, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "n_neg, n_pos, ktot, expected",
    [
        (6, 3, 3, (2, 1)),
        (3, 6, 3, (1, 2)),
        (0, 5, 3, (0, 3)),
        (5, 0, 3, (3, 0)),
        (0, 0, 3, (0, 0)),
        (1, 1000, 15, (1, 14)),  # a non-empty side always gets one
        (1000, 1, 2, (1, 1)),
        (50, 50, 15, (8, 7)),  # 7.5 rounds half up
    ],
)
def test_split_counts(n_neg, n_pos, ktot, expected):
    k_neg, k_pos = centroid_init._split_counts(jnp.int32(ktot), jnp.int32(n_neg), jnp.int32(n_pos))
    assert (int(k_neg), int(k_pos)) == expected


def test_sparsity_counts_split_per_group_and_sides_use_own_values():
    rng = np.random.default_rng(9)
    mostly_negative = np.concatenate([-rng.random(90) - 0.1, rng.random(20) + 0.1, np.zeros(10)])
    only_positive = np.concatenate([rng.random(100) + 0.5, np.zeros(20)])
    x = np.stack([mostly_negative, only_positive]).astype(np.float32)
    out = np.asarray(
        init_tables(
            jnp.asarray(x), num_clusters=4, method="kmeans", key=KEY, preserve_sparsity=True
        )
    )
    assert np.all(out[:, 0] == 0.0)
    # Group 0: 3 * 90 / 110 = 2.45 -> 2 negative, 1 positive (the mean of the positives).
    assert np.all(out[0, 1:3] < 0) and out[0, 3] > 0
    np.testing.assert_allclose(out[0, 3], mostly_negative[mostly_negative > 0].mean(), rtol=1e-5)
    # Group 1: no negatives -> all 3 on the positive side, sorted.
    assert np.all(out[1, 1:] >= 0.5) and np.all(np.diff(out[1, 1:]) >= 0)
    # Each group equals its own separate call.
    for g in range(2):
        np.testing.assert_allclose(
            out[g], table(x[g], 4, "kmeans", preserve_sparsity=True), rtol=1e-6
        )


def test_sparsity_all_zero_group_gives_zero_table():
    for method in METHODS:
        t = table(np.zeros(N), 4, method, preserve_sparsity=True)
        np.testing.assert_array_equal(t, np.zeros(4))


# ---------------------------------------------------------------------------------------
# Robustness, jit, vmap
# ---------------------------------------------------------------------------------------

DEGENERATE = {
    name: np.asarray(x, np.float32)
    for name, x in {
        "constant": np.full(N, 0.3),
        "zeros": np.zeros(N),
        "two values": np.array([1.0, 2.0] * (N // 2)),
        "one negative": np.array([-1.0] + [0.0] * (N - 1)),
        "huge offset": 1e6 + 0.0625 * np.arange(N),
    }.items()
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparse", [False, True])
def test_degenerate_inputs_are_finite(method, sparse):
    for name, x in DEGENERATE.items():
        t = table(x, 4, method, preserve_sparsity=sparse)
        assert np.all(np.isfinite(t)), (name, t)
        lo, hi = (min(x.min(), 0), max(x.max(), 0)) if sparse else (x.min(), x.max())
        assert np.all(t >= lo) and np.all(t <= hi), (name, t)
        if not sparse:
            assert np.all(np.diff(t) >= 0), (name, t)
    # More clusters than distinct values: kmeans finds each value (duplicates allowed).
    if method == "kmeans" and not sparse:
        t = table(DEGENERATE["two values"], 4, method)
        assert set(np.unique(t)) == {1.0, 2.0}


@pytest.mark.parametrize("method", ["density", "kmeans"])
def test_all_zero_importance_falls_back_to_unweighted(method):
    x = DEGENERATE["huge offset"]
    out = table(x, 4, method, importance=np.zeros(N))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, table(x, 4, method, importance=np.ones(N)), rtol=1e-6)


def test_jit_does_not_retrace_and_works_under_outer_jit():
    x = jnp.asarray(data(10)[None])
    run = lambda x, key: init_tables(x, num_clusters=4, method="kmeans", key=key)  # noqa: E731
    first = run(x, KEY)
    size = centroid_init._init_tables._cache_size()
    run(x + 1.0, jax.random.key(1))  # new data and key, same shapes
    assert centroid_init._init_tables._cache_size() == size
    # K is traced within its power-of-two bucket: K = 3 shares K = 4's compilation ...
    out = init_tables(x, num_clusters=3, method="kmeans", key=KEY)
    assert centroid_init._init_tables._cache_size() == size and out.shape == (1, 3)
    # ... and K = 17..32 share one more.
    for k in (17, 32):
        out = init_tables(x, num_clusters=k, method="kmeans", key=KEY)
        assert centroid_init._init_tables._cache_size() == size + 1 and out.shape == (1, k)
    np.testing.assert_array_equal(first.shape, (1, 4))
    # Under an outer jit (traced values): same result as the eager call.
    run_pp = lambda x, key: init_tables(x, num_clusters=4, method="kmeans++", key=key)  # noqa: E731
    np.testing.assert_allclose(jax.jit(run_pp)(x, KEY), run_pp(x, KEY), rtol=1e-6)


def test_per_group_vmap_equals_separate_calls_and_keys_differ():
    rng = np.random.default_rng(11)
    x = rng.standard_t(3, size=(3, N)).astype(np.float32)
    for method in ("kmeans", "density"):
        both = np.asarray(init_tables(jnp.asarray(x), num_clusters=4, method=method, key=KEY))
        keys = jax.random.split(KEY, 3)  # the documented per-group keys
        for g in range(3):
            np.testing.assert_allclose(both[g], table(x[g], 4, method, key=keys[g]), rtol=1e-6)
    same = np.stack([x[0], x[0]])
    out = np.asarray(init_tables(jnp.asarray(same), num_clusters=4, method="random", key=KEY))
    assert not np.allclose(out[0], out[1])


def test_bad_arguments():
    x = jnp.ones((1, 8))
    with pytest.raises(ValueError, match="unknown init method"):
        init_tables(x, num_clusters=4, method="kmedians", key=KEY)
    with pytest.raises(ValueError, match="num_clusters"):
        init_tables(x, num_clusters=0, method="linear", key=KEY)
    with pytest.raises(ValueError, match="shape"):
        init_tables(jnp.ones(8), num_clusters=2, method="linear", key=KEY)
    with pytest.raises(ValueError, match="importance"):
        init_tables(x, num_clusters=2, method="linear", key=KEY, importance=jnp.ones((1, 7)))
