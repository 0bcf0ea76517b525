"""common.py: effective rank, ER, optimizers, Shrink & Perturb, continual backprop, spectral penalty, LayerNorm, ReDo,
metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common


def svd_effective_rank(features):
    s = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


# ---------------------------------------------------------------------------------------------- effective rank
@pytest.mark.parametrize("shape", [(100, 30), (30, 100), (100, 1000)])
@pytest.mark.parametrize("method", ["svd", "qr", "gram"])
def test_effective_rank_matches_svd_route_full_rank(shape, method):
    features = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    got = float(common.effective_rank(features, method))
    np.testing.assert_allclose(got, svd_effective_rank(features), rtol=1e-4)


@pytest.mark.parametrize("method", ["svd", "qr", "gram"])
def test_effective_rank_rank_deficient_and_dead_columns(method):
    def cases(dtype):
        k1, k2 = jax.random.split(jax.random.key(1))
        low_rank = jax.random.normal(k1, (100, 3), dtype) @ jax.random.normal(k2, (3, 40), dtype)  # rank 3
        relu = jax.nn.relu(jax.random.normal(k2, (50, 80), dtype)).at[:, :30].set(0.0)  # 30 dead columns
        return low_rank, relu

    with jax.enable_x64(True):
        for features in cases(jnp.float64):
            got = float(common.effective_rank(features, method))
            np.testing.assert_allclose(got, svd_effective_rank(features), rtol=1e-9)
    low_rank, relu = cases(jnp.float32)  # float32 agrees closely too
    for features in (low_rank, relu):
        np.testing.assert_allclose(float(common.effective_rank(features, method)), svd_effective_rank(features),
                                   rtol=1e-3)
    assert float(common.effective_rank(low_rank, method)) <= 3.0 + 1e-3


def test_svd_route_keeps_small_singular_values_of_a_tall_matrix():
    # Like ReLU features of 2,000 inputs: singular values spread over three decades. The metric must see the
    # small ones (the Gram route drops those under its noise level and says so in its docstring).
    k1, k2 = jax.random.split(jax.random.key(2))
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (2000, 300)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (300, 300)))
    features = (u * jnp.logspace(0.0, -3.0, 300)) @ v.T
    np.testing.assert_allclose(float(common.effective_rank(features)), svd_effective_rank(features), rtol=1e-4)
    assert float(common.effective_rank(features, "gram")) < float(common.effective_rank(features))


def test_effective_rank_known_values_and_gradient():
    # k orthogonal columns of equal norm: all nonzero singular values equal -> effective rank exactly k.
    features = jnp.zeros((10, 6)).at[jnp.arange(4), jnp.arange(4)].set(2.0)
    for method in ("svd", "qr", "gram"):
        np.testing.assert_allclose(float(common.effective_rank(features, method)), 4.0, rtol=1e-6)
        assert float(common.effective_rank(jnp.zeros((5, 3)), method)) == 0.0
    with jax.enable_x64(True):
        full = jax.random.normal(jax.random.key(2), (12, 5), jnp.float64)
        for method in ("qr", "gram"):
            rank = lambda f: common.effective_rank(f, method)
            np.testing.assert_allclose(jax.grad(rank)(full), jax.grad(common.effective_rank)(full), rtol=1e-7)
            np.testing.assert_allclose(jax.grad(rank)(full.T), jax.grad(common.effective_rank)(full.T), rtol=1e-7)
            deficient = full.at[:, 3:].set(0.0)
            assert np.all(np.isfinite(jax.grad(rank)(deficient)))
    with pytest.raises(ValueError, match="matrix"):
        common.effective_rank(jnp.ones(5))
    with pytest.raises(ValueError, match="method"):
        common.effective_rank(jnp.ones((2, 2)), "eig")


def exact_effective_rank_gradient(u, s, vt):
    """Analytic float64 gradient of exp(entropy(s / sum s)) at the matrix u diag(s) vt:
    d erank / d s_i = erank x (-log p_i - H) / sum(s), and d s_i / dA = u_i v_i^T."""
    p = s / s.sum()
    entropy = -np.sum(p * np.log(p))
    g = np.exp(entropy) * (-np.log(p) - entropy) / s.sum()
    return (u * g) @ vt


def features_with_spectrum(shape, spectrum, seed=0):
    """A [n, d] matrix u diag(spectrum) vt with random orthonormal u, vt (float64), and its factors."""
    n, d = shape
    k = min(n, d)
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return (u * spectrum) @ v.T, u, v.T


# The ER step's feature shapes: pMNIST (er_batch x width), ImageNet (1,200 images x 128), CIFAR (5 minibatches
# of 100 x 512), Slippery Ant (a 16-sample minibatch x 256).
@pytest.mark.parametrize("shape", [(100, 1000), (1200, 128), (500, 512), (16, 256)])
@pytest.mark.parametrize("decades", [1, 4, 5])
def test_er_step_gradient_is_exact_on_collapsed_spectra(shape, decades):
    """In float32 the ER step's gradient points where the exact float64 gradient does, also when the spectrum
    spans four or five decades (the collapsed directions ER exists to revive). The Gram route does not."""
    spectrum = np.logspace(0.0, -decades, min(shape))
    features, u, vt = features_with_spectrum(shape, spectrum)
    exact = exact_effective_rank_gradient(u, spectrum, vt)
    cosine = lambda g: float(np.sum(np.asarray(g, np.float64) * exact) / np.linalg.norm(g) / np.linalg.norm(exact))
    grad = lambda method: jax.grad(lambda f: common.effective_rank(f, method))(jnp.asarray(features, jnp.float32))
    assert cosine(grad("qr")) >= 0.99
    if decades >= 4 and max(shape) >= 500:
        assert cosine(grad("gram")) < 0.9  # why the ER step does not use it


def test_er_step_gradient_is_finite_with_dead_units_and_repeated_singular_values():
    k1, k2 = jax.random.split(jax.random.key(11))
    relu = jax.nn.relu(jax.random.normal(k1, (100, 300))).at[:, 50:].set(0.0)  # 250 dead units
    q, _ = jnp.linalg.qr(jax.random.normal(k2, (64, 32)))
    repeated = jnp.concatenate([q * 2.0, jnp.zeros((64, 8))], axis=1)  # 32 equal singular values, 8 zeros
    for features in (relu, relu.T, repeated, jnp.zeros((10, 4)).at[0, 0].set(1.0)):
        grad = jax.grad(lambda f: common.effective_rank(f, "qr"))(features)
        assert np.all(np.isfinite(grad))
    # Equal singular values: the effective rank is at its maximum over scalings of the columns, so the
    # gradient is (numerically) zero however the SVD picks its singular vectors.
    grad = jax.grad(lambda f: common.effective_rank(f, "qr"))(q * 2.0)
    np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-4)


def test_er_ascent_raises_effective_rank():
    params = {"w": jax.random.normal(jax.random.key(3), (8, 16)) * 0.3}
    inputs = jax.random.normal(jax.random.key(4), (64, 8))
    features_fn = lambda p, x: [jax.nn.relu(x @ p["w"]), x @ p["w"]]
    new_params, before = common.er_ascent(params, features_fn, inputs, 1e-2)
    _, after = common.er_ascent(new_params, features_fn, inputs, 1e-2)
    expected_before = np.mean([svd_effective_rank(f) for f in features_fn(params, inputs)])
    np.testing.assert_allclose(float(before), expected_before, rtol=1e-4)
    assert float(after) > float(before)


def test_er_ascent_step_is_er_lr_times_the_exact_gradient_of_the_mean_rank():
    """The step itself (not just `singular_values`) uses the exact route: with the features the parameters
    themselves, er_ascent moves each by er_lr x 1/2 x the float64 gradient of its effective rank (the mean over
    two layers), also for a spectrum collapsed over four decades, where the Gram route's step has cosine ~0.28."""
    collapsed_spectrum, small_spectrum = np.logspace(0.0, -4.0, 128), np.linspace(2.0, 0.5, 30)
    collapsed, u1, vt1 = features_with_spectrum((1200, 128), collapsed_spectrum, seed=1)
    small, u2, vt2 = features_with_spectrum((100, 30), small_spectrum, seed=2)
    params = {"collapsed": jnp.asarray(collapsed, jnp.float32), "small": jnp.asarray(small, jnp.float32)}
    exact = {"collapsed": exact_effective_rank_gradient(u1, collapsed_spectrum, vt1),
             "small": exact_effective_rank_gradient(u2, small_spectrum, vt2)}
    er_lr = 1e-3
    new_params, before = common.er_ascent(params, lambda p, _: [p["collapsed"], p["small"]], None, er_lr)
    for name, expected in exact.items():
        step = (np.asarray(new_params[name], np.float64) - np.asarray(params[name], np.float64)) / er_lr
        expected = 0.5 * expected  # d mean(rank_1, rank_2) / d features_i
        cosine = np.sum(step * expected) / np.linalg.norm(step) / np.linalg.norm(expected)
        assert cosine >= 0.999, (name, cosine)
        np.testing.assert_allclose(np.linalg.norm(step), np.linalg.norm(expected), rtol=1e-2)
    np.testing.assert_allclose(float(before), (svd_effective_rank(collapsed) + svd_effective_rank(small)) / 2,
                               rtol=1e-4)


