"""cj.optimizer: mean aggregation, sparsity masks, re-assignment, jitted train steps."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clusterjax as cj
from clusterjax._src.assign import nearest_reference

KEY = jax.random.key(0)


def _loss(pair, upstream):
    params, state = pair
    return jnp.sum(cj.apply(params, state)["w"] * upstream)


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
    pair = (params, state)
    opt_state = tx.init(pair)
    grads = jax.grad(_loss, allow_int=True)(pair, upstream)
    updates, _ = jax.jit(tx.update)(grads, opt_state, pair)
    u_params, u_state = updates

    idx = np.asarray(state.indices["w"], np.int64)
    sums = np.bincount(idx.ravel(), weights=upstream.ravel(), minlength=4)
    counts = np.bincount(idx.ravel(), minlength=4)
    assert counts[3] == 0
    expected_c = sums / np.maximum(counts, 1) if aggregation == "mean" else sums
    np.testing.assert_allclose(u_state.centroids["w"], -lr * expected_c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(u_params["w"], -lr * upstream, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(u_state.centroids["w"])))

    new_params, new_state = optax.apply_updates(pair, updates)
    new_c = np.asarray(state.centroids["w"]) - lr * expected_c
    np.testing.assert_allclose(new_state.centroids["w"], new_c, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        new_state.indices["w"],
        nearest_reference(np.asarray(new_params["w"]), np.asarray(new_state.centroids["w"])[None]),
    )
    assert new_state.indices["w"].dtype == jnp.uint8


def _small_leaf(seed, granularity):
    """A (10, 6) leaf clustered at K = 3 and an upstream gradient for it."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(10, 6)).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    spec = cj.ClusterSpec(num_clusters=3, init="linear", granularity=granularity)
    state = cj.init(params, spec, key=KEY)
    return w, params, state, rng.normal(size=w.shape).astype(np.float32)


