"""Quantizers: forward values against NumPy, gradients against hand-derived formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import clusterjax as cj
from clusterjax import quantizers

W = jnp.array([[0.5, -1.5, 2.0], [0.0, -0.25, 0.9]])
UP = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # an upstream gradient with no symmetry


def _sign(w):
    return np.where(np.asarray(w) >= 0, 1.0, -1.0)  # sign(0) = +1


def _grad(fn, w, up=UP):
    """d/dw sum(up * fn(w)): the vector-Jacobian product of fn with cotangent `up`."""
    return jax.grad(lambda w: jnp.sum(fn(w).astype(jnp.float32) * up))(w)


# ---------------------------------------------------------------- binarize: forward


def test_binarize_forward_per_tensor_matches_numpy():
    w = np.asarray(W)
    np.testing.assert_allclose(quantizers.binarize(W), _sign(w) * np.abs(w).mean(), rtol=1e-6)
    assert quantizers.binarize(W)[1, 0] > 0  # sign(0) -> +1


@pytest.mark.parametrize("axis", [0, 1, -1, (0, 1)])
def test_binarize_forward_per_axis_matches_numpy(axis):
    w = np.asarray(W)
    scale = np.abs(w).mean(axis=axis, keepdims=True)
    np.testing.assert_allclose(quantizers.binarize(W, axis=axis), _sign(w) * scale, rtol=1e-6)


def test_binarize_conv_kernel_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
    out = np.asarray(quantizers.binarize(w, axis=[0, 1, 2]))
    # Each output channel holds exactly two values, +-mean(|w[..., c]|).
    for c in range(4):
        alpha = np.abs(np.asarray(w[..., c])).mean()
        np.testing.assert_allclose(np.unique(np.abs(out[..., c])), [alpha], rtol=1e-6)


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
        elements=st.floats(-100, 100, width=32, allow_subnormal=False),
    )
)
def test_binarize_property_two_values_same_sign(w):
    out = np.asarray(quantizers.binarize(w))
    alpha = np.float32(np.abs(w).mean())
    np.testing.assert_allclose(np.abs(out), alpha, rtol=1e-5, atol=1e-30)
    np.testing.assert_array_equal(out >= 0, w >= 0)


# ---------------------------------------------------------------- binarize: gradients


@pytest.mark.parametrize("axis", [None, 0])
def test_binarize_gradient_is_identity(axis):
    np.testing.assert_allclose(_grad(lambda w: quantizers.binarize(w, axis=axis), W), UP)


def test_binarize_scale_is_a_constant_unlike_plain_autodiff():
    """Without the stop-gradient, autodiff through alpha = mean|w| adds a dense term."""
    w, up = np.asarray(W), np.asarray(UP)
    alpha = np.abs(w).mean()
    sign_ste = cj.straight_through(lambda w: jnp.where(w >= 0, 1.0, -1.0))

    def no_stop_gradient(w):  # sign by straight-through, the scale differentiated
        return sign_ste(w) * jnp.mean(jnp.abs(w))

    g_auto = np.asarray(_grad(no_stop_gradient, W))
    # Hand derivation: d/dw_ij sum(up * s(w) * alpha(w))
    #   = up_ij * alpha + sum(up * sign(w)) * d alpha/d w_ij,  d alpha/d w_ij = sign(w_ij) / n
    # (JAX takes d|w|/dw = +1 at w = 0, the same convention as sign(0) = +1).
    expected_auto = up * alpha + (up * _sign(w)).sum() * _sign(w) / w.size
    np.testing.assert_allclose(g_auto, expected_auto, rtol=1e-6)
    # The XNOR estimator is the identity: it differs from plain autodiff at every entry.
    g_xnor = np.asarray(_grad(quantizers.binarize, W))
    np.testing.assert_allclose(g_xnor, up)
    assert np.all(np.abs(g_xnor - g_auto) > 1e-3)


def test_clipped_gradient_is_indicator_of_unit_interval():
    w = jnp.array([-2.0, -1.0, -0.999, 0.0, 0.5, 1.0, 1.001, 3.0])
    up = jnp.arange(1.0, 9.0)
    g = jax.jit(lambda w: _grad(lambda v: quantizers.binarize(v, clip=True), w, up))(w)
    np.testing.assert_allclose(g, np.asarray(up) * (np.abs(np.asarray(w)) <= 1))
    np.testing.assert_array_equal(
        np.asarray(g)[[1, 5]], np.asarray(up)[[1, 5]]
    )  # |w| = 1 still passes
    np.testing.assert_allclose(
        quantizers.binarize(w, clip=True), quantizers.binarize(w)
    )  # same forward


def test_clipped_per_channel_gradient():
    g = _grad(lambda w: quantizers.binarize(w, axis=0, clip=True), W)
    np.testing.assert_allclose(g, np.asarray(UP) * (np.abs(np.asarray(W)) <= 1))


# ---------------------------------------------------------------- dtypes, jit


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(
    "fn",
    [
        quantizers.binarize,
        lambda w: quantizers.binarize(w, axis=0, clip=True),
        quantizers.round_ste,
        lambda w: quantizers.quantize_uniform(w, 4),
        lambda w: quantizers.quantize_uniform(w, 3, axis=-1),
    ],
    ids=["binarize", "binarize_clip_axis0", "round_ste", "uniform4", "uniform3_axis"],
)
def test_dtype_preserved_forward_and_backward(dtype, fn):
    w = W.astype(dtype)
    out = fn(w)
    assert out.dtype == dtype and out.shape == w.shape
    g = _grad(fn, w)
    assert g.dtype == dtype and g.shape == w.shape
    assert bool(jnp.all(jnp.isfinite(g)))


def test_bfloat16_binarize_values():
    w = W.astype(jnp.bfloat16)
    alpha = np.abs(np.asarray(w, np.float32)).mean()
    expected = (_sign(w) * alpha).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(quantizers.binarize(w)), expected)


def test_jitted_gradient_matches_and_does_not_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(w, up):
        loss = lambda w: jnp.sum(quantizers.binarize(w, axis=0, clip=True) * up)
        return jax.value_and_grad(loss)(w)

    for i in range(3):
        w = W * (i + 1) * 0.5
        loss, g = step(w, UP)
        np.testing.assert_allclose(g, np.asarray(UP) * (np.abs(np.asarray(w)) <= 1))
        np.testing.assert_allclose(loss, jnp.sum(quantizers.binarize(w, axis=0) * UP), rtol=1e-6)


# ---------------------------------------------------------------- round_ste, quantize_uniform


def test_round_ste():
    np.testing.assert_array_equal(quantizers.round_ste(W), np.round(np.asarray(W)))
    np.testing.assert_allclose(_grad(quantizers.round_ste, W), UP)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_uniform_matches_numpy(bits):
    w = np.asarray(W)
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(w).max() / levels
    expected = np.clip(np.round(w / scale), -levels, levels) * scale
    np.testing.assert_allclose(quantizers.quantize_uniform(W, bits), expected, rtol=1e-6)
    assert len(np.unique(np.asarray(quantizers.quantize_uniform(W, bits)))) <= 2 * levels + 1
    np.testing.assert_allclose(_grad(lambda w: quantizers.quantize_uniform(w, bits), W), UP)


def test_quantize_uniform_per_axis_and_zero_slice():
    w = np.asarray(W).copy()
    w[:, 1] = 0.0  # an all-zero output channel: stays zero, no NaN
    scale = np.abs(w).max(axis=0, keepdims=True) / 7
    expected = np.round(w / np.where(scale > 0, scale, 1.0)) * scale
    out = np.asarray(quantizers.quantize_uniform(w, 4, axis=0))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1], 0.0)
    np.testing.assert_array_equal(quantizers.quantize_uniform(jnp.zeros(5), 3), 0.0)


@pytest.mark.parametrize("bits", [1, 0, 2.0, True])
def test_quantize_uniform_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be an int >= 2"):
        quantizers.quantize_uniform(W, bits)


# ---------------------------------------------------------------- inject_gradient


def test_inject_gradient_replaces_the_cotangent():
    g = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    np.testing.assert_array_equal(quantizers.inject_gradient(W, g), W)
    # Downstream is x ** 3, whose cotangent 3 x^2 is discarded in favour of g.
    dx, dg = jax.jit(
        jax.grad(lambda x, g: jnp.sum(quantizers.inject_gradient(x, g) ** 3), argnums=(0, 1))
    )(W, g)
    np.testing.assert_allclose(dx, g)
    np.testing.assert_array_equal(dg, 0.0)


def test_inject_gradient_reaches_upstream_parameters():
    """Parameters before the hook get J^T g: the vjp of the layer with the injected g."""
    x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    kernel = jnp.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
    g = jnp.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]])
    dk = jax.grad(lambda k: jnp.sum(jnp.tanh(quantizers.inject_gradient(x @ k, g))))(kernel)
    np.testing.assert_allclose(dk, np.asarray(x).T @ np.asarray(g), rtol=1e-6)


def test_inject_gradient_casts_and_checks_shape():
    x = W.astype(jnp.bfloat16)
    dx = jax.grad(lambda x: jnp.sum(quantizers.inject_gradient(x, UP).astype(jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dx, np.float32), UP)
    with pytest.raises(ValueError, match=r"grad must have the shape of x; got grad \(3,\)"):
        quantizers.inject_gradient(W, jnp.ones(3))
