"""The packed file format: `save`, `load`, `FormatError`. No pickle anywhere.

Layout, versions 1 to 3 (all integers little-endian; the full spec is in BUILD.md,
"Packed file format"):

    offset 0    magic    8 bytes   b"CLUSTJAX"
    offset 8    version  uint32    1; 2 with outliers; 3 with a table-format part
    offset 12   hlen     uint64    length of the header in bytes
    offset 20   header   hlen bytes: a UTF-8 JSON object, padded with spaces so that
                                   the data starts at a multiple of 8
    20 + hlen   data     the arrays, in header order, each at the next multiple of 8
                                   (zero padding in between); the file ends with the
                                   last array

The loader validates everything before it builds a single array: the prefix, the JSON
(an exact set of fields per leaf, with types), dtypes against an allow-list, shapes
against byte counts, every offset against the layout rule, padding bytes, tree paths,
decoded indices against K, finite centroid tables, outlier positions and values.
Anything wrong raises `FormatError` (a `ValueError`) naming the leaf and the problem.

**Optional parts.** Version 2 lets a clustered leaf carry optional *parts*: a key of the
leaf's entry whose value is an object with its own exact set of fields, describing
arrays stored after the leaf's indices, in the order of `_PARTS`: `"outliers"` (version 2:
sorted int32 flat positions, float16 values), and the table formats of version 3:
`"vectors"` (`cluster_dim`, `vector_axis`; no arrays), `"lut"` (an int8 / uint8 table
with a float32 scale, and a uint8 zero point for uint8, per table) and `"scales"`
(float16 per-channel scales along `axis`). A part is described once, in
`_PARTS` (the version that introduced it, its fields and arrays); a new part is a new
entry there and a new version number, so that older readers refuse such files ("upgrade
clusterjax") instead of silently ignoring the part. The writer writes the lowest version
that holds the tree: a file without parts is a version 1 file, byte for byte as before.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clusterjax._src import core
from clusterjax._src.atomic import atomic_write
from clusterjax._src.packing import MAX_BITS, PackedArray, is_packed, pack, packed_nbytes
from clusterjax._src.packing import unpack_bits as _unpack_bits
from clusterjax._src.spec import GRANULARITIES, index_bits
from clusterjax._src.tree import path_components

PyTree = Any
MAGIC = b"CLUSTJAX"
VERSION = 3  # the newest version this module reads and writes
ALIGN = 8
_PREFIX = struct.Struct("<8sIQ")
_MAX_HEADER = 1 << 30
_MAX_NDIM = 64
# dtype names a file may hold, little-endian (numpy's `dtype.name` spelling).
_DTYPES = {
    name: np.dtype(dt).newbyteorder("<")
    for name, dt in [
        ("float64", np.float64), ("float32", np.float32), ("float16", np.float16),
        ("bfloat16", jnp.bfloat16), ("int64", np.int64), ("int32", np.int32),
        ("int16", np.int16), ("int8", np.int8), ("uint64", np.uint64),
        ("uint32", np.uint32), ("uint16", np.uint16), ("uint8", np.uint8), ("bool", np.bool_),
    ]
}  # fmt: skip
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_TABLE_DTYPES = ("float32", "float64")
_TOP_FIELDS = {"format", "data_nbytes", "leaves"}
_DENSE_FIELDS = {"path", "kind", "shape", "dtype", "offset", "nbytes"}
_CLUSTERED_FIELDS = {
    "path", "kind", "shape", "dtype", "num_clusters", "bits", "granularity", "channel_axis",
    "group_size", "table_dtype", "table_shape", "table_offset", "table_nbytes",
    "indices_offset", "indices_nbytes",
}  # fmt: skip


class _Part(NamedTuple):
    """An optional part of a clustered leaf (see the module docstring).

    `arrays` are `(name, allowed dtypes)` in layout order; array `name` is described by the
    part's fields `{name}_dtype`, `{name}_offset` and `{name}_nbytes`, and holds `count`
    elements. `scalars` are further integer fields of the part; a part without arrays has
    no `count`.
    """

    version: int
    arrays: tuple[tuple[str, tuple[str, ...]], ...]
    scalars: tuple[str, ...] = ()

    def arrays_of(self, entry: dict) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The arrays this part has in `entry` (a uint8 lut also has zero points)."""
        if self is _PARTS.get("lut") and entry.get("table_dtype") != "uint8":
            return self.arrays[:1]
        return self.arrays

    def fields(self, entry: dict) -> set[str]:
        keys = set(self.scalars) | ({"count"} if self.arrays else set())
        for name, _ in self.arrays_of(entry):
            keys |= {f"{name}_dtype", f"{name}_offset", f"{name}_nbytes"}
        return keys


