"""`summary`: a per-leaf table of what clustering costs and saves."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from clusterjax._src import core
from clusterjax._src.packing import pack_bits


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-leaf rows (`rows`, a list of dicts) and `totals`; `str()` gives the table."""

    rows: list[dict[str, Any]]
    totals: dict[str, Any]

    def __str__(self) -> str:
        cols = [
            ("path", "path", "{}"), ("shape", "shape", "{}"), ("K", "num_clusters", "{}"),
            ("granularity", "granularity", "{}"), ("distinct", "distinct_values", "{}"),
            ("sparsity", "sparsity", "{:.3f}"), ("bits/w", "bits_per_weight", "{:.2f}"),
            ("packed B", "packed_bytes", "{:,}"), ("float32 B", "float32_bytes", "{:,}"),
            ("rel L2 err", "relative_l2_error", "{:.4f}"),
        ]  # fmt: skip

        def cell(row, key, fmt):
            value = row.get(key)
            if value is None:
                return "-"
            if isinstance(value, tuple):
                return "x".join(str(v) for v in value) or "()"
            return fmt.format(value)

        body = [[cell(r, k, f) for _, k, f in cols] for r in self.rows]
        t = self.totals
        body.append(
            ["total", "", "", "", "", "", f"{t['bits_per_weight']:.2f}",
             f"{t['packed_bytes']:,}", f"{t['float32_bytes']:,}", ""]
        )  # fmt: skip
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, (h, _, _) in enumerate(cols)]
        lines = ["  ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
        lines.append(
            f"compression: {t['compression_ratio']:.2f}x vs float32 "
            f"({t['clustered_leaves']} clustered leaves, {t['clustered_weights']:,} weights)"
        )
        return "\n".join(lines)


def summary(params: Any, state: core.ClusterState) -> Summary:
    """Per-leaf report: K, distinct values, sparsity, bits per weight, bytes, error.

    Packed bytes are what `clusterjax.save` stores for the leaf (bit-packed indices plus
    tables; dense leaves at their own dtype). The relative L2 error compares the
    clustered weight with the dense one: `||strip(w) - w|| / ||w||`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"w": jax.random.normal(jax.random.key(0), (128, 64)), "b": jnp.zeros(64)}
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=16), key=jax.random.key(1))
      >>> report = cj.summary(params, state)
      >>> [row["path"] for row in report.rows], round(report.totals["compression_ratio"], 1)
      (['b', 'w'], 7.5)
    """
    dense = core.strip(params, state)
    rows = []
    flat_dense = [d for _, d in core.leaves_with_paths(dense)]
    paths = [p for p, _ in core.leaves_with_paths(params)]
    for path, (_, leaf, w, c, i, _m), d in zip(
        paths, core._leaves(params, state, "cj.summary"), flat_dense
    ):
        if w is None:
            continue
        w_np = np.asarray(w)
        n = int(w_np.size)
        f32 = n * 4
        if leaf is None:
            rows.append({
                "path": path, "shape": tuple(w_np.shape), "num_clusters": None,
                "granularity": None, "distinct_values": None,
                "sparsity": float(np.mean(w_np == 0)) if n else 0.0,
                "bits_per_weight": 8.0 * w_np.dtype.itemsize, "packed_bytes": int(w_np.nbytes),
                "float32_bytes": f32, "relative_l2_error": 0.0,
            })  # fmt: skip
            continue
        d_np = np.asarray(d).astype(np.float64)
        wf = w_np.astype(np.float64)
        norm = float(np.linalg.norm(wf))
        err = float(np.linalg.norm(d_np - wf)) / norm if norm > 0 else 0.0
        nbytes = int(pack_bits(np.asarray(i), leaf.spec.bits).nbytes + np.asarray(c).nbytes)
        rows.append({
            "path": path, "shape": tuple(w_np.shape), "num_clusters": leaf.spec.num_clusters,
            "granularity": leaf.spec.granularity, "distinct_values": int(len(np.unique(d_np))),
            "sparsity": float(np.mean(d_np == 0)), "bits_per_weight": 8.0 * nbytes / n,
            "packed_bytes": nbytes, "float32_bytes": f32, "relative_l2_error": err,
        })  # fmt: skip
    packed = sum(r["packed_bytes"] for r in rows)
    f32 = sum(r["float32_bytes"] for r in rows)
    weights = sum(int(np.prod(r["shape"])) for r in rows)
    clustered = [r for r in rows if r["num_clusters"] is not None]
    totals = {
        "packed_bytes": packed,
        "float32_bytes": f32,
        "bits_per_weight": 8.0 * packed / max(weights, 1),
        "compression_ratio": f32 / max(packed, 1),
        "clustered_leaves": len(clustered),
        "clustered_weights": sum(int(np.prod(r["shape"])) for r in clustered),
    }
    return Summary(rows=rows, totals=totals)
