"""The core: `init`, `apply`, `update_indices`, `strip`.

Every function walks params with the state's `Plan` (`clusterjax._src.plan`) through
`clusterjax._src.state.leaves`; the gathers and scatters of the clustered forward and
backward passes live in `clusterjax._src.segments`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clusterjax._src import assign as _assign
from clusterjax._src import centroid_init as _centroid_init
from clusterjax._src import dkm as _dkm
from clusterjax._src import lut as _lut
from clusterjax._src import segments
from clusterjax._src import vectors as _vectors
from clusterjax._src.plan import LeafPlan, Plan, SpecOrRules, resolve, table_dtype
from clusterjax._src.state import ClusterState, LeafState, map_leaves
from clusterjax._src.straight_through import straight_through
from clusterjax._src.tree import flatten_like

PyTree = Any


def _assign_leaf(
    lp: LeafPlan, w: jax.Array, centroids: jax.Array, mask: jax.Array | None, scales=None
):
    """Nearest-centroid indices for one leaf (masked weights -> the zero centroid 0).

    `centroids` are the values the leaf reads (`read_tables`): with `lut_dtype`, the
    quantized table. With per-channel scales the weight is compared as `w / scale`
    (the same nearest centroid as `w` against `scale * table`, scales being positive).
    """
    k = lp.num_clusters
    dtype = lp.spec.index_dtype
    if scales is not None:
        w = w.astype(jnp.float32) / lp.scale_view(scales).astype(jnp.float32)
    if lp.cluster_dim > 1:
        d = lp.cluster_dim
        x = lp.grouped(lp.vectors(w))
        tables = jnp.asarray(centroids).reshape(-1, k, d)
        return lp.ungrouped(_vectors.assign(x, tables, dtype=dtype))
    tables = centroids.reshape(-1, k)
    if mask is None:
        # Straight to the index dtype: no int32 array of the leaf's size is materialized.
        return _assign.assign(w, tables, lp.base(), dtype=dtype)
    # Kept weights go to the nearest *non-zero* centroid (1..K-1), pruned ones to 0.
    base = lp.base()
    if lp.axis is not None:
        base = (base // k) * (k - 1)
    idx = _assign.assign(w, tables[:, 1:], base, dtype=dtype) + jnp.ones((), dtype)
    return jnp.where(mask, idx, jnp.zeros((), dtype))


def _lookup(w: jax.Array, centroids: jax.Array, indices: jax.Array, base, *, pairs: bool):
    """`centroids[group][indices]` in the leaf's dtype (`w` only gives the dtype)."""
    take = segments.take_summing_pairs if pairs else segments.take
    return take(centroids.reshape(-1), indices, base).astype(w.dtype)


_clustered = {
    pairs: straight_through(functools.partial(_lookup, pairs=pairs)) for pairs in (False, True)
}


def decode(
    lp: LeafPlan,
    table: jax.Array,
    indices: jax.Array,
    dtype,
    scales: jax.Array | None = None,
    outlier_positions: jax.Array | None = None,
    outlier_values: jax.Array | None = None,
    *,
    pairs: bool = False,
) -> jax.Array:
    """The dense weight of a clustered leaf: the one reconstruction rule.

    `table` holds the values the leaf reads (`read_tables`: the fixed zero centroid
    pinned, a quantized table dequantized). Element `e` is
    `table[group][indices][j]` (`j`: its position in its vector for `cluster_dim > 1`),
    times `scales[c]` (in the table's dtype) with per-channel scales, cast to `dtype`;
    outliers take their float16 values. `clusterjax.strip`, `clusterjax.apply`'s generic
    forward and `PackedArray.unpack` all call it, so they agree bit for bit.

    Example:
      >>> import jax.numpy as jnp
      >>> import clusterjax as cj
      >>> from clusterjax._src.core import decode
      >>> from clusterjax._src.plan import resolve
      >>> spec = cj.ClusterSpec(num_clusters=2, cluster_dim=2)
      >>> lp = resolve({"w": jnp.zeros((4, 1))}, {"w": spec}).leaves[0]
      >>> table = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> decode(lp, table, jnp.array([[1], [0]], jnp.uint8), jnp.float32)[:, 0].tolist()
      [3.0, 4.0, 1.0, 2.0]
    """
    d = lp.cluster_dim
    table = jnp.asarray(table)
    flat = table.reshape(-1, d) if d > 1 else table.reshape(-1)
    take = segments.take_summing_pairs if pairs else segments.take
    dense = lp.unvectors(take(flat, indices, lp.base()))
    if scales is not None:
        dense = dense * lp.scale_view(scales).astype(dense.dtype)
    dense = dense.astype(dtype)
    if outlier_positions is None:
        return dense
    return segments.put_outliers(dense, outlier_positions, outlier_values)