# ---------------------------------------------------------------------------------------------- optimizers
def test_sgd_adds_weight_decay_to_the_gradient_before_the_step():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, 0.5])}
    opt = common.sgd(0.1, weight_decay=0.01)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * (grads["w"] + 0.01 * params["w"]), rtol=1e-6)
    opt = common.adam(1e-3, weight_decay=0.1)
    updates, _ = opt.update(grads, opt.init(params), params)
    # Adam's first step moves every coordinate by ~lr in the direction of -(g + wd * p)
    np.testing.assert_allclose(updates["w"], -1e-3 * np.sign(grads["w"] + 0.1 * params["w"]), rtol=1e-4)


def test_shrink_perturb_noise_scale():
    params = {"a": jnp.zeros((200, 100)), "b": jnp.ones(50_000)}
    noisy = common.shrink_perturb(params, jax.random.key(5), 0.01)
    np.testing.assert_allclose(float(jnp.std(noisy["a"])), 0.01, rtol=0.03)
    np.testing.assert_allclose(float(jnp.std(noisy["b"] - 1.0)), 0.01, rtol=0.03)
    assert abs(float(jnp.mean(noisy["a"]))) < 1e-3
    # Two same-shape leaves get uncorrelated noise (not the same draw twice).
    twins = common.shrink_perturb({"a": jnp.zeros((100, 100)), "b": jnp.zeros((100, 100))}, jax.random.key(6), 1.0)
    assert abs(float(jnp.corrcoef(twins["a"].ravel(), twins["b"].ravel())[0, 1])) < 0.05  # ~5 sigma
    same = common.shrink_perturb(params, jax.random.key(5), 0.0)
    assert all(jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(params)))


def test_shrink_perturb_only_adds_noise_and_does_not_shrink():
    """S&P here is params + N(0, scale^2) noise; the shrink is the separate weight decay. With large parameters
    any multiplicative shrink ((1 - scale) x + noise: -0.05 on a parameter of 5) shows: what is added equals the
    noise the same key gives to all-zero parameters, with mean ~0 (within 5 standard errors) and std perturb_scale."""
    params = {"w": jnp.full((300, 100), 5.0), "b": jnp.linspace(-4.0, 4.0, 20_000)}
    key, scale = jax.random.key(12), 0.01
    noisy = common.shrink_perturb(params, key, scale)
    noise = common.shrink_perturb(jax.tree.map(jnp.zeros_like, params), key, scale)
    for name in params:
        added = np.asarray(noisy[name], np.float64) - np.asarray(params[name], np.float64)
        np.testing.assert_allclose(added, np.asarray(noise[name]), atol=2e-6)  # float32 rounding at |x| <= 5
        assert abs(added.mean()) < 5 * scale / np.sqrt(added.size), (name, added.mean())
        np.testing.assert_allclose(added.std(), scale, rtol=0.03)


