"""The science the experiment scripts share (pure, jittable); their run plumbing is in runner.py.

Kaiming init, effective rank and the ER step, optimizers with coupled L2, spectral regularization, LayerNorm,
ReDo, Shrink & Perturb, continual backprop, plasticity metrics.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


# Init (paper App. G.1): He/Kaiming-uniform weights for ReLU, U(-b, b) with b = sqrt(6 / fan_in); zero biases.
def kaiming_bound(fan_in):
    return math.sqrt(6.0 / fan_in)


def dense_init(key, fan_in, fan_out):
    """{"w": [fan_in, fan_out], "b": [fan_out]}."""
    bound = kaiming_bound(fan_in)
    return {"w": jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -bound, bound),
            "b": jnp.zeros(fan_out, jnp.float32)}


# Effective rank (Roy & Vetterli 2007) and the ER step (paper App. D)
def singular_values(features, method="svd"):
    """Singular values of a [n, d] matrix. "svd": the metric. "qr": QR of the tall side, then an SVD of the small
    R, with the exact gradient U diag(g) V^T written out (differentiating QR divides by R's diagonal, 0 with dead
    units): the ER step, which must reach the collapsed directions. "gram": eigenvalues of the smaller Gram
    matrix; drops every value below ~sqrt(max(n, d) eps) of the largest with its gradient (cosine 0.28 with the
    exact ER gradient on a four-decade spectrum), so only bench.py's speed baseline uses it."""
    if features.ndim != 2 or method not in ("svd", "qr", "gram"):
        raise ValueError(f"need a [n, d] matrix and method 'svd', 'qr' or 'gram', got {features.shape}, {method!r}")
    if method == "svd":
        return jnp.linalg.svd(features, compute_uv=False)
    if method == "qr":
        return _singular_values_qr(features)
    n, d = features.shape
    gram = features @ features.T if n <= d else features.T @ features
    eigenvalues = jnp.linalg.eigvalsh(gram)
    tolerance = jnp.max(eigenvalues) * max(n, d) * jnp.finfo(features.dtype).eps
    positive = eigenvalues > tolerance
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, eigenvalues, 1.0)), 0.0)


def _svd_via_qr(features):
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
    # d s_i / dA = u_i v_i^T. For a repeated value u_i, v_i are not unique, but g is equal there (it depends on s
    # only), so the sum of g_i u_i v_i^T over it is, and the gradient is exact.
    u, vt = residuals
    return ((u * g) @ vt,)


_singular_values_qr.defvjp(_singular_values_qr_fwd, _singular_values_qr_bwd)