@functools.cache
def _generic_forward(lp: LeafPlan, pairs: bool):
    """The straight-through forward of a leaf with vectors or scales (no outliers)."""

    def forward(w, table, indices, scales):
        return decode(lp, table, indices, w.dtype, scales, pairs=pairs)

    return straight_through(forward)


def tables(leaf: LeafState) -> jax.Array:
    """The centroid table(s) a clustered leaf reads, shaped like `leaf.centroids`.

    With `preserve_sparsity`, centroid 0 is exactly 0 (and gets no gradient), whatever
    value the state holds there: an update chained after `cj.optimizer` cannot move it.
    """
    if leaf.mask is None:
        return leaf.centroids
    return jnp.asarray(leaf.centroids).at[..., 0].set(0)


def read_tables(leaf: LeafState, *, train: bool = False) -> jax.Array:
    """The table values a clustered leaf reads: `tables(leaf)`, then quantized to its
    `lut_dtype` (with a straight-through gradient when `train`, for CQAT)."""
    t = tables(leaf)
    lut_dtype = leaf.plan.spec.lut_dtype
    if lut_dtype is None:
        return t
    n = leaf.plan.num_groups
    if train:
        return _lut.fake_quantize(jnp.asarray(t), lut_dtype, n)
    q, scale, zp = _lut.quantize(t, lut_dtype, n)
    return _lut.dequantize(q, scale, zp, num_groups=n, dtype=jnp.result_type(t))


def _check_finite(path: str, w: Any) -> None:
    if isinstance(w, jax.core.Tracer):
        return  # values are unknown under jit; checked when called eagerly
    bad = ~np.isfinite(np.asarray(jnp.asarray(w, jnp.float32)))
    if bad.any():
        n = int(bad.sum())
        raise ValueError(
            f"cj.init: leaf {path!r} holds {n} NaN/Inf value(s), e.g. at index "
            f"{tuple(int(i) for i in np.argwhere(bad)[0])}. Clustering would spread them to "
            "whole clusters. Fix: repair or re-initialize that leaf before clustering."
        )


def _check_importance(path: str, imp: Any) -> None:
    if isinstance(imp, jax.core.Tracer):
        return  # values are unknown under jit; checked when called eagerly
    a = np.asarray(jnp.asarray(imp, jnp.float32))
    bad = ~np.isfinite(a) | (a < 0)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"cj.init: importance for leaf {path!r} holds {int(bad.sum())} negative or "
            f"NaN/Inf value(s), e.g. {float(a[at])!r} at index {at}. Importances are "
            "non-negative weights of the squared error (e.g. cj.fisher_importance). "
            "Fix: repair the estimate, or pass None for that leaf (uniform importance)."
        )


