"""Pytree helpers: '/'-joined leaf paths and walking params alongside a ClusterState."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import numpy as np


def path_components(path: Iterable[Any]) -> list[str | int]:
    """The pieces of a `jax.tree_util` key path that `path_str` joins with '/'.

    Integer dict keys and sequence positions stay integers (nnx keeps the layers of
    `nnx.Sequential` under int keys, and `nnx.update` needs them back as ints); every other
    key becomes its string form. A trailing `.value` (the array inside an nnx `Variable`)
    is dropped.
    """
    path = list(path)
    parts: list[str | int] = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            k = key.key
            integer = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
            parts.append(int(k) if integer else str(k))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(int(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(int(key.key))
        else:
            parts.append(str(key))
    if len(parts) > 1 and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return parts


def path_str(path: Iterable[Any]) -> str:
    """Joins a `jax.tree_util` key path with '/': the name rules are matched against.

    Dict keys and attribute names give their name, sequence positions their index. A
    trailing `.value` (the array inside an nnx `Variable`) is dropped, so an nnx model and
    the equivalent linen model have the same paths.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import clusterjax as cj
      >>> params = {"Dense_0": {"kernel": jnp.zeros((2, 3))}, "blocks": [jnp.zeros(4)]}
      >>> [cj.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
      ['Dense_0/kernel', 'blocks/0']
    """
    return "/".join(str(part) for part in path_components(path))


def _is_none(x: Any) -> bool:
    return x is None


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """`(path_str, leaf)` for every leaf of `tree`, `None` leaves included, in order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [(path_str(p), leaf) for p, leaf in flat]


def flatten_like(params: Any, tree: Any, field: str) -> list[Any]:
    """Flattens `tree` to one entry per leaf of `params` (`None` leaves included).

    Trees are matched by structure, or failing that by '/'-joined path, so a state made
    for a `dict` also fits the same params as a `FrozenDict` (and vice versa).

    Args:
      params: the reference tree.
      tree: a tree with params' structure, e.g. a `ClusterState` field or gradients.
      field: how errors name `tree`, e.g. "state.centroids".

    Raises:
      ValueError: naming the first path where the structures differ.
    """
    treedef = jax.tree.structure(params, is_leaf=_is_none)
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        p_paths = [p for p, _ in leaves_with_paths(params)]
        by_path = dict(leaves_with_paths(tree))
        missing = [p for p in p_paths if p not in by_path]
        extra = [p for p in by_path if p not in set(p_paths)]
        if not missing and not extra and len(by_path) == len(p_paths):
            return [by_path[p] for p in p_paths]
        detail = []
        if missing:
            detail.append(f"params leaf {missing[0]!r} has no entry in {field}")
        if extra:
            detail.append(f"{field} has {extra[0]!r}, which params do not have")
        if not detail:
            detail.append(f"the tree types differ ({err})")
        fix = (
            "A ClusterState only fits the params it was made for: call "
            "cj.init(params, spec, key=key) again for these params."
            if field.startswith("state.")
            else f"Fix: pass {field} with the structure of the params."
        )
        raise ValueError(f"{field} does not match params: {'; '.join(detail)}. {fix}") from None
