"""The core: `ClusterState`, `init`, `apply`, `update_indices`, `strip`."""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clusterjax._src import assign as _assign
from clusterjax._src import centroid_init as _centroid_init
from clusterjax._src.spec import ClusterSpec
from clusterjax._src.straight_through import straight_through
from clusterjax._src.tree import flatten_like, leaves_with_paths, path_str

PyTree = Any
SpecOrRules = (
    ClusterSpec | Mapping[str, ClusterSpec | None] | Callable[[str, jax.Array], ClusterSpec | None]
)


class ClusterState(NamedTuple):
    """Everything clustering adds to a model, as a pytree of arrays.

    Each field has the structure of the params it was made for, with `None` at leaves
    that are not clustered. See BUILD.md ("Data layout") for the exact shapes.

    Attributes:
      centroids: centroid tables: `(K,)` per tensor, `(G, K)` per channel / group.
        Trainable (they get gradients through `clusterjax.apply`).
      indices: per-weight index into the weight's own table, shaped like the weight,
        in the smallest unsigned dtype that holds K (`uint8` for K <= 256).
      masks: `bool` arrays shaped like the weight where `preserve_sparsity` is on
        (`True` = kept, `False` = pruned), `None` elsewhere.
      specs: the `ClusterSpec` of every clustered leaf. Static: specs are part of the tree
        structure, not leaves, so a `ClusterState` is a valid `jax.jit` argument and
        `jax.tree.leaves(state)` holds arrays only.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.zeros(4)}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(0))
      >>> state.centroids["kernel"].shape, state.indices["kernel"].dtype, state.centroids["bias"]
      ((4,), dtype('uint8'), None)
    """

    centroids: PyTree
    indices: PyTree
    masks: PyTree
    specs: PyTree = None


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One clustered leaf, resolved: the spec plus the geometry derived from the shape."""

    path: str
    spec: ClusterSpec
    shape: tuple[int, ...]
    axis: int | None  # normalized channel axis, None for "tensor"
    group_size: int
    num_groups: int

    @property
    def table_shape(self) -> tuple[int, ...]:
        k = self.spec.num_clusters
        return (k,) if self.axis is None else (self.num_groups, k)

    def base(self) -> jax.Array | int:
        """`g * K` of every element's table, broadcastable to `shape` (0 for one table)."""
        if self.axis is None:
            return 0
        k = self.spec.num_clusters
        groups = (np.arange(self.shape[self.axis]) // self.group_size) * k
        view = [1] * len(self.shape)
        view[self.axis] = self.shape[self.axis]
        return jnp.asarray(groups.reshape(view), jnp.int32)

    def grouped(self, w: jax.Array) -> jax.Array:
        """`w` rearranged to (G, elements per group)."""
        if self.axis is None:
            return w.reshape(1, -1)
        moved = jnp.moveaxis(w, self.axis, 0)
        return moved.reshape(self.num_groups, -1)


def _resolve_leaf(path: str, spec: ClusterSpec, w: Any, explicit: bool) -> _Leaf | None:
    """Validates `spec` against the leaf; returns None to skip a too-small default leaf."""
    shape = tuple(np.shape(w))
    dtype = jnp.result_type(w)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"cj.init: leaf {path!r} has dtype {dtype}, but only floating-point leaves can "
            "be clustered. Fix: leave it alone with a rule that maps it to None, e.g. "
            f"{{{re.escape(path)!r}: None, ...}}."
        )
    k = spec.num_clusters
    size = int(np.prod(shape, dtype=np.int64))
    axis = None
    group_size = 1
    num_groups = 1
    if spec.granularity != "tensor":
        ndim = len(shape)
        if not -ndim <= spec.channel_axis < ndim:
            raise ValueError(
                f"cj.init: leaf {path!r} has shape {shape} (ndim={ndim}) but "
                f"channel_axis={spec.channel_axis} is out of range [-{ndim}, {ndim - 1}]. "
                "Fix: pass a channel_axis within the leaf's rank (Flax kernels: -1)."
            )
        axis = spec.channel_axis % ndim
        channels = shape[axis]
        group_size = spec.group_size if spec.granularity == "group" else 1
        if channels % group_size:
            raise ValueError(
                f"cj.init: leaf {path!r} has {channels} channels along axis {axis}, which "
                f"group_size={group_size} does not divide. Fix: pick a group_size that "
                f"divides {channels}."
            )
        num_groups = channels // group_size
    per_table = size // max(num_groups, 1)
    if k > per_table:
        where = "" if axis is None else f" per {spec.granularity} table"
        msg = (
            f"cj.init: leaf {path!r} (shape {shape}) has {per_table} elements{where}, fewer "
            f"than num_clusters={k}. Fix: use num_clusters <= {per_table} for it, or leave "
            "it alone with a rule that maps it to None."
        )
        if explicit:
            raise ValueError(msg)
        warnings.warn(msg.replace("Fix:", "It is left unclustered;"), stacklevel=4)
        return None
    return _Leaf(path, spec, shape, axis, group_size, num_groups)