def init(
    params: PyTree,
    spec_or_rules: SpecOrRules,
    *,
    key: jax.Array,
    importance: PyTree | None = None,
    importance_damping: float = 0.0,
) -> ClusterState:
    """Initializes centroids, indices and masks for every selected leaf of `params`.

    Args:
      params: any pytree of arrays: Flax linen `variables["params"]`, an nnx `State`
        (from `nnx.split` / `nnx.state`), a dict of arrays...
      spec_or_rules: which leaves to cluster and how.
        * one `ClusterSpec`: every floating leaf with `ndim >= 2` (kernels, embeddings);
          biases and norm scales stay dense. A leaf with fewer elements (per table) than
          K is left alone with a warning.
        * an ordered mapping `{regex: ClusterSpec | None}`: the first regex that
          `re.fullmatch`-es the '/'-joined leaf path (see `path_str`) decides; `None`
          leaves the leaf alone; leaves that no rule matches stay dense. A rule that
          matches nothing is warned about.
        * a callable `(path, leaf) -> ClusterSpec | None`.
        Leaves chosen by a mapping or callable are explicitly selected: a bad choice for
        them (non-floating dtype, K larger than the leaf) is an error.
      key: a PRNG key (`jax.random.key`) for the random init methods; each leaf gets
        its own key folded in from its position.
      importance: optional pytree with params' structure of non-negative per-weight
        importances (e.g. squared gradients); the init methods then minimize the
        importance-weighted error. `None` leaves mean uniform importance.
      importance_damping: `lambda >= 0`: each weight's importance becomes
        `F + lambda * mean(F)`, the mean taken over the weights of its centroid table,
        before the weighted fit. Fisher estimates from a model that fits its data are
        dominated by the few examples it still gets wrong; damping (`1.0` blends the
        Fisher-weighted and the plain objective half and half) keeps every weight's
        error in the objective. Needs `importance`.

    Returns:
      A `ClusterState` whose indices are the nearest-centroid assignment of `params`.

    Raises:
      ValueError: naming the leaf path, for every bad input of DESIGN.md section 5.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(1), (8, 4)),
      ...                       "bias": jnp.zeros(4)}}
      >>> rules = {r".*/kernel": cj.ClusterSpec(num_clusters=4, granularity="channel")}
      >>> state = cj.init(params, rules, key=jax.random.key(0))
      >>> state.centroids["Dense_0"]["kernel"].shape
      (4, 4)
    """
    _check_damping(importance, importance_damping)
    plan = resolve(params, spec_or_rules, caller="cj.init")
    return init_from_plan(
        params, plan, key=key, importance=importance, importance_damping=importance_damping
    )


def _check_damping(importance, damping) -> None:
    if (
        isinstance(damping, bool)
        or not isinstance(damping, (int, float, np.integer, np.floating))
        or not np.isfinite(damping)
        or damping < 0
    ):
        raise ValueError(
            f"cj.init: importance_damping={damping!r} must be a finite number >= 0 "
            "(e.g. 1.0 adds each table's mean importance to every weight's)."
        )
    if damping and importance is None:
        raise ValueError(
            f"cj.init: importance_damping={damping!r} needs an importance tree; pass "
            "importance=cj.fisher_importance(...) or drop importance_damping."
        )


def init_from_plan(
    params: PyTree,
    plan: Plan,
    *,
    key: jax.Array,
    importance: PyTree | None = None,
    importance_damping: float = 0.0,
    on_leaf: Callable[[str], None] | None = None,
) -> ClusterState:
    """`init` for a resolved plan, one leaf at a time; `on_leaf(path)` after each leaf.

    Only one leaf's temporaries (sorted values, importance, tables) are alive at a time.
    Each leaf's key is `fold_in(key, position)` with its position in flatten order, so a
    leaf gets the same table whatever else is clustered.
    """
    flat_w = jax.tree.leaves(params, is_leaf=lambda x: x is None)
    if len(flat_w) != len(plan.leaves):
        raise ValueError(f"cj.init: the plan was made for other params ({plan.paths[:4]}).")
    if importance is not None:
        imp_flat = flatten_like(params, importance, "importance (the importance tree)")
    else:
        imp_flat = [None] * len(flat_w)
    fields: tuple[list, list, list, list, list] = ([], [], [], [], [])
    for position, (lp, w, imp) in enumerate(zip(plan.leaves, flat_w, imp_flat)):
        if lp is None:
            out = (None, None, None, None, None)
        else:
            out = _init_leaf(lp, w, imp, importance_damping, jax.random.fold_in(key, position))
            # Finish this leaf before the next one is dispatched: asynchronous dispatch
            # would otherwise queue many leaves and hold all their inputs at once.
            out = jax.block_until_ready(out)
        for field, value in zip(fields, out):
            field.append(value)
        if on_leaf is not None:
            on_leaf(plan.paths[position])
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    centroids, indices, masks, outliers, scales = (jax.tree.unflatten(treedef, f) for f in fields)
    return ClusterState(centroids, indices, masks, plan, outliers, scales)


