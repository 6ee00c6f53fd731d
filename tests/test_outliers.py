"""Dense-and-sparse leaves: `ClusterSpec(outliers=...)` through init, apply, the optimizer,
training, checkpoints and the packed file, against brute-force NumPy references."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import hand_state, outlier_reference
from test_packing import bits_equal, make_case, reference_strip

import clusterjax as cj
from clusterjax._src.plan import num_outliers

KEY = jax.random.key(0)


# ---------------------------------------------------------------------------------------
# The spec and the plan.


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_outliers_must_be_a_fraction(bad):
    with pytest.raises(ValueError, match=r"outliers=.*a float in \[0, 1\)"):
        cj.ClusterSpec(num_clusters=4, outliers=bad)


def test_outlier_count_rounds_the_fraction():
    assert cj.ClusterSpec(num_clusters=4, outliers=np.float32(0.25)).outliers == 0.25
    assert [num_outliers(0.005, n) for n in (99, 100, 299, 300, 331_776)] == [0, 1, 1, 2, 1659]
    assert num_outliers(0.0, 10**9) == 0 and num_outliers(0.999, 3) == 3


# ---------------------------------------------------------------------------------------
# Which weights are outliers, and the k-means without them.


def _exact_two_means(x, w):
    """The exact weighted 2-means of 1-D data by trying every split of the sorted values."""
    order = np.argsort(x, kind="stable")
    x, w = np.asarray(x, np.float64)[order], np.asarray(w, np.float64)[order]
    best = None
    for cut in range(1, len(x)):
        means = [np.average(x[s], weights=w[s]) for s in (slice(0, cut), slice(cut, None))]
        cost = sum(
            np.sum(w[s] * (x[s] - m) ** 2) for s, m in zip((slice(0, cut), slice(cut, None)), means)
        )
        if best is None or cost < best[0]:
            best = (cost, means)
    return np.array(best[1])


def test_outliers_by_magnitude_are_left_out_of_the_kmeans():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    w[1, 2], w[4, 0] = 9.0, -7.0
    spec = cj.ClusterSpec(num_clusters=2, init="kmeans", outliers=0.1)  # 2 of 20
    state = cj.init({"w": jnp.asarray(w)}, {"w": spec}, key=KEY)
    pos = np.asarray(state.outliers["w"])
    assert pos.dtype == np.int32 and pos.tolist() == [1 * 4 + 2, 4 * 4 + 0]
    rest = np.delete(w.reshape(-1), pos)
    np.testing.assert_allclose(
        np.sort(np.asarray(state.centroids["w"])), _exact_two_means(rest, np.ones_like(rest)),
        rtol=1e-5,
    )  # fmt: skip
    dense = np.asarray(cj.strip({"w": jnp.asarray(w)}, state)["w"]).reshape(-1)
    assert dense[6] == np.float16(9.0) and dense[16] == np.float16(-7.0)


def test_outliers_by_importance_per_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    imp = rng.uniform(0.0, 1.0, size=(8, 3)).astype(np.float32)
    imp[0, 1] = 1e4  # a small weight made very important
    spec = cj.ClusterSpec(num_clusters=2, init="kmeans", granularity="channel", outliers=0.125)
    state = cj.init({"w": jnp.asarray(w)}, {"w": spec}, key=KEY, importance={"w": imp})
    score = (imp * w**2).reshape(-1)
    want = np.sort(np.argsort(-score, kind="stable")[:3])
    pos = np.asarray(state.outliers["w"])
    np.testing.assert_array_equal(pos, want)
    assert 1 in pos.tolist()
    mask = np.zeros(w.size, bool)
    mask[pos] = True
    mask = mask.reshape(w.shape)
    for c in range(3):  # each channel's table: the exact weighted 2-means of its others
        keep = ~mask[:, c]
        ref = _exact_two_means(w[keep, c], imp[keep, c])
        np.testing.assert_allclose(np.sort(state.centroids["w"][c]), ref, rtol=1e-4)


def test_damping_and_preserve_sparsity():
    w = np.array([[0.0, 0.0, 0.5, -3.0], [0.0, 0.0, 0.1, 0.2]], np.float32)
    imp = np.array([[9.0, 9.0, 0.0, 0.0], [9.0, 9.0, 0.0, 1.0]], np.float32)
    spec = cj.ClusterSpec(num_clusters=3, init="kmeans", preserve_sparsity=True, outliers=0.25)
    params = {"w": jnp.asarray(w)}
    # Undamped: score = F w^2 is 0 but at [1, 3]; then ties by position: [0, 2] (0.5 * 0).
    st0 = cj.init(params, {"w": spec}, key=KEY, importance={"w": imp})
    assert np.asarray(st0.outliers["w"]).tolist() == [2, 7]
    # Damped by the table's mean (4.625): -3.0, then 0.5; zeros (pruned) never qualify.
    st1 = cj.init(params, {"w": spec}, key=KEY, importance={"w": imp}, importance_damping=1.0)
    assert np.asarray(st1.outliers["w"]).tolist() == [2, 3]
    dense = np.asarray(cj.strip(params, st1)["w"])
    assert np.all(dense[w == 0] == 0) and dense[0, 3] == -3.0 and dense[0, 2] == 0.5


def test_linear_init_spans_the_clustered_weights_only():
    w = np.concatenate([np.linspace(-1, 1, 30), [50.0, -40.0]]).astype(np.float32)[None]
    spec = cj.ClusterSpec(num_clusters=3, init="linear", outliers=2 / 32)
    state = cj.init({"w": jnp.asarray(w)}, {"w": spec}, key=KEY)
    np.testing.assert_allclose(state.centroids["w"], [-1.0, 0.0, 1.0], atol=1e-6)


# ---------------------------------------------------------------------------------------
# apply / strip / gradients / the optimizer, against NumPy.


@st.composite
def _cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    shape = draw(st.sampled_from([(6, 5), (4, 3, 2), (16,)]))
    granularity = draw(st.sampled_from(["tensor", "channel"]))
    return make_case(
        np.random.default_rng(seed),
        {
            "w": dict(
                shape=shape,
                dtype=draw(st.sampled_from(["float32", "bfloat16"])),
                k=draw(st.sampled_from([2, 5])),
                granularity=granularity,
                axis=-1,
                sparse=draw(st.booleans()),
                outliers=draw(st.sampled_from([0.1, 0.3])),
            ),
            "b": np.ones(3, np.float32),
        },
    )


@settings(max_examples=25, deadline=None)
@given(case=_cases(), aggregation=st.sampled_from(["mean", "sum"]))
def test_apply_strip_and_gradients_against_numpy(case, aggregation):
    params, state = case
    spec = state.plan.leaves[1].spec
    spec = cj.ClusterSpec(**{**spec.__dict__, "gradient_aggregation": aggregation})
    state = hand_state(
        params, state.centroids, state.indices, state.masks, {"w": spec, "b": None},
        state.outliers,
    )  # fmt: skip
    w = np.asarray(params["w"])
    c, idx, pos = state.centroids["w"], state.indices["w"], state.outliers["w"]
    ref = reference_strip(w, c, idx, spec, pos)
    assert bits_equal(cj.strip(params, state)["w"], ref)
    assert bits_equal(jax.jit(cj.apply)(params, state)["w"], ref)
    assert bits_equal(cj.unpack(cj.pack(params, state))["w"], ref)

    up = np.random.default_rng(7).normal(size=w.shape).astype(np.float32)

    def loss(p, cents):
        out = cj.apply(p, state._replace(centroids=cents))["w"]
        return jnp.sum(out.astype(jnp.float32) * up)

    gp, gc = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, state.centroids)
    mask = np.ones(w.shape, bool) if state.masks["w"] is None else np.asarray(state.masks["w"])
    want_w = (up * mask).astype(w.dtype)  # outliers: plain gradient; pruned: none
    np.testing.assert_array_equal(np.asarray(gp["w"]), want_w)
    # Centroid gradient and cluster sizes: the clustered weights only.
    table = np.asarray(c).reshape(-1, spec.num_clusters)
    group = np.zeros(w.shape, int)
    if spec.granularity == "channel":
        group = np.broadcast_to(np.arange(w.shape[-1]), w.shape)
    member = np.ones(w.size, bool)
    member[np.asarray(pos)] = False
    flat_id = (group * spec.num_clusters + np.asarray(idx)).reshape(-1)[member]
    g = up.astype(w.dtype).astype(np.float64)  # the cotangent arrives in the leaf dtype
    sums = np.bincount(flat_id, g.reshape(-1)[member], minlength=table.size)
    sizes = np.bincount(flat_id, minlength=table.size).astype(np.float64)
    if spec.preserve_sparsity:
        sums.reshape(table.shape)[:, 0] = 0.0
    np.testing.assert_allclose(np.asarray(gc["w"]).reshape(-1), sums, rtol=1e-5, atol=1e-5)
    tx = cj.optimizer(optax.sgd(1.0))
    opt = tx.init((params, state.centroids))
    (u_w, u_c), _ = tx.update((gp, gc), opt, (params, state.centroids), cluster_state=state)
    if aggregation == "mean":
        sums = np.where(sizes > 0, sums / np.maximum(sizes, 1), 0.0)
    np.testing.assert_allclose(-np.asarray(u_c["w"]).reshape(-1), sums, rtol=1e-5, atol=1e-5)


def test_a_train_step_moves_outliers_by_their_own_gradient():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))}
    spec = cj.ClusterSpec(num_clusters=4, granularity="channel", outliers=0.05)
    state = cj.init(params, {"w": spec}, key=KEY)
    x = jnp.asarray(rng.normal(size=(8, 32)).astype(np.float32))
    tx = cj.optimizer(optax.sgd(0.1))
    opt_state = tx.init((params, state.centroids))

    @jax.jit
    def step(params, state, opt_state):  # the README train step
        def loss_fn(params, centroids):
            w = cj.apply(params, state._replace(centroids=centroids))["w"]
            return jnp.mean((x @ w) ** 2)

        grads = jax.grad(loss_fn, argnums=(0, 1))(params, state.centroids)
        updates, opt_state = tx.update(
            grads, opt_state, (params, state.centroids), cluster_state=state
        )
        params, centroids = optax.apply_updates((params, state.centroids), updates)
        state = cj.update_indices(params, state._replace(centroids=centroids))
        return params, state, opt_state, grads[0]

    new_params, new_state, _, g = step(params, state, opt_state)
    pos = np.asarray(state.outliers["w"])
    assert np.asarray(new_state.outliers["w"]).tolist() == pos.tolist()
    before = np.asarray(params["w"]).reshape(-1)[pos]
    after = np.asarray(new_params["w"]).reshape(-1)[pos]
    np.testing.assert_allclose(after, before - 0.1 * np.asarray(g["w"]).reshape(-1)[pos])
    dense = np.asarray(cj.strip(new_params, new_state)["w"]).reshape(-1)
    np.testing.assert_array_equal(dense[pos], outlier_reference(after, np.arange(pos.size)))
    # Indices are the nearest centroids, outliers included (their index is never read).
    new_w, tables = np.asarray(new_params["w"]), np.asarray(new_state.centroids["w"])
    dist = np.abs(new_w[..., None] - tables[None])
    np.testing.assert_array_equal(
        np.take_along_axis(dist, np.asarray(new_state.indices["w"])[..., None].astype(int), -1)[
            ..., 0
        ],
        dist.min(-1),
    )


def test_values_beyond_float16_are_clipped_and_files_reproduce_strip(tmp_path):
    w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    w[0, 0], w[7, 7] = 1e6, -3e5
    params = {"w": jnp.asarray(w)}
    state = cj.init(params, {"w": cj.ClusterSpec(num_clusters=4, outliers=2 / 64)}, key=KEY)
    dense = np.asarray(cj.strip(params, state)["w"])
    assert dense[0, 0] == 65504.0 and dense[7, 7] == -65504.0
    cj.save(tmp_path / "m.cjx", params, state)
    assert bits_equal(cj.load(tmp_path / "m.cjx")["w"], dense)
    assert bits_equal(np.asarray(cj.load(tmp_path / "m.cjx", packed=True)["w"].unpack()), dense)


def test_summary_counts_outlier_bytes_and_values():
    params = {"w": jax.random.normal(KEY, (50, 40))}
    spec = cj.ClusterSpec(num_clusters=4, outliers=0.01)
    state = cj.init(params, spec, key=KEY)
    row = cj.summary(params, state).rows[0]
    assert row["outliers"] == 20 and row["packed_bytes"] == 2000 * 2 // 8 + 16 + 6 * 20
    dense = np.asarray(cj.strip(params, state)["w"])
    assert row["distinct_values"] == len(np.unique(dense)) > 20


# ---------------------------------------------------------------------------------------
# The state: validation and checkpoints.


def _state():
    params = {
        "a": jax.random.normal(KEY, (16, 8)),
        "b": jax.random.normal(jax.random.key(1), (4, 4)),
        "bias": jnp.zeros(8),
    }
    rules = {
        "a": cj.ClusterSpec(num_clusters=4, granularity="channel", outliers=0.05),
        "b": cj.ClusterSpec(num_clusters=2),
    }
    return params, cj.init(params, rules, key=KEY)


def test_state_leaves_and_validation():
    params, state = _state()
    paths = [cj.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths == [
        "centroids/a", "centroids/b", "indices/a", "indices/b", "outliers/a",
    ]  # fmt: skip
    assert state.outliers["a"].shape == (6,) and state.outliers["b"] is None
    for bad, fragment in [
        ({**state.outliers, "a": state.outliers["a"][:3]}, r"'a' is int32 \(3,\)"),
        ({**state.outliers, "a": None}, "state.outliers at 'a' is None"),
        ({**state.outliers, "b": jnp.zeros(1, jnp.int32)}, "'b' holds an array, but"),
        (None, "state.outliers at 'a' is None"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            cj.strip(params, state._replace(outliers=bad))
    with pytest.raises(ValueError, match="strictly increasing"):
        reversed_ = {**state.outliers, "a": state.outliers["a"][::-1]}
        cj.pack(params, state._replace(outliers=reversed_))


def test_flax_and_orbax_round_trips(tmp_path):
    params, state = _state()
    target = cj.init(jax.tree.map(jnp.zeros_like, params), state.plan and {
        "a": state.plan.leaves[0].spec, "b": state.plan.leaves[1].spec,
    }, key=KEY)  # fmt: skip
    restored = serialization.from_bytes(target, serialization.to_bytes(state))
    chex.assert_trees_all_equal(restored, state)
    assert restored.plan == state.plan
    ocp = pytest.importorskip("orbax.checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    back = checkpointer.restore(tmp_path / "ckpt", abstract)
    chex.assert_trees_all_equal(back, state)
    assert back.outliers["a"].dtype == jnp.int32


def test_positional_states_without_outliers_still_work():
    params, state = _state()
    rules = {"b": state.plan.leaves[1].spec}
    plain = cj.init(params, rules, key=KEY)
    legacy = cj.ClusterState(plain.centroids, plain.indices, plain.masks, plain.plan)
    assert legacy.outliers is None
    assert bits_equal(cj.strip(params, legacy)["b"], cj.strip(params, plain)["b"])


def test_every_combination_packs_and_loads(tmp_path):
    for i, (gran, sparse, dtype) in enumerate(
        itertools.product(["tensor", "channel", "group"], [False, True], ["float32", "float16"])
    ):
        params, state = make_case(
            np.random.default_rng(i),
            {"w": dict(shape=(6, 4), dtype=dtype, k=3, granularity=gran,
                       group_size=2 if gran == "group" else None, sparse=sparse,
                       outliers=0.2)},
        )  # fmt: skip
        cj.save(tmp_path / "m.cjx", params, state)
        assert bits_equal(cj.load(tmp_path / "m.cjx")["w"], cj.strip(params, state)["w"])
