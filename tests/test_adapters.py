"""wrap_apply (linen) and nnx_merge (nnx) give the clustered model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze

import clusterjax as cj

KEY = jax.random.key(0)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x))


def test_wrap_apply_clusters_params_and_passes_other_collections():
    model = BNNet()
    x = jax.random.normal(KEY, (8, 5))
    variables = model.init(KEY, x)
    state = cj.init(variables["params"], cj.ClusterSpec(num_clusters=4), key=KEY)
    f = cj.wrap_apply(model.apply)
    expected = model.apply(
        {"params": cj.strip(variables["params"], state), "batch_stats": variables["batch_stats"]}, x
    )
    np.testing.assert_allclose(f(variables, state, x), expected, rtol=1e-6)
    np.testing.assert_allclose(f(freeze(variables), state, x), expected, rtol=1e-6)
    out, updates = f(variables, state, x, train=True, mutable=["batch_stats"])
    assert out.shape == (8, 3) and "batch_stats" in updates
    with pytest.raises(ValueError, match="'params' collection"):
        f({"batch_stats": variables["batch_stats"]}, state, x)


def test_nnx_merge_holds_clustered_params():
    from flax import nnx

    model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    state = cj.init(params, cj.ClusterSpec(num_clusters=3, granularity="channel"), key=KEY)
    clustered = cj.nnx_merge(graphdef, params, state)
    kernel = np.asarray(clustered.kernel[...])
    for column in kernel.T:
        assert len(np.unique(column)) <= 3
    x = jnp.ones((2, 6))
    np.testing.assert_allclose(
        clustered(x), x @ kernel + np.asarray(model.bias[...])[None, :], rtol=1e-6
    )
