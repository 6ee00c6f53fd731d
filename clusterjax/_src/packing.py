"""Packed export: bit-packed indices plus centroid tables (`PackedArray`, `pack`, `unpack`).

Bit layout (the same in memory and in the file, see BUILD.md "Packed file format"):
index `i` of a leaf (C order) occupies bits `[i * b, (i + 1) * b)` of a byte stream,
least significant bit first, where bit `j` of the stream is bit `j % 8` (LSB = 0) of
byte `j // 8`, and `b = ceil(log2 K)` (at least 1). The stream has `ceil(n * b / 8)`
bytes; unused high bits of the last byte are zero.

Eight consecutive indices always fill exactly `b` whole bytes, so both directions work on
`(groups, 8)` index blocks against `(groups, b)` byte blocks with a fixed, static list of
shifts: one vectorized pass, the same code for NumPy and for `jax.numpy` (so a
`PackedArray` can also be expanded inside `jax.jit`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clusterjax._src import core, lut, segments
from clusterjax._src.plan import LeafPlan
from clusterjax._src.spec import GRANULARITIES, ClusterSpec, index_bits
from clusterjax._src.state import ClusterState, LeafState, map_leaves

PyTree = Any
MAX_BITS = 32
_CHUNK = 1 << 22  # indices per NumPy block (a multiple of 8): bounds temporary memory


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}.")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}.")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of the packed stream of `count` indices at `bits` bits: `ceil(count*bits/8)`.

    Example:
      >>> from clusterjax._src.packing import packed_nbytes
      >>> packed_nbytes(1_000_000, 4), packed_nbytes(3, 5)
      (500000, 2)
    """
    return (count * bits + 7) // 8


def _unsigned_dtype(bits: int) -> np.dtype:
    """The smallest unsigned dtype holding `bits`-bit values (uint8 / uint16 / uint32)."""
    return np.dtype(np.uint8 if bits <= 8 else np.uint16 if bits <= 16 else np.uint32)


def _pack_block(xp, groups, bits: int):
    """`(G, 8)` uint32 values -> `(G, bits)` uint8 bytes (static shifts only)."""
    cols = []
    for c in range(bits):  # output byte c of every 8-value group: stream bits [8c, 8c + 8)
        byte = None
        for j in range(8):
            lo = j * bits  # value j occupies stream bits [lo, lo + bits)
            if lo >= 8 * (c + 1) or lo + bits <= 8 * c:
                continue
            v = groups[:, j]
            part = (v << (lo - 8 * c)) if lo >= 8 * c else (v >> (8 * c - lo))
            byte = part if byte is None else byte | part
        cols.append((byte & 0xFF).astype(xp.uint8))
    return xp.stack(cols, axis=1)


