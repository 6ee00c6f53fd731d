"""The packed file format: `save`, `load`, `FormatError`. No pickle anywhere.

Layout (all integers little-endian; documented in BUILD.md, "Packed file format"):

    magic    8 bytes   b"CLUSTJAX"
    version  uint32    1
    hlen     uint64    length of the JSON header in bytes
    header   hlen bytes, UTF-8 JSON (see BUILD.md)
    data     the concatenated array bytes the header points into

Every field of the header is validated before a single array is built: types, dtypes
from an allow-list, shapes against byte counts, offsets against the data length, packed
index streams against K. Anything wrong raises `FormatError` naming the leaf.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import jax
import numpy as np

from clusterjax._src import core
from clusterjax._src.packing import PackedArray, _is_packed, pack, unpack_bits
from clusterjax._src.spec import GRANULARITIES, index_bits

MAGIC = b"CLUSTJAX"
VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_MAX_HEADER = 1 << 30
_DTYPES = {
    name: np.dtype(dt)
    for name, dt in [
        ("float64", np.float64), ("float32", np.float32), ("float16", np.float16),
        ("bfloat16", jax.numpy.bfloat16), ("int64", np.int64), ("int32", np.int32),
        ("int16", np.int16), ("int8", np.int8), ("uint64", np.uint64),
        ("uint32", np.uint32), ("uint16", np.uint16), ("uint8", np.uint8), ("bool", np.bool_),
    ]
}  # fmt: skip
_TABLE_DTYPES = ("float32", "float64")


class FormatError(ValueError):
    """A packed file is malformed: truncated, wrong magic or version, or inconsistent."""


def save(path: str | os.PathLike, packed_or_params: Any, state: core.ClusterState | None = None):
    """Writes a packed model to `path`.

    Args:
      path: the file to write.
      packed_or_params: a tree from `clusterjax.pack`, or dense params (then pass
        `state` too and they are packed first).
      state: the `ClusterState` of `packed_or_params` when those are dense params.

    Returns:
      The number of bytes written.

    Example:
      >>> import os, tempfile, jax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 64)), "b": jax.numpy.zeros(64)}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=16), key=jax.random.key(1))
      >>> path = os.path.join(tempfile.mkdtemp(), "model.cjx")
      >>> cj.save(path, params, state) < 256 * 64 * 4 // 6
      True
      >>> bool((cj.load(path)["w"] == cj.strip(params, state)["w"]).all())
      True
    """
    packed = pack(packed_or_params, state) if state is not None else packed_or_params
    flat, _ = jax.tree_util.tree_flatten_with_path(packed, is_leaf=_is_packed)
    leaves, chunks, offset = [], [], 0

    def add(arr: np.ndarray) -> tuple[int, int]:
        nonlocal offset
        raw = np.ascontiguousarray(arr).tobytes()
        chunks.append(raw)
        start = offset
        offset += len(raw)
        return start, len(raw)

    for keypath, leaf in flat:
        parts = _components(keypath)
        if isinstance(leaf, PackedArray):
            tables = np.asarray(leaf.tables)
            t_off, t_len = add(tables)
            i_off, i_len = add(np.asarray(leaf.packed, np.uint8))
            leaves.append({
                "path": parts, "kind": "clustered", "shape": list(leaf.shape),
                "dtype": leaf.dtype, "num_clusters": leaf.num_clusters, "bits": leaf.bits,
                "granularity": leaf.granularity, "channel_axis": leaf.channel_axis,
                "group_size": leaf.group_size, "table_dtype": str(tables.dtype),
                "table_shape": list(tables.shape), "table_offset": t_off,
                "table_nbytes": t_len, "indices_offset": i_off, "indices_nbytes": i_len,
            })  # fmt: skip
        else:
            arr = np.asarray(leaf)
            dtype = str(arr.dtype)
            if dtype not in _DTYPES:
                raise ValueError(
                    f"cj.save: leaf {'/'.join(parts)!r} has dtype {dtype}, which the format "
                    f"does not store; supported: {', '.join(_DTYPES)}."
                )
            off, length = add(arr)
            leaves.append({
                "path": parts, "kind": "dense", "shape": list(arr.shape), "dtype": dtype,
                "offset": off, "nbytes": length,
            })  # fmt: skip
    header = json.dumps(
        {"format": "clusterjax", "leaves": leaves, "data_nbytes": offset},
        separators=(",", ":"),
    ).encode()
    with open(path, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, VERSION, len(header)))
        f.write(header)
        for chunk in chunks:
            f.write(chunk)
    return _PREFIX.size + len(header) + offset


def _components(keypath) -> list[str]:
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        else:
            parts.append(str(getattr(key, "key", key)))
    if (
        len(parts) > 1
        and parts[-1] == "value"
        and isinstance(keypath[-1], jax.tree_util.GetAttrKey)
    ):
        parts.pop()
    return parts or ["_"]


def load(path: str | os.PathLike, *, packed: bool = False) -> dict:
    """Reads a file written by `clusterjax.save`.

    Args:
      path: the file.
      packed: return `PackedArray`s for clustered leaves instead of expanding them.

    Returns:
      Nested dicts keyed by the path components of the saved tree (the shape of Flax
      linen params). Dense leaves equal `clusterjax.strip` of the saved model bit for bit.

    Raises:
      FormatError: (a `ValueError`) for any malformed file; it never unpickles.

    Example:
      >>> import os, tempfile, jax
      >>> import clusterjax as cj
      >>> params = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (16, 16))}}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(1))
      >>> path = os.path.join(tempfile.mkdtemp(), "m.cjx")
      >>> _ = cj.save(path, params, state)
      >>> cj.load(path, packed=True)["layer"]["kernel"].num_clusters
      4
    """
    with open(path, "rb") as f:
        blob = f.read()
    return loads(blob, packed=packed)


def loads(blob: bytes, *, packed: bool = False) -> dict:
    """`load` from bytes in memory."""
    if len(blob) < _PREFIX.size:
        raise FormatError(f"not a clusterjax file: {len(blob)} bytes, shorter than the header")
    magic, version, hlen = _PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise FormatError(f"not a clusterjax file: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FormatError(
            f"unsupported clusterjax format version {version}; this version reads {VERSION}. "
            "Upgrade clusterjax to read newer files."
        )
    if hlen > min(_MAX_HEADER, len(blob) - _PREFIX.size):
        raise FormatError(
            f"truncated or corrupt file: header length {hlen} exceeds the "
            f"{len(blob) - _PREFIX.size} bytes after the prefix"
        )
    try:
        header = json.loads(blob[_PREFIX.size : _PREFIX.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FormatError(f"corrupt header: not valid JSON ({err})") from None
    data = memoryview(blob)[_PREFIX.size + hlen :]
    if not isinstance(header, dict) or header.get("format") != "clusterjax":
        raise FormatError("corrupt header: missing 'format': 'clusterjax'")
    data_nbytes = header.get("data_nbytes")
    if not _is_int(data_nbytes) or data_nbytes != len(data):
        raise FormatError(
            f"truncated or corrupt file: header says {data_nbytes!r} data bytes, "
            f"file has {len(data)}"
        )
    leaves = header.get("leaves")
    if not isinstance(leaves, list):
        raise FormatError("corrupt header: 'leaves' must be a list")
    out: dict = {}
    for entry in leaves:
        path, value = _read_leaf(entry, data, packed)
        _insert(out, path, value)
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_leaf(entry, data, packed):
    if not isinstance(entry, dict):
        raise FormatError("corrupt header: a leaf entry is not an object")
    path = entry.get("path")
    if not isinstance(path, list) or not path or not all(isinstance(p, str) and p for p in path):
        raise FormatError(f"corrupt header: bad leaf path {path!r}")
    name = "/".join(path)

    def fail(msg):
        raise FormatError(f"leaf {name!r}: {msg}")

    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(s) and 0 <= s < 2**40 for s in shape):
        fail(f"bad shape {shape!r}")
    if len(shape) > 32:
        fail(f"too many dimensions ({len(shape)})")
    size = math.prod(shape)
    dtype_name = entry.get("dtype")
    if dtype_name not in _DTYPES:
        fail(f"unsupported dtype {dtype_name!r}")
    dtype = _DTYPES[dtype_name]
    kind = entry.get("kind")

    def chunk(offset_key, nbytes_key, expected):
        off, n = entry.get(offset_key), entry.get(nbytes_key)
        if not (_is_int(off) and _is_int(n)) or off < 0 or n < 0:
            fail(f"bad {offset_key}/{nbytes_key} {off!r}/{n!r}")
        if n != expected:
            fail(f"{nbytes_key}={n} does not match the {expected} bytes its shape needs")
        if off + n > len(data):
            fail(f"data [{off}, {off + n}) lies beyond the {len(data)} data bytes (truncated?)")
        return bytes(data[off : off + n])

    if kind == "dense":
        raw = chunk("offset", "nbytes", size * dtype.itemsize)
        return path, np.frombuffer(raw, dtype).reshape(shape).copy()
    if kind != "clustered":
        fail(f"unknown kind {kind!r}")
    k = entry.get("num_clusters")
    if not _is_int(k) or not 1 <= k <= 2**31:
        fail(f"bad num_clusters {k!r}")
    bits = entry.get("bits")
    if bits != index_bits(k):
        fail(f"bits={bits!r} does not match num_clusters={k} (expected {index_bits(k)})")
    if dtype.kind != "f" and dtype_name != "bfloat16":
        fail(f"clustered leaves must be floating, got {dtype_name}")
    granularity = entry.get("granularity")
    if granularity not in GRANULARITIES:
        fail(f"unknown granularity {granularity!r}")
    axis, group_size = entry.get("channel_axis"), entry.get("group_size")
    if granularity == "tensor":
        table_shape = [k]
        axis, group_size = None, 1
    else:
        if not _is_int(axis) or not 0 <= axis < len(shape):
            fail(f"channel_axis {axis!r} out of range for shape {shape}")
        if not _is_int(group_size) or group_size < 1 or shape[axis] % group_size:
            fail(f"group_size {group_size!r} does not divide {shape[axis]} channels")
        table_shape = [shape[axis] // group_size, k]
    if entry.get("table_shape") != table_shape:
        fail(f"table_shape {entry.get('table_shape')!r}, expected {table_shape}")
    t_dtype = entry.get("table_dtype")
    if t_dtype not in _TABLE_DTYPES:
        fail(f"unsupported table dtype {t_dtype!r}")
    t_np = _DTYPES[t_dtype]
    tables = np.frombuffer(
        chunk("table_offset", "table_nbytes", math.prod(table_shape) * t_np.itemsize), t_np
    ).reshape(table_shape)
    stream = np.frombuffer(
        chunk("indices_offset", "indices_nbytes", -(-size * bits // 8)), np.uint8
    )
    indices = unpack_bits(stream, bits, size)
    if size and int(indices.max()) >= k:
        fail(f"index {int(indices.max())} out of range for num_clusters={k}")
    if not np.all(np.isfinite(tables)):
        fail("centroid table holds NaN/Inf")
    arr = PackedArray(
        packed=stream.copy(), tables=tables.copy(), shape=tuple(shape), dtype=dtype_name,
        num_clusters=k, granularity=granularity, channel_axis=axis, group_size=group_size,
    )  # fmt: skip
    return path, (arr if packed else np.asarray(arr.unpack()))


def _insert(tree: dict, path: list[str], value) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FormatError(f"corrupt header: {'/'.join(path)!r} lies below a leaf")
        node = child
    if path[-1] in node:
        raise FormatError(f"corrupt header: duplicate or conflicting path {'/'.join(path)!r}")
    node[path[-1]] = value
