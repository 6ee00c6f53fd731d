"""Vector tables (`ClusterSpec(cluster_dim=d > 1)`): nearest-vector assignment and k-means.

A vector table holds K vectors of d weights. Everything here works on groups of vectors,
`(G, n, d)` (one row of vectors per table, see `LeafPlan.grouped`), and tables `(G, K, d)`.

**Assignment without an N x K array.** The nearest vector minimizes
`||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2`; `||x||^2` is the same for every centroid, so the
argmin is that of `||c||^2 - 2 x.c`, one matrix product. Vectors are processed in chunks
of at most `_CHUNK_ELEMENTS / K` rows (`lax.map`), so the distances alive at any time are
one chunk's, whatever the leaf's size. Ties go to the lowest index (`argmin`). The
expanded form rounds differently from `sum((x - c)**2)`: two centroids whose distances
agree to float32 rounding may be chosen either way (the tests allow exactly that).

**k-means in d dimensions.** `init="kmeans++"`: greedy D^2 seeding (each centre the best
of `2 + floor(ln K)` D^2-sampled candidates, by the potential it leaves) on a sample of at
most `SAMPLE` vectors per table. `init="kmeans"`: that seeding, Lloyd iterations on the
sample, then Lloyd iterations on all the vectors until no centroid moves by more than
`1e-4` of the data's spread (at most `FULL_ITERS`). Empty clusters keep their centroid.
`init="random"`: K points uniform in the bounding box of the table's vectors.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

#: Distances computed at once per chunk (rows x K): bounds the assignment's temporaries.
_CHUNK_ELEMENTS = 1 << 22
#: Vectors per table the seeding and the first Lloyd iterations run on.
SAMPLE = 16384
SAMPLE_ITERS = 50
FULL_ITERS = 10
TOL = 1e-4


def _nearest_rows(x: jax.Array, table: jax.Array) -> jax.Array:
    """int32 index of the nearest row of `table` (K, d) for every row of `x` (m, d)."""
    c2 = jnp.sum(table * table, axis=-1)
    dist = c2[None, :] - 2.0 * jnp.dot(x, table.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def _chunked(fn, x: jax.Array, k: int) -> jax.Array:
    """`fn(x)` for rows `x` (n, d) in chunks of at most `_CHUNK_ELEMENTS / k` rows."""
    n = x.shape[0]
    rows = max(256, _CHUNK_ELEMENTS // max(k, 1))
    if n <= rows:
        return fn(x)
    chunks = -(-n // rows)
    padded = jnp.pad(x, ((0, chunks * rows - n), (0, 0)))
    out = jax.lax.map(fn, padded.reshape(chunks, rows, x.shape[1]))
    return out.reshape((chunks * rows,) + out.shape[2:])[:n]


@functools.partial(jax.jit, static_argnames="dtype")
def assign(x: jax.Array, tables: jax.Array, *, dtype=jnp.int32) -> jax.Array:
    """Index of the nearest vector (Euclidean) of each vector's own table.

    Args:
      x: `(G, n, d)` vectors, one row of vectors per table.
      tables: `(G, K, d)` vector tables.
      dtype: the integer dtype of the result.

    Returns:
      `(G, n)` indices in `[0, K)`; ties to the lowest index.

    Example:
      >>> import jax.numpy as jnp
      >>> from clusterjax._src.vectors import assign
      >>> table = jnp.array([[[0.0, 0.0], [1.0, 1.0]]])
      >>> assign(jnp.array([[[0.1, 0.2], [0.9, 0.6], [5.0, 5.0]]]), table).tolist()
      [[0, 1, 1]]
    """
    x = x.astype(jnp.float32)
    tables = tables.astype(jnp.float32)
    k = tables.shape[1]

    def one(args):
        xg, tg = args
        return _chunked(lambda rows: _nearest_rows(rows, tg), xg, k)

    if x.shape[0] == 1:
        return one((x[0], tables[0]))[None].astype(dtype)
    return jax.lax.map(one, (x, tables)).astype(dtype)


def _sums_and_counts(x, idx, k):
    """Per-cluster vector sums `(K, d)` and sizes `(K,)` of rows `x` with indices `idx`."""
    sums = jnp.zeros((k, x.shape[1]), jnp.float32).at[idx].add(x)
    counts = jnp.zeros((k,), jnp.float32).at[idx].add(1.0)
    return sums, counts


def _lloyd(x: jax.Array, table: jax.Array, iters: int, tol: jax.Array) -> jax.Array:
    """Lloyd iterations on rows `x` (n, d) from `table` (K, d), until no centroid moves by
    more than `tol` or after `iters` iterations. Empty clusters keep their centroid."""
    k = table.shape[0]

    def step(table):
        idx = _chunked(lambda rows: _nearest_rows(rows, table), x, k)
        sums, counts = _sums_and_counts(x, idx, k)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], table)

    def cond(carry):
        i, _, moved = carry
        return (i < iters) & (moved > tol)

    def body(carry):
        i, table, _ = carry
        new = step(table)
        return i + 1, new, jnp.max(jnp.abs(new - table))

    _, table, _ = jax.lax.while_loop(cond, body, (0, table, jnp.float32(jnp.inf)))
    return table


def _kmeanspp(x: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Greedy D^2 seeding of K centres from rows `x` (m, d): each centre is the best of
    `2 + floor(ln K)` candidates drawn with probability proportional to D^2, by the total
    D^2 it leaves (the greedy k-means++ of Arthur & Vassilvitskii, as in scikit-learn)."""
    m = x.shape[0]
    trials = 2 + int(math.log(k))
    key, first = jax.random.split(key)
    c0 = x[jax.random.randint(first, (), 0, m)]
    d2 = jnp.sum((x - c0[None, :]) ** 2, axis=-1)
    table = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(c0)

    def body(j, carry):
        table, d2, key = carry
        key, sub = jax.random.split(key)
        total = jnp.sum(d2)
        # All points identical (D^2 = 0 everywhere): any point is as good as another.
        logits = jnp.where(total > 0, jnp.log(jnp.maximum(d2, 1e-30)), 0.0)
        cand = jax.random.categorical(sub, logits, shape=(trials,))
        cand_d2 = jnp.sum((x[None, :, :] - x[cand][:, None, :]) ** 2, axis=-1)  # (trials, m)
        pot = jnp.sum(jnp.minimum(d2[None, :], cand_d2), axis=-1)
        best = jnp.argmin(pot)
        return table.at[j].set(x[cand[best]]), jnp.minimum(d2, cand_d2[best]), key

    table, _, _ = jax.lax.fori_loop(1, k, body, (table, d2, key))
    return table


