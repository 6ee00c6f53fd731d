"""Straight-through quantizers built on `straight_through`, and gradient injection.

Every quantizer here is `straight_through(forward_fn)` for some `forward_fn`: the forward
pass is the quantized value, the backward pass hands the upstream gradient to the latent
(float) weights unchanged, or masked (`binarize(..., clip=True)`). `inject_gradient` is
the other custom-gradient building block: identity forward, and a backward that returns
a gradient the caller supplies (decoupled training with synthetic gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from clusterjax._src.straight_through import straight_through

Axis = int | Sequence[int] | None


def _normalize_axis(axis: Axis) -> int | tuple[int, ...] | None:
    if axis is None or isinstance(axis, int):
        return axis
    return tuple(int(a) for a in axis)


def _sign_times_mean_abs(w: jax.Array, *, axis) -> jax.Array:
    keepdims = axis is not None
    scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(w), axis=axis, keepdims=keepdims))
    sign = jnp.where(w >= 0, 1, -1).astype(w.dtype)
    return (sign * scale.astype(w.dtype)).astype(w.dtype)


def binarize(w: ArrayLike, *, axis: Axis = None, clip: bool = False) -> jax.Array:
    """XNOR-Net weight binarization `sign(w) * mean(|w|)` with a straight-through gradient.

    Forward: `sign(w) * alpha`, where `alpha = mean(|w|)` is taken over `axis` (the whole
    tensor by default) and `sign(0) = +1`, so every output is exactly `+alpha` or
    `-alpha`. Backward: the identity. The scale is treated as a constant (it is
    `stop_gradient`-ed, so no `d alpha / d w` term appears). With `clip=True` the
    gradient is zeroed where `|w| > 1` (the "hard tanh" straight-through estimator of
    BinaryConnect / BNNs); the forward value is the same.

    For a Flax kernel of shape `(in, out)`, `axis=0` gives one scale per output channel
    (the XNOR-Net per-filter scale); for a convolution kernel `(h, w, in, out)` use
    `axis=(0, 1, 2)`.

    Args:
      w: the latent float weights.
      axis: the axes `mean(|w|)` is averaged over (`None`: all of them, one scale).
      clip: zero the gradient where `|w| > 1`.

    Returns:
      The binarized weights, with `w`'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> w = jnp.array([0.5, -1.5, 2.0, 0.0])
      >>> cj.quantizers.binarize(w)  # mean(|w|) = 1
      Array([ 1., -1.,  1.,  1.], dtype=float32)
      >>> jax.grad(lambda w: cj.quantizers.binarize(w).sum())(w)
      Array([1., 1., 1., 1.], dtype=float32)
      >>> jax.grad(lambda w: cj.quantizers.binarize(w, clip=True).sum())(w)
      Array([1., 0., 0., 1.], dtype=float32)
    """
    w = jnp.asarray(w)
    axis = _normalize_axis(axis)
    # With clip, entries with |w| > 1 enter as constants: same value, zero gradient.
    x = jnp.where(jnp.abs(w) <= 1, w, jax.lax.stop_gradient(w)) if clip else w
    return straight_through(functools.partial(_sign_times_mean_abs, axis=axis))(x)


_round_ste = straight_through(jnp.round)


def round_ste(x: ArrayLike) -> jax.Array:
    """`jnp.round` (half to even) with a straight-through (identity) gradient.

    Args:
      x: the values to round.

    Returns:
      `jnp.round(x)`, in `x`'s dtype; its gradient w.r.t. `x` is the identity.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> cj.quantizers.round_ste(jnp.array([0.3, 1.6]))
      Array([0., 2.], dtype=float32)
      >>> jax.grad(lambda x: cj.quantizers.round_ste(x).sum())(jnp.array([0.3, 1.6]))
      Array([1., 1.], dtype=float32)
    """
    return _round_ste(x)


def _fake_quantize(x: jax.Array, *, levels: int, axis) -> jax.Array:
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=axis is not None).astype(jnp.float32)
    scale = jnp.where(amax > 0, amax / levels, 1.0)  # an all-zero slice stays zero, no NaN
    q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -levels, levels)
    return (q * scale).astype(x.dtype)


def quantize_uniform(w: ArrayLike, bits: int, *, axis: Axis = None) -> jax.Array:
    """Symmetric uniform fake-quantization to `bits` bits, with a straight-through gradient.

    Forward: `round(w / s) * s`, clipped to `[-L, L] * s`, with `L = 2**(bits - 1) - 1`
    levels per sign and step `s = max(|w|) / L` over `axis` (`None`: one step for the
    whole tensor). An all-zero tensor (or slice) stays zero. Backward: the identity
    (the step is treated as a constant). The arithmetic is done in float32 and the
    result cast back to `w`'s dtype.

    Args:
      w: the latent float weights.
      bits: the bit width, an int >= 2 (2 bits = the ternary values `{-s, 0, s}`).
      axis: the axes `max(|w|)` is taken over (e.g. `axis=0` for one step per output
        channel of a Flax `(in, out)` kernel).

    Returns:
      The fake-quantized weights, with `w`'s shape and dtype.

    Raises:
      ValueError: if `bits` is not an int >= 2.

    Example:
      >>> import jax.numpy as jnp
      >>> import clusterjax as cj
      >>> cj.quantizers.quantize_uniform(jnp.array([0.1, -0.52, 1.0]), bits=2)
      Array([ 0., -1.,  1.], dtype=float32)
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(
            f"quantize_uniform(bits={bits!r}): bits must be an int >= 2 "
            "(for 1 bit use clusterjax.binarize)."
        )
    levels = 2 ** (bits - 1) - 1
    fq = functools.partial(_fake_quantize, levels=levels, axis=_normalize_axis(axis))
    return straight_through(fq)(jnp.asarray(w))


def inject_gradient(x: ArrayLike, grad: ArrayLike) -> jax.Array:
    """Returns `x`; in the backward pass `x` receives `grad` instead of the cotangent.

    The upstream cotangent arriving at the output is discarded and `grad` (cast to `x`'s
    dtype) is sent to `x` in its place; `grad` itself receives no gradient. This is the
    hook of decoupled training with synthetic gradients (Jaderberg et al., 2017): a
    layer's activation `h` is replaced by `inject_gradient(h, g_hat)`, where `g_hat` is
    the gradient a small model predicts for it, so the layer's parameters are updated
    from `g_hat` whatever happens downstream. With `grad = 0` it is a
    `stop_gradient`.

    Args:
      x: the value passed forward.
      grad: the gradient to send to `x`, of `x`'s shape.

    Returns:
      `x`, unchanged.

    Raises:
      ValueError: if `grad`'s shape differs from `x`'s.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> g = jnp.array([0.5, -2.0])
      >>> jax.grad(lambda x: (cj.quantizers.inject_gradient(x, g) ** 2).sum())(jnp.ones(2))
      Array([ 0.5, -2. ], dtype=float32)
    """
    x = jnp.asarray(x)
    grad = jnp.asarray(grad)
    if grad.shape != x.shape:
        raise ValueError(
            f"inject_gradient: grad must have the shape of x; got grad {grad.shape} "
            f"for x {x.shape}."
        )
    return _inject(x, jax.lax.stop_gradient(grad).astype(x.dtype))


@jax.custom_vjp
def _inject(x, grad):
    return x


def _inject_fwd(x, grad):
    return x, grad


def _inject_bwd(grad, _cotangent):
    return grad, jnp.zeros_like(grad)


_inject.defvjp(_inject_fwd, _inject_bwd)
