"""The small shared core of the experiment scripts.

Init, the regularizers and interventions the paper compares (L2, ER, L2-ER, continual backprop, Shrink &
Perturb), plasticity metrics (effective rank, dead units, parameter norm), and run plumbing (errors, run
directories, atomic files, checkpoints, sweeps, progress). Everything numerical is pure and jittable.
"""
import contextlib
import itertools
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------
def fail(message):
    """Stop with a one-line error on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"error: {message}")


def check_agent(agent, agents):
    """Stop with one line unless `agent` is one of `agents` (the scripts' main() can be called without tyro)."""
    if agent not in agents:
        fail(f"unknown agent {agent!r}; choose one of {', '.join(agents)}")


def cli(args_class):
    """Parse the command line into `args_class` with tyro (--help as usual). An unknown option (a typo) stops
    with one line and exit status 1; a malformed value gets tyro's own message (it names the flag and what it
    accepts) and exit status 2."""
    import tyro  # only the command line needs it (machines without tyro can import the scripts)

    args, unknown = tyro.cli(args_class, return_unknown_args=True)
    if unknown:
        options = [u for u in unknown if u.startswith("-")] or unknown
        fail(f"unrecognized option{'s' * (len(options) > 1)} {' '.join(options)} (see --help)")
    return args


# ----------------------------------------------------------------------------------------------------------
# Init (paper App. G.1: Kaiming-uniform weights, zero biases)
# ----------------------------------------------------------------------------------------------------------
def kaiming_bound(fan_in):
    """Bound of He/Kaiming-uniform init for ReLU: U(-b, b) with b = sqrt(6 / fan_in)."""
    return math.sqrt(6.0 / fan_in)


def dense_init(key, fan_in, fan_out):
    """Dense layer {"w": [fan_in, fan_out], "b": [fan_out]}: Kaiming-uniform weights, zero bias."""
    bound = kaiming_bound(fan_in)
    return {"w": jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -bound, bound),
            "b": jnp.zeros(fan_out, jnp.float32)}


def conv_init(key, kh, kw, cin, cout):
    """Conv layer {"w": [kh, kw, cin, cout] (HWIO), "b": [cout]}: Kaiming-uniform with fan_in = kh*kw*cin."""
    bound = kaiming_bound(kh * kw * cin)
    return {"w": jax.random.uniform(key, (kh, kw, cin, cout), jnp.float32, -bound, bound),
            "b": jnp.zeros(cout, jnp.float32)}