@functools.partial(jax.jit, static_argnames=("num_clusters", "method"))
def init_tables(x: jax.Array, *, num_clusters: int, method: str, key: jax.Array) -> jax.Array:
    """Initial vector tables for `G` groups of vectors.

    Args:
      x: `(G, n, d)` vectors (finite), one row per table.
      num_clusters: K.
      method: `"random"`, `"kmeans++"` or `"kmeans"` (see the module docstring).
      key: a PRNG key, split per group.

    Returns:
      `(G, K, d)` float32 tables.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from clusterjax._src.vectors import init_tables
      >>> x = jnp.array([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.1]]])
      >>> t = init_tables(x, num_clusters=2, method="kmeans", key=jax.random.key(0))
      >>> sorted((t[0] * 100).round().astype(int).tolist())   # the two blob means
      [[5, 0], [500, 505]]
    """
    x = x.astype(jnp.float32)
    g, n, d = x.shape
    k = num_clusters
    keys = jax.random.split(key, g)

    def one(args):
        xg, kg = args
        k_sample, k_init = jax.random.split(kg)
        if method == "random":
            lo, hi = jnp.min(xg, axis=0), jnp.max(xg, axis=0)
            return lo[None, :] + (hi - lo)[None, :] * jax.random.uniform(k_init, (k, d))
        m = min(n, SAMPLE)
        sample = xg if m == n else xg[jax.random.choice(k_sample, n, (m,), replace=False)]
        table = _kmeanspp(sample, k, k_init)
        if method == "kmeans++":
            return table
        spread = jnp.max(jnp.std(xg, axis=0))
        tol = TOL * jnp.maximum(spread, jnp.finfo(jnp.float32).tiny)
        table = _lloyd(sample, table, SAMPLE_ITERS, tol)
        return (
            table if m == n and SAMPLE_ITERS >= FULL_ITERS else _lloyd(xg, table, FULL_ITERS, tol)
        )

    if g == 1:
        return one((x[0], keys[0]))[None]
    return jax.lax.map(one, (x, keys))


def sse(x: np.ndarray, table: np.ndarray) -> float:
    """Sum of squared distances of rows `x` (n, d) to their nearest row of `table`
    (float64, NumPy): the k-means objective, for reports and tests."""
    x = np.asarray(x, np.float64)
    t = np.asarray(table, np.float64)
    best = np.full(x.shape[0], np.inf)
    for c in t:
        best = np.minimum(best, np.sum((x - c) ** 2, axis=1))
    return float(best.sum())