def _default_selected(w: Any) -> bool:
    dtype = jnp.result_type(w)
    return jnp.issubdtype(dtype, jnp.floating) and np.ndim(w) >= 2


def _select(params: PyTree, spec_or_rules: SpecOrRules) -> list[tuple[ClusterSpec | None, bool]]:
    """(spec or None, explicitly selected) for every leaf of params, in flatten order."""
    flat = leaves_with_paths(params)
    if isinstance(spec_or_rules, ClusterSpec):
        return [(spec_or_rules if _default_selected(w) else None, False) for _, w in flat]
    if isinstance(spec_or_rules, Mapping):
        rules = []
        for pattern, spec in spec_or_rules.items():
            if spec is not None and not isinstance(spec, ClusterSpec):
                raise ValueError(
                    f"cj.init: rule {pattern!r} maps to {spec!r}; a rule maps a regex to a "
                    "ClusterSpec or None."
                )
            try:
                rules.append((pattern, re.compile(pattern), spec))
            except re.error as err:
                raise ValueError(
                    f"cj.init: rule {pattern!r} is not a valid regex: {err}."
                ) from None
        used = set()
        out = []
        for path, _ in flat:
            chosen = None
            for pattern, rx, spec in rules:
                if rx.fullmatch(path):
                    used.add(pattern)
                    chosen = spec
                    break
            out.append((chosen, chosen is not None))
        unused = [p for p, _, _ in rules if p not in used]
        if unused:
            sample = ", ".join(repr(p) for p, _ in flat[:6])
            warnings.warn(
                f"cj.init: rule(s) {', '.join(repr(u) for u in unused)} matched no leaf "
                f"(rules are matched with re.fullmatch against paths such as {sample}).",
                stacklevel=3,
            )
        return out
    if callable(spec_or_rules):
        out = []
        for path, w in flat:
            spec = spec_or_rules(path, w)
            if spec is not None and not isinstance(spec, ClusterSpec):
                raise ValueError(
                    f"cj.init: the rules callable returned {spec!r} for leaf {path!r}; it "
                    "must return a ClusterSpec or None."
                )
            out.append((spec, spec is not None))
        return out
    raise ValueError(
        f"cj.init: spec_or_rules must be a ClusterSpec, a mapping {{regex: ClusterSpec | None}} "
        f"or a callable (path, leaf) -> ClusterSpec | None; got {type(spec_or_rules).__name__}."
    )


def _table_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _assign_leaf(leaf: _Leaf, w: jax.Array, centroids: jax.Array, mask: jax.Array | None):
    """Nearest-centroid indices for one leaf (masked weights -> the zero centroid 0)."""
    k = leaf.spec.num_clusters
    tables = centroids.reshape(-1, k)
    dtype = leaf.spec.index_dtype
    if mask is None:
        # Straight to the index dtype: no int32 array of the leaf's size is materialized.
        return _assign.assign(w, tables, leaf.base(), dtype=dtype)
    # Kept weights go to the nearest *non-zero* centroid (1..K-1), pruned ones to 0.
    base = leaf.base()
    if leaf.axis is not None:
        base = (base // k) * (k - 1)
    idx = _assign.assign(w, tables[:, 1:], base, dtype=dtype) + jnp.ones((), dtype)
    return jnp.where(mask, idx, jnp.zeros((), dtype))


def _segments(indices: jax.Array, base) -> jax.Array:
    """(N, 1) positions of every element's centroid in the flattened tables."""
    if isinstance(base, int) and base == 0:
        # One table: the small unsigned indices as they are (no int32 copy of the leaf).
        return indices.reshape(-1, 1)
    return (base + indices.astype(jnp.int32)).reshape(-1, 1)


def _scatter_add_rows(updates: jax.Array, segments: jax.Array, size: int, into=None):
    """`out[segments[n]] += updates[n]`, out = `into` or zeros `(size,) + updates.shape[1:]`."""
    window = tuple(range(1, updates.ndim))
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=window, inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )
    if into is None:
        into = jnp.zeros((size,) + updates.shape[1:], updates.dtype)
    return jax.lax.scatter_add(
        into,
        segments,
        updates,
        dnums,
        # Out-of-range positions (impossible here) would be dropped, never clamped.
        mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
    )