# ---------------------------------------------------------------------------------------------- continual backprop
def test_cbp_replaces_lowest_utility_eligible_units():
    state = common.cbp_init(6)._replace(age=jnp.array([200, 200, 200, 200, 5, 200], jnp.int32), pending=jnp.array(1.5))
    activations = jnp.array([[3.0, 1.0, 2.0, 0.5, 0.1, 4.0]])
    out_magnitude = jnp.array([1.0, 0.5, 0.2, 4.0, 1.0, 0.05])
    w_out = jnp.stack([out_magnitude, -out_magnitude], axis=1)  # [units, out]: mean |w| per unit = magnitude
    # contributions: [3, .5, .4, 2, .1 (immature), .2]; 5 eligible x 0.1 + 1.5 pending = 2 replacements
    new_state, idx, valid = common.cbp_select(state, activations, w_out, replacement_rate=0.1, decay_rate=0.99,
                                              maturity_threshold=100, max_replace=3)
    assert sorted(np.asarray(idx)[np.asarray(valid)].tolist()) == [2, 5]
    assert int(valid.sum()) == 2
    np.testing.assert_allclose(float(new_state.pending), 0.0, atol=1e-6)
    contribution = np.array([3.0, 0.5, 0.4, 2.0, 0.1, 0.2])
    expected_utility = np.where(np.isin(np.arange(6), [2, 5]), 0.0, 0.01 * contribution)
    np.testing.assert_allclose(new_state.utility, expected_utility, rtol=1e-5)
    np.testing.assert_array_equal(new_state.age, [201, 201, 0, 201, 6, 0])


def test_cbp_ranks_by_bias_corrected_utility_and_accumulates_fractions():
    # Raw utility says unit 0 is lowest, but its young age inflates its bias-corrected utility above unit 1's.
    state = common.cbp_init(3)._replace(utility=jnp.array([0.010, 0.012, 1.0]), age=jnp.array([100, 1000, 1000], jnp.int32),
                                        pending=jnp.array(0.9))
    zeros = jnp.zeros((1, 3))
    _, idx, valid = common.cbp_select(state, zeros, jnp.ones((3, 2)), replacement_rate=0.05, decay_rate=0.99,
                                      maturity_threshold=50, max_replace=1)
    assert np.asarray(idx)[np.asarray(valid)].tolist() == [1]
    # 0.3 per step with 1 eligible unit: replacements happen at steps 4, 7, 10 (floor of 1.2, 2.1, 3.0).
    state = common.cbp_init(1)._replace(age=jnp.full(1, 10, jnp.int32))
    counts = []
    for _ in range(10):
        state, idx, valid = common.cbp_select(state, jnp.ones((1, 1)), jnp.ones((1, 1)), replacement_rate=0.3,
                                              decay_rate=0.99, maturity_threshold=-1, max_replace=1)
        counts.append(int(valid.sum()))
    assert counts == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert common.cbp_max_replace(1e-6, 1000) == 1 and common.cbp_max_replace(0.01, 1000) == 11


def test_cbp_utilities_by_hand():
    """Two steps of both utilities against hand-computed values (decay 0.9). Unit 0: mean|outgoing| 2,
    mean|incoming| 0.5; unit 1: 1 and 2."""
    w_out = jnp.array([[2.0, -2.0], [1.0, -1.0]])
    w_in = jnp.array([[0.5, 2.0], [-0.5, 2.0], [0.5, -2.0]])
    steps = [jnp.array([[1.0, 2.0], [3.0, 0.0]]), jnp.array([[4.0, 1.0]])]
    kw = dict(w_in=w_in, replacement_rate=0.5, decay_rate=0.9, maturity_threshold=1, max_replace=1)

    def run(utility):
        state, picked = common.cbp_init(2), []
        for h in steps:
            state, idx, valid = common.cbp_select(state, h, w_out, utility=utility, **kw)
            picked.append(np.asarray(idx)[np.asarray(valid)].tolist())
        return state, picked

    # adaptable_contribution. Step 1: running mean 0.1 x [2, 1], bias-corrected by 1 - 0.9 = 0.1 -> [2, 1];
    # mean|h - m| = [1, 1]; x out / in = [4, 0.5]; utility 0.1 x that = [0.4, 0.05]. Step 2: running mean
    # 0.9 x [0.2, 0.1] + 0.1 x [4, 1] = [0.58, 0.19], corrected by 1 - 0.81 = 0.19 -> [3.0526, 1];
    # |h - m| = [0.9474, 0] x [4, 0.5] = [3.7895, 0]; utility 0.9 x [0.4, 0.05] + 0.1 x that = [0.7389, 0.045].
    # Both units are 2 > 1 steps old now: 0.5 x 2 = 1 replacement, unit 1 (corrected 0.045 / 0.19 is lowest),
    # whose utility, running mean and age restart at 0.
    state, picked = run("adaptable_contribution")
    assert picked == [[], [1]]
    np.testing.assert_allclose(state.utility, [0.36 + 0.1 * 4 * (4 - 0.58 / 0.19), 0.0], rtol=1e-5)
    np.testing.assert_allclose(state.mean_activation, [0.58, 0.0], rtol=1e-5)
    np.testing.assert_array_equal(state.age, [2, 0])
    # contribution: mean|h| x out = [2, 1] x [2, 1] = [4, 1], then [4, 1] x [2, 1] = [8, 1]:
    # utility 0.9 x [0.4, 0.1] + 0.1 x [8, 1] = [1.16, 0.19]; unit 1 again.
    state, picked = run("contribution")
    assert picked == [[], [1]]
    np.testing.assert_allclose(state.utility, [1.16, 0.0], rtol=1e-5)
    # Centring decides: a unit that is always on at the same level is useless to adaptable_contribution
    # (|h - m| = 0), however large its contribution.
    h = jnp.array([[5.0, 1.0], [5.0, 0.0]])
    state = common.cbp_init(2)
    for _ in range(2):  # the second step replaces one of the two (now mature) units
        state, idx, valid = common.cbp_select(state, h, w_out, utility="adaptable_contribution", **kw)
    assert np.asarray(idx)[np.asarray(valid)].tolist() == [0]
    with pytest.raises(ValueError, match="w_in"):
        common.cbp_select(common.cbp_init(2), h, w_out, utility="adaptable_contribution",
                          **(kw | {"w_in": None}))
    with pytest.raises(ValueError, match="utility"):
        common.cbp_select(common.cbp_init(2), h, w_out, utility="magnitude", **kw)


