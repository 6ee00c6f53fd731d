"""Differentiable k-means (DKM, Cho et al., ICLR 2022) without the N x K memory wall.

For one table of weights `w_1..w_n` and centroids `c_1..c_K` the soft map is

    A_ik = softmax_k(-(w_i - c_k)**2 / tau)                      (attention)
    c_k <- sum_i A_ik w_i / sum_i A_ik        (dkm_iters times, from the warm start)
    w~_i = sum_k A_ik c_k                      (with the last centroids)

The centroids couple the weights only through the K-sized sums `(num_k, den_k)`, so
nothing of size N x K is ever formed or kept. Two paths compute the map:

- exact (`_exact_map`): every pass runs over chunks of weights (`_reduce`), and the
  backward pass is a `custom_vjp` that keeps only the weights and the `dkm_iters + 1`
  centroid vectors (K numbers each) and recomputes each chunk's attention when it needs
  it. Nothing is approximated: the result equals the dense formula up to float rounding
  (summation order). Cost: K exponentials per weight per pass, 2 (dkm_iters + 1) passes.
- grid (`_large_map`, tables of at least `8 * _grid_nodes(K)` weights): the soft map and
  the functions the sums integrate are smooth functions of one weight, so they are
  evaluated at `_grid_nodes(K)` uniformly spaced nodes and interpolated (cubic Hermite);
  the weights enter through four moments per cell (one scatter) and the output through
  one gather per weight. Cost: per weight, one scatter and one gather each way; per
  table, K exponentials per node. Its interpolation error is measured at every call
  (see "The grid path" below), and when it is larger than `_GRID_TOL` (5e-5 relative,
  root mean square over the weights of the slope the gradient reads) the call takes the
  exact path instead: heavy-tailed tables, whose far centroids make near-steps, and very
  small temperatures. The tests hold the grid's gradients to 1e-4 of a float64 dense
  reference whenever it is taken.

Arithmetic is float32 (float64 for float64 weights), whatever the weights' dtype; the
output and the weight gradient are cast back to it.

Only the weights are differentiated: the warm-start centroids and the temperature are
constants of the step (see `clusterjax.ClusterSpec(assignment="dkm")`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from clusterjax._src import segments
from clusterjax._src.plan import LeafPlan, table_dtype
from clusterjax._src.straight_through import straight_through

#: `temperature=None` gives tau = AUTO_TEMPERATURE_SCALE * (median gap)**2, the median
#: taken over the positive gaps between adjacent sorted centroids of the table.
AUTO_TEMPERATURE_SCALE = 0.5

# Attention entries (weights x centroids) per chunk: 1 MiB of float32.
_CHUNK_ENTRIES = 1 << 18


def auto_temperature(tables: jax.Array) -> jax.Array:
    """The temperature of `temperature=None`, per table: `(G,)` from `(G, K)` centroids.

    `tau = AUTO_TEMPERATURE_SCALE * m**2` with `m` the median (the lower one for an even
    count) of the positive gaps between adjacent sorted centroids. At that temperature
    a weight sitting on a centroid gives a neighbour at the median gap
    `exp(-1 / AUTO_TEMPERATURE_SCALE)` (0.14) of its own attention, and the soft map is a
    smooth staircase whose slope peaks halfway between centroids. The median ignores
    the wide gaps of heavy tails and coinciding centroids. A table with one distinct
    centroid gets tau = 1 (its soft map is that centroid whatever tau is).

    Example:
      >>> import jax.numpy as jnp
      >>> from clusterjax._src.dkm import auto_temperature
      >>> auto_temperature(jnp.array([[0.0, 1.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]]))
      Array([0.5, 1. ], dtype=float32)
    """
    tables = jax.lax.stop_gradient(tables)
    if tables.shape[-1] < 2:
        return jnp.ones(tables.shape[:-1], tables.dtype)
    gaps = jnp.diff(jnp.sort(tables, axis=-1), axis=-1)
    positive = gaps > 0
    count = jnp.sum(positive, axis=-1)
    ranked = jnp.sort(jnp.where(positive, gaps, jnp.inf), axis=-1)
    median = jnp.take_along_axis(ranked, jnp.maximum(count - 1, 0)[:, None] // 2, axis=-1)[:, 0]
    tau = AUTO_TEMPERATURE_SCALE * jnp.square(median)
    return jnp.where((count > 0) & (tau > 0) & jnp.isfinite(tau), tau, 1.0).astype(tables.dtype)


def _attention(w: jax.Array, c: jax.Array, tau: jax.Array) -> jax.Array:
    """`(G, K, m)` softmax over centroids of `-(w - c)**2 / tau` for a chunk `(G, m)`.

    Centroids on the middle axis: the weights are the long, vectorized minor axis, and
    the sums over weights reduce along it.
    """
    logits = -jnp.square(w[:, None, :] - c[:, :, None]) / tau[:, None, None]
    return jax.nn.softmax(logits, axis=1)


_BLOCK = 256


def _wsum(x: jax.Array) -> jax.Array:
    """Sum over the last axis (weights) in blocks of `_BLOCK`: a float32 error that grows
    with `_BLOCK + m / _BLOCK` rather than with the chunk length `m`."""
    m = x.shape[-1]
    q = m // _BLOCK
    if q < 2:
        return jnp.sum(x, axis=-1)
    partial = jnp.sum(x[..., : q * _BLOCK].reshape(x.shape[:-1] + (q, _BLOCK)), -1)
    # Without the barrier XLA merges the two reductions into one long, less accurate one.
    head = jnp.sum(jax.lax.optimization_barrier(partial), -1)
    return head + jnp.sum(x[..., q * _BLOCK :], axis=-1) if m % _BLOCK else head


def _sums(w, valid, c, tau):
    """`(num, den)`, each `(G, K)`: attention-weighted sums of the chunk's valid weights."""
    a = _attention(w, c, tau)
    if valid is not None:
        a = a * valid[:, None, :].astype(a.dtype)
    return _wsum(a * w[:, None, :]), _wsum(a)


