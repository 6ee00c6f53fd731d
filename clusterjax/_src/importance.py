"""`fisher_importance`: per-weight importance (diagonal empirical Fisher) for `cj.init`.

Importance-weighted clustering (SqueezeLLM's sensitivity-based k-means, coremltools'
"sensitive k-means") minimizes `sum_i F_i (w_i - c(w_i))^2` instead of the plain squared
error, where `F_i` estimates how much the loss changes when weight `i` moves. The usual
estimate is the diagonal of the empirical Fisher information: the average over examples
of the *per-example* squared gradient, `F_i = E_x[(d loss(x) / d w_i)^2]`. (The squared
gradient of a whole batch is a different, much noisier quantity: per-example gradients
of opposite sign cancel in it.)

Per-example gradients are computed with `jax.vmap(jax.grad(...))` over the examples of
a chunk, squared and accumulated in float32 in one jitted function (one compilation per
batch shape): a `lax.scan` over the chunks of a batch, whose carry (the running sums,
donated, so updated in place) is the only model-sized array besides one chunk's
gradients. The chunk size defaults to what fits in `_CHUNK_BYTES` of gradients, so a
large model (SmolLM2-135M: 425 MB of gradients per example) is processed one example
at a time and a small one a whole batch at once. For a language model an "example" is
a sequence and its loss the mean over the sequence's tokens (SqueezeLLM's choice): the
squared gradient of a sequence, not of a token.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clusterjax._src.plan import resolve
from clusterjax._src.spec import ClusterSpec
from clusterjax._src.tree import leaves_with_paths

PyTree = Any
# Default memory budget for one chunk of per-example gradients (float32).
_CHUNK_BYTES = 1 << 28
Select = None | str | ClusterSpec | Mapping[str, ClusterSpec | None] | Callable[[str, Any], Any]


def _selected(params: PyTree, select: Select) -> list[bool]:
    """Which leaves of `params` get an importance (in flatten order)."""
    flat = leaves_with_paths(params)

    def floating(w):
        return w is not None and jnp.issubdtype(jnp.result_type(w), jnp.floating)

    if select is None:
        return [floating(w) for _, w in flat]
    if isinstance(select, str):
        try:
            rx = re.compile(select)
        except re.error as err:
            raise ValueError(
                f"cj.fisher_importance: select={select!r} is not a valid regex: {err}."
            ) from None
        out = [floating(w) and rx.fullmatch(path) is not None for path, w in flat]
        if not any(out):
            raise ValueError(
                f"cj.fisher_importance: select={select!r} matches no floating leaf "
                "(regexes are matched with re.fullmatch against paths such as "
                + ", ".join(repr(p) for p, _ in flat[:6])
                + ")."
            )
        return out
    if isinstance(select, (ClusterSpec, Mapping)):
        # The leaves `cj.init(params, select, ...)` would cluster (it warns, not this).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = resolve(params, select, caller="cj.fisher_importance")
        return [lp is not None for lp in plan.leaves]
    if callable(select):
        out = []
        for path, w in flat:
            choice = select(path, w)
            chosen = choice is not None and choice is not False
            if chosen and not floating(w):
                raise ValueError(
                    f"cj.fisher_importance: select chose leaf {path!r}, whose dtype "
                    f"{jnp.result_type(w)} is not floating; only floating leaves have "
                    "gradients."
                )
            out.append(chosen)
        return out
    raise ValueError(
        "cj.fisher_importance: select must be None, a regex string, a ClusterSpec, a "
        "mapping {regex: ClusterSpec | None} (the rules of cj.init) or a callable "
        f"(path, leaf) -> bool; got {type(select).__name__}."
    )


def _batch_size(batch: PyTree) -> int:
    sizes = {int(np.shape(a)[0]) if np.ndim(a) else None for a in jax.tree.leaves(batch)}
    if not sizes or None in sizes or len(sizes) != 1:
        shapes = [tuple(np.shape(a)) for a in jax.tree.leaves(batch)]
        raise ValueError(
            "cj.fisher_importance: every array of a batch needs the same leading "
            f"(example) axis; got shapes {shapes}. Pass `batches` as an iterable of "
            "batches, e.g. [(x0, y0), (x1, y1)], not a single (x, y) batch: wrap a "
            "single batch in a list."
        )
    return sizes.pop()


def fisher_importance(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    batches: Iterable[PyTree],
    *,
    select: Select = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> PyTree:
    """Diagonal empirical Fisher information of `params`: per-weight importance for `init`.

    For every example `x` of every batch, computes the gradient of the loss *of that
    example alone* w.r.t. the selected leaves (`jax.vmap` of `jax.grad` over the
    examples), squares it in float32 and accumulates. The result is the importance tree
    `cj.init(..., importance=...)` takes: weights whose change costs more loss get more
    say in where the centroids go (SqueezeLLM, coremltools' sensitive k-means).

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar` for a batch of examples, e.g. the mean
        cross-entropy. It is called on batches of one example (every array of `batch`
        with a leading axis of size 1), so its value there must be the per-example loss:
        a mean or a sum over the batch both qualify.
      params: the (trained) params, any pytree.
      batches: an iterable of batches, each a pytree of arrays (e.g. `(x, y)`) whose
        leading axis indexes the examples. A single batch must be wrapped in a list.
        Batches of a new shape (e.g. a shorter last batch) compile once more.
      select: which leaves to compute importance for; the others are `None` in the
        result (and `cj.init` treats `None` as uniform importance). `None` (default):
        every floating leaf. A regex string: leaves whose '/'-joined path it
        `re.fullmatch`-es. A `ClusterSpec` or a rules mapping: the leaves `cj.init` with
        the same argument selects. A callable `(path, leaf) -> bool`.
      reduction: `"mean"` (default) divides the sum over examples by their number (the
        Fisher estimate); `"sum"` keeps the sum.
      chunk_size: examples whose gradients are materialized at once (memory: about
        `chunk_size` x the selected params, in float32). `None` (default): as many as
        fit in 256 MiB, at least one (a whole batch for a small model).

    Returns:
      A pytree with params' structure: float32 arrays of non-negative importances, shaped
      like the selected leaves, and `None` elsewhere.

    Raises:
      ValueError: on an empty `batches`, batches without a common leading axis, an
        unknown `reduction`, a bad `chunk_size` or `select`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.zeros(3)}
      >>> def loss_fn(params, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ params["w"] + params["b"][None] - y) ** 2)
      >>> x = jax.random.normal(jax.random.key(1), (16, 4))
      >>> y = jax.random.normal(jax.random.key(2), (16, 3))
      >>> fisher = cj.fisher_importance(loss_fn, params, [(x[:8], y[:8]), (x[8:], y[8:])],
      ...                               select=r"w")
      >>> fisher["w"].shape, fisher["w"].dtype, fisher["b"]
      ((4, 3), dtype('float32'), None)
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=2, init="kmeans"),
      ...                 key=jax.random.key(3), importance=fisher)
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"cj.fisher_importance: unknown reduction={reduction!r}; allowed values are "
            "'mean', 'sum'."
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(
            f"cj.fisher_importance: chunk_size={chunk_size!r} must be an int >= 1 or None."
        )
    if (
        isinstance(batches, tuple)
        and batches
        and all(isinstance(b, (jax.Array, np.ndarray)) for b in batches)
    ):
        raise ValueError(
            "cj.fisher_importance: `batches` is a tuple of arrays, which looks like a "
            "single batch such as (x, y); it must be an iterable of batches: wrap a single "
            "batch in a list, [(x, y)]."
        )
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    flat = [w for _, w in leaves_with_paths(params)]
    chosen = _selected(params, select)
    positions = [i for i, c in enumerate(chosen) if c]
    if not positions:
        raise ValueError("cj.fisher_importance: select chose no leaf of params.")
    rest = [None if c else w for w, c in zip(flat, chosen)]
    sel = [jnp.asarray(flat[i]) for i in positions]

    def rebuild(sel_leaves, rest_leaves):
        leaves = list(rest_leaves)
        for i, w in zip(positions, sel_leaves):
            leaves[i] = w
        return jax.tree.unflatten(treedef, leaves)

    def one_example(sel_leaves, rest_leaves, example):
        single = jax.tree.map(lambda a: a[None], example)
        grads = jax.grad(lambda s: loss_fn(rebuild(s, rest_leaves), single))(sel_leaves)
        return [jnp.square(g.astype(jnp.float32)) for g in grads]

    # The running sums are donated: updated in place, not copied per batch.
    @functools.partial(jax.jit, donate_argnums=0)
    def accumulate(acc, sel_leaves, rest_leaves, batch, weight):
        # batch: (chunks, chunk, ...); weight: (chunks, chunk), 0 marks padding examples.
        def body(acc, item):
            chunk, wt = item
            sq = jax.vmap(one_example, in_axes=(None, None, 0))(sel_leaves, rest_leaves, chunk)
            keep = wt > 0
            return [
                a + jnp.sum(jnp.where(keep.reshape(keep.shape + (1,) * (s.ndim - 1)), s, 0), 0)
                for a, s in zip(acc, sq)
            ], None

        acc, _ = jax.lax.scan(body, acc, (batch, weight))
        return acc

    acc = [jnp.zeros(jnp.shape(w), jnp.float32) for w in sel]
    if chunk_size is None:
        per_example = 4 * sum(int(np.prod(jnp.shape(w))) for w in sel)
        chunk_size = max(1, _CHUNK_BYTES // max(per_example, 1))
    count = 0
    for batch in batches:
        n = _batch_size(batch)
        if n == 0:
            continue
        size = min(int(chunk_size), n)
        chunks = -(-n // size)
        pad = chunks * size - n

        def split(a, size=size, chunks=chunks, pad=pad):
            a = jnp.asarray(a)
            if pad:  # repeat the first example (masked out below; zeros could give NaN)
                a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad,) + a.shape[1:])])
            return a.reshape((chunks, size) + a.shape[1:])

        weight = (jnp.arange(chunks * size) < n).astype(jnp.float32).reshape(chunks, size)
        acc = accumulate(acc, sel, rest, jax.tree.map(split, batch), weight)
        count += n
    if count == 0:
        raise ValueError("cj.fisher_importance: batches held no example.")
    if reduction == "mean":
        acc = [a / jnp.float32(count) for a in acc]
    out = [None] * len(flat)
    for i, a in zip(positions, acc):
        out[i] = a
    return jax.tree.unflatten(treedef, out)


__all__ = ["fisher_importance"]
