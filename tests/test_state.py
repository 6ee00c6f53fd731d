"""ClusterState as a pytree: arrays-only leaves, a static plan, checkpoint round trips."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import clusterjax as cj

KEY = jax.random.key(0)


def _params():
    return {
        "dense": {"kernel": jax.random.normal(KEY, (32, 16)), "bias": jnp.zeros(16)},
        "conv": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 4, 8))},
    }


def _state(params):
    rules = {
        "dense/kernel": cj.ClusterSpec(num_clusters=8, preserve_sparsity=True),
        "conv/kernel": cj.ClusterSpec(num_clusters=4, granularity="channel"),
    }
    return cj.init(params, rules, key=KEY)


def test_leaves_are_arrays_and_the_plan_is_static():
    params = _params()
    state = _state(params)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    # centroids x2, indices x2, one mask
    assert len(leaves) == 5
    paths = [cj.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths == [
        "centroids/conv/kernel",
        "centroids/dense/kernel",
        "indices/conv/kernel",
        "indices/dense/kernel",
        "masks/dense/kernel",
    ]
    mapped = jax.tree.map(lambda x: x, state)
    assert mapped.plan is state.plan and mapped._replace(centroids=None).plan is state.plan
    assert state.specs["conv"]["kernel"].granularity == "channel"
    assert state.specs["dense"]["bias"] is None


def test_jit_retraces_on_a_new_plan_only():
    params = _params()
    state = _state(params)

    @jax.jit
    @chex.assert_max_traces(n=2)
    def f(state):
        return cj.strip(params, state)

    chex.clear_trace_counter()
    f(state)
    f(jax.tree.map(lambda x: x, state))  # same plan, new arrays: no retrace
    f(state._replace(centroids=jax.tree.map(lambda c: c + 1.0, state.centroids)))
    frozen = cj.init(params, cj.ClusterSpec(num_clusters=8, update_indices=False), key=KEY)
    f(frozen)  # another plan: the second (and last allowed) trace
    with pytest.raises(AssertionError):
        f(cj.init(params, cj.ClusterSpec(num_clusters=16), key=KEY))


def test_flax_serialization_round_trip():
    params = _params()
    state = _state(params)
    blob = serialization.to_bytes(state)
    target = _state(jax.tree.map(jnp.zeros_like, params))  # same plan, other arrays
    restored = serialization.from_bytes(target, blob)
    assert isinstance(restored, cj.ClusterState) and restored.plan == state.plan
    chex.assert_trees_all_equal(restored, state)
    assert restored.indices["dense"]["kernel"].dtype == np.uint8
    np.testing.assert_array_equal(cj.strip(params, restored)["conv"]["kernel"],
                                  cj.strip(params, state)["conv"]["kernel"])  # fmt: skip


def test_orbax_round_trip_with_optimizer_state(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _params()
    state = _state(params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), cj.optimizer(optax.adamw(1e-3)))
    opt_state = tx.init((params, state.centroids))
    grads = jax.grad(
        lambda p, c: jnp.sum(cj.apply(p, state._replace(centroids=c))["dense"]["kernel"] ** 2),
        argnums=(0, 1),
    )(params, state.centroids)
    _, opt_state = tx.update(grads, opt_state, (params, state.centroids), cluster_state=state)
    tree = {"params": params, "state": state, "opt_state": opt_state}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(tmp_path / "ckpt", target)
    assert isinstance(restored["state"], cj.ClusterState)
    assert restored["state"].plan == state.plan
    chex.assert_trees_all_equal(restored, tree)


def test_state_lives_in_an_nnx_module():
    from flax import nnx

    class Clustered(nnx.Module):
        def __init__(self, params, state):
            self.params = nnx.Param(params)
            self.cluster = nnx.Variable(state)

        def __call__(self, x):
            p = cj.apply(self.params.get_value(), self.cluster.get_value())
            return x @ p["dense"]["kernel"]

    params = _params()
    module = Clustered(params, _state(params))
    graphdef, variables = nnx.split(module)

    @jax.jit
    def run(variables, x):
        return nnx.merge(graphdef, variables)(x)

    x = jnp.ones((2, 32))
    expected = x @ cj.strip(params, _state(params))["dense"]["kernel"]
    np.testing.assert_allclose(run(variables, x), expected, rtol=1e-6)
