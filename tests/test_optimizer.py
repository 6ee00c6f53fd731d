"""cj.optimizer: mean aggregation, sparsity masks, optax compositions, jitted train steps."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import nearest_reference

import clusterjax as cj

KEY = jax.random.key(0)


def _loss(params, centroids, state, upstream):
    clustered = cj.apply(params, state._replace(centroids=centroids))
    return jnp.sum(clustered["w"] * upstream)


def _grads(params, state, upstream):
    return jax.grad(_loss, argnums=(0, 1))(params, state.centroids, state, upstream)


def _bincount_mean(state, upstream, granularity, k):
    """(sums, sizes) per table by NumPy bincount: (tables, K)."""
    idx = np.asarray(state.indices["w"], np.int64)
    cols = range(idx.shape[1]) if granularity == "channel" else [slice(None)]
    sums = np.array([np.bincount(idx[:, c].ravel(), upstream[:, c].ravel(), k) for c in cols])
    sizes = np.array([np.bincount(idx[:, c].ravel(), minlength=k) for c in cols])
    return sums, sizes


@pytest.mark.parametrize("aggregation", ["mean", "sum"])
def test_sgd_step_matches_hand_derived_update(aggregation):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(20, 8)).astype(np.float32)
    spec = cj.ClusterSpec(num_clusters=4, init="linear", gradient_aggregation=aggregation)
    params = {"w": jnp.asarray(w)}
    state = cj.init(params, spec, key=KEY)
    # Push one centroid far away so that its cluster is empty.
    state = state._replace(centroids={"w": state.centroids["w"].at[3].set(100.0)})
    state = cj.update_indices(params, state)
    upstream = rng.normal(size=w.shape).astype(np.float32)
    lr = 0.1
    tx = cj.optimizer(optax.sgd(lr))
    opt_state = tx.init((params, state.centroids))
    grads = _grads(params, state, upstream)
    update = jax.jit(lambda g, o, p, s: tx.update(g, o, p, cluster_state=s))
    (u_params, u_centroids), _ = update(grads, opt_state, (params, state.centroids), state)

    sums, counts = _bincount_mean(state, upstream, "tensor", 4)
    assert counts[0, 3] == 0
    expected_c = sums[0] / np.maximum(counts[0], 1) if aggregation == "mean" else sums[0]
    np.testing.assert_allclose(u_centroids["w"], -lr * expected_c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(u_params["w"], -lr * upstream, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(u_centroids["w"])))


def _small_leaf(seed, granularity, k=3):
    """A (10, 6) leaf clustered at K = 3 and an upstream gradient for it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(10, 6)).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    spec = cj.ClusterSpec(num_clusters=k, init="linear", granularity=granularity)
    state = cj.init(params, {"w": spec}, key=KEY)
    return w, params, state, rng.normal(size=w.shape).astype(np.float32)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_mean_is_exact_through_a_chain(granularity):
    # A clipping transform before cj.optimizer (never active: a huge max norm) hands it a
    # gradient that is a new array: the sizes can no longer come from the backward pass's
    # scatter, and the mean must still be exact.
    _, params, state, upstream = _small_leaf(1, granularity)
    lr = 0.3
    tx = optax.chain(optax.clip_by_global_norm(1e6), cj.optimizer(optax.sgd(lr)))
    grads = _grads(params, state, upstream)
    opt_state = tx.init((params, state.centroids))
    update = jax.jit(lambda g, o, p, s: tx.update(g, o, p, cluster_state=s))
    (u_params, u_centroids), _ = update(grads, opt_state, (params, state.centroids), state)
    sums, sizes = _bincount_mean(state, upstream, granularity, 3)
    mean = np.where(sizes > 0, sums / np.maximum(sizes, 1), 0.0)
    got = np.asarray(u_centroids["w"]).reshape(mean.shape)
    np.testing.assert_allclose(got, -lr * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_params["w"], -lr * upstream, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_mean_exact_when_param_grads_are_not_the_lookup_gradient(granularity):
    # A loss term on the raw params makes the weight gradient differ from the upstream
    # gradient of the look-up: the sizes must still be exact.
    w, params, state, upstream = _small_leaf(4, granularity)
    lam = 0.7

    def loss(params, centroids):
        return _loss(params, centroids, state, upstream) + 0.5 * lam * jnp.sum(params["w"] ** 2)

    tx = cj.optimizer(optax.sgd(1.0))
    grads = jax.grad(loss, argnums=(0, 1))(params, state.centroids)
    np.testing.assert_allclose(grads[0]["w"], upstream + lam * w, rtol=1e-6)
    update = jax.jit(lambda g, o, p, s: tx.update(g, o, p, cluster_state=s))
    opt_state = tx.init((params, state.centroids))
    (u_params, u_centroids), _ = update(grads, opt_state, (params, state.centroids), state)
    sums, sizes = _bincount_mean(state, upstream, granularity, 3)
    got_mean = -np.asarray(u_centroids["w"]).reshape(sums.shape)
    np.testing.assert_allclose(got_mean, sums / np.maximum(sizes, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_params["w"], -(upstream + lam * w), rtol=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_chunked_pair_scatter_matches_bincount(monkeypatch, granularity):
    # Large leaves scatter their (gradient, 1) pairs in chunks, one after another (so
    # the chunks share one buffer). Chunks of 7 over 60 weights: 9 chunks, the last one
    # short; sums, sizes and the mean step must be those of one scatter.
    from clusterjax._src import segments

    monkeypatch.setattr(segments, "_PAIR_CHUNK", 7)
    _, params, state, upstream = _small_leaf(5, granularity)
    grads = _grads(params, state, upstream)
    tx = cj.optimizer(optax.sgd(1.0))
    update = jax.jit(lambda g, o, p, s: tx.update(g, o, p, cluster_state=s))
    opt_state = tx.init((params, state.centroids))
    (u_params, u_centroids), _ = update(grads, opt_state, (params, state.centroids), state)
    sums, sizes = _bincount_mean(state, upstream, granularity, 3)
    np.testing.assert_allclose(
        np.asarray(grads[1]["w"]).reshape(sums.shape), sums, rtol=1e-5, atol=1e-5
    )
    got_mean = -np.asarray(u_centroids["w"]).reshape(sums.shape)
    np.testing.assert_allclose(got_mean, sums / np.maximum(sizes, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(u_params["w"], -upstream)


def test_one_scatter_per_leaf():
    # "mean" aggregation needs the cluster sizes, which cj.optimizer takes from the same
    # (value, 1)-pair scatter that apply's backward pass runs for the centroid gradient
    # (clusterjax/_src/segments.py): in the README's jitted train step XLA keeps one of
    # the two, so each clustered leaf costs one scatter-add over its weights, not two.
    params = {
        "a": jax.random.normal(KEY, (64, 32)),
        "b": jax.random.normal(jax.random.key(1), (32, 8)),
        "bias": jnp.zeros(8),
    }
    rules = {
        "a": cj.ClusterSpec(num_clusters=16),
        "b": cj.ClusterSpec(num_clusters=4, granularity="channel", update_indices=False),
    }
    state = cj.init(params, rules, key=KEY)
    tx = cj.optimizer(optax.adam(1e-3))
    x = jax.random.normal(jax.random.key(2), (16, 64))

    def step(params, state, opt_state):
        def loss_fn(p, c):
            q = cj.apply(p, state._replace(centroids=c))
            return jnp.mean((jnp.tanh(x @ q["a"]) @ q["b"] + q["bias"][None, :]) ** 2)

        grads = jax.grad(loss_fn, argnums=(0, 1))(params, state.centroids)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        params, centroids = optax.apply_updates((params, state.centroids), updates)
        return params, cj.update_indices(params, state._replace(centroids=centroids)), opt_state

    opt_state = tx.init((params, state.centroids))
    hlo = jax.jit(step).lower(params, state, opt_state).compile().as_text()
    scatters = [line for line in hlo.splitlines() if " scatter(" in line]
    assert len(scatters) == 2, "\n".join(scatters)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


def _mlp_problem():
    x = jax.random.normal(jax.random.key(5), (64, 16))
    y = (jnp.sum(x[:, :4], axis=1) > 0).astype(jnp.int32) + 2 * (x[:, 5] > 0)
    model = MLP()
    params = model.init(jax.random.key(1), x)["params"]
    rules = {
        r"Dense_0/kernel": cj.ClusterSpec(num_clusters=8),
        r"Dense_1/kernel": cj.ClusterSpec(num_clusters=4, granularity="channel"),
    }
    return model, params, cj.init(params, rules, key=KEY), x, y


def _make_step(model, tx, x, y):
    """The README's train step, with its grads returned for inspection."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, state, opt_state):
        def loss_fn(params, centroids):
            clustered = cj.apply(params, state._replace(centroids=centroids))
            logits = model.apply({"params": clustered}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, state.centroids)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        params, centroids = optax.apply_updates((params, state.centroids), updates)
        state = cj.update_indices(params, state._replace(centroids=centroids))
        return params, state, opt_state, loss, grads

    return train_step


def _inject_adamw():
    return optax.inject_hyperparams(optax.adamw)(learning_rate=2e-2, weight_decay=1e-4)


COMPOSITIONS = {
    "plain": lambda: cj.optimizer(optax.adam(2e-2)),
    "clip_before": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), cj.optimizer(optax.adam(2e-2))
    ),
    "scale_after": lambda: optax.chain(cj.optimizer(optax.adam(4e-2)), optax.scale(0.5)),
    "multisteps": lambda: optax.MultiSteps(cj.optimizer(optax.adam(2e-2)), 3),
    "apply_if_finite": lambda: optax.apply_if_finite(cj.optimizer(optax.adam(2e-2)), 2),
    "inject_hyperparams": lambda: cj.optimizer(_inject_adamw()),
    "schedule": lambda: cj.optimizer(optax.adam(optax.linear_schedule(3e-2, 1e-2, 12))),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_optax_compositions_train_and_keep_indices_nearest(name):
    chex.clear_trace_counter()
    model, params, state, x, y = _mlp_problem()
    tx = COMPOSITIONS[name]()
    opt_state = tx.init((params, state.centroids))
    step = _make_step(model, tx, x, y)
    losses = []
    for _ in range(12):  # assert_max_traces(n=1): no step retraces
        params, state, opt_state, loss, grads = step(params, state, opt_state)
        losses.append(float(loss))
        for g in jax.tree.leaves(grads):
            assert g.dtype != jax.dtypes.float0 and jnp.issubdtype(g.dtype, jnp.floating)
        for lp in state.plan.clustered:
            path = tuple(lp.path.split("/"))
            idx = np.asarray(state.indices[path[0]][path[1]])
            c = np.asarray(state.centroids[path[0]][path[1]])
            w = np.asarray(params[path[0]][path[1]])
            k = lp.num_clusters
            assert idx.dtype == np.uint8 and idx.max() < k
            if lp.axis is None:
                ref = nearest_reference(w, c[None])
            else:
                ref = nearest_reference(w, c, np.broadcast_to(np.arange(w.shape[1]), w.shape))
            np.testing.assert_array_equal(idx, ref, err_msg=f"{name}: {lp.path}")
    assert losses[-1] < 0.8 * losses[0], losses


def test_inject_hyperparams_learning_rate_is_live():
    model, params, state, x, y = _mlp_problem()
    tx = cj.optimizer(_inject_adamw())
    opt_state = tx.init((params, state.centroids))
    opt_state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    step = _make_step(model, tx, x, y)
    new_params, new_state, *_ = step(params, state, opt_state)
    chex.assert_trees_all_equal(new_params, params)
    chex.assert_trees_all_equal(new_state.centroids, state.centroids)


def test_apply_if_finite_skips_a_nan_step_and_keeps_indices():
    _, params, state, upstream = _small_leaf(2, "tensor")
    tx = optax.apply_if_finite(cj.optimizer(optax.adam(1e-1)), 2)
    opt_state = tx.init((params, state.centroids))
    grads = _grads(params, state, upstream)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
    updates, opt_state = tx.update(bad, opt_state, (params, state.centroids), cluster_state=state)
    new_params, centroids = optax.apply_updates((params, state.centroids), updates)
    new_state = cj.update_indices(new_params, state._replace(centroids=centroids))
    chex.assert_trees_all_equal(new_params, params)
    chex.assert_trees_all_equal(new_state, state)
    assert int(opt_state.notfinite_count) == 1


def _prune(params, fraction=0.5):
    def one(w):
        if w.ndim < 2:
            return w
        threshold = jnp.quantile(jnp.abs(w), fraction)
        return jnp.where(jnp.abs(w) <= threshold, 0.0, w)

    return jax.tree.map(one, params)


def _add_constant(value):
    """A transform chained after cj.optimizer that moves every weight and centroid."""
    return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u: u + value, updates))


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0), cj.optimizer(optax.adamw(1e-2, weight_decay=0.1))
        ),
        # Even a transform after it that shifts every update cannot revive a pruned weight
        # in the clustered model: pruned weights sit on the zero centroid, which reads
        # as exactly 0, and update_indices never moves them.
        lambda: optax.chain(cj.optimizer(optax.adam(1e-2)), _add_constant(1e-3)),
    ],
    ids=["clip_adamw", "shift_after"],
)
def test_sparsity_is_exact_through_chains(make_tx):
    chex.clear_trace_counter()
    model, _, _, x, y = _mlp_problem()
    params = _prune(model.init(jax.random.key(1), x)["params"])
    pruned = jax.tree.map(lambda w: np.asarray(w) == 0, params)
    state = cj.init(params, cj.ClusterSpec(num_clusters=8, preserve_sparsity=True), key=KEY)
    tx = make_tx()
    opt_state = tx.init((params, state.centroids))
    step = _make_step(model, tx, x, y)
    losses = []
    for _ in range(30):
        params, state, opt_state, loss, _ = step(params, state, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    dense = cj.strip(params, state)
    for name in ("Dense_0", "Dense_1"):
        z = pruned[name]["kernel"]
        assert 0.45 <= z.mean() <= 0.55
        out = np.asarray(dense[name]["kernel"])
        np.testing.assert_array_equal(out == 0, z, err_msg=name)  # same zeros, no new ones
        np.testing.assert_array_equal(np.asarray(state.indices[name]["kernel"])[z], 0)


def test_frozen_indices_never_change():
    params = {"w": jax.random.normal(KEY, (16, 16))}
    state = cj.init(params, cj.ClusterSpec(num_clusters=4, update_indices=False), key=KEY)
    tx = cj.optimizer(optax.sgd(0.5))
    opt_state = tx.init((params, state.centroids))
    upstream = jax.random.normal(jax.random.key(9), (16, 16)) * 5
    start = np.asarray(state.indices["w"])
    for _ in range(5):
        grads = _grads(params, state, upstream)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        params, centroids = optax.apply_updates((params, state.centroids), updates)
        state = cj.update_indices(params, state._replace(centroids=centroids))
    np.testing.assert_array_equal(state.indices["w"], start)
    # ... while the weights moved far enough that re-assignment would change them.
    assert np.any(np.asarray(cj.update_indices(params, state, force=True).indices["w"]) != start)


def test_nnx_train_step():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(16, 32, rngs=rngs)
            self.l2 = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    graphdef, params, rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    state = cj.init(params, cj.ClusterSpec(num_clusters=8), key=KEY)
    tx = cj.optimizer(optax.adam(1e-2))
    opt_state = tx.init((params, state.centroids))
    x = jax.random.normal(KEY, (64, 16))
    y = jnp.arange(64) % 4
    traces = []

    @jax.jit
    def step(params, state, opt_state):
        traces.append(1)

        def loss_fn(params, centroids):
            model = cj.nnx_merge(graphdef, params, state._replace(centroids=centroids), rest)
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, state.centroids)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        params, centroids = optax.apply_updates((params, state.centroids), updates)
        state = cj.update_indices(params, state._replace(centroids=centroids))
        return params, state, opt_state, loss

    losses = []
    for _ in range(20):
        params, state, opt_state, loss = step(params, state, opt_state)
        losses.append(float(loss))
    assert len(traces) == 1 and losses[-1] < losses[0]
    model = nnx.merge(graphdef, cj.strip(params, state), rest)
    np.testing.assert_allclose(model(x), cj.nnx_merge(graphdef, params, state, rest)(x), rtol=1e-6)
    assert len(np.unique(np.asarray(model.l1.kernel[...]))) <= 8


def test_errors_explain_the_fix():
    params = {"w": jnp.ones((8, 8)).at[0].set(2.0)}
    state = cj.init(params, cj.ClusterSpec(num_clusters=2), key=KEY)
    tx = cj.optimizer(optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"must be the pair \(params, centroids\)"):
        tx.init(params)
    with pytest.raises(ValueError, match="cluster_state="):
        tx.init((params, state))  # the pre-0.2 pair (params, ClusterState)
    opt_state = tx.init((params, state.centroids))
    grads = _grads(params, state, 1.0)
    with pytest.raises(ValueError, match="needs the ClusterState as the extra argument"):
        tx.update(grads, opt_state, (params, state.centroids))
    with pytest.raises(ValueError, match="cluster_state must be the cj.ClusterState"):
        tx.update(grads, opt_state, (params, state.centroids), cluster_state=state.indices)
    wrong = (grads[0], {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"centroid gradient at 'w' is float32 \(3,\)"):
        tx.update(wrong, opt_state, (params, state.centroids), cluster_state=state)
    with pytest.raises(ValueError, match="weight gradients does not match params"):
        tx.update(({"v": grads[0]["w"]}, grads[1]), opt_state, None, cluster_state=state)