def test_cbp_maturity_is_strictly_older_than_the_threshold():
    # After this step's age increment, unit 0 is exactly maturity_threshold = 100 steps old: not yet eligible,
    # although its utility is the lowest. Units 1-3 are 101 steps old.
    state = common.cbp_init(4)._replace(age=jnp.array([99, 100, 100, 100], jnp.int32), pending=jnp.array(0.5))
    activations = jnp.array([[0.0, 3.0, 1.0, 2.0]])
    new_state, idx, valid = common.cbp_select(state, activations, jnp.ones((4, 2)), replacement_rate=0.2,
                                              decay_rate=0.99, maturity_threshold=100, max_replace=2)
    # 3 eligible x 0.2 + 0.5 = 1.1: one replacement, the lowest-utility mature unit (2), not unit 0.
    assert np.asarray(idx)[np.asarray(valid)].tolist() == [2]
    np.testing.assert_allclose(float(new_state.pending), 0.1, atol=1e-6)
    np.testing.assert_array_equal(new_state.age, [100, 101, 0, 101])


def test_cbp_replacement_leaves_the_network_output_unchanged():
    k = jax.random.split(jax.random.key(6), 4)
    l1, l2 = common.dense_init(k[0], 5, 8), common.dense_init(k[1], 8, 3)
    l1["b"] = l1["b"] + 0.3
    l2["w"] = l2["w"].at[jnp.array([1, 6])].set(0.0)  # the units to replace contribute nothing (utility 0)
    x = jax.random.normal(k[2], (7, 5))
    net = lambda a, b: jax.nn.relu(x @ a["w"] + a["b"]) @ b["w"] + b["b"]
    idx, valid = jnp.array([6, 1, 3], jnp.int32), jnp.array([True, True, False])
    w_in, b_in, w_out, keep_in, keep_b, keep_out = common.cbp_replace(k[3], l1["w"], l1["b"], l2["w"], idx, valid)
    np.testing.assert_allclose(net({"w": w_in, "b": b_in}, {"w": w_out, "b": l2["b"]}), net(l1, l2), rtol=1e-6)
    replaced = np.array([1, 6])
    kept = np.setdiff1d(np.arange(8), replaced)
    assert not np.any(np.asarray(w_in[:, replaced]) == np.asarray(l1["w"][:, replaced]))
    assert np.all(np.abs(w_in[:, replaced]) <= common.kaiming_bound(5))
    np.testing.assert_array_equal(w_in[:, kept], l1["w"][:, kept])
    np.testing.assert_array_equal(b_in[replaced], 0.0)
    np.testing.assert_array_equal(b_in[kept], l1["b"][kept])
    # Outgoing rows of replaced units are zeroed, also where they were not zero before.
    full_out = l2["w"] + 1.0  # nonzero everywhere
    w_out_full = common.cbp_replace(k[3], l1["w"], l1["b"], full_out, idx, valid)[2]
    np.testing.assert_array_equal(w_out_full[replaced], 0.0)
    np.testing.assert_array_equal(w_out_full[kept], full_out[kept])
    np.testing.assert_array_equal(w_out[kept], l2["w"][kept])
    # Fresh incoming weights never reach the output: any other draw gives the same network function.
    other = common.cbp_replace(jax.random.key(99), l1["w"], l1["b"], l2["w"], idx, valid)
    np.testing.assert_allclose(net({"w": other[0], "b": other[1]}, {"w": other[2], "b": l2["b"]}), net(l1, l2), rtol=1e-6)
    np.testing.assert_array_equal(keep_b, np.isin(np.arange(8), kept).astype(np.float32))
    assert keep_in.shape == w_in.shape and keep_out.shape == w_out.shape
    np.testing.assert_array_equal(keep_in[:, replaced], 0.0)
    np.testing.assert_array_equal(keep_out[replaced], 0.0)