def _unpack_block(xp, data, bits: int, out_dtype):
    """`(G, bits)` uint8 bytes -> `(G, 8)` values (inverse of `_pack_block`)."""
    mask = xp.uint32((1 << bits) - 1)
    b32 = data.astype(xp.uint32)
    cols = []
    for j in range(8):
        lo = j * bits
        value = None
        for c in range(lo // 8, (lo + bits - 1) // 8 + 1):
            byte = b32[:, c]
            part = (byte << (8 * c - lo)) if 8 * c >= lo else (byte >> (lo - 8 * c))
            value = part if value is None else value | part
        cols.append((value & mask).astype(out_dtype))
    return xp.stack(cols, axis=1)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs integers in `[0, 2**bits)` into a little-endian bit stream of uint8.

    Value `i` (of the flattened input, C order) occupies stream bits
    `[i * bits, (i + 1) * bits)`, least significant bit first; stream bit `j` is bit
    `j % 8` of byte `j // 8`. The result has `ceil(n * bits / 8)` bytes, with the unused
    high bits of the last byte set to zero. Vectorized NumPy, in blocks of 4M values.

    Args:
      values: non-negative integers, any shape.
      bits: bits per value, 1 to 32.

    Returns:
      A 1-D uint8 array.

    Raises:
      ValueError: if a value is negative or does not fit in `bits` bits.

    Example:
      >>> import numpy as np
      >>> from clusterjax._src.packing import pack_bits, unpack_bits
      >>> stream = pack_bits(np.array([1, 2, 3]), 2)   # 01 10 11 -> 0b00111001
      >>> stream.tolist(), unpack_bits(stream, 2, 3).tolist()
      ([57], [1, 2, 3])
    """
    _check_bits(bits)
    flat = np.asarray(values).reshape(-1)
    n = flat.size
    if n and flat.dtype.kind not in "iub":
        raise ValueError(f"pack_bits: values must be integers, got dtype {flat.dtype}.")
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"pack_bits: values must lie in [0, {1 << bits}) for {bits} bits, got "
            f"[{int(flat.min())}, {int(flat.max())}]."
        )
    if bits == 8:
        return flat.astype(np.uint8)
    if bits == 16:
        return flat.astype("<u2").view(np.uint8)
    out = np.empty(((n + 7) // 8) * bits, np.uint8)
    for start in range(0, n, _CHUNK):
        block = flat[start : start + _CHUNK].astype(np.uint32)
        pad = -block.size % 8
        if pad:
            block = np.concatenate([block, np.zeros(pad, np.uint32)])
        packed = _pack_block(np, block.reshape(-1, 8), bits).reshape(-1)
        out[start // 8 * bits : start // 8 * bits + packed.size] = packed
    return out[: packed_nbytes(n, bits)]


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` values of a bit stream.

    Args:
      stream: uint8 bytes, at least `ceil(count * bits / 8)` of them.
      bits: bits per value, 1 to 32.
      count: how many values to decode.

    Returns:
      A 1-D array of the smallest unsigned dtype holding `bits` bits (uint8 for
      `bits <= 8`, uint16 for `<= 16`, else uint32): the dtype `ClusterState.indices`
      uses for the same K.

    Example:
      >>> import numpy as np
      >>> from clusterjax._src.packing import pack_bits, unpack_bits
      >>> unpack_bits(pack_bits(np.arange(17), 5), 5, 17)[-3:]
      array([14, 15, 16], dtype=uint8)
    """
    _check_bits(bits)
    stream = np.asarray(stream)
    if stream.dtype != np.uint8:
        raise ValueError(f"unpack_bits: the stream must be uint8, got {stream.dtype}.")
    stream = stream.reshape(-1)
    need = packed_nbytes(count, bits)
    if stream.size < need:
        raise ValueError(
            f"unpack_bits: {count} values of {bits} bits need {need} bytes, got {stream.size}."
        )
    dtype = _unsigned_dtype(bits)
    if bits == 8:
        return stream[:count].copy()
    if bits == 16:
        return stream[: 2 * count].view("<u2").astype(np.uint16)
    out = np.empty(count, dtype)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        lo = start // 8 * bits
        raw = stream[lo : lo + packed_nbytes(n, bits)]
        pad = -raw.size % bits
        if pad:
            raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
        values = _unpack_block(np, raw.reshape(-1, bits), bits, dtype)
        out[start : start + n] = values.reshape(-1)[:n]
    return out


def _unpack_bits_jnp(stream: jax.Array, bits: int, count: int) -> jax.Array:
    """`unpack_bits` in `jax.numpy` (static shapes; works under `jax.jit`), as int32."""
    groups = (count + 7) // 8
    stream = jnp.asarray(stream, jnp.uint8).reshape(-1)
    stream = jnp.pad(stream[: groups * bits], (0, groups * bits - min(stream.size, groups * bits)))
    values = _unpack_block(jnp, stream.reshape(groups, bits), bits, jnp.uint32)
    return values.reshape(-1)[:count].astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PackedArray:
    """A clustered weight stored as bit-packed indices plus centroid table(s).

    A JAX pytree: `packed`, `tables` and the optional `outlier_positions` /
    `outlier_values` are its children; everything else is static metadata. Build one with
    `clusterjax.pack` or `clusterjax.load(..., packed=True)`.

    Invariants (checked at construction from concrete arrays):
      * `shape` is the weight's shape and `size = prod(shape)`; `dtype` is the name of the
        weight's floating dtype ("float32", "bfloat16", ...).
      * `bits = ceil(log2(num_clusters))` (at least 1), at most 32.
      * `packed` is a 1-D uint8 array of `ceil(size * bits / 8)` bytes: the indices in C
        order, little-endian bit order (see `pack_bits`), every index `< num_clusters`.
      * `tables` is floating (float32 for bf16/f16/f32 weights, float64 for float64) with
        shape `(num_clusters,)` for `granularity="tensor"` and `(G, num_clusters)` for
        `"channel"` / `"group"`, `G = shape[channel_axis] // group_size`.
      * `channel_axis` is normalized (`0 <= channel_axis < ndim`) for "channel" / "group"
        and `None` for "tensor"; `group_size` divides `shape[channel_axis]` and is 1 for
        "channel" and "tensor".
      * `outlier_positions` and `outlier_values` are both `None` (no outliers) or both
        1-D of one length `m >= 1`: int32 flat (C-order) positions, strictly increasing
        in `[0, size)`, and their float16 values (finite). The index stored for an
        outlier is ignored.
      * Vector tables (`cluster_dim = d > 1`): `vector_axis` is normalized, divides the
        weight's size along it by d into the index shape (`LeafPlan.index_shape`, whose
        `ceil(log2 K)`-bit indices `packed` holds) and differs from `channel_axis`;
        `tables` have a trailing axis of d. `vector_axis` is `None` for d = 1.
      * Quantized tables (`lut_dtype` "int8" / "uint8"): `tables` has that dtype,
        `lut_scale` is float32 `(G,)` (finite, one per table), `lut_zero_point` uint8
        `(G,)` for uint8 and `None` for int8; the table values are
        `(tables - zero_point) * lut_scale` in float32 (`clusterjax._src.lut`).
      * Per-channel scales: `scales` is float16 `(C,)` (finite), `C = shape[scale_axis]`;
        `scale_axis` equals `channel_axis` where both are set. No outliers with scales
        or vectors.
      * `unpack()` equals `clusterjax.strip` of the weight bit for bit: element `e` at
        position `c` along `channel_axis` is `tables[c // group_size][index[e]]` (the
        vector's component for d > 1), times `scales[c']` for its channel `c'` along
        `scale_axis`, cast to `dtype`; the outliers are their values cast to `dtype`.
        The one rule is `clusterjax._src.core.decode`.

    Example:
      >>> import jax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
      >>> spec = cj.ClusterSpec(num_clusters=16, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> packed = cj.pack(params, state)["w"]
      >>> packed
      PackedArray(shape=(64, 64), dtype=float32, num_clusters=16, bits=4, granularity='tensor', nbytes=2112)
      >>> packed.nbytes   # 4096 weights x 4 bits + 16 float32 centroids
      2112
      >>> bool((packed.unpack() == cj.strip(params, state)["w"]).all())
      True
    """  # noqa: E501

    packed: Any
    tables: Any
    shape: tuple[int, ...]
    dtype: str
    num_clusters: int
    granularity: str = "tensor"
    channel_axis: int | None = None
    group_size: int = 1
    outlier_positions: Any = None
    outlier_values: Any = None
    cluster_dim: int = 1
    vector_axis: int | None = None
    lut_dtype: str | None = None
    scale_axis: int | None = None
    lut_scale: Any = None
    lut_zero_point: Any = None
    scales: Any = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        self._validate()

    def _validate(self) -> None:
        def fail(msg):
            raise ValueError(f"PackedArray(shape={self.shape}, dtype={self.dtype}): {msg}")

        k = self.num_clusters
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            fail(f"num_clusters must be an int >= 1, got {k!r}")
        if index_bits(k) > MAX_BITS:
            fail(f"num_clusters={k} needs more than {MAX_BITS} bits")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            fail("dtype must be floating")
        if self.granularity not in GRANULARITIES:
            fail(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "tensor":
            if self.channel_axis is not None or self.group_size != 1:
                fail("granularity='tensor' needs channel_axis=None and group_size=1")
        else:
            axis, gs = self.channel_axis, self.group_size
            if not isinstance(axis, int) or not 0 <= axis < len(self.shape):
                fail(f"channel_axis must be normalized to [0, {len(self.shape)}), got {axis!r}")
            if not isinstance(gs, int) or gs < 1 or self.shape[axis] % gs:
                fail(f"group_size={gs!r} must divide the {self.shape[axis]} channels")
            if self.granularity == "channel" and gs != 1:
                fail("granularity='channel' needs group_size=1")
        d, va = self.cluster_dim, self.vector_axis
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
            fail(f"cluster_dim must be an int >= 1, got {d!r}")
        if d == 1 and va is not None:
            fail("vector_axis must be None for cluster_dim=1")
        if d > 1:
            if not isinstance(va, int) or not 0 <= va < len(self.shape):
                fail(f"vector_axis must be normalized to [0, {len(self.shape)}), got {va!r}")
            if self.shape[va] % d:
                fail(f"cluster_dim={d} must divide the {self.shape[va]} weights along axis {va}")
            if va == self.channel_axis:
                fail("vector_axis must differ from channel_axis")
        sa = self.scale_axis
        if sa is not None:
            if not isinstance(sa, int) or not 0 <= sa < len(self.shape):
                fail(f"scale_axis must be normalized to [0, {len(self.shape)}), got {sa!r}")
            if self.channel_axis is not None and sa != self.channel_axis:
                fail("scale_axis must equal channel_axis")
        if self.lut_dtype not in (None, "int8", "uint8"):
            fail(f"lut_dtype must be None, 'int8' or 'uint8', got {self.lut_dtype!r}")
        lp = self.plan
        table_shape = lp.table_shape
        if tuple(np.shape(self.tables)) != table_shape:
            fail(f"tables have shape {tuple(np.shape(self.tables))}, expected {table_shape}")
        t_dtype = jnp.result_type(self.tables)
        if self.lut_dtype is None:
            if not jnp.issubdtype(t_dtype, jnp.floating):
                fail(f"tables must be floating, got {t_dtype}")
            if self.lut_scale is not None or self.lut_zero_point is not None:
                fail("lut_scale / lut_zero_point need a lut_dtype")
        else:
            if t_dtype != jnp.dtype(self.lut_dtype):
                fail(f"tables must be {self.lut_dtype} for lut_dtype={self.lut_dtype!r}")
            g = (lp.num_groups,)
            if np.shape(self.lut_scale) != g or jnp.result_type(self.lut_scale) != jnp.float32:
                fail(f"lut_scale must be float32 of shape {g}")
            if not isinstance(self.lut_scale, jax.core.Tracer) and not np.all(
                np.isfinite(np.asarray(self.lut_scale))
            ):
                fail("lut_scale must be finite")
            if self.lut_dtype == "uint8":
                zp = self.lut_zero_point
                if np.shape(zp) != g or jnp.result_type(zp) != jnp.uint8:
                    fail(f"lut_zero_point must be uint8 of shape {g} for uint8 tables")
            elif self.lut_zero_point is not None:
                fail("int8 tables are symmetric: lut_zero_point must be None")
        if (self.scales is None) != (sa is None):
            fail("scales and scale_axis must be given together")
        if sa is not None:
            if np.shape(self.scales) != lp.scale_shape or jnp.result_type(self.scales) != (
                jnp.float16
            ):
                fail(f"scales must be float16 of shape {lp.scale_shape}")
            if not isinstance(self.scales, jax.core.Tracer) and not np.all(
                np.isfinite(np.asarray(self.scales, np.float32))
            ):
                fail("scales must be finite")
        expected = (packed_nbytes(lp.num_indices, self.bits),)
        if tuple(np.shape(self.packed)) != expected or jnp.result_type(self.packed) != jnp.uint8:
            fail(
                f"packed must be uint8 of shape {expected}, got {jnp.result_type(self.packed)} "
                f"{tuple(np.shape(self.packed))}"
            )
        if self.outlier_positions is not None and (d > 1 or sa is not None):
            fail("outliers cannot be combined with vector tables or per-channel scales")
        pos, val = self.outlier_positions, self.outlier_values
        if (pos is None) != (val is None):
            fail("outlier_positions and outlier_values must be given together")
        if pos is not None:
            m = np.shape(pos)
            if (
                len(m) != 1
                or not 1 <= m[0] <= self.size
                or np.shape(val) != m
                or jnp.result_type(pos) != jnp.int32
                or jnp.result_type(val) != jnp.float16
            ):
                fail(
                    "outliers need int32 positions and float16 values of one length "
                    f"1..{self.size}, got {jnp.result_type(pos)} {np.shape(pos)} and "
                    f"{jnp.result_type(val)} {np.shape(val)}"
                )
            if not isinstance(pos, jax.core.Tracer):
                p = np.asarray(pos)
                if p[0] < 0 or p[-1] >= self.size or np.any(np.diff(p) <= 0):
                    fail(f"outlier positions must be strictly increasing in [0, {self.size})")
            if not isinstance(val, jax.core.Tracer) and not np.all(
                np.isfinite(np.asarray(val, np.float32))
            ):
                fail("outlier values must be finite")

    @property
    def plan(self) -> LeafPlan:
        """The `LeafPlan` of this layout (path `""`): the geometry `unpack` decodes with."""
        spec = ClusterSpec(
            num_clusters=self.num_clusters,
            granularity=self.granularity,
            channel_axis=next(
                (a for a in (self.channel_axis, self.scale_axis) if a is not None), -1
            ),
            group_size=self.group_size if self.granularity == "group" else None,
            cluster_dim=self.cluster_dim,
            vector_axis=-2 if self.vector_axis is None else self.vector_axis,
            lut_dtype=self.lut_dtype,
            per_channel_scale=self.scale_axis is not None,
        )
        return LeafPlan(
            "",
            spec,
            self.shape,
            self.channel_axis,
            self.group_size,
            self.vector_axis,
            self.scale_axis,
        )

    @property
    def bits(self) -> int:
        """Bits per index: `ceil(log2(num_clusters))`, at least 1."""
        return index_bits(self.num_clusters)

    @property
    def size(self) -> int:
        """Number of weights, `prod(shape)`."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        """Rank of the weight."""
        return len(self.shape)

    @property
    def num_outliers(self) -> int:
        """Number of outliers (0 without)."""
        return 0 if self.outlier_positions is None else int(np.shape(self.outlier_positions)[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the packed indices, the tables (with their lut scales and zero
        points), the per-channel scales and the outliers (what the file stores for it:
        6 bytes per outlier, its int32 position and float16 value); equal to
        `self.plan.stored_nbytes(self.dtype)`."""
        extra = sum(
            np.asarray(x).nbytes
            for x in (self.lut_scale, self.lut_zero_point, self.scales)
            if x is not None
        )
        return int(
            np.asarray(self.packed).nbytes
            + np.asarray(self.tables).nbytes
            + extra
            + 6 * self.num_outliers
        )

    def __repr__(self) -> str:
        return (
            f"PackedArray(shape={self.shape}, dtype={self.dtype}, "
            f"num_clusters={self.num_clusters}, bits={self.bits}, "
            f"granularity={self.granularity!r}"
            + (
                ""
                if self.granularity == "tensor"
                else f", channel_axis={self.channel_axis}, group_size={self.group_size}"
            )
            + (f", outliers={self.num_outliers}" if self.num_outliers else "")
            + (
                f", cluster_dim={self.cluster_dim}, vector_axis={self.vector_axis}"
                if self.cluster_dim > 1
                else ""
            )
            + (f", lut_dtype={self.lut_dtype!r}" if self.lut_dtype else "")
            + (f", scale_axis={self.scale_axis}" if self.scale_axis is not None else "")
            + f", nbytes={self.nbytes})"
        )

    def indices(self) -> np.ndarray:
        """The indices, shaped like `ClusterState.indices` (the weight's shape, with
        `vector_axis` divided by d for vector tables), in its dtype (NumPy).

        Example:
          >>> import jax
          >>> import clusterjax as cj
          >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
          >>> spec = cj.ClusterSpec(num_clusters=3, init="linear")
          >>> state = cj.init(params, spec, key=jax.random.key(1))
          >>> idx = cj.pack(params, state)["w"].indices()
          >>> idx.dtype, bool((idx == state.indices["w"]).all())
          (dtype('uint8'), True)
        """
        lp = self.plan
        flat = unpack_bits(np.asarray(self.packed), self.bits, lp.num_indices)
        return flat.reshape(lp.index_shape)

    def unpack(self) -> jax.Array:
        """The dense weight `tables[group][indices]` in `dtype`: equal to `strip`'s array.

        Pure `jax.numpy` with static shapes (one compiled function per leaf layout), so it
        also works inside `jax.jit`: keep the packed form on device and expand it in the
        forward pass.

        Example:
          >>> import jax
          >>> import clusterjax as cj
          >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 8), jax.numpy.bfloat16)}
          >>> spec = cj.ClusterSpec(num_clusters=4, init="linear")
          >>> state = cj.init(params, spec, key=jax.random.key(1))
          >>> p = cj.pack(params, state)["w"]
          >>> dense = jax.jit(lambda p: p.unpack())(p)
          >>> dense.dtype, bool((dense == cj.strip(params, state)["w"]).all())
          (dtype(bfloat16), True)
        """
        return _expand(
            self.packed,
            self.tables,
            self.outlier_positions,
            self.outlier_values,
            self.lut_scale,
            self.lut_zero_point,
            self.scales,
            lp=self.plan,
            dtype=self.dtype,
        )

    def dequantize(self) -> jax.Array:
        """Alias of `unpack()`, for code written against quantized-array types.

        Example:
          >>> import jax
          >>> import clusterjax as cj
          >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
          >>> spec = cj.ClusterSpec(num_clusters=2, init="linear")
          >>> state = cj.init(params, spec, key=jax.random.key(1))
          >>> cj.pack(params, state)["w"].dequantize().shape
          (8, 8)
        """
        return self.unpack()


@functools.partial(jax.jit, static_argnames=("lp", "dtype"))
def _expand(packed, tables, positions, values, lut_scale, lut_zero_point, scales, *, lp, dtype):
    idx = _unpack_bits_jnp(packed, lp.spec.bits, lp.num_indices).reshape(lp.index_shape)
    if lp.spec.lut_dtype is not None:
        tables = lut.dequantize(tables, lut_scale, lut_zero_point, num_groups=lp.num_groups)
    return core.decode(lp, tables, idx, jnp.dtype(dtype), scales, positions, values)


_META = (
    "shape", "dtype", "num_clusters", "granularity", "channel_axis", "group_size",
    "cluster_dim", "vector_axis", "lut_dtype", "scale_axis",
)  # fmt: skip
_CHILDREN = (
    "packed", "tables", "outlier_positions", "outlier_values", "lut_scale", "lut_zero_point",
    "scales",
)  # fmt: skip


def _flatten_with_keys(p: PackedArray):
    children = tuple((jax.tree_util.GetAttrKey(f), getattr(p, f)) for f in _CHILDREN)
    return children, tuple(getattr(p, f) for f in _META)


def _unflatten(meta, children) -> PackedArray:
    # Transformations rebuild nodes with tracers or placeholders as children: skip the
    # validation (the metadata was validated when the original was built).
    obj = object.__new__(PackedArray)
    for name, value in zip(_CHILDREN, children):
        object.__setattr__(obj, name, value)
    for name, value in zip(_META, meta):
        object.__setattr__(obj, name, value)
    return obj


def _flatten(p: PackedArray):
    return tuple(getattr(p, f) for f in _CHILDREN), tuple(getattr(p, f) for f in _META)


jax.tree_util.register_pytree_with_keys(PackedArray, _flatten_with_keys, _unflatten, _flatten)


def is_packed(x: Any) -> bool:
    """True for a `PackedArray` (use as `is_leaf` when walking a packed tree).

    Example:
      >>> import jax, numpy as np
      >>> from clusterjax._src.packing import PackedArray, is_packed
      >>> p = PackedArray(packed=np.zeros(1, np.uint8), tables=np.zeros(2, np.float32),
      ...                 shape=(3,), dtype="float32", num_clusters=2)
      >>> [type(x).__name__ for x in jax.tree.leaves({"w": p, "b": 1.0}, is_leaf=is_packed)]
      ['float', 'PackedArray']
    """
    return isinstance(x, PackedArray)


def pack(params: PyTree, state: ClusterState) -> PyTree:
    """Packs every clustered leaf into a `PackedArray`; other leaves stay as they are.

    Args:
      params: the dense params `state` was made for (any pytree: linen dicts, an nnx
        `State`, ...).
      state: their `ClusterState`.

    Returns:
      params' tree with a `PackedArray` at every clustered leaf and the other leaves
      unchanged. Save it with `clusterjax.save`; expand it with `clusterjax.unpack`
      (equal to `clusterjax.strip(params, state)` bit for bit).

    Raises:
      ValueError: naming the leaf, if the state does not fit the params, an index is
        `>= K`, or a centroid is NaN/Inf (such a model could be saved but not loaded).

    Example:
      >>> import jax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 8)), "b": jax.numpy.ones(8)}
      >>> spec = cj.ClusterSpec(num_clusters=4, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> packed = cj.pack(params, state)
      >>> packed["w"].bits, packed["w"].packed.nbytes, type(packed["b"]).__name__
      (2, 64, 'ArrayImpl')
    """

    def one(leaf: LeafState):
        return leaf.w if leaf.plan is None else _pack_leaf(leaf)

    return map_leaves(params, state, "cj.pack", one)


def _pack_leaf(leaf: LeafState) -> PackedArray:
    lp = leaf.plan
    spec = lp.spec
    k = spec.num_clusters
    idx = np.asarray(leaf.indices)
    float_tables = core.tables(leaf)
    tables = np.asarray(float_tables)
    if idx.dtype.kind not in "iu":
        raise ValueError(
            f"cj.pack: state.indices at {lp.path!r} has dtype {idx.dtype}; indices must be "
            "integers. Fix: re-run cj.init."
        )
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise ValueError(
            f"cj.pack: state.indices at {lp.path!r} holds values in "
            f"[{int(idx.min())}, {int(idx.max())}], outside [0, {k}) for num_clusters={k}."
        )
    if not np.all(np.isfinite(tables)):
        raise ValueError(
            f"cj.pack: state.centroids at {lp.path!r} holds NaN/Inf; a packed file must "
            "hold finite centroids. Fix: repair the centroids (or re-run cj.init)."
        )
    positions = values = None
    if leaf.outliers is not None:
        positions = np.asarray(leaf.outliers)
        if positions.dtype.kind not in "iu" or np.any((positions < 0) | (positions >= lp.size)):
            raise ValueError(
                f"cj.pack: state.outliers at {lp.path!r} must hold int32 positions in "
                f"[0, {lp.size}). Fix: re-run cj.init."
            )
        positions = positions.astype(np.int32)
        if np.any(np.diff(positions) <= 0):
            raise ValueError(
                f"cj.pack: state.outliers at {lp.path!r} must be strictly increasing (sorted, "
                "no repeats), as cj.init makes them. Fix: re-run cj.init."
            )
        flat_w = jnp.asarray(leaf.w).reshape(-1)
        values = np.asarray(segments.outlier_values(flat_w[positions]))
    lut_scale = lut_zero_point = None
    if spec.lut_dtype is not None:
        q, lut_scale, lut_zero_point = lut.quantize(float_tables, spec.lut_dtype, lp.num_groups)
        tables, lut_scale = np.asarray(q), np.asarray(lut_scale)
        lut_zero_point = None if lut_zero_point is None else np.asarray(lut_zero_point)
    scales = None if leaf.scales is None else np.asarray(leaf.scales)
    return PackedArray(
        packed=pack_bits(idx, spec.bits),
        tables=tables,
        shape=lp.shape,
        dtype=jnp.dtype(jnp.result_type(leaf.w)).name,
        num_clusters=k,
        granularity=spec.granularity,
        channel_axis=lp.axis,
        group_size=lp.group_size,
        outlier_positions=positions,
        outlier_values=values,
        cluster_dim=lp.cluster_dim,
        vector_axis=lp.vector_axis,
        lut_dtype=spec.lut_dtype,
        scale_axis=lp.scale_axis,
        lut_scale=lut_scale,
        lut_zero_point=lut_zero_point,
        scales=scales,
    )


def unpack(packed: PyTree) -> PyTree:
    """Expands every `PackedArray` of a packed tree into its dense array.

    Example:
      >>> import jax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 8))}
      >>> spec = cj.ClusterSpec(num_clusters=4, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> bool((cj.unpack(cj.pack(params, state))["w"] == cj.strip(params, state)["w"]).all())
      True
    """
    return jax.tree.map(lambda x: x.unpack() if is_packed(x) else x, packed, is_leaf=is_packed)