def _sums_vjp(w, valid, c, tau, g_num, g_den):
    """`(dw (G, m), dc (G, K))`: the cotangents of `_sums` for cotangents `(g_num, g_den)`.

    With `h_k = g_num_k w + g_den_k` (the cotangent of `A_k v`) and `u = sum_k A_k h_k`,
    the softmax gives `d logit_k = v A_k (h_k - u)`, and `d logit_k / dw = -2 (w - c_k)
    / tau = -d logit_k / dc_k`; `num` also holds `w` itself: `+ v sum_k g_num_k A_k`.
    Expanded in powers of `w`, both cotangents are two small matrix products with the
    attention, `(K, m) x (m, 5)` and its transpose, so the attention is evaluated once.
    """
    hi = jax.lax.Precision.HIGHEST
    a = _attention(w, c, tau)
    f = jnp.stack([g_num, g_den, c * g_num, c * g_den, c], axis=-1)  # (G, K, 5)
    p, q, r, s, cbar = jnp.moveaxis(jnp.einsum("gkm,gkf->gmf", a, f, precision=hi), -1, 0)
    u = w * p + q  # sum_k A_k h_k
    inner = -w * r - s + u * cbar  # sum_k A_k (h_k - u) (w - c_k)
    two = (2 / tau)[:, None]
    dw = p - two * inner
    x = jnp.stack([jnp.ones_like(w), w, w * w, u, u * w], axis=-1)  # (G, m, 5)
    if valid is not None:
        dw = dw * valid.astype(dw.dtype)
        x = x * valid[..., None].astype(x.dtype)
    m0, m1, m2, mu0, mu1 = jnp.moveaxis(jnp.einsum("gkm,gmf->gkf", a, x, precision=hi), -1, 0)
    dc = two * (g_num * m2 + (g_den - g_num * c) * m1 - g_den * c * m0 - mu1 + c * mu0)
    return dw, dc


def _soft(w, c, tau):
    """`(G, m)`: the soft map `sum_k A_ik c_k` of a chunk."""
    return jnp.sum(_attention(w, c, tau) * c[:, :, None], axis=1)


def _soft_vjp(w, c, tau, g):
    """`(dw, dc)` of `_soft` for the cotangent `g` `(G, m)`.

    `dw = (2 / tau) g Var_A(c)` (the slope of the staircase), and
    `dc_k = sum_i g_i A_ik (1 + (2 / tau) (c_k - w~_i) (w_i - c_k))`.
    """
    a = _attention(w, c, tau)
    out = jnp.sum(a * c[:, :, None], axis=1)
    dev = c[:, :, None] - out[:, None, :]
    two = (2 / tau)[:, None]
    dw = two * g * jnp.sum(a * jnp.square(dev), axis=1)
    ga = g[:, None, :] * a
    dc = _wsum(ga * (1 + two[:, :, None] * dev * (w[:, None, :] - c[:, :, None])))
    return dw, dc


