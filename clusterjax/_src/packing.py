"""Packed export: bit-packed indices plus centroid tables (`PackedArray`, `pack`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clusterjax._src import core
from clusterjax._src.spec import index_bits


def pack_bits(indices: np.ndarray, bits: int) -> np.ndarray:
    """Packs non-negative integers `< 2**bits` into a little-endian bit stream (uint8).

    Index `i` occupies bits `[i * bits, (i + 1) * bits)` of the stream, least
    significant bit first; bit `j` of the stream is bit `j % 8` of byte `j // 8`.

    Example:
      >>> from clusterjax._src.packing import pack_bits, unpack_bits
      >>> import numpy as np
      >>> stream = pack_bits(np.array([1, 2, 3]), 2)
      >>> stream.tolist(), unpack_bits(stream, 2, 3).tolist()
      ([57], [1, 2, 3])
    """
    flat = np.asarray(indices).reshape(-1).astype(np.uint32)
    if bits == 8:
        return flat.astype(np.uint8)
    if bits == 16:
        return flat.astype("<u2").view(np.uint8)
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` integers of the stream (uint32)."""
    stream = np.asarray(stream, np.uint8).reshape(-1)
    if bits == 8:
        return stream[:count].astype(np.uint32)
    if bits == 16:
        return stream[: 2 * count].view("<u2").astype(np.uint32)
    planes = np.unpackbits(stream, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    return planes.astype(np.uint32) @ weights


@dataclasses.dataclass(frozen=True, eq=False)
class PackedArray:
    """A clustered weight stored as bit-packed indices and centroid tables.

    Invariants:
      * `packed` is a uint8 stream of `ceil(size * bits / 8)` bytes holding the
        `size = prod(shape)` indices in C order, `bits = ceil(log2 K)` each
        (little-endian bit order, see `pack_bits`), every index `< num_clusters`;
      * `tables` (the centroid dtype: float32, or float64 for float64 weights) has
        shape `(K,)` ("tensor") or `(G, K)` ("channel" /
        "group": `G = shape[channel_axis] // group_size`);
      * `unpack()` equals `clusterjax.strip` of the weight bit for bit.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=16), key=jax.random.key(1))
      >>> packed = cj.pack(params, state)["w"]
      >>> packed.nbytes   # 4096 weights x 4 bits + 16 float32 centroids
      2112
      >>> bool((packed.unpack() == cj.strip(params, state)["w"]).all())
      True
    """

    packed: np.ndarray
    tables: np.ndarray
    shape: tuple[int, ...]
    dtype: str
    num_clusters: int
    granularity: str = "tensor"
    channel_axis: int | None = None
    group_size: int = 1

    @property
    def bits(self) -> int:
        return index_bits(self.num_clusters)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed indices plus the tables."""
        return int(self.packed.nbytes + self.tables.nbytes)

    def indices(self) -> np.ndarray:
        """The per-weight indices, shaped like the weight (uint32)."""
        return unpack_bits(self.packed, self.bits, self.size).reshape(self.shape)

    def unpack(self) -> jax.Array:
        """The dense weight `tables[group][indices]` in the original dtype."""
        idx = jnp.asarray(self.indices().astype(np.int32))
        base = 0
        if self.granularity != "tensor":
            k = self.num_clusters
            groups = (np.arange(self.shape[self.channel_axis]) // self.group_size) * k
            view = [1] * len(self.shape)
            view[self.channel_axis] = self.shape[self.channel_axis]
            base = jnp.asarray(groups.reshape(view), jnp.int32)
        flat = jnp.asarray(self.tables).reshape(-1)
        return flat[base + idx].astype(jnp.dtype(self.dtype))


def _is_packed(x: Any) -> bool:
    return isinstance(x, PackedArray)


def pack(params: Any, state: core.ClusterState) -> Any:
    """Packs every clustered leaf into a `PackedArray`; other leaves stay as they are.

    Args:
      params: the dense params `state` was made for.
      state: their `ClusterState`.

    Returns:
      params' tree with `PackedArray`s at clustered leaves and NumPy arrays elsewhere.
      Save it with `clusterjax.save`; expand it with `clusterjax.unpack`.

    Example:
      >>> import jax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 8))}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(1))
      >>> cj.pack(params, state)["w"].bits
      2
    """
    treedef = jax.tree.structure(params, is_leaf=lambda x: x is None)
    out = []
    for _, leaf, w, c, i, _m in core._leaves(params, state, "cj.pack"):
        if leaf is None:
            out.append(None if w is None else np.asarray(w))
            continue
        spec = leaf.spec
        out.append(
            PackedArray(
                packed=pack_bits(np.asarray(i), spec.bits),
                tables=np.asarray(c),
                shape=tuple(int(s) for s in leaf.shape),
                dtype=str(jnp.dtype(jnp.result_type(w))),
                num_clusters=spec.num_clusters,
                granularity=spec.granularity,
                channel_axis=leaf.axis,
                group_size=leaf.group_size,
            )
        )
    return jax.tree.unflatten(treedef, out)


def unpack(packed: Any) -> Any:
    """Expands every `PackedArray` of a packed tree into its dense array.

    Example:
      >>> import jax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (32, 8))}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(1))
      >>> bool((cj.unpack(cj.pack(params, state))["w"] == cj.strip(params, state)["w"]).all())
      True
    """
    return jax.tree.map(lambda x: x.unpack() if _is_packed(x) else x, packed, is_leaf=_is_packed)
