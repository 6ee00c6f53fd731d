"""Quantized centroid tables (`ClusterSpec(lut_dtype="int8" | "uint8")`).

Each table (one per tensor, channel or group) is quantized with its own scale:

- `"int8"`, symmetric: `scale = max|c| / 127`, `q = clip(round(c / scale), -127, 127)`,
  value `q * scale`.
- `"uint8"`, affine over the table's range widened to hold 0 (so that a zero centroid,
  e.g. the fixed one of `preserve_sparsity`, stays exactly 0):
  `lo = min(min c, 0)`, `hi = max(max c, 0)`, `scale = (hi - lo) / 255`,
  `zero_point = clip(round(-lo / scale), 0, 255)`, `q = clip(round(c / scale) + zero_point,
  0, 255)`, value `(q - zero_point) * scale`.

A table of zeros gets scale 1. Scales are float32, values are computed in float32 (then
cast to the table dtype). `dequantize` is the one reconstruction: training's forward
pass (`fake_quantize`), `clusterjax.strip` and the packed file all go through it, so the
values agree bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clusterjax._src.straight_through import straight_through

_QMAX = {"int8": 127, "uint8": 255}
STORAGE = {"int8": jnp.int8, "uint8": jnp.uint8}


def quantize(tables: jax.Array, lut_dtype: str, num_groups: int):
    """`(q, scale, zero_point)` of `tables` (leading dim `num_groups` unless 1 table).

    Args:
      tables: a leaf's centroid tables (`LeafPlan.table_shape`), float.
      lut_dtype: `"int8"` or `"uint8"`.
      num_groups: G, the number of tables (each gets its own scale).

    Returns:
      `q` (int8 / uint8, shaped like `tables`), `scale` (float32, `(G,)`) and
      `zero_point` (uint8 `(G,)` for uint8, `None` for int8).

    Example:
      >>> import jax.numpy as jnp
      >>> from clusterjax._src.lut import quantize, dequantize
      >>> q, s, z = quantize(jnp.array([-1.0, 0.5, 1.27]), "int8", 1)
      >>> q.tolist(), s.tolist(), z
      ([-100, 50, 127], [0.009999999776482582], None)
      >>> dequantize(q, s, z, num_groups=1).tolist()
      [-1.0, 0.5, 1.2699999809265137]
    """
    t = jnp.asarray(tables, jnp.float32).reshape(num_groups, -1)
    if lut_dtype == "int8":
        top = jnp.max(jnp.abs(t), axis=1)
        scale = jnp.where(top > 0, top / 127.0, 1.0).astype(jnp.float32)
        q = jnp.clip(jnp.round(t / scale[:, None]), -127, 127).astype(jnp.int8)
        return q.reshape(jnp.shape(tables)), scale, None
    if lut_dtype != "uint8":
        raise ValueError(f"lut_dtype must be 'int8' or 'uint8', got {lut_dtype!r}.")
    lo = jnp.minimum(jnp.min(t, axis=1), 0.0)
    hi = jnp.maximum(jnp.max(t, axis=1), 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(jnp.float32)
    zp = jnp.clip(jnp.round(-lo / scale), 0, 255)
    q = jnp.clip(jnp.round(t / scale[:, None]) + zp[:, None], 0, 255).astype(jnp.uint8)
    return q.reshape(jnp.shape(tables)), scale, zp.astype(jnp.uint8)


def dequantize(q: jax.Array, scale: jax.Array, zero_point, *, num_groups: int, dtype=None):
    """The table values `(q - zero_point) * scale` in float32 (or `dtype`), shaped like q.

    Example:
      >>> import jax.numpy as jnp
      >>> from clusterjax._src.lut import quantize, dequantize
      >>> q, s, z = quantize(jnp.array([[0.0, 2.55], [-1.0, 1.0]]), "uint8", 2)
      >>> q.tolist(), z.tolist()
      ([[0, 255], [0, 254]], [0, 127])
      >>> dequantize(q, s, z, num_groups=2).tolist()
      [[0.0, 2.5500001907348633], [-0.9960784912109375, 0.9960784912109375]]
    """
    qf = jnp.asarray(q).reshape(num_groups, -1).astype(jnp.float32)
    if zero_point is not None:
        qf = qf - jnp.asarray(zero_point).astype(jnp.float32)[:, None]
    out = (qf * jnp.asarray(scale, jnp.float32)[:, None]).reshape(jnp.shape(q))
    return out if dtype is None else out.astype(dtype)


def _round_trip(tables: jax.Array, lut_dtype: str, num_groups: int) -> jax.Array:
    q, s, z = quantize(tables, lut_dtype, num_groups)
    return dequantize(q, s, z, num_groups=num_groups, dtype=tables.dtype)


def fake_quantize(tables: jax.Array, lut_dtype: str, num_groups: int) -> jax.Array:
    """`tables` rounded to their quantized values, with a straight-through gradient.

    The forward pass gives exactly `dequantize(*quantize(tables))`; the gradient w.r.t.
    `tables` is the identity (cluster-preserving quantization-aware training: the float
    centroids keep learning, the model sees the deployed int8/uint8 table).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from clusterjax._src.lut import fake_quantize
      >>> t = jnp.array([0.3, -1.0, 0.71])
      >>> jax.grad(lambda t: jnp.sum(fake_quantize(t, "int8", 1) * 2.0))(t).tolist()
      [2.0, 2.0, 2.0]
    """
    return straight_through(lambda t: _round_trip(t, lut_dtype, num_groups))(tables)