def cluster_sizes(indices: jax.Array, base, size: int) -> jax.Array:
    """Internal: number of elements per centroid, (size,) float32 over the flat tables."""
    segments = _segments(indices, base)
    return _scatter_add_rows(jnp.ones((segments.shape[0],), jnp.float32), segments, size)


def cluster_sums_and_sizes(values: jax.Array, indices: jax.Array, base, size: int):
    """Internal: per-centroid sums of `values` and cluster sizes, from ONE scatter-add.

    The scatter adds the pairs `(value, 1)`. `apply`'s backward pass computes a leaf's
    centroid gradient with this very function when `sizes_from_gradients` holds, and the
    optimizer calls it again on the weight gradient (the same array: the straight-through
    gradient) for the cluster sizes. Inside one jitted train step XLA finds the two
    identical scatters and keeps one, so the sizes cost no second pass over the weights.
    Should the arrays differ (e.g. a loss term on the raw params), the sizes are still
    exact: the count column does not depend on the values.
    """
    real = jnp.promote_types(values.dtype, jnp.float32)
    v = values.reshape(-1).astype(real)
    seg = _segments(indices, base)
    out = None
    for start in range(0, seg.shape[0], _PAIR_CHUNK):
        part = v[start : start + _PAIR_CHUNK]
        part_seg = seg[start : start + _PAIR_CHUNK]
        if out is not None:
            part, part_seg = after((part, part_seg), out)
        pairs = jnp.stack([part, jnp.ones_like(part)], axis=1)
        out = _scatter_add_rows(pairs, part_seg, size, out)
    return out[:, 0], out[:, 1]


_PAIR_CHUNK = 1 << 20


def after(tree, counts: jax.Array):
    """Internal: `tree` unchanged, but computed only once `counts` exists.

    Adds `counts[0] != counts[0]` (always False: a cluster size is never NaN) to every
    leaf. XLA cannot fold it away, so consumers of the result are scheduled after the
    scatter that made `counts`: the chunks of a large scatter then reuse one buffer, and
    the weight gradient's last use comes after its scatter, so the optimizer can update
    in place into it.
    """
    first = counts.reshape(-1)[0]
    never = first != first
    return jax.tree.map(lambda x: x + never.astype(x.dtype), tree)


def sizes_from_gradients(leaf: _Leaf, mask) -> bool:
    """Internal: whether a leaf's cluster sizes come out of its centroid-gradient scatter.

    True for leaves whose sizes the optimizer counts every step: "mean" aggregation,
    indices re-assigned (frozen ones are counted once and cached), no sparsity mask.
    """
    return mask is None and leaf.spec.update_indices and leaf.spec.gradient_aggregation == "mean"


def _take(flat: jax.Array, indices: jax.Array, base) -> jax.Array:
    """`flat[base + indices]`: the gather of the clustered forward pass."""
    if isinstance(base, int) and base == 0:
        # One table: gather with the small unsigned indices themselves, so neither this
        # gather nor its transpose (the scatter-add of the centroid gradient) needs an
        # int32 copy of the indices (4 bytes per weight in a train step). Not mode=CLIP:
        # its transpose clamps the indices into yet another copy. An XLA gather clamps
        # out-of-range starts by itself, and a scatter drops them, so this stays safe.
        dnums = jax.lax.GatherDimensionNumbers(
            offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
        )
        return jax.lax.gather(
            flat,
            indices[..., None],
            dnums,
            (1,),
            mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
        )
    return flat[base + indices.astype(jnp.int32)]


@jax.custom_vjp
def _take_pair_summed(flat: jax.Array, indices: jax.Array, base) -> jax.Array:
    """`_take` whose transpose is `cluster_sums_and_sizes` (see there for why)."""
    return _take(flat, indices, base)


def _take_pair_summed_fwd(flat, indices, base):
    return _take(flat, indices, base), (flat, indices, base)


def _take_pair_summed_bwd(residuals, g):
    flat, indices, base = residuals
    sums, _ = cluster_sums_and_sizes(g, indices, base, flat.shape[0])
    return sums.astype(flat.dtype), None, None


_take_pair_summed.defvjp(_take_pair_summed_fwd, _take_pair_summed_bwd)


def _lookup(
    w: jax.Array, centroids: jax.Array, indices: jax.Array, base, *, pair_summed: bool = False
) -> jax.Array:
    """`centroids[group][indices]` in the leaf's dtype (`w` only gives the dtype)."""
    take = _take_pair_summed if pair_summed else _take
    return take(centroids.reshape(-1), indices, base).astype(w.dtype)