def effective_rank(features, method="svd"):
    """exp(entropy of p = s / sum(s)) over the singular values s (not squared, as the authors' code); 0 for an
    all-zero matrix. `method` as in `singular_values`."""
    s = singular_values(features, method)
    total = jnp.sum(s)
    p = s / jnp.where(total > 0, total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def effective_ranks(features_list, method="svd"):
    """Stacked `effective_rank`s, one solve after another: concurrent batched LAPACK solves can deadlock XLA's CPU
    thread pool. Adding min(previous rank, 0) = 0 orders them (XLA drops optimization barriers before scheduling);
    stop_gradient keeps the gradient exact."""
    ranks = []
    for features in features_list:
        if ranks:
            features = features + jnp.minimum(jax.lax.stop_gradient(ranks[-1]), 0.0)
        ranks.append(effective_rank(features, method))
    return jnp.stack(ranks)


def er_ascent(params, features_fn, inputs, er_lr, reduce=jnp.mean, has_aux=False):
    """One ER step as the authors' code: plain gradient ascent outside the optimizer (no momentum, no decay) on the
    effective ranks of the [n, d] matrices `features_fn(params, inputs)`, combined by `reduce` (their mean over
    layers; Slippery Ant sums its actor's and critic's). Returns (params, objective before). `has_aux`:
    features_fn returns (matrices, aux), and the result is (params, objective before, aux at the parameters
    before the step) (CIFAR: the BatchNorm running statistics of the ER pass)."""
    def objective(p):
        out = features_fn(p, inputs)
        features, aux = out if has_aux else (out, None)
        return reduce(effective_ranks(features, method="qr")), aux

    (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p + er_lr * g, params, grads)
    return (params, value, aux) if has_aux else (params, value)


# Optimizers with coupled L2 (the authors' code adds weight_decay * params to the gradient; not AdamW)
def sgd(lr, weight_decay=0.0, momentum=0.0):
    """`lr`, `weight_decay` may be traced; `momentum` a Python float (0: plain SGD, no state)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(lr, momentum=momentum if momentum else None))


def adam(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr, b1=b1, b2=b2, eps=eps))


# Spectral regularization (Lewandowski et al. 2024, in the form of the authors' later runs) and LayerNorm
def spectral_starts(params, key_ids=None):
    """Each kernel's ("w" leaf's) fixed power-iteration start vector: a standard normal of its last dimension
    from jax.random.key(i) (the same numbers as PRNGKey(i)), i counting the kernels only, 0, 1, 2, ... in the
    authors' order of the kernels (their code: a counter over the "kernel" leaves in Flax's sorted parameter
    order), so the penalty equals theirs. `key_ids`: each kernel's i, listed in this tree's leaf order, for a
    tree whose kernels come in another order than the authors'; None: i = the kernel's place in leaf order."""
    kernels = [x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
               if getattr(path[-1], "key", None) == "w"]
    key_ids = list(range(len(kernels))) if key_ids is None else list(key_ids)
    if sorted(key_ids) != list(range(len(kernels))):
        raise ValueError(f"key_ids must order the {len(kernels)} kernels (0 .. {len(kernels) - 1}), got {key_ids}")
    return [jax.random.normal(jax.random.key(i), (x.shape[-1],), x.dtype) for i, x in zip(key_ids, kernels)]


def spectral_penalty(params, k=2.0, target=2.0, iters=10, starts=None, key_ids=None):
    """(sum over kernels "w" of (sigma_max^k - target)^2 + sum of (scale - 1)^2 + sum of squared other leaves,
    the kernels' last right vectors). Conv kernels count as (kh*kw*in, out). The authors: k = target = 2.
    sigma_max: `iters` power iterations, unrolled so the penalty differentiates through them (as the authors'
    code), from `starts`: None = `spectral_starts(params, key_ids)` every step (the authors), the returned
    vectors = persistent."""
    starts = spectral_starts(params, key_ids) if starts is None else starts
    total, ends = 0.0, []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = getattr(path[-1], "key", None)
        if name == "w":
            w = x.reshape(-1, x.shape[-1])
            v = starts[len(ends)] / jnp.linalg.norm(starts[len(ends)])
            for _ in range(iters):
                u = w @ v
                u = u / (jnp.linalg.norm(u) + 1e-12)
                v = w.T @ u
                v = v / (jnp.linalg.norm(v) + 1e-12)
            total, ends = total + (jnp.linalg.norm(w @ v) ** k - target) ** 2, ends + [jax.lax.stop_gradient(v)]
        elif name == "scale":
            total = total + jnp.sum(jnp.square(x - 1.0))
        else:
            total = total + jnp.sum(jnp.square(x))
    return total, ends


def layer_norm(x, scale, shift, eps=1e-6):
    """LayerNorm over the last axis (the authors' layernorm-l2 runs; Lyle et al. 2024 pair it with L2)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + shift


# ReDo (Sokar et al. 2023) and Shrink & Perturb (Ash & Adams 2020; the shrink is weight decay)
def dormant_units(activations, tau):
    """[units] bool: score mean|h_i| / (layer mean of mean|h_k|) <= tau on post-activations [..., units] (conv:
    channels last); an all-zero layer scores 0 (all dormant)."""
    score = jnp.mean(jnp.abs(activations.reshape(-1, activations.shape[-1])), axis=0)
    layer_mean = jnp.mean(score)
    return score / jnp.where(layer_mean > 0, layer_mean, 1.0) <= tau


def shrink_perturb(params, key, perturb_scale):
    """Add independent N(0, perturb_scale^2) noise to every parameter. One draw for all leaves, cut into their
    shapes: one random-number kernel compiles ~7x faster than one per leaf (the ResNet-18 has 86 leaves)."""
    leaves, treedef = jax.tree.flatten(params)
    noise = perturb_scale * jax.random.normal(key, (sum(x.size for x in leaves),), jnp.float32)
    ends = np.cumsum([x.size for x in leaves])
    return jax.tree.unflatten(treedef, [x + noise[end - x.size:end].reshape(x.shape).astype(x.dtype)
                                        for x, end in zip(leaves, ends)])


# Continual backprop (Dohare et al. 2024: their algorithm and utilities), one hidden layer at a time
CBP_UTILITIES = ("contribution", "adaptable_contribution")
# dohare: Dohare et al.'s published algorithm (the default); paper: the authors' code, behind the paper's CBP curves
CBP_VARIANTS = ("dohare", "paper")


class CBPState(NamedTuple):
    utility: jax.Array          # [units] running average (decay_rate) of the utility, not bias-corrected
    mean_activation: jax.Array  # [units] running average of the activation (centres adaptable_contribution);
    # cbp_select_resnet: the running sum of (1 - decay) x mean|h| (Dohare et al.'s ResNet feature magnitude)
    age: jax.Array              # [units] int32 steps since the unit was (re)initialized
    pending: jax.Array          # accumulated fractional number of units to replace


def cbp_init(num_units):
    zeros = jnp.zeros(num_units, jnp.float32)
    return CBPState(zeros, zeros, jnp.zeros(num_units, jnp.int32), jnp.zeros((), jnp.float32))


def cbp_max_replace(replacement_rate, num_units):
    """Static bound on the units one step replaces: pending < 1 before a step adds rate x eligible."""
    return max(1, min(num_units, int(math.floor(1.0 + replacement_rate * num_units))))


def _mean_abs_except(w, axis):
    axis = axis % w.ndim
    return jnp.mean(jnp.abs(w), axis=tuple(a for a in range(w.ndim) if a != axis))


def _reset(x, idx, valid):
    """x with the entries idx[valid] set to 0 (a replaced unit's statistics)."""
    return x.at[idx].set(jnp.where(valid, jnp.zeros((), x.dtype), x[idx]))


def cbp_select(state, activations, w_out, *, w_in=None, utility="contribution", replacement_rate, decay_rate,
               maturity_threshold, max_replace, out_unit_axis=0):
    """Update one layer's ages and utilities; pick the units to replace. Per step, utility of unit j (as Dohare et
    al.'s configs): "contribution" (their CIFAR, Ant) mean|h_j| x mean|w_out of j|; "adaptable_contribution"
    (their pMNIST, ImageNet) mean|h_j - m_j| x mean|w_out of j| / mean|w_in of j|, m_j the running mean of h_j
    bias-corrected by 1 - decay^age (needs `w_in`, unit axis last). Units older than `maturity_threshold` are
    eligible; rate x #eligible accumulates in `pending`, whose integer part is replaced now, lowest bias-corrected
    utility first. `activations` [..., units]; `w_out` has the unit axis at `out_unit_axis`. Returns (state, idx,
    valid) ([max_replace] each; units idx[valid] go to `cbp_replace`, their statistics already reset to 0)."""
    if utility not in CBP_UTILITIES or (utility == "adaptable_contribution" and w_in is None):
        raise ValueError(f"utility must be one of {CBP_UTILITIES} (adaptable_contribution needs w_in), got {utility!r}")
    num_units = state.utility.shape[0]
    h = activations.reshape(-1, num_units)
    age = state.age + 1
    bias_correction = 1 - decay_rate ** age.astype(state.utility.dtype)
    mean_out_weight = _mean_abs_except(w_out, out_unit_axis)
    mean_activation = decay_rate * state.mean_activation + (1 - decay_rate) * jnp.mean(h, axis=0)
    if utility == "contribution":
        step_utility = jnp.mean(jnp.abs(h), axis=0) * mean_out_weight
    else:
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
    new_state = CBPState(_reset(new_utility, idx, valid), _reset(mean_activation, idx, valid), _reset(age, idx, valid),
                         pending)
    return new_state, idx.astype(jnp.int32), valid


def _set_units(w, unit_axis, idx, valid, fresh):
    """w with the slices idx[valid] along `unit_axis` set to `fresh` (unit axis first, one slice per idx), and
    the 0/1 keep mask of w's shape (0 at those slices)."""
    axis = unit_axis % w.ndim
    moved = jnp.moveaxis(w, axis, 0)
    rows = valid.reshape((-1,) + (1,) * (moved.ndim - 1))
    w = jnp.moveaxis(moved.at[idx].set(jnp.where(rows, fresh, moved[idx])), 0, axis)
    keep_units = jnp.ones(w.shape[axis], w.dtype).at[idx].set(jnp.where(valid, 0.0, 1.0))
    shape = [1] * w.ndim
    shape[axis] = keep_units.shape[0]
    return w, jnp.broadcast_to(keep_units.reshape(shape), w.shape)


def cbp_replace(key, w_in, b_in, w_out, idx, valid, out_unit_axis=0, init=None):
    """Re-initialize units idx[valid]: incoming weights from the init (`init(key, w_in.shape, dtype)`, None:
    Kaiming-uniform), bias 0, outgoing weights 0 (the output is unchanged). `w_in` has the unit axis last, `w_out`
    at `out_unit_axis` (dense [units, out]: 0; conv HWIO or a flattened conv output as [h, w, c, out]: 2).
    Returns (w_in, b_in, w_out, keep_in, keep_b, keep_out), the 0/1 masks for `mask_opt_state`."""
    if init is None:
        bound = kaiming_bound(math.prod(w_in.shape[:-1]))
        fresh = jax.random.uniform(key, w_in.shape[:-1] + idx.shape, w_in.dtype, -bound, bound)
    else:
        fresh = init(key, w_in.shape, w_in.dtype)[..., idx]
    w_in, keep_in = _set_units(w_in, -1, idx, valid, jnp.moveaxis(fresh, -1, 0))
    b_in, keep_b = _set_units(b_in, 0, idx, valid, jnp.zeros(idx.shape, b_in.dtype))
    w_out, keep_out = _set_units(w_out, out_unit_axis, idx, valid, jnp.zeros((), w_out.dtype))
    return w_in, b_in, w_out, keep_in, keep_b, keep_out


def cbp_select_resnet(state, activations, w_out, *, replacement_rate, decay_rate, maturity_threshold, max_replace,
                      out_unit_axis=0):
    """Dohare et al.'s ResNet generate-and-test (their res_gnt.py, Incremental CIFAR), one layer. Per step every
    unit ages by 1 and its feature magnitude, a running SUM of (1 - decay) x mean|h_j| (`mean_activation`;
    never decayed and not reset when the unit is replaced), grows. Once any unit is older than
    `maturity_threshold`, rate x #units (all units, not only the eligible) accumulates in `pending`; its integer
    part is replaced now (at most #eligible), lowest utility = mean|w_out of j| x magnitude_j first, among the
    eligible. `utility` holds the last replacing step's utility (0 for units replaced then). Same arguments and
    returns as `cbp_select`."""
    num_units = state.utility.shape[0]
    h = activations.reshape(-1, num_units)
    age = state.age + 1
    magnitude = state.mean_activation + (1 - decay_rate) * jnp.mean(jnp.abs(h), axis=0)
    eligible = age > maturity_threshold
    num_eligible = jnp.sum(eligible)
    pending = state.pending + jnp.where(num_eligible > 0, replacement_rate * num_units, 0.0)
    whole = jnp.floor(pending)
    count = jnp.minimum(whole, jnp.minimum(num_eligible, max_replace)).astype(jnp.int32)
    utility = _mean_abs_except(w_out, out_unit_axis) * magnitude  # recomputed only where they replace
    utility = jnp.where(count > 0, utility, state.utility)
    _, idx = jax.lax.top_k(-jnp.where(eligible, utility, jnp.inf), max_replace)
    valid = jnp.arange(max_replace) < count
    new_state = CBPState(_reset(utility, idx, valid), magnitude, _reset(age, idx, valid), pending - whole)
    return new_state, idx.astype(jnp.int32), valid


def cbp_select_paper(state, activations, w_out, *, replacement_rate, decay_rate, maturity_threshold, max_replace,
                     out_unit_axis=0):
    """The authors' CBP (their cbp.py, behind the paper's CBP curves), one layer: utility = running average
    (decay, no bias correction) of |mean h_j| x mean|w_out of j| (the abs of the mean over the batch and, for a
    conv, its positions); units older than `maturity_threshold` are eligible; rate x #eligible accumulates in
    `pending`, k = its integer part is taken off it, and the eligible units whose utility is STRICTLY above the
    (k+1)-th largest eligible utility are replaced: the HIGHEST utilities, fewer than k on ties, none for k = 0.
    Same arguments and returns as `cbp_select` (max_replace = `cbp_max_replace` bounds k)."""
    num_units = state.utility.shape[0]
    h = activations.reshape(-1, num_units)
    age = state.age + 1
    step_utility = jnp.abs(jnp.mean(h, axis=0)) * _mean_abs_except(w_out, out_unit_axis)
    utility = decay_rate * state.utility + (1 - decay_rate) * step_utility
    eligible = age > maturity_threshold
    pending = state.pending + replacement_rate * jnp.sum(eligible)
    k = jnp.floor(pending)
    masked = jnp.where(eligible, utility, -jnp.inf)
    # The (k+1)-th largest; past the smallest (k >= #units) the smallest itself, as their clamped index.
    threshold = jnp.sort(masked)[jnp.maximum(num_units - 1 - k.astype(jnp.int32), 0)]
    chosen = (masked > threshold) & eligible
    _, idx = jax.lax.top_k(jnp.where(chosen, utility, -jnp.inf), max_replace)
    valid = chosen[idx]
    new_state = CBPState(_reset(utility, idx, valid), state.mean_activation, _reset(age, idx, valid), pending - k)
    return new_state, idx.astype(jnp.int32), valid


def paper_bound(w):
    """The authors' re-init bound for entries of kernel w: sqrt(2) x sqrt(3 / w.shape[0]) = sqrt(6 / shape[0]).
    For a dense [in, out] kernel that is Kaiming-uniform on the fan-in; for an HWIO conv kernel shape[0] is the
    kernel height (their code indexes a conv kernel as if dense), so sqrt(2) for 3x3 and sqrt(6 / 5) for 5x5."""
    return math.sqrt(6.0 / w.shape[0])


def _paper_draw(key, w, unit_axis, count, tie_taps):
    """U(+-paper_bound(w)) values for `count` unit slices of w (unit axis first). tie_taps: one draw per
    (in, out) pair shared by a conv kernel's kh x kw taps, as the authors' masks broadcast over them."""
    axis = unit_axis % w.ndim
    rest = [s for i, s in enumerate(w.shape) if i != axis]
    shape = [count] + ([1] * (len(rest) - 1) + rest[-1:] if tie_taps else rest)
    bound = paper_bound(w)
    draw = jax.random.uniform(key, shape, w.dtype, -bound, bound)
    return jnp.broadcast_to(draw, (count,) + tuple(rest))


def cbp_replace_paper(key, w_in, b_in, w_out, idx, valid, out_unit_axis=0, tie_in_taps=False, tie_out_taps=False):
    """The authors' re-initialization of units idx[valid]: incoming weights U(+-paper_bound(w_in)), bias 0, and
    outgoing weights RE-RANDOMIZED U(+-paper_bound(w_out)) (the consuming kernel's bound), not zeroed, so the
    output changes. tie_in_taps / tie_out_taps: the fresh conv values are shared over the kh x kw taps (the
    authors' Incremental CIFAR code for both, their Continual ImageNet code for the outgoing ones). w_in = b_in
    = None: units without incoming weights of their own (the authors' flattened conv outputs), only the
    outgoing ones change. Same layout and returns as `cbp_replace` (keep_in, keep_b None without w_in)."""
    k_in, k_out = jax.random.split(key)
    keep_in = keep_b = None
    if w_in is not None:
        w_in, keep_in = _set_units(w_in, -1, idx, valid, _paper_draw(k_in, w_in, -1, idx.shape[0], tie_in_taps))
        b_in, keep_b = _set_units(b_in, 0, idx, valid, jnp.zeros(idx.shape, b_in.dtype))
    fresh_out = _paper_draw(k_out, w_out, out_unit_axis, idx.shape[0], tie_out_taps)
    w_out, keep_out = _set_units(w_out, out_unit_axis, idx, valid, fresh_out)
    return w_in, b_in, w_out, keep_in, keep_b, keep_out


def mask_opt_state(optimizer, opt_state, keep_masks):
    """Multiply the params-shaped parts of an optax state (momentum, Adam moments) by 0/1 `keep_masks`."""
    return optax.tree_utils.tree_map_params(optimizer, lambda s, m: s * m, opt_state, keep_masks,
                                            transform_non_params=lambda s: s)


# Plasticity metrics
def dead_units(activations):
    """Units (last axis) whose post-ReLU output is exactly 0 on every input (paper Def. 6.1)."""
    return jnp.sum(jnp.all(activations.reshape(-1, activations.shape[-1]) == 0, axis=0))


def param_norm(params):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params)))
