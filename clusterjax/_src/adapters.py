"""Thin adapters from model APIs (Flax linen, Flax nnx) to `clusterjax.apply`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from clusterjax._src.core import ClusterState, apply


def wrap_apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns `model.apply` into `f(variables, state, *args, **kwargs)` on clustered params.

    `variables["params"]` is replaced by `clusterjax.apply(variables["params"], state)`
    before `apply_fn` is called; other collections (e.g. `batch_stats`) pass through,
    and so do `mutable=...` and `rngs=...`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> import clusterjax as cj
      >>> model = nn.Dense(3)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
      >>> state = cj.init(variables["params"], cj.ClusterSpec(num_clusters=4),
      ...                 key=jax.random.key(1))
      >>> clustered_apply = cj.wrap_apply(model.apply)
      >>> clustered_apply(variables, state, jnp.ones((1, 8))).shape
      (1, 3)
    """

    @functools.wraps(apply_fn)
    def clustered_apply(variables: Mapping[str, Any], state: ClusterState, *args, **kwargs):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(
                "cj.wrap_apply: the first argument must be the variables dict with a "
                f"'params' collection (got {type(variables).__name__}"
                + (f" with keys {list(variables)}" if isinstance(variables, Mapping) else "")
                + "). Fix: clustered_apply({'params': params, ...}, state, x)."
            )
        clustered = apply(variables["params"], state)
        new_vars = {k: v for k, v in variables.items()}
        new_vars["params"] = clustered
        return apply_fn(new_vars, *args, **kwargs)

    return clustered_apply


def nnx_merge(graphdef: Any, params: Any, state: ClusterState, *rest: Any) -> Any:
    """`nnx.merge` with clustered params: the nnx counterpart of `wrap_apply`.

    Split an nnx model once with `graphdef, params, rest = nnx.split(model, nnx.Param,
    ...)`, cluster `params` with `clusterjax.init`, and inside the (jitted) loss rebuild
    the model with `nnx_merge(graphdef, params, state, rest)`: its `Param`s hold
    `clusterjax.apply(params, state)`, so gradients flow to params and centroids.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import clusterjax as cj
      >>> model = nnx.Linear(8, 3, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(model, nnx.Param)
      >>> state = cj.init(params, cj.ClusterSpec(num_clusters=4), key=jax.random.key(1))
      >>> clustered = cj.nnx_merge(graphdef, params, state)
      >>> len(jnp.unique(clustered.kernel[...])) <= 4
      True
    """
    from flax import nnx

    return nnx.merge(graphdef, apply(params, state), *rest)
