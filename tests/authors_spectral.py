"""The authors' spectral penalty computed by hand (float64 NumPy), shared by the scripts' start-vector tests: each
kernel's power iteration starts from jax.random.PRNGKey(its index in the authors' counter over kernels)."""
import jax
import numpy as np


def kernel_paths(params):
    """The kernels' ("w" leaves') paths, as jax.tree_util.keystr, in leaf order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if path[-1].key == "w"]


def authors_sigma(w, index, iters):
    """sigma_max as the authors' power iteration: v = normal(PRNGKey(index), (out,)), not normalized; `iters` times
    v <- W^T W v / (|W^T W v| + 1e-6); sigma = |W v|. A conv kernel is (kh*kw*in, out)."""
    w = np.asarray(w, np.float64).reshape(-1, np.shape(w)[-1])
    v = np.asarray(jax.random.normal(jax.random.PRNGKey(index), (w.shape[1],)), np.float64)
    for _ in range(iters):
        v = w.T @ (w @ v)
        v = v / (np.linalg.norm(v) + 1e-6)
    return np.linalg.norm(w @ v)


def authors_penalty(params, table, k=2.0, target=2.0, iters=10):
    """sum over kernels of (sigma^k - target)^2 with the start key `table[path]`, + (scale - 1)^2 + the squares of
    every other leaf (our trees hold only kernels, biases, scales and shifts where this is used)."""
    total = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, x = path[-1].key, np.asarray(x, np.float64)
        if name == "w":
            total += (authors_sigma(x, table[jax.tree_util.keystr(path)], iters) ** k - target) ** 2
        else:
            total += np.sum(np.square(x - (name == "scale")))
    return total
