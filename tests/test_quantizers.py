"""Quantizers: forward values against NumPy, gradients against hand-derived formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clusterjax as cj

W = jnp.array([[0.5, -1.5, 2.0], [0.0, -0.25, 0.9]])
UP = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def test_binarize_forward_matches_xnor_formula():
    w = np.asarray(W)
    alpha = np.abs(w).mean()
    np.testing.assert_allclose(cj.binarize(W), np.where(w >= 0, 1.0, -1.0) * alpha, rtol=1e-6)
    alpha_col = np.abs(w).mean(axis=0, keepdims=True)
    np.testing.assert_allclose(
        cj.binarize(W, axis=0), np.where(w >= 0, 1.0, -1.0) * alpha_col, rtol=1e-6
    )


def test_binarize_gradient_is_identity_with_constant_scale():
    g = jax.grad(lambda w: jnp.sum(cj.binarize(w) * UP))(W)
    np.testing.assert_allclose(g, UP)
    # Autodiff through the scale (no stop-gradient) would add d alpha / d w terms:
    # d/dw_ij sum(up * sign(w) * mean|w|) = sum(up * sign(w)) * sign(w_ij) / n.
    signs = np.where(np.asarray(W) >= 0, 1.0, -1.0)
    through_scale = (np.asarray(UP) * signs).sum() * np.sign(np.asarray(W)) / W.size
    assert not np.allclose(g, np.asarray(UP) + through_scale)


def test_clipped_gradient_is_zero_outside_unit_interval():
    g = jax.jit(jax.grad(lambda w: jnp.sum(cj.binarize(w, clip=True) * UP)))(W)
    np.testing.assert_allclose(g, np.asarray(UP) * (np.abs(np.asarray(W)) <= 1))
    np.testing.assert_allclose(cj.binarize(W, clip=True), cj.binarize(W))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtypes_preserved(dtype):
    w = W.astype(dtype)
    assert cj.binarize(w).dtype == dtype
    assert jax.grad(lambda w: jnp.sum(cj.binarize(w).astype(jnp.float32)))(w).dtype == dtype
    assert cj.quantize_uniform(w, 4).dtype == dtype


def test_quantize_uniform_and_round():
    w = np.asarray(W)
    scale = np.abs(w).max() / 7
    expected = np.clip(np.round(w / scale), -7, 7) * scale
    np.testing.assert_allclose(cj.quantize_uniform(W, 4), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(cj.quantize_uniform(w, 4) * UP))(W), UP)
    np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(cj.round_ste(w) * UP))(W), UP)
    with pytest.raises(ValueError, match="bits must be an int >= 2"):
        cj.quantize_uniform(W, 1)


def test_inject_gradient_replaces_the_cotangent():
    g = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    x = W
    out = cj.inject_gradient(x, g)
    np.testing.assert_array_equal(out, x)
    dx, dg = jax.grad(lambda x, g: jnp.sum(cj.inject_gradient(x, g) ** 3), argnums=(0, 1))(x, g)
    np.testing.assert_allclose(dx, g)
    np.testing.assert_array_equal(dg, 0.0)
