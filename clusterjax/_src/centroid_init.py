"""Centroid initialization in 1-D: linear, random, density, kmeans++ and kmeans.

Every method works on the *sorted* values of one group (one tensor, one channel, one
group of channels) restricted to a contiguous range `[start, stop)` of that sorted array,
with a traced number of centroids `k <= kmax` and static shapes throughout. That is what
makes the sparsity-aware variant jittable: the negative weights are a prefix of the
sorted array, the positive weights a suffix, and the split of the K - 1 non-zero
centroids between them depends on the data.

* linear: `k` values evenly spaced over `[min, max]` (the midpoint when `k == 1`).
* random: `k` uniform draws in `[min, max]`, sorted.
* density: quantiles of the empirical CDF at `(i + 0.5) / k`, linearly interpolated
  exactly like `np.quantile` (importance-weighted: plotting positions from the
  cumulative weights).
* kmeans++: D^2 seeding (probability proportional to importance x squared distance to
  the nearest chosen centroid). Above `_SEED_SAMPLE` values the seeding runs on an
  evenly strided subsample of the sorted values, which keeps it O(sample x K).
* kmeans: kmeans++ seeding, then Lloyd iterations until no centroid moves. In 1-D a
  cluster is a contiguous run of the sorted values between two midpoints, so one
  iteration is `K` binary searches plus two prefix-sum look-ups per cluster:
  O(K log n) after the one sort. Prefix sums are kept as compensated (hi, lo) float32
  pairs so that cluster means stay accurate over 10^7 values.

Unused table entries (index >= k) repeat the last used centroid, so tables never hold
NaN; an empty range gives zeros.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_SEED_SAMPLE = 1 << 17
_MAX_LLOYD_ITERS = 1000


@functools.partial(jax.jit, static_argnames=("num_clusters", "method", "preserve_sparsity"))
def init_tables(
    x: jax.Array,
    *,
    num_clusters: int,
    method: str,
    key: jax.Array,
    preserve_sparsity: bool = False,
    importance: jax.Array | None = None,
) -> jax.Array:
    """Centroid tables for G groups of values.

    Args:
      x: (G, n) values (float32).
      num_clusters: K (static).
      method: "linear" | "random" | "density" | "kmeans++" | "kmeans" (static).
      key: PRNG key; each group gets its own.
      preserve_sparsity: reserve centroid 0 as an exact zero and split the other K - 1
        between the negative and positive values in proportion to their counts,
        each side initialized by `method` on its own values. Layout:
        `[0, negatives ascending..., positives ascending...]`.
      importance: optional (G, n) non-negative weights; methods then minimize (or
        follow the distribution of) the importance-weighted values.

    Returns:
      (G, K) float32 tables; sorted ascending without `preserve_sparsity`.
    """
    x = jnp.asarray(x, jnp.float32)
    g, n = x.shape
    if importance is None:
        w = None
    else:
        w = jnp.maximum(jnp.asarray(importance, jnp.float32), 0.0)
        # All-zero importance carries no information: fall back to uniform weights.
        w = jnp.where(jnp.sum(w, axis=1, keepdims=True) > 0, w, 1.0)
    keys = jax.random.split(key, g)
    fn = functools.partial(
        _init_group, k_total=num_clusters, method=method, preserve_sparsity=preserve_sparsity
    )
    if w is None:
        return jax.vmap(lambda x, key: fn(x, None, key))(x, keys)
    return jax.vmap(fn)(x, w, keys)


def _init_group(x, w, key, *, k_total, method, preserve_sparsity):
    if w is None:
        xs = jnp.sort(x)
        ws = jnp.ones_like(xs)
    else:
        order = jnp.argsort(x)
        xs = x[order]
        ws = w[order]
    n = xs.shape[0]
    prefix = _Prefix.build(xs, ws) if method == "kmeans" else None
    weighted = w is not None
    if not preserve_sparsity:
        return _init_range(xs, ws, prefix, 0, n, k_total, k_total, method, key, weighted)
    kmax = k_total - 1
    n_neg = jnp.sum(xs < 0).astype(jnp.int32)
    n_pos = jnp.sum(xs > 0).astype(jnp.int32)
    k_neg, k_pos = _split(kmax, n_neg, n_pos)
    key_neg, key_pos = jax.random.split(key)
    neg = _init_range(xs, ws, prefix, 0, n_neg, k_neg, kmax, method, key_neg, weighted)
    pos = _init_range(xs, ws, prefix, n - n_pos, n, k_pos, kmax, method, key_pos, weighted)
    j = jnp.arange(kmax)
    rest = jnp.where(j < k_neg, neg, pos[jnp.clip(j - k_neg, 0, kmax - 1)])
    rest = jnp.where(j < k_neg + k_pos, rest, 0.0)
    return jnp.concatenate([jnp.zeros((1,), rest.dtype), rest])


def _split(kmax, n_neg, n_pos):
    """Splits kmax centroids between the sides in proportion to their counts."""
    total = n_neg + n_pos
    share = jnp.where(total > 0, n_neg / jnp.maximum(total, 1), 0.0)
    k_neg = jnp.round(kmax * share).astype(jnp.int32)
    # Each non-empty side gets at least one centroid (when there are two to give).
    lo = jnp.where((n_neg > 0) & ((n_pos == 0) | (kmax >= 2)), 1, 0)
    hi = jnp.where((n_pos > 0) & (kmax >= 2), kmax - 1, kmax)
    k_neg = jnp.clip(k_neg, lo, hi)
    k_neg = jnp.where(n_neg > 0, k_neg, 0)
    k_pos = jnp.where(n_pos > 0, kmax - k_neg, 0)
    return k_neg, k_pos


def _init_range(xs, ws, prefix, start, stop, k, kmax, method, key, weighted=False):
    """kmax-entry table for the sorted values xs[start:stop]; the first k are used."""
    start = jnp.asarray(start, jnp.int32)
    stop = jnp.asarray(stop, jnp.int32)
    k = jnp.asarray(k, jnp.int32)
    n = xs.shape[0]
    m = stop - start
    lo = xs[jnp.clip(start, 0, n - 1)]
    hi = xs[jnp.clip(stop - 1, 0, n - 1)]
    j = jnp.arange(kmax, dtype=jnp.float32)
    kf = k.astype(jnp.float32)
    if method == "linear":
        t = jnp.where(k > 1, j / jnp.maximum(kf - 1.0, 1.0), 0.5)
        table = lo + (hi - lo) * t
    elif method == "random":
        u = jax.random.uniform(key, (kmax,), jnp.float32)
        table = jnp.sort(jnp.where(j < kf, lo + (hi - lo) * u, jnp.inf))
    elif method == "density":
        table = _quantiles(xs, ws, start, stop, (j + 0.5) / jnp.maximum(kf, 1.0), weighted)
    elif method in ("kmeans++", "kmeans"):
        table = _kmeanspp(xs, ws, start, stop, k, kmax, key)
        if method == "kmeans":
            table = _lloyd(xs, prefix, start, stop, k, kmax, table)
    else:
        raise ValueError(f"unknown init method {method!r}")
    # Unused entries repeat the last used centroid; an empty range gives zeros.
    last = table[jnp.clip(k - 1, 0, kmax - 1)]
    table = jnp.where(j < kf, table, last)
    return jnp.where((m > 0) & (k > 0), table, 0.0)


def _quantiles(xs, ws, start, stop, q, weighted):
    """np.quantile-style (linear) quantiles of xs[start:stop], importance-weighted."""
    n = xs.shape[0]
    idx = jnp.arange(n)
    inside = (idx >= start) & (idx < stop)
    wr = jnp.where(inside, ws, 0.0)
    cw = jnp.cumsum(wr)
    total = cw[-1]
    if weighted:
        # Each value stands for its weight: position = the middle of its weight mass.
        pos = jnp.where(inside, (cw - 0.5 * wr) / jnp.maximum(total, 1e-30), 0.0)
    else:
        # (i - start) / (m - 1): exactly np.quantile's default 'linear' interpolation.
        last_w = wr[jnp.clip(stop - 1, 0, n - 1)]
        pos = jnp.where(inside, (cw - wr) / jnp.maximum(total - last_w, 1e-30), 0.0)
    pos = jnp.where(inside, pos, jnp.where(idx < start, -1.0, 2.0))
    hit = jnp.searchsorted(pos, q, side="right") - 1
    i0 = jnp.clip(hit, start, jnp.maximum(stop - 1, start))
    i1 = jnp.clip(i0 + 1, start, jnp.maximum(stop - 1, start))
    i0c, i1c = jnp.clip(i0, 0, n - 1), jnp.clip(i1, 0, n - 1)
    p0, p1 = pos[i0c], pos[i1c]
    frac = jnp.where(p1 > p0, jnp.clip((q - p0) / jnp.where(p1 > p0, p1 - p0, 1.0), 0, 1), 0.0)
    single = stop - start <= 1
    return jnp.where(single, xs[i0c], xs[i0c] + (xs[i1c] - xs[i0c]) * frac)


def _kmeanspp(xs, ws, start, stop, k, kmax, key):
    """D^2 seeding on xs[start:stop] (or an evenly strided sample of it), sorted result."""
    n = xs.shape[0]
    stride = max(1, -(-n // _SEED_SAMPLE))
    sample_x = xs[::stride]
    sample_w = ws[::stride]
    positions = jnp.arange(sample_x.shape[0]) * stride
    inside = (positions >= start) & (positions < stop)
    # A range too small to hit the stride grid still has its first value.
    first = jnp.clip(start, 0, n - 1)
    weight = jnp.where(inside, sample_w, 0.0)
    fallback = jnp.sum(inside) == 0
    keys = jax.random.split(key, kmax)

    def pick(key, probs, count):
        """`count` draws proportional to `probs` (the first value if no mass is left)."""
        total = jnp.sum(probs)
        cdf = jnp.cumsum(probs)
        u = jax.random.uniform(key, (count,), jnp.float32) * total
        i = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, probs.shape[0] - 1)
        return jnp.where((total > 0) & ~fallback, sample_x[i], xs[first])

    c0 = pick(keys[0], weight, 1)[0]
    d2 = (sample_x - c0) ** 2
    table = jnp.full((kmax,), c0, jnp.float32)
    # Greedy k-means++ (as scikit-learn does): draw several candidates per step and keep
    # the one that lowers the potential most.
    trials = 2 + int(math.log(max(kmax, 2)))

    def body(j, carry):
        table, d2 = carry
        cands = pick(keys[j], weight * d2, trials)
        new_d2 = jnp.minimum(d2[None, :], (sample_x[None, :] - cands[:, None]) ** 2)
        best = jnp.argmin(jnp.sum(weight[None, :] * new_d2, axis=1))
        c = cands[best]
        active = j < k
        table = table.at[j].set(jnp.where(active, c, table[j]))
        d2 = jnp.where(active, new_d2[best], d2)
        return table, d2

    table, _ = lax.fori_loop(1, kmax, body, (table, d2))
    j = jnp.arange(kmax)
    return jnp.sort(jnp.where(j < k, table, jnp.inf))


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


class _Prefix:
    """Compensated prefix sums of w and w*x over the sorted values (index 0 = empty)."""

    def __init__(self, w_hi, w_lo, s_hi, s_lo):
        self.w_hi, self.w_lo, self.s_hi, self.s_lo = w_hi, w_lo, s_hi, s_lo

    @staticmethod
    def build(xs, ws):
        def scan(v):
            def combine(a, b):
                s, e = _two_sum(a[0], b[0])
                return s, e + a[1] + b[1]

            hi, lo = lax.associative_scan(combine, (v, jnp.zeros_like(v)))
            zero = jnp.zeros((1,), v.dtype)
            return jnp.concatenate([zero, hi]), jnp.concatenate([zero, lo])

        w_hi, w_lo = scan(ws)
        s_hi, s_lo = scan(ws * xs)
        return _Prefix(w_hi, w_lo, s_hi, s_lo)

    def range_sums(self, a, b):
        """(sum w, sum w*x) over sorted positions [a, b), accurate to ~float32 rounding."""

        def diff(hi, lo):
            d, e = _two_sum(hi[b], -hi[a])
            return d + (e + (lo[b] - lo[a]))

        return diff(self.w_hi, self.w_lo), diff(self.s_hi, self.s_lo)


def _lloyd(xs, prefix, start, stop, k, kmax, table):
    """Lloyd iterations on sorted 1-D data until no centroid moves."""
    j = jnp.arange(kmax)

    def bounds(c):
        mids = (c[:-1] + c[1:]) * 0.5
        # Values equal to a midpoint join the lower cluster (assignment tie rule).
        cut = jnp.searchsorted(xs, mids, side="right").astype(jnp.int32)
        cut = jnp.where(j[1:] < k, jnp.clip(cut, start, stop), stop)
        lower = jnp.concatenate([start[None], cut])
        upper = jnp.concatenate([cut, stop[None]])
        return lower, upper

    def step(c):
        lower, upper = bounds(c)
        wsum, sx = prefix.range_sums(lower, upper)
        mean = sx / jnp.where(wsum > 0, wsum, 1.0)
        new = jnp.where((wsum > 0) & (j < k), mean, c)
        # Keep the table sorted (float rounding could swap two nearly equal means).
        return jnp.where(j < k, jnp.sort(jnp.where(j < k, new, jnp.inf)), c)

    def cond(carry):
        i, c, prev = carry
        return (i < _MAX_LLOYD_ITERS) & jnp.any(c != prev)

    def body(carry):
        i, c, _ = carry
        return i + 1, step(c), c

    start = jnp.asarray(start, jnp.int32)
    stop = jnp.asarray(stop, jnp.int32)
    first = step(table)
    _, table, _ = lax.while_loop(cond, body, (jnp.int32(1), first, table))
    return table
