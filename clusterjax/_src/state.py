"""`ClusterState` and the one walk over (params, state) that every consumer uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from clusterjax._src.plan import LeafPlan, Plan
from clusterjax._src.tree import flatten_like

PyTree = Any


class ClusterState(NamedTuple):
    """Everything clustering adds to a model, as a pytree of arrays.

    `centroids`, `indices`, `masks` and `outliers` have the structure of the params they
    were made for, with `None` at leaves that are not clustered. `plan` is static: it is
    part of the tree structure, not a leaf, so `jax.tree.leaves(state)` holds arrays
    only, a `ClusterState` is a valid `jax.jit` argument, and `flax.serialization` and
    orbax store the array fields (restore into a `ClusterState` from `cj.init` as the
    target).

    Attributes:
      centroids: centroid tables: `(K,)` per tensor, `(G, K)` per channel / group.
        Trainable (they get gradients through `clusterjax.apply`).
      indices: per-weight index into the weight's own table, shaped like the weight,
        in the smallest unsigned dtype that holds K (`uint8` for K <= 256).
      masks: `bool` arrays shaped like the weight where `preserve_sparsity` is on
        (`True` = kept, `False` = pruned), `None` elsewhere.
      plan: the `Plan` from `cj.init`: every clustered leaf's `ClusterSpec` and table
        geometry. Static.
      outliers: where a leaf's spec has `outliers > 0`: the sorted int32 flat (C-order)
        positions of its weights kept exactly, shape `(LeafPlan.num_outliers,)`; `None`
        elsewhere. Their values are read from params (see `clusterjax.apply`). The whole
        field may be `None` when no leaf has outliers. (It follows `plan` so that the
        positional form `ClusterState(centroids, indices, masks, plan)` stays valid.)
      scales: where a leaf's spec has `per_channel_scale`: the float16 scale of every
        channel, shape `LeafPlan.scale_shape`; `None` elsewhere (the whole field may be
        `None`). Fixed at `init`; the weight reads `scale[c] * table[index]`.

    With `cluster_dim = d > 1` the indices have `LeafPlan.index_shape` (the weight's
    shape with `vector_axis` divided by d) and the tables a trailing axis of d.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.zeros(4)}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=2), key=jax.random.key(0))
      >>> state.centroids["kernel"].shape, state.indices["kernel"].dtype, state.centroids["bias"]
      ((2,), dtype('uint8'), None)
      >>> [x.shape for x in jax.tree.leaves(state)]   # arrays only
      [(2,), (3, 4)]
    """

    centroids: PyTree
    indices: PyTree
    masks: PyTree
    plan: Plan | None = None
    outliers: PyTree = None
    scales: PyTree = None

    @property
    def specs(self) -> PyTree:
        """The `ClusterSpec` of every leaf (`None` where not clustered), shaped like params."""
        if self.plan is None:
            return None
        treedef = jax.tree.structure(self.indices, is_leaf=_is_none)
        return jax.tree.unflatten(
            treedef, [None if lp is None else lp.spec for lp in self.plan.leaves]
        )


def _is_none(x: Any) -> bool:
    return x is None


_ARRAY_FIELDS = ("centroids", "indices", "masks", "outliers", "scales")
_OPTIONAL_FIELDS = ("outliers", "scales")


def _flatten_with_keys(s: ClusterState):
    return tuple((jax.tree_util.GetAttrKey(f), getattr(s, f)) for f in _ARRAY_FIELDS), s.plan


def _flatten(s: ClusterState):
    return (s.centroids, s.indices, s.masks, s.outliers, s.scales), s.plan


def _unflatten(plan: Plan | None, children) -> ClusterState:
    centroids, indices, masks, outliers, scales = children
    return ClusterState(centroids, indices, masks, plan, outliers, scales)


jax.tree_util.register_pytree_with_keys(ClusterState, _flatten_with_keys, _unflatten, _flatten)

# flax.serialization walks NamedTuples field by field: the static plan contributes an
# empty dict and is restored from the target state.
serialization.register_serialization_state(Plan, lambda plan: {}, lambda target, state_dict: target)


class LeafState(NamedTuple):
    """One leaf of params with its plan and its part of the `ClusterState`.

    `plan`, `centroids`, `indices`, `mask`, `outliers` and `scales` are `None` for a leaf
    that is not clustered (`mask` for a clustered leaf without `preserve_sparsity`,
    `outliers` for one without outliers, `scales` without `per_channel_scale`).
    """

    plan: LeafPlan | None
    w: Any
    centroids: Any
    indices: Any
    mask: Any
    outliers: Any = None
    scales: Any = None


def leaves(params: PyTree, state: ClusterState, caller: str) -> list[LeafState]:
    """Every leaf of `params` with its plan and state, checked against each other.

    Raises:
      ValueError: naming the leaf and the fix, when `state` is not a `ClusterState` made
        for params of this structure and these shapes.
    """
    if not isinstance(state, ClusterState):
        raise ValueError(
            f"{caller}: expected a ClusterState, got {type(state).__name__}. Fix: state = "
            "cj.init(params, spec, key=key)."
        )
    plan = state.plan
    if not isinstance(plan, Plan):
        raise ValueError(
            f"{caller}: this ClusterState has no plan (plan={plan!r}). Build states with "
            "cj.init, and change them with state._replace(centroids=...) so the plan stays."
        )
    flat_w = jax.tree.leaves(params, is_leaf=_is_none)
    fields = [
        [None] * len(flat_w)
        if f in _OPTIONAL_FIELDS and getattr(state, f) is None
        else flatten_like(params, getattr(state, f), f"state.{f}")
        for f in _ARRAY_FIELDS
    ]
    if len(flat_w) != len(plan.leaves):
        raise ValueError(
            f"{caller}: params have {len(flat_w)} leaves but the ClusterState's plan has "
            f"{len(plan.leaves)} (e.g. {list(plan.paths[:4])}). Fix: call cj.init for these "
            "params."
        )
    out = []
    for lp, path, w, c, i, m, o, s in zip(plan.leaves, plan.paths, flat_w, *fields):
        if lp is None:
            if any(x is not None for x in (c, i, m, o, s)):
                raise ValueError(
                    f"{caller}: leaf {path!r} is not clustered in the state's plan, but the "
                    "state holds centroids/indices/masks/outliers/scales for it. Fix: build "
                    "the state with cj.init."
                )
            out.append(LeafState(None, w, None, None, None))
            continue
        _check_leaf(caller, lp, w, c, i, m, o)
        _check_scales(caller, lp, s)
        mask = m if lp.spec.preserve_sparsity else None
        out.append(LeafState(lp, w, c, i, mask, o if lp.num_outliers else None, s))
    return out


def _check_leaf(caller: str, lp: LeafPlan, w, c, i, m, o) -> None:
    path = lp.path
    if w is None or tuple(np.shape(w)) != lp.shape:
        got = None if w is None else tuple(np.shape(w))
        raise ValueError(
            f"{caller}: param {path!r} has shape {got}, but the ClusterState was made for "
            f"shape {lp.shape}. Fix: re-run cj.init for the current params."
        )
    if c is None or i is None:
        field = "centroids" if c is None else "indices"
        raise ValueError(
            f"{caller}: leaf {path!r} is clustered, but state.{field} has None there "
            "(centroids and indices must be set together). Fix: build the state with cj.init."
        )
    if tuple(np.shape(i)) != lp.index_shape:
        raise ValueError(
            f"{caller}: state.indices at {path!r} has shape {tuple(np.shape(i))} but the "
            f"plan expects {lp.index_shape} (param shape {lp.shape}, cluster_dim="
            f"{lp.cluster_dim}). Fix: re-run cj.init for the current params."
        )
    if tuple(np.shape(c)) != lp.table_shape:
        raise ValueError(
            f"{caller}: state.centroids at {path!r} has shape {tuple(np.shape(c))}, expected "
            f"{lp.table_shape} for {lp.spec.granularity!r} granularity with "
            f"K={lp.num_clusters}. Fix: re-run cj.init for the current params."
        )
    if lp.spec.preserve_sparsity and (m is None or tuple(np.shape(m)) != lp.shape):
        raise ValueError(
            f"{caller}: state.masks at {path!r} must be a bool array of shape {lp.shape} "
            "(preserve_sparsity=True). Fix: re-run cj.init."
        )
    m_out = lp.num_outliers
    if m_out and (
        o is None
        or tuple(np.shape(o)) != (m_out,)
        or not jnp.issubdtype(jnp.result_type(o), jnp.integer)
    ):
        got = None if o is None else f"{jnp.result_type(o)} {tuple(np.shape(o))}"
        raise ValueError(
            f"{caller}: state.outliers at {path!r} is {got}; the leaf's spec keeps "
            f"outliers={lp.spec.outliers} of its {lp.size} weights, so it must hold their "
            f"{m_out} int32 positions. Fix: re-run cj.init."
        )
    if not m_out and o is not None:
        raise ValueError(
            f"{caller}: state.outliers at {path!r} holds an array, but the leaf's spec keeps "
            "no outliers. Fix: re-run cj.init."
        )


def _check_scales(caller: str, lp: LeafPlan, s) -> None:
    want = lp.scale_shape
    if want is None and s is not None:
        raise ValueError(
            f"{caller}: state.scales at {lp.path!r} holds an array, but the leaf's spec has "
            "per_channel_scale=False. Fix: re-run cj.init."
        )
    if want is not None and (
        s is None or tuple(np.shape(s)) != want or jnp.result_type(s) != jnp.float16
    ):
        got = None if s is None else f"{jnp.result_type(s)} {tuple(np.shape(s))}"
        raise ValueError(
            f"{caller}: state.scales at {lp.path!r} is {got}; per_channel_scale=True needs "
            f"float16 scales of shape {want}. Fix: re-run cj.init."
        )


def map_leaves(
    params: PyTree, state: ClusterState, caller: str, fn: Callable[[LeafState], Any]
) -> PyTree:
    """`fn(leaf)` for every `LeafState`, as a tree with params' structure."""
    treedef = jax.tree.structure(params, is_leaf=_is_none)
    return jax.tree.unflatten(treedef, [fn(leaf) for leaf in leaves(params, state, caller)])


def plan_leaves(state: ClusterState, tree: PyTree, what: str, caller: str) -> list:
    """`tree` (shaped like the params of `state`) flattened to one entry per plan leaf.

    Used where only a tree shaped like params is at hand (e.g. gradients): matched to
    the plan by structure, or by path for trees of another container type.
    """
    if not isinstance(state, ClusterState) or not isinstance(state.plan, Plan):
        raise ValueError(
            f"{caller}: expected the ClusterState from cj.init, got {type(state).__name__}."
        )
    flat = flatten_like(state.indices, tree, what)
    if len(flat) != len(state.plan.leaves):
        raise ValueError(f"{caller}: {what} does not match the ClusterState's params.")
    return flat
