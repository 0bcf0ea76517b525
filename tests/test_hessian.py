"""hessian.py against exact Hessians (jax.hessian + eigvalsh) in float64 on tiny models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hessian


def tiny_mlp(key, sizes, dtype=jnp.float64):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (i, o), dtype) / np.sqrt(i), "b": 0.1 * jax.random.normal(k, (o,), dtype)}
            for k, i, o in zip(keys, sizes[:-1], sizes[1:])]


def forward(params, x, act):
    for layer in params[:-1]:
        x = act(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params, x, y, act=jax.nn.relu):
    logits = forward(params, x, act)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def mse(params, x, t):
    return 0.5 * jnp.mean((forward(params, x, jnp.tanh) - t) ** 2)


def exact_hessian(loss_fn, params):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: loss_fn(unravel(f)))(flat)


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def test_hvp_equals_exact_hessian_product():
    key = jax.random.key(0)
    params = tiny_mlp(key, [3, 5, 4])
    x = jax.random.normal(jax.random.key(1), (16, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (16,), 0, 4)
    loss = lambda p: cross_entropy(p, x, y)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(3), flat.shape, jnp.float64)
    got = ravel_pytree(hessian.hvp(loss, params, unravel(v)))[0]
    np.testing.assert_allclose(got, exact_hessian(loss, params) @ v, rtol=1e-10, atol=1e-12)


def test_full_lanczos_recovers_every_eigenvalue_of_a_generic_hessian():
    # tanh + MSE: a Hessian with distinct eigenvalues, so num_iters = P spans the whole space.
    params = tiny_mlp(jax.random.key(4), [2, 4, 2])
    x = jax.random.normal(jax.random.key(5), (12, 2), jnp.float64)
    t = jax.random.normal(jax.random.key(6), (12, 2), jnp.float64)
    loss = lambda p: mse(p, x, t)
    exact = np.linalg.eigvalsh(np.asarray(exact_hessian(loss, params)))
    num_params = exact.size
    nodes, weights = hessian.slq(loss, params, jax.random.key(7), num_iters=num_params, num_probes=2)
    assert nodes.shape == weights.shape == (2, num_params)
    for probe in range(2):
        np.testing.assert_allclose(np.sort(nodes[probe]), exact, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)


def test_lanczos_extremes_and_early_closure_on_a_relu_cross_entropy_hessian():
    # ReLU + cross-entropy has repeated zero eigenvalues (logit-shift invariance): the Krylov space closes
    # before P iterations, and the padded Ritz values must carry zero weight.
    params = tiny_mlp(jax.random.key(8), [3, 6, 3])
    x = jax.random.normal(jax.random.key(9), (20, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(10), (20,), 0, 3)
    loss = lambda p: cross_entropy(p, x, y)
    exact = np.linalg.eigvalsh(np.asarray(exact_hessian(loss, params)))
    nodes, weights = hessian.slq(loss, params, jax.random.key(11), num_iters=exact.size)
    nodes, weights = np.asarray(nodes[0]), np.asarray(weights[0])
    scale = np.abs(exact).max()
    assert abs(nodes.max() - exact.max()) <= 1e-6 * scale
    assert abs(nodes.min() - exact.min()) <= 1e-6 * scale
    # Every Ritz value that carries weight is an eigenvalue of the exact Hessian.
    for node in nodes[weights > 1e-12]:
        assert np.min(np.abs(exact - node)) <= 1e-6 * scale
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-12)


def test_lanczos_on_an_explicit_matrix_and_bad_input():
    diag = jnp.arange(1.0, 9.0)
    alphas, betas = hessian.lanczos(lambda v: diag * v, jnp.ones(8), 8)
    nodes, weights = hessian.tridiagonal_quadrature(alphas, betas)
    np.testing.assert_allclose(np.sort(nodes), diag, rtol=1e-10)
    np.testing.assert_allclose(weights, np.full(8, 1 / 8), rtol=1e-8)  # v0 = ones: equal mass everywhere
    assert alphas.shape == (8,) and betas.shape == (7,)
    with pytest.raises(ValueError, match="num_iters"):
        hessian.lanczos(lambda v: v, jnp.ones(4), 0)
    with pytest.raises(ValueError, match="num_iters"):
        hessian.slq(lambda p: jnp.sum(p ** 2), jnp.ones(3), jax.random.key(0), num_iters=0)


def test_density_integrates_to_one_and_peaks_at_the_nodes():
    nodes = jnp.array([[-1.0, 0.0, 2.0, 5.0]])
    weights = jnp.array([[0.1, 0.5, 0.2, 0.2]])
    grid, values = hessian.density(nodes, weights, num_points=10000)
    assert grid.shape == values.shape == (10000,)
    np.testing.assert_allclose(float(grid[0]), -1.01, rtol=1e-12)
    np.testing.assert_allclose(float(grid[-1]), 5.01, rtol=1e-12)
    # Normalized as a Riemann sum on the grid; the trapezoid rule differs only by the two edge values.
    np.testing.assert_allclose(float(jnp.sum(values) * (grid[1] - grid[0])), 1.0, rtol=1e-10)
    np.testing.assert_allclose(np.trapezoid(values, grid), 1.0, rtol=1e-2)
    assert abs(float(grid[jnp.argmax(values)])) < 1e-2  # the heaviest node is at 0
    with pytest.raises(ValueError, match="sigma2"):
        hessian.density(nodes, weights, sigma2=0.0)


def test_epsilon_rank_of_a_known_spectrum():
    nodes = jnp.array([[-1.0, 0.05, -0.08, 0.2, 3.0], [0.0, 0.0, 0.0, 0.5, 1.0]])
    weights = jnp.array([[0.1, 0.2, 0.1, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    # probe 0: |l| > 0.1 holds for -1, 0.2, 3 -> 0.7; probe 1: 0.5, 1 -> 0.4; mean 0.55
    np.testing.assert_allclose(float(hessian.epsilon_rank(nodes, weights, 0.1)), 0.55, rtol=1e-12)
    np.testing.assert_allclose(float(hessian.epsilon_rank(nodes[0], weights[0], 0.0)), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="eps"):
        hessian.epsilon_rank(nodes, weights, -0.1)


def test_epsilon_rank_from_slq_estimates_the_mass_fraction():
    # Quadratic with 4 of 10 eigenvalues above eps: SLQ mass above eps averages to 0.4 over probes.
    curvature = jnp.array([0.0, 0.0, 0.0, 0.01, 0.02, 0.05, 0.5, 1.0, 2.0, 4.0])
    loss = lambda p: 0.5 * jnp.sum(curvature * p ** 2)
    nodes, weights = hessian.slq(loss, jnp.ones(10), jax.random.key(12), num_iters=10, num_probes=200)
    assert abs(float(hessian.epsilon_rank(nodes, weights, 0.1)) - 0.4) < 0.06


def test_dead_units_bound_hessian_rank_theorem_6_2():
    inputs, hidden, outputs, num_dead = 3, 6, 2, 2
    params = tiny_mlp(jax.random.key(13), [inputs, hidden, outputs])
    # Plant dead units: zero incoming weights and a negative bias -> post-ReLU output 0 on every input.
    params[0]["w"] = params[0]["w"].at[:, :num_dead].set(0.0)
    params[0]["b"] = params[0]["b"].at[:num_dead].set(-1.0)
    x = jax.random.normal(jax.random.key(14), (40, inputs), jnp.float64)
    y = jax.random.randint(jax.random.key(15), (40,), 0, outputs)
    loss = lambda p: cross_entropy(p, x, y)
    full = np.asarray(exact_hessian(loss, params))
    num_params = hidden * (inputs + 1) + outputs * (hidden + 1)
    assert full.shape == (num_params, num_params)
    rank = np.linalg.matrix_rank(full, tol=1e-9 * np.abs(full).max())
    assert rank <= num_params - num_dead * (inputs + outputs + 1)
