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

    Attributes:
      path: the '/'-joined path of the leaf (see `clusterjax.path_str`).
      spec: the leaf's `ClusterSpec`.
      shape: the weight's shape.
      axis: the normalized channel axis (`0 <= axis < ndim`) of "channel" and "group"
        tables, `None` for one table per tensor.
      group_size: channels per table (1 for "channel" and "tensor").
    """

    path: str
    spec: ClusterSpec
    shape: tuple[int, ...]
    axis: int | None
    group_size: int

    @property
    def num_clusters(self) -> int:
        return self.spec.num_clusters

    @property
    def num_groups(self) -> int:
        """Number of centroid tables, G (1 for "tensor")."""
        return 1 if self.axis is None else self.shape[self.axis] // self.group_size

    @property
    def size(self) -> int:
        """Number of weights."""
        return math.prod(self.shape)

    @property
    def per_table(self) -> int:
        """Weights per centroid table."""
        return self.size // self.num_groups if self.num_groups else 0

    @property
    def num_outliers(self) -> int:
        """Weights kept exactly as outliers: `floor(spec.outliers * size + 1/2)`."""
        return num_outliers(self.spec.outliers, self.size)

    @property
    def table_shape(self) -> tuple[int, ...]:
        """`(K,)` for one table per tensor, `(G, K)` otherwise."""
        k = self.num_clusters
        return (k,) if self.axis is None else (self.num_groups, k)

    def base(self) -> jax.Array | int:
        """`g * K` of every weight's table `g`, broadcastable to `shape` (0 for one table).

        Adding it to the indices gives positions in the flattened tables.
        """
        base = table_base(self.shape, self.num_clusters, self.axis, self.group_size)
        return base if isinstance(base, int) else jnp.asarray(base)

    def grouped(self, w: jax.Array) -> jax.Array:
        """`w` (or anything shaped like it) rearranged to (G, weights per table)."""
        if self.axis is None:
            return w.reshape(1, -1)
        return jnp.moveaxis(w, self.axis, 0).reshape(self.num_groups, -1)

    def ungrouped(self, g: jax.Array) -> jax.Array:
        """The inverse of `grouped`: `(G, weights per table)` back to the weight's shape."""
        if self.axis is None:
            return g.reshape(self.shape)
        moved = (self.shape[self.axis],) + tuple(
            s for i, s in enumerate(self.shape) if i != self.axis
        )
        return jnp.moveaxis(g.reshape(moved), 0, self.axis)


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
    leaf = LeafPlan(path, spec, shape, axis, group_size)
    if spec.outliers and leaf.size > MAX_OUTLIER_LEAF_SIZE:
        raise ValueError(
            f"{caller}: leaf {path!r} has {leaf.size:,} weights; outliers are stored at "
            f"int32 positions, so a leaf with outliers holds at most {MAX_OUTLIER_LEAF_SIZE:,}. "
            "Fix: outliers=0.0 for it, or split the leaf."
        )
    k = spec.num_clusters
    if explicit and k > leaf.per_table:
        where = "" if axis is None else f" per {spec.granularity} table"
        raise ValueError(
            f"{caller}: leaf {path!r} (shape {shape}) has {leaf.per_table} elements{where}, "
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
    if leaf.size < MIN_WEIGHTS_PER_CENTROID * k:
        return (
            f"shape {leaf.shape}: {leaf.size} weights < {MIN_WEIGHTS_PER_CENTROID} x K = "
            f"{MIN_WEIGHTS_PER_CENTROID * k}"
        )
    table_bytes = math.prod(leaf.table_shape) * jnp.dtype(table_dtype(dtype)).itemsize
    # An outlier costs its int32 position and float16 value.
    packed = -(-leaf.size * leaf.spec.bits // 8) + table_bytes + 6 * leaf.num_outliers
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