def test_cbp_conv_channels_and_the_conv_to_dense_boundary():
    k = jax.random.split(jax.random.key(7), 5)
    conv_layer = lambda key, shape: {"w": jax.random.uniform(key, shape, minval=-0.3, maxval=0.3),
                                     "b": jnp.zeros(shape[-1])}  # HWIO
    c1, c2 = conv_layer(k[0], (3, 3, 2, 4)), conv_layer(k[1], (3, 3, 4, 5))
    dense = common.dense_init(k[2], 4 * 4 * 5, 3)
    x = jax.random.normal(k[3], (2, 8, 8, 2))
    conv = lambda v, p: jax.nn.relu(jax.lax.conv_general_dilated(
        v, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b"])

    def net(c1, c2, dense):
        h = conv(conv(x, c1), c2)[:, ::2, ::2, :]  # [2, 4, 4, 5]
        return h.reshape(2, -1) @ dense["w"] + dense["b"]

    # The channels to replace contribute nothing yet (zero outgoing weights), so the output must not move.
    c2["w"] = c2["w"].at[:, :, jnp.array([0, 2]), :].set(0.0)
    dense["w"] = dense["w"].reshape(4, 4, 5, 3).at[:, :, 4, :].set(0.0).reshape(80, 3)
    idx, valid = jnp.array([2, 0], jnp.int32), jnp.array([True, True])
    # conv -> conv: channels of c1 are input channels (axis 2) of c2
    w1, b1, w2, *_ = common.cbp_replace(k[4], c1["w"], c1["b"], c2["w"], idx, valid, out_unit_axis=2)
    np.testing.assert_allclose(net({"w": w1, "b": b1}, c2 | {"w": w2}, dense), net(c1, c2, dense), rtol=1e-5)
    np.testing.assert_array_equal(w2[:, :, [0, 2], :], 0.0)
    np.testing.assert_array_equal(w2[:, :, [1, 3], :], c2["w"][:, :, [1, 3], :])
    assert not np.allclose(w1[..., [0, 2]], c1["w"][..., [0, 2]])
    # conv -> dense after a flatten: reshape the dense weights to [h, w, c, out], unit axis 2
    w_c2, b_c2, w_d, _, _, keep_out = common.cbp_replace(k[4], c2["w"], c2["b"], dense["w"].reshape(4, 4, 5, 3),
                                                         jnp.array([4], jnp.int32), jnp.array([True]), out_unit_axis=2)
    new = net(c1, {"w": w_c2, "b": b_c2}, {"w": w_d.reshape(80, 3), "b": dense["b"]})
    np.testing.assert_allclose(new, net(c1, c2, dense), rtol=1e-5)
    dense["w"] = dense["w"] + 1.0  # nonzero everywhere: the replacement must zero exactly channel 4's rows
    w_d = common.cbp_replace(k[4], c2["w"], c2["b"], dense["w"].reshape(4, 4, 5, 3), jnp.array([4], jnp.int32),
                             jnp.array([True]), out_unit_axis=2)[2].reshape(80, 3)
    rows = np.arange(80).reshape(4, 4, 5)[:, :, 4].ravel()  # flattened rows that belong to channel 4
    np.testing.assert_array_equal(w_d[rows], 0.0)
    assert np.all(np.delete(np.asarray(w_d), rows, axis=0) != 0)
    assert np.count_nonzero(np.asarray(keep_out) == 0) == rows.size * 3


# Dense [fan_in 100, 512 units] (fan_in != fan_out) and conv HWIO [3, 3, 16 in, 64 out] (fan_in 3*3*16 = 144,
# not the 16 input channels, nor the 64 output channels).
@pytest.mark.parametrize("w_in_shape, w_out_shape, out_unit_axis",
                         [((100, 512), (512, 10), 0), ((3, 3, 16, 64), (3, 3, 64, 8), 2)])
def test_cbp_redraws_incoming_weights_kaiming_uniform_over_the_fan_in(w_in_shape, w_out_shape, out_unit_axis):
    """Replaced units get fresh U(-b, b) incoming weights, b = sqrt(6 / fan_in) with fan_in every input to the
    unit (kh x kw x in for a conv): over > 4,000 draws max|w| is within 1% of b and std within 3% of b / sqrt(3),
    which tells b from the fan-out's or the input channels' bound. Units idx[~valid] and units not in idx keep
    their weights; replaced units get bias 0 and outgoing weights 0."""
    units = w_in_shape[-1]
    idx = jnp.arange(0, units, 2, dtype=jnp.int32)  # every other unit; the last 4 entries not valid
    valid = jnp.arange(idx.size) < idx.size - 4
    w_in, b_in, w_out = jnp.full(w_in_shape, 7.0), jnp.full(units, 0.25), jnp.full(w_out_shape, 1.0)
    new_in, new_b, new_out, *_ = common.cbp_replace(jax.random.key(13), w_in, b_in, w_out, idx, valid,
                                                    out_unit_axis=out_unit_axis)
    replaced = np.asarray(idx)[np.asarray(valid)]
    kept = np.setdiff1d(np.arange(units), replaced)
    fresh = np.asarray(new_in[..., replaced], np.float64)
    bound = np.sqrt(6.0 / np.prod(w_in_shape[:-1]))
    assert fresh.size > 4000
    assert np.abs(fresh).max() <= bound and np.abs(fresh).max() > 0.99 * bound, (np.abs(fresh).max(), bound)
    np.testing.assert_allclose(fresh.std(), bound / np.sqrt(3), rtol=0.03)
    assert abs(fresh.mean()) < 5 * bound / np.sqrt(3 * fresh.size)
    np.testing.assert_array_equal(new_in[..., kept], 7.0)
    np.testing.assert_array_equal(new_b[replaced], 0.0)
    np.testing.assert_array_equal(new_b[kept], 0.25)
    moved = np.moveaxis(np.asarray(new_out), out_unit_axis, 0)
    np.testing.assert_array_equal(moved[replaced], 0.0)
    np.testing.assert_array_equal(moved[kept], 1.0)


def test_cbp_replace_draws_from_the_init_it_is_given():
    """With `init=`, the fresh incoming weights come from init(key, w_in.shape, dtype) (here N(3, 0.01^2), which
    no Kaiming-uniform draw resembles), not from the default Kaiming-uniform; other units keep theirs."""
    calls = []

    def init(key, shape, dtype):
        calls.append((tuple(shape), dtype))
        return 3.0 + 0.01 * jax.random.normal(key, shape, dtype)

    w_in = jnp.zeros((50, 200))
    idx, valid = jnp.arange(100, dtype=jnp.int32) * 2, jnp.ones(100, bool)
    new_in = common.cbp_replace(jax.random.key(14), w_in, jnp.zeros(200), jnp.ones((200, 3)), idx, valid,
                                init=init)[0]
    assert calls == [((50, 200), np.dtype(np.float32))]
    fresh = np.asarray(new_in[:, ::2], np.float64)  # 5,000 draws
    np.testing.assert_allclose(fresh.mean(), 3.0, atol=1e-3)
    np.testing.assert_allclose(fresh.std(), 0.01, rtol=0.05)
    np.testing.assert_array_equal(new_in[:, 1::2], 0.0)


def test_mask_opt_state_zeroes_momentum_and_adam_moments():
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    grads = jax.tree.map(jnp.ones_like, params)
    keep = {"w": jnp.ones((3, 2)).at[1].set(0.0), "b": jnp.array([0.0, 1.0])}
    for opt in (common.sgd(0.1, momentum=0.9), common.adam(1e-3)):
        _, state = opt.update(grads, opt.init(params), params)
        masked = common.mask_opt_state(opt, state, keep)
        arrays = [x for x in jax.tree.leaves(masked) if x.shape == (3, 2)]
        assert arrays and all(np.all(np.asarray(x)[1] == 0) and np.all(np.asarray(x)[[0, 2]] != 0) for x in arrays)
        biases = [x for x in jax.tree.leaves(masked) if x.shape == (2,)]
        assert biases and all(x[0] == 0 and x[1] != 0 for x in biases)


def test_cbp_paper_variant_one_step_by_hand():
    """The authors' CBP (common.cbp_select_paper) against a step computed here in numpy: the utility is the running
    average (decay 0.9, no bias correction) of |batch mean h| x mean|w_out|; rate x #eligible accumulates, its
    integer part is taken off; the HIGHEST eligible utilities strictly above the (k+1)-th largest are chosen."""
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 6)).astype(np.float32)  # signed: |mean h| differs from mean|h|
    w_out = rng.normal(size=(6, 3)).astype(np.float32)
    old_utility = np.array([0.5, 0.1, 0.3, 0.2, 0.9, 0.0], np.float32)
    age = np.array([10, 10, 10, 10, 2, 10], np.int32)  # unit 4 (highest utility) is immature
    state = common.cbp_init(6)._replace(utility=jnp.asarray(old_utility), age=jnp.asarray(age),
                                        pending=jnp.array(1.3))
    new, idx, valid = common.cbp_select_paper(state, jnp.asarray(h), jnp.asarray(w_out), replacement_rate=0.2,
                                              decay_rate=0.9, maturity_threshold=5, max_replace=3)
    utility = 0.9 * old_utility + 0.1 * np.abs(h.mean(0)) * np.abs(w_out).mean(1)
    eligible = age + 1 > 5
    pending = 1.3 + 0.2 * eligible.sum()  # 2.3: k = 2, 0.3 carries over
    top = np.argsort(np.where(eligible, utility, -np.inf))[::-1][:2]
    assert sorted(np.asarray(idx)[np.asarray(valid)].tolist()) == sorted(top.tolist())
    np.testing.assert_allclose(float(new.pending), pending - 2, rtol=1e-5)
    chosen = np.isin(np.arange(6), top)
    np.testing.assert_allclose(new.utility, np.where(chosen, 0.0, utility), rtol=1e-5)
    np.testing.assert_array_equal(new.age, np.where(chosen, 0, age + 1))
    # The default (Dohare et al.'s) on the same state picks the lowest bias-corrected utilities instead.
    _, idx_d, valid_d = common.cbp_select(state, jnp.asarray(h), jnp.asarray(w_out), replacement_rate=0.2,
                                          decay_rate=0.9, maturity_threshold=5, max_replace=3)
    assert set(np.asarray(idx_d)[np.asarray(valid_d)].tolist()).isdisjoint(top.tolist())


