"""Brute-force NumPy references the tests compare the library against."""

import numpy as np


def nearest_reference(x, tables, groups=None):
    """Nearest centroid by brute force over the N x K distances (NumPy, float64).

    Ties: the nearest by |x - c|; equal distances go to the lower centroid value; among
    equal values, the lowest index (the rules of `clusterjax._src.assign`).
    """
    x = np.asarray(x, np.float64)
    tables = np.asarray(tables, np.float64)
    if groups is None:
        groups = np.zeros(x.shape, np.int64)
    t = tables[groups]  # (..., K)
    xs = x[..., None]
    d = np.abs(xs - t)
    best = d.min(axis=-1, keepdims=True)
    cand = np.where(d == best, t, np.inf)
    low = cand.min(axis=-1, keepdims=True)
    hit = (d == best) & (t == low)
    return np.argmax(hit, axis=-1)


def hand_state(params, centroids, indices, masks, specs, outliers=None):
    """A `ClusterState` assembled by hand from BUILD.md's data layout.

    `specs` has params' structure with a `ClusterSpec` or `None` per leaf. The plan is
    built directly (not by `cj.init`'s rule checks), so tests can use any K on any leaf.
    `outliers`: `None`, or params' structure with sorted int32 positions where a spec
    keeps outliers.
    """
    import jax

    import clusterjax as cj
    from clusterjax._src.plan import LeafPlan, Plan
    from clusterjax._src.tree import leaves_with_paths

    flat = leaves_with_paths(params)
    spec_flat = jax.tree.leaves(specs, is_leaf=lambda x: x is None)
    assert len(spec_flat) == len(flat), "specs must have params' structure"
    leaves = []
    for (path, w), spec in zip(flat, spec_flat):
        if spec is None:
            leaves.append(None)
            continue
        tensor = spec.granularity == "tensor"
        axis = None if tensor else spec.channel_axis % np.ndim(w)
        leaves.append(LeafPlan(path, spec, tuple(np.shape(w)), axis, spec.group_size or 1))
    plan = Plan(tuple(p for p, _ in flat), tuple(leaves))
    return cj.ClusterState(centroids, indices, masks, plan, outliers)


def outlier_reference(w, positions):
    """The stored value of outliers: float16 (round to nearest even) of the weight
    clipped to float16's finite range, cast back to the weight's dtype (NumPy)."""
    w = np.asarray(w)
    big = np.finfo(np.float16).max
    v = np.clip(w.reshape(-1)[np.asarray(positions)].astype(np.float32), -big, big)
    return v.astype(np.float16).astype(w.dtype)