def _chunk_len(g: int, k: int) -> int:
    m = max(1, _CHUNK_ENTRIES // max(1, g * k))
    return m if m < 2 * _BLOCK else m - m % _BLOCK


def _reduce(n: int, m: int, body, carry):
    """`carry = body(start, size, carry)` over the chunks `[start, start + size)` of
    `range(n)`: full chunks of `m` in a `fori_loop`, then the remainder (static sizes)."""
    full, tail = divmod(n, m)
    if full == 1:
        carry = body(0, m, carry)
    elif full > 1:
        carry = jax.lax.fori_loop(0, full, lambda i, cr: body(i * m, m, cr), carry)
    if tail:
        carry = body(full * m, tail, carry)
    return carry


def _slice(x, start, size):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _iterate(w, valid, c0, tau, iters):
    """Centroids `c^0..c^T` `(T + 1, G, K)` and each iteration's `(num, den)` `(T, G, K)`."""
    g, n = w.shape
    m = _chunk_len(g, c0.shape[-1])
    cd = c0.dtype
    cs, nums, dens = [c0], [], []
    c = c0
    for _ in range(iters):

        def body(start, size, acc, c=c):
            wc = _slice(w, start, size).astype(cd)
            num, den = _sums(wc, _slice(valid, start, size), c, tau)
            return acc[0] + num, acc[1] + den

        zero = jnp.zeros_like(c)
        num, den = _reduce(n, m, body, (zero, zero))
        # A table whose valid weights all underflow to 0 attention keeps its centroid.
        c = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), c)
        cs.append(c)
        nums.append(num)
        dens.append(den)
    stack = lambda xs: jnp.stack(xs) if xs else jnp.zeros((0,) + c0.shape, cd)  # noqa: E731
    return stack(cs), stack(nums), stack(dens)


