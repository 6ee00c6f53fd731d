"""`clusterjax.optimizer`: the optax transform of a clustered train step.

The transform optimizes the pair `(params, state)`: the dense weights and the
`ClusterState` (whose centroids are trainable). One `update` call

1. divides each centroid's gradient by its cluster size where the leaf's
   `gradient_aggregation` is "mean" (`scale_by_cluster_size`; empty clusters get 0);
2. runs the inner optax transform on `(param_grads, centroid_grads)`;
3. multiplies weight updates by the sparsity masks and zeroes the update of the fixed
   zero centroid (`mask_sparse_updates`), so pruned weights stay exactly zero even with
   momentum or weight decay;
4. re-assigns every weight to its nearest centroid, using the updated weights and
   centroids, and returns the change of the indices as their update (modulo the index
   dtype), so that `optax.apply_updates((params, state), updates)` lands on the new
   indices. Leaves with `update_indices=False` get a zero update.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clusterjax._src import core
from clusterjax._src.core import ClusterState

PyTree = Any


class ClusterOptimizerState(NamedTuple):
    """State of `clusterjax.optimizer`.

    Attributes:
      inner_state: the inner optax transform's state.
      counts: per leaf, the cluster sizes of a leaf with frozen indices
        (`update_indices=False`) and "mean" aggregation, cached so that a step does not
        recount them (a scatter over every weight); `None` for other leaves.
      counted: per leaf, the indices `counts` were counted from. A step whose indices
        differ (e.g. after `cj.update_indices(..., force=True)`) recounts.
    """

    inner_state: optax.OptState
    counts: Any = None
    counted: Any = None


def _split_pair(tree: Any, what: str, caller: str) -> tuple[PyTree, ClusterState]:
    if isinstance(tree, (tuple, list)) and len(tree) == 2 and isinstance(tree[1], ClusterState):
        return tree[0], tree[1]
    raise ValueError(
        f"{caller}: {what} must be the pair (params, state) with state a cj.ClusterState; "
        f"got {type(tree).__name__}. Fix: opt_state = tx.init((params, state)) and "
        "updates, opt_state = tx.update(grads, opt_state, (params, state))."
    )


def _centroid_grads(grads: Any, caller: str) -> tuple[PyTree, PyTree]:
    """(param_grads, centroid_grads) from grads of (params, state) or (params, centroids)."""
    if not (isinstance(grads, (tuple, list)) and len(grads) == 2):
        raise ValueError(
            f"{caller}: grads must be the pair (param_grads, state_grads), as returned by "
            "jax.grad(loss_fn, allow_int=True)((params, state)); got "
            f"{type(grads).__name__}."
        )
    g_params, g_state = grads
    if isinstance(g_state, ClusterState):
        return g_params, g_state.centroids
    return g_params, g_state


def _counts(leaf, indices: jax.Array) -> jax.Array:
    """Cluster sizes, shaped like the leaf's centroid table."""
    size = leaf.num_groups * leaf.spec.num_clusters
    return core.cluster_sizes(indices, leaf.base(), size).reshape(leaf.table_shape)


def _same_float_array(g, shape) -> bool:
    """Whether `g` is a floating array of `shape` (a weight gradient to count with)."""
    dtype = getattr(g, "dtype", None)
    return (
        dtype is not None
        and jnp.issubdtype(dtype, jnp.floating)
        and tuple(jnp.shape(g)) == tuple(shape)
    )


def _cached(leaf) -> bool:
    """Whether the optimizer caches this leaf's cluster sizes (frozen indices, "mean")."""
    return (
        leaf is not None
        and not leaf.spec.update_indices
        and leaf.spec.gradient_aggregation == "mean"
    )


def _keep(counts, _indices):
    return counts


def _recount(leaf, _counts_before, indices):
    return _counts(leaf, indices)


def _init_counts(params, state):
    """(counts, counted) trees: cached cluster sizes of frozen "mean" leaves, else None."""
    counts, counted = [], []
    for _, leaf, _w, _c, i, _m in core._leaves(params, state, "cj.optimizer.init"):
        cache = _cached(leaf)
        counts.append(_counts(leaf, i) if cache else None)
        counted.append(jnp.asarray(i) if cache else None)
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    return jax.tree.unflatten(treedef, counts), jax.tree.unflatten(treedef, counted)


def _scale_centroid_grads(params, state, g_params, g_centroids, cache):
    """(param grads, centroid grads, count cache) for the inner transform.

    Centroid grads are divided by the cluster sizes where the aggregation is "mean".
    Param grads are the same values; those whose sizes came from their own scatter are
    handed on after it (`core.after`). The count cache is refreshed for frozen leaves.
    """
    leaves = list(core._leaves(params, state, "cj.optimizer"))
    flat_gw = core.flatten_like(params, g_params, "param grads")
    flat_g = core.flatten_like(params, g_centroids, "centroid grads")
    if cache is None:
        flat_counts = flat_counted = [None] * len(leaves)
    else:
        flat_counts = core.flatten_like(params, cache[0], "cached counts")
        flat_counted = core.flatten_like(params, cache[1], "cached indices")
    out, new_counts, new_counted, gw_out = [], [], [], []
    for (_, leaf, _w, _c, i, m), gw, g, cached, counted in zip(
        leaves, flat_gw, flat_g, flat_counts, flat_counted
    ):
        gw_out.append(gw)
        if cached is not None:
            # Recount only if the indices changed since they were counted.
            i = jnp.asarray(i)
            same = jnp.array_equal(i, counted)
            cached = jax.lax.cond(same, _keep, functools.partial(_recount, leaf), cached, i)
            counted = i
        new_counts.append(cached)
        new_counted.append(counted)
        if leaf is None or g is None or leaf.spec.gradient_aggregation != "mean":
            out.append(g)
            continue
        if cached is not None:
            counts = cached
        elif core.sizes_from_gradients(leaf, m) and _same_float_array(gw, leaf.shape):
            # The scatter apply's backward pass ran for this leaf's centroid gradient:
            # XLA merges the two, and the sizes come for free (core.cluster_sums_and_sizes).
            size = leaf.num_groups * leaf.spec.num_clusters
            _, counts = core.cluster_sums_and_sizes(gw, i, leaf.base(), size)
            counts = counts.reshape(leaf.table_shape)
            gw_out[-1] = core.after(gw, counts)
        else:
            counts = _counts(leaf, i)
        out.append(jnp.where(counts > 0, g / jnp.maximum(counts, 1.0).astype(g.dtype), 0))
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    new_cache = None
    if cache is not None:
        new_cache = (
            jax.tree.unflatten(treedef, new_counts),
            jax.tree.unflatten(treedef, new_counted),
        )
    return jax.tree.unflatten(treedef, gw_out), jax.tree.unflatten(treedef, out), new_cache