def test_cbp_paper_variant_strict_threshold_ties_and_accumulator():
    """Ties at the (k+1)-th largest are not replaced (fewer than k); k = 0 replaces nothing; the accumulator keeps
    only the fraction (pending - floor(pending)), whatever was replaced."""
    kw = dict(replacement_rate=0.0, decay_rate=0.0, maturity_threshold=0, max_replace=3)
    state = common.cbp_init(4)._replace(age=jnp.full(4, 5, jnp.int32), pending=jnp.array(2.0))
    w_out = jnp.ones((4, 1))
    # utilities (decay 0: this step's) 3, 2, 2, 1; k = 2: threshold = the 3rd largest = 2, only unit 0 is above
    new, idx, valid = common.cbp_select_paper(state, jnp.array([[3.0, 2.0, 2.0, 1.0]]), w_out, **kw)
    assert np.asarray(idx)[np.asarray(valid)].tolist() == [0]
    np.testing.assert_allclose(float(new.pending), 0.0)  # the whole floor is taken off, not only the 1 replaced
    # no tie: the 2 highest
    _, idx, valid = common.cbp_select_paper(state, jnp.array([[3.0, 2.5, 2.0, 1.0]]), w_out, **kw)
    assert sorted(np.asarray(idx)[np.asarray(valid)].tolist()) == [0, 1]
    # k = 0 (pending 0.9): nothing
    _, _, valid = common.cbp_select_paper(state._replace(pending=jnp.array(0.9)), jnp.array([[3.0, 2.5, 2.0, 1.0]]),
                                          w_out, **kw)
    assert not np.any(valid)
    # 0.4 per step with 1 of 2 units eligible at rate 0.4: floors of 0.4, 0.8, 1.2, 1.6, 2.0 -> steps 3, 5
    state = common.cbp_init(2)._replace(age=jnp.array([5, -100], jnp.int32))
    counts = []
    for _ in range(5):
        state, idx, valid = common.cbp_select_paper(state, jnp.ones((1, 2)), jnp.ones((2, 1)), replacement_rate=0.4,
                                                    decay_rate=0.9, maturity_threshold=0, max_replace=2)
        counts.append(int(valid.sum()))
        state = state._replace(age=state.age.at[0].set(5))  # keep unit 0 eligible
    assert counts == [0, 0, 1, 0, 1]


@pytest.mark.parametrize("w_in_shape, w_out_shape, axis, tie", [((5, 6), (6, 4), 0, False),
                                                                 ((3, 3, 2, 6), (3, 3, 6, 4), 2, False),
                                                                 ((3, 3, 2, 6), (3, 3, 6, 4), 2, True)])
def test_cbp_paper_replace_bounds_and_untouched_entries(w_in_shape, w_out_shape, axis, tie):
    """Replaced units get incoming weights in U(+-sqrt(6 / w_in.shape[0])) (a conv: sqrt(6 / kh), the authors'
    indexing), bias 0, outgoing weights re-randomized (not 0) in U(+-sqrt(6 / w_out.shape[0])); with tied taps
    one value per (in, out) pair over the 3 x 3 taps; every other entry is unchanged; the keep masks are 0
    exactly at the touched entries."""
    k = jax.random.split(jax.random.key(3), 3)
    w_in = 10.0 + jax.random.uniform(k[0], w_in_shape)  # outside any bound: a redrawn entry shows
    b_in = jnp.full(w_in_shape[-1], 10.0)
    w_out = 10.0 + jax.random.uniform(k[1], w_out_shape)
    idx, valid = jnp.array([4, 1, 0], jnp.int32), jnp.array([True, True, False])
    new_in, new_b, new_out, keep_in, keep_b, keep_out = common.cbp_replace_paper(
        k[2], w_in, b_in, w_out, idx, valid, out_unit_axis=axis, tie_in_taps=tie, tie_out_taps=tie)
    units = np.isin(np.arange(6), [4, 1])
    a_in, a_out = np.asarray(new_in), np.moveaxis(np.asarray(new_out), axis, 0)
    bound_in, bound_out = np.sqrt(6 / w_in_shape[0]), np.sqrt(6 / w_out_shape[0])
    assert np.all(np.abs(a_in[..., units]) <= bound_in) and np.all(np.abs(a_out[units]) <= bound_out)
    assert np.all(a_out[units] != 0)
    np.testing.assert_array_equal(a_in[..., ~units], np.asarray(w_in)[..., ~units])
    np.testing.assert_array_equal(a_out[~units], np.moveaxis(np.asarray(w_out), axis, 0)[~units])
    np.testing.assert_array_equal(np.asarray(new_b), np.where(units, 0.0, 10.0))
    np.testing.assert_array_equal(np.asarray(keep_in), np.broadcast_to(~units, w_in_shape).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(keep_b), (~units).astype(np.float32))
    np.testing.assert_array_equal(np.moveaxis(np.asarray(keep_out), axis, 0),
                                  np.broadcast_to((~units).reshape((6,) + (1,) * (len(w_out_shape) - 1)),
                                                  a_out.shape).astype(np.float32))
    if len(w_in_shape) == 4:  # tied: the 9 taps of a (in, out) pair share one value; untied: they differ
        taps_in = a_in[..., units].reshape(9, -1)
        taps_out = a_out[units].reshape(2, 9, -1)
        assert np.all(taps_in == taps_in[0]) == tie and np.all(taps_out == taps_out[:, :1]) == tie
    # w_in None: units without incoming weights of their own; only the outgoing rows change
    only = common.cbp_replace_paper(k[2], None, None, w_out, idx, valid, out_unit_axis=axis)
    assert only[0] is None and only[1] is None
    np.testing.assert_array_equal(np.asarray(only[5]), np.asarray(keep_out))