def channel_scales(lp: LeafPlan, w: jax.Array) -> jax.Array:
    """float16 per-channel scales: the root mean square of each channel along
    `lp.scale_axis`, rounded to float16 (1 for an all-zero channel).

    The root mean square, not `max |w|`: a shared table fits the channels' common shape
    once each has unit spread, while `max |w|` squeezes a channel with one large weight
    into the table's few central entries (on all-MiniLM-L6-v2 at K = 16 `max |w|` scales
    were worse than no scales at all; see examples/README.md, formats.py).

    Example:
      >>> import jax.numpy as jnp
      >>> import clusterjax as cj
      >>> from clusterjax._src.core import channel_scales
      >>> from clusterjax._src.plan import resolve
      >>> w = jnp.array([[0.5, 0.0, -3.0], [-0.5, 0.0, 4.0]])
      >>> lp = resolve({"w": w}, {"w": cj.ClusterSpec(num_clusters=2, per_channel_scale=True)}).leaves[0]
      >>> channel_scales(lp, w).tolist()
      [0.5, 1.0, 3.53515625]
    """  # noqa: E501
    a = lp.scale_axis
    other = tuple(i for i in range(len(lp.shape)) if i != a)
    rms = jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(w, jnp.float32)), axis=other))
    big = float(jnp.finfo(jnp.float16).max)
    rms = jnp.clip(rms, 0.0, big).astype(jnp.float16)
    return jnp.where(rms > 0, rms, jnp.ones((), jnp.float16))


def _init_leaf(lp: LeafPlan, w, imp, damping, key):
    """(table, indices, mask, outlier positions, scales) of one leaf."""
    spec = lp.spec
    _check_finite(lp.path, w)
    w = jnp.asarray(w)
    scales = None
    x = w
    if lp.scale_axis is not None:
        scales = channel_scales(lp, w)
        x = w.astype(jnp.float32) / lp.scale_view(scales).astype(jnp.float32)
    if lp.cluster_dim > 1:
        if imp is not None:
            raise ValueError(
                f"cj.init: leaf {lp.path!r} has cluster_dim={lp.cluster_dim}; importance "
                "weighting is implemented for scalar tables only. Fix: pass None for this "
                "leaf in the importance tree, or cluster_dim=1."
            )
        vecs = lp.grouped(lp.vectors(x)).astype(jnp.float32)
        tables = _vectors.init_tables(
            vecs, num_clusters=spec.num_clusters, method=spec.init, key=key
        ).astype(table_dtype(w.dtype))
        table = tables[0] if lp.axis is None else tables
        return table, _assign_init(lp, w, table, None, scales), None, None, scales
    weights = None
    if imp is not None:
        if tuple(np.shape(imp)) != lp.shape:
            raise ValueError(
                f"cj.init: importance for leaf {lp.path!r} has shape {np.shape(imp)}, "
                f"expected the weight's shape {lp.shape}."
            )
        _check_importance(lp.path, imp)
        weights = lp.grouped(jnp.asarray(imp)).astype(jnp.float32)
        if damping:
            weights = jnp.maximum(weights, 0.0)
            weights = weights + jnp.float32(damping) * jnp.mean(weights, -1, keepdims=True)
    x = lp.grouped(x).astype(jnp.float32)
    outliers = None
    if lp.num_outliers:
        geometry = dataclasses.replace(lp, path="")  # one compilation per geometry
        outliers = _choose_outliers(geometry, x, weights)
        x, weights = _without_outliers(geometry, x, weights, outliers)
    tables = _centroid_init.init_tables(
        x,
        num_clusters=spec.num_clusters,
        method=spec.init,
        key=key,
        preserve_sparsity=spec.preserve_sparsity,
        importance=weights,
    ).astype(table_dtype(w.dtype))
    table = tables[0] if lp.axis is None else tables
    mask = (w != 0) if spec.preserve_sparsity else None
    return table, _assign_init(lp, w, table, mask, scales), mask, outliers, scales


def _assign_init(lp: LeafPlan, w, table, mask, scales):
    """The initial indices: nearest to the values the leaf reads (quantized with lut)."""
    leaf = LeafState(lp, w, table, None, mask, None, scales)
    return _assign_leaf(lp, w, read_tables(leaf), mask, scales)


