"""straight_through: identity gradient to x, ordinary gradients to the other args."""

import jax
import jax.numpy as jnp
import numpy as np

import clusterjax as cj


def test_round_has_identity_gradient():
    f = cj.straight_through(jnp.round)
    x = jnp.array([0.2, 1.7, -2.5])
    np.testing.assert_array_equal(f(x), jnp.round(x))
    upstream = jnp.array([3.0, -1.0, 0.5])
    g = jax.grad(lambda x: jnp.sum(f(x) * upstream))(x)
    np.testing.assert_array_equal(g, upstream)
    # Without the estimator the gradient of round is zero.
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(jnp.round(x) * upstream))(x), 0)


def test_extra_args_get_their_true_gradient():
    # forward = x_quantized * scale: d/dscale = sum(g * round(x)); d/dx = g (identity).
    f = cj.straight_through(lambda x, scale: jnp.round(x) * scale)
    x = jnp.array([0.4, 1.6, 2.2])
    scale = jnp.float32(2.0)
    g_up = jnp.array([1.0, 2.0, 3.0])
    dx, dscale = jax.grad(lambda x, s: jnp.sum(f(x, s) * g_up), argnums=(0, 1))(x, scale)
    np.testing.assert_allclose(dx, g_up)
    np.testing.assert_allclose(dscale, np.sum(np.asarray(g_up) * np.round(np.asarray(x))))


def test_integer_args_and_dtype():
    f = cj.straight_through(lambda w, c, i: c[i].astype(w.dtype))
    w = jnp.array([0.1, 0.9, 0.4], jnp.bfloat16)
    c = jnp.array([0.0, 1.0], jnp.float32)
    i = jnp.array([0, 1, 0], jnp.uint8)
    dw, dc = jax.jit(
        jax.grad(
            lambda w, c: jnp.sum(f(w, c, i).astype(jnp.float32) * jnp.arange(1.0, 4.0)),
            argnums=(0, 1),
        )
    )(w, c)
    assert dw.dtype == jnp.bfloat16 and dc.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dw, np.float32), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(dc, [1.0 + 3.0, 2.0])
