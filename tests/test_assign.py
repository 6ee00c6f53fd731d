"""Nearest-centroid assignment against the brute-force N x K reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import nearest_reference

from clusterjax._src.assign import nearest

finite32 = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)


_nearest_jit = jax.jit(nearest)


def _nearest_padded(x, table):
    """One compiled program for all hypothesis examples: pad x with zeros and the table
    with copies of its first centroid (a duplicate never wins: lowest index does)."""
    x = np.asarray(x, np.float32)
    xp = np.zeros(1728, np.float32)
    xp[: x.size] = x.reshape(-1)
    tp = np.full((1, 64), table[0], np.float32)
    tp[0, : table.size] = table
    return np.asarray(_nearest_jit(jnp.asarray(xp), jnp.asarray(tp)))[: x.size].reshape(x.shape)


def _check(x, tables, groups=None, base=0, got=None):
    if got is None:
        got = np.asarray(nearest(jnp.asarray(x), jnp.asarray(tables), base))
    ref = nearest_reference(x, tables, groups)
    assert got.shape == np.shape(x)
    if groups is None:
        groups = np.zeros(np.shape(x), np.int64)
    t = np.asarray(tables, np.float32)
    xf = np.asarray(x, np.float32)
    d_got = np.abs(xf - t[groups, got])
    d_ref = np.abs(xf - t[groups, ref])
    differ = got != ref
    # Only float32 near-ties may differ: both centroids equally near in float32.
    np.testing.assert_array_equal(d_got[differ], d_ref[differ])
    return got


@given(
    x=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=12), elements=finite32
    ),
    table=hnp.arrays(np.float32, st.integers(1, 40), elements=finite32),
)
def test_matches_bruteforce_random(x, table):
    _check(x, table[None, :], got=_nearest_padded(x, table))


@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 200),
        elements=st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0]),
    ),
    table=hnp.arrays(
        np.float32, st.integers(1, 8), elements=st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.0])
    ),
)
def test_exact_ties_and_duplicates(x, table):
    # Values on a small grid: many exact midpoint ties and duplicate centroids.
    got = _nearest_padded(x, table)
    np.testing.assert_array_equal(got, nearest_reference(x, table[None]))


def test_tie_goes_to_lower_value_and_lowest_index():
    table = jnp.array([[1.0, 0.0, 1.0, 3.0]])
    x = jnp.array([0.5, 2.0, 1.0, 0.4, 0.6, 9.0, -9.0])
    np.testing.assert_array_equal(nearest(x, table), [1, 0, 0, 1, 0, 3, 1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k", [1, 2, 3, 16, 255, 256])
def test_dtypes_and_sizes(dtype, k):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_t(3, size=(37, 29)), dtype)
    table = np.sort(rng.normal(size=(1, k))).astype(np.float32)
    _check(np.asarray(x.astype(jnp.float32)), table)


def test_per_group_tables():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    tables = rng.normal(size=(5, 4)).astype(np.float32)  # one table per column
    groups = np.broadcast_to(np.arange(5), x.shape)
    base = jnp.arange(5, dtype=jnp.int32)[None, :] * 4
    _check(x, tables, groups, base)


def test_jit_and_no_nxk():
    x = jnp.linspace(-3, 3, 100_000)
    table = jnp.linspace(-2, 2, 256)[None]
    f = jax.jit(nearest)
    hlo = f.lower(x, table).as_text()
    # No intermediate of N x K elements anywhere in the program.
    assert "100000,256" not in hlo and "256,100000" not in hlo
    np.testing.assert_array_equal(f(x, table), nearest_reference(np.asarray(x), np.asarray(table)))


def _flush(v):
    v = np.asarray(v, np.float32)
    return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.float32(0), v)


_BIG_K = 96  # > UNROLL_MAX_K: the bucketed look-up (one table) / binary search (groups)


def _nearest_big(x, table):
    """One compiled program for every example of the large-K tests (padded like above)."""
    x = np.asarray(x, np.float32).reshape(-1)
    xp = np.zeros(512, np.float32)
    xp[: x.size] = x
    tp = np.full((1, _BIG_K), table[0], np.float32)
    tp[0, : table.size] = table
    return np.asarray(_nearest_jit(jnp.asarray(xp), jnp.asarray(tp)))[: x.size]


@given(
    data=st.data(),
    spread=st.sampled_from([1e-6, 1e-2, 1.0, 1e4]),
    outlier=st.sampled_from([0.0, 1e2, 1e6, 3e38]),
    shuffle=st.booleans(),
)
def test_bucketed_lookup_matches_bruteforce(data, spread, outlier, shuffle):
    # Tables built to crowd many thresholds into one bucket (tight clusters next to far
    # outliers, duplicates) and to leave most buckets empty, so that every branch of the
    # look-up (0, 1, 2 and a full search of a bucket; sorted and unsorted tables) runs.
    k = data.draw(st.integers(2, _BIG_K))
    core = data.draw(
        hnp.arrays(np.float32, k, elements=st.floats(-1, 1, width=32, allow_subnormal=False))
    )
    table = (core * np.float32(spread)).astype(np.float32)
    if outlier:
        table[0] = np.float32(outlier)
        table[-1] = np.float32(-outlier / 3)
    if not shuffle:
        table = np.sort(table)
    # Weights: the centroids, their midpoints and the next floats around them, the
    # extremes and random values.
    t = np.sort(table.astype(np.float64))
    mids = ((t[1:] + t[:-1]) / 2).astype(np.float32)
    pts = np.concatenate([table, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    extra = data.draw(hnp.arrays(np.float32, 40, elements=finite32))
    x = np.concatenate([pts, extra, [np.float32(3e38), np.float32(-3e38), 0.0]])[:512]
    # XLA on CPU flushes subnormals to zero; keep them out of the comparison.
    x, table = (_flush(v) for v in (x, table))
    got = _nearest_big(x, table)
    _check(x, table[None], got=got)


@pytest.mark.parametrize("k", [65, 256, 1000])
def test_bucketed_lookup_heavy_tails_and_one_value(k):
    rng = np.random.default_rng(k)
    x = rng.standard_t(2, size=20_000).astype(np.float32) * 10
    table = np.quantile(x, (np.arange(k) + 0.5) / k).astype(np.float32)[None]
    _check(x, table)
    _check(x, np.full((1, k), 1.5, np.float32))  # every threshold in one bucket
    _check(x, rng.permutation(table[0])[None])  # unsorted table: the index look-up


def test_per_group_tables_large_k():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    tables = rng.normal(size=(3, 100)).astype(np.float32)
    groups = np.broadcast_to(np.arange(3), x.shape)
    base = jnp.arange(3, dtype=jnp.int32)[None, :] * 100
    _check(x, tables, groups, base)


@pytest.mark.parametrize("k", [16, 300])
def test_sorted_fast_path_and_sorting_agree(k):
    """Strictly increasing tables skip the sort; tables with a swapped pair or duplicate
    centroids take it (K <= 256: all-pairs ranks, larger K: binary search)."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal(3000).astype(np.float32)
    table = np.sort(rng.standard_normal(k).astype(np.float32))
    swapped = table.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    dup = table.copy()
    dup[7] = dup[6]  # still non-decreasing, but not strictly: rep must be the lowest index
    for t in (table, swapped, dup, table[::-1].copy()):
        got = _check(x, t[None])
        np.testing.assert_array_equal(got, nearest_reference(x, t[None]))