def _output(w, c, tau):
    g, n = w.shape
    m = _chunk_len(g, c.shape[-1])

    def body(start, size, out):
        wc = _slice(w, start, size).astype(c.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, _soft(wc, c, tau).astype(w.dtype), start, 1)

    return _reduce(n, m, body, jnp.empty_like(w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _exact_map(w: jax.Array, valid, c0: jax.Array, tau: jax.Array, iters: int) -> jax.Array:
    """The exact soft map (`soft_map`'s arguments): chunked passes over the weights."""
    cs, _, _ = _iterate(w, valid, c0, tau, iters)
    return _output(w, cs[-1], tau)


def _soft_map_fwd(w, valid, c0, tau, iters):
    cs, nums, dens = _iterate(w, valid, c0, tau, iters)
    return _output(w, cs[-1], tau), (w, valid, cs, nums, dens, tau)


def _soft_map_bwd(iters, residuals, g):
    w, valid, cs, nums, dens, tau = residuals
    gn, n = w.shape
    cd = cs.dtype
    m = _chunk_len(gn, cs.shape[-1])

    # Output stage: d/dw of every weight's own term, and the cotangent of c^T.
    def out_body(start, size, carry):
        dw, gc = carry
        wc = _slice(w, start, size).astype(cd)
        d_w, d_c = _soft_vjp(wc, cs[-1], tau, _slice(g, start, size).astype(cd))
        return jax.lax.dynamic_update_slice_in_dim(dw, d_w, start, 1), gc + d_c

    dw = jnp.empty(w.shape, cd)
    dw, gc = _reduce(n, m, out_body, (dw, jnp.zeros_like(cs[-1])))

    # Iterations in reverse: c^t = num / den of the sums over (w, c^(t-1)).
    for t in range(iters, 0, -1):
        num, den = nums[t - 1], dens[t - 1]
        live = den > 0
        safe = jnp.where(live, den, 1)
        g_num = jnp.where(live, gc / safe, 0)
        g_den = jnp.where(live, -gc * num / jnp.square(safe), 0)
        c_prev = cs[t - 1]
        need_gc = t > 1  # the warm start c^0 is a constant

        def body(start, size, carry, c_prev=c_prev, g_num=g_num, g_den=g_den, need_gc=need_gc):
            dw, gcp = carry
            wc = _slice(w, start, size).astype(cd)
            vc = _slice(valid, start, size)
            d_w, d_c = _sums_vjp(wc, vc, c_prev, tau, g_num, g_den)
            old = jax.lax.dynamic_slice_in_dim(dw, start, size, axis=1)
            dw = jax.lax.dynamic_update_slice_in_dim(dw, old + d_w, start, 1)
            return dw, (gcp + d_c) if need_gc else gcp

        dw, gc_sum = _reduce(n, m, body, (dw, jnp.zeros_like(gc)))
        gc = gc_sum + jnp.where(live, 0, gc)  # an un-updated centroid passes its cotangent on
    return dw.astype(w.dtype), None, None, None


_exact_map.defvjp(_soft_map_fwd, _soft_map_bwd)


# ---------------------------------------------------------------------------------------
# The grid path: tables of many weights.
#
# With the centroids fixed, the soft map and every function of a weight that the
# centroid sums integrate are smooth functions of that one weight. On a table with many
# more weights than `_grid_nodes(K)`, they are evaluated at uniformly spaced nodes over
# the table's range and interpolated in between: a cubic Hermite per cell, from the
# values and slopes at its two nodes. The weights then enter the sums only through four
# moments per cell, `sum_i v_i t_i**p` (p = 0..3, `t_i` the weight's position in its
# cell), and the output through one gather of its cell's cubic; the backward pass is the
# same in reverse (moments of the upstream gradient, one gather of the cells' derivative
# cubics). Per weight and pass that is one scatter or gather instead of K exponentials.
#
# Error: cubic Hermite interpolation errs by O(h**4) in the value and O(h**3) in the
# slope (h = node spacing) against the scale it has to resolve, the softmax transition
# between neighbouring centroids (`tau / (2 gap)` wide). Every call measures it on the
# cells that hold weights, for the first and the last centroids of the step: the value
# mid-cell and the slope at `t = (3 - sqrt 3) / 6`, where a cubic Hermite's slope error
# peaks, against the exact soft map there, relative to the table's span and its largest
# slope. Above `_GRID_TOL` the step takes the exact chunked path instead (heavy-tailed
# tables, whose far centroids make near-steps, and very small temperatures).

_GRID_PER_CLUSTER = 256
_GRID_NODES = (1024, 1 << 16)
# The grid path needs at least this many weights per node to pay for its fixed cost.
_GRID_MIN_WEIGHTS_PER_NODE = 8
_GRID_TOL = 5e-5
_GRID_MAX_RATIO = 20


def _grid_nodes(k: int) -> int:
    """Nodes per table for K centroids: the transitions narrow as the table fills."""
    return int(min(max(_GRID_PER_CLUSTER * k, _GRID_NODES[0]), _GRID_NODES[1]))


def _uses_grid(n: int, k: int) -> bool:
    return n >= _GRID_MIN_WEIGHTS_PER_NODE * _grid_nodes(k)


def _frame(w, nodes):
    """Per table: the first node `lo` (the smallest weight) and the spacing `h`."""
    lo, hi = jnp.min(w, axis=1), jnp.max(w, axis=1)
    h = jnp.where(hi > lo, (hi - lo) / (nodes - 1), 1)
    return jax.lax.stop_gradient(lo), jax.lax.stop_gradient(h)


def _locate(w, lo, h, nodes):
    """Flat cell index (table * nodes + cell) and position `t` in [0, 1] of every weight."""
    x = (w - lo[:, None]) / h[:, None]
    cell = jnp.clip(jnp.floor(x), 0, nodes - 2)
    t = jnp.clip(x - cell, 0, 1)
    rows = jnp.arange(w.shape[0], dtype=jnp.int32)[:, None] * nodes
    return (cell.astype(jnp.int32) + rows).reshape(-1), t.reshape(-1)


def _moments(cell, t, v, tables, nodes):
    """`(tables, nodes, 4)`: per cell, `sum v t**p` for p = 0..3 over its weights."""
    t2 = t * t
    rows = jnp.stack([jnp.ones_like(t), t, t2, t2 * t], axis=-1)
    if v is not None:
        rows = rows * v[:, None]
    return jax.ops.segment_sum(rows, cell, tables * nodes).reshape(tables, nodes, 4)


def _cubics(f):
    """`(T, nodes, 4)` power coefficients in `t` of each cell's cubic Hermite from node
    values and slopes `f` `(T, nodes, 2)` (slopes per unit `t`); the last "cell" is 0."""
    f0, s0, f1, s1 = f[:, :-1, 0], f[:, :-1, 1], f[:, 1:, 0], f[:, 1:, 1]
    c = jnp.stack([f0, s0, 3 * (f1 - f0) - 2 * s0 - s1, 2 * (f0 - f1) + s0 + s1], axis=-1)
    return jnp.pad(c, ((0, 0), (0, 1), (0, 0)))


def _node_weights(moments):
    """`(T, nodes, 2)` weights of node values and slopes such that the sum over a table's
    weights of a function's interpolant is `sum(weights * node (value, slope))`: the
    transpose of `_cubics` applied to the cell moments."""
    example = jnp.zeros(moments.shape[:2] + (2,), moments.dtype)
    (out,) = jax.linear_transpose(_cubics, example)(moments)
    return out


def _slope_cubics(s):
    """`(T, nodes, 4)` power coefficients in `t` of each cell's cubic through the node
    values `s` `(T, nodes)` at `t = -1, 0, 1, 2` (the two nodes of the cell and their
    outer neighbours; cubic extrapolation past the ends); the last "cell" is 0.

    The gradient reads slopes from these rather than differentiating the value cubics:
    a value cubic's slope comes from differences of nearly equal node values, which in
    float32 lose `ulp(value) / (h * slope)`, a relative error that grows as the nodes
    get denser; node slopes interpolate with O(h**4) error and no such loss.
    """
    first = 4 * s[:, :1] - 6 * s[:, 1:2] + 4 * s[:, 2:3] - s[:, 3:4]
    last = 4 * s[:, -1:] - 6 * s[:, -2:-1] + 4 * s[:, -3:-2] - s[:, -4:-3]
    y = jnp.concatenate([first, s, last], axis=1)
    y0, y1, y2, y3 = y[:, :-3], y[:, 1:-2], y[:, 2:-1], y[:, 3:]
    c = jnp.stack(
        [y1, -y0 / 3 - y1 / 2 + y2 - y3 / 6, (y0 + y2) / 2 - y1, (y3 - y0) / 6 + (y1 - y2) / 2],
        axis=-1,
    )
    return jnp.pad(c, ((0, 0), (0, 1), (0, 0)))


def _attend(x, c, tau, h):
    """At positions `x` `(T, P)`: attention `(T, P, K)`, soft map `(T, P)` and its slope
    per unit `t` (`h` times `d/dw`) for centroids `c` `(T, K)`."""
    a = jax.nn.softmax(-jnp.square(x[..., None] - c[:, None, :]) / tau[:, None, None], axis=-1)
    f = jnp.sum(a * c[:, None, :], axis=-1)
    dev = c[:, None, :] - f[..., None]
    slope = (h * 2 / tau)[:, None] * jnp.sum(a * jnp.square(dev), axis=-1)
    return a, f, dev, slope


def _nodes_x(lo, h, nodes):
    return lo[:, None] + h[:, None] * jnp.arange(nodes, dtype=lo.dtype)[None, :]


def _grid_iterate(d, lo, h, c0, tau, iters):
    """Centroids `c^0..c^T` from the node weights `d` of the table's valid weights."""
    x = _nodes_x(lo, h, d.shape[1])
    d0, d1 = d[..., 0], d[..., 1]
    cs = [c0]
    c = c0
    for _ in range(iters):
        a, _, dev, _ = _attend(x, c, tau, h)
        da = (h * 2 / tau)[:, None, None] * a * dev  # the attention's slope per unit t
        den = jnp.einsum("tg,tgk->tk", d0, a) + jnp.einsum("tg,tgk->tk", d1, da)
        # d/dt (a x) = da x + h a
        num = (
            jnp.einsum("tg,tgk->tk", d0 * x, a)
            + jnp.einsum("tg,tgk->tk", d1 * x, da)
            + jnp.einsum("tg,tgk->tk", d1 * h[:, None], a)
        )
        c = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), c)
        cs.append(c)
    return cs


