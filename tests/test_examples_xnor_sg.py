"""The XNOR and synthetic-gradient examples: tiny smoke runs, and the DNI gradient flow."""

import functools
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Flax modules are dataclasses: they look themselves up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sg():
    return _load("synthetic_gradients")


# ------------------------------------------------------------------------ smoke runs


def test_xnor_tiny(tmp_path):
    xnor = _load("xnor")
    # Every code path: float training, post-training binarization, clipped and per-channel STE.
    argv = ["--epochs", "1", "--hidden", "32,32", "--variants", "float,post,clip,channel"]
    out = xnor.main([*argv, "--out", str(tmp_path), "--no-progress"])
    for name in ("results.md", "accuracy.png", "weights.png"):
        assert (tmp_path / name).stat().st_size > 0
    accs = out["accuracy"]
    assert set(accs) == {xnor.SHORT[v] for v in ("float", "post", "clip", "channel")}
    for acc in accs.values():
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert "| XNOR, clipped STE |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # example smoke run
def test_synthetic_gradients_tiny(tmp_path, sg):
    out = sg.main(
        ["--epochs", "1", "--hidden", "32,32,32", "--out", str(tmp_path), "--no-progress"]
    )
    for name in ("results.md", "accuracy.png", "sg_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert set(out["accuracy"]) == {"backprop", "sg", "sg+label", "no-backprop"}
    for acc in out["accuracy"].values():
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0


# ------------------------------------------------------------------ synthetic gradients


@functools.cache
def _setup(conditioned):
    """A small network (12-16-16-16-10), SG modules with non-zero outputs, a batch of 5.

    NumPy draws (no PRNG kernels to compile); `init_sg_modules` would start the modules'
    last layers at zero, which makes every synthetic gradient trivially zero.
    """
    rng = np.random.default_rng(0)

    def layer(n_in, n_out, scale):
        w = rng.normal(0.0, scale, (n_in, n_out)).astype(np.float32)
        return {"w": jnp.asarray(w), "b": jnp.asarray(rng.normal(0.0, 0.1, n_out), jnp.float32)}

    params = {"hidden": [layer(12, 16, 0.5), layer(16, 16, 0.4), layer(16, 16, 0.4)]}
    params["out"] = layer(16, 10, 0.4)
    n_in = 16 + (10 if conditioned else 0)
    modules = [[layer(n_in, 8, 0.3), layer(8, 16, 0.1)] for _ in range(3)]
    x = jnp.asarray(rng.uniform(size=(5, 12)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 5), jnp.int32)
    return params, modules, x, y


def _layer(p, h):
    return jax.nn.relu(h @ p["w"] + p["b"][None, :])


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.fixture(scope="module")
def forward_backward(sg):
    return jax.jit(sg.forward_backward, static_argnames=("mode", "conditioned"))


@pytest.mark.parametrize("conditioned", [False, True])
def test_sg_targets_are_the_gradients_from_above(sg, forward_backward, conditioned):
    params, modules, x, y = _setup(conditioned)
    batch = x.shape[0]
    loss, grads, hs, targets = forward_backward(
        params, modules, x, y, mode="sg", conditioned=conditioned
    )
    out = params["out"]
    # Top hidden layer: the true gradient of the (per-example) loss w.r.t. h_3, from jax.grad
    # of the downstream computation.
    true_top = jax.grad(lambda h: _xent(h @ out["w"] + out["b"][None, :], y))(hs[2])
    np.testing.assert_allclose(targets[2], batch * true_top, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, _xent(hs[2] @ out["w"] + out["b"][None, :], y), rtol=1e-6)
    # Lower layers: the synthetic gradient of the layer above, carried back through it.
    for i in (0, 1):
        g_above = sg.synthetic_gradient(modules[i + 1], hs[i + 1], y, conditioned=conditioned)
        pairing = lambda h, p, g: jnp.sum(_layer(p, h) * g)
        expected = jax.grad(pairing)(hs[i], params["hidden"][i + 1], g_above)
        np.testing.assert_allclose(targets[i], expected, rtol=1e-5, atol=1e-7)
    # Each hidden layer's parameters get the vjp of its own synthetic gradient (mean loss).
    inputs = [x, hs[0], hs[1]]
    for i in range(3):
        g_i = sg.synthetic_gradient(modules[i], hs[i], y, conditioned=conditioned) / batch
        _, vjp = jax.vjp(_layer, params["hidden"][i], inputs[i])
        expected, _ = vjp(g_i)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            grads["hidden"][i],
            expected,
        )


def test_backprop_targets_equal_true_gradients_and_grads(forward_backward):
    params, modules, x, y = _setup(False)
    batch = x.shape[0]

    def downstream(i):
        def loss_from(h):
            for layer in params["hidden"][i + 1 :]:
                h = _layer(layer, h)
            return _xent(h @ params["out"]["w"] + params["out"]["b"][None, :], y)

        return loss_from

    _, grads, hs, targets = forward_backward(params, modules, x, y, mode="backprop")
    for i in range(3):
        true = jax.grad(downstream(i))(hs[i])
        np.testing.assert_allclose(targets[i], batch * true, rtol=1e-5, atol=1e-7)

    def full_loss(params):
        h = x
        for layer in params["hidden"]:
            h = _layer(layer, h)
        return _xent(h @ params["out"]["w"] + params["out"]["b"][None, :], y)

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grads,
        jax.grad(full_loss)(params),
    )


def test_no_backprop_trains_only_the_classifier(forward_backward):
    params, modules, x, y = _setup(False)
    _, grads, _, _ = forward_backward(params, modules, x, y, mode="nobp")
    for leaf in jax.tree.leaves(grads["hidden"]):
        np.testing.assert_array_equal(leaf, 0.0)
    assert float(jnp.abs(grads["out"]["w"]).sum()) > 0


def test_sg_step_regresses_modules_toward_targets(sg, forward_backward):
    """One jitted step moves the SG modules down their MSE against the true targets."""
    params, modules, x, y = _setup(True)
    tx, sg_tx = optax.sgd(0.0), optax.sgd(1e-2)
    step = sg.make_step(tx, sg_tx, mode="sg", conditioned=True)
    _, _, hs, targets = forward_backward(params, modules, x, y, mode="sg", conditioned=True)
    before, _ = sg.sg_regression_loss(modules, hs, y, targets, conditioned=True)
    _, new_modules, *_ = step(params, modules, tx.init(params), sg_tx.init(modules), x, y)
    after, _ = sg.sg_regression_loss(new_modules, hs, y, targets, conditioned=True)
    assert float(after) < float(before)