_clustered = straight_through(_lookup)
_clustered_pair_summed = straight_through(functools.partial(_lookup, pair_summed=True))


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
    flat = leaves_with_paths(params)
    choices = _select(params, spec_or_rules)
    damping = importance_damping
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
    if importance is not None:
        imp_flat = flatten_like(params, importance, "importance (the importance tree)")
    else:
        imp_flat = [None] * len(flat)
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    centroids, indices, masks, specs = [], [], [], []
    for position, ((path, w), (spec, explicit), imp) in enumerate(zip(flat, choices, imp_flat)):
        leaf = None if spec is None or w is None else _resolve_leaf(path, spec, w, explicit)
        if leaf is None:
            for out in (centroids, indices, masks, specs):
                out.append(None)
            continue
        _check_finite(path, w)
        w = jnp.asarray(w)
        table_dtype = _table_dtype(w.dtype)
        values = leaf.grouped(w).astype(jnp.float32)
        weights = None
        if imp is not None:
            if np.shape(imp) != leaf.shape:
                raise ValueError(
                    f"cj.init: importance for leaf {path!r} has shape {np.shape(imp)}, "
                    f"expected the weight's shape {leaf.shape}."
                )
            _check_importance(path, imp)
            weights = leaf.grouped(jnp.asarray(imp)).astype(jnp.float32)
            if damping:
                weights = jnp.maximum(weights, 0.0)
                weights = weights + jnp.float32(damping) * jnp.mean(weights, -1, keepdims=True)
        tables = _centroid_init.init_tables(
            values,
            num_clusters=spec.num_clusters,
            method=spec.init,
            key=jax.random.fold_in(key, position),
            preserve_sparsity=spec.preserve_sparsity,
            importance=weights,
        ).astype(table_dtype)
        table = tables[0] if leaf.axis is None else tables
        mask = (w != 0) if spec.preserve_sparsity else None
        centroids.append(table)
        indices.append(_assign_leaf(leaf, w, table, mask))
        masks.append(mask)
        specs.append(spec)
    return ClusterState(
        centroids=jax.tree.unflatten(treedef, centroids),
        indices=jax.tree.unflatten(treedef, indices),
        masks=jax.tree.unflatten(treedef, masks),
        specs=jax.tree.unflatten(treedef, specs),
    )


def _leaves(params: PyTree, state: ClusterState, caller: str):
    """Yields (position, leaf geometry or None, w, centroids, indices, mask) per leaf."""
    if not isinstance(state, ClusterState):
        raise ValueError(
            f"{caller}: expected a ClusterState as the second argument, got "
            f"{type(state).__name__}. Fix: state = cj.init(params, spec, key=key)."
        )
    flat = leaves_with_paths(params)
    fields = [flatten_like(params, getattr(state, f), f) for f in ClusterState._fields]
    for position, ((path, w), c, i, m, s) in enumerate(zip(flat, *fields)):
        if c is None and i is None:
            yield position, None, w, None, None, None
            continue
        if s is None or c is None or i is None:
            raise ValueError(
                f"{caller}: leaf {path!r} is clustered in some ClusterState fields but not "
                "in others (centroids, indices and specs must be set together). Fix: build "
                "the state with cj.init."
            )
        leaf = _geometry(path, s, w)
        shape = leaf.shape
        if tuple(np.shape(i)) != shape:
            raise ValueError(
                f"{caller}: state.indices at {path!r} has shape {tuple(np.shape(i))} but the "
                f"param has shape {shape}. Fix: re-run cj.init for the current params."
            )
        if tuple(np.shape(c)) != leaf.table_shape:
            raise ValueError(
                f"{caller}: state.centroids at {path!r} has shape {tuple(np.shape(c))}, "
                f"expected {leaf.table_shape} for {s.granularity!r} granularity with "
                f"K={s.num_clusters}. Fix: re-run cj.init for the current params."
            )
        if s.preserve_sparsity:
            if m is None or tuple(np.shape(m)) != shape:
                raise ValueError(
                    f"{caller}: state.masks at {path!r} must be a bool array of shape {shape} "
                    "(preserve_sparsity=True). Fix: re-run cj.init."
                )
        yield position, leaf, w, c, i, (m if s.preserve_sparsity else None)


