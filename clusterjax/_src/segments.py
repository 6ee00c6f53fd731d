"""Per-cluster sums and sizes: the gather of the clustered forward pass and its scatters.

A clustered weight is `flat[base + index]` (`flat`: the leaf's tables, flattened; `base`:
`g * K` of each weight's table, see `LeafPlan.base`). Its transpose, the centroid
gradient, is a scatter-add of the upstream gradient by the same positions. With "mean"
aggregation the optimizer also needs the cluster sizes: a second scatter, of ones.

**One scatter for both.** XLA:CPU runs a scatter as a scalar loop over the weights, so a
train step should not pay for two. For leaves where `pairs_in_backward` holds, `apply`'s
backward pass scatters the pairs `(g, 1)` once (`sums_and_sizes`) and keeps the sums.
The optimizer needs the sizes of the same leaf and asks for the same `sums_and_sizes`
on the weight gradient it receives. With the straight-through estimator that gradient
*is* `g`, the very array the backward pass scattered, so inside one jitted train step the
two scatters are identical expressions and XLA's common-subexpression elimination keeps
one: the sizes cost no extra pass. Correctness never depends on the merge: the count
column does not depend on the values scattered, so when the arrays differ (a transform
before `cj.optimizer` clipped the gradient, a loss term on the raw weights, grad and
update in separate jits) the sizes are still exact and only the saving is lost.
`tests/test_optimizer.py::test_one_scatter_per_leaf` counts the scatters of a compiled
step and guards the merge.

**Vector tables** (`cluster_dim = d > 1`): the flattened tables are `(G * K, d)`, the
gather reads one row per index and the scatters add `(N, d)` gradient rows (pairs become
`(N, d + 1)` rows: the gradient vector and a 1), so a centroid's gradient is the sum of
its members' gradient vectors. Per-channel scales make the scattered values `g * scale`
(not `g`), so those leaves scatter plain values and count with `sizes`.

Other leaves (a sparsity mask makes the weight gradient `g * mask`, not `g`; "sum"
aggregation needs no sizes) scatter plain values and count with `sizes`.

**Outliers** (`ClusterSpec(outliers=...)`) belong to no cluster: every scatter takes
their flat positions as `drop` and sends them to the position just past the tables,
which a scatter drops, so they add to no centroid's sum or size. The forward gather
reads a centroid for them as for any weight; `apply` then writes their own values over
it (`take_with_outliers`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from clusterjax._src.plan import LeafPlan

# Pairs are scattered in chunks of this many weights: see `sums_and_sizes`.
_PAIR_CHUNK = 1 << 20


def pairs_in_backward(lp: LeafPlan) -> bool:
    """Whether `apply`'s backward pass scatters `(g, 1)` pairs for this leaf.

    True where the optimizer needs cluster sizes ("mean" aggregation) and the weight
    gradient equals the upstream gradient (no sparsity mask).
    """
    spec = lp.spec
    return (
        spec.gradient_aggregation == "mean"
        and not spec.preserve_sparsity
        and not spec.per_channel_scale
    )


def positions(indices: jax.Array, base, drop=None, size: int = 0) -> jax.Array:
    """(N, 1) positions of every weight's centroid in the flattened tables.

    The flat positions `drop` (outliers) get `size`, one past the tables: scatters drop it.
    """
    if drop is not None:
        pos = (base + jnp.asarray(indices).astype(jnp.int32)).reshape(-1)
        return pos.at[drop].set(size, mode="drop").reshape(-1, 1)
    if isinstance(base, int) and base == 0:
        # One table: the small unsigned indices as they are (no int32 copy of the leaf).
        return indices.reshape(-1, 1)
    return (base + indices.astype(jnp.int32)).reshape(-1, 1)


def _scatter_add_rows(updates: jax.Array, pos: jax.Array, size: int, into=None):
    """`out[pos[n]] += updates[n]`, out = `into` or zeros `(size,) + updates.shape[1:]`."""
    window = tuple(range(1, updates.ndim))
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=window, inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )
    if into is None:
        into = jnp.zeros((size,) + updates.shape[1:], updates.dtype)
    return jax.lax.scatter_add(
        into,
        pos,
        updates,
        dnums,
        # Out-of-range positions (impossible here) would be dropped, never clamped.
        mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
    )


def sizes(indices: jax.Array, base, size: int, drop=None) -> jax.Array:
    """Number of weights per centroid, `(size,)` float32 over the flattened tables.

    `drop`: flat positions of weights counted nowhere (outliers).
    """
    pos = positions(indices, base, drop, size)
    return _scatter_add_rows(jnp.ones((pos.shape[0],), jnp.float32), pos, size)


def sums(values: jax.Array, indices: jax.Array, base, size: int, drop=None) -> jax.Array:
    """Per-centroid sums of `values` (shaped like the weight), `(size,)`, without `drop`."""
    real = jnp.promote_types(values.dtype, jnp.float32)
    pos = positions(indices, base, drop, size)
    return _scatter_add_rows(_rows(values, indices).astype(real), pos, size)


def _rows(values: jax.Array, indices: jax.Array) -> jax.Array:
    """`values` as one row per index: `(N,)`, or `(N, d)` for vectors."""
    if values.ndim == indices.ndim + 1:
        return values.reshape(-1, values.shape[-1])
    return values.reshape(-1)


def sums_and_sizes(values: jax.Array, indices: jax.Array, base, size: int, drop=None):
    """Per-centroid sums of `values` and cluster sizes, from one scatter of `(v, 1)` pairs.

    `drop`: flat positions of weights that belong to no cluster (outliers).

    Above `_PAIR_CHUNK` weights the pairs are built and scattered chunk by chunk, each
    chunk only after the previous scatter (`after`), so one chunk-sized pair buffer
    serves the whole leaf instead of a pair array twice the gradient's size.
    """
    real = jnp.promote_types(values.dtype, jnp.float32)
    v = _rows(values, indices).astype(real)
    pos = positions(indices, base, drop, size)
    out = None
    chunk = _PAIR_CHUNK // (1 if v.ndim == 1 else v.shape[1])
    for start in range(0, pos.shape[0], chunk):
        part = v[start : start + chunk]
        part_pos = pos[start : start + chunk]
        if out is not None:
            part, part_pos = after((part, part_pos), out)
        if part.ndim == 1:
            pairs = jnp.stack([part, jnp.ones_like(part)], axis=1)
        else:
            pairs = jnp.concatenate([part, jnp.ones_like(part[:, :1])], axis=1)
        out = _scatter_add_rows(pairs, part_pos, size, out)
    if v.ndim == 1:
        return out[:, 0], out[:, 1]
    return out[:, :-1], out[:, -1]


def after(tree, done: jax.Array):
    """`tree` unchanged, but computed only once `done` (a scatter's output) exists.

    Adds `done[0] != done[0]` (always False: sums and sizes are never NaN for finite
    gradients, and a NaN would only add a NaN where the gradient already is one) to
    every leaf. XLA cannot fold it away, so consumers of the result are scheduled after
    the scatter that made `done`. `jax.lax.optimization_barrier` does not give this
    order on XLA:CPU (it is removed before scheduling).
    """
    first = done.reshape(-1)[0]
    never = first != first
    return jax.tree.map(lambda x: x + never.astype(x.dtype), tree)


def take(flat: jax.Array, indices: jax.Array, base) -> jax.Array:
    """`flat[base + indices]`: the gather of the clustered forward pass (rows of a
    `(G * K, d)` vector table give `indices.shape + (d,)`)."""
    if flat.ndim == 2:
        return flat[jnp.asarray(base + indices.astype(jnp.int32))]
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
def take_summing_pairs(flat: jax.Array, indices: jax.Array, base) -> jax.Array:
    """`take` whose transpose scatters `(g, 1)` pairs (`sums_and_sizes`, see the module)."""
    return take(flat, indices, base)


def _take_summing_pairs_fwd(flat, indices, base):
    # The table is the residual (it gives the size and dtype); it is tiny.
    return take(flat, indices, base), (flat, indices, base)


def _take_summing_pairs_bwd(residuals, g):
    flat, indices, base = residuals
    s, _ = sums_and_sizes(g, indices, base, flat.shape[0])
    return s.reshape(flat.shape).astype(flat.dtype), None, None


take_summing_pairs.defvjp(_take_summing_pairs_fwd, _take_summing_pairs_bwd)


def centroid_sizes(
    lp: LeafPlan, weight_grad: jax.Array, indices: jax.Array, outliers=None
) -> jax.Array:
    """Cluster sizes (`lp.sizes_shape`), for the optimizer's "mean" aggregation.

    Returns `(sizes, weight_grad)`: where `pairs_in_backward(lp)`, the sizes come from the
    same pair scatter as the backward pass (merged by XLA, see the module docstring), and
    the weight gradient is handed back to be used only after that scatter, so an inner
    optimizer can update its moments in place in the gradient's buffer.
    """
    size = lp.num_groups * lp.num_clusters
    if pairs_in_backward(lp):
        # The same expression as the backward pass's scatter (`lp.vectors` of the
        # gradient for vector tables), so that XLA keeps one.
        _, counts = sums_and_sizes(lp.vectors(weight_grad), indices, lp.base(), size, outliers)
        weight_grad = after(weight_grad, counts)
    else:
        counts = sizes(indices, lp.base(), size, outliers)
    return counts.reshape(lp.sizes_shape), weight_grad


def outlier_values(w: jax.Array) -> jax.Array:
    """Outliers' values as stored: float16, rounded to nearest, clipped to its range.

    `apply`, `strip` and the packed file all use these values, so a loaded file equals
    `strip` bit for bit (cast back to the leaf dtype).
    """
    big = float(jnp.finfo(jnp.float16).max)
    return jnp.clip(w.astype(jnp.float32), -big, big).astype(jnp.float16)


def put_outliers(dense: jax.Array, outliers: jax.Array, values: jax.Array) -> jax.Array:
    """`dense` with the flat positions `outliers` set to `values` (cast to its dtype)."""
    dense = jnp.asarray(dense)
    flat = dense.reshape(-1).at[outliers].set(values.astype(dense.dtype), mode="drop")
    return flat.reshape(dense.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def take_with_outliers(w, flat, indices, base, outliers, pairs):
    """The clustered weight with outliers: `flat[base + indices]`, and at the flat
    positions `outliers` the weight's own value (`outlier_values(w)`), in `w`'s dtype.

    Gradients: `w` gets the upstream gradient everywhere (straight-through for the
    clustered weights, the plain gradient for the outliers); `flat` gets the per-centroid
    sums of the upstream gradient over the clustered weights only (the `(g, 1)` pair
    scatter if `pairs`, see `sums_and_sizes`).
    """
    dense = take(flat, indices, base).astype(w.dtype)
    return put_outliers(dense, outliers, outlier_values(w.reshape(-1)[outliers]))


def _take_with_outliers_fwd(w, flat, indices, base, outliers, pairs):
    out = take_with_outliers(w, flat, indices, base, outliers, pairs)
    # w only for its dtype (XLA drops an unused residual); the table is tiny.
    return out, (w, flat, indices, base, outliers)


def _take_with_outliers_bwd(pairs, residuals, g):
    w, flat, indices, base, outliers = residuals
    size = flat.shape[0]
    if pairs:
        s, _ = sums_and_sizes(g, indices, base, size, outliers)
    else:
        s = sums(g, indices, base, size, outliers)
    return g.astype(w.dtype), s.astype(flat.dtype), None, None, None


take_with_outliers.defvjp(_take_with_outliers_fwd, _take_with_outliers_bwd)