def test_cbp_resnet_select_by_hand():
    """Dohare et al.'s ResNet rule (common.cbp_select_resnet) against numpy over three steps: the feature magnitude
    is a running sum of (1 - decay) x mean|h| (never decayed, kept when the unit is replaced); once any unit is
    mature, rate x #units (all of them) accumulates; the lowest mean|w_out| x magnitude among the eligible goes."""
    rng = np.random.default_rng(1)
    w_out = np.abs(rng.normal(size=(4, 2))).astype(np.float32) + 0.1
    state = common.cbp_init(4)._replace(age=jnp.array([1, 3, 3, 3], jnp.int32))
    magnitude, pending, age = np.zeros(4), 0.0, np.array([1, 3, 3, 3])
    for step in range(3):
        h = rng.normal(size=(5, 4)).astype(np.float32)
        state, idx, valid = common.cbp_select_resnet(state, jnp.asarray(h), jnp.asarray(w_out), replacement_rate=0.2,
                                                     decay_rate=0.9, maturity_threshold=3, max_replace=2)
        magnitude = magnitude + 0.1 * np.abs(h).mean(0)
        age = age + 1
        eligible = age > 3
        pending += 0.2 * 4 * eligible.any()  # all 4 units count, once one is eligible
        k = min(int(np.floor(pending)), eligible.sum())
        pending -= np.floor(pending)
        utility = np.abs(w_out).mean(1) * magnitude
        want = np.argsort(np.where(eligible, utility, np.inf))[:k]
        got = np.asarray(idx)[np.asarray(valid)]
        assert sorted(got.tolist()) == sorted(want.tolist()), step
        age[want] = 0
        np.testing.assert_allclose(state.mean_activation, magnitude, rtol=1e-5)
        np.testing.assert_allclose(float(state.pending), pending, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(state.age, age)
    assert np.asarray(state.age).min() == 0  # something was replaced (steps 1 and 2: 0.8 + 0.8 = 1.6)


def test_adam_moments_masked_for_the_paper_variant():
    """The paper variant's Adam state: mu and nu zeroed at the touched entries (as the authors'); optax's step
    count is one scalar for all parameters and is kept."""
    params = {"w": jnp.ones((3, 2))}
    opt = common.adam(1e-3)
    _, state = opt.update({"w": jnp.ones((3, 2))}, opt.init(params), params)
    masked = common.mask_opt_state(opt, state, {"w": jnp.ones((3, 2)).at[:, 1].set(0.0)})
    adam = masked[1][0]
    for moment in (adam.mu["w"], adam.nu["w"]):
        np.testing.assert_array_equal(np.asarray(moment)[:, 1], 0.0)
        assert np.all(np.asarray(moment)[:, 0] != 0)
    assert int(adam.count) == 1


# ---------------------------------------------------------------------------------------------- metrics
def test_dead_units_and_param_norm():
    acts = jnp.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [0.0, 0.5, 0.0, 0.0]])
    assert int(common.dead_units(acts)) == 2
    assert int(common.dead_units(jnp.zeros((2, 3, 3, 5)).at[0, 1, 1, 4].set(1.0))) == 4  # conv: by channel
    np.testing.assert_allclose(float(common.param_norm({"a": jnp.array([3.0]), "b": [jnp.array([4.0])]})), 5.0)


def test_dense_init_is_kaiming_uniform():
    layer = common.dense_init(jax.random.key(8), 600, 400)
    bound = np.sqrt(6 / 600)
    assert layer["w"].shape == (600, 400) and np.all(layer["b"] == 0)
    assert np.abs(layer["w"]).max() <= bound and np.abs(layer["w"]).max() > 0.99 * bound
    np.testing.assert_allclose(float(jnp.std(layer["w"])), bound / np.sqrt(3), rtol=0.02)


def test_effective_ranks_stacks_each_layer_and_er_ascent_differentiates_through_them():
    feats = [jax.random.normal(jax.random.key(10), (40, 8)), jax.nn.relu(jax.random.normal(jax.random.key(11), (40, 30)))]
    ranks = common.effective_ranks(feats)
    np.testing.assert_allclose(ranks, [svd_effective_rank(f) for f in feats], rtol=1e-4)
    batched = jax.vmap(lambda a, b: common.effective_ranks([a, b], "gram"))(jnp.stack([feats[0]] * 3),
                                                                              jnp.stack([feats[1]] * 3))
    np.testing.assert_allclose(batched, np.tile(ranks, (3, 1)), rtol=1e-3)


# ---------------------------------------------------------------------------------------------- spectral regularization
def test_spectral_penalty_against_svd():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        w = jnp.asarray(rng.standard_normal((6, 4)))
        sigma = np.sqrt(float(common.spectral_penalty({"w": w}, 1.0, 0.0, 200)[0]))  # k = 1, target 0: sigma^2
        np.testing.assert_allclose(sigma, np.linalg.svd(w, compute_uv=False)[0], rtol=1e-10)
        conv = jnp.asarray(rng.standard_normal((3, 3, 2, 4)))  # HWIO: a (3*3*2) x 4 matrix
        dense = jnp.asarray(rng.standard_normal((5, 3)))
        params = {"conv": {"w": conv, "b": jnp.asarray([1.0, 2.0, 0.0, 0.0])},
                  "dense": {"w": dense, "b": jnp.asarray([0.5, 0.0, 0.0]), "scale": jnp.asarray([1.5, 1.0, 0.0])}}
        s_conv = np.linalg.svd(np.asarray(conv).reshape(18, 4), compute_uv=False)[0]
        s_dense = np.linalg.svd(np.asarray(dense), compute_uv=False)[0]
        expected = (s_conv ** 2 - 2) ** 2 + (s_dense ** 2 - 2) ** 2 + (1 + 4) + 0.25 + (0.25 + 0 + 1)
        np.testing.assert_allclose(float(common.spectral_penalty(params, 2.0, 2.0, 300)[0]), expected, rtol=1e-8)
        np.testing.assert_allclose(float(common.spectral_penalty({"w": dense}, 1.0, 1.0, 300)[0]), (s_dense - 1) ** 2,
                                   rtol=1e-8)


