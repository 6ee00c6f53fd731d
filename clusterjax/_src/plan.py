"""One plan per leaf: which leaves are clustered, with which spec, in which geometry.

`resolve` is the only place where rules are matched against leaf paths and where a
`ClusterSpec` is checked against the shape of the leaf it is given to. Its result, a
`Plan`, travels inside the `ClusterState` (as static data) and every consumer reads it:
`init`, `apply`, `update_indices`, `strip`, the optimizer, `pack`, `summary`,
`fisher_importance` and the command line. Nothing downstream re-derives a table shape,
a channel axis or a group.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clusterjax._src.spec import ClusterSpec
from clusterjax._src.tree import leaves_with_paths

PyTree = Any
SpecOrRules = (
    ClusterSpec | Mapping[str, ClusterSpec | None] | Callable[[str, jax.Array], ClusterSpec | None]
)

#: A leaf selected by default (not by an explicit rule) stays dense when it has fewer
#: than this many weights per centroid, or when its packed indices and tables would take
#: at least its own bytes: clustering would not make it smaller.
MIN_WEIGHTS_PER_CENTROID = 4


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One clustered leaf: its spec and the geometry of its centroid tables.

    Every count and shape a consumer needs (index shape, table shape, scale shape, stored
    bytes) is a property here, computed from these fields only.

    Attributes:
      path: the '/'-joined path of the leaf (see `clusterjax.path_str`).
      spec: the leaf's `ClusterSpec`.
      shape: the weight's shape.
      axis: the normalized channel axis (`0 <= axis < ndim`) of "channel" and "group"
        tables, `None` for one table per tensor.
      group_size: channels per table (1 for "channel" and "tensor").
      vector_axis: the normalized axis along which `spec.cluster_dim` consecutive weights
        form one vector; `None` for scalar tables (`cluster_dim == 1`).
      scale_axis: the normalized axis of the per-channel scales; `None` without
        `per_channel_scale`.

    Example:
      >>> import jax.numpy as jnp
      >>> import clusterjax as cj
      >>> from clusterjax._src.plan import resolve
      >>> spec = cj.ClusterSpec(num_clusters=16, cluster_dim=2, per_channel_scale=True)
      >>> lp = resolve({"w": jnp.zeros((64, 8))}, spec).leaves[0]
      >>> lp.index_shape, lp.table_shape, lp.scale_shape, lp.stored_nbytes(jnp.float32)
      ((32, 8), (16, 2), (8,), 272)
    """

    path: str
    spec: ClusterSpec
    shape: tuple[int, ...]
    axis: int | None
    group_size: int
    vector_axis: int | None = None
    scale_axis: int | None = None

    @property
    def num_clusters(self) -> int:
        return self.spec.num_clusters

    @property
    def cluster_dim(self) -> int:
        """d, weights per table entry (1 for scalar tables)."""
        return 1 if self.vector_axis is None else self.spec.cluster_dim

    @property
    def index_shape(self) -> tuple[int, ...]:
        """Shape of the indices: the weight's shape with `vector_axis` divided by d."""
        if self.vector_axis is None:
            return self.shape
        a = self.vector_axis
        return self.shape[:a] + (self.shape[a] // self.cluster_dim,) + self.shape[a + 1 :]

    @property
    def num_groups(self) -> int:
        """Number of centroid tables, G (1 for "tensor")."""
        return 1 if self.axis is None else self.shape[self.axis] // self.group_size

    @property
    def size(self) -> int:
        """Number of weights."""
        return math.prod(self.shape)

    @property
    def num_indices(self) -> int:
        """Number of indices (weights / d)."""
        return math.prod(self.index_shape)

    @property
    def per_table(self) -> int:
        """Indices (weights, or vectors of d weights) per centroid table."""
        return self.num_indices // self.num_groups if self.num_groups else 0

    @property
    def num_outliers(self) -> int:
        """Weights kept exactly as outliers: `floor(spec.outliers * size + 1/2)`."""
        return num_outliers(self.spec.outliers, self.size)

    @property
    def sizes_shape(self) -> tuple[int, ...]:
        """`(K,)` for one table per tensor, `(G, K)` otherwise: one entry per centroid."""
        k = self.num_clusters
        return (k,) if self.axis is None else (self.num_groups, k)

    @property
    def table_shape(self) -> tuple[int, ...]:
        """`sizes_shape`, plus a trailing `d` for vector tables (`cluster_dim > 1`)."""
        d = self.cluster_dim
        return self.sizes_shape + ((d,) if d > 1 else ())

    @property
    def scale_shape(self) -> tuple[int, ...] | None:
        """`(C,)`, one scale per channel along `scale_axis`; `None` without scales."""
        return None if self.scale_axis is None else (self.shape[self.scale_axis],)

    @property
    def lut_shape(self) -> tuple[int, ...] | None:
        """`(G,)`: one quantization scale (and zero point) per table with `lut_dtype`."""
        return None if self.spec.lut_dtype is None else (self.num_groups,)

    def stored_nbytes(self, dtype) -> int:
        """Bytes the packed file stores for this leaf, header excluded: bit-packed
        indices, the table (float, or int8/uint8 plus a float32 scale per table and a
        uint8 zero point per table for uint8), float16 per-channel scales, and 6 bytes per
        outlier (int32 position, float16 value). `dtype` is the weight's dtype."""
        n_idx = -(-self.num_indices * self.spec.bits // 8)
        entries = math.prod(self.table_shape)
        if self.spec.lut_dtype is None:
            table = entries * jnp.dtype(table_dtype(dtype)).itemsize
        else:
            per_table = 4 + (1 if self.spec.lut_dtype == "uint8" else 0)
            table = entries + per_table * self.num_groups
        scales = 0 if self.scale_shape is None else 2 * self.scale_shape[0]
        return n_idx + table + scales + 6 * self.num_outliers

    def base(self) -> jax.Array | int:
        """`g * K` of every index's table `g`, broadcastable to `index_shape` (0 for one
        table). Adding it to the indices gives positions in the flattened tables."""
        base = table_base(self.index_shape, self.num_clusters, self.axis, self.group_size)
        return base if isinstance(base, int) else jnp.asarray(base)

    def vectors(self, w: jax.Array) -> jax.Array:
        """`w` (weight-shaped) as `index_shape + (d,)` vectors; `w` itself for d = 1."""
        if self.vector_axis is None:
            return w
        a, d = self.vector_axis, self.cluster_dim
        split = self.shape[:a] + (self.shape[a] // d, d) + self.shape[a + 1 :]
        return jnp.moveaxis(w.reshape(split), a + 1, -1)

    def unvectors(self, v: jax.Array) -> jax.Array:
        """The inverse of `vectors`: `index_shape + (d,)` back to the weight's shape."""
        if self.vector_axis is None:
            return v
        return jnp.moveaxis(v, -1, self.vector_axis + 1).reshape(self.shape)

    def scale_view(self, scales: jax.Array) -> jax.Array:
        """`(C,)` scales reshaped to broadcast against the weight."""
        view = [1] * len(self.shape)
        view[self.scale_axis] = self.shape[self.scale_axis]
        return jnp.asarray(scales).reshape(view)

    def grouped(self, x: jax.Array) -> jax.Array:
        """`x` (index-shaped, optionally with trailing dims such as a vector's d)
        rearranged to `(G, indices per table) + trailing`."""
        trail = tuple(x.shape[len(self.index_shape) :])
        if self.axis is None:
            return x.reshape((1, -1) + trail)
        return jnp.moveaxis(x, self.axis, 0).reshape((self.num_groups, -1) + trail)

    def ungrouped(self, g: jax.Array) -> jax.Array:
        """The inverse of `grouped`: `(G, indices per table) + trailing` back to
        `index_shape + trailing`."""
        trail = tuple(g.shape[2:])
        shape = self.index_shape
        if self.axis is None:
            return g.reshape(shape + trail)
        moved = (shape[self.axis],) + tuple(s for i, s in enumerate(shape) if i != self.axis)
        return jnp.moveaxis(g.reshape(moved + trail), 0, self.axis)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The per-leaf plan of a whole params tree, in `jax.tree` flatten order.

    Static: it is hashable and compared by value, and lives in `ClusterState.plan` as
    part of the tree structure, never as a leaf.

    Attributes:
      paths: the '/'-joined path of every leaf of params (`None` leaves included).
      leaves: a `LeafPlan` per clustered leaf, `None` for leaves that stay dense.
      kept_dense: `(path, reason)` of every default-selected leaf left dense because
        clustering would not make it smaller.
    """

    paths: tuple[str, ...]
    leaves: tuple[LeafPlan | None, ...]
    kept_dense: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if len(self.paths) != len(self.leaves):
            raise ValueError("Plan: paths and leaves must have the same length.")

    @property
    def clustered(self) -> tuple[LeafPlan, ...]:
        """The clustered leaves' plans, in order."""
        return tuple(lp for lp in self.leaves if lp is not None)


def _rules_chooser(rules: Mapping) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(path -> spec or None or a 'no match' marker, unused patterns) for a rules mapping."""
    compiled = []
    for pattern, spec in rules.items():
        if spec is not None and not isinstance(spec, ClusterSpec):
            raise ValueError(
                f"rule {pattern!r} maps to {spec!r}; a rule maps a regex to a ClusterSpec or "
                "None (e.g. {r'.*kernel': cj.ClusterSpec(num_clusters=16)})."
            )
        if not isinstance(pattern, str):
            raise ValueError(f"rule {pattern!r}: rules are keyed by regex strings.")
        try:
            compiled.append((pattern, re.compile(pattern), spec))
        except re.error as err:
            raise ValueError(f"rule {pattern!r} is not a valid regex: {err}.") from None
    used: set[str] = set()

    def choose(path: str):
        for pattern, rx, spec in compiled:
            if rx.fullmatch(path):
                used.add(pattern)
                return spec
        return None

    return choose, lambda: [p for p, _, _ in compiled if p not in used]


def _floating(w: Any) -> bool:
    return w is not None and jnp.issubdtype(jnp.result_type(w), jnp.floating)


def resolve(params: PyTree, spec_or_rules: SpecOrRules, *, caller: str = "cj.init") -> Plan:
    """Matches rules to leaves and checks every chosen spec against its leaf.

    Args:
      params: the params pytree (arrays or `jax.ShapeDtypeStruct`s).
      spec_or_rules: see `clusterjax.init`.
      caller: the public function named in errors and warnings.

    Returns:
      The `Plan`. Warns (once per call) about rules that match no leaf and about
      default-selected leaves left dense because clustering would not make them smaller.

    Raises:
      ValueError: naming the leaf, for a non-floating leaf chosen by a rule, a channel
        axis out of range, a group size that does not divide the channels, or K larger
        than a table of an explicitly chosen leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> import clusterjax as cj
      >>> from clusterjax._src.plan import resolve
      >>> params = {"dense": {"kernel": jnp.zeros((64, 8)), "bias": jnp.zeros(8)}}
      >>> plan = resolve(params, cj.ClusterSpec(num_clusters=4, granularity="channel"))
      >>> plan.paths, plan.leaves[1].table_shape
      (('dense/bias', 'dense/kernel'), (8, 4))
    """
    flat = leaves_with_paths(params)
    unused: Callable[[], list[str]] = list
    if isinstance(spec_or_rules, ClusterSpec):
        spec = spec_or_rules
        choices = [(spec if _floating(w) and np.ndim(w) >= 2 else None, False) for _, w in flat]
    elif isinstance(spec_or_rules, Mapping):
        try:
            choose, unused = _rules_chooser(spec_or_rules)
        except ValueError as err:
            raise ValueError(f"{caller}: {err}") from None
        choices = []
        for path, _ in flat:
            spec = choose(path)
            choices.append((spec, spec is not None))
    elif callable(spec_or_rules):
        choices = []
        for path, w in flat:
            spec = spec_or_rules(path, w)
            if spec is not None and not isinstance(spec, ClusterSpec):
                raise ValueError(
                    f"{caller}: the rules callable returned {spec!r} for leaf {path!r}; it "
                    "must return a ClusterSpec or None."
                )
            choices.append((spec, spec is not None))
    else:
        raise ValueError(
            f"{caller}: spec_or_rules must be a ClusterSpec, a mapping "
            "{regex: ClusterSpec | None} or a callable (path, leaf) -> ClusterSpec | None; "
            f"got {type(spec_or_rules).__name__}."
        )
    leaves, kept_dense = [], []
    for (path, w), (spec, explicit) in zip(flat, choices):
        if spec is None or w is None:
            leaves.append(None)
            continue
        leaf = _leaf_plan(path, spec, w, explicit, caller)
        reason = None if explicit else _not_worth_it(leaf, jnp.result_type(w))
        if reason is not None:
            kept_dense.append((path, reason))
            leaf = None
        leaves.append(leaf)
    missed = unused()
    if missed:
        sample = ", ".join(repr(p) for p, _ in flat[:6])
        warnings.warn(
            f"{caller}: rule(s) {', '.join(repr(u) for u in missed)} matched no leaf "
            f"(rules are matched with re.fullmatch against paths such as {sample}).",
            stacklevel=3,
        )
    if kept_dense:
        listed = "; ".join(f"{p!r} ({r})" for p, r in kept_dense)
        warnings.warn(
            f"{caller}: left {len(kept_dense)} default-selected leaf/leaves dense, where "
            f"clustering would not make them smaller: {listed}. Select a leaf with an "
            "explicit rule to cluster it anyway.",
            stacklevel=3,
        )
    return Plan(paths=tuple(p for p, _ in flat), leaves=tuple(leaves), kept_dense=tuple(kept_dense))


def _leaf_plan(path: str, spec: ClusterSpec, w: Any, explicit: bool, caller: str) -> LeafPlan:
    shape = tuple(int(s) for s in np.shape(w))
    dtype = jnp.result_type(w)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{caller}: leaf {path!r} has dtype {dtype}, but only floating-point leaves can "
            "be clustered. Fix: leave it alone with a rule that maps it to None, e.g. "
            f"{{{re.escape(path)!r}: None, ...}}."
        )
    axis, group_size = None, 1
    if spec.granularity != "tensor":
        ndim = len(shape)
        if not -ndim <= spec.channel_axis < ndim:
            raise ValueError(
                f"{caller}: leaf {path!r} has shape {shape} (ndim={ndim}) but "
                f"channel_axis={spec.channel_axis} is out of range [-{ndim}, {ndim - 1}]. "
                "Fix: pass a channel_axis within the leaf's rank (Flax kernels: -1)."
            )
        axis = spec.channel_axis % ndim
        group_size = spec.group_size if spec.granularity == "group" else 1
        if shape[axis] % group_size:
            raise ValueError(
                f"{caller}: leaf {path!r} has {shape[axis]} channels along axis {axis}, "
                f"which group_size={group_size} does not divide. Fix: pick a group_size "
                f"that divides {shape[axis]}."
            )
    vector_axis = scale_axis = None
    ndim = len(shape)
    d = spec.cluster_dim
    if d > 1:
        if not -ndim <= spec.vector_axis < ndim:
            raise ValueError(
                f"{caller}: leaf {path!r} has shape {shape} (ndim={ndim}) but "
                f"vector_axis={spec.vector_axis} is out of range [-{ndim}, {ndim - 1}]. "
                "Fix: pass a vector_axis within the leaf's rank (Flax kernels: -2, the "
                "input axis)."
            )
        vector_axis = spec.vector_axis % ndim
        if shape[vector_axis] % d:
            raise ValueError(
                f"{caller}: leaf {path!r} has {shape[vector_axis]} weights along "
                f"vector_axis={vector_axis}, which cluster_dim={d} does not divide. Fix: a "
                f"cluster_dim that divides {shape[vector_axis]}, another vector_axis, or a "
                "rule that leaves this leaf scalar (cluster_dim=1) or dense (None)."
            )
        if axis is not None and axis == vector_axis:
            raise ValueError(
                f"{caller}: leaf {path!r}: channel_axis and vector_axis are both axis "
                f"{axis}; per-{spec.granularity} vector tables need vectors along another "
                "axis. Fix: e.g. channel_axis=-1 with vector_axis=-2 (Flax kernels)."
            )
    if spec.per_channel_scale:
        if not -ndim <= spec.channel_axis < ndim:
            raise ValueError(
                f"{caller}: leaf {path!r} has shape {shape} (ndim={ndim}) but "
                f"channel_axis={spec.channel_axis} (the axis of per_channel_scale) is out of "
                f"range [-{ndim}, {ndim - 1}]. Fix: a channel_axis within the leaf's rank."
            )
        scale_axis = spec.channel_axis % ndim
    leaf = LeafPlan(path, spec, shape, axis, group_size, vector_axis, scale_axis)
    if spec.outliers and leaf.size > MAX_OUTLIER_LEAF_SIZE:
        raise ValueError(
            f"{caller}: leaf {path!r} has {leaf.size:,} weights; outliers are stored at "
            f"int32 positions, so a leaf with outliers holds at most {MAX_OUTLIER_LEAF_SIZE:,}. "
            "Fix: outliers=0.0 for it, or split the leaf."
        )
    k = spec.num_clusters
    if explicit and k > leaf.per_table:
        where = "" if axis is None else f" per {spec.granularity} table"
        what = "elements" if d == 1 else f"vectors of {d}"
        raise ValueError(
            f"{caller}: leaf {path!r} (shape {shape}) has {leaf.per_table} {what}{where}, "
            f"fewer than num_clusters={k}. Fix: use num_clusters <= {leaf.per_table} for it, "
            "or leave it alone with a rule that maps it to None."
        )
    return leaf


def _not_worth_it(leaf: LeafPlan, dtype) -> str | None:
    """Why clustering a default-selected leaf would not pay, or None if it does."""
    k = leaf.num_clusters
    if leaf.per_table < k:
        where = "" if leaf.axis is None else f" per {leaf.spec.granularity} table"
        return f"shape {leaf.shape}: {leaf.per_table} weights{where} < K = {k}"
    if leaf.num_indices < MIN_WEIGHTS_PER_CENTROID * k:
        what = "weights" if leaf.cluster_dim == 1 else f"vectors of {leaf.cluster_dim}"
        return (
            f"shape {leaf.shape}: {leaf.num_indices} {what} < {MIN_WEIGHTS_PER_CENTROID} x K = "
            f"{MIN_WEIGHTS_PER_CENTROID * k}"
        )
    packed = leaf.stored_nbytes(dtype)
    dense = leaf.size * jnp.dtype(dtype).itemsize
    if packed >= dense:
        return f"shape {leaf.shape}: {packed:,} packed bytes >= {dense:,} dense bytes"
    return None


def num_outliers(fraction: float, size: int) -> int:
    """`floor(fraction * size + 1/2)`: the number of outliers of a leaf of `size` weights.

    Example:
      >>> from clusterjax._src.plan import num_outliers
      >>> num_outliers(0.005, 1000), num_outliers(0.005, 100), num_outliers(0.0, 10**6)
      (5, 1, 0)
    """
    return min(size, math.floor(fraction * size + 0.5)) if fraction else 0


#: Outlier positions are int32 flat positions: leaves with outliers hold < 2^31 weights.
MAX_OUTLIER_LEAF_SIZE = 2**31 - 1


def table_base(
    shape: tuple[int, ...], num_clusters: int, axis: int | None, group_size: int
) -> np.ndarray | int:
    """`g * K` of every element's table `g` (int32, broadcastable to `shape`), 0 for one table.

    Element `e` at position `c` along `axis` reads table `g = c // group_size`.

    Example:
      >>> from clusterjax._src.plan import table_base
      >>> table_base((2, 4), num_clusters=3, axis=1, group_size=2)
      array([[0, 0, 3, 3]], dtype=int32)
    """
    if axis is None:
        return 0
    groups = (np.arange(shape[axis]) // group_size) * num_clusters
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return groups.reshape(view).astype(np.int32)


def table_dtype(dtype) -> jnp.dtype:
    """The dtype of the centroid tables of a weight of `dtype` (float32, float64 for f64)."""
    return jnp.promote_types(dtype, jnp.float32)