@functools.partial(jax.jit, static_argnums=0)
def _choose_outliers(lp: LeafPlan, x: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Sorted int32 flat positions of the `lp.num_outliers` weights kept exactly.

    `x` and `weights` are the grouped values and (damped) importances. The score is the
    importance-weighted squared size `importance * w**2` (the weighted error of setting
    the weight to 0, the scale of what a clustered weight far out in the tail risks), or
    `|w|` without importance; ties go to the lower position. With `preserve_sparsity`,
    pruned (zero) weights come last.
    """
    score = jnp.abs(x) if weights is None else jnp.maximum(weights, 0.0) * jnp.square(x)
    if lp.spec.preserve_sparsity:
        score = jnp.where(x != 0, score, -1.0)
    flat = lp.ungrouped(score).reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    return jnp.sort(order[: lp.num_outliers]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _without_outliers(lp: LeafPlan, x, weights, outliers):
    """`(x, weights)` for the k-means with the outliers left out: importance 0, and their
    values clipped to the range of their table's other values (so that "linear" and
    "random", which ignore importance, span the clustered weights only)."""
    out = jnp.zeros((lp.size,), bool).at[outliers].set(True).reshape(lp.shape)
    out = lp.grouped(out)
    lo = jnp.min(jnp.where(out, jnp.inf, x), axis=1, keepdims=True)
    hi = jnp.max(jnp.where(out, -jnp.inf, x), axis=1, keepdims=True)
    x = jnp.where(lo <= hi, jnp.clip(x, lo, hi), x)  # a table of outliers only: as it is
    base = jnp.ones_like(x) if weights is None else weights
    return x, jnp.where(out, 0.0, base)


def apply(params: PyTree, state: ClusterState) -> PyTree:
    """Clustered params: every clustered leaf becomes `centroids[indices]`.

    Differentiable w.r.t. `params` and `state.centroids` with the straight-through
    estimator: the gradient w.r.t. a weight is the upstream gradient (times the sparsity
    mask); the gradient w.r.t. a centroid is the sum of the upstream gradients of the
    weights assigned to it (0 for the fixed zero centroid of `preserve_sparsity`, which
    reads as exactly 0 whatever value the state holds for it).
    Unclustered leaves pass through untouched. Outputs keep each leaf's dtype.

    Leaves with `ClusterSpec(assignment="dkm")` get the soft differentiable k-means map
    instead (warm-started from `state.centroids`, which get zero gradient; see
    `ClusterSpec`); their indices are not read.

    Outliers (`ClusterSpec(outliers=...)`) read their own weight, rounded to float16 as
    the packed file stores it, get the plain gradient, and add nothing to any centroid's
    gradient (nor to the cluster sizes of "mean" aggregation).

    Args:
      params: the (dense, trainable) params `state` was made for.
      state: a `ClusterState` from `clusterjax.init`.

    Returns:
      A pytree with params' structure.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jnp.array([[0.1, 0.9], [1.1, -0.2]])}
      >>> spec = cj.ClusterSpec(num_clusters=2, init="linear")
      >>> state = cj.init(params, {"w": spec}, key=jax.random.key(0))  # a rule: 4 weights
      >>> cj.apply(params, state)["w"]
      Array([[-0.2,  1.1],
             [ 1.1, -0.2]], dtype=float32)
    """

    def one(leaf: LeafState):
        lp = leaf.plan
        if lp is None:
            return leaf.w
        w = jnp.asarray(leaf.w)
        if lp.spec.assignment == "dkm":
            return _dkm.apply_leaf(lp, w, leaf.centroids, leaf.mask, leaf.outliers)
        table = read_tables(leaf, train=True)
        if lp.cluster_dim > 1 or leaf.scales is not None:
            # Vectors and scales (neither has masks or outliers, see ClusterSpec).
            pairs = segments.pairs_in_backward(lp)
            return _generic_forward(lp, pairs)(w, table, leaf.indices, leaf.scales)
        if leaf.mask is None:
            pairs = segments.pairs_in_backward(lp)
            if leaf.outliers is not None:
                flat = jnp.asarray(table).reshape(-1)
                return segments.take_with_outliers(
                    w, flat, leaf.indices, lp.base(), leaf.outliers, pairs
                )
            return _clustered[pairs](w, table, leaf.indices, lp.base())
        # Pruned weights get no gradient, and neither does the fixed zero centroid.
        x = jnp.where(leaf.mask, w, jax.lax.stop_gradient(w))
        if leaf.outliers is not None:
            flat = table.reshape(-1)
            return segments.take_with_outliers(
                x, flat, leaf.indices, lp.base(), leaf.outliers, False
            )
        return _clustered[False](x, table, leaf.indices, lp.base())

    return map_leaves(params, state, "cj.apply", one)


def strip(params: PyTree, state: ClusterState) -> PyTree:
    """Plain dense params equal to `centroids[indices]`: at most K values per table.

    The result feeds the unmodified model (`model.apply({"params": dense}, x)`) and
    gives the same outputs as the clustered forward pass. Unclustered leaves are
    returned as they are. Outliers keep their weight, rounded to float16 (exactly what
    `clusterjax.save` stores, so `load(save(...))` equals `strip` bit for bit).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(1))
      >>> len(jnp.unique(cj.strip(params, state)["w"])) <= 4
      True
    """

    def one(leaf: LeafState):
        lp = leaf.plan
        if lp is None:
            return leaf.w
        w = jnp.asarray(leaf.w)
        values = None
        if leaf.outliers is not None:
            values = segments.outlier_values(w.reshape(-1)[leaf.outliers])
        return decode(
            lp, read_tables(leaf), leaf.indices, w.dtype, leaf.scales, leaf.outliers, values
        )

    return map_leaves(params, state, "cj.strip", one)


def update_indices(params: PyTree, state: ClusterState, *, force: bool = False) -> ClusterState:
    """Re-assigns every weight to its nearest centroid (differentiable training).

    Leaves whose spec has `update_indices=False` keep their indices unless `force=True`.
    Pruned weights (`preserve_sparsity`) stay on the zero centroid; kept weights go to
    the nearest non-zero centroid. Ties go to the lower centroid value. Outliers keep
    their positions and are assigned like every other weight (their index is never
    read: they take their own value).

    Call it after every optimizer step (the train step in README.md): it is the only
    place where indices change.

    Leaves with `assignment="dkm"` first get new warm-start centroids, the result of
    `dkm_iters` soft re-estimations from the current ones (no gradient), then the
    nearest-centroid indices for those, which `strip` / `pack` / `summary` use.

    Args:
      params: the current dense params.
      state: the `ClusterState` to refresh.
      force: re-assign frozen leaves too.

    Returns:
      `state` with new `indices` (and new centroids at DKM leaves).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jnp.array([[0.0, 1.0], [0.1, 0.9]])}
      >>> spec = cj.ClusterSpec(num_clusters=2, init="linear")
      >>> state = cj.init(params, {"w": spec}, key=jax.random.key(0))  # a rule: 4 weights
      >>> moved = {"w": params["w"].at[0, 0].set(0.8)}  # now nearer centroid 1.0
      >>> cj.update_indices(moved, state).indices["w"]
      Array([[1, 1],
             [0, 1]], dtype=uint8)
    """

    new_centroids = []

    def one(leaf: LeafState):
        lp = leaf.plan
        c = leaf.centroids
        if lp is not None and lp.spec.assignment == "dkm":
            c = _dkm.refresh(lp, jnp.asarray(leaf.w), c, leaf.mask, leaf.outliers)
        new_centroids.append(c)
        if lp is None or not (lp.spec.update_indices or force):
            return leaf.indices
        table = read_tables(leaf._replace(centroids=c))
        return _assign_leaf(lp, jnp.asarray(leaf.w), table, leaf.mask, leaf.scales)

    indices = map_leaves(params, state, "cj.update_indices", one)
    if not any(lp is not None and lp.spec.assignment == "dkm" for lp in state.plan.leaves):
        return state._replace(indices=indices)
    treedef = jax.tree.structure(indices, is_leaf=lambda x: x is None)
    return state._replace(indices=indices, centroids=jax.tree.unflatten(treedef, new_centroids))
