"""Straight-through quantizers built on `straight_through`, and gradient injection."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from clusterjax._src.straight_through import straight_through


def _sign_scaled(w: jax.Array, axis) -> jax.Array:
    scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=axis, keepdims=axis is not None))
    return (jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype) * scale).astype(w.dtype)


def binarize(
    w: jax.Array, *, axis: int | Sequence[int] | None = None, clip: bool = False
) -> jax.Array:
    """XNOR-Net weight binarization: `sign(w) * mean(|w|)` with a straight-through gradient.

    Forward: `sign(w) * alpha` with `alpha = mean(|w|)` over `axis` (the whole tensor by
    default; e.g. `axis=0` for one scale per output column of a Flax kernel) and
    `sign(0) = +1`. Backward: the identity (the scale is treated as a constant), or with
    `clip=True` the identity where `|w| <= 1` and zero elsewhere.

    Args:
      w: the weights.
      axis: axes the scale is averaged over (`None`: all).
      clip: zero the gradient where `|w| > 1` (the "hard tanh" straight-through).

    Returns:
      The binarized weights, in `w`'s dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> w = jnp.array([0.5, -1.5, 2.0, 0.0])
      >>> cj.binarize(w)
      Array([ 1., -1.,  1.,  1.], dtype=float32)
      >>> jax.grad(lambda w: cj.binarize(w, clip=True).sum())(w)
      Array([1., 0., 0., 1.], dtype=float32)
    """
    w = jnp.asarray(w)
    axis = tuple(axis) if isinstance(axis, Sequence) else axis
    # With clip, |w| > 1 enters as a constant: same forward value, zero gradient there.
    x = jnp.where(jnp.abs(w) <= 1, w, jax.lax.stop_gradient(w)) if clip else w
    return straight_through(functools.partial(_sign_scaled, axis=axis))(x)


def _round(x: jax.Array) -> jax.Array:
    return jnp.round(x)


round_ste = straight_through(_round)
round_ste.__doc__ = """`jnp.round` with a straight-through (identity) gradient.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import clusterjax as cj
  >>> jax.grad(lambda x: cj.round_ste(x).sum())(jnp.array([0.3, 1.6]))
  Array([1., 1.], dtype=float32)
"""


def quantize_uniform(w: jax.Array, bits: int, *, axis=None) -> jax.Array:
    """Symmetric uniform fake-quantization to `bits` bits, straight-through gradient.

    Values are scaled by `max(|w|) / (2**(bits-1) - 1)` (over `axis`, `None` = all),
    rounded, clipped and scaled back; the gradient w.r.t. `w` is the identity.

    Example:
      >>> import jax.numpy as jnp
      >>> import clusterjax as cj
      >>> cj.quantize_uniform(jnp.array([0.1, -0.52, 1.0]), bits=2)
      Array([ 0., -1.,  1.], dtype=float32)
    """
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"quantize_uniform(bits={bits!r}): bits must be an int >= 2.")
    levels = 2 ** (bits - 1) - 1

    def fq(x):
        amax = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None)
        scale = jnp.where(amax > 0, amax / levels, 1.0)
        return (jnp.clip(jnp.round(x / scale), -levels, levels) * scale).astype(x.dtype)

    return straight_through(fq)(jnp.asarray(w))


@jax.custom_vjp
def inject_gradient(x: jax.Array, grad: jax.Array) -> jax.Array:
    """Returns `x`; in the backward pass `x` receives `grad` instead of the cotangent.

    The upstream cotangent is dropped. This is the hook of decoupled training with
    synthetic gradients: a layer's output is passed through `inject_gradient` with the
    gradient a small model predicts for it. `grad` itself gets no gradient.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> g = jnp.array([0.5, -2.0])
      >>> jax.grad(lambda x: (cj.inject_gradient(x, g) ** 2).sum())(jnp.ones(2))
      Array([ 0.5, -2. ], dtype=float32)
    """
    return x


def _inject_fwd(x, grad):
    return x, grad


def _inject_bwd(grad, _cotangent):
    return grad, jnp.zeros_like(grad)


inject_gradient.defvjp(_inject_fwd, _inject_bwd)
