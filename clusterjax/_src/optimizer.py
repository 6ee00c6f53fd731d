"""`clusterjax.optimizer`: the optax transform of a clustered train step.

The transform works on the gradients of the float pair `(params, centroids)` and
receives the `ClusterState` as the extra argument `cluster_state=`. One `update` call

1. divides each centroid's gradient by its cluster size where the leaf's
   `gradient_aggregation` is "mean" (empty clusters get 0; sizes: `segments`);
2. runs the inner optax transform on `(param_grads, centroid_grads)`;
3. multiplies weight updates by the sparsity masks and zeroes the update of the fixed
   zero centroid, so pruned weights stay exactly zero even with momentum or weight decay;
   zeroes the centroid updates of `assignment="dkm"` leaves, whose centroids
   `cj.update_indices` re-estimates from the weights.

Its updates are plain float arrays shaped like `(params, centroids)`: transforms chained
before or after it may clip, scale, accumulate or skip them. Indices never travel through
updates: `cj.update_indices` re-assigns them after `optax.apply_updates`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from clusterjax._src import segments
from clusterjax._src.state import ClusterState, plan_leaves

PyTree = Any

_USAGE = (
    "tx.init((params, state.centroids)); updates, opt_state = tx.update(grads, opt_state, "
    "(params, state.centroids), cluster_state=state), with grads = jax.grad(loss_fn, "
    "argnums=(0, 1))(params, state.centroids)"
)


class ClusterOptimizerState(NamedTuple):
    """State of `clusterjax.optimizer`: the inner transform's state.

    Attributes:
      inner_state: the inner optax transform's state, over `(params, centroids)`.
    """

    inner_state: optax.OptState


def _pair(tree: Any, what: str, caller: str) -> tuple[PyTree, PyTree]:
    if isinstance(tree, (tuple, list)) and len(tree) == 2:
        if isinstance(tree[1], ClusterState):
            raise ValueError(
                f"{caller}: {what} is (params, ClusterState), but cj.optimizer trains the "
                "float pair (params, centroids); the ClusterState is the extra argument "
                f"cluster_state=. Fix: {_USAGE}."
            )
        return tree[0], tree[1]
    raise ValueError(
        f"{caller}: {what} must be the pair (params, centroids), got {type(tree).__name__}. "
        f"Fix: {_USAGE}."
    )


def _check_cluster_state(cluster_state: Any, caller: str) -> ClusterState:
    if cluster_state is None:
        raise ValueError(
            f"{caller} needs the ClusterState as the extra argument cluster_state= (it holds "
            f"the indices and masks the step was taken with). Fix: {_USAGE}."
        )
    if not isinstance(cluster_state, ClusterState):
        raise ValueError(
            f"{caller}: cluster_state must be the cj.ClusterState of the step, got "
            f"{type(cluster_state).__name__}."
        )
    return cluster_state


def _check_shape(caller: str, what: str, path: str, x: Any, shape: tuple[int, ...]) -> None:
    got = getattr(x, "shape", None)
    if got is None or tuple(got) != shape or not jnp.issubdtype(x.dtype, jnp.floating):
        desc = "None" if x is None else f"{getattr(x, 'dtype', type(x).__name__)} {got}"
        raise ValueError(
            f"{caller}: the {what} at {path!r} is {desc}; expected a float array of shape "
            f"{shape}. Fix: {_USAGE}."
        )


def _average(cs: ClusterState, g_params: PyTree, g_centroids: PyTree, caller: str):
    """Centroid gradients divided by cluster sizes where the aggregation is "mean"."""
    flat_gw = plan_leaves(cs, g_params, "the weight gradients", caller)
    flat_gc = plan_leaves(cs, g_centroids, "the centroid gradients", caller)
    flat_i = plan_leaves(cs, cs.indices, "state.indices", caller)
    if cs.outliers is None:
        flat_o = [None] * len(flat_i)
    else:
        flat_o = plan_leaves(cs, cs.outliers, "state.outliers", caller)
    out_w, out_c = [], []
    for lp, gw, gc, i, o in zip(cs.plan.leaves, flat_gw, flat_gc, flat_i, flat_o):
        if lp is not None:
            _check_shape(caller, "weight gradient", lp.path, gw, lp.shape)
            _check_shape(caller, "centroid gradient", lp.path, gc, lp.table_shape)
            if lp.spec.assignment == "dkm":
                # DKM re-estimates its centroids from the weights (cj.update_indices):
                # their gradient is zero and they are not trained.
                gc = jnp.zeros_like(gc)
            elif lp.spec.gradient_aggregation == "mean":
                # Outliers belong to no cluster: not counted in any size.
                counts, gw = segments.centroid_sizes(lp, gw, i, o if lp.num_outliers else None)
                if lp.cluster_dim > 1:  # one size per vector centroid
                    counts = counts[..., None]
                gc = jnp.where(counts > 0, gc / jnp.maximum(counts, 1.0).astype(gc.dtype), 0)
        out_w.append(gw)
        out_c.append(gc)
    treedef = jax.tree.structure(cs.indices, is_leaf=lambda x: x is None)
    return jax.tree.unflatten(treedef, out_w), jax.tree.unflatten(treedef, out_c)


def _mask(cs: ClusterState, u_params: PyTree, u_centroids: PyTree, caller: str):
    """Updates of pruned weights and of the fixed zero centroids set to exactly 0."""
    if not any(
        lp is not None and (lp.spec.preserve_sparsity or lp.spec.assignment == "dkm")
        for lp in cs.plan.leaves
    ):
        return u_params, u_centroids
    flat_up = plan_leaves(cs, u_params, "the weight updates", caller)
    flat_uc = plan_leaves(cs, u_centroids, "the centroid updates", caller)
    flat_m = plan_leaves(cs, cs.masks, "state.masks", caller)
    out_p, out_c = [], []
    for lp, up, uc, m in zip(cs.plan.leaves, flat_up, flat_uc, flat_m):
        if lp is not None and lp.spec.preserve_sparsity:
            up = jnp.where(m, up, jnp.zeros((), up.dtype))
            uc = uc.at[..., 0].set(0)
        if lp is not None and lp.spec.assignment == "dkm":
            uc = jnp.zeros_like(uc)  # no weight decay or momentum on re-estimated centroids
        out_p.append(up)
        out_c.append(uc)
    treedef = jax.tree.structure(cs.indices, is_leaf=lambda x: x is None)
    return jax.tree.unflatten(treedef, out_p), jax.tree.unflatten(treedef, out_c)


def optimizer(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps an optax transform for clustered training of the pair `(params, centroids)`.

    Args:
      inner: any optax transform (e.g. `optax.adamw(1e-3)`, a chain with clipping, an
        `optax.inject_hyperparams(...)`, a schedule). It sees the pair
        `(param_grads, centroid_grads)` after the centroid gradients were averaged by
        cluster size, and the extra keyword arguments other than `cluster_state`.

    Returns:
      A `GradientTransformationExtraArgs`. `init((params, centroids))` builds its state;
      `update(grads, opt_state, (params, centroids), cluster_state=state)` takes the
      gradients of `(params, centroids)` and returns float updates of the same pair.
      Apply them with `optax.apply_updates`, then re-assign the indices with
      `cj.update_indices`. Being an ordinary transform, it composes with every optax
      wrapper: `optax.chain` (before or after it), `optax.MultiSteps` and
      `optax.apply_if_finite` pass `cluster_state=` through to it. Under `MultiSteps` the
      averaged gradients are divided by the cluster sizes of the state given at the
      step that applies them.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(1))
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), cj.optimizer(optax.adam(1e-2)))
      >>> opt_state = tx.init((params, state.centroids))
      >>> def loss(params, centroids):
      ...     return jnp.sum(cj.apply(params, state._replace(centroids=centroids))["w"] ** 2)
      >>> grads = jax.grad(loss, argnums=(0, 1))(params, state.centroids)
      >>> updates, opt_state = tx.update(grads, opt_state, (params, state.centroids),
      ...                                cluster_state=state)
      >>> params, centroids = optax.apply_updates((params, state.centroids), updates)
      >>> state = cj.update_indices(params, state._replace(centroids=centroids))
      >>> bool(jnp.all(state.indices["w"] < 4))
      True
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        params, centroids = _pair(params, "the argument of init", "cj.optimizer.init")
        return ClusterOptimizerState(inner.init((params, centroids)))

    def update_fn(updates, state, params=None, *, cluster_state=None, **extra_args):
        caller = "cj.optimizer.update"
        cs = _check_cluster_state(cluster_state, caller)
        g_params, g_centroids = _pair(updates, "the gradients", caller)
        if params is not None:
            _pair(params, "the params argument", caller)
        g_params, g_centroids = _average(cs, g_params, g_centroids, caller)
        (u_params, u_centroids), inner_state = inner.update(
            (g_params, g_centroids), state.inner_state, params, **extra_args
        )
        u_params, u_centroids = _mask(cs, u_params, u_centroids, caller)
        return (u_params, u_centroids), ClusterOptimizerState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
