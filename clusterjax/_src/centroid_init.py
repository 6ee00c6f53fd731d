"""Centroid initialization in 1-D: linear, random, density, kmeans++ and kmeans.

Everything here is pure JAX, jittable and vmapped over groups: ``init_tables`` takes the
values of ``G`` independent groups as a ``(G, n)`` array and returns one sorted table of
``K`` centroids per group.

**Ranges of sorted values.** Every data-dependent method works on the values of one group
sorted once, restricted to a contiguous range ``[start, stop)`` of the sorted array, with
a *traced* number of centroids ``k <= kmax`` (``kmax`` static) and static shapes
throughout; entries ``k..kmax-1`` of a range's table are padding. This is what makes the
sparsity-aware variant jittable: after sorting, the negative values are a prefix and the
positive values a suffix of the array, and how the ``K - 1`` non-zero centroids are split
between them depends on the data.

**Methods.**

* ``linear``: ``k`` values evenly spaced over ``[min, max]``; the first is exactly
  ``min`` and the last exactly ``max``. ``k == 1`` gives the midpoint
  ``(min + max) / 2``.
* ``random``: ``k`` uniform draws in ``[min, max]`` from the key, sorted.
* ``density``: quantiles of the empirical CDF at ``(i + 0.5) / k``, ``i = 0..k-1``, with
  linear interpolation between order statistics exactly as ``np.quantile``'s default
  (position ``q (m - 1)``; computed in integer arithmetic so that it stays exact for
  ``10^7`` values). With importance weights, value ``i`` of the range sits at the CDF
  position ``(C_i + w_i / 2 - w_first / 2) / (W - w_first / 2 - w_last / 2)`` (``C_i`` =
  weight before it, ``W`` = total): for equal weights this is ``i / (m - 1)``, i.e.
  ``np.quantile`` again; it is symmetric under reversing the data.
* ``kmeans++``: greedy D^2 seeding (as scikit-learn does it). The first centroid is a
  value drawn with probability proportional to its importance; each following one is the
  best, by total squared distance, of ``2 + floor(ln kmax)`` candidates drawn with
  probability proportional to importance x squared distance to the nearest centroid.
  In 1-D the values nearest to a centroid are a contiguous run of the sorted array (its
  *cell*, bounded by the midpoints to the neighbouring centroids), and with prefix sums
  of ``w``, ``w x`` and ``w x^2`` the cost of a cell is
  ``S2 - 2 c S1 + c^2 W``. A draw picks a cell with probability proportional to its cost,
  then the value inside it by binary search on the cumulative cost. One seeding step is
  therefore O(K log n) per candidate and the whole seeding O(K^2 log n), never O(n K).
* ``kmeans``: seeds with the asymptotically optimal centroid density ``p^(1/3)`` (high
  resolution quantization theory; ``_density_seeds``, from ``4 kmax`` equal-count bins,
  deterministic and O(kmax log kmax): the refinement below is global, so kmeans++'s
  O(kmax^2 log n) seeding would buy nothing), then Lloyd iterations until no centroid
  moves (capped at ``_LLOYD_MAX_ITERS``). A Lloyd iteration is ``K`` binary searches for
  the cell boundaries plus prefix-sum look-ups for the cell means: O(K log n) after the
  one sort. In 1-D Lloyd typically stalls a few percent above the optimum at
  ``K = 256`` (it is a slow diffusion of the centroid density that freezes once the moves
  become smaller than the spacing of the values, and Student-t data has genuine local
  minima). The result is then *refined globally*: the cells of the Lloyd solution are cut
  into ``S >= 16`` equal-count bins each (``S * K`` bins in all), the exact optimal
  partition of these bins into at most ``k`` clusters is found by dynamic programming
  (``_dp_optimum``: each layer coarse to fine over the monotone argmin, in dense blocks;
  the cut points of the Lloyd solution are bin edges, so this can only lower the cost),
  and Lloyd is run again from the bin-optimal centroids. When a range has at most
  ``max(S K, 2048)`` values the bins are the values themselves, the DP is the exact 1-D
  k-means optimum and the first Lloyd run is skipped. Otherwise the lower-SSE of the two
  Lloyd results is returned. ``K`` is padded to the next power of two (at least
  ``_KMAX_MIN``), so the per-table work scales with ``K``, not with a fixed 256.

**Precision.** Prefix sums over ``10^7`` float32 values lose far too much in plain
float32 (cell costs are small differences of large sums), so they are kept as
double-float ``(hi, lo)`` float32 pairs: a float32 ``cumsum`` followed by the exact
error of every step (two-sum) accumulated in a second ``cumsum``; products use Dekker's
exact two-product. Values are also centred on the median of their range before the sums
are built. All derived quantities (cell sums, means, costs) are computed in double-float
arithmetic and rounded once at the end.

**Robustness.** Constant groups, fewer distinct values than centroids, all-zero groups,
empty ranges and importance weights that are all zero never give NaN or Inf (duplicate
centroids are allowed). All-zero importance in a group falls back to uniform weights; a
range whose importance is all zero falls back to ``linear``.

Importance weights affect ``density``, ``kmeans++`` and ``kmeans``; ``linear`` and
``random`` use the range ``[min, max]`` of all values.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("linear", "random", "density", "kmeans++", "kmeans")

# Lloyd iterations per stage (seeding -> Lloyd, DP -> Lloyd), each until no centroid moves.
_LLOYD_MAX_ITERS = 300
# Minimum number of DP bins per centroid in the global refinement of "kmeans".
_DP_MIN_BINS_PER_CLUSTER = 16
# ... and at least this many bins in all (cheap for small K, and closer to exact).
_DP_MIN_BINS = 2048
# Each level of a DP layer places this many times more positions than the one before ...
_DP_FACTOR = 8
# ... from a first, full-search level at a stride of at least m / _DP_TOP.
_DP_TOP = 16
# Smallest compiled table size (K is traced up to the next power of two).
_KMAX_MIN = 4
# Equal-count bins per centroid of the density seeding of "kmeans".
_SEED_BINS_PER_CLUSTER = 4
# Inputs of at least this many values are compiled with the backend's optimizations.
_OPTIMIZE_FROM = 1 << 15
# Padding value of unused table entries while a table is being built (finite on purpose).
_BIG = 1e30

Array = jax.Array


# --------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------


def init_tables(
    x: Array,
    *,
    num_clusters: int,
    method: str,
    key: Array,
    preserve_sparsity: bool = False,
    importance: Array | None = None,
) -> Array:
    """Initial centroid tables for ``G`` independent groups of values.

    Jit-compiled; ``num_clusters``, ``method`` and ``preserve_sparsity`` are static, so a
    second call with the same shapes and settings does not retrace.

    Args:
      x: ``(G, n)`` values, one row per group (``G = 1`` for a whole tensor). Cast to
        float32. Must be finite.
      num_clusters: ``K >= 1``, centroids per group.
      method: ``"linear"``, ``"random"``, ``"density"``, ``"kmeans++"`` or ``"kmeans"``
        (see the module docstring).
      key: PRNG key (typed or raw); it is split into ``G`` keys, one per group.
      preserve_sparsity: if True, centroid 0 of every table is exactly ``0.0`` and the
        other ``K - 1`` are split between the negative and the positive values in
        proportion to their counts (rounded to nearest; each non-empty side gets at least
        one when ``K - 1 >= 2``; a side gets all ``K - 1`` when the other is empty), each
        side initialized by ``method`` on its own values (zeros excluded). Layout:
        ``[0, negatives ascending..., positives ascending...]``. If a group has no
        non-zero value its table is all zeros; with ``K == 1`` it is ``[0]``.
      importance: optional ``(G, n)`` non-negative per-value weights (negative entries
        are treated as 0). ``density`` then gives weighted quantiles and ``kmeans++`` /
        ``kmeans`` minimize the importance-weighted squared error.

    Returns:
      ``(G, K)`` float32 tables, sorted ascending unless ``preserve_sparsity``.

    Raises:
      ValueError: unknown ``method``, ``num_clusters`` not a positive int, or arrays of
        the wrong rank / shape.
    """
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r}; expected one of {METHODS}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an int >= 1, got {num_clusters!r}")
    if jnp.ndim(x) != 2:
        raise ValueError(f"x must have shape (G, n), got {jnp.shape(x)}")
    if importance is not None and jnp.shape(importance) != jnp.shape(x):
        raise ValueError(
            f"importance must have the shape of x {jnp.shape(x)}, got {jnp.shape(importance)}"
        )
    x = jnp.asarray(x, jnp.float32)
    g, n = x.shape
    if n == 0:
        return jnp.zeros((g, num_clusters), jnp.float32)
    w = None if importance is None else jnp.asarray(importance, jnp.float32)
    # The table size is static and the actual K is traced: K = 5..8 share one compilation
    # per shape and method, and so on for every power of two. The per-table work (seeding,
    # Lloyd, the DP) is O(kmax) per step, so padding K to a far larger table (as a single
    # compilation for every K would need) multiplies the cost of per-channel tables.
    kmax = max(_KMAX_MIN, 1 << (num_clusters - 1).bit_length())
    # Small inputs: compile with LLVM's optimizations off (the kmeans programs compile
    # ~2.5x faster and the run is a few ms either way); large inputs: optimized code,
    # whose n-sized passes (sort, prefix sums) run ~2x faster.
    # (Compiler options are only allowed on a top-level jit: under an outer jit, the
    # outer program's options apply.)
    inside_jit = isinstance(jnp.zeros(()), jax.core.Tracer)
    run = _init_tables_large if inside_jit or x.size >= _OPTIMIZE_FROM else _init_tables
    tables = run(
        x,
        w,
        key,
        jnp.int32(num_clusters),
        kmax=kmax,
        method=method,
        preserve_sparsity=bool(preserve_sparsity),
    )
    return tables[:, :num_clusters]


def _init_tables_impl(x, w, key, k_total, *, kmax, method, preserve_sparsity):
    """Jitted body of ``init_tables``: (G, kmax) tables for a traced ``k_total <= kmax``."""
    g = x.shape[0]
    if w is not None:
        w = jnp.maximum(w, 0.0)
        # All-zero importance carries no information: fall back to uniform weights.
        w = jnp.where(jnp.sum(w, axis=1, keepdims=True) > 0, w, 1.0)
    keys = jax.random.split(key, g)
    fn = functools.partial(
        _init_group, kmax=kmax, method=method, preserve_sparsity=preserve_sparsity
    )
    if g == 1:  # one group (a whole tensor): no vmap, which compiles noticeably faster
        wg = None if w is None else w[0]
        return fn(x[0], wg, keys[0], k_total)[None]
    if w is None:
        return jax.vmap(lambda xg, kg: fn(xg, None, kg, k_total))(x, keys)
    return jax.vmap(lambda xg, wg, kg: fn(xg, wg, kg, k_total))(x, w, keys)


_STATIC = ("kmax", "method", "preserve_sparsity")
_init_tables = jax.jit(
    _init_tables_impl,
    static_argnames=_STATIC,
    compiler_options={"xla_backend_optimization_level": 0},
)
_init_tables_large = jax.jit(_init_tables_impl, static_argnames=_STATIC)


# --------------------------------------------------------------------------------------
# One group.
# --------------------------------------------------------------------------------------


class _Range(NamedTuple):
    """A contiguous range ``[start, stop)`` of the sorted values and its extremes."""

    start: Array
    stop: Array
    lo: Array  # smallest value (0 when empty)
    hi: Array  # largest value (0 when empty)


def _init_group(x, w, key, k_total, *, kmax, method, preserve_sparsity):
    """(kmax,) table for one group; ``x``/``w`` are (n,) (``w`` None = unit weights).

    Without ``preserve_sparsity`` there is one range (all values, ``k_total`` centroids);
    with it there are two (negatives and positives) that go through the same code path
    one after the other, then are assembled behind the zero centroid.
    """
    n = x.shape[0]
    if preserve_sparsity:
        kside = kmax - 1
        if kside == 0:
            return jnp.zeros((kmax,), jnp.float32)
        n_neg = jnp.sum(x < 0).astype(jnp.int32)
        n_pos = jnp.sum(x > 0).astype(jnp.int32)
        k_neg, k_pos = _split_counts(k_total - 1, n_neg, n_pos)
        starts = jnp.stack([jnp.int32(0), n - n_pos])
        stops = jnp.stack([n_neg, jnp.int32(n)])
        ks = jnp.stack([k_neg, k_pos])
        keys = jax.random.split(key)
    else:
        kside = kmax
        starts = jnp.zeros((1,), jnp.int32)
        stops = jnp.full((1,), n, jnp.int32)
        ks = jnp.reshape(k_total, (1,))
        keys = jnp.reshape(key, (1,) + key.shape)

    def each(run, *args):
        """``run`` on every range: a plain call for one, a two-step ``lax.map`` for two
        (one unbatched loop body: compiles much faster than ``vmap`` over the sides)."""
        if not preserve_sparsity:
            return run(*jax.tree.map(lambda a: a[0], args))
        tables = lax.map(lambda a: run(*a), args)
        return _assemble(tables[0], tables[1], k_neg, k_pos)

    if method in ("linear", "random"):
        # Only the extremes matter: no sort needed.
        if preserve_sparsity:
            los = jnp.stack([jnp.min(x), jnp.min(jnp.where(x > 0, x, jnp.inf))])
            his = jnp.stack([jnp.max(jnp.where(x < 0, x, -jnp.inf)), jnp.max(x)])
        else:
            los, his = jnp.min(x)[None], jnp.max(x)[None]
        empty = stops <= starts
        ranges = _Range(starts, stops, jnp.where(empty, 0.0, los), jnp.where(empty, 0.0, his))
        run = functools.partial(_simple_range, kmax=kside, method=method)
        return each(run, ranges, ks, keys)

    xs, ws = _sort(x, w)
    ranges = _make_range(xs, starts, stops)
    if method == "density":
        prefix = _Prefix.build(None, ws) if ws is not None else None
        run = functools.partial(_density_range, xs, ws, prefix, kmax=kside)
        return each(run, ranges, ks)

    # Centre every range on its median before building the prefix sums.
    refs = xs[jnp.clip(starts + (stops - starts) // 2, 0, n - 1)]
    idx = jnp.arange(n, dtype=jnp.int32)
    if preserve_sparsity:
        ref = jnp.where(idx < stops[0], refs[0], jnp.where(idx >= starts[1], refs[1], 0.0))
    else:
        ref = refs[0]
    xc = xs - ref
    prefix = _Prefix.build(xc, ws)
    run = functools.partial(_kmeans_range, xc, prefix, kmax=kside, refine=method == "kmeans")
    return each(run, ranges, ks, keys, refs)


def _sort(x, w):
    """Sorts the values (carrying the weights along).

    XLA's CPU sort of float32 with its total-order comparator is ~4x slower than an int32
    sort, so values are mapped to int32 keys with the same order and back.
    """
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)  # -0.0 -> 0.0
    keys = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    if w is None:
        keys = lax.sort(keys, is_stable=False)
        ws = None
    else:
        keys, ws = lax.sort((keys, w), num_keys=1, is_stable=False)
    bits = jnp.where(keys < 0, keys ^ jnp.int32(0x7FFFFFFF), keys)
    return lax.bitcast_convert_type(bits, jnp.float32), ws


def _make_range(xs, start, stop):
    n = xs.shape[0]
    empty = stop <= start
    lo = jnp.where(empty, 0.0, xs[jnp.clip(start, 0, n - 1)])
    hi = jnp.where(empty, 0.0, xs[jnp.clip(stop - 1, 0, n - 1)])
    return _Range(start, stop, lo, hi)


def _split_counts(ktot, n_neg, n_pos):
    """Splits ``ktot`` centroids between the two signs in proportion to their counts.

    Rounded to nearest (halves up); each non-empty side gets at least one when
    ``ktot >= 2``; a side gets all of them when the other is empty.
    """
    total = n_neg + n_pos
    share = n_neg.astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32)
    k_neg = jnp.floor(ktot.astype(jnp.float32) * share + 0.5).astype(jnp.int32)
    both = (n_neg > 0) & (n_pos > 0)
    k_neg = jnp.where(both & (ktot >= 2), jnp.clip(k_neg, 1, ktot - 1), k_neg)
    k_neg = jnp.where(n_neg > 0, jnp.where(n_pos > 0, k_neg, ktot), 0)
    k_pos = jnp.where(n_pos > 0, ktot - k_neg, 0)
    return k_neg.astype(jnp.int32), k_pos.astype(jnp.int32)


def _assemble(neg, pos, k_neg, k_pos):
    """``[0, neg[:k_neg], pos[:k_pos]]``; zeros where neither side has values."""
    kmax = neg.shape[0]
    j = jnp.arange(kmax)
    rest = jnp.where(j < k_neg, neg, pos[jnp.clip(j - k_neg, 0, kmax - 1)])
    rest = jnp.where(j < k_neg + k_pos, rest, 0.0)
    return jnp.concatenate([jnp.zeros((1,), jnp.float32), rest])


def _finish(table, k, rng):
    """Pads entries ``>= k`` with the last used one, clips to the range, zeros if empty."""
    kmax = table.shape[0]
    j = jnp.arange(kmax)
    table = jnp.where(j < k, table, table[jnp.clip(k - 1, 0, kmax - 1)])
    table = jnp.clip(table, rng.lo, rng.hi)
    ok = (rng.stop > rng.start) & (k > 0)
    return jnp.where(ok, table, 0.0).astype(jnp.float32)


# --------------------------------------------------------------------------------------
# linear, random, density.
# --------------------------------------------------------------------------------------


def _linear_table(rng, k, kmax):
    j = jnp.arange(kmax, dtype=jnp.float32)
    kf = k.astype(jnp.float32)
    t = j / jnp.maximum(kf - 1.0, 1.0)
    table = rng.lo + (rng.hi - rng.lo) * t
    table = jnp.where(j == kf - 1.0, rng.hi, table)  # exactly max at the end
    return jnp.where(k == 1, rng.lo + (rng.hi - rng.lo) * 0.5, table)


def _simple_range(rng, k, key, *, kmax, method):
    if method == "linear":
        table = _linear_table(rng, k, kmax)
    else:
        j = jnp.arange(kmax)
        u = jax.random.uniform(key, (kmax,), jnp.float32)
        table = jnp.sort(jnp.where(j < k, rng.lo + (rng.hi - rng.lo) * u, jnp.inf))
    return _finish(table, k, rng)


def _density_range(xs, ws, prefix, rng, k, *, kmax):
    """np.quantile-style quantiles at (i + 0.5) / k of xs[start:stop] (weighted if ws)."""
    n = xs.shape[0]
    start, stop = rng.start, rng.stop
    m = stop - start
    i = jnp.arange(kmax, dtype=jnp.int32)
    kk = jnp.maximum(k, 1)
    if ws is None:
        # Position (2i + 1) (m - 1) / (2k) split into integer and fractional parts without
        # int32 overflow: (m - 1) = q (2k) + r.
        # a * r < (2k)^2 must fit in uint32: exact for k < 32768.
        two_k = 2 * kk
        a = 2 * i + 1
        q, r = jnp.divmod(jnp.maximum(m - 1, 0), two_k)
        ar = a.astype(jnp.uint32) * r.astype(jnp.uint32)
        tk = two_k.astype(jnp.uint32)
        whole = a * q + (ar // tk).astype(jnp.int32)
        frac = (ar % tk).astype(jnp.float32) / two_k.astype(jnp.float32)
        p0 = jnp.clip(start + whole, 0, n - 1)
        p1 = jnp.clip(jnp.minimum(p0 + 1, stop - 1), 0, n - 1)
        v0, v1 = xs[p0], xs[p1]
        table = v0 + (v1 - v0) * frac
    else:
        # Plotting position of value p: C(p) + w_p / 2 - w_start / 2 (double-float), over
        # the denominator W - w_start / 2 - w_last / 2.
        w_first = ws[jnp.clip(start, 0, n - 1)]
        w_last = ws[jnp.clip(stop - 1, 0, n - 1)]
        c_start = prefix.weight_at(start)
        total = _df_sub(prefix.weight_at(stop), c_start)
        denom = _df_add_f(total, -0.5 * (w_first + w_last))
        qf = (2 * i + 1).astype(jnp.float32) / (2 * kk).astype(jnp.float32)

        def node(p):
            pc = jnp.clip(p, 0, n - 1)
            d = _df_sub(prefix.weight_at(pc), c_start)
            return _df_add_f(d, 0.5 * (ws[pc] - w_first))

        target = _df_mul_f(denom, qf)
        iters = _search_iters(n)
        # Last node at or below the target: first p in [start+1, stop) with node(p) > target.
        above = _first_true(
            lambda p: _df_gt(node(p), target),
            jnp.broadcast_to(start + 1, (kmax,)),
            jnp.broadcast_to(jnp.maximum(stop, start + 1), (kmax,)),
            iters,
        )
        p0 = jnp.clip(above - 1, start, jnp.maximum(stop - 1, start))
        p1 = jnp.clip(p0 + 1, start, jnp.maximum(stop - 1, start))
        p0c, p1c = jnp.clip(p0, 0, n - 1), jnp.clip(p1, 0, n - 1)
        gap = _df_sub(node(p1c), node(p0c))
        off = _df_sub(target, node(p0c))
        gap_f = gap.hi + gap.lo
        frac = jnp.where(gap_f > 0, (off.hi + off.lo) / jnp.where(gap_f > 0, gap_f, 1.0), 0.0)
        frac = jnp.clip(frac, 0.0, 1.0)
        v0, v1 = xs[p0c], xs[p1c]
        table = v0 + (v1 - v0) * frac
        has_weight = (total.hi > 0) & (m > 1)
        table = jnp.where(has_weight | (m <= 1), table, _linear_table(rng, k, kmax))
    return _finish(table, k, rng)


# --------------------------------------------------------------------------------------
# Double-float ("df") arithmetic on (hi, lo) float32 pairs.
# --------------------------------------------------------------------------------------


class _DF(NamedTuple):
    hi: Array
    lo: Array


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _quick_two_sum(a, b):
    s = a + b
    return _DF(s, b - (s - a))


def _split(a):
    t = 4097.0 * a
    hi = t - (t - a)
    return hi, a - hi


def _two_prod(a, b):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _df_add(x, y):
    s, e = _two_sum(x.hi, y.hi)
    return _quick_two_sum(s, e + (x.lo + y.lo))


def _df_neg(x):
    return _DF(-x.hi, -x.lo)


def _df_sub(x, y):
    return _df_add(x, _df_neg(y))


def _df_add_f(x, f):
    s, e = _two_sum(x.hi, f)
    return _quick_two_sum(s, e + x.lo)


def _df_mul_f(x, f):
    p, e = _two_prod(x.hi, f)
    return _quick_two_sum(p, e + x.lo * f)


def _df_mul(x, y):
    p, e = _two_prod(x.hi, y.hi)
    return _quick_two_sum(p, e + (x.hi * y.lo + x.lo * y.hi))


def _df_div(x, y):
    """x / y (y.hi must be non-zero)."""
    q1 = x.hi / y.hi
    r = _df_sub(x, _df_mul_f(y, q1))
    q2 = r.hi / y.hi
    return _quick_two_sum(q1, q2)


def _df_gt(x, y):
    d = _df_sub(x, y)
    return (d.hi > 0) | ((d.hi == 0) & (d.lo > 0))


def _df_from_int(i):
    hi = i.astype(jnp.float32)
    return _DF(hi, (i - hi.astype(jnp.int32)).astype(jnp.float32))


def _cumsum(v):
    """Inclusive cumsum of a 1-D float32 array by blocked triangular matmuls.

    XLA lowers ``jnp.cumsum`` on CPU to an unrolled associative scan; blocks of 128
    summed by a matmul with a triangular matrix are ~2x faster at 10^7 values. The
    rounding is that of float32 sums of <= 128 terms plus the block offsets; callers
    that need more use ``_df_cumsum``.
    """
    n = v.shape[0]
    b = 128
    if n <= b:
        return jnp.dot(v, jnp.triu(jnp.ones((n, n), v.dtype)), precision=lax.Precision.HIGHEST)
    m = -(-n // b)
    rows = jnp.pad(v, (0, m * b - n)).reshape(m, b)
    inner = jnp.dot(rows, jnp.triu(jnp.ones((b, b), v.dtype)), precision=lax.Precision.HIGHEST)
    totals = _cumsum(inner[:, -1])
    offsets = jnp.concatenate([jnp.zeros((1,), v.dtype), totals[:-1]])
    return (inner + offsets[:, None]).reshape(-1)[:n]


def _df_cumsum(p, e=None):
    """Exclusive double-float prefix sums of ``p + e``: (n + 1,) pairs, index 0 = 0.

    ``hi`` is any float32 cumsum; the exact discrepancy of every step,
    ``(hi[i-1] + p[i]) - hi[i]`` (a two-sum, then a Sterbenz-exact difference), is
    accumulated in a second cumsum ``lo``. The pair is accurate to ~2^-44 of the running
    total whatever the rounding of the first cumsum.
    """
    hi = _cumsum(p)
    prev = jnp.concatenate([jnp.zeros((1,), p.dtype), hi[:-1]])
    s, err = _two_sum(prev, p)
    delta = (s - hi) + err
    if e is not None:
        delta = delta + e
    lo = _cumsum(delta)
    zero = jnp.zeros((1,), p.dtype)
    return _DF(jnp.concatenate([zero, hi]), jnp.concatenate([zero, lo]))


class _Prefix(NamedTuple):
    """Double-float prefix sums over the sorted values (index ``i`` = sum of ``[0, i)``).

    ``s1 = sum w x``, ``s2 = sum w x^2`` and ``w = sum w`` (None for unit weights: the
    count ``i`` itself).
    """

    s1: _DF
    s2: _DF
    w: _DF | None

    @staticmethod
    def build(xc, ws):
        """Prefix sums of the centred values ``xc`` (None: weights only) and weights."""
        if xc is None:
            return _Prefix(None, None, _df_cumsum(ws))
        sq, sq_err = _two_prod(xc, xc)
        if ws is None:
            return _Prefix(_df_cumsum(xc), _df_cumsum(sq, sq_err), None)
        p1, e1 = _two_prod(ws, xc)
        p2, e2 = _two_prod(ws, sq)
        return _Prefix(
            _df_cumsum(p1, e1),
            _df_cumsum(p2, e2 + ws * sq_err),
            _df_cumsum(ws),
        )

    def take(self, idx):
        """The prefix sums at positions ``idx`` only (weights made explicit)."""

        def g(d):
            return _DF(d.hi[idx], d.lo[idx])

        w = _df_from_int(idx) if self.w is None else g(self.w)
        return _Prefix(g(self.s1), g(self.s2), w)

    def weight_at(self, i):
        if self.w is None:
            return _df_from_int(jnp.asarray(i, jnp.int32))
        return _DF(self.w.hi[i], self.w.lo[i])

    def sums(self, a, b):
        """(W, S1, S2) over sorted positions ``[a, b)`` as double-floats."""
        s1 = _df_sub(_DF(self.s1.hi[b], self.s1.lo[b]), _DF(self.s1.hi[a], self.s1.lo[a]))
        s2 = _df_sub(_DF(self.s2.hi[b], self.s2.lo[b]), _DF(self.s2.hi[a], self.s2.lo[a]))
        if self.w is None:
            w = _df_from_int(b - a)
        else:
            w = _df_sub(self.weight_at(b), self.weight_at(a))
        return w, s1, s2


def _cost_from_sums(w, s1, s2, c):
    """sum w (x - c)^2 = S2 - 2 c S1 + c^2 W from double-float sums (float32, >= 0)."""
    c2 = _DF(*_two_prod(c, c))
    t = _df_sub(s2, _df_mul_f(s1, 2.0 * c))
    t = _df_add(t, _df_mul(c2, w))
    return jnp.maximum(t.hi, 0.0)


def _cost_about(pf, a, b, c):
    """Weighted sum of (x - c)^2 over sorted positions [a, b) (float32, >= 0)."""
    return _cost_from_sums(*pf.sums(a, b), c)


def _cost_var(w, s1, s2):
    """S2 - S1^2 / W: weighted squared deviations from the mean (float32, >= 0)."""
    pos = w.hi > 0
    safe_w = _DF(jnp.where(pos, w.hi, 1.0), jnp.where(pos, w.lo, 0.0))
    t = _df_sub(s2, _df_div(_df_mul(s1, s1), safe_w))
    return jnp.where(pos, jnp.maximum(t.hi, 0.0), 0.0)


def _mean(pf, a, b, fallback):
    w, s1, _ = pf.sums(a, b)
    pos = w.hi > 0
    safe_w = _DF(jnp.where(pos, w.hi, 1.0), jnp.where(pos, w.lo, 0.0))
    return jnp.where(pos, _df_div(s1, safe_w).hi, fallback), w.hi


# --------------------------------------------------------------------------------------
# Searching the sorted values.
# --------------------------------------------------------------------------------------


def _search_iters(n):
    return max(1, math.ceil(math.log2(n + 1)) + 1)


def _first_true(pred, lo, hi, iters):
    """Smallest ``p`` in ``[lo, hi]`` with ``pred(p)``, for ``pred`` monotone on [lo, hi).

    ``hi`` when there is none. ``pred`` may be called with any int (clip inside).
    """

    def body(_, carry):
        lo, hi = carry
        mid = (lo + hi) // 2
        ok = pred(mid)
        active = lo < hi
        return jnp.where(active & ~ok, mid + 1, lo), jnp.where(active & ok, mid, hi)

    lo, _ = lax.fori_loop(0, iters, body, (lo, hi))
    return lo


def _search_right(v, q, start, stop):
    """For each q: first position p in [start, stop] with v[p] > q (v sorted there)."""
    n = v.shape[0]
    lo = jnp.broadcast_to(start, q.shape)
    hi = jnp.broadcast_to(stop, q.shape)
    return _first_true(lambda p: v[jnp.clip(p, 0, n - 1)] > q, lo, hi, _search_iters(n))


def _cells(xc, table, t, start, stop):
    """Cell bounds [lower, upper) of the first t (sorted) centroids; later cells empty.

    ``table`` is (..., kmax), sorted along the last axis. Values equal to a midpoint join
    the lower cell (ties go to the lower centroid).
    """
    kmax = table.shape[-1]
    lead = table.shape[:-1]
    first = jnp.broadcast_to(start, lead + (1,))
    last = jnp.broadcast_to(stop, lead + (1,))
    if kmax == 1:
        return first, last
    j = jnp.arange(1, kmax).reshape((1,) * len(lead) + (kmax - 1,))
    mids = (table[..., :-1] + table[..., 1:]) * 0.5
    cut = _search_right(xc, mids, start, stop)
    cut = jnp.where(j < t, cut, stop)
    return jnp.concatenate([first, cut], axis=-1), jnp.concatenate([cut, last], axis=-1)


# --------------------------------------------------------------------------------------
# kmeans++ and kmeans.
# --------------------------------------------------------------------------------------


def _density_seeds(xc, pf, start, stop, k, kmax):
    """Seeds with the asymptotically optimal density ``p^(1/3)`` (sorted (kmax,) table).

    High-resolution quantization theory: the centroids of an optimal quantizer of a
    density ``p`` are spread with density proportional to ``p^(1/3)``. The range is cut
    into ``_SEED_BINS_PER_CLUSTER * kmax`` equal-count bins; a bin of weight ``m`` and
    width ``d`` has density ``m / d`` and so carries ``m^(1/3) d^(2/3)`` of the
    centroids; the ``k`` centroids sit at the midpoints ``(i + 0.5) / k`` of that measure,
    linearly inside a bin. Deterministic, O(kmax log kmax) after the sort.
    """
    n = xc.shape[0]
    nb = _SEED_BINS_PER_CLUSTER * kmax
    size = jnp.maximum(stop - start, 0)
    i = jnp.arange(nb + 1, dtype=jnp.int32)
    q, r = jnp.divmod(size, nb)
    e = start + i * q + (i * r) // nb  # i * r < nb^2 fits in int32
    lo = xc[jnp.clip(e[:-1], 0, n - 1)]
    hi = xc[jnp.clip(jnp.minimum(e[1:], stop - 1), 0, n - 1)]
    width = jnp.maximum(hi - lo, 0.0)
    mass = jnp.maximum(_df_sub(pf.weight_at(e[1:]), pf.weight_at(e[:-1])).hi, 0.0)
    lam = jnp.cbrt(mass) * jnp.cbrt(width) ** 2
    cum = jnp.cumsum(lam)
    total = cum[-1]
    j = jnp.arange(kmax)
    target = (j.astype(jnp.float32) + 0.5) / jnp.maximum(k, 1).astype(jnp.float32) * total
    b = jnp.clip(jnp.searchsorted(cum, target, side="left"), 0, nb - 1)
    before = cum[b] - lam[b]
    frac = jnp.clip((target - before) / jnp.where(lam[b] > 0, lam[b], 1.0), 0.0, 1.0)
    seeds = lo[b] + frac * width[b]
    seeds = jnp.where(total > 0, seeds, xc[jnp.clip(start, 0, n - 1)])
    return jnp.where(j < k, jnp.sort(jnp.where(j < k, seeds, _BIG)), _BIG)


def _kmeans_range(xc, pf, rng, k, key, ref, *, kmax, refine):
    """kmeans++ (and, if ``refine``, Lloyd + DP refinement) on one range of centred values."""
    start, stop = rng.start, rng.stop
    total_w = pf.sums(start, stop)[0].hi
    if refine:
        # The refinement is global (DP), so cheap deterministic seeds do as well as
        # kmeans++ here, at O(kmax log kmax) instead of O(kmax^2 log n).
        seeds = _density_seeds(xc, pf, start, stop, k, kmax)
        table = _kmeans_refine(xc, pf, start, stop, k, kmax, seeds)
    else:
        table = _kmeanspp(xc, pf, start, stop, k, kmax, key)
    out = _finish(table + ref, k, rng)
    # A range that carries no importance at all: nothing to fit, fall back to linear.
    return jnp.where(total_w > 0, out, _finish(_linear_table(rng, k, kmax), k, rng))


def _insert(table, t, values):
    """(len(values), kmax): ``table`` with each value inserted into its sorted first t."""
    kmax = table.shape[0]
    j = jnp.arange(kmax)
    pos = jnp.sum((j < t)[None, :] & (table[None, :] <= values[:, None]), axis=1, keepdims=True)
    shifted = table[jnp.clip(j - 1, 0, kmax - 1)]
    return jnp.where(
        j[None, :] < pos, table[None, :], jnp.where(j[None, :] == pos, values[:, None], shifted)
    )


def _kmeanspp(xc, pf, start, stop, k, kmax, key):
    """Greedy D^2 seeding on sorted centred values [start, stop); sorted (kmax,) table.

    Step ``t`` draws ``trials`` candidates and keeps the one that leaves the least total
    cost. Step 0 draws with probability proportional to the weights (one "cell" whose
    cost is the total weight), the others proportional to weight x squared distance, so
    that all steps share one loop body.
    """
    n = xc.shape[0]
    iters = _search_iters(n)
    trials = 2 + int(math.log(max(kmax, 1)))
    j = jnp.arange(kmax)

    def cell_costs(tb, t):
        used = (j < t).reshape((1,) * (tb.ndim - 1) + (kmax,))
        lower, upper = _cells(xc, tb, t, start, stop)
        c = jnp.where(used, tb, 0.0)
        return jnp.where(used, _cost_about(pf, lower, upper, c), 0.0), lower, upper

    # All random numbers up front: random bits inside the loop body cost ~0.5 s of
    # compilation (threefry), and a (kmax, 2, trials) draw is tiny.
    uniforms = jax.random.uniform(key, (kmax, 2, trials), jnp.float32)

    def step(t, carry):
        table, costs, lower, upper = carry
        c = jnp.where(j < t, table, 0.0)
        # A cell with probability proportional to its cost (inverse CDF), then the value
        # inside it whose cumulative cost (from the cell start) first exceeds the rest.
        u = uniforms[t]
        cum = _cumsum(costs)
        target = u[0] * cum[-1]
        last = jnp.max(jnp.where(costs > 0, j, 0))
        cell = jnp.minimum(jnp.sum(cum[None, :] <= target[:, None], axis=1), last)
        resid = jnp.clip(target - (cum[cell] - costs[cell]), 0.0, costs[cell])
        a, b, cc = lower[cell], upper[cell], c[cell]

        def past(p):
            q = jnp.clip(p + 1, 0, n)
            w, s1, s2 = pf.sums(a, q)
            mass = jnp.where(t == 0, w.hi, _cost_from_sums(w, s1, s2, cc))
            return mass > resid

        p = _first_true(past, a, jnp.maximum(b - 1, a), iters)
        fallback = jnp.where(t == 0, xc[jnp.clip(start, 0, n - 1)], table[0])
        cand = jnp.where(jnp.sum(costs) > 0, xc[jnp.clip(p, 0, n - 1)], fallback)
        tables = _insert(table, t, cand)
        new_costs, lowers, uppers = cell_costs(tables, t + 1)
        best = jnp.argmin(jnp.sum(new_costs, axis=1))
        new = (tables[best], new_costs[best], lowers[best], uppers[best])
        return jax.tree.map(lambda u, v: jnp.where(t < k, u, v), new, carry)

    total_w = pf.sums(start, stop)[0].hi
    init = (
        jnp.full((kmax,), _BIG, jnp.float32),
        jnp.where(j == 0, total_w, 0.0),
        jnp.where(j == 0, start, stop),
        jnp.broadcast_to(stop, (kmax,)),
    )
    table = lax.fori_loop(0, jnp.clip(k, 0, kmax), step, init)[0]
    return jnp.where(j < k, table, _BIG)


def _lloyd(xc, pf, start, stop, k, kmax, table):
    """Lloyd iterations until no centroid moves (at most ``_LLOYD_MAX_ITERS``).

    Returns ``(table, cost, lower, upper)``: the last table, its total cost and its cells
    (at convergence the update leaves it unchanged).
    """
    j = jnp.arange(kmax)

    def evaluate(c):
        lower, upper = _cells(xc, c, k, start, stop)
        w, s1, s2 = pf.sums(lower, upper)
        pos = w.hi > 0
        safe_w = _DF(jnp.where(pos, w.hi, 1.0), jnp.where(pos, w.lo, 0.0))
        mean = jnp.where(pos, _df_div(s1, safe_w).hi, c)
        cz = jnp.where(j < k, c, 0.0)
        cost = jnp.sum(jnp.where(j < k, _cost_from_sums(w, s1, s2, cz), 0.0))
        # Means of consecutive cells are sorted up to rounding.
        return jnp.sort(jnp.where(j < k, mean, _BIG)), cost, lower, upper

    def cond(carry):
        it, c, new = carry[:3]
        return (it < _LLOYD_MAX_ITERS) & jnp.any(new != c)

    def body(carry):
        it, _, c = carry[:3]
        return (it + 1, c, *evaluate(c))

    carry = lax.while_loop(cond, body, (jnp.int32(1), table, *evaluate(table)))
    return carry[1], *carry[3:]


def _kmeans_refine(xc, pf, start, stop, k, kmax, seeds):
    """Lloyd from the seeds; DP on bins cut from its cells; Lloyd again; the better one."""
    n = xc.shape[0]
    nbins, exact = _dp_bins(n, kmax)
    # Bins per Lloyd cell for the traced k (the k used cells share all nbins bins).
    per_cell = nbins // jnp.maximum(k, 1)

    def bins(lower, upper):
        if exact:  # few values: every value is its own bin (exact optimum)
            return jnp.clip(start + jnp.arange(nbins + 1, dtype=jnp.int32), start, stop)
        e = jnp.arange(nbins, dtype=jnp.int32)
        cell = jnp.minimum(e // per_cell, kmax - 1)
        s = e - cell * per_cell
        lo_c, size = lower[cell], upper[cell] - lower[cell]
        if nbins * n < 2**31:
            offs = (s * size) // per_cell
        else:
            offs = jnp.floor(
                s.astype(jnp.float32) * size.astype(jnp.float32) / per_cell.astype(jnp.float32)
            ).astype(jnp.int32)
        edges = jnp.where(e < per_cell * k, lo_c + offs, stop)
        return jnp.concatenate([edges, jnp.broadcast_to(stop, (1,))])

    if kmax == 1:
        return _lloyd(xc, pf, start, stop, k, kmax, seeds)[0]
    if exact:  # the DP is the optimum: Lloyd only polishes its float32 rounding
        return _lloyd(xc, pf, start, stop, k, kmax, _dp_optimum(pf, bins(None, None), k, kmax))[0]
    # Two Lloyd runs around one DP, written out: in a loop the DP would sit in a
    # lax.cond, which vmap (per-channel tables) turns into computing it twice.
    first, cost, lower, upper = _lloyd(xc, pf, start, stop, k, kmax, seeds)
    second, cost2, _, _ = _lloyd(
        xc, pf, start, stop, k, kmax, _dp_optimum(pf, bins(lower, upper), k, kmax)
    )
    return jnp.where(cost2 <= cost, second, first)


def _dp_bins(n, kmax):
    """(number of bins B, whether every value is its own bin)."""
    target = max(_DP_MIN_BINS_PER_CLUSTER * kmax, _DP_MIN_BINS)
    if n <= target:
        return n, True
    return target, False


def _dp_strides(m):
    """Strides of the levels of one DP layer over ``m`` bins, coarse to fine (last 1).

    The first level searches every candidate at positions ``0, s_0, 2 s_0, ...``
    (``m^2 / s_0 <= _DP_TOP m`` work); each following one the ``f = s_prev / s``
    positions between two known ones over the range their known neighbours bound, in
    windows of ``s_prev`` candidates (about ``2 f m`` work per level). Fewer, denser
    levels run faster on CPU than the binary divide and conquer, whose per-level
    gathers and scatters cost more than the arithmetic they save.
    """
    strides = [1]
    while m > _DP_TOP * strides[-1]:
        strides.append(strides[-1] * _DP_FACTOR)
    return strides[::-1]


def _dp_optimum(pf, edges, k, kmax):
    """Optimal partition of the bins ``[edges[b], edges[b+1])`` into at most k clusters.

    ``D_c[j]`` = least cost of the first ``j`` bins in at most ``c`` clusters;
    ``D_c[j] = min_{i < j} D_{c-1}[i] + cost(i, j)``. The leftmost minimizing ``i``,
    ``opt_c(j)``, is non-decreasing in ``j`` (the cost is Monge). A layer is computed
    coarse to fine (``_dp_strides``): ``opt_c`` exactly at a coarse grid by a full search,
    then, level by level, every position between two known ones searched only over
    ``[opt_c(left), opt_c(right)]``. Those ranges of consecutive blocks share only their
    ends, so they fit in a static number of fixed-width windows ("items", laid out by a
    prefix sum over the blocks): the work is dense arithmetic on small static shapes,
    and no block waits for the widest one. The layers' values are kept and the
    partition is read back by recomputing the argmin along the optimal path. Costs are
    float32 from the double-float prefix sums, each difference taken on the high and the
    low parts separately (accurate to float32 of the difference itself).
    Returns the sorted cluster means (padding ``_BIG``).
    """
    m = edges.shape[0] - 1  # bins
    strides = _dp_strides(m)
    pe = pf.take(edges)
    cols = (pe.w.hi, pe.w.lo, pe.s1.hi, pe.s1.lo, pe.s2.hi, pe.s2.lo)

    def cost(a, b):
        """cost(i, j) from the columns ``a[c]`` (at i) and ``b[c]`` (at j), broadcasting."""
        w = (b[0] - a[0]) + (b[1] - a[1])
        s1 = (b[2] - a[2]) + (b[3] - a[3])
        s2 = (b[4] - a[4]) + (b[5] - a[5])
        pos = w > 0
        return jnp.where(pos, jnp.maximum(s2 - s1 * s1 / jnp.where(pos, w, 1.0), 0.0), 0.0)

    def soa(r):
        """(..., 7) gathered rows -> 7 columns, materialized (not fused into the gather)."""
        return lax.optimization_barrier(jnp.moveaxis(r, -1, 0))

    pos_all = jnp.arange(m + 1, dtype=jnp.int32)

    def full_search(rows, j):
        """(min, leftmost argmin) over all i < j of d[i] + cost(i, j), for a vector j."""
        a = soa(rows)[:, None, :]
        b = soa(rows[j])[:, :, None]
        v = a[6] + cost(a, b)
        v = jnp.where(pos_all[None, :] < j[:, None], v, jnp.inf)
        vmin = jnp.min(v, axis=1)
        return vmin, jnp.min(jnp.where(v <= vmin[:, None], pos_all[None, :], m), axis=1)

    def refine(rows, known_opt, s_prev, s, last):
        """(min, argmin) at stride ``s`` from ``known_opt`` at stride ``s_prev``."""
        f = s_prev // s
        ng = known_opt.shape[0] - 1  # blocks
        window = s_prev
        # At most ng + (m + ng) / window windows cover the ranges (they share only ends).
        nitems = ng + -(-(m + ng) // window)
        item = jnp.arange(nitems, dtype=jnp.int32)
        u = jnp.arange(window, dtype=jnp.int32)
        jb = jnp.minimum(
            jnp.arange(ng, dtype=jnp.int32)[:, None] * s_prev
            + jnp.arange(f, dtype=jnp.int32)[None, :] * s,
            m,
        )  # (ng, f) positions of each block
        # Rounding could break the monotonicity by a hair: force it, so that the ranges
        # stay consecutive and within the static number of windows.
        known_opt = lax.cummax(known_opt)
        lo, hi = known_opt[:-1], known_opt[1:]
        chunks = (hi - lo) // window + 1
        first = jnp.cumsum(chunks) - chunks  # first item of each block
        owner = jnp.sum(first[None, :] <= item[:, None], axis=1).astype(jnp.int32) - 1
        t = item - first[owner]
        i = lo[owner][:, None] + t[:, None] * window + u[None, :]  # (nitems, window)
        ok = (i <= hi[owner][:, None]) & (t < chunks[owner])[:, None]
        ic = jnp.clip(i, 0, m)
        jo = jb[owner]  # (nitems, f)
        a = soa(rows[ic])[:, :, None, :]
        v = a[6] + cost(a, soa(rows[jo])[:, :, :, None])
        v = jnp.where(ok[:, None, :] & (ic[:, None, :] < jo[:, :, None]), v, jnp.inf)
        best = jnp.full((ng, f), jnp.inf, jnp.float32).at[owner].min(jnp.min(v, axis=2))
        if last:
            return best.reshape(-1), None
        # Leftmost argmin: the smallest candidate reaching the block's minimum.
        arg = jnp.min(jnp.where(v <= best[owner][:, :, None], ic[:, None, :], m + 1), axis=2)
        arg = jnp.full((ng, f), m + 1, jnp.int32).at[owner].min(arg)
        return best.reshape(-1), arg.reshape(-1)

    base = jnp.stack(cols, axis=1)  # (m + 1, 6)

    def with_d(d):
        """One row per position: the six prefix-sum parts and D (one gather per index)."""
        return jnp.concatenate([base, d[:, None]], axis=1)

    def layer(d):
        rows = with_d(d)
        grid = jnp.minimum(jnp.arange(-(-m // strides[0]) + 1, dtype=jnp.int32) * strides[0], m)
        best, opt = full_search(rows, grid)
        for lvl in range(1, len(strides)):
            s_prev, s = strides[lvl - 1], strides[lvl]
            last = lvl == len(strides) - 1
            best, arg = refine(rows, opt, s_prev, s, last)
            if not last:
                # Positions past m were clipped to m; the next level needs m last.
                opt = jnp.concatenate([arg[: -(-m // s)], opt[-1:]])
        if best.shape[0] < m + 1:  # the blocks end just before m when s_prev divides m
            best = jnp.concatenate([best, full_search(rows, jnp.full((1,), m, jnp.int32))[0]])
        return jnp.where(pos_all == 0, 0.0, best[: m + 1])

    d1 = cost(base[0], base.T)
    ds0 = jnp.zeros((kmax, m + 1), jnp.float32).at[0].set(d1)

    def body(carry):
        c, ds = carry
        return c + 1, ds.at[c].set(layer(ds[c - 1]))

    # Layers D_1 .. D_{k-1}: the backtrack reads D_k only at m, through D_{k-1}.
    _, ds = lax.while_loop(lambda cr: cr[0] < k - 1, body, (jnp.int32(1), ds0))

    # Backtrack from the last bin: cluster c - 1 (0-based) is [cut_c, j).
    def back(s, carry):
        j, lows, highs = carry
        c = k - s  # clusters in the prefix ending at j
        active = c >= 1
        idx = jnp.clip(c - 1, 0, kmax - 1)
        _, i = full_search(with_d(ds[jnp.clip(c - 2, 0, kmax - 1)]), j[None])
        i = jnp.where(c >= 2, i[0], 0)
        lows = jnp.where(active, lows.at[idx].set(edges[i]), lows)
        highs = jnp.where(active, highs.at[idx].set(edges[j]), highs)
        return jnp.where(active, i, j), lows, highs

    zeros = jnp.zeros((kmax,), jnp.int32)
    _, lows, highs = lax.fori_loop(0, kmax, back, (jnp.int32(m), zeros, zeros))
    means, weight = _mean(pf, lows, highs, 0.0)
    slot = jnp.arange(kmax)
    table = jnp.sort(jnp.where((slot < k) & (weight > 0), means, _BIG)).astype(jnp.float32)
    # Clusters that got no weight (fewer distinct values than k): duplicate the last one.
    used = jnp.sum(table < _BIG)
    last = jnp.where(used > 0, table[jnp.clip(used - 1, 0, kmax - 1)], 0.0)
    return jnp.where(slot < used, table, jnp.where(slot < k, last, _BIG))