def _sums_and_sizes(state, upstream, granularity):
    """Per-table bincounts of the upstream gradient and of the indices, (tables, 3)."""
    idx = np.asarray(state.indices["w"], np.int64)
    cols = range(idx.shape[1]) if granularity == "channel" else [slice(None)]
    sums = np.array([np.bincount(idx[:, c].ravel(), upstream[:, c].ravel(), 3) for c in cols])
    sizes = np.array([np.bincount(idx[:, c].ravel(), minlength=3) for c in cols])
    return sums, sizes


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_mean_exact_when_param_grads_are_not_the_lookup_gradient(granularity):
    # The cluster sizes come from the count column of the scatter that also sums the
    # weight gradient. A loss term on the raw params makes the weight gradient differ
    # from the upstream gradient of the look-up: the sizes must still be exact.
    w, params, state, upstream = _small_leaf(4, granularity)
    lam = 0.7

    def loss(pair):
        return _loss(pair, upstream) + 0.5 * lam * jnp.sum(pair[0]["w"] ** 2)

    tx = cj.optimizer(optax.sgd(1.0))
    pair = (params, state)
    grads = jax.grad(loss, allow_int=True)(pair)
    np.testing.assert_allclose(grads[0]["w"], upstream + lam * w, rtol=1e-6)
    (u_params, u_state), _ = jax.jit(tx.update)(grads, tx.init(pair), pair)

    sums, sizes = _sums_and_sizes(state, upstream, granularity)
    got_mean = -np.asarray(u_state.centroids["w"]).reshape(sums.shape)
    np.testing.assert_allclose(got_mean, sums / np.maximum(sizes, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_params["w"], -(upstream + lam * w), rtol=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_chunked_pair_scatter_matches_bincount(monkeypatch, granularity):
    # Large leaves scatter their (gradient, 1) pairs in chunks, one after another (so
    # the chunks share one buffer). Chunks of 7 over 60 weights: 9 chunks, the last one
    # short; sums, sizes and the mean step must be those of one scatter.
    from clusterjax._src import core

    monkeypatch.setattr(core, "_PAIR_CHUNK", 7)
    _, params, state, upstream = _small_leaf(5, granularity)
    pair = (params, state)
    grads = jax.grad(_loss, allow_int=True)(pair, upstream)
    tx = cj.optimizer(optax.sgd(1.0))
    (u_params, u_state), _ = jax.jit(tx.update)(grads, tx.init(pair), pair)

    sums, sizes = _sums_and_sizes(state, upstream, granularity)
    got_sums = np.asarray(grads[1].centroids["w"]).reshape(sums.shape)
    np.testing.assert_allclose(got_sums, sums, rtol=1e-5, atol=1e-5)
    got_mean = -np.asarray(u_state.centroids["w"]).reshape(sums.shape)
    np.testing.assert_allclose(got_mean, sums / np.maximum(sizes, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(u_params["w"], -upstream)


def test_train_step_has_one_scatter_per_clustered_leaf():
    # "mean" aggregation needs the cluster sizes, which cj.optimizer takes from the same
    # (value, 1)-pair scatter that apply's backward pass runs for the centroid gradient:
    # in a jitted train step XLA keeps one of the two, so each clustered leaf costs one
    # scatter-add over its weights, not two.
    params = {
        "a": jax.random.normal(KEY, (64, 32)),
        "b": jax.random.normal(jax.random.key(1), (32, 8)),
        "bias": jnp.zeros(8),
    }
    rules = {
        "a": cj.ClusterSpec(num_clusters=16),
        "b": cj.ClusterSpec(num_clusters=4, granularity="channel"),
    }
    state = cj.init(params, rules, key=KEY)
    tx = cj.optimizer(optax.adam(1e-3))
    x = jax.random.normal(jax.random.key(2), (16, 64))

    def step(params, state, opt_state):
        def loss_fn(p, s):
            q = cj.apply(p, s)
            return jnp.mean((jnp.tanh(x @ q["a"]) @ q["b"] + q["bias"][None, :]) ** 2)

        grads = jax.grad(loss_fn, argnums=(0, 1), allow_int=True)(params, state)
        updates, opt_state = tx.update(grads, opt_state, (params, state))
        return optax.apply_updates((params, state), updates), opt_state

    hlo = jax.jit(step).lower(params, state, tx.init((params, state))).compile().as_text()
    scatters = [line for line in hlo.splitlines() if " scatter(" in line]
    assert len(scatters) == 2, "\n".join(scatters)


def test_frozen_indices_never_change():
    params = {"w": jax.random.normal(KEY, (16, 16))}
    state = cj.init(params, cj.ClusterSpec(num_clusters=4, update_indices=False), key=KEY)
    tx = cj.optimizer(optax.sgd(0.5))
    pair = (params, state)
    opt_state = tx.init(pair)
    upstream = jax.random.normal(jax.random.key(9), (16, 16)) * 5
    start = np.asarray(state.indices["w"])
    for _ in range(5):
        grads = jax.grad(_loss, allow_int=True)(pair, upstream)
        updates, opt_state = tx.update(grads, opt_state, pair)
        pair = optax.apply_updates(pair, updates)
    np.testing.assert_array_equal(pair[1].indices["w"], start)
    # ... while the weights moved far enough that re-assignment would change them.
    assert np.any(np.asarray(cj.update_indices(*pair, force=True).indices["w"]) != start)


def test_frozen_cluster_sizes_are_cached_and_recounted_when_indices_change():
    # Frozen "mean" leaves: the optimizer caches the cluster sizes; a state whose indices
    # were changed behind its back (update_indices(force=True)) must be recounted.
    rng = np.random.default_rng(3)
    w = rng.normal(size=(12, 6)).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    spec = cj.ClusterSpec(num_clusters=3, init="linear", granularity="channel",
                          update_indices=False)  # fmt: skip
    state = cj.init(params, spec, key=KEY)
    tx = cj.optimizer(optax.sgd(1.0))
    opt_state = tx.init((params, state))
    assert opt_state.counts["w"].shape == (6, 3)
    upstream = rng.normal(size=w.shape).astype(np.float32)
    update = jax.jit(tx.update)

    def expected(state):
        idx = np.asarray(state.indices["w"], np.int64)
        out = np.zeros((6, 3))
        for col in range(6):
            sums = np.bincount(idx[:, col], weights=upstream[:, col], minlength=3)
            counts = np.bincount(idx[:, col], minlength=3)
            out[col] = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        return -out

    for moved in (False, True):
        if moved:  # new indices the cache has not seen
            moved_w = {"w": jnp.asarray(w[::-1].copy())}
            before = np.asarray(state.indices["w"])
            state = cj.update_indices(moved_w, state, force=True)
            assert not np.array_equal(before, state.indices["w"])
        pair = (params, state)
        grads = jax.grad(_loss, allow_int=True)(pair, upstream)
        (_, u_state), opt_state = update(grads, opt_state, pair)
        np.testing.assert_allclose(u_state.centroids["w"], expected(state), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(opt_state.counted["w"], state.indices["w"])


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


def _data(n=32):
    x = jax.random.normal(jax.random.key(5), (n, 8, 8, 1))
    y = jnp.arange(n) % 10
    return x, y


def _prune(params, fraction=0.5):
    def one(w):
        if w.ndim < 2:
            return w
        threshold = jnp.quantile(jnp.abs(w), fraction)
        return jnp.where(jnp.abs(w) <= threshold, 0.0, w)

    return jax.tree.map(one, params)


def _make_step(model, tx):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, state, opt_state, x, y):
        def loss_fn(params, state):
            logits = model.apply({"params": cj.apply(params, state)}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1), allow_int=True)(params, state)
        updates, opt_state = tx.update(grads, opt_state, (params, state))
        params, state = optax.apply_updates((params, state), updates)
        return params, state, opt_state, loss

    return train_step


def test_sparsity_survives_100_adamw_steps_on_dense_and_conv():
    chex.clear_trace_counter()
    model = ConvNet()
    x, y = _data()
    params = _prune(model.init(jax.random.key(1), x)["params"])
    zeros_before = jax.tree.map(lambda w: np.asarray(w) == 0, params)
    spec = cj.ClusterSpec(num_clusters=8, preserve_sparsity=True)
    state = cj.init(params, spec, key=KEY)
    tx = cj.optimizer(optax.adamw(3e-3, weight_decay=0.1))
    opt_state = tx.init((params, state))
    step = _make_step(model, tx)
    losses = []
    for _ in range(100):
        params, state, opt_state, loss = step(params, state, opt_state, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    dense = cj.strip(params, state)
    for path, z in jax.tree_util.tree_flatten_with_path(zeros_before)[0]:
        name = cj.path_str(path)
        if not name.endswith("kernel"):
            continue
        assert z.mean() >= 0.49, name
        out = np.asarray(_get(dense, path))
        np.testing.assert_array_equal(out == 0, z, err_msg=name)  # same zeros, no new ones
        np.testing.assert_array_equal(np.asarray(_get(params, path))[z], 0.0, err_msg=name)
        c = np.asarray(_get(state.centroids, path))
        assert c[0] == 0.0 and np.all(c[1:] != 0.0)


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_linen_train_step_no_retrace_and_strip_matches_clustered_forward():
    chex.clear_trace_counter()
    model = ConvNet()
    x, y = _data()
    params = model.init(jax.random.key(1), x)["params"]
    rules = {
        r"Conv_0/kernel": cj.ClusterSpec(num_clusters=4, granularity="channel"),
        r".*/kernel": cj.ClusterSpec(num_clusters=16),
    }
    state = cj.init(params, rules, key=KEY)
    tx = cj.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)))
    opt_state = tx.init((params, state))
    step = _make_step(model, tx)
    for _ in range(3):  # assert_max_traces(n=1) raises on a second trace
        params, state, opt_state, _ = step(params, state, opt_state, x, y)
    clustered_logits = cj.wrap_apply(model.apply)({"params": params}, state, x)
    plain_logits = model.apply({"params": cj.strip(params, state)}, x)
    np.testing.assert_array_equal(clustered_logits, plain_logits)


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
    opt_state = tx.init((params, state))
    x = jax.random.normal(KEY, (64, 16))
    y = jnp.arange(64) % 4
    traces = []

    @jax.jit
    def step(params, state, opt_state):
        traces.append(1)

        def loss_fn(params, state):
            logits = cj.nnx_merge(graphdef, params, state, rest)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1), allow_int=True)(params, state)
        updates, opt_state = tx.update(grads, opt_state, (params, state))
        params, state = optax.apply_updates((params, state), updates)
        return params, state, opt_state, loss

    losses = []
    for _ in range(20):
        params, state, opt_state, loss = step(params, state, opt_state)
        losses.append(float(loss))
    assert len(traces) == 1 and losses[-1] < losses[0]
    model = nnx.merge(graphdef, cj.strip(params, state), rest)
    np.testing.assert_allclose(model(x), cj.nnx_merge(graphdef, params, state, rest)(x), rtol=1e-6)
    assert len(np.unique(np.asarray(model.l1.kernel[...]))) <= 8


def test_pair_errors_explain_the_fix():
    params = {"w": jnp.ones((4, 4))}
    state = cj.init(params, cj.ClusterSpec(num_clusters=2), key=KEY)
    tx = cj.optimizer(optax.sgd(1.0))
    with pytest.raises(ValueError, match=r"tx.init\(\(params, state\)\)"):
        tx.init(params)
    opt_state = tx.init((params, state))
    grads = jax.grad(_loss, allow_int=True)((params, state), 1.0)
    with pytest.raises(ValueError, match="needs the current"):
        tx.update(grads, opt_state)
    # (param_grads, centroid_grads) is accepted as well as grads of the ClusterState.
    u1, _ = tx.update(grads, opt_state, (params, state))
    u2, _ = tx.update((grads[0], grads[1].centroids), opt_state, (params, state))
    chex.assert_trees_all_close(u1, u2)