# ----------------------------------------------------------------------------------------------------------
# Effective rank (Roy & Vetterli 2007) and the ER regularizer (paper App. D)
# ----------------------------------------------------------------------------------------------------------
def singular_values(features, method="svd"):
    """Singular values of a [n, d] feature matrix.

    method "svd": `jnp.linalg.svd`, accurate down to ~machine eps x the largest value (the metric).
    method "qr": the ER step's route. A QR factorization of the tall side leaves a small square triangular
    factor R (min(n, d) wide) with the same singular values, which an SVD of R gives cheaply. Its gradient is
    the exact one, U diag(g) V^T, written out (`_singular_values_qr`): differentiating the QR itself would
    divide by R's diagonal, which is 0 when features have dead units. Exact down to the smallest singular
    value, so the collapsed directions the ER step exists to revive (paper App. D) get their gradient.
    method "gram": square roots of the eigenvalues of the smaller Gram matrix, cheapest, but eigenvalues below
    the Gram matrix's noise level (largest x max(n, d) x eps) count as zeros, so every singular value below
    ~sqrt(max(n, d) x eps) of the largest (~1% for 1,000 units in float32) is dropped along with its
    gradient; on a spectrum spanning four decades the ER gradient points elsewhere (cosine 0.28 with the
    exact one). Kept only as the speed baseline of `bench.py`.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be a [n, d] matrix, got shape {features.shape}")
    if method == "svd":
        return jnp.linalg.svd(features, compute_uv=False)
    if method == "qr":
        return _singular_values_qr(features)
    if method != "gram":
        raise ValueError(f"method must be 'svd', 'qr' or 'gram', got {method!r}")
    n, d = features.shape
    gram = features @ features.T if n <= d else features.T @ features
    eigenvalues = jnp.linalg.eigvalsh(gram)
    tolerance = jnp.max(eigenvalues) * max(n, d) * jnp.finfo(features.dtype).eps
    positive = eigenvalues > tolerance
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, eigenvalues, 1.0)), 0.0)


def _svd_via_qr(features):
    """(U, s, Vt) of a [n, d] matrix from a QR of its tall side and an SVD of the small R factor."""
    tall = features if features.shape[0] >= features.shape[1] else features.T
    q, r = jnp.linalg.qr(tall)
    u_r, s, vt = jnp.linalg.svd(r, full_matrices=False)
    u = q @ u_r  # tall = (q u_r) diag(s) vt
    return (u, s, vt) if tall is features else (vt.T, s, u.T)


@jax.custom_vjp
def _singular_values_qr(features):
    return _svd_via_qr(features)[1]


def _singular_values_qr_fwd(features):
    u, s, vt = _svd_via_qr(features)
    return s, (u, vt)


def _singular_values_qr_bwd(residuals, g):
    # d s_i / d A = u_i v_i^T. Where singular values repeat, the u_i, v_i are not unique, but the sum over a
    # repeated value of g_i u_i v_i^T is (g is equal there: it depends on s only), so the gradient is exact.
    u, vt = residuals
    return ((u * g) @ vt,)


_singular_values_qr.defvjp(_singular_values_qr_fwd, _singular_values_qr_bwd)


def effective_rank(features, method="svd"):
    """Effective rank of a [n, d] feature matrix: exp of the entropy of p = s / sum(s) over its singular
    values s (not squared, as the authors' code). 0 for an all-zero matrix. `method` as in
    `singular_values`: "svd" for metrics, "qr" (exact gradient) for the ER step."""
    s = singular_values(features, method)
    total = jnp.sum(s)
    p = s / jnp.where(total > 0, total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def effective_ranks(features_list, method="svd"):
    """`effective_rank` of each [n, d] matrix in the list, stacked, computed one after another: on a CPU, batched
    LAPACK solvers that XLA runs at the same time (independent layers, vmapped members) can deadlock its thread
    pool. Adding min(previous rank, 0) = 0 to the next features makes each solve wait for the previous one (an
    optimization barrier does not: XLA drops it before scheduling); stop_gradient keeps the gradient exact."""
    ranks = []
    for features in features_list:
        if ranks:
            features = features + jnp.minimum(jax.lax.stop_gradient(ranks[-1]), 0.0)
        ranks.append(effective_rank(features, method))
    return jnp.stack(ranks)


def er_ascent(params, features_fn, inputs, er_lr):
    """One ER step as the authors' code applies it: plain gradient ascent, outside the optimizer
    (no momentum, no decay), on the mean over layers of the effective rank of `features_fn(params, inputs)`
    (a list of [n, d] matrices). Returns `(new_params, mean_effective_rank)` (the rank before the step)."""
    def mean_rank(p):
        return jnp.mean(effective_ranks(features_fn(p, inputs), method="qr"))

    value, grads = jax.value_and_grad(mean_rank)(params)
    return jax.tree.map(lambda p, g: p + er_lr * g, params, grads), value


# ----------------------------------------------------------------------------------------------------------
# Optimizers with coupled L2 (the authors' code: weight decay is added to the gradient before the optimizer)
# ----------------------------------------------------------------------------------------------------------
def sgd(lr, weight_decay=0.0, momentum=0.0):
    """SGD on `grad + weight_decay * params`; `lr` and `weight_decay` may be traced scalars,
    `momentum` is a Python float (0 = plain SGD, no optimizer state)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(lr, momentum=momentum if momentum else None))


def adam(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    """Adam on `grad + weight_decay * params` (coupled L2, not AdamW)."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr, b1=b1, b2=b2, eps=eps))


# ----------------------------------------------------------------------------------------------------------
# Spectral regularization (Lewandowski et al. 2024, in the form of the authors' later runs)
# ----------------------------------------------------------------------------------------------------------
def power_iteration(w, iters, start):
    """(sigma_max, v) of a [m, n] matrix after `iters` power iterations from the vector `start` [n]; v is the
    last right vector, gradient-free (to carry to the next step). Differentiable through the iterations
    (unrolled, as the authors' code differentiates through them)."""
    v = start / jnp.linalg.norm(start)
    for _ in range(iters):
        u = w @ v
        u = u / (jnp.linalg.norm(u) + 1e-12)
        v = w.T @ u
        v = v / (jnp.linalg.norm(v) + 1e-12)
    return jnp.linalg.norm(w @ v), jax.lax.stop_gradient(v)


def sigma_max(w, iters, start):
    """Largest singular value of a [m, n] matrix by `iters` power iterations from `start` (differentiable)."""
    return power_iteration(w, iters, start)[0]


def spectral_starts(params):
    """The fixed start vector of each kernel's power iteration (a key from its position among the leaves)."""
    return [jax.random.normal(jax.random.key(i), (x.shape[-1],), x.dtype)
            for i, (path, x) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])
            if getattr(path[-1], "key", None) == "w"]


