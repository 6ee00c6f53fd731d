"""Straight-through quantizers that are not clustering, built on `clusterjax.straight_through`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from clusterjax import quantizers
  >>> jax.grad(lambda w: quantizers.round_ste(w).sum())(jnp.array([0.2, 1.7]))
  Array([1., 1.], dtype=float32)
"""

from clusterjax._src.quantizers import binarize as binarize
from clusterjax._src.quantizers import inject_gradient as inject_gradient
from clusterjax._src.quantizers import quantize_uniform as quantize_uniform
from clusterjax._src.quantizers import round_ste as round_ste

__all__ = [
    "binarize",
    "inject_gradient",
    "quantize_uniform",
    "round_ste",
]