# Optional parts of a clustered leaf, in layout order.
_PARTS = {
    "outliers": _Part(version=2, arrays=(("positions", ("int32",)), ("values", ("float16",)))),
    # Vector tables: `cluster_dim` weights along `vector_axis` share one index.
    "vectors": _Part(version=3, arrays=(), scalars=("cluster_dim", "vector_axis")),
    # Quantized tables: one float32 scale per table (+ a uint8 zero point for uint8).
    "lut": _Part(version=3, arrays=(("scale", ("float32",)), ("zero_point", ("uint8",)))),
    # Per-channel float16 scales along `axis`.
    "scales": _Part(version=3, arrays=(("values", ("float16",)),), scalars=("axis",)),
}
_LUT_DTYPES = ("int8", "uint8")


class FormatError(ValueError):
    """A packed file is malformed: truncated, wrong magic or version, or inconsistent.

    Raised by `clusterjax.load` for every problem found in the file (never a bare
    `KeyError`/`TypeError`, never a half-built tree). The message names the leaf path and
    what is wrong. A subclass of `ValueError`, so `except ValueError` catches it too.

    Example:
      >>> import clusterjax as cj
      >>> from clusterjax._src.fileformat import loads
      >>> try:
      ...     loads(b"PK\\x03\\x04 this is a zip file")
      ... except cj.FormatError as err:
      ...     print(err)
      not a clusterjax file: magic b'PK\\x03\\x04 thi', expected b'CLUSTJAX'
    """


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _join(parts: list) -> str:
    return "/".join(str(p) for p in parts)


def _dense_array(name: str, leaf: Any) -> np.ndarray:
    arr = np.asarray(leaf)
    if arr.dtype.name not in _DTYPES:
        raise ValueError(
            f"cj.save: leaf {name!r} has dtype {arr.dtype}, which the format does not store; "
            f"supported: {', '.join(_DTYPES)}. Fix: cast it, or leave it out of the tree."
        )
    return np.asarray(arr, dtype=_DTYPES[arr.dtype.name], order="C")  # keeps 0-d