def _grid_values(d, lo, h, c0, tau, iters):
    """Node values and slopes `(T, nodes, 2)` of the soft map with the last centroids."""
    c = _grid_iterate(d, lo, h, c0, tau, iters)[-1]
    _, f, _, slope = _attend(_nodes_x(lo, h, d.shape[1]), c, tau, h)
    return jnp.stack([f, slope], axis=-1)


def _grid_error(lo, h, c, tau, occupancy):
    """`(T,)` interpolation error of the soft map with centroids `c`, measured mid-cell
    (where both interpolants err most) and judged where the weights are (`occupancy`
    `(T, nodes)`: weights per cell): the larger of the slope error in root mean square
    over the weights relative to the root mean square slope (what a gradient's relative
    error sees), and `_GRID_MAX_RATIO` times less of the worst cell's value error over
    the table's span and slope error over the largest slope (what one weight sees)."""
    nodes = occupancy.shape[1]
    x = _nodes_x(lo, h, nodes)
    _, f, _, slope = _attend(x, c, tau, h)
    _, mid, _, mid_slope = _attend(x + 0.5 * h[:, None], c, tau, h)
    v = _cubics(jnp.stack([f, slope], -1))
    d = _slope_cubics(slope)
    e_mid = jnp.abs(v[..., 0] + v[..., 1] / 2 + v[..., 2] / 4 + v[..., 3] / 8 - mid)
    e_slope = jnp.abs(d[..., 0] + d[..., 1] / 2 + d[..., 2] / 4 + d[..., 3] / 8 - mid_slope)
    used = occupancy > 0
    tiny = jnp.finfo(c.dtype).tiny
    span = jnp.maximum(jnp.max(c, -1) - jnp.min(c, -1), tiny)
    top = jnp.maximum(jnp.max(jnp.where(used, slope, 0), -1), tiny)
    worst = jnp.maximum(
        jnp.max(jnp.where(used, e_mid, 0), -1) / span,
        jnp.max(jnp.where(used, e_slope, 0), -1) / top,
    )
    rms = jnp.sqrt(
        jnp.sum(occupancy * jnp.square(e_slope), -1)
        / jnp.maximum(jnp.sum(occupancy * jnp.square(slope), -1), tiny)
    )
    return jnp.maximum(rms, worst / _GRID_MAX_RATIO)