def test_spectral_penalty_gradient_is_the_analytic_u_v_form():
    """At a separated top singular value, d/dW (s^k - t)^2 = 2 (s^k - t) k s^(k-1) u v^T."""
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((7, 3)))
    v, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    s = np.array([3.0, 1.0, 0.5])
    w = (u * s) @ v.T
    with jax.enable_x64(True):
        grad = jax.grad(lambda m: common.spectral_penalty({"w": m}, 2.0, 2.0, 100)[0])(jnp.asarray(w))
    expected = 2 * (s[0] ** 2 - 2) * 2 * s[0] * np.outer(u[:, 0], v[:, 0])
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-8, atol=1e-10)


def test_persistent_power_iteration_converges_to_the_penalty():
    """One iteration per call from the vectors the last call returned reaches the converged penalty."""
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((6, 4)))
    w = jnp.asarray((u * np.array([2.0, 1.0, 0.5, 0.1])) @ np.linalg.qr(rng.standard_normal((4, 4)))[0].T)
    starts = common.spectral_starts({"w": w})
    first, _ = common.spectral_penalty({"w": w}, 2.0, 2.0, 1, starts)
    for _ in range(40):
        penalty, starts = common.spectral_penalty({"w": w}, 2.0, 2.0, 1, starts)
    assert abs(float(first) - 4.0) > 1e-3  # one iteration from the fixed start is not converged
    np.testing.assert_allclose(float(penalty), (2.0 ** 2 - 2) ** 2, atol=1e-4)


def test_spectral_starts_count_kernels_only_as_the_authors():
    """Start vector i is normal(PRNGKey(i)) of the kernel's last dimension, i counting kernels only (biases and
    scales take no key), in leaf order or as `key_ids` lists; the penalty equals the authors' by-hand iteration."""
    from authors_spectral import authors_penalty
    rng = np.random.default_rng(3)
    params = {"a": {"b": jnp.asarray(rng.standard_normal(4), jnp.float32),
                    "w": jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)},
              "b": {"scale": jnp.asarray(rng.standard_normal(3), jnp.float32),
                    "w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}}
    for key_ids, table in ((None, {"['a']['w']": 0, "['b']['w']": 1}), ([1, 0], {"['a']['w']": 1, "['b']['w']": 0})):
        starts = common.spectral_starts(params, key_ids)
        for start, (path, index) in zip(starts, table.items()):
            np.testing.assert_array_equal(start, jax.random.normal(jax.random.PRNGKey(index), start.shape))
        assert [s.shape for s in starts] == [(4,), (3,)]
        for iters in (1, 10):
            np.testing.assert_allclose(float(common.spectral_penalty(params, 2.0, 2.0, iters, key_ids=key_ids)[0]),
                                       authors_penalty(params, table, iters=iters), rtol=1e-5)
    # The start matters after one iteration: the swapped keys give another penalty.
    assert abs(float(common.spectral_penalty(params, 2.0, 2.0, 1)[0])
               - float(common.spectral_penalty(params, 2.0, 2.0, 1, key_ids=[1, 0])[0])) > 1e-2
    with pytest.raises(ValueError, match="key_ids"):
        common.spectral_starts(params, [0, 2])


def numpy_layer_norm(x, scale, shift, eps):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * np.asarray(scale, np.float64) + np.asarray(shift, np.float64)


def test_layer_norm_against_float64_numpy():
    """(x - mean) / sqrt(var + eps) x scale + shift over the last axis, per-feature scale and shift, against
    float64 numpy. Rows with a mean of 50 (leaving the mean in changes every output), a row of variance 1e-6 = eps
    (eps inside the root: 1 / sqrt(2e-6) = 707, outside: 1 / (1e-3 + 1e-6) = 999) and eps = 0.5 at variance ~1
    (1 / sqrt(1.5) = 0.82 against 1 / 1.5 = 0.67)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 16))  # [batch, tokens, features]: normalized over the 16 features only
    x[0, 0] += 50.0
    x[1, 1] = 3.0 * x[1, 1] - 20.0
    x[1, 2] = 1e-3 * (x[1, 2] - x[1, 2].mean()) / x[1, 2].std()  # variance exactly 1e-6
    scale, shift = rng.uniform(0.5, 2.0, 16), rng.uniform(-1.0, 1.0, 16)
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    for eps in (1e-6, 0.5):
        got = np.asarray(common.layer_norm(as32(x), as32(scale), as32(shift), eps), np.float64)
        np.testing.assert_allclose(got, numpy_layer_norm(x, scale, shift, eps), rtol=1e-4, atol=1e-4)
    got = np.asarray(common.layer_norm(as32(x), as32(scale), as32(shift)), np.float64)  # default eps 1e-6
    np.testing.assert_allclose(got, numpy_layer_norm(x, scale, shift, 1e-6), rtol=1e-4, atol=1e-4)
    # Without scale and shift every row comes out with mean 0 and variance var / (var + eps).
    plain = np.asarray(common.layer_norm(as32(x), 1.0, 0.0, 1e-6), np.float64)
    np.testing.assert_allclose(plain.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(plain[1, 2].var(), 0.5, rtol=1e-3)


def test_dormant_units_score():
    """s_i = mean|h_i| / layer mean of mean|h_k|: here mean|h| = (0, 2, 2, 4), layer mean 2, s = (0, 1, 1, 2)."""
    h = jnp.asarray([[0.0, 1.0, 2.0, 4.0], [0.0, 3.0, 2.0, 4.0]])
    np.testing.assert_array_equal(common.dormant_units(h, 0.0), [True, False, False, False])
    np.testing.assert_array_equal(common.dormant_units(h, 1.0), [True, True, True, False])
    np.testing.assert_array_equal(common.dormant_units(jnp.zeros((3, 2, 4)), 0.0), [True] * 4)  # all silent
