"""Multi-device: init / apply / update_indices / optimizer / strip on sharded params.

The test runs this file as a subprocess with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set before jax is imported), so
the rest of the suite keeps its single device. The worker (`_worker`, the `__main__` of
this file) builds a 2 x 4 ('data', 'model') mesh, shards a linen MLP's kernels along
their output axis (the channel axis) over 'model' and the batch over 'data', and checks
that

* `cj.init` under `jax.jit` on the sharded params gives the same centroids and indices
  as on unsharded params, with indices sharded like their weights, per-channel / group
  tables sharded over their groups and per-tensor tables replicated;
* three full clustered train steps (the README step: `cj.apply`, `jax.grad`,
  `cj.optimizer`, `optax.apply_updates`, `cj.update_indices`) give the same losses,
  params, centroids and indices sharded and unsharded, and keep the shardings;
* `cj.update_indices` and `cj.strip` under `jit` agree as well.

Granularities: per-tensor (Dense_0), group of 4 channels (Dense_1: two groups per
shard), per-channel with `preserve_sparsity` (Dense_2: 8 channels, two per shard).
"""

import os
import subprocess
import sys

DEVICES = 8
# The fake devices are threads of one process; with the other pytest worker busy, a
# collective can wait long for its last thread: XLA's default timeout would abort.
TIMEOUTS = (
    "--xla_cpu_collective_timeout_seconds=1800 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800"
)


def test_sharded_train_step_equals_unsharded():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES} {TIMEOUTS}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert "sharding: ok" in proc.stdout, proc.stdout


def _worker():
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}"
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import clusterjax as cj

    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == DEVICES, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32)(x))
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(8)(x)

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (16, 16))
    y = jnp.arange(16) % 8
    params = model.init(jax.random.key(1), x)["params"]
    # Some exact zeros for preserve_sparsity.
    k2 = params["Dense_2"]["kernel"]
    params["Dense_2"]["kernel"] = jnp.where(jnp.abs(k2) < 0.05, 0.0, k2)
    rules = {
        r"Dense_0/kernel": cj.ClusterSpec(num_clusters=4, init="density"),
        r"Dense_1/kernel": cj.ClusterSpec(
            num_clusters=4, init="linear", granularity="group", group_size=4
        ),
        r"Dense_2/kernel": cj.ClusterSpec(
            num_clusters=4, init="linear", granularity="channel", preserve_sparsity=True
        ),
    }

    # Kernels (in, out): split the output (channel) axis over 'model'; biases too.
    def param_sharding(w):
        return NamedSharding(mesh, P(None, "model") if w.ndim == 2 else P("model"))

    p_shard = jax.tree.map(param_sharding, params)
    sharded = {
        "params": jax.device_put(params, p_shard),
        "x": jax.device_put(x, NamedSharding(mesh, P("data", None))),
        "y": jax.device_put(y, NamedSharding(mesh, P("data"))),
    }
    dev0 = jax.devices()[0]
    single = {"params": jax.device_put(params, dev0), "x": jax.device_put(x, dev0)}
    single["y"] = jax.device_put(y, dev0)

    tx = cj.optimizer(optax.adam(1e-2))
    init_fn = jax.jit(lambda p, key: cj.init(p, rules, key=key))
    opt_init = jax.jit(tx.init)

    @jax.jit
    def train_step(params, state, opt_state, x, y):
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
        return params, state, opt_state, loss

    strip_fn = jax.jit(cj.strip)
    reassign = jax.jit(cj.update_indices)

    def run(d):
        params = d["params"]
        state = init_fn(params, jax.random.key(2))
        out = {"init": state}
        opt_state = opt_init((params, state.centroids))
        losses = []
        for _ in range(3):
            params, state, opt_state, loss = train_step(params, state, opt_state, d["x"], d["y"])
            # One multi-device program in flight at a time: with several queued, XLA's
            # CPU runtime (8 fake devices on 2 cores) can deadlock in a collective.
            jax.block_until_ready((params, state, opt_state))
            losses.append(loss)
        out.update(params=params, state=state, opt_state=opt_state, losses=losses)
        moved = jax.tree.map(lambda w: w * 1.01, params)
        out["reassigned"] = reassign(moved, state)
        out["dense"] = strip_fn(params, state)
        return out

    a, b = run(single), run(sharded)

    def compare(tag, u, v, rtol=1e-5, atol=1e-6):
        lu, lv = jax.tree.leaves(u), jax.tree.leaves(v)
        assert jax.tree.structure(u) == jax.tree.structure(v), tag
        for i, (p, q) in enumerate(zip(lu, lv)):
            p, q = np.asarray(p), np.asarray(q)
            if np.issubdtype(p.dtype, np.integer) or p.dtype == bool:
                same = np.mean(p == q)
                assert same >= 0.999, f"{tag}[{i}]: only {same:.4f} of the entries agree"
            else:
                np.testing.assert_allclose(p, q, rtol=rtol, atol=atol, err_msg=f"{tag}[{i}]")

    # Init: identical (the same programs on the same values).
    compare("init", a["init"], b["init"], rtol=0, atol=0)
    compare("losses", a["losses"], b["losses"])
    compare("params", a["params"], b["params"])
    compare("state", a["state"], b["state"])
    compare("opt_state", a["opt_state"], b["opt_state"], atol=1e-7)
    compare("reassigned", a["reassigned"].indices, b["reassigned"].indices)
    compare("strip", a["dense"], b["dense"])

    # Shardings: indices / masks / dense outputs like their weights, per-channel and group
    # tables split over 'model' along the group axis, per-tensor tables replicated.
    def same(u, v, ndim):
        return u.sharding.is_equivalent_to(v.sharding, ndim)

    for st in (b["init"], b["state"], b["reassigned"]):
        for name in ("Dense_0", "Dense_1", "Dense_2"):
            w = b["params"][name]["kernel"]
            assert same(st.indices[name]["kernel"], w, 2), (name, st.indices[name]["kernel"])
        assert same(st.masks["Dense_2"]["kernel"], b["params"]["Dense_2"]["kernel"], 2)
        assert st.centroids["Dense_0"]["kernel"].sharding.is_fully_replicated
        for name in ("Dense_1", "Dense_2"):
            c = st.centroids[name]["kernel"]
            want = NamedSharding(mesh, P("model", None))
            assert c.sharding.is_equivalent_to(want, 2), (name, c.sharding)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        for leaf in ("kernel", "bias"):
            w = b["params"][name][leaf]
            assert w.sharding.is_equivalent_to(p_shard[name][leaf], w.ndim), (name, leaf)
            assert same(b["dense"][name][leaf], w, w.ndim)
    # Clustered invariants survive the sharded steps.
    dense = np.asarray(b["dense"]["Dense_0"]["kernel"])
    assert len(np.unique(dense)) <= 4
    k2 = np.asarray(b["dense"]["Dense_2"]["kernel"])
    assert (k2[~np.asarray(b["init"].masks["Dense_2"]["kernel"])] == 0).all()
    print("losses", [float(v) for v in b["losses"]])
    print("sharding: ok")


if __name__ == "__main__":
    _worker()
