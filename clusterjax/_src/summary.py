"""`summary`: a per-leaf table of what clustering costs (error) and saves (bytes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clusterjax._src import core
from clusterjax._src.packing import PackedArray, is_packed, pack
from clusterjax._src.plan import Plan
from clusterjax._src.tree import leaves_with_paths, path_str

PyTree = Any

# (header, row key, format) of the text table; numbers are right-aligned.
_COLUMNS = (
    ("path", "path", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("K", "num_clusters", "{}"),
    ("granularity", "granularity", "{}"),
    ("distinct", "distinct_values", "{:,}"),
    ("sparsity", "sparsity", "{:.3f}"),
    ("bits/w", "bits_per_weight", "{:.2f}"),
    ("packed B", "packed_bytes", "{:,}"),
    ("original B", "original_bytes", "{:,}"),
    ("ratio", "compression_ratio", "{:.2f}x"),
    ("rel L2 err", "relative_l2_error", "{:.4f}"),
)
_LEFT = {"path", "shape", "dtype", "granularity"}


@dataclasses.dataclass(frozen=True)
class Summary:
    """The result of `clusterjax.summary`: `rows` and `totals` as data, `str()` as a table.

    Attributes:
      rows: one dict per array leaf, in tree order, with keys `path` ('/'-joined),
        `shape` (tuple), `dtype`, `num_clusters` (K; `None` for a dense leaf),
        `granularity` (in the text table followed by the table format where it is not
        a plain float scalar table: `d=2` for `cluster_dim`, `int8` / `uint8` for
        `lut_dtype`, `+scale` for per-channel scales), `cluster_dim`, `lut_dtype`,
        `per_channel_scale`, `bits` (bits per index), `distinct_values` (distinct values of the
        clustered weight, outliers included), `sparsity` (fraction of exact zeros),
        `outliers` (the number kept exactly; `None` for a dense leaf), `bits_per_weight`
        (effective: 8 x packed bytes / weights, so tables, lut scales, per-channel scales
        and outliers count), `packed_bytes` (what the file stores for the leaf:
        bit-packed indices plus tables, scales and outliers, or the dense array), `original_bytes` (the
        leaf as a dense array of its own dtype: 2 bytes per element for bfloat16, 8 for
        int64), `compression_ratio` (original / packed: 1.0 for a dense leaf),
        `float32_bytes` (4 per element, whatever the dtype: the size of a float32 copy,
        for comparisons with float32 baselines) and `relative_l2_error`
        (`||clustered - w|| / ||w||`; 0 for dense leaves, `None` when the original
        weights are unknown, as for a packed file).
      totals: `weights`, `clustered_leaves`, `clustered_weights`, `packed_bytes`,
        `original_bytes`, `float32_bytes` (sums of the rows), `file_bytes` (the exact
        size of the file `clusterjax.save` writes, header included),
        `bits_per_weight`, `compression_ratio` (original bytes / packed bytes),
        `file_compression_ratio` (original bytes / file bytes) and
        `relative_l2_error` over all clustered weights (or `None`).

      notes: lines printed below the table, e.g. the default-selected leaves that were
        kept dense because clustering would not make them smaller.

    The table prints these rows: its `packed B` and `original B` columns are
    `packed_bytes` and `original_bytes`, `ratio` is `compression_ratio`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (128, 64)), "b": jnp.zeros(64)}
      >>> spec = cj.ClusterSpec(num_clusters=4, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> report = cj.summary(params, state)
      >>> report.rows[1]["path"], report.rows[1]["packed_bytes"], report.rows[1]["bits"]
      ('w', 2064, 2)
      >>> print(str(report).splitlines()[0])
      path   shape   dtype    K  granularity  distinct  sparsity  bits/w  packed B  original B   ratio  rel L2 err
    """  # noqa: E501

    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    notes: tuple[str, ...] = ()

    def to_text(self) -> str:
        """The aligned text table (the same as `str(summary)`)."""
        body = [[_cell(row, key, fmt) for _, key, fmt in _COLUMNS] for row in self.rows]
        t = self.totals
        total_row = {
            "path": "total",
            "shape": f"{t['weights']:,} weights",
            "bits_per_weight": t["bits_per_weight"],
            "packed_bytes": t["packed_bytes"],
            "original_bytes": t["original_bytes"],
            "compression_ratio": t["compression_ratio"],
            "relative_l2_error": t["relative_l2_error"],
        }
        body.append(
            [_cell(total_row, key, fmt) if key in total_row else "" for _, key, fmt in _COLUMNS]
        )
        headers = [h for h, _, _ in _COLUMNS]
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

        def line(cells):
            out = []
            for (_, key, _), cell, width in zip(_COLUMNS, cells, widths):
                out.append(cell.ljust(width) if key in _LEFT else cell.rjust(width))
            return "  ".join(out).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [line(headers), rule, *(line(r) for r in body[:-1]), rule, line(body[-1])]
        lines.append(
            f"{t['clustered_leaves']} clustered leaves ({t['clustered_weights']:,} of "
            f"{t['weights']:,} weights); {t['packed_bytes']:,} bytes packed vs "
            f"{t['original_bytes']:,} original: {t['compression_ratio']:.2f}x; "
            f"file {t['file_bytes']:,} bytes: {t['file_compression_ratio']:.2f}x"
        )
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "shape" and isinstance(value, tuple):
        return str(tuple(int(v) for v in value))
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return fmt.format(value)


def _leaf_row(path: str, leaf: Any, original: Any | None) -> tuple[dict[str, Any], float, float]:
    """One row, plus the squared error and squared norm of a clustered leaf (else 0, 0).

    `leaf` is a `PackedArray` or a dense array; `original` the dense weight or `None`.
    """
    err2 = norm2 = 0.0
    if isinstance(leaf, PackedArray):
        n, packed_bytes = leaf.size, leaf.nbytes
        lp = leaf.plan
        plain = lp.cluster_dim == 1 and leaf.lut_dtype is None and leaf.scales is None
        dense = None
        if plain:
            # Distinct values and zeros come from the used (table, index) pairs: O(n + G*K).
            tables = np.asarray(leaf.tables)
            flat_ids = np.broadcast_to(
                np.asarray(lp.base()) + leaf.indices().astype(np.int64), leaf.shape
            ).reshape(-1)
            extra = np.zeros(0, np.float64)
            if leaf.num_outliers:  # outliers read their own values, not the tables
                flat_ids = np.delete(flat_ids, np.asarray(leaf.outlier_positions))
                extra = np.asarray(leaf.outlier_values).astype(leaf.dtype).astype(np.float64)
            counts = np.bincount(flat_ids, minlength=tables.size)
            values = tables.reshape(-1).astype(leaf.dtype).astype(np.float64)
            used = counts > 0
            distinct = len(np.unique(np.concatenate([values[used], extra])))
            zeros = int(counts[used & (values == 0)].sum()) + int(np.sum(extra == 0))
        else:  # vectors, quantized tables or scales: count on the decoded weight
            dense = np.asarray(leaf.unpack()).astype(np.float64)
            distinct, zeros = len(np.unique(dense)), int(np.sum(dense == 0))
        err = None
        if original is not None:
            if dense is None:
                dense = np.asarray(leaf.unpack()).astype(np.float64)
            diff = dense - np.asarray(original, np.float64)
            err2 = float(np.sum(diff**2))
            norm2 = float(np.sum(np.square(np.asarray(original, np.float64))))
            err = _ratio(err2, norm2)
        granularity = leaf.granularity
        if not plain:  # the table format, after the granularity
            granularity += "".join(
                [
                    f" d={lp.cluster_dim}" if lp.cluster_dim > 1 else "",
                    f" {leaf.lut_dtype}" if leaf.lut_dtype else "",
                    " +scale" if leaf.scales is not None else "",
                ]
            )
        row = {
            "num_clusters": leaf.num_clusters,
            "granularity": granularity,
            "bits": leaf.bits,
            "distinct_values": distinct,
            "sparsity": zeros / n if n else 0.0,
            "outliers": leaf.num_outliers,
            "relative_l2_error": err,
            "cluster_dim": lp.cluster_dim,
            "lut_dtype": leaf.lut_dtype,
            "per_channel_scale": leaf.scales is not None,
        }
        shape, dtype = leaf.shape, leaf.dtype
        original_bytes = n * jnp.dtype(leaf.dtype).itemsize
    else:
        arr = np.asarray(leaf)
        n, packed_bytes = arr.size, int(arr.nbytes)
        row = {
            "num_clusters": None,
            "granularity": None,
            "bits": None,
            "distinct_values": None,
            "sparsity": np.count_nonzero(arr == 0) / n if n else 0.0,
            "outliers": None,
            "relative_l2_error": 0.0,
            "cluster_dim": None,
            "lut_dtype": None,
            "per_channel_scale": None,
        }
        shape, dtype = tuple(arr.shape), arr.dtype.name
        original_bytes = int(arr.nbytes)
    row = {
        "path": path,
        "shape": shape,
        "dtype": dtype,
        **row,
        "bits_per_weight": 8.0 * packed_bytes / n if n else 0.0,
        "packed_bytes": int(packed_bytes),
        "original_bytes": int(original_bytes),
        "compression_ratio": original_bytes / packed_bytes if packed_bytes else None,
        "float32_bytes": 4 * n,
    }
    return row, err2, norm2


def _ratio(err2: float, norm2: float) -> float:
    """`sqrt(err2 / norm2)`: 0 for an exact match, inf for error on an all-zero weight."""
    if norm2 > 0:
        return math.sqrt(err2 / norm2)
    return 0.0 if err2 == 0 else math.inf


def kept_dense_notes(plan: Plan) -> tuple[str, ...]:
    """The footer line naming the leaves `plan` kept dense by default, if any."""
    if not plan.kept_dense:
        return ()
    listed = "; ".join(f"{path} ({why})" for path, why in plan.kept_dense)
    return (f"kept dense (clustering would not make them smaller): {listed}",)


def _summarize(
    packed: PyTree, originals: dict[str, Any] | None, notes: tuple[str, ...] = ()
) -> Summary:
    """Rows and totals of a packed tree; `originals` maps paths to the dense weights."""
    from clusterjax._src.fileformat import file_size

    flat, _ = jax.tree_util.tree_flatten_with_path(packed, is_leaf=is_packed)
    rows, err2, norm2 = [], 0.0, 0.0
    for keypath, leaf in flat:
        path = path_str(keypath)
        row, e2, n2 = _leaf_row(path, leaf, None if originals is None else originals.get(path))
        rows.append(row)
        err2, norm2 = err2 + e2, norm2 + n2
    weights = sum(math.prod(r["shape"]) for r in rows)
    clustered = [r for r in rows if r["num_clusters"] is not None]
    packed_bytes = sum(r["packed_bytes"] for r in rows)
    original = sum(r["original_bytes"] for r in rows)
    fbytes = file_size(packed)
    totals = {
        "weights": weights,
        "clustered_leaves": len(clustered),
        "clustered_weights": sum(math.prod(r["shape"]) for r in clustered),
        "packed_bytes": packed_bytes,
        "original_bytes": original,
        "float32_bytes": 4 * weights,
        "file_bytes": fbytes,
        "bits_per_weight": 8.0 * packed_bytes / weights if weights else 0.0,
        "compression_ratio": original / packed_bytes if packed_bytes else 0.0,
        "file_compression_ratio": original / fbytes,
        "relative_l2_error": None if originals is None else _ratio(err2, norm2),
    }
    return Summary(rows=rows, totals=totals, notes=notes)


def summary(params_or_packed: PyTree, state: core.ClusterState | None = None) -> Summary:
    """Per-leaf report: K, distinct values, sparsity, bits per weight, bytes, error.

    Packed bytes are what `clusterjax.save` stores for each leaf (bit-packed indices plus
    centroid tables; dense leaves at their own dtype); `totals["file_bytes"]` is the
    exact file size, header included. Compression ratios compare with the leaves' own
    bytes (`original_bytes`: a bfloat16 leaf at 2 bytes per weight, an int64 buffer at
    8), so a leaf kept dense has ratio 1.0 whatever its dtype. The relative L2 error
    compares the clustered weight with the dense one, `||strip(w) - w|| / ||w||` (in
    float64).

    Args:
      params_or_packed: dense params (then pass `state`), or a packed tree from
        `clusterjax.pack` / `clusterjax.load(..., packed=True)` (then the error is
        unknown: `None`).
      state: the `ClusterState` of dense params.

    Returns:
      A `Summary`: `print()` it for the table, or log `.rows` / `.totals` (plain dicts).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (128, 64)), "b": jnp.zeros(64)}
      >>> spec = cj.ClusterSpec(num_clusters=16, init="linear")
      >>> state = cj.init(params, spec, key=jax.random.key(1))
      >>> report = cj.summary(params, state)
      >>> [row["path"] for row in report.rows], round(report.totals["compression_ratio"], 2)
      (['b', 'w'], 7.48)
      >>> report.rows[1]["distinct_values"], round(report.rows[1]["relative_l2_error"], 2)
      (16, 0.14)
    """
    if state is None:
        return _summarize(params_or_packed, None)
    packed = pack(params_or_packed, state)
    originals = {p: w for p, w in leaves_with_paths(params_or_packed) if w is not None}
    return _summarize(packed, originals, kept_dense_notes(state.plan))