def spectral_penalty(params, k=2.0, target=2.0, iters=10, starts=None):
    """sum over kernels W of (sigma_max(W)^k - target)^2 + sum of squared biases; a leaf named "w" is a kernel
    (conv kernels [.., in, out] as (kh*kw*in, out)), "scale" a normalization scale (penalized towards 1),
    every other leaf a bias. The authors: k = 2, target = 2; Lewandowski et al.: sigma_max near 1.
    `starts`: the kernels' power-iteration start vectors; None = the same fixed vectors every step
    (`spectral_starts`, the authors' form); the vectors a previous call returned = a persistent iteration.
    Returns (penalty, the kernels' last right vectors)."""
    starts = spectral_starts(params) if starts is None else starts
    total, ends = 0.0, []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = getattr(path[-1], "key", None)
        if name == "w":
            sigma, v = power_iteration(x.reshape(-1, x.shape[-1]), iters, starts[len(ends)])
            total, ends = total + (sigma ** k - target) ** 2, ends + [v]
        elif name == "scale":
            total = total + jnp.sum(jnp.square(x - 1.0))
        else:
            total = total + jnp.sum(jnp.square(x))
    return total, ends


def layer_norm(x, scale, shift, eps=1e-6):
    """LayerNorm over the last axis with a learnable scale and shift (the authors' layernorm-l2 runs; Lyle
    et al. 2024 pair it with L2)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + shift


# ----------------------------------------------------------------------------------------------------------
# ReDo (Sokar et al. 2023): recycle dormant units
# ----------------------------------------------------------------------------------------------------------
def dormant_units(activations, tau):
    """[units] bool: units whose score s_i = mean|h_i| / (mean over the layer's units of mean|h_k|) is <= tau,
    on a batch of post-activation features [..., units] (conv: channels last). A layer that is all zero
    scores 0 everywhere (every unit is dormant)."""
    score = jnp.mean(jnp.abs(activations.reshape(-1, activations.shape[-1])), axis=0)
    layer_mean = jnp.mean(score)
    return score / jnp.where(layer_mean > 0, layer_mean, 1.0) <= tau


# ----------------------------------------------------------------------------------------------------------
# Shrink & Perturb (Ash & Adams 2020): the shrink is weight decay (agent snp-l2), the perturb is below
# ----------------------------------------------------------------------------------------------------------
def shrink_perturb(params, key, perturb_scale):
    """Add N(0, perturb_scale^2) noise to every parameter."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + perturb_scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


# ----------------------------------------------------------------------------------------------------------
# Continual backprop (Dohare et al. 2024: their algorithm and utilities), one hidden layer at a time
# ----------------------------------------------------------------------------------------------------------
CBP_UTILITIES = ("contribution", "adaptable_contribution")


class CBPState(NamedTuple):
    utility: jax.Array          # [units] running average (decay_rate) of the utility, not bias-corrected
    mean_activation: jax.Array  # [units] running average of the activation (centres adaptable_contribution)
    age: jax.Array              # [units] int32 steps since the unit was (re)initialized
    pending: jax.Array          # scalar: accumulated fractional number of units to replace


def cbp_init(num_units):
    zeros = jnp.zeros(num_units, jnp.float32)
    return CBPState(zeros, zeros, jnp.zeros(num_units, jnp.int32), jnp.zeros((), jnp.float32))


def cbp_max_replace(replacement_rate, num_units):
    """Static bound on units replaced in one step: pending < 1 before a step adds rate x eligible."""
    return max(1, min(num_units, int(math.floor(1.0 + replacement_rate * num_units))))


def _mean_abs_except(w, axis):
    axis = axis % w.ndim
    return jnp.mean(jnp.abs(w), axis=tuple(a for a in range(w.ndim) if a != axis))


def cbp_select(state, activations, w_out, *, w_in=None, utility="contribution", replacement_rate, decay_rate,
               maturity_threshold, max_replace, out_unit_axis=0):
    """Update ages and utilities of one hidden layer and choose the units to replace this step.

    The utility of unit j is a running average (`decay_rate`) of, per step, as Dohare et al.'s configs use it:
    - "contribution" (their Incremental CIFAR and Slippery Ant): mean|h_j| x mean|outgoing weights of j|;
    - "adaptable_contribution" (their Permuted MNIST and Continual ImageNet): mean|h_j - m_j| x
      mean|outgoing weights of j| / mean|incoming weights of j|, with m_j the running average of h_j,
      bias-corrected by 1 - decay_rate^age. Needs `w_in` (unit axis last: dense [in, units], conv HWIO).
    Units older than `maturity_threshold` are eligible; replacement_rate x #eligible accumulates in
    `pending`, and its integer part is replaced now: the eligible units of lowest bias-corrected utility.
    `activations` is [..., units] (conv: channels last, so a channel is a unit); `w_out` holds the unit axis
    at `out_unit_axis`. Returns `(new_state, idx [max_replace], valid [max_replace])`: units `idx[valid]` are
    to be replaced (`cbp_replace`); their utility, running mean and age are already reset to 0.
    """
    if utility not in CBP_UTILITIES:
        raise ValueError(f"utility must be one of {CBP_UTILITIES}, got {utility!r}")
    num_units = state.utility.shape[0]
    h = activations.reshape(-1, num_units)
    age = state.age + 1
    bias_correction = 1 - decay_rate ** age.astype(state.utility.dtype)
    mean_out_weight = _mean_abs_except(w_out, out_unit_axis)
    mean_activation = decay_rate * state.mean_activation + (1 - decay_rate) * jnp.mean(h, axis=0)
    if utility == "contribution":
        step_utility = jnp.mean(jnp.abs(h), axis=0) * mean_out_weight
    else:
        if w_in is None:
            raise ValueError("utility 'adaptable_contribution' needs the incoming weights w_in")
        centred = jnp.mean(jnp.abs(h - mean_activation / bias_correction), axis=0)
        step_utility = centred * mean_out_weight / _mean_abs_except(w_in, -1)
    new_utility = decay_rate * state.utility + (1 - decay_rate) * step_utility
    corrected = new_utility / bias_correction
    eligible = age > maturity_threshold
    num_eligible = jnp.sum(eligible)
    pending = state.pending + replacement_rate * num_eligible
    count = jnp.minimum(jnp.floor(pending), jnp.minimum(num_eligible, max_replace)).astype(jnp.int32)
    pending = pending - count
    _, idx = jax.lax.top_k(-jnp.where(eligible, corrected, jnp.inf), max_replace)
    valid = jnp.arange(max_replace) < count

    def reset(x):
        return x.at[idx].set(jnp.where(valid, jnp.zeros((), x.dtype), x[idx]))

    return (CBPState(reset(new_utility), reset(mean_activation), reset(age), pending), idx.astype(jnp.int32),
            valid)


def cbp_replace(key, w_in, b_in, w_out, idx, valid, out_unit_axis=0, init=None):
    """Re-initialize units `idx[valid]` of one hidden layer: fresh incoming weights from the init
    distribution, bias 0, outgoing weights 0 (so the network's output is unchanged).

    `init`: the layer's initializer as `init(key, shape, dtype)` (jax.nn.initializers style), called with
    w_in's full shape so that fan-in and fan-out are the layer's; None: Kaiming-uniform (`dense_init`).

    `w_in` has the unit axis last (dense [in, units] or conv HWIO); `w_out` has it at `out_unit_axis`
    (dense [units, out]: 0; conv HWIO: 2; a dense layer after a flatten, reshaped to [h, w, c, out]: 2).
    Returns `(w_in, b_in, w_out, keep_in, keep_b, keep_out)`: the keep_* masks (1 = untouched, 0 = replaced)
    have the parameters' shapes, to zero the replaced entries of optimizer state (`mask_opt_state`).
    """
    if init is None:
        bound = kaiming_bound(math.prod(w_in.shape[:-1]))
        fresh = jax.random.uniform(key, w_in.shape[:-1] + idx.shape, w_in.dtype, -bound, bound)
    else:
        fresh = init(key, w_in.shape, w_in.dtype)[..., idx]
    w_in = w_in.at[..., idx].set(jnp.where(valid, fresh, w_in[..., idx]))
    b_in = b_in.at[idx].set(jnp.where(valid, 0.0, b_in[idx]))
    out_axis = out_unit_axis % w_out.ndim
    moved = jnp.moveaxis(w_out, out_axis, 0)
    valid_rows = valid.reshape((-1,) + (1,) * (moved.ndim - 1))
    w_out = jnp.moveaxis(moved.at[idx].set(jnp.where(valid_rows, 0.0, moved[idx])), 0, out_axis)

    keep_units = jnp.ones(b_in.shape, w_in.dtype).at[idx].set(jnp.where(valid, 0.0, 1.0))
    keep_in = jnp.broadcast_to(keep_units, w_in.shape)
    out_shape = [1] * w_out.ndim
    out_shape[out_axis] = keep_units.shape[0]
    keep_out = jnp.broadcast_to(keep_units.reshape(out_shape), w_out.shape)
    return w_in, b_in, w_out, keep_in, keep_units, keep_out


def mask_opt_state(optimizer, opt_state, keep_masks):
    """Multiply every params-shaped part of an optax state (momentum, Adam moments) by `keep_masks`,
    a params-shaped tree of 0/1 masks; counts and other scalars are left alone."""
    return optax.tree_utils.tree_map_params(optimizer, lambda s, m: s * m, opt_state, keep_masks,
                                            transform_non_params=lambda s: s)


# ----------------------------------------------------------------------------------------------------------
# Plasticity metrics
# ----------------------------------------------------------------------------------------------------------
def dead_units(activations):
    """Number of units (last axis) whose post-ReLU output is exactly 0 on every input (paper Def. 6.1)."""
    num_units = activations.shape[-1]
    return jnp.sum(jnp.all(activations.reshape(-1, num_units) == 0, axis=0))


def param_norm(params):
    """Global L2 norm of all parameters."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------------------
# Sweeps and seeds: a run trains config x seed "members" together; member m = (config m // S, seed m % S)
# ----------------------------------------------------------------------------------------------------------
def sweep(**values):
    """Cartesian product of the given value tuples: one dict per config, in row-major order. Every swept
    hyperparameter (learning rates, weight decay) must be finite and >= 0, and a learning rate `lr` > 0."""
    for name, vals in values.items():
        if not vals or any(not np.isfinite(v) or v < 0 or (name == "lr" and v == 0) for v in vals):
            fail(f"--{name.replace('_', '-')} needs finite values >= 0 (lr > 0), got {tuple(vals)}")
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def stack_members(configs, seeds):
    """Config index and seed of every member, flattened config-major: two int arrays of length C*S."""
    return np.repeat(np.arange(len(configs)), len(seeds)), np.tile(np.asarray(seeds), len(configs))


def shard_members(tree):
    """Spread the leading (member) axis of every leaf over the local devices, when there are several and
    the axis divides evenly; otherwise return the tree unchanged."""
    devices = jax.local_devices()
    leading = {x.shape[0] for x in jax.tree.leaves(tree)}
    if len(devices) < 2 or len(leading) != 1 or leading.pop() % len(devices):
        return tree
    mesh = jax.sharding.Mesh(np.array(devices), ("members",))
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("members")))


def report_diverged(finite, configs, seeds, where, known=None):
    """Warn (one line each) about members whose values are no longer finite; the others go on.

    `finite` is [C, S] bool; members already in `known` ([C, S] bool) are not reported again.
    Returns the updated [C, S] mask of diverged members.
    """
    diverged = ~np.asarray(finite, bool)
    known = np.zeros_like(diverged) if known is None else np.asarray(known, bool)
    for c, s in zip(*np.nonzero(diverged & ~known)):
        print(f"warning: config {configs[c]} seed {seeds[s]} diverged (non-finite values) at {where}; "
              f"its metrics are NaN from here, the other members continue", file=sys.stderr, flush=True)
    return diverged | known


# ----------------------------------------------------------------------------------------------------------
# Run output: every file is written to a temporary name in the same folder, then renamed over the target
# ----------------------------------------------------------------------------------------------------------
def make_run_dir(script, agent, out_dir=None):
    """`out_dir` if given, else `runs/<script>__<agent>__<UTC timestamp>` (created)."""
    if out_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out_dir = Path("runs") / f"{script}__{agent}__{stamp}"
        suffix = 1
        while out_dir.exists():
            suffix += 1
            out_dir = Path("runs") / f"{script}__{agent}__{stamp}-{suffix}"
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz(path, **arrays):
    """Write a compressed .npz atomically."""
    _atomic_write(path, lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def save_json(path, obj):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def script_name(args):
    """The file name (stem) of the script whose Args these are: `my_idea` for a fork saved as my_idea.py."""
    return Path(sys.modules[type(args).__module__].__file__).stem


def save_config(run_dir, args, configs, seeds, benchmark=None):
    """Write config.json: the script, the benchmark it runs (plot.py groups runs by it, so a fork's runs
    overlay its parent's), every Args field, the config axis, the seeds and provenance."""
    script = script_name(args)
    save_json(Path(run_dir) / "config.json", {
        "script": script,
        "benchmark": benchmark or script,
        "agent": getattr(args, "agent", None),
        "args": asdict(args) if is_dataclass(args) else dict(vars(args)),
        "configs": list(configs),
        "seeds": [int(s) for s in seeds],
        "git_commit": git_commit(),
        "jax_version": jax.__version__,
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def open_run(script, args, resume_free):
    """The run directory and, with `args.resume`, the checkpoint to continue (None for a new run).

    A resumed run must repeat the checkpoint's flags (`checkpoint["args"]`, as `asdict(args)` stored them)
    except those named in `resume_free`; a new run refuses a folder that already holds a checkpoint.
    """
    if not args.resume:
        if args.out_dir is not None and (Path(args.out_dir) / "checkpoint.pkl").exists():
            fail(f"{args.out_dir} already holds a run: pass --resume to continue it, or another --out-dir")
        return make_run_dir(script, args.agent, args.out_dir), None
    if args.out_dir is None:
        fail("--resume needs --out-dir pointing at the run to continue")
    run_dir = Path(args.out_dir)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        fail(f"--resume: no checkpoint.pkl in {run_dir}")
    saved = checkpoint["args"]
    changed = sorted(k for k, v in asdict(args).items() if k not in resume_free and saved.get(k) != v)
    if changed:
        fail(f"--resume with different settings than the run in {run_dir}: {', '.join(changed)}")
    return run_dir, checkpoint


class _PRNGKeys(NamedTuple):
    """Pickle-able stand-in for a typed PRNG key array."""
    impl: str
    data: np.ndarray


def save_checkpoint(run_dir, state):
    """Pickle `state` (a pytree of arrays, typed PRNG keys and Python values) to checkpoint.pkl atomically."""
    def to_host(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return _PRNGKeys(str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    host_state = jax.tree.map(to_host, state)
    _atomic_write(Path(run_dir) / "checkpoint.pkl", lambda f: pickle.dump(host_state, f))


def load_checkpoint(run_dir):
    """The state saved by `save_checkpoint`, with arrays back on the device; None if there is none."""
    path = Path(run_dir) / "checkpoint.pkl"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        host_state = pickle.load(f)

    def to_device(x):
        if isinstance(x, _PRNGKeys):
            return jax.random.wrap_key_data(jnp.asarray(x.data), impl=x.impl)
        return jnp.asarray(x) if isinstance(x, np.ndarray) else x

    return jax.tree.map(to_device, host_state, is_leaf=lambda x: isinstance(x, _PRNGKeys))


# ----------------------------------------------------------------------------------------------------------
# Members together, metrics arrays, interrupts and resume commands (the redesigned scripts' driver pieces)
# ----------------------------------------------------------------------------------------------------------
MEMBER_BATCHING = ("auto", "vmap", "map")


def resolve_batching(choice):
    """"auto" -> "map" on a single CPU device (measured ~2x faster per member there), else "vmap"."""
    if choice == "auto":
        return "map" if jax.default_backend() == "cpu" and jax.local_device_count() == 1 else "vmap"
    return choice


def over_members(fn, batching, in_axes):
    """`fn` of one member, run for every member: `in_axes` marks each argument 0 (member axis leading) or
    None (shared). "vmap": one jitted batched program. "map": one jitted single-member program called for
    each member in turn (one executable for any member count; members are split and stacked on the host)."""
    if batching == "vmap":
        return jax.jit(jax.vmap(fn, in_axes=in_axes))
    single = jax.jit(fn)

    def run(*args):
        batched = [jax.device_get(a) if axis == 0 else a for a, axis in zip(args, in_axes)]
        size = next(jax.tree.leaves(a)[0].shape[0] for a, axis in zip(batched, in_axes) if axis == 0)
        outs = [single(*[jax.tree.map(lambda x: x[m], a) if axis == 0 else a for a, axis in zip(batched, in_axes)])
                for m in range(size)]
        return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(outs))

    return run


def new_metrics(shapes, members, units):
    """{name: array [members, units, *shape]}: NaN for float metrics, 0 for integer ones; `shapes` maps
    name -> (shape, dtype). Units (tasks, updates) are filled in as they finish."""
    return {k: np.full((members, units) + tuple(shape), np.nan if np.issubdtype(dtype, np.floating) else 0, dtype)
            for k, (shape, dtype) in shapes.items()}


def grow_metrics(metrics, units):
    """Pad every [members, old_units, ...] array to `units` (a resumed run asked for more tasks)."""
    def grow(a):
        pad = np.full((a.shape[0], units - a.shape[1]) + a.shape[2:],
                      np.nan if np.issubdtype(a.dtype, np.floating) else 0, a.dtype)
        return np.concatenate([a, pad], axis=1) if units > a.shape[1] else a

    return {k: grow(np.array(a)) for k, a in metrics.items()}  # writable host copies


class Members:
    """The configs x seeds a run trains together: member m = (config m // S, seed m % S)."""

    def __init__(self, configs, seeds, batching="auto"):
        self.configs, self.seed_list = list(configs), [int(s) for s in seeds]
        self.config_index, member_seed = stack_members(self.configs, self.seed_list)
        self.seeds = jnp.asarray(member_seed, jnp.int32)
        self.count, self.grid = len(member_seed), (len(self.configs), len(self.seed_list))
        self.batching = resolve_batching(batching)

    def hyperparameters(self, names):
        """{name: float32 [members]} of the swept hyperparameters (0 where a config lacks one)."""
        return {n: jnp.asarray([self.configs[c].get(n, 0.0) for c in self.config_index], jnp.float32) for n in names}

    def run(self, fn, in_axes, batching=None):
        return over_members(fn, batching or self.batching, in_axes)

    def grid_shaped(self, a):
        """[members, ...] -> [configs, seeds, ...]."""
        return np.asarray(a).reshape(self.grid + np.shape(a)[1:])

    def __str__(self):
        return (f"{self.count} members ({self.grid[0]} configs x {self.grid[1]} seeds), {jax.device_count()} x "
                f"{jax.devices()[0].device_kind}, member batching {self.batching}")


class Run:
    """A run directory and everything resume needs, in one checkpoint dict: the args, the training state,
    the metrics ([members, units, ...] arrays, NaN / 0 until filled), the spectra, the diverged members and
    the cursor (the unit in progress, the calls of it done, and its partial sums). New or resumed by `args`."""

    def __init__(self, benchmark, args, resume_free, members, units, shapes, spectra_shapes=None, spectra_units=0):
        self.args, self.members = args, members
        self.dir, ckpt = open_run(script_name(args), args, resume_free)  # runs/<script>__<agent>__<stamp>
        save_config(self.dir, args, members.configs, members.seed_list, benchmark)
        if ckpt is None:
            self.state, self.cursor = None, {"unit": 0, "call": 0, "partial": {}}
            self.metrics = new_metrics(shapes, members.count, units)
            self.spectra = new_metrics(spectra_shapes or {}, members.count, spectra_units)
            self.diverged = np.zeros(members.grid, bool)
        else:
            self.state, self.cursor, self.diverged = ckpt["state"], ckpt["cursor"], np.asarray(ckpt["diverged"])
            self.metrics = grow_metrics(ckpt["metrics"], units)
            self.spectra = grow_metrics(ckpt["spectra"], spectra_units)
            print(f"resuming {self.dir}: {self.cursor['unit']} done, {self.cursor['call']} calls into the next",
                  flush=True)

    def record(self, unit, values, where):
        """Store unit `unit`'s metrics ({name: [members, ...]}; `finite` [members] marks members whose
        parameters are finite, the others get NaN accuracies), report new divergences, advance the cursor."""
        values = dict(values)
        finite = np.asarray(values.pop("finite"), bool)
        for name, v in values.items():
            v = np.asarray(v)
            if name.endswith("_acc"):  # a non-finite network's argmax means nothing
                v = np.where(finite, v, np.nan)
            self.metrics[name][:, unit] = v
        self.diverged = report_diverged(self.members.grid_shaped(finite), self.members.configs,
                                        self.members.seed_list, where, known=self.diverged)
        self.cursor = {"unit": unit + 1, "call": 0, "partial": {}}

    def accumulate(self, calls_done, **sums):
        """Add a call's sums (online accuracy counts, losses) to the unit in progress; `calls_done` of it done."""
        partial = self.cursor["partial"]
        self.cursor = {**self.cursor, "call": calls_done,
                       "partial": {k: partial[k] + v if k in partial else v for k, v in sums.items()}}

    def checkpoint(self, state):
        save_checkpoint(self.dir, {"args": asdict(self.args), "state": state, "cursor": self.cursor,
                                   "metrics": self.metrics, "spectra": self.spectra, "diverged": self.diverged})

    def save(self, spectra_units=None):
        """metrics.npz ([configs, seeds, units done, ...] arrays and `diverged`), and the spectra of the
        `spectra_units` measured so far (hessian.npz: `tasks` and [configs, seeds, K, ...] arrays)."""
        done = self.cursor["unit"]
        save_npz(self.dir / "metrics.npz", diverged=self.diverged,
                 **{k: self.members.grid_shaped(v[:, :done]) for k, v in self.metrics.items()})
        if spectra_units:
            save_npz(self.dir / "hessian.npz", tasks=np.asarray(spectra_units),
                     **{k: self.members.grid_shaped(v[:, :len(spectra_units)]) for k, v in self.spectra.items()})


def finite_mean(values):
    """Mean over the finite entries (diverged members are NaN); NaN if there are none."""
    values = np.asarray(values, np.float64)
    return float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")


class StepTimer:
    """Wall time of the calls timed with `timing(include)`; the caller adds the steps they did to `steps`."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    @contextlib.contextmanager
    def timing(self, include=True):
        start = time.perf_counter()
        yield
        if include:
            self.seconds += time.perf_counter() - start


class StopRequests:
    """SIGINT / SIGTERM ask the run to stop at its next safe point (`requested`), where it checkpoints. The
    first signal's default action is then restored, so a second Ctrl-C kills the process at once; the last
    checkpoint stays intact because every file is written atomically."""

    def __init__(self):
        self.signal = None
        import signal
        self._signal = signal
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.signal = signum
        self._signal.signal(signum, self._signal.SIG_DFL)
        print("\nstopping at the next safe point (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signal is not None

    def close(self):
        for sig, handler in self._previous.items():
            self._signal.signal(sig, handler)

    def exit(self, where, command):
        """Leave after the checkpoint: one line, exit status 128 + signal (130 for SIGINT, 143 for SIGTERM)."""
        self.close()
        print(f"interrupted after {where}; resume with: {command}", flush=True)
        raise SystemExit(128 + int(self.signal))


def resume_command(args, run_dir):
    """The command line that continues `args`'s run in `run_dir`: the script, every flag that differs from
    its default, then --resume --out-dir."""
    defaults, flags = type(args)(), []
    for name, value in asdict(args).items():
        if name in ("resume", "out_dir") or value == getattr(defaults, name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (tuple, list)):
            flags.append(f"{flag} {' '.join(str(v) for v in value)}")
        else:
            flags.append(f"{flag} {value}")
    script = Path(sys.modules[type(args).__module__].__file__).name
    return " ".join(["python", script, *flags, "--resume", "--out-dir", str(run_dir)])


# ----------------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------------
class Progress:
    """One line per update: `task 12/800 | online_acc 0.912 | 45,210 steps/s | ETA 1h02m`.

    steps/s is measured over the last chunk; the ETA uses the mean time per unit, leaving out the first
    chunk (compilation) once there are others.
    """

    def __init__(self, total_units, unit_name="task", start_units=0):
        self.total, self.unit_name = total_units, unit_name
        self.start_units = self.done = start_units
        self.last_time = time.perf_counter()
        self.first_chunk_end = None  # (time, units) after the first (compiling) chunk

    def update(self, done_units, new_steps, **shown):
        now = time.perf_counter()
        rate = new_steps / max(now - self.last_time, 1e-9)
        if self.first_chunk_end is None:
            self.first_chunk_end = (now, done_units)
            per_unit = (now - self.last_time) / max(done_units - self.start_units, 1)
        else:
            t0, u0 = self.first_chunk_end
            per_unit = (now - t0) / max(done_units - u0, 1)
        self.last_time, self.done = now, done_units
        eta = _format_seconds(per_unit * (self.total - done_units))
        metrics = "".join(f" | {k} {v:.4g}" if isinstance(v, float) else f" | {k} {v}" for k, v in shown.items())
        print(f"{self.unit_name} {done_units}/{self.total}{metrics} | {rate:,.0f} steps/s | ETA {eta}", flush=True)


def _format_seconds(seconds):
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# ----------------------------------------------------------------------------------------------------------
# Datasets: tensorflow-datasets only to prepare, then one cached .npz that loads without it
# ----------------------------------------------------------------------------------------------------------
def tfds_batches(name, data_dir, manual_dir, split, missing_hint, batch_size=10_000):
    """Prepare tfds dataset `name` (offline from `manual_dir` when given) and yield its `split` in tfds's order
    as (images uint8, labels int64) batches. Any failure stops with `missing_hint` on one line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        fail(f"tensorflow-datasets is needed to prepare {name} (pip install -r requirements.txt); {missing_hint}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        config = tfds.download.DownloadConfig(manual_dir=str(manual_dir)) if manual_dir else None
        builder.download_and_prepare(download_config=config)
        for batch in tfds.as_numpy(builder.as_dataset(split=split).batch(batch_size)):
            yield batch["image"], batch["label"].astype(np.int64)
    except Exception as e:  # tfds raises many kinds (network, missing manual files, corrupt archives)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"could not prepare {name}: {reason[:200]}. {missing_hint}")


def tfds_arrays(name, data_dir, manual_dir, splits, missing_hint):
    """{split: (images uint8, labels int64)}: whole splits of tfds dataset `name` (see tfds_batches)."""
    arrays = {}
    for split in splits:
        images, labels = zip(*tfds_batches(name, data_dir, manual_dir, split, missing_hint))
        arrays[split] = (np.concatenate(images), np.concatenate(labels))
    return arrays


def load_cached(cache_path, build_fn):
    """Load the arrays cached at `cache_path` (.npz), or build them with `build_fn() -> dict` and cache them."""
    cache_path = Path(cache_path)
    if cache_path.exists():
        with np.load(cache_path) as data:
            return {k: data[k] for k in data.files}
    arrays = build_fn()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(cache_path, **arrays)
    return arrays