def _mask_updates(params, state, u_params, u_centroids):
    leaves = list(core._leaves(params, state, "cj.optimizer"))
    flat_up = core.flatten_like(params, u_params, "param updates")
    flat_uc = core.flatten_like(params, u_centroids, "centroid updates")
    new_up, new_uc = [], []
    for (_, leaf, _w, _c, _i, m), up, uc in zip(leaves, flat_up, flat_uc):
        if leaf is not None and m is not None:
            up = jnp.where(m, up, jnp.zeros((), up.dtype))
            if uc is not None:
                uc = uc.at[..., 0].set(0)
        new_up.append(up)
        new_uc.append(uc)
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    return jax.tree.unflatten(treedef, new_up), jax.tree.unflatten(treedef, new_uc)


def _index_updates(params, state, u_params, u_centroids):
    """Updates for (indices, masks): new - old indices (mod the dtype), zero masks."""
    new_params = optax.apply_updates(params, u_params)
    new_centroids = optax.apply_updates(state.centroids, u_centroids)
    new_state = core.update_indices(new_params, state._replace(centroids=new_centroids))
    d_indices = jax.tree.map(
        # Frozen leaves: update_indices returned the very same array; their update is 0.
        lambda new, old: jnp.zeros_like(old) if new is old else (new - old).astype(old.dtype),
        new_state.indices,
        state.indices,
    )
    d_masks = jax.tree.map(jnp.zeros_like, state.masks)
    return d_indices, d_masks


def optimizer(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps an optax transform for clustered training of `(params, state)`.

    Args:
      inner: any optax transform (e.g. `optax.adam(1e-3)`, or a chain with clipping and
        a schedule). It sees the pair `(param_grads, centroid_grads)` after centroid
        gradients were averaged by cluster size, and its extra keyword arguments are
        forwarded.

    Returns:
      A `GradientTransformationExtraArgs` whose `init` takes `(params, state)` and whose
      `update(grads, opt_state, (params, state))` takes the gradients of
      `(params, state)` (`jax.grad(..., allow_int=True)`; a pair
      `(param_grads, centroid_grads)` works as well). The updates cover params,
      centroids and indices: `optax.apply_updates((params, state), updates)` applies
      the step and the nearest-centroid re-assignment at once.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(1))
      >>> tx = cj.optimizer(optax.adam(1e-2))
      >>> opt_state = tx.init((params, state))
      >>> loss = lambda p, s: jnp.sum(cj.apply(p, s)["w"] ** 2)
      >>> grads = jax.grad(loss, argnums=(0, 1), allow_int=True)(params, state)
      >>> updates, opt_state = tx.update(grads, opt_state, (params, state))
      >>> params, state = optax.apply_updates((params, state), updates)
      >>> state.indices["w"].dtype
      dtype('uint8')
    """

    inner = optax.with_extra_args_support(inner)

    def init_fn(trainable):
        params, state = _split_pair(trainable, "the argument of init", "cj.optimizer.init")
        counts, counted = _init_counts(params, state)
        return ClusterOptimizerState(inner.init((params, state.centroids)), counts, counted)

    def update_fn(grads, opt_state, trainable=None, **extra_args):
        if trainable is None:
            raise ValueError(
                "cj.optimizer.update needs the current (params, state) as its third "
                "argument: tx.update(grads, opt_state, (params, state))."
            )
        params, state = _split_pair(trainable, "the params argument", "cj.optimizer.update")
        g_params, g_centroids = _centroid_grads(grads, "cj.optimizer.update")
        cache = None
        if opt_state.counts is not None or opt_state.counted is not None:
            cache = (opt_state.counts, opt_state.counted)
        g_params, g_centroids, cache = _scale_centroid_grads(
            params, state, g_params, g_centroids, cache
        )
        (u_params, u_centroids), inner_state = inner.update(
            (g_params, g_centroids),
            opt_state.inner_state,
            (params, state.centroids),
            **extra_args,
        )
        u_params, u_centroids = _mask_updates(params, state, u_params, u_centroids)
        d_indices, d_masks = _index_updates(params, state, u_params, u_centroids)
        state_updates = ClusterState(u_centroids, d_indices, d_masks, state.specs)
        counts, counted = (None, None) if cache is None else cache
        return (u_params, state_updates), ClusterOptimizerState(inner_state, counts, counted)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
