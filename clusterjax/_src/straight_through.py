"""`straight_through`: forward any function, pass the gradient of its first input through.

This is the one custom-gradient primitive the library is built on: the clustering
straight-through estimator (`clusterjax.apply`) and the quantizers in
`clusterjax.quantizers` are all `straight_through(forward_fn)` for some `forward_fn`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def straight_through(forward_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Wraps `forward_fn(x, *args)` so that its gradient w.r.t. `x` is the identity.

    The returned function computes exactly `forward_fn(x, *args)` in the forward pass. In
    the backward pass the upstream cotangent is handed to `x` unchanged (cast to `x`'s
    dtype): the straight-through estimator of Bengio et al. (2013). Gradients w.r.t. the
    remaining positional arguments `*args` are the ordinary gradients of `forward_fn`
    (integer arguments, such as indices, get none). The output must have `x`'s shape.

    Typical uses: a quantizer `forward_fn = lambda w: jnp.round(w)` whose true gradient
    is zero almost everywhere; or the clustering lookup
    `forward_fn = lambda w, centroids, indices: centroids[indices]`, for which `w`
    receives the straight-through gradient and `centroids` the per-cluster sum.

    Args:
      forward_fn: `forward_fn(x, *args) -> array` with the shape of `x`. Keyword
        arguments are not differentiated through: bind them with `functools.partial`.

    Returns:
      A function with the signature of `forward_fn`, differentiable with `jax.grad`,
      `jax.vjp` and `jax.jvp`-free transformations (it is a `jax.custom_vjp`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> round_ste = cj.straight_through(jnp.round)
      >>> jax.grad(lambda w: round_ste(w).sum())(jnp.array([0.2, 1.7]))
      Array([1., 1.], dtype=float32)
    """

    @functools.wraps(forward_fn)
    def wrapped(x, *args):
        x = jnp.asarray(x)
        return _ste(forward_fn, x, *args)

    return wrapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ste(forward_fn, x, *args):
    return forward_fn(x, *args)


def _ste_fwd(forward_fn, x, *args):
    out = forward_fn(x, *args)
    # Only what the backward pass needs: x for its dtype/shape (a residual XLA can
    # drop if unused) and the remaining args to differentiate forward_fn w.r.t. them.
    return out, (x, args)


def _ste_bwd(forward_fn, residuals, g):
    x, args = residuals
    if g.shape != x.shape:
        raise ValueError(
            "straight_through: forward_fn must return an array with the shape of its first "
            f"input; got output shape {g.shape} for input shape {x.shape}."
        )
    dx = g.astype(x.dtype)
    if not args:
        return (dx,)
    diff = [_is_differentiable(a) for a in args]
    if not any(diff):
        return (dx, *(None for _ in args))

    def fn_of_float_args(*float_args):
        it = iter(float_args)
        full = [next(it) if d else a for a, d in zip(args, diff)]
        return forward_fn(x, *full)

    _, vjp = jax.vjp(fn_of_float_args, *(a for a, d in zip(args, diff) if d))
    d_float = iter(vjp(g))
    return (dx, *(next(d_float) if d else None for d in diff))


def _is_differentiable(a: Any) -> bool:
    leaves = jax.tree.leaves(a)
    return bool(leaves) and all(jnp.issubdtype(jnp.result_type(v), jnp.inexact) for v in leaves)


_ste.defvjp(_ste_fwd, _ste_bwd)