def _fullest_bucket(table):
    """Most decision thresholds in one bucket of the look-up (NumPy, midpoints)."""
    t = np.sort(np.asarray(table, np.float64))
    thr = (t[1:] + t[:-1]) / 2
    nb = 16 << int(np.ceil(np.log2(len(thr) + 1)))
    pos = np.clip(((thr - thr[0]) * (nb / (thr[-1] - thr[0]))).astype(np.int64), 0, nb - 1)
    return np.bincount(pos, minlength=nb).max()


@pytest.mark.parametrize("crowd", [1, 2, 3, 6])
@pytest.mark.parametrize("shuffle", [False, True])
def test_bucketed_lookup_each_bucket_fill(crowd, shuffle):
    """Evenly spread centroids plus a tight run of `crowd + 1` centroids, so that the
    fullest bucket holds `crowd` thresholds: every branch (one, two, a short and a full
    search; sorted and unsorted) against the reference."""
    rng = np.random.default_rng(crowd)
    k = 200
    spread = np.linspace(-1.0, 1.0, k - crowd - 1)
    center = (spread[130] + spread[131]) / 2  # far from the spread thresholds
    run = center + 1e-5 * np.arange(crowd + 1)  # crowd thresholds inside one bucket
    table = np.concatenate([spread, run]).astype(np.float32)
    assert _fullest_bucket(table) == crowd
    if shuffle:
        table = rng.permutation(table)
    x = np.concatenate(
        [rng.uniform(-1.2, 1.2, 5000), center + rng.uniform(-2e-5, 8e-5, 2000), table]
    ).astype(np.float32)
    got = _check(x, table[None])
    np.testing.assert_array_equal(got, nearest_reference(x, table[None]))