def _plan(packed: PyTree) -> tuple[int, bytes, list[tuple[int, np.ndarray]], int]:
    """Version, header bytes (padded), `(offset, array)` blobs and data length of a tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(packed, is_leaf=is_packed)
    entries, blobs, seen = [], [], {}
    end = 0
    version = 1

    def place(arr: np.ndarray) -> tuple[int, int]:
        nonlocal end
        offset = _align(end)
        blobs.append((offset, arr))
        end = offset + arr.nbytes
        return offset, arr.nbytes

    for keypath, leaf in flat:
        parts = path_components(keypath)
        name = _join(parts)
        if name in seen:
            raise ValueError(
                f"cj.save: two leaves have the same path {name!r} (keys {seen[name]} and "
                f"{jax.tree_util.keystr(keypath)}); the file keys leaves by path. Fix: give "
                "them distinct names."
            )
        seen[name] = jax.tree_util.keystr(keypath)
        if isinstance(leaf, PackedArray):
            tables = np.asarray(leaf.tables)
            if tables.dtype.name not in _TABLE_DTYPES + _LUT_DTYPES:
                raise ValueError(
                    f"cj.save: leaf {name!r} has centroid tables of dtype {tables.dtype}; "
                    f"the format stores {' or '.join(_TABLE_DTYPES)} tables."
                )
            tables = np.ascontiguousarray(tables, dtype=_DTYPES[tables.dtype.name])
            t_off, t_len = place(tables)
            i_off, i_len = place(np.ascontiguousarray(np.asarray(leaf.packed), np.uint8))
            entry = {
                "path": parts, "kind": "clustered", "shape": list(leaf.shape),
                "dtype": leaf.dtype, "num_clusters": int(leaf.num_clusters), "bits": leaf.bits,
                "granularity": leaf.granularity, "channel_axis": leaf.channel_axis,
                "group_size": int(leaf.group_size), "table_dtype": tables.dtype.name,
                "table_shape": list(tables.shape), "table_offset": t_off, "table_nbytes": t_len,
                "indices_offset": i_off, "indices_nbytes": i_len,
            }  # fmt: skip
            if leaf.outlier_positions is not None:
                arrays = {
                    "positions": np.asarray(leaf.outlier_positions, "<i4"),
                    "values": np.asarray(leaf.outlier_values, "<f2"),
                }
                part = {"count": int(arrays["positions"].shape[0])}
                for key, arr in arrays.items():
                    off, length = place(np.ascontiguousarray(arr))
                    part.update({f"{key}_dtype": np.dtype(arr.dtype).name,
                                 f"{key}_offset": off, f"{key}_nbytes": length})  # fmt: skip
                entry["outliers"] = part
                version = max(version, _PARTS["outliers"].version)
            parts: dict[str, Any] = {}
            if leaf.cluster_dim > 1:
                parts["vectors"] = (
                    {"cluster_dim": int(leaf.cluster_dim), "vector_axis": leaf.vector_axis},
                    {},
                )
            if leaf.lut_dtype is not None:
                arrays = {"scale": np.asarray(leaf.lut_scale, "<f4")}
                if leaf.lut_dtype == "uint8":
                    arrays["zero_point"] = np.asarray(leaf.lut_zero_point, np.uint8)
                parts["lut"] = ({}, arrays)
            if leaf.scale_axis is not None:
                parts["scales"] = (
                    {"axis": leaf.scale_axis},
                    {"values": np.asarray(leaf.scales, "<f2")},
                )
            for pname, (scalars, arrays) in parts.items():
                part = dict(scalars)
                if arrays:
                    part["count"] = int(next(iter(arrays.values())).shape[0])
                for key, arr in arrays.items():
                    off, length = place(np.ascontiguousarray(arr))
                    part.update({f"{key}_dtype": np.dtype(arr.dtype).name,
                                 f"{key}_offset": off, f"{key}_nbytes": length})  # fmt: skip
                entry[pname] = part
                version = max(version, _PARTS[pname].version)
            entries.append(entry)
        else:
            arr = _dense_array(name, leaf)
            off, length = place(arr)
            entries.append({
                "path": parts, "kind": "dense", "shape": list(arr.shape),
                "dtype": arr.dtype.name, "offset": off, "nbytes": length,
            })  # fmt: skip
    header = json.dumps(
        {"format": "clusterjax", "data_nbytes": end, "leaves": entries},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    header += b" " * (_align(_PREFIX.size + len(header)) - _PREFIX.size - len(header))
    return version, header, blobs, end


def save(
    path: str | os.PathLike,
    packed_or_params: PyTree,
    state: core.ClusterState | None = None,
) -> int:
    """Writes a packed model to `path` (atomically: a temporary file, then a rename).

    The file gets the permissions `open(path, "wb")` would give it: `0o666` minus the
    umask for a new file, the old permission bits for a replaced one (details:
    `clusterjax/_src/atomic.py`).

    Clustered leaves are stored bit-packed with their centroid tables (and their
    outliers, if any); every other array leaf is stored as it is (dtypes: float64/32/16,
    bfloat16, (u)int8-64, bool). `None` leaves are dropped. The format is described in
    BUILD.md, "Packed file format": a file with outliers is version 2, any other file
    version 1.

    Args:
      path: the file to write.
      packed_or_params: a tree from `clusterjax.pack`, or dense params (then pass
        `state` too and they are packed first).
      state: the `ClusterState` of `packed_or_params` when those are dense params.

    Returns:
      The number of bytes written (the file size).

    Raises:
      ValueError: for a leaf dtype the format cannot store, two leaves with the same
        path, or (from `clusterjax.pack`) a state that does not fit the params.

    Example:
      >>> import os, tempfile, jax
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 64)), "b": jax.numpy.zeros(64)}
      >>> spec = cj.ClusterSpec(num_clusters=16, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> path = os.path.join(tempfile.mkdtemp(), "model.cjx")
      >>> cj.save(path, params, state)   # 8192 B indices + 64 B table + 256 B bias + header
      8952
      >>> bool((cj.load(path)["w"] == cj.strip(params, state)["w"]).all())
      True
    """
    packed = pack(packed_or_params, state) if state is not None else packed_or_params
    version, header, blobs, data_nbytes = _plan(packed)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, version, len(header)))
        f.write(header)
        end = 0
        for offset, arr in blobs:
            f.write(b"\0" * (offset - end))
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            end = offset + arr.nbytes
    return _PREFIX.size + len(header) + data_nbytes


def file_size(packed: PyTree) -> int:
    """The exact size in bytes of the file `save` would write for a packed tree.

    Example:
      >>> import jax
      >>> import clusterjax as cj
      >>> from clusterjax._src.fileformat import file_size
      >>> params = {"w": jax.random.normal(jax.random.key(0), (256, 64))}
      >>> spec = cj.ClusterSpec(num_clusters=16, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> file_size(cj.pack(params, state))
      8608
    """
    _, header, _, data_nbytes = _plan(packed)
    return _PREFIX.size + len(header) + data_nbytes


def load(path: str | os.PathLike, *, packed: bool = False) -> PyTree:
    """Reads a file written by `clusterjax.save`. Never unpickles, never executes code.

    The tree comes back as nested dicts keyed by the saved path components, the shape of
    Flax linen params: string keys and attribute names as strings; integer dict keys and
    list/tuple positions as ints (lists come back as dicts `{0: ..., 1: ...}`). An nnx
    `State` comes back as the nested dict of its arrays (the `Variable` wrappers are not
    stored): restore a model with `nnx.update(model, nnx.State(loaded))`. A file holding
    one bare array returns that array.

    Args:
      path: the file.
      packed: return `PackedArray`s at clustered leaves instead of expanding them.

    Returns:
      Nested dicts of NumPy arrays. Clustered leaves equal `clusterjax.strip` of the
      saved model bit for bit (or are `PackedArray`s with `packed=True`); other leaves
      are the saved arrays.

    Raises:
      FormatError: (a `ValueError`) for any malformed file, naming the leaf and problem.
      OSError: if the file cannot be read.

    Example:
      >>> import os, tempfile, jax
      >>> import clusterjax as cj
      >>> params = {"layer": {"kernel": jax.random.normal(jax.random.key(0), (16, 16))}}
      >>> spec = cj.ClusterSpec(num_clusters=4, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> path = os.path.join(tempfile.mkdtemp(), "m.cjx")
      >>> _ = cj.save(path, params, state)
      >>> cj.load(path, packed=True)["layer"]["kernel"].num_clusters
      4
      >>> cj.load(path)["layer"]["kernel"].dtype
      dtype('float32')
    """
    with open(path, "rb") as f:
        blob = f.read()
    return loads(blob, packed=packed)


def loads(blob: bytes, *, packed: bool = False) -> PyTree:
    """`load` from bytes in memory.

    Example:
      >>> from clusterjax._src.fileformat import loads
      >>> loads(b"CLUSTJAX")
      Traceback (most recent call last):
      ...
      clusterjax._src.fileformat.FormatError: truncated file: 8 bytes, shorter than the 20-byte prefix
    """  # noqa: E501
    blob = bytes(blob)
    header = read_header(blob)
    start = _PREFIX.size + _PREFIX.unpack_from(blob, 0)[2]
    data = memoryview(blob)[start:]
    items = [_read_leaf(entry, data, packed) for entry in header["leaves"]]
    _check_padding(header["leaves"], data)
    if len(items) == 1 and items[0][0] == []:
        return items[0][1]
    out: dict = {}
    names: set[str] = set()
    for path, value in items:
        _insert(out, path, value, names)
    return out


def read_header(blob: bytes) -> dict:
    """Validates the prefix and the JSON header of a packed file's bytes; returns the header.

    Checks everything that does not need the array bytes: magic, version, lengths, the
    JSON structure and every leaf's fields, shapes and offsets (see `loads` for the rest).

    Example:
      >>> import os, tempfile, jax
      >>> import clusterjax as cj
      >>> from clusterjax._src.fileformat import read_header
      >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
      >>> spec = cj.ClusterSpec(num_clusters=4, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> path = os.path.join(tempfile.mkdtemp(), "m.cjx")
      >>> _ = cj.save(path, params, state)
      >>> entry = read_header(open(path, "rb").read())["leaves"][0]
      >>> entry["path"], entry["num_clusters"], entry["bits"], entry["indices_nbytes"]
      (['w'], 4, 2, 16)
    """
    if len(blob) < _PREFIX.size:
        if blob[: len(MAGIC)] != MAGIC[: len(blob)]:
            raise FormatError(f"not a clusterjax file: magic {bytes(blob[:8])!r}")
        raise FormatError(
            f"truncated file: {len(blob)} bytes, shorter than the {_PREFIX.size}-byte prefix"
        )
    magic, version, hlen = _PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise FormatError(f"not a clusterjax file: magic {magic!r}, expected {MAGIC!r}")
    if not 1 <= version <= VERSION:
        newer = " (written by a newer clusterjax: upgrade to read it)" if version > VERSION else ""
        raise FormatError(
            f"unsupported clusterjax format version {version}; this version reads "
            f"versions 1 to {VERSION}{newer}"
        )
    available = len(blob) - _PREFIX.size
    if hlen > available or hlen > _MAX_HEADER:
        raise FormatError(
            f"truncated or corrupt file: header length {hlen} exceeds the {available} bytes "
            "after the prefix"
        )
    if (_PREFIX.size + hlen) % ALIGN:
        raise FormatError(
            f"corrupt file: header length {hlen} does not end on an {ALIGN}-byte boundary"
        )
    try:
        header = json.loads(blob[_PREFIX.size : _PREFIX.size + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise FormatError(f"corrupt header: not valid UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise FormatError("corrupt header: not a JSON object")
    if set(header) != _TOP_FIELDS or header["format"] != "clusterjax":
        raise FormatError(
            f"corrupt header: fields {sorted(header)}, expected {sorted(_TOP_FIELDS)} with "
            "format 'clusterjax'"
        )
    data_nbytes = header["data_nbytes"]
    if not _is_int(data_nbytes) or data_nbytes != available - hlen:
        raise FormatError(
            f"truncated or corrupt file: header says {data_nbytes!r} data bytes, the file "
            f"has {available - hlen}"
        )
    leaves = header["leaves"]
    if not isinstance(leaves, list):
        raise FormatError("corrupt header: 'leaves' must be a list")
    end = 0
    for entry in leaves:
        end = _check_entry(entry, end, len(leaves), version)
    if end != data_nbytes:
        raise FormatError(
            f"corrupt file: the arrays end at data byte {end}, but there are {data_nbytes}"
        )
    skeleton: dict = {}
    names: set[str] = set()
    for entry in leaves:  # duplicate or conflicting paths, before any array is built
        if entry["path"]:  # (an empty path is a lone bare array)
            _insert(skeleton, entry["path"], None, names)
    return header


def file_version(blob: bytes) -> int:
    """The format version of a packed file's bytes (validated by `read_header` first).

    Example:
      >>> import os, tempfile, jax
      >>> import clusterjax as cj
      >>> from clusterjax._src.fileformat import file_version
      >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 64))}
      >>> path = os.path.join(tempfile.mkdtemp(), "m.cjx")
      >>> for outliers in (0.0, 0.01):
      ...     spec = cj.ClusterSpec(num_clusters=4, init="linear", outliers=outliers)
      ...     _ = cj.save(path, params, cj.init(params, spec, key=jax.random.key(1)))
      ...     print(file_version(open(path, "rb").read()))
      1
      2
    """
    read_header(blob)
    return _PREFIX.unpack_from(blob, 0)[1]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_component(p: Any) -> bool:
    """A path component: a non-empty string or an integer (int dict keys, list positions)."""
    return (isinstance(p, str) and p != "") or (_is_int(p) and -(2**63) <= p < 2**63)


def _entry_name(entry: Any) -> str:
    path = entry.get("path") if isinstance(entry, dict) else None
    if isinstance(path, list) and all(_is_component(p) for p in path):
        return _join(path)
    return "?"


def _check_entry(entry: Any, end: int, num_leaves: int, version: int = VERSION) -> int:
    """Validates one header entry; returns the data offset where its arrays end."""
    if not isinstance(entry, dict):
        raise FormatError("corrupt header: a leaf entry is not a JSON object")
    path = entry.get("path")
    if (
        not isinstance(path, list)
        or not all(_is_component(p) for p in path)
        or (not path and num_leaves != 1)
    ):
        raise FormatError(
            f"corrupt header: bad leaf path {path!r} (a list of non-empty strings and "
            "integers; empty only for a file holding one bare array)"
        )
    name = _join(path)

    def fail(msg: str):
        raise FormatError(f"leaf {name!r}: {msg}")

    kind = entry.get("kind")
    fields = {"dense": _DENSE_FIELDS, "clustered": _CLUSTERED_FIELDS}.get(
        kind if isinstance(kind, str) else None
    )
    if fields is None:
        fail(f"unknown kind {kind!r} (expected 'dense' or 'clustered')")
    parts = {}
    if kind == "clustered":
        parts = {p: _PARTS[p] for p in _PARTS if p in entry}
        for p, spec in parts.items():
            if spec.version > version:
                fail(f"part {p!r} needs format version {spec.version}, the file is {version}")
    if set(entry) != fields | set(parts):
        missing = sorted(fields - set(entry))
        extra = sorted(set(entry) - fields - set(parts))
        fail(f"header fields do not match a {kind} leaf (missing {missing}, unknown {extra})")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
        fail(f"bad shape {shape!r}")
    if not all(_is_int(s) and s >= 0 for s in shape):
        fail(f"bad shape {shape!r}: dimensions must be non-negative integers")
    size = math.prod(shape)
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        fail(f"unsupported dtype {dtype_name!r}; allowed: {', '.join(_DTYPES)}")

    def chunk(offset_key: str, nbytes_key: str, expected: int, end: int) -> int:
        off, n = entry[offset_key], entry[nbytes_key]
        if not (_is_int(off) and _is_int(n)):
            fail(f"{offset_key}/{nbytes_key} must be integers, got {off!r}/{n!r}")
        if n != expected:
            fail(f"{nbytes_key}={n} does not match the {expected} bytes its shape needs")
        if off != _align(end):
            fail(
                f"{offset_key}={off}, expected {_align(end)} (arrays are stored in header "
                f"order, each at the next multiple of {ALIGN})"
            )
        return off + n

    if kind == "dense":
        return chunk("offset", "nbytes", size * _DTYPES[dtype_name].itemsize, end)

    if dtype_name not in _FLOAT_DTYPES:
        fail(f"clustered leaves must be floating, got dtype {dtype_name}")
    k = entry["num_clusters"]
    if not _is_int(k) or not 1 <= k <= 2**MAX_BITS:
        fail(f"bad num_clusters {k!r}")
    bits = entry["bits"]
    if not _is_int(bits) or bits != index_bits(k):
        fail(f"bits={bits!r} does not match num_clusters={k} (expected {index_bits(k)})")
    granularity = entry["granularity"]
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        fail(f"unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    axis, group_size = entry["channel_axis"], entry["group_size"]
    if granularity == "tensor":
        if axis is not None or group_size != 1 or isinstance(group_size, bool):
            fail("a 'tensor' leaf needs channel_axis null and group_size 1")
        table_shape = [k]
    else:
        if not _is_int(axis) or not 0 <= axis < len(shape):
            fail(f"channel_axis {axis!r} out of range for shape {shape}")
        if (
            not _is_int(group_size)
            or group_size < 1
            or (granularity == "channel" and group_size != 1)
            or shape[axis] % group_size
        ):
            fail(f"group_size {group_size!r} is invalid for {shape[axis]} {granularity}s")
        table_shape = [shape[axis] // group_size, k]
    for pname in parts:
        part = entry[pname]
        fields = _PARTS[pname].fields(entry)
        if not isinstance(part, dict) or set(part) != fields:
            got = sorted(part) if isinstance(part, dict) else type(part).__name__
            fail(f"part {pname!r} must be an object with fields {sorted(fields)}, got {got}")
    n_idx = size
    if "vectors" in parts:
        d, va = entry["vectors"]["cluster_dim"], entry["vectors"]["vector_axis"]
        if not _is_int(d) or d < 2:
            fail(f"part 'vectors': cluster_dim {d!r} must be an integer >= 2")
        if not _is_int(va) or not 0 <= va < len(shape) or shape[va] % d or va == axis:
            fail(
                f"part 'vectors': vector_axis {va!r} must be an axis of shape {shape} "
                f"(not the channel axis) whose size cluster_dim={d} divides"
            )
        table_shape = table_shape + [d]
        n_idx = size // d
    if "outliers" in parts and ("vectors" in parts or "scales" in parts):
        fail("outliers cannot be combined with vector tables or per-channel scales")
    if entry["table_shape"] != table_shape or not all(_is_int(t) for t in table_shape):
        fail(f"table_shape {entry['table_shape']!r}, expected {table_shape}")
    t_dtype = entry["table_dtype"]
    allowed = _LUT_DTYPES if "lut" in parts else _TABLE_DTYPES
    if not isinstance(t_dtype, str) or t_dtype not in allowed:
        fail(f"unsupported table dtype {t_dtype!r}; allowed: {', '.join(allowed)}")
    t_bytes = math.prod(table_shape) * _DTYPES[t_dtype].itemsize
    end = chunk("table_offset", "table_nbytes", t_bytes, end)
    end = chunk("indices_offset", "indices_nbytes", packed_nbytes(n_idx, bits), end)
    counts = {"outliers": (1, size)}
    if "lut" in parts:
        g = 1 if granularity == "tensor" else table_shape[0]
        counts["lut"] = (g, g)
    if "scales" in parts:
        sa = entry["scales"]["axis"]
        if not _is_int(sa) or not 0 <= sa < len(shape) or (axis is not None and sa != axis):
            fail(
                f"part 'scales': axis {sa!r} must be an axis of shape {shape} (the channel "
                "axis of 'channel' / 'group' tables)"
            )
        counts["scales"] = (shape[sa], shape[sa])
    for pname in _PARTS:
        if pname in parts and _PARTS[pname].arrays:
            end = _check_part(pname, entry, counts[pname], size, end, fail)
    return end


def _check_part(name: str, entry: dict, counts: tuple, size: int, end: int, fail) -> int:
    """Validates the arrays of the optional part `name`; returns where they end."""
    spec = _PARTS[name]
    part = entry[name]
    count = part["count"]
    lo, hi = counts
    if not _is_int(count) or not lo <= count <= hi:
        want = f"in [{lo}, {hi}]" if lo != hi else f"{lo}"
        fail(f"part {name!r}: count {count!r} must be an integer {want}")
    if name == "outliers" and size > 2**31 - 1:
        fail(f"part 'outliers': int32 positions cannot address {size} weights")
    for array, allowed in spec.arrays_of(entry):
        dtype = part[f"{array}_dtype"]
        if not isinstance(dtype, str) or dtype not in allowed:
            fail(f"part {name!r}: {array}_dtype {dtype!r}, allowed: {', '.join(allowed)}")
        off, n = part[f"{array}_offset"], part[f"{array}_nbytes"]
        if not (_is_int(off) and _is_int(n)):
            fail(f"part {name!r}: {array}_offset/{array}_nbytes must be integers")
        expected = count * _DTYPES[dtype].itemsize
        if n != expected:
            fail(f"part {name!r}: {array}_nbytes={n} does not match {count} x {dtype}")
        if off != _align(end):
            fail(
                f"part {name!r}: {array}_offset={off}, expected {_align(end)} (arrays are "
                f"stored in header order, each at the next multiple of {ALIGN})"
            )
        end = off + n
    return end


def _arrays(entry: dict) -> list[tuple[str, int, int]]:
    """`(name, offset, nbytes)` of every array of a validated entry, in layout order."""
    if entry["kind"] == "dense":
        return [("offset", entry["offset"], entry["nbytes"])]
    out = [
        ("table_offset", entry["table_offset"], entry["table_nbytes"]),
        ("indices_offset", entry["indices_offset"], entry["indices_nbytes"]),
    ]
    for name, spec in _PARTS.items():
        if name in entry:
            part = entry[name]
            out += [
                (f"{name}/{a}_offset", part[f"{a}_offset"], part[f"{a}_nbytes"])
                for a, _ in spec.arrays_of(entry)
            ]
    return out


def _check_padding(entries: list, data: memoryview) -> None:
    end = 0
    for entry in entries:
        for key, offset, nbytes in _arrays(entry):
            gap = data[end:offset]
            if any(gap):
                raise FormatError(
                    f"leaf {_entry_name(entry)!r}: non-zero padding bytes before {key}"
                )
            end = offset + nbytes


def _read_leaf(entry: dict, data: memoryview, packed: bool) -> tuple[list, Any]:
    """Builds the array(s) of an entry that `read_header` validated."""
    path, shape, name = entry["path"], tuple(entry["shape"]), _entry_name(entry)
    if entry["kind"] == "dense":
        off, n = entry["offset"], entry["nbytes"]
        dtype = _DTYPES[entry["dtype"]]
        arr = np.frombuffer(data[off : off + n], dtype).reshape(shape)
        return path, arr.astype(dtype.newbyteorder("="), copy=True)
    k, bits, size = entry["num_clusters"], entry["bits"], math.prod(shape)
    t_off, t_len = entry["table_offset"], entry["table_nbytes"]
    t_dtype = _DTYPES[entry["table_dtype"]]
    tables = np.frombuffer(data[t_off : t_off + t_len], t_dtype).reshape(entry["table_shape"])
    tables = tables.astype(t_dtype.newbyteorder("="), copy=True)
    if tables.dtype.kind == "f" and not np.all(np.isfinite(tables)):
        raise FormatError(f"leaf {name!r}: centroid table holds NaN/Inf")
    d, va = 1, None
    if "vectors" in entry:
        d, va = entry["vectors"]["cluster_dim"], entry["vectors"]["vector_axis"]
    n_idx = size // d
    i_off, i_len = entry["indices_offset"], entry["indices_nbytes"]
    stream = np.frombuffer(data[i_off : i_off + i_len], np.uint8).copy()
    spare = i_len * 8 - n_idx * bits
    if spare and int(stream[-1]) >> (8 - spare):
        raise FormatError(f"leaf {name!r}: non-zero padding bits after the last index")
    if n_idx:
        top = int(_unpack_bits(stream, bits, n_idx).max())
        if top >= k:
            raise FormatError(f"leaf {name!r}: index {top} out of range for num_clusters={k}")
    positions = values = None
    if "outliers" in entry:
        positions, values = _read_outliers(entry["outliers"], data, size, name)
    lut_dtype = lut_scale = lut_zero_point = scale_axis = scales = None
    if "lut" in entry:
        lut_dtype = entry["table_dtype"]
        arrays = _read_arrays("lut", entry, data)
        lut_scale, lut_zero_point = arrays["scale"], arrays.get("zero_point")
        if not np.all(np.isfinite(lut_scale)):
            raise FormatError(f"leaf {name!r}: lut scales hold NaN/Inf")
    if "scales" in entry:
        scale_axis = entry["scales"]["axis"]
        scales = _read_arrays("scales", entry, data)["values"]
        if not np.all(np.isfinite(scales)):
            raise FormatError(f"leaf {name!r}: per-channel scales hold NaN/Inf")
    arr = PackedArray(
        packed=stream, tables=tables, shape=shape, dtype=entry["dtype"], num_clusters=k,
        granularity=entry["granularity"], channel_axis=entry["channel_axis"],
        group_size=entry["group_size"], outlier_positions=positions, outlier_values=values,
        cluster_dim=d, vector_axis=va, lut_dtype=lut_dtype, scale_axis=scale_axis,
        lut_scale=lut_scale, lut_zero_point=lut_zero_point, scales=scales,
    )  # fmt: skip
    return path, (arr if packed else np.asarray(arr.unpack()))


def _read_arrays(pname: str, entry: dict, data: memoryview) -> dict[str, np.ndarray]:
    """The arrays of a validated part, by name, in native byte order."""
    part, out = entry[pname], {}
    for array, _ in _PARTS[pname].arrays_of(entry):
        off, n = part[f"{array}_offset"], part[f"{array}_nbytes"]
        dtype = _DTYPES[part[f"{array}_dtype"]]
        out[array] = np.frombuffer(data[off : off + n], dtype).astype(dtype.newbyteorder("="))
    return out


def _read_outliers(part: dict, data: memoryview, size: int, name: str):
    """The validated (int32 positions, float16 values) of an "outliers" part."""
    arrays = []
    for array, _ in _PARTS["outliers"].arrays:
        off, n = part[f"{array}_offset"], part[f"{array}_nbytes"]
        dtype = _DTYPES[part[f"{array}_dtype"]]
        arrays.append(np.frombuffer(data[off : off + n], dtype).astype(dtype.newbyteorder("=")))
    positions, values = arrays
    if positions[0] < 0 or positions[-1] >= size or np.any(np.diff(positions) <= 0):
        raise FormatError(
            f"leaf {name!r}: outlier positions must be strictly increasing in [0, {size})"
        )
    if not np.all(np.isfinite(values)):
        raise FormatError(f"leaf {name!r}: outlier values hold NaN/Inf")
    return positions, values


def _insert(tree: dict, path: list, value: Any, names: set[str]) -> None:
    name = _join(path)
    if name in names:
        raise FormatError(f"corrupt header: duplicate path {name!r}")
    names.add(name)
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise FormatError(
                f"corrupt header: leaf {name!r} lies below the leaf {_join(path[: depth + 1])!r}"
            )
        node = child
    if path[-1] in node:
        raise FormatError(f"corrupt header: leaf {name!r} conflicts with the leaves below it")
    node[path[-1]] = value