# Weights per chunk of the grid's per-weight passes: their temporaries (cell, position,
# moment rows, gathered coefficients) stay at tens of MiB whatever the table's size.
_GRID_CHUNK = 1 << 20


def _cubic(r, t):
    return r[:, 0] + t * (r[:, 1] + t * (r[:, 2] + t * r[:, 3]))


def _grid_moments(w, lo, h, x, nodes):
    """`(T, nodes, 4)` cell moments of the weights, each weighted by `x` (`(T, n)` or
    `None`), in chunks of weights."""
    tables, n = w.shape

    def body(start, size, acc):
        cell, t = _locate(_slice(w, start, size), lo, h, nodes)
        v = None if x is None else _slice(x, start, size).reshape(-1).astype(t.dtype)
        return acc + _moments(cell, t, v, tables, nodes)

    zero = jnp.zeros((tables, nodes, 4), w.dtype)
    return _reduce(n, max(1, _GRID_CHUNK // tables), body, zero)


def _grid_gather(w, lo, h, coefficients, value):
    """`(T, n)`: `value(rows, t, start, size)` at every weight, `rows` its cell's entries
    of `coefficients` `(T, nodes, C)`, in chunks of weights."""
    tables, n = w.shape
    nodes, width = coefficients.shape[1:]
    flat = coefficients.reshape(-1, width)

    def body(start, size, out):
        cell, t = _locate(_slice(w, start, size), lo, h, nodes)
        got = value(flat[cell], t, start, size).reshape(tables, size)
        return jax.lax.dynamic_update_slice_in_dim(out, got.astype(out.dtype), start, 1)

    return _reduce(n, max(1, _GRID_CHUNK // tables), body, jnp.empty(w.shape, w.dtype))


def _grid_setup(w, valid, c0, tau, iters):
    """`(lo, h, d, cs)` (frame, node weights of the valid weights, centroids `c^0..c^T`)
    and whether the grid is accurate enough for these weights."""
    nodes = _grid_nodes(c0.shape[-1])
    lo, h = _frame(w, nodes)
    m = _grid_moments(w, lo, h, valid, nodes)
    d = _node_weights(m)
    cs = _grid_iterate(d, lo, h, c0, tau, iters)
    ok = jnp.all(_grid_error(lo, h, cs[-1], tau, m[..., 0]) <= _GRID_TOL)
    return (lo, h, d, cs), ok


def _grid_output(w, lo, h, c, tau):
    """`(T, n)`: the soft map with centroids `c` at every weight, from its cell's cubic."""
    _, f, _, slope = _attend(_nodes_x(lo, h, _grid_nodes(c.shape[-1])), c, tau, h)
    return _grid_gather(w, lo, h, _cubics(jnp.stack([f, slope], -1)), lambda r, t, *_: _cubic(r, t))


def _grid_backward(w, valid, c0, tau, iters, lo, h, d, g):
    """`d (sum g * soft map) / dw` by the grid, `w` and `g` in the compute dtype."""
    # The output's cubics are linear in the node values: their cotangent is the node
    # weights of the upstream gradient's moments; through the centroid iterations (on the
    # nodes only) it becomes the cotangent `e` of the node weights `d`.
    g_nodes = _node_weights(_grid_moments(w, lo, h, g, d.shape[1]))
    f, vjp = jax.vjp(lambda d: _grid_values(d, lo, h, c0, tau, iters), d)
    (e,) = vjp(g_nodes)
    # d out_i / d w_i is the soft map's slope at w_i; d (sums) / d w_i the slope of the
    # function whose node values and slopes are `e` (the sums are sums of interpolants of
    # the functions they integrate): both interpolated from node slopes.
    slopes = jnp.concatenate([_slope_cubics(f[..., 1]), _slope_cubics(e[..., 1])], -1)

    def value(r, t, start, size):
        sums = _cubic(r[:, 4:], t)
        if valid is not None:
            sums = sums * _slice(valid, start, size).reshape(-1).astype(sums.dtype)
        return _slice(g, start, size).reshape(-1) * _cubic(r, t) + sums

    return _grid_gather(w, lo, h, slopes, value) / h[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _large_map(w, valid, c0, tau, iters):
    """The soft map of tables with many weights: by the grid where it is accurate, else
    exactly; the choice is made once per call and the backward pass follows it."""
    return _large_map_fwd(w, valid, c0, tau, iters)[0]


def _large_map_fwd(w, valid, c0, tau, iters):
    wc = w.astype(c0.dtype)
    (lo, h, d, cs), ok = _grid_setup(wc, valid, c0, tau, iters)
    k = c0.shape

    def grid(_):
        out = _grid_output(wc, lo, h, cs[-1], tau).astype(w.dtype)
        none = jnp.zeros((iters + 1,) + k, c0.dtype)
        return out, (none, none[1:], none[1:])

    def exact(_):
        exact_cs, nums, dens = _iterate(w, valid, c0, tau, iters)
        return _output(w, exact_cs[-1], tau), (exact_cs, nums, dens)

    # Inside the custom_vjp the branches are not differentiated, so nothing of the
    # branch not taken is linearized or kept.
    out, sums = jax.lax.cond(ok, grid, exact, None)
    return out, (w, valid, c0, tau, lo, h, d, ok, sums)


def _large_map_bwd(iters, residuals, g):
    w, valid, c0, tau, lo, h, d, ok, (cs, nums, dens) = residuals
    cd = c0.dtype

    def grid(_):
        dw = _grid_backward(w.astype(cd), valid, c0, tau, iters, lo, h, d, g.astype(cd))
        return dw.astype(w.dtype)

    def exact(_):
        return _soft_map_bwd(iters, (w, valid, cs, nums, dens, tau), g)[0]

    return jax.lax.cond(ok, grid, exact, None), None, None, None


_large_map.defvjp(_large_map_fwd, _large_map_bwd)


def soft_map(w: jax.Array, valid, c0: jax.Array, tau: jax.Array, iters: int) -> jax.Array:
    """The DKM soft map of grouped weights `w` `(G, n)` with warm-start tables `c0` `(G, K)`.

    Tables of at least `8 * _grid_nodes(K)` weights take the grid path when its measured
    interpolation error is within `_GRID_TOL`; everything else the exact chunked one.

    Args:
      w: the weights, one row per table, any floating dtype.
      valid: `None`, or a `(G, n)` bool array: `False` weights (pruned, outliers) are
        left out of the centroid re-estimation (their output is still the soft map).
      c0: warm-start centroids in the compute dtype (float32 / float64).
      tau: `(G,)` temperatures.
      iters: re-estimation iterations before the output map.

    Returns:
      `(G, n)` in `w.dtype`. Differentiable w.r.t. `w` only (the warm start and `tau`
      get zero gradient).

    Example:
      >>> import jax.numpy as jnp
      >>> from clusterjax._src.dkm import soft_map
      >>> w = jnp.array([[-1.0, -0.9, 1.0, 1.1]])
      >>> soft_map(w, None, jnp.array([[-1.0, 1.0]]), jnp.array([0.01]), 2).round(2)
      Array([[-0.95, -0.95,  1.05,  1.05]], dtype=float32)
    """
    if _uses_grid(w.shape[1], c0.shape[-1]):
        return _large_map(w, valid, c0, tau, iters)
    return _exact_map(w, valid, c0, tau, iters)


def centroids_after(w: jax.Array, valid, c0: jax.Array, tau: jax.Array, iters: int):
    """The centroids after `iters` re-estimations (no gradient), `(G, K)`: the grid path
    when it applies and is accurate, as in `soft_map`."""
    w = jax.lax.stop_gradient(w)
    exact = lambda: _iterate(w, valid, c0, tau, iters)[0][-1]  # noqa: E731
    if not _uses_grid(w.shape[1], c0.shape[-1]):
        return exact()
    (_, _, _, cs), ok = _grid_setup(w.astype(c0.dtype), valid, c0, tau, iters)
    return jax.lax.cond(ok, lambda: cs[-1], exact)


def _valid(lp: LeafPlan, mask, outliers):
    """`(G, n)` bool: the weights that enter the centroid sums (or `None`: all)."""
    if mask is None and outliers is None:
        return None
    v = jnp.ones(lp.shape, bool) if mask is None else jnp.asarray(mask)
    if outliers is not None:
        v = v.reshape(-1).at[outliers].set(False, mode="drop").reshape(lp.shape)
    return lp.grouped(v)


def _tables(lp: LeafPlan, centroids, mask, dtype):
    """The warm-start tables the soft map uses: `(G, K)`, or `(G, K - 1)` without the
    fixed zero centroid of `preserve_sparsity` (kept weights never attend to it)."""
    t = jax.lax.stop_gradient(jnp.asarray(centroids)).reshape(-1, lp.num_clusters).astype(dtype)
    return t if mask is None else t[:, 1:]


def _temperature(lp: LeafPlan, tables):
    if lp.spec.temperature is not None:
        return jnp.full(tables.shape[:1], lp.spec.temperature, tables.dtype)
    return auto_temperature(tables)


_outlier_values = straight_through(lambda x: segments.outlier_values(x).astype(x.dtype))


def apply_leaf(lp: LeafPlan, w: jax.Array, centroids, mask, outliers) -> jax.Array:
    """The soft-clustered leaf: `cj.apply` for a leaf with `assignment="dkm"`.

    Pruned weights (`mask == False`) are exactly 0 with zero gradient; kept ones attend
    to the non-zero centroids only. Outliers read their own value rounded to float16
    (as in the hard mode) with the plain gradient, and stay out of the centroid sums.
    Compiled once per geometry (the chunk loops would otherwise be re-traced at every
    eager call).
    """
    return _apply_leaf(dataclasses.replace(lp, path=""), w, centroids, mask, outliers)


@functools.partial(jax.jit, static_argnums=0)
def _apply_leaf(lp: LeafPlan, w, centroids, mask, outliers):
    cd = table_dtype(w.dtype)
    tables = _tables(lp, centroids, mask, cd)
    tau = _temperature(lp, tables)
    valid = _valid(lp, mask, outliers)
    if mask is not None:
        w = jnp.where(mask, w, jax.lax.stop_gradient(w))
    out = lp.ungrouped(soft_map(lp.grouped(w), valid, tables, tau, lp.spec.dkm_iters))
    if mask is not None:
        out = jnp.where(mask, out, jnp.zeros((), out.dtype))
    if outliers is not None:
        out = segments.put_outliers(out, outliers, _outlier_values(w.reshape(-1)[outliers]))
    return out


def refresh(lp: LeafPlan, w: jax.Array, centroids, mask, outliers) -> jax.Array:
    """The warm-start centroids after `dkm_iters` re-estimations from `centroids` (no
    gradient), shaped and typed like `centroids`; the zero centroid stays 0."""
    return _refresh(dataclasses.replace(lp, path=""), w, centroids, mask, outliers)


@functools.partial(jax.jit, static_argnums=0)
def _refresh(lp: LeafPlan, w, centroids, mask, outliers):
    w = jax.lax.stop_gradient(w)
    centroids = jnp.asarray(centroids)
    tables = _tables(lp, centroids, mask, table_dtype(w.dtype))
    tau = _temperature(lp, tables)
    new = centroids_after(lp.grouped(w), _valid(lp, mask, outliers), tables, tau, lp.spec.dkm_iters)
    if mask is not None:
        new = jnp.concatenate([jnp.zeros_like(new[:, :1]), new], axis=1)
    return new.reshape(lp.table_shape).astype(centroids.dtype)