def _geometry(path: str, spec: ClusterSpec, w: Any) -> _Leaf:
    shape = tuple(np.shape(w))
    if spec.granularity == "tensor":
        return _Leaf(path, spec, shape, None, 1, 1)
    ndim = len(shape)
    if not -ndim <= spec.channel_axis < ndim:
        raise ValueError(
            f"leaf {path!r} has shape {shape}, channel_axis={spec.channel_axis} is out of range."
        )
    axis = spec.channel_axis % ndim
    group_size = spec.group_size if spec.granularity == "group" else 1
    return _Leaf(path, spec, shape, axis, group_size, shape[axis] // group_size)


def _map_leaves(params, state, caller, fn):
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    out = [fn(*item) for item in _leaves(params, state, caller)]
    return jax.tree.unflatten(treedef, out)


def apply(params: PyTree, state: ClusterState) -> PyTree:
    """Clustered params: every clustered leaf becomes `centroids[indices]`.

    Differentiable w.r.t. `params` and `state.centroids` with the straight-through
    estimator: the gradient w.r.t. a weight is the upstream gradient (times the sparsity
    mask); the gradient w.r.t. a centroid is the sum of the upstream gradients of the
    weights assigned to it (0 for the fixed zero centroid of `preserve_sparsity`).
    Unclustered leaves pass through untouched. Outputs keep each leaf's dtype.

    Args:
      params: the (dense, trainable) params `state` was made for.
      state: a `ClusterState` from `clusterjax.init`.

    Returns:
      A pytree with params' structure.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jnp.array([[0.1, 0.9], [1.1, -0.2]])}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=2, init="linear"),
      ...                 key=jax.random.key(0))
      >>> cj.apply(params, state)["w"]
      Array([[-0.2,  1.1],
             [ 1.1, -0.2]], dtype=float32)
    """

    def one(_, leaf, w, c, i, m):
        if leaf is None:
            return w
        w = jnp.asarray(w)
        if m is None:
            fn = _clustered_pair_summed if sizes_from_gradients(leaf, m) else _clustered
            return fn(w, c, i, leaf.base())
        # Pruned weights get no gradient, and neither does the fixed zero centroid.
        x = jnp.where(m, w, jax.lax.stop_gradient(w))
        c = c.at[..., 0].set(jax.lax.stop_gradient(c[..., 0]))
        return _clustered(x, c, i, leaf.base())

    return _map_leaves(params, state, "cj.apply", one)


def strip(params: PyTree, state: ClusterState) -> PyTree:
    """Plain dense params equal to `centroids[indices]`: at most K values per table.

    The result feeds the unmodified model (`model.apply({"params": dense}, x)`) and
    gives the same outputs as the clustered forward pass. Unclustered leaves are
    returned as they are.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(1))
      >>> len(jnp.unique(cj.strip(params, state)["w"])) <= 4
      True
    """

    def one(_, leaf, w, c, i, m):
        if leaf is None:
            return w
        return _lookup(jnp.asarray(w), c, i, leaf.base())

    return _map_leaves(params, state, "cj.strip", one)


def update_indices(params: PyTree, state: ClusterState, *, force: bool = False) -> ClusterState:
    """Re-assigns every weight to its nearest centroid (differentiable training).

    Leaves whose spec has `update_indices=False` keep their indices unless `force=True`.
    Pruned weights (`preserve_sparsity`) stay on the zero centroid; kept weights go to
    the nearest non-zero centroid. Ties go to the lower centroid value.

    `clusterjax.optimizer` already does this after every step; call it yourself when you
    update params or centroids another way.

    Args:
      params: the current dense params.
      state: the `ClusterState` to refresh.
      force: re-assign frozen leaves too.

    Returns:
      `state` with new `indices`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jnp.array([[0.0, 1.0], [0.1, 0.9]])}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=2, init="linear"),
      ...                 key=jax.random.key(0))
      >>> moved = {"w": params["w"].at[0, 0].set(0.8)}  # now nearer centroid 1.0
      >>> cj.update_indices(moved, state).indices["w"]
      Array([[1, 1],
             [0, 1]], dtype=uint8)
    """

    def one(_, leaf, w, c, i, m):
        if leaf is None or not (leaf.spec.update_indices or force):
            return i
        return _assign_leaf(leaf, jnp.asarray(w), c, m)

    return state._replace(indices=_map_leaves(params, state, "cj.update_indices", one))


def leaf_geometry(params: PyTree, state: ClusterState, caller: str):
    """Internal: per-leaf `(path, _Leaf | None, w, centroids, indices, mask)` list."""
    return [
        (path_str_, *rest[1:])
        for path_str_, rest in zip(
            [p for p, _ in leaves_with_paths(params)], _leaves(params, state, caller)
        )
    ]


__all__ = [
    "ClusterState",
    "init",
    "apply",
    "strip",
    "update_indices",
    "path_str",
]
