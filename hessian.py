"""Hessian spectra by stochastic Lanczos quadrature (paper Sec. 5 and App. F.1).

The paper estimates the Hessian eigenvalue density of the task loss with SLQ (Golub & Welsch 1969;
Ghorbani et al. 2019): a Gaussian probe, Lanczos with full reorthogonalization on Hessian-vector products,
Ritz values as quadrature nodes and squared first eigenvector components as weights, then a Gaussian
kernel density. The epsilon-rank (Sec. 5) is the fraction of spectral mass with |lambda| > epsilon, from the
quadrature weights (`epsilon_rank`) or, as the authors' code computed Fig. 2's, from the smoothed density
(`density_epsilon_rank`).
"""
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def hvp(loss_fn, params, v):
    """Hessian-vector product H(params) @ v by forward-over-reverse differentiation (Pearlmutter 1994).

    `params` and `v` are pytrees of the same structure; the result has that structure too.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def lanczos(matvec, v0, num_iters):
    """Lanczos tridiagonalization of a symmetric operator on a flat vector space.

    Every new vector is orthogonalized against all previous ones (twice, classical Gram-Schmidt), so the
    Ritz values stay accurate without ghost copies. If the Krylov space closes (beta ~ 0) the remaining
    alphas and betas are 0: the extra Ritz values are 0 with quadrature weight exactly 0.
    Returns `(alphas [num_iters], betas [num_iters - 1])`, the diagonal and off-diagonal of T.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    if v0.ndim != 1:
        raise ValueError(f"v0 must be a flat vector, got shape {v0.shape}")
    dim = v0.shape[0]
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    basis = jnp.zeros((num_iters, dim), dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def step(i, carry):
        basis, alphas, betas, scale, closed = carry
        v = basis[i]
        w = matvec(v)
        alpha = jnp.vdot(v, w)
        norm_av = jnp.linalg.norm(w)
        # Rows > i of `basis` are still zero, so this projects out exactly v_0..v_i.
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        # Closure: beta at rounding level, relative to |A v| (rounding of the projection, or of a matvec like a
        # diagonal's) or to ||A|| (an HVP's rounding; `scale` bounds ||A|| from below). Measured, in eps: such
        # breakdowns at beta <= 9 |A v| (diagonal, dense low rank; float32 and float64) or <= 0.4 ||A|| (ReLU
        # cross-entropy HVPs, though up to 3e5 |A v|; a few at 3-10 ||A|| close some steps later, the extra nodes
        # weighing ~(beta / ||A||)^2). True betas: >= 600 |A v| but in bulks narrower than ~40 eps ||A||; a float32
        # bulk in [0, 1e-3] under outliers up to 100 (the float32 test) has 23 ||A||, where 100 eps ||A|| closed.
        closed_now = closed | (beta <= eps * jnp.maximum(100 * norm_av, scale))
        alphas = alphas.at[i].set(jnp.where(closed, 0.0, alpha))
        next_v = jnp.where(closed_now, 0.0, w / jnp.where(closed_now, 1.0, beta))
        # The last iteration has no successor: writing row num_iters is dropped by JAX's scatter rules.
        basis = basis.at[i + 1].set(next_v, mode="drop")
        betas = betas.at[i].set(jnp.where(closed_now, 0.0, beta), mode="drop")
        return basis, alphas, betas, scale, closed_now

    init = (basis, jnp.zeros(num_iters, dtype), jnp.zeros(max(num_iters - 1, 0), dtype),
            jnp.zeros((), dtype), jnp.zeros((), bool))
    _, alphas, betas, _, _ = jax.lax.fori_loop(0, num_iters, step, init)
    return alphas, betas


def tridiagonal_quadrature(alphas, betas):
    """Gauss quadrature rule of a Lanczos tridiagonal: nodes (Ritz values) and weights (squared first
    components of its eigenvectors, summing to 1)."""
    tri = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    nodes, vectors = jnp.linalg.eigh(tri)
    return nodes, vectors[0] ** 2


def slq(loss_fn, params, key, num_iters=100, num_probes=1):
    """Stochastic Lanczos quadrature of the Hessian of `loss_fn` at `params` (paper App. F.1).

    `loss_fn(params) -> scalar` is the task loss on a fixed measurement batch (the paper: cross-entropy
    only, no regularizer, 2,000 samples). Works on any params pytree. Probes are Gaussian; each gives
    `num_iters` nodes and weights (weights sum to 1 per probe). Returns `(nodes, weights)`, each
    `[num_probes, num_iters]`.
    """
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    flat_params, unravel = ravel_pytree(params)
    if num_iters > flat_params.size:
        raise ValueError(f"num_iters ({num_iters}) exceeds the number of parameters ({flat_params.size})")

    def matvec(v):
        return ravel_pytree(hvp(loss_fn, params, unravel(v)))[0]

    def one_probe(probe_key):
        v0 = jax.random.normal(probe_key, flat_params.shape, flat_params.dtype)
        return tridiagonal_quadrature(*lanczos(matvec, v0, num_iters))

    # lax.map, not vmap: each probe holds a [num_iters, P] Lanczos basis.
    return jax.lax.map(one_probe, jax.random.split(key, num_probes))


def density(nodes, weights, num_points=10000, sigma2=1e-5):
    """Gaussian-kernel spectral density from SLQ nodes/weights (paper App. F.1).

    Kernel variance is `sigma2 * max(1, lambda_max - lambda_min)`; the grid spans the nodes padded by
    0.01 on each side; probes are averaged and the density is normalized to integrate to 1.
    Accepts `[num_iters]` or `[num_probes, num_iters]` arrays. Returns `(grid, values)`.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    if sigma2 <= 0:
        raise ValueError(f"sigma2 must be > 0, got {sigma2}")
    nodes, weights = _as_probes(nodes, weights)
    # Nodes with weight 0 (an early-closed Krylov space) carry no mass; keep them out of the range.
    massive = weights > 0
    lam_min = jnp.min(jnp.where(massive, nodes, jnp.inf)) - 0.01
    lam_max = jnp.max(jnp.where(massive, nodes, -jnp.inf)) + 0.01
    variance = sigma2 * jnp.maximum(1.0, lam_max - lam_min)
    grid = jnp.linspace(lam_min, lam_max, num_points)
    kernel = jnp.exp(-(grid[:, None] - nodes.reshape(-1)[None, :]) ** 2 / (2 * variance))
    kernel = kernel / jnp.sqrt(2 * jnp.pi * variance)
    values = kernel @ weights.reshape(-1) / nodes.shape[0]
    values = values / (jnp.sum(values) * (grid[1] - grid[0]))
    return grid, values


def epsilon_rank(nodes, weights, eps):
    """Fraction in [0, 1] of spectral mass with |lambda| > eps (the normalized epsilon-rank, Sec. 5;
    Fig. 2 uses eps = 0.1). Averaged over probes."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    nodes, weights = _as_probes(nodes, weights)
    mass = jnp.sum(weights * (jnp.abs(nodes) > eps), axis=-1) / jnp.sum(weights, axis=-1)
    return jnp.mean(mass)


def density_epsilon_rank(nodes, weights, eps, num_points=10000, sigma2=1e-5):
    """Fraction in [0, 1] of the smoothed density's mass with |u| > eps: the Riemann sum of
    `density(nodes, weights, num_points, sigma2)` over its grid points with |u| > eps (`density` makes the
    sum over the whole grid 1).

    This is how the authors' code computed the normalized epsilon-rank of Fig. 2 (Sec. 5, App. F.2): from
    the Gaussian-smoothed density of App. F.1, not from the quadrature weights. Unlike `epsilon_rank`, a
    node within a few kernel widths of +-eps (or of the grid's edge) contributes part of its weight.
    Probes are pooled as in `density`.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    grid, values = density(nodes, weights, num_points, sigma2)
    return jnp.sum(jnp.where(jnp.abs(grid) > eps, values, 0.0)) * (grid[1] - grid[0])


def _as_probes(nodes, weights):
    nodes, weights = jnp.asarray(nodes), jnp.asarray(weights)
    if nodes.shape != weights.shape or nodes.ndim not in (1, 2):
        raise ValueError(f"nodes and weights must share a [num_iters] or [num_probes, num_iters] shape, "
                         f"got {nodes.shape} and {weights.shape}")
    return jnp.atleast_2d(nodes), jnp.atleast_2d(weights)
