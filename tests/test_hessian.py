"""hessian.py against exact Hessians (jax.hessian + eigvalsh) in float64 on tiny models."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hessian

# One compiled program per grid size, not one per eager operation: keeps the density tests fast.
density = jax.jit(hessian.density, static_argnames=("num_points", "sigma2"))
density_epsilon_rank = jax.jit(hessian.density_epsilon_rank, static_argnames=("eps", "num_points", "sigma2"))
epsilon_rank = jax.jit(hessian.epsilon_rank, static_argnames="eps")
lanczos = jax.jit(hessian.lanczos, static_argnums=(0, 2))


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
    # Each probe is its own Gaussian draw: no two give the same weights. (With one key for all 200 probes the
    # tolerance below still holds for 23 of 100 keys: it catches that only by luck.)
    assert np.unique(np.asarray(weights), axis=0).shape[0] == 200
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


def test_float32_lanczos_finds_each_outlier_once_with_its_exact_weight():
    # The scripts run float32. Ten outliers (0.1 .. 100, log-spaced) above a bulk in [0, 1e-3]: once the
    # outliers have converged, |H v| >> beta, and a single classical Gram-Schmidt pass leaves O(eps |H v| / beta)
    # of the old directions in the new vector (Kahan-Parlett: twice is enough). The leak shows up as spurious,
    # even negative, Ritz values and lost outliers. The probe is Gaussian with the outlier components scaled
    # by 10, so that each outlier carries a few percent of the mass.
    dim, num_iters = 3000, 150
    rng = np.random.default_rng(0)
    outliers = np.geomspace(0.1, 100.0, 10)
    diag = np.concatenate([rng.uniform(0.0, 1e-3, dim - 10), outliers]).astype(np.float32)
    probe = rng.standard_normal(dim).astype(np.float32)
    probe[-10:] *= 10.0
    # Quadrature weight of eigenvalue i for the probe v (eigenvectors = unit vectors): v_i^2 / |v|^2.
    exact_weights = probe[-10:].astype(np.float64) ** 2 / np.sum(probe.astype(np.float64) ** 2)
    with jax.enable_x64(False):
        op = jnp.asarray(diag)
        alphas, betas = lanczos(lambda v: op * v, jnp.asarray(probe), num_iters)
        nodes, weights = hessian.tridiagonal_quadrature(alphas, betas)
        assert nodes.dtype == weights.dtype == jnp.float32
    nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    matched = np.zeros(num_iters, bool)
    for lam, weight in zip(outliers, exact_weights):
        near = np.abs(nodes - lam) <= 1e-4 * lam
        assert near.sum() == 1, f"eigenvalue {lam:.4g} appears {near.sum()} times among the Ritz values"
        np.testing.assert_allclose(weights[near][0], weight, rtol=1e-3)
        matched |= near
    # Every other Ritz value lies in the bulk and carries the bulk's mass.
    rest = nodes[~matched]
    assert rest.min() >= -1e-5 and rest.max() <= 1e-3 + 1e-5, (rest.min(), rest.max())
    np.testing.assert_allclose(weights[~matched].sum(), 1.0 - exact_weights.sum(), atol=1e-4)
    # All 150 steps run: the bulk's betas (~2.5e-4, 23 eps x the largest alpha) are not rounding. A closure test
    # at 100 eps x max(|alpha|, beta) stopped after 12 steps and left the bulk 2 nodes (+ 138 padded zeros).
    betas = np.asarray(betas)
    assert np.all(betas != 0), f"the Krylov space closed after {np.argmin(betas != 0) + 1} of {num_iters} steps"
    # The 140 bulk Ritz values spread over [0, 1e-3] (Gauss nodes crowd its ends): at least 5 in each tenth.
    counts = np.histogram(rest, bins=10, range=(0.0, 1e-3))[0]
    assert counts.min() >= 5, counts
    # And the Gauss rule of this T follows the probe's spectral distribution function on the bulk to 0.02
    # (measured 0.005; 0.21 with the 12-step T). Its eigenvectors in float64: float32 eigh resolves T
    # (||T|| = 100) only to ~eps ||T|| = 1.2e-5, and moves ~50% of the mass of some 1e-4 bins of the bulk (CDF
    # error 0.07 at 1e-4 resolution; the bulk's total mass and the outliers stay exact, as checked above).
    off = betas.astype(np.float64)
    ritz, vectors = np.linalg.eigh(np.diag(np.asarray(alphas, np.float64)) + np.diag(off, 1) + np.diag(off, -1))
    grid = np.linspace(0.0, 1e-3, 41)
    exact_cdf = [np.sum(probe.astype(np.float64)[diag <= x] ** 2) / np.sum(probe.astype(np.float64) ** 2) for x in grid]
    gauss_cdf = [np.sum(vectors[0, ritz <= x] ** 2) for x in grid]
    assert np.max(np.abs(np.subtract(gauss_cdf, exact_cdf))) <= 0.02


def test_density_kernel_variance_is_the_papers():
    # Second moment of the density around a node far from the others and from the grid's edges equals the
    # kernel variance 1e-5 * max(1, lambda_max - lambda_min), lambda_max/min being the grid's padded ends
    # (App. F.1; Ghorbani et al.'s density code).
    for nodes, variance in [([-1.0, 0.0, 9.0], 1e-5 * 10.02),  # range 9 + 1 + 2 x 0.01 = 10.02
                            ([-0.2, 0.0, 0.2], 1e-5)]:  # range 0.42 < 1: the max(1, .) floor
        grid, values = density(jnp.array(nodes), jnp.array([0.25, 0.5, 0.25]))
        grid, values = np.asarray(grid), np.asarray(values)
        around = np.abs(grid) < 0.1  # >= 10 kernel widths each side of the node, >= 30 from the others
        mass = values[around].sum()
        mean = (grid[around] * values[around]).sum() / mass
        assert abs(mean) < 1e-9
        np.testing.assert_allclose((grid[around] ** 2 * values[around]).sum() / mass, variance, rtol=1e-6)


def test_density_grid_ignores_the_zero_weight_nodes_of_an_early_closed_krylov_space():
    # Four distinct eigenvalues, each twice: the Krylov space closes after 4 of 8 steps, and the 4 padded
    # Ritz values (0) carry weight exactly 0. They must not stretch the grid down to -0.01.
    diag = jnp.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 5.0, 5.0])
    nodes, weights = hessian.tridiagonal_quadrature(*lanczos(lambda v: diag * v, jnp.arange(1.0, 9.0), 8))
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    assert np.sum(weights == 0.0) == 4 and np.all(nodes[weights == 0.0] == 0.0)
    grid, values = density(nodes, weights)
    np.testing.assert_allclose([float(grid[0]), float(grid[-1])], [0.99, 5.01], rtol=1e-12)
    # The kernel width follows the same range: 1e-5 * 4.02; second moment around the node at 2.
    grid, values = np.asarray(grid), np.asarray(values)
    around = np.abs(grid - 2.0) < 0.3
    mass = values[around].sum()
    np.testing.assert_allclose(((grid[around] - 2.0) ** 2 * values[around]).sum() / mass, 1e-5 * 4.02, rtol=1e-6)


def test_lanczos_closure_is_relative_to_the_operators_scale():
    # Lanczos on s A is s x Lanczos on A, bit for bit when s is a power of 2, closure included: a rank-5 operator
    # closes after 6 steps (5 eigenvalues + the null space) at every scale. A closure test in absolute terms
    # (beta <= c eps) closes at once at 2^-70 (all betas < 1e-20) and never at 2^70 (the rounding-level beta is 1e5).
    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.standard_normal((50, 5)))[0]
    eigenvalues = np.array([-1.0, -0.3, 0.1, 0.5, 2.0])
    probe = rng.standard_normal(50)
    low_rank = jax.jit(lambda q, e, v: hessian.lanczos(lambda x: q @ (e * (q.T @ x)), v, 10))
    for dtype, exponent in ((np.float64, 70), (np.float32, 30)):
        with jax.enable_x64(dtype == np.float64):
            def run(s):
                alphas, betas = low_rank(*(jnp.asarray(a, dtype) for a in (q, s * eigenvalues, probe)))
                return np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
            alphas, betas = run(1.0)
            assert np.all(betas[:5] != 0) and np.all(betas[5:] == 0) and np.all(alphas[6:] == 0), (dtype, betas)
            for s in (2.0 ** -exponent, 2.0 ** exponent):
                scaled_alphas, scaled_betas = run(s)
                np.testing.assert_allclose(scaled_alphas, s * alphas, rtol=1e-12, atol=0, err_msg=f"{dtype} {s}")
                np.testing.assert_allclose(scaled_betas, s * betas, rtol=1e-12, atol=0, err_msg=f"{dtype} {s}")


def test_epsilon_rank_counts_strictly_above_eps():
    # Nodes exactly at 0 or at +-eps are not above eps.
    nodes = jnp.array([0.0, 0.0, 0.1, -0.1, 0.5])
    weights = jnp.array([0.3, 0.1, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(float(epsilon_rank(nodes, weights, 0.1)), 0.2, rtol=1e-12)
    np.testing.assert_allclose(float(epsilon_rank(nodes, weights, 0.0)), 0.6, rtol=1e-12)


def test_epsilon_rank_is_a_fraction_of_each_probes_total_weight():
    # Weights that do not sum to 1: probe 0 has 2 of 4 above eps (0.5), probe 1 has 4 of 5 (0.8).
    nodes = jnp.array([[0.0, 0.5, 2.0], [0.05, 1.0, 3.0]])
    weights = jnp.array([[2.0, 1.0, 1.0], [1.0, 1.0, 3.0]])
    np.testing.assert_allclose(float(epsilon_rank(nodes, weights, 0.1)), 0.65, rtol=1e-12)
    np.testing.assert_allclose(float(epsilon_rank(nodes[0], 10 * weights[0], 0.1)), 0.5, rtol=1e-12)


def normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def test_density_epsilon_rank_equals_the_gaussian_integral_beyond_eps():
    # One node at 0.102 (or -0.102), eps 0.1: the grid is node +- 0.01, the kernel variance 1e-5 (range < 1),
    # and the density is the normal density truncated to the grid and renormalized, so the mass beyond eps
    # is [Phi(0.01 / s) - Phi(-0.002 / s)] / [Phi(0.01 / s) - Phi(-0.01 / s)], s = sqrt(1e-5) (= 0.73683).
    s = math.sqrt(1e-5)
    want = (normal_cdf(0.01 / s) - normal_cdf(-0.002 / s)) / (normal_cdf(0.01 / s) - normal_cdf(-0.01 / s))
    for node in (0.102, -0.102):
        got = density_epsilon_rank(jnp.array([node]), jnp.array([1.0]), 0.1)  # paper's 10,000 points
        assert abs(float(got) - want) < 1e-4
        fine = density_epsilon_rank(jnp.array([node]), jnp.array([1.0]), 0.1, num_points=200001)
        assert abs(float(fine) - want) < 2e-5  # the Riemann sum's error shrinks with the grid spacing
    # Three nodes, range 3.02, s = sqrt(3.02e-5): the node at 0 has no mass beyond 0.1 (18 s away), the node
    # exactly at eps half of it; the nodes at 0 and 3 lie 0.01 from the grid's ends and keep Phi(0.01 / s)
    # of theirs. The weights route says 0.2 here.
    s = math.sqrt(1e-5 * 3.02)
    kept = normal_cdf(0.01 / s)
    want = (0.3 * 0.5 + 0.2 * kept) / (0.5 * kept + 0.3 + 0.2 * kept)  # = 0.35159
    nodes, weights = jnp.array([0.0, 0.1, 3.0]), jnp.array([0.5, 0.3, 0.2])
    got = density_epsilon_rank(nodes, weights, 0.1, num_points=200001)  # kernel width / spacing ~360
    assert abs(float(got) - want) < 3e-4
    assert float(epsilon_rank(nodes, weights, 0.1)) == pytest.approx(0.2)
    # Probes are pooled as in density(): two single-node probes give the mean of their masses.
    two = density_epsilon_rank(jnp.array([[0.0], [1.0]]), jnp.array([[1.0], [1.0]]), 0.1)
    np.testing.assert_allclose(float(two), 0.5, atol=1e-9)
    with pytest.raises(ValueError, match="eps"):
        hessian.density_epsilon_rank(nodes, weights, -0.1)
