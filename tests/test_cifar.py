"""cifar.py: the CIFAR-100 loader (data.py) on small archives in the official formats, the ResNet's BatchNorm and
masked logits, continual backprop by channel, LayerNorm in layernorm-l2's dense head, spectral-reg's penalty,
ReDo's recycling, every agent end to end on a tiny network, RESET, member batching, resume, and Ctrl-C / SIGTERM
in the middle of a task."""
import io
import math
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cifar
import common
import data as datasets
import runner
from init_stats import assert_truncated_normal, assert_truncated_shape, truncated_normal_moments
from feature_metrics import assert_metrics_of, numpy_effective_rank

ROOT = Path(__file__).resolve().parents[1]

TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 2
# One tiny configuration for every end-to-end run, so all of them share compiled programs.
TINY = dict(tasks=2, epochs=1, width=4, dense_width=16, batch_size=10, eval_batch=100, checkpoint_minutes=1e9)
KEYS = ("test_acc", "test_loss", "train_acc", "train_loss", "param_norm", "effective_rank", "dead_units")


def official_arrays(seed=0):
    """Random CIFAR-100-shaped data as the archives store it: uint8 [N, 3072] channel-first rows."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        y = np.tile(np.arange(100), n)
        out[split] = (rng.integers(0, 256, (len(y), 3072), dtype=np.uint8), y)
    return out


def write_archive(path, arrays, fmt):
    with tarfile.open(path, "w:gz") as tar:
        for split, (x, y) in arrays.items():
            if fmt == "python":
                blob = pickle.dumps({b"filenames": [b"x.png"] * len(y), b"fine_labels": [int(v) for v in y],
                                     b"coarse_labels": [int(v) // 5 for v in y], b"data": x})
                name = f"cifar-100-python/{split}"
            else:  # records: coarse label byte, fine label byte, 3072 pixel bytes
                records = np.concatenate([(y // 5)[:, None], y[:, None], x], axis=1).astype(np.uint8)
                blob, name = records.tobytes(), f"cifar-100-binary/{split}.bin"
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.fixture(scope="module")
def arrays():
    return official_arrays()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, arrays):
    """A prepared cache built from a python-format archive: what every end-to-end run below loads."""
    manual = tmp_path_factory.mktemp("manual")
    write_archive(manual / "cifar-100-python.tar.gz", arrays, "python")
    data = tmp_path_factory.mktemp("data")
    datasets.cifar100(data, manual)
    return data


def run(tmp_path, name, data_dir, **kw):
    args = cifar.Args(**{**TINY, **kw}, data_dir=str(data_dir), out_dir=str(tmp_path / name))
    run_dir = cifar.main(args)
    with np.load(run_dir / "metrics.npz") as m:
        return {k: m[k] for k in m.files}


# ------------------------------------------------------------------------------------------------------ loader
@pytest.mark.parametrize("fmt, archive", [("python", "cifar-100-python.tar.gz"),
                                          ("binary", "cifar-100-binary.tar.gz")])
def test_loader_reads_official_archive_and_caches(tmp_path, arrays, fmt, archive):
    manual = tmp_path / "manual"
    manual.mkdir()
    write_archive(manual / archive, arrays, fmt)
    data = datasets.cifar100(tmp_path / "data", manual)
    for split, (x, y) in arrays.items():
        images = data[f"x_{split}"]
        assert images.shape == (100 * (TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS), 32, 32, 3)
        assert images.dtype == np.uint8
        np.testing.assert_array_equal(data[f"y_{split}"], y)
        # pixel (row 5, col 7) of channel c is byte c*1024 + 5*32 + 7 of the record
        for c in range(3):
            np.testing.assert_array_equal(images[:, 5, 7, c], x[:, c * 1024 + 5 * 32 + 7])
    assert (tmp_path / "data" / datasets.CIFAR100_CACHE).exists()
    (manual / archive).unlink()  # later runs read the cache only
    cached = datasets.cifar100(tmp_path / "data", None)
    for k in data:
        np.testing.assert_array_equal(cached[k], data[k])


def test_loader_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        datasets.cifar100(tmp_path / "data", tmp_path / "empty")
    assert "cifar-100-python.tar.gz" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar-100-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(SystemExit) as e:
        datasets.cifar100(tmp_path / "data", tmp_path / "bad")
    assert "could not read" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "unbalanced").mkdir()
    x, y = official_arrays()["train"]
    write_archive(tmp_path / "unbalanced" / "cifar-100-python.tar.gz", {"train": (x[1:], y[1:]), "test": (x, y)},
                  "python")
    with pytest.raises(SystemExit, match="same number"):
        datasets.cifar100(tmp_path / "data2", tmp_path / "unbalanced")
    assert not (tmp_path / "data2" / "cifar100.npz").exists()  # nothing cached from bad data
    with pytest.raises(SystemExit, match="does not apply"):
        cifar.main(cifar.Args(agent="bp", er_lr=(0.1,), data_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="tasks"):
        cifar.main(cifar.Args(tasks=21, data_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="--cbp-utility must be one of contribution, adaptable_contribution"):
        cifar.main(cifar.Args(agent="cbp", cbp_utility="utility", data_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="--cbp-utility: this benchmark's CBP has one utility"):
        cifar.main(cifar.Args(agent="cbp", cbp_utility="adaptable_contribution", data_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="--cbp-utility: this benchmark's CBP has one utility"):
        cifar.main(cifar.Args(agent="cbp", cbp_variant="paper", cbp_utility="contribution", data_dir=str(tmp_path)))
    assert cifar.AGENTS["cbp"]["cbp_utility"] == "contribution"  # Dohare et al.'s Incremental CIFAR config


# ------------------------------------------------------------------------------------ network, BN, masking
forward = jax.jit(cifar.forward, static_argnames="train")


@pytest.fixture(scope="module")
def tiny_net():
    params, stats = jax.jit(cifar.init_net, static_argnums=(1, 2))(jax.random.key(0), 4, 16)
    x = jax.random.uniform(jax.random.key(1), (6, 32, 32, 3))
    return params, stats, x


def test_resnet_shapes(tiny_net):
    params, stats, x = tiny_net
    logits, new_stats, acts = forward(params, stats, x, True)
    assert logits.shape == (6, 100)
    assert [a.shape[1:] for a in acts["blocks"]] == ([(32, 32, 4)] * 2 + [(16, 16, 8)] * 2 + [(8, 8, 16)] * 2
                                                     + [(4, 4, 32)] * 2)
    assert [a.shape for a in acts["dense"]] == [(6, 16), (6, 16)]
    assert ["skip" in b for b in params["blocks"]] == [False, False, True, False, True, False, True, False]


def kernels(params):
    """(name, kernel, target variance) of every conv and dense layer: the authors' init, 2 / fan_out for a
    convolution (fan_out = kh x kw x c_out), 1 / fan_out (the output width) for the dense layers and the head."""
    out = []
    for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[-1].key == "w":
            h, w_, _, cout = w.shape if w.ndim == 4 else (1, 1, 0, w.shape[1])
            out.append((jax.tree_util.keystr(path), w, (2.0 if w.ndim == 4 else 1.0) / (h * w_ * cout)))
    return out


def test_init_is_the_authors():
    """The full-size network (width 64, dense 512): every kernel a truncated normal with the authors' variance,
    every bias 0, BatchNorm scale 1 and shift 0."""
    params, stats = jax.jit(cifar.init_net, static_argnums=(1, 2))(jax.random.key(0), 64, 512)
    found = kernels(params)
    assert len(found) == 1 + 16 + 3 + 3  # stem, 2 convs x 8 blocks, 3 skips, dense1, dense2, head
    assert {k: v for k, _, v in found if "head" in k or "stem" in k} == {"['head']['w']": 1 / 100,
                                                                         "['stem']['conv']['w']": 2 / (9 * 64)}
    pooled = [assert_truncated_normal(w, variance) for _, w, variance in found]
    assert_truncated_shape(np.concatenate(pooled))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[-1].key in ("b", "bias"):
            np.testing.assert_array_equal(leaf, 0.0)
        elif path[-1].key == "scale":
            np.testing.assert_array_equal(leaf, 1.0)
    # The scaling is that of flax's / jax's variance_scaling on fan_out, truncated: the same numbers for a key.
    key = jax.random.key(5)
    for shape, scale in (((3, 3, 64, 128), 2.0), ((1, 1, 64, 128), 2.0), ((512, 100), 1.0)):
        reference = jax.nn.initializers.variance_scaling(scale, "fan_out", "truncated_normal")(key, shape)
        standard = jax.random.truncated_normal(key, -2.0, 2.0, shape).ravel()
        np.testing.assert_allclose(cifar.predrawn_init(standard)(None, shape), reference, rtol=1e-6, atol=1e-9)


def one_cbp_step(variant):
    """One CBP step of `variant` on the tiny network (width 4, dense 16) with every unit mature and pending just
    below 1, so that each unit layer replaces exactly its one chosen unit. BatchNorm parameters, running
    statistics and momentum are set to random values first, so that a reset or a kept value shows. Returns
    (params, stats, momentum, activations) before, the same after, the new CBP states and the layers."""
    agent = {**cifar.AGENTS["cbp"], "replacement_rate": 1e-4, "maturity_threshold": 0, "cbp_variant": variant}
    params, stats = jax.jit(cifar.init_net, static_argnums=(1, 2))(jax.random.key(0), 4, 16)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    stats = jax.tree.map(lambda x: x + jax.random.uniform(jax.random.key(8), x.shape), stats)
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
    acts = forward(params, stats, x, True)[2]
    opt = common.sgd(0.01, 0.0, 0.9)
    opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params), params)[1]
    layers = cifar.cbp_layers(params, variant)
    cbp = [common.cbp_init(cifar._at(params, layer.incoming)["b"].shape[0])._replace(pending=jnp.array(0.9999))
           for layer in layers]
    new, new_stats, new_opt, new_cbp = jax.jit(lambda *a: cifar.cbp_step(agent, opt, *a))(
        params, stats, opt_state, cbp, acts, jax.random.key(2))
    tonp = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    return ((tonp(params), tonp(stats), tonp(opt_state[1][0].trace), tonp(acts)),
            (tonp(new), tonp(new_stats), tonp(new_opt[1][0].trace)), new_cbp, layers)


def features_of(acts, layer):
    name, index = layer.features
    return acts[name] if index is None else acts[name][index]


def test_cbp_reach_is_dohares_resnet_cbp():
    """The default CBP takes Dohare et al.'s ResNet reach (their res_gnt.py): the stem, both convs of every block
    and the two dense layers (19 unit layers; not the 1x1 skips, not the head). Each layer replaces its lowest
    mean|w_out| x 0.01 mean|h| unit (features: the stem's output, the inner channels, the block outputs, the dense
    features), whose filter is redrawn (bias 0), whose outgoing slice in the next weight layer is 0, and whose
    BatchNorm scale, shift, running mean and variance become 1, 0, 0, 1; the momentum, the skips and every other
    unit are untouched."""
    (params, stats, mom, acts), (new, new_stats, new_mom), new_cbp, layers = one_cbp_step("dohare")
    assert len(layers) == 19
    assert [layer.incoming for layer in layers[:4]] == [("stem", "conv"), ("blocks", 0, "a", "conv"),
                                                        ("blocks", 0, "b", "conv"), ("blocks", 1, "a", "conv")]
    assert layers[16].outgoing == ("dense1", "w") and layers[-1].outgoing == ("head", "w")
    chosen = []
    for i, layer in enumerate(layers):
        w_out = np.abs(cifar._at(params, layer.outgoing))
        w_out = w_out.mean(axis=tuple(a for a in range(w_out.ndim) if a != layer.out_axis))
        h = features_of(acts, layer)
        utility = w_out * 0.01 * np.abs(h.reshape(-1, h.shape[-1])).mean(0)
        replaced = np.flatnonzero(np.asarray(new_cbp[i].age) == 0)
        assert replaced.tolist() == [int(np.argmin(utility))], i
        chosen.append(replaced[0])
    for i, (layer, j) in enumerate(zip(layers, chosen)):
        old_in, new_in = cifar._at(params, layer.incoming), cifar._at(new, layer.incoming)
        assert np.all(new_in["w"][..., j] != old_in["w"][..., j]) and new_in["b"][j] == 0.0
        kept_in = np.delete(np.delete(new_in["w"], j, -1), chosen[i - 1], -2) if i else np.delete(new_in["w"], j, -1)
        kept_old = np.delete(np.delete(old_in["w"], j, -1), chosen[i - 1], -2) if i else np.delete(old_in["w"], j, -1)
        np.testing.assert_array_equal(kept_in, kept_old)  # but the previous layer's unit's slice (zeroed)
        out = np.moveaxis(cifar._at(new, layer.outgoing), layer.out_axis, 0)[j]  # [(kh, kw,) next units]
        redrawn = chosen[i + 1] if i + 1 < len(layers) else None  # the next layer's own new filter
        np.testing.assert_array_equal(np.delete(out, redrawn, -1) if redrawn is not None else out, 0.0)
        if layer.bn is not None:
            bn, s = cifar._at(new, layer.bn)["bn"], cifar._at(new_stats, layer.bn)
            assert (bn["scale"][j], bn["bias"][j], s["mean"][j], s["var"][j]) == (1.0, 0.0, 0.0, 1.0)
            old_bn = cifar._at(params, layer.bn)["bn"]
            np.testing.assert_array_equal(np.delete(bn["scale"], j), np.delete(old_bn["scale"], j))
    fresh = np.concatenate([cifar._at(new, layer.incoming)["w"][..., j].ravel()
                            / np.sqrt(2 / np.prod(cifar._at(new, layer.incoming)["w"].shape[:-1]))
                            for layer, j in zip(layers, chosen)])
    assert abs(fresh.mean()) < 0.1 and abs(fresh.std() - 1) < 0.1  # Kaiming-normal: N(0, 2 / fan_in)
    for b_old, b_new in zip(params["blocks"], new["blocks"]):
        if "skip" in b_old:
            np.testing.assert_array_equal(b_new["skip"]["conv"]["w"], b_old["skip"]["conv"]["w"])
    for a, b in zip(jax.tree.leaves(mom), jax.tree.leaves(new_mom)):
        np.testing.assert_array_equal(a, b)  # momentum kept, as Dohare et al.'s


def test_cbp_paper_variant_reach_and_reinit():
    """--cbp-variant paper (the authors' incremental_cifar/cbp.py): units are the blocks' inner channels and the
    two dense layers (10 layers); each replaces its HIGHEST 0.01 |mean h| x mean|w_out| unit, with h the inner
    channels in a block with a 1x1 skip and the block's pre-residual second BatchNorm output in the others (the
    authors' feature dict); incoming filter and outgoing weights redrawn U(+-sqrt(6 / shape[0])) (3x3 conv:
    sqrt(2), one value over the 9 taps), bias 0; BatchNorm, running statistics, momentum, the stem, the conv
    b filters and the skips untouched."""
    (params, stats, mom, acts), (new, new_stats, new_mom), new_cbp, layers = one_cbp_step("paper")
    assert len(layers) == 10 and [layer.features[0] for layer in layers[:8]] == [
        "skip" in b and "blocks" or "pre_residual" for b in params["blocks"]]
    for i, layer in enumerate(layers):
        w_out = np.abs(cifar._at(params, layer.outgoing))
        w_out = w_out.mean(axis=tuple(a for a in range(w_out.ndim) if a != layer.out_axis))
        h = features_of(acts, layer)
        utility = 0.01 * np.abs(h.reshape(-1, h.shape[-1]).mean(0)) * w_out
        j = int(np.argmax(utility))
        assert np.flatnonzero(np.asarray(new_cbp[i].age) == 0).tolist() == [j], i
        w_in, w_new = cifar._at(new, layer.incoming)["w"], cifar._at(new, layer.outgoing)
        bound_in, bound_out = np.sqrt(6 / w_in.shape[0]), np.sqrt(6 / w_new.shape[0])
        assert np.all(np.abs(w_in[..., j]) <= bound_in) and cifar._at(new, layer.incoming)["b"][j] == 0.0
        out = np.moveaxis(w_new, layer.out_axis, 0)[j]
        assert np.all(np.abs(out) <= bound_out) and np.all(out != 0)
        rest_new = np.delete(np.moveaxis(w_new, layer.out_axis, 0), j, 0)
        rest_old = np.delete(np.moveaxis(cifar._at(params, layer.outgoing), layer.out_axis, 0), j, 0)
        if i + 1 < len(layers) and layers[i + 1].incoming + ("w",) == layer.outgoing:  # dense1 -> dense2's units
            nxt = int(np.flatnonzero(np.asarray(new_cbp[i + 1].age) == 0)[0])
            rest_new, rest_old = np.delete(rest_new, nxt, -1), np.delete(rest_old, nxt, -1)
        np.testing.assert_array_equal(rest_new, rest_old)
        if w_in.ndim == 4:  # 3x3 taps share each fresh value
            assert np.all(w_in[..., j] == w_in[:1, :1, :, j]) and np.all(out == out[:1, :1])
            np.testing.assert_allclose(bound_in, np.sqrt(2))
    for tree_old, tree_new in ((stats, new_stats), (mom, new_mom)):
        for a, b in zip(jax.tree.leaves(tree_old), jax.tree.leaves(tree_new)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(new["stem"]["conv"]["w"], params["stem"]["conv"]["w"])
    for b_old, b_new in zip(params["blocks"], new["blocks"]):
        for part in ("a", "b"):
            np.testing.assert_array_equal(b_new[part]["bn"]["scale"], b_old[part]["bn"]["scale"])
        np.testing.assert_array_equal(b_new["b"]["conv"]["b"], b_old["b"]["conv"]["b"])


def test_batchnorm_eval_uses_running_statistics(tiny_net):
    params, stats, x = tiny_net
    h = jax.random.normal(jax.random.key(2), (5, 3, 3, 4))
    p = {"scale": jnp.array([1.0, 2.0, 0.5, 1.0]), "bias": jnp.array([0.0, 1.0, -1.0, 0.5])}
    s = {"mean": jnp.array([0.1, -0.2, 0.3, 0.0]), "var": jnp.array([1.0, 4.0, 0.25, 2.0])}
    y, s_eval = cifar.batch_norm(p, s, h, train=False)
    np.testing.assert_allclose(y, (h - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"],
                               rtol=1e-5, atol=1e-6)
    assert s_eval is s
    y, s_train = cifar.batch_norm(p, s, h, train=True)
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    np.testing.assert_allclose(y, (h - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s_train["mean"], 0.9 * s["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s_train["var"], 0.9 * s["var"] + 0.1 * var * 45 / 44, rtol=1e-5)
    # Whole network: in eval mode an image's output depends on the running statistics, not on the other
    # images of the batch; in train mode it depends on the batch.
    _, trained_stats, _ = forward(params, stats, x, True)
    other = x.at[2:].set(jax.random.uniform(jax.random.key(5), (4, 32, 32, 3)))
    full = forward(params, trained_stats, x, False)[0]
    np.testing.assert_allclose(forward(params, trained_stats, other, False)[0][:2], full[:2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(forward(params, stats, x, False)[0], full, atol=1e-3)
    train_logits = forward(params, stats, x, True)[0]
    assert not np.allclose(forward(params, stats, other, True)[0][:2], train_logits[:2], atol=1e-3)


def test_masked_logits_ignore_unseen_classes():
    logits = jax.random.normal(jax.random.key(0), (6, 100))
    labels = jnp.array([3, 0, 4, 1, 2, 3])
    seen = jnp.arange(100) < 5
    loss, correct = cifar.masked_loss_acc(logits.at[:, 50].set(1e4).at[:, 7].set(1e3), labels, seen)
    np.testing.assert_allclose(loss, -jax.nn.log_softmax(logits[:, :5])[jnp.arange(6), labels], rtol=1e-5)
    np.testing.assert_array_equal(correct, (jnp.argmax(logits[:, :5], 1) == labels).astype(jnp.float32))
    grad = jax.jit(jax.grad(lambda z: jnp.sum(cifar.masked_loss_acc(z, labels, seen)[0])))(logits)
    assert float(jnp.max(jnp.abs(grad[:, 5:]))) == 0.0 and float(jnp.min(jnp.abs(grad[:, :5]))) > 0.0


# -------------------------------------------------------------------------------------------- end to end
# CBP's end-to-end settings: every unit eligible at once, about one replacement per 32 units per step. (A rate
# that replaces many units per step compiles much more slowly: the replacement loops are unrolled.)
CBP = dict(replacement_rate=0.03, maturity_threshold=0)


def one_member(data_dir, seed=0, **kw):
    """make_train's functions for TINY (+ kw), each jitted for one member (seed `seed`, lr 0.01, the agent's
    other values), and that member's inputs: the same single-member programs main() runs in map mode."""
    args = cifar.Args(**{**TINY, **kw})
    agent, configs = cifar.resolve(args)
    ds = datasets.cifar100(data_dir, None)
    init, train, evaluate, spectrum, calls, _ = cifar.make_train(args, agent, ds)
    hp = {k: jnp.float32(configs[0].get(k, 0.0)) for k in cifar.SWEPT}
    inputs = dict(hp=hp, seed=np.int32(seed), classes=cifar.class_ranks([seed])[0],
                  data={k: jnp.asarray(v) for k, v in ds.items()})
    return (jax.jit(init), jax.jit(train), jax.jit(evaluate), calls), inputs


@pytest.fixture(scope="module")
def bp_alone(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("alone")
    return [run(out, f"seed{s}", agent="bp", seed=s, data_dir=data_dir) for s in (0, 1)]


# The settings of every agent's end-to-end run (beside bp's, from bp_alone): tests/test_equal_metrics.py records
# these runs' metrics, and test_metrics_equal_the_recorded_ones below checks them, from the same runs.
# Table 6's ER step (1e-4), Table 5's noise (1e-5) and weight decay (1e-4 to 1e-3) move this tiny network's numbers
# by ~1e-6 (relative) in its 15 steps, below the recorded values' tolerance: larger values show that they act.
# Spectra for one agent (they do not depend on it; each costs ~0.8 s of CPU here). ReDo every 2 steps, so that it
# acts in these 15; the persistent power iteration (1 per step: compiles faster than 10) carries its vectors
# through main's calls and checkpoints.
HESSIAN = dict(hessian_every=1, hessian_samples=20, hessian_batch=10, lanczos_iters=4)
AGENT_RUNS = {"l2": dict(weight_decay=(1e-2,), **HESSIAN), "l2-er": dict(weight_decay=(1e-2,), er_lr=(1e-2,)),
              "er": dict(er_lr=(1e-2,)), "cbp": CBP, "snp": dict(perturb_scale=1e-3),
              "snp-l2": dict(perturb_scale=1e-3, weight_decay=(1e-2,)), "redo": dict(redo_every=2),
              "spectral-reg": dict(spectral_persistent=True, power_iters=1)}


def agent_run(out, agent, data_dir):
    """(metrics, hessian or None) of the agent's end-to-end run: TINY and AGENT_RUNS' settings, seed 0."""
    metrics = run(out, agent, agent=agent, data_dir=data_dir, **AGENT_RUNS.get(agent, {}))
    spectra = out / agent / "hessian.npz"
    if not spectra.exists():
        return metrics, None
    with np.load(spectra) as h:
        return metrics, {k: h[k] for k in h.files}


@pytest.fixture(scope="module")
def agent_runs(tmp_path_factory, data_dir, bp_alone):
    out = tmp_path_factory.mktemp("agents")
    results = {"bp": bp_alone[0]}
    for agent in list(cifar.AGENTS)[1:]:
        results[agent], spectra = agent_run(out, agent, data_dir)
        if spectra is not None:
            results[f"{agent}-hessian"] = spectra
    return results


def test_every_agent_runs(agent_runs):
    results = agent_runs
    for agent in cifar.AGENTS:
        m = results[agent]
        assert m["test_acc"].shape == (1, 1, 2) and m["dead_units"].shape == (1, 1, 2, 2)
        for k in KEYS:
            assert np.all(np.isfinite(m[k])), (agent, k)
        assert np.all((0 <= m["test_acc"]) & (m["test_acc"] <= 1)) and not m["diverged"].any()
        assert m["class_order"].shape == (1, 1, 100)
    h = results["l2-hessian"]  # spectra at init and end of both tasks, weights summing to 1 per probe
    assert h["init_nodes"].shape == h["end_weights"].shape == (1, 1, 2, 1, 4)
    np.testing.assert_array_equal(h["tasks"], [0, 1])
    np.testing.assert_allclose(h["end_weights"].sum(-1), 1.0, rtol=1e-4)
    assert np.all(np.isfinite(h["init_nodes"])) and not np.allclose(h["init_nodes"], h["end_nodes"])
    # The regularizers change the results; RESET differs from BP only from the second task on.
    for agent in ("l2", "er", "cbp", "snp", "layernorm-l2", "spectral-reg", "redo"):
        assert not np.allclose(results[agent]["param_norm"], results["bp"]["param_norm"]), agent
    for k in KEYS:
        np.testing.assert_array_equal(results["reset"][k][:, :, 0], results["bp"][k][:, :, 0], err_msg=k)


def test_metrics_equal_the_recorded_ones(agent_runs):
    """Every agent's end-to-end numbers equal those recorded in tests/golden/cifar.npz, each within its measured
    tolerance (tests/test_equal_metrics.py says how they were recorded and measured)."""
    import test_equal_metrics
    got = {f"{agent}/metrics/{k}": v for agent in cifar.AGENTS for k, v in agent_runs[agent].items()}
    got |= {f"l2/hessian/{k}": v for k, v in agent_runs["l2-hessian"].items()}
    test_equal_metrics.check_recorded("cifar", got)


def test_cbp_replaces_channels_with_their_batchnorm(data_dir):
    """Train step by step with the end-to-end CBP settings (Dohare et al.'s ResNet CBP) and check every unit right
    after its replacement: rate x #units per layer and step (all mature), fresh filter, bias 0, BatchNorm and its
    running statistics reset, outgoing weights 0 (where no later layer redrew them in the same step)."""
    (init, train, _, _), member = one_member(data_dir, agent="cbp", **CBP)
    state = init(member["seed"], 0)
    layers = cifar.cbp_layers(state["params"], "dohare")
    sizes = [cifar._at(state["params"], layer.incoming)["b"].shape[0] for layer in layers]
    seen_replaced = np.zeros(len(sizes), int)
    for step in range(10):  # task 1's steps one by one; the 4-unit layers first replace one (0.03 x 4 x 9 >= 1) at 9
        before = jax.tree.map(np.asarray, state)
        state = train(state, member["hp"], member["seed"], member["classes"], member["data"], 0, step, 1)
        after = jax.tree.map(np.asarray, state)
        p, s = after["params"], after["stats"]
        chosen = [np.flatnonzero(c.age == 0) for c in after["cbp"]]
        expected = [int(np.floor(0.03 * n * (step + 1))) - int(np.floor(0.03 * n * step)) for n in sizes]
        assert [len(c) for c in chosen] == expected, step
        seen_replaced += [len(c) for c in chosen]
        for i, (layer, replaced) in enumerate(zip(layers, chosen)):
            if not len(replaced):
                continue
            incoming = cifar._at(p, layer.incoming)
            old_in = cifar._at(before["params"], layer.incoming)["w"]
            assert not np.allclose(incoming["w"][..., replaced], old_in[..., replaced])
            np.testing.assert_array_equal(incoming["b"][replaced], 0.0)
            if layer.bn is not None:
                bn, st = cifar._at(p, layer.bn)["bn"], cifar._at(s, layer.bn)
                np.testing.assert_array_equal(bn["scale"][replaced], 1.0)
                np.testing.assert_array_equal(bn["bias"][replaced], 0.0)
                np.testing.assert_array_equal(st["mean"][replaced], 0.0)
                np.testing.assert_array_equal(st["var"][replaced], 1.0)
            out = np.moveaxis(cifar._at(p, layer.outgoing), layer.out_axis, 0)[replaced]
            redrawn = chosen[i + 1] if i + 1 < len(layers) else []
            np.testing.assert_array_equal(np.delete(out, redrawn, -1), 0.0)
    assert np.all(seen_replaced >= 1)


@pytest.fixture(scope="module")
def bp_member(data_dir):
    return one_member(data_dir, agent="bp")


@pytest.mark.parametrize("feature_samples", [0, 7])
def test_metrics_on_every_test_image_of_the_seen_classes(data_dir, feature_samples):
    """Dead units and effective rank of the dense layers equal a by-hand count and SVD (eval mode) on exactly the
    test images of the seen classes (default 0: all 20 after task 2; the authors' sample), or on the random 7 of
    them that --feature-samples 7 draws; the two samples give different ranks."""
    (init, _, evaluate, _), m = one_member(data_dir, agent="bp", feature_samples=feature_samples)
    state = init(m["seed"], 0)
    params = state["params"]
    state = {**state, "params": {**params, "dense1": {**params["dense1"], "b": params["dense1"]["b"].at[:3].set(-1e3)}}}
    got = jax.device_get(evaluate(state, m["seed"], m["classes"], m["data"], 1))
    y_test = np.asarray(m["data"]["y_test"])
    seen = np.asarray(m["classes"])[y_test] < 10  # task 2: the first 10 classes of the member's order
    assert seen.sum() == 10 * TEST_PER_CLASS == 20
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), cifar.EVAL_STREAM), 1)
    subset = np.asarray(jnp.argsort(jnp.where(seen, jax.random.uniform(key, seen.shape), 2.0))[:7])
    ranks = {}
    for sample, pick in ((0, np.flatnonzero(seen)), (7, subset)):
        assert seen[pick].all()
        x = jnp.asarray(m["data"]["x_test"])[pick].astype(jnp.float32) / 255.0
        feats = forward(state["params"], state["stats"], x, False)[2]["dense"]
        ranks[sample] = [numpy_effective_rank(f) for f in feats]
        if sample == feature_samples:
            assert_metrics_of(got, feats)
    assert got["dead_units"][0] >= 3
    assert np.all(np.abs(np.array(ranks[0]) - ranks[7]) > 0.2)  # the samples differ: the check has teeth


def test_er_step_comes_before_the_sgd_steps_and_updates_batchnorm_statistics(data_dir):
    """er with --er-batch 1: the ER ascent on the minibatch's images, then the SGD step from the ascended
    parameters (the authors' order). The ER pass runs BatchNorm in training mode and updates its running
    statistics (momentum 0.1: 0.9 old + 0.1 the batch's, unbiased variance), as the authors' ER pass writes
    Flax's batch_stats back; the SGD step's pass updates them again. A by-hand sequence equals the run's."""
    lr, er_lr = 0.01, 0.05
    (init, train, _, _), m = one_member(data_dir, agent="er", er_lr=(er_lr,), er_batch=1)
    state = init(m["seed"], 0)
    state = {**state, "stats": jax.tree.map(lambda s: s + 0.5, state["stats"])}  # running statistics off their init
    after = train(state, m["hp"], m["seed"], m["classes"], m["data"], 0, 0, 1)
    # The run's first minibatch: the epoch's order of the seen images (cifar.train_epoch's draw).
    seen = m["classes"] < 5
    epoch_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), cifar.TRAIN_STREAM), 0), 0)
    y = m["data"]["y_train"]
    idx = jnp.argsort(jnp.where(seen[y], jax.random.uniform(epoch_key, y.shape), 2.0))[:10]
    x, yb = m["data"]["x_train"][idx].astype(jnp.float32) / 255.0, y[idx]
    params0, stats0 = state["params"], state["stats"]

    def dense(p, x):
        _, new_stats, acts = cifar.forward(p, stats0, x, True)
        return acts["dense"], new_stats

    params1, _, stats1 = jax.jit(lambda p: common.er_ascent(p, dense, x, er_lr, has_aux=True))(params0)
    # The ER pass's running statistics of the stem by hand: its conv on the images at the parameters before the step.
    w, b = params0["stem"]["conv"]["w"], params0["stem"]["conv"]["b"]
    h = np.asarray(jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + b, np.float64)
    n = h.shape[0] * h.shape[1] * h.shape[2]
    np.testing.assert_allclose(stats1["stem"]["mean"], 0.9 * np.asarray(stats0["stem"]["mean"]) + 0.1 * h.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats1["stem"]["var"],
                               0.9 * np.asarray(stats0["stem"]["var"]) + 0.1 * h.var((0, 1, 2)) * n / (n - 1),
                               rtol=1e-4, atol=1e-6)

    def loss(p):
        logits, new_stats, _ = cifar.forward(p, stats1, x, True)
        return jnp.mean(cifar.masked_loss_acc(logits, yb, seen)[0]), new_stats

    (loss1, stats2), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params1)
    params2 = jax.tree.map(lambda p, g: p - lr * g, params1, grads)  # the first step: momentum's trace = gradient
    for got, want in ((after["params"], params2), (after["stats"], stats2)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    np.testing.assert_allclose(after["loss_sum"], loss1, rtol=1e-5)  # the recorded loss: after the ER step
    # Teeth: the ER step moved the loss and the statistics (one pass instead of two would differ).
    assert abs(float(loss(params0)[0]) - float(loss1)) > 1e-4
    stats_sgd_only = cifar.forward(params0, stats0, x, True)[1]
    assert np.abs(np.asarray(stats_sgd_only["stem"]["mean"]) - np.asarray(stats2["stem"]["mean"])).max() > 1e-3


def leaf_names(tree):
    return {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_layernorm_only_in_layernorm_l2_dense_head(tiny_net, data_dir):
    """layernorm-l2 (the authors' CIFAR runs): LayerNorm (scale 1, shift 0, eps 1e-6) before the ReLU of the two
    dense layers only; the trunk keeps its BatchNorm, the head has none; coupled L2 decays every parameter, the
    LayerNorm scales too."""
    assert [a for a, entry in cifar.AGENTS.items() if entry.get("layer_norm")] == ["layernorm-l2"]
    (init, train, _, _), m = one_member(data_dir, agent="layernorm-l2")
    state = init(m["seed"], 0)
    params = state["params"]
    added = {f"['{name}']['{leaf}']" for name in ("dense1", "dense2") for leaf in ("scale", "shift")}
    assert leaf_names(params) == leaf_names(tiny_net[0]) | added
    for name in ("dense1", "dense2"):
        np.testing.assert_array_equal(params[name]["scale"], 1.0)
        np.testing.assert_array_equal(params[name]["shift"], 0.0)
    # Placement and formula: dense2's features are ReLU(LayerNorm(d1 W + b) x scale + shift), the logits a plain
    # affine map of them; LayerNorm makes both dense layers' features blind to the scale of their pre-activations.
    _, stats, x = tiny_net
    params = {**params, "dense2": {**params["dense2"], "scale": jnp.full(16, 2.0), "shift": jnp.full(16, 0.5)}}
    logits, _, acts = forward(params, stats, x, False)
    d1, d2 = (np.asarray(a, np.float64) for a in acts["dense"])
    z = d1 @ np.asarray(params["dense2"]["w"], np.float64) + np.asarray(params["dense2"]["b"], np.float64)
    z = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(d2, np.maximum(2.0 * z + 0.5, 0.0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, d2 @ params["head"]["w"] + params["head"]["b"], rtol=1e-4, atol=1e-5)
    scaled = {**params, **{n: {**params[n], "w": 3 * params[n]["w"], "b": 3 * params[n]["b"]}
                           for n in ("dense1", "dense2")}}
    for a, b in zip(acts["dense"], forward(scaled, stats, x, False)[2]["dense"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    plain = tiny_net[0]  # bp's network: no LayerNorm, so dense1's features scale with its weights
    plain_scaled = {**plain, "dense1": {k: 3 * v for k, v in plain["dense1"].items()}}
    np.testing.assert_allclose(forward(plain_scaled, stats, x, False)[2]["dense"][0],
                               3 * forward(plain, stats, x, False)[2]["dense"][0], rtol=1e-4, atol=1e-5)
    # One step with weight decay 1e-4 and one without (the same program): the momentum (= the first step's
    # gradient) differs by 1e-4 x every parameter, LayerNorm and BatchNorm scales included.
    assert cifar.AGENTS["layernorm-l2"]["weight_decay"] == 1e-4 and np.isclose(m["hp"]["weight_decay"], 1e-4)
    decayed = train(state, m["hp"], m["seed"], m["classes"], m["data"], 0, 0, 1)["opt"][1][0].trace
    plain_hp = {**m["hp"], "weight_decay": jnp.float32(0.0)}
    undecayed = train(state, plain_hp, m["seed"], m["classes"], m["data"], 0, 0, 1)["opt"][1][0].trace
    jax.tree.map(lambda a, b, p: np.testing.assert_allclose(a - b, 1e-4 * p, rtol=1e-3, atol=1e-7),  # float32
                 decayed, undecayed, state["params"])
    for name in ("dense1", "dense2"):
        np.testing.assert_allclose(decayed[name]["scale"] - undecayed[name]["scale"], 1e-4, rtol=1e-3)


def test_spectral_start_vectors_are_the_authors():
    """The penalty's start vectors come from PRNGKey(i), i the authors' counter over kernels in their Flax sorted
    order (BasicBlock_0..7 with Conv_0, Conv_1, Identity; the stem's Conv_0; Dense_0..2), which puts the stem
    after the blocks and before the dense layers; the penalty equals their power iteration by hand."""
    from authors_spectral import authors_penalty, kernel_paths
    params, _ = cifar.init_net(jax.random.key(0), 4, 16)
    params = jax.tree.map(lambda x: x + 0.1, params)  # nonzero biases, BatchNorm scales off 1
    table = {}
    for i, block in enumerate(params["blocks"]):  # the authors' BasicBlock_i: Conv_0, Conv_1[, Identity]
        for name in ("a", "b", "skip")[:2 + ("skip" in block)]:
            table[f"['blocks'][{i}]['{name}']['conv']['w']"] = len(table)
    assert len(table) == 19  # 16 block convs + 3 shortcut convs: keys 0 .. 18
    table |= {"['dense1']['w']": 20, "['dense2']['w']": 21, "['head']['w']": 22,  # Dense_0, Dense_1, Dense_2
              "['stem']['conv']['w']": 19}  # the stem's Conv_0, after the blocks
    assert kernel_paths(params) == list(table)  # our leaf order: blocks, dense1, dense2, head, stem
    assert cifar.spectral_key_ids(params) == list(table.values())
    key_ids = cifar.spectral_key_ids(params)
    for iters in (1, 10):
        np.testing.assert_allclose(float(common.spectral_penalty(params, 2.0, 2.0, iters, key_ids=key_ids)[0]),
                                   authors_penalty(params, table, iters=iters), rtol=1e-5)


def test_spectral_reg_penalizes_parameters_not_batchnorm_statistics(data_dir, bp_member):
    """spectral-reg's first step against bp's from the same state: the momentum (= the step's gradient) differs by
    lambda x the penalty's gradient: 2 x bias for every bias and BatchNorm shift, 2 x (scale - 1) for every
    BatchNorm scale, the (sigma_max^2 - 2)^2 term's for every kernel, convs and the head included. BatchNorm's
    running statistics are not parameters: the step moves them only by their running average, as bp's; the
    recorded training loss is the cross-entropy alone."""
    (init, train, _, _), m = one_member(data_dir, agent="spectral-reg", power_iters=1)  # 1: compiles faster
    (_, bp_train, _, _), _ = bp_member
    state = init(m["seed"], 0)
    assert {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]} == {
        "w", "b", "scale", "bias"}
    rng = np.random.default_rng(0)

    def moved(path, x):  # scales away from 1, biases and shifts away from 0: their penalty gradients are not 0
        if path[-1].key == "w":
            return x
        return jnp.asarray(rng.uniform(0.5, 1.5, x.shape) if path[-1].key == "scale" else rng.normal(0, 0.3, x.shape),
                           jnp.float32)

    params = jax.tree_util.tree_map_with_path(moved, state["params"])
    stats = jax.tree.map(lambda s: s + 3.0, state["stats"])  # running statistics far from their init
    state = {**state, "params": params, "stats": stats}
    after = train(state, m["hp"], m["seed"], m["classes"], m["data"], 0, 0, 1)
    bp_after = bp_train(state, m["hp"], m["seed"], m["classes"], m["data"], 0, 0, 1)
    lam = cifar.AGENTS["spectral-reg"]["spectral_lambda"]
    assert lam == 1e-2
    diff = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                        after["opt"][1][0].trace, bp_after["opt"][1][0].trace)
    starts = common.spectral_starts(params, cifar.spectral_key_ids(params))  # the fixed vectors, in leaf order
    kernels = []
    for (path, d), p in zip(jax.tree_util.tree_flatten_with_path(diff)[0], jax.tree.leaves(params)):
        name, where = path[-1].key, jax.tree_util.keystr(path)
        if name != "w":
            np.testing.assert_allclose(d, lam * 2 * (np.asarray(p) - (name == "scale")), rtol=1e-3, atol=2e-6,
                                       err_msg=where)
            continue
        kernels.append(where)
        if where in ("['stem']['conv']['w']", "['head']['w']"):  # a conv, as (3*3*3, width); the output layer
            g = jax.grad(lambda w: common.spectral_penalty({"w": w}, 2.0, 2.0, 1, [starts[len(kernels) - 1]])[0])(p)
            np.testing.assert_allclose(d, lam * np.asarray(g), rtol=1e-3, atol=2e-6, err_msg=where)
        assert np.max(np.abs(d)) > 1e-5, where  # every kernel is pulled
    assert len(kernels) == 1 + 16 + 3 + 3 and "['head']['w']" in kernels  # stem, block convs, skips, dense, head
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), after["stats"],
                 bp_after["stats"])
    np.testing.assert_allclose(after["loss_sum"], bp_after["loss_sum"], rtol=1e-6)


def test_redo_recycles_only_dormant_units(tiny_net):
    """One ReDo step: exactly the dormant units (score <= tau; conv: per channel) are recycled: fresh incoming
    weights, bias 0, zero outgoing weights and zero momentum for all of these, a conv channel's BatchNorm scale 1,
    shift 0, running mean 0 and variance 1; everything else is untouched, and the network's outputs are not
    changed. One block channel and one dense2 unit are made dormant by hand; some dense units of the tiny net
    are dead from the start."""
    params, stats, x = tiny_net
    agent = cifar.AGENTS["redo"]
    params = jax.tree.map(lambda v: v, params)
    stats = jax.tree.map(lambda v: v + 0.5, stats)  # running statistics away from their init
    bn = params["blocks"][3]["a"]["bn"]
    params["blocks"][3]["a"]["bn"] = {"scale": bn["scale"].at[1].set(0.0), "bias": bn["bias"].at[1].set(-1.0)}
    params["dense2"] = {**params["dense2"], "b": params["dense2"]["b"].at[5].set(-100.0)}
    opt = common.sgd(0.01, 0.0, 0.9)
    opt_state = jax.tree.map(jnp.ones_like, opt.init(params))  # momentum 1 everywhere
    acts = forward(params, stats, x, True)[2]
    features = acts["blocks"] + acts["dense"]
    dormant = [np.flatnonzero(common.dormant_units(h, agent["redo_tau"])) for h in features]
    assert [len(d) for d in dormant[:8]] == [0, 0, 0, 1, 0, 0, 0, 0] and dormant[3][0] == 1  # BN keeps the rest
    assert 5 in dormant[9] and len(dormant[8]) > 0
    new, new_stats, new_opt = jax.jit(lambda *a: cifar.redo_step(agent, opt, *a))(
        params, stats, opt_state, x, jax.random.key(3))
    # Which entries may change: a recycled unit's incoming weights, bias, BatchNorm and outgoing weights.
    keep = jax.tree.map(lambda v: np.ones(v.shape), params)
    for i, d in enumerate(dormant[:8]):
        a = keep["blocks"][i]["a"]
        a["conv"]["w"][..., d] = a["conv"]["b"][d] = a["bn"]["scale"][d] = a["bn"]["bias"][d] = 0
        keep["blocks"][i]["b"]["conv"]["w"][:, :, d] = 0
    for name, nxt, d in (("dense1", "dense2", dormant[8]), ("dense2", "head", dormant[9])):
        keep[name]["w"][:, d] = keep[name]["b"][d] = keep[nxt]["w"][d] = 0
    jax.tree.map(np.testing.assert_array_equal, new_opt[1][0].trace, keep)  # momentum zeroed exactly there
    jax.tree.map(lambda a, b, k: np.testing.assert_array_equal(np.where(k == 1, a, 0), np.where(k == 1, b, 0)),
                 new, params, keep)
    for i, d in enumerate(dormant[:8]):
        a, s = new["blocks"][i]["a"], new_stats["blocks"][i]["a"]
        assert np.all(np.asarray(a["conv"]["w"])[..., d] != np.asarray(params["blocks"][i]["a"]["conv"]["w"])[..., d])
        for leaf, value in ((a["conv"]["b"], 0.0), (a["bn"]["scale"], 1.0), (a["bn"]["bias"], 0.0), (s["mean"], 0.0),
                            (s["var"], 1.0)):
            np.testing.assert_array_equal(np.asarray(leaf)[d], value)
        np.testing.assert_array_equal(np.asarray(new["blocks"][i]["b"]["conv"]["w"])[:, :, d], 0.0)
    kept_stats = jax.tree.map(lambda v: v, stats)
    s = kept_stats["blocks"][3]["a"]
    s["mean"], s["var"] = s["mean"].at[1].set(0.0), s["var"].at[1].set(1.0)
    jax.tree.map(np.testing.assert_array_equal, new_stats, kept_stats)  # only the recycled channel's statistics
    for name, nxt, d in (("dense1", "dense2", dormant[8]), ("dense2", "head", dormant[9])):
        assert np.all(np.asarray(new[name]["w"])[:, d] != np.asarray(params[name]["w"])[:, d])
        np.testing.assert_array_equal(np.asarray(new[name]["b"])[d], 0.0)
    np.testing.assert_array_equal(np.asarray(new["head"]["w"])[dormant[9]], 0.0)
    rest = np.setdiff1d(np.arange(16), dormant[9])  # dense1's outgoing weights, except into recycled dense2 units
    np.testing.assert_array_equal(np.asarray(new["dense2"]["w"])[np.ix_(dormant[8], rest)], 0.0)
    for train in (True, False):  # the recycled units' outputs reach nothing: the outputs stay
        np.testing.assert_allclose(forward(new, new_stats, x, train)[0], forward(params, stats, x, train)[0],
                                   rtol=0, atol=1e-4)


def test_calls_split_anywhere_equal_one_call(bp_member):
    """Two epochs of task 1 (5 steps each) in one call, or in calls of 3 steps (two across the epoch boundary, one
    of them starting mid-epoch): the same state, bit for bit, including the epochs' training loss and accuracy."""
    (init, train, _, _), m = bp_member
    start = init(m["seed"], 0)
    whole = train(start, m["hp"], m["seed"], m["classes"], m["data"], 0, 0, 10)
    split = start
    for first, count in ((0, 3), (3, 3), (6, 3), (9, 1)):
        split = train(split, m["hp"], m["seed"], m["classes"], m["data"], 0, first, count)
    jax.tree.map(np.testing.assert_array_equal, split, whole)
    assert 0 < float(whole["train_loss"]) and float(whole["train_loss"]) != float(start["train_loss"])


def test_reset_reinitializes_everything(bp_member, agent_runs):
    """The reset run's task 2 is bp's training of task 2 from a fresh network (reset changes nothing else)."""
    (init, train, evaluate, _), m = bp_member
    first, fresh = init(m["seed"], 0), init(m["seed"], 1)
    trained = train(first, m["hp"], m["seed"], m["classes"], m["data"], 0, 0, 5)
    assert float(jnp.max(jnp.abs(trained["opt"][1][0].trace["head"]["w"]))) > 0
    assert not np.allclose(trained["stats"]["stem"]["mean"], 0.0)
    assert not np.allclose(fresh["params"]["dense1"]["w"], first["params"]["dense1"]["w"])
    assert all(float(jnp.max(jnp.abs(v))) == 0 for v in jax.tree.leaves(fresh["opt"]))
    np.testing.assert_array_equal(fresh["stats"]["stem"]["var"], 1.0)
    # The reset run's second task equals training task 2 (10 steps) from that fresh network: nothing carried over.
    fresh_trained = train(fresh, m["hp"], m["seed"], m["classes"], m["data"], 1, 0, 10)
    result = evaluate(fresh_trained, m["seed"], m["classes"], m["data"], 1)
    reset = agent_runs["reset"]
    for k in ("test_acc", "test_loss", "param_norm", "effective_rank", "dead_units"):
        np.testing.assert_allclose(reset[k][0, 0, 1], result[k], rtol=1e-6, err_msg=k)
    assert not np.allclose(reset["param_norm"][0, 0, 1], agent_runs["bp"]["param_norm"][0, 0, 1])


@pytest.mark.parametrize("batching", ["vmap", "map"])
def test_seeds_together_equal_seeds_alone(tmp_path, data_dir, bp_alone, batching):
    # Two lr configs x two seeds in one process; config 0 (lr 0.01) must match the single-seed runs.
    together = run(tmp_path, batching, agent="bp", seeds=2, member_batching=batching, lr=(0.01, 0.03),
                   data_dir=data_dir)
    assert together["test_acc"].shape == (2, 2, 2)
    assert not np.allclose(together["param_norm"][1], together["param_norm"][0])
    for s in (0, 1):
        alone = {k: v[0, 0] for k, v in bp_alone[s].items()}
        if batching == "map":  # the single-member program the runs alone used (auto = map on one CPU device)
            for k in KEYS:
                np.testing.assert_array_equal(together[k][0, s], alone[k], err_msg=k)
            continue
        # vmap batches the convolutions, which rounds differently (steps agree to ~1e-7). A width-4 net on
        # random pixels amplifies that over many steps (BatchNorm of near-constant channels), so the first
        # task is compared tightly and later ones through the parameter norm.
        for k in ("test_loss", "train_loss", "param_norm", "effective_rank"):
            np.testing.assert_allclose(together[k][0, s, 0], alone[k][0], rtol=1e-4, err_msg=k)
        np.testing.assert_array_equal(together["dead_units"][0, s, 0], alone["dead_units"][0])
        np.testing.assert_allclose(together["param_norm"][0, s], alone["param_norm"], rtol=1e-4)


def signal_after(monkeypatch, calls, signum):
    """Send `signum` to this process right after its `calls`-th training call, as a Ctrl-C or a kill would."""
    done, accumulate = [], runner.Run.accumulate

    def accumulate_then_signal(self, calls_done, **sums):
        accumulate(self, calls_done, **sums)
        done.append(calls_done)
        if len(done) == calls:
            os.kill(os.getpid(), signum)
    monkeypatch.setattr(runner.Run, "accumulate", accumulate_then_signal)


def test_ctrl_c_sigterm_and_more_tasks_then_resume_equal_uninterrupted(tmp_path, data_dir, agent_runs, monkeypatch,
                                                                        capsys):
    """l2-er in calls of 3 steps: task 1 (5 steps; its ER step on the 5 minibatches of both calls) is 2 calls. A
    1-task run gets SIGINT after the first: checkpoint, the resume command, exit 130. Resumed with --tasks 2, it
    gets SIGTERM in task 1's last call: it finishes the task, exits 143. The next resume ends with the metrics of
    the 2-task run that took each task in one call."""
    cut = dict(agent="l2-er", call_steps=3, data_dir=data_dir, **AGENT_RUNS["l2-er"])
    signal_after(monkeypatch, 1, signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "cut", tasks=1, **cut)
    assert e.value.code == 130
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("interrupted after")]
    assert line and line[0].startswith("interrupted after task 1/1 (step 3 of 5); resume with: python cifar.py ")
    assert line[0].endswith(f"--resume --out-dir {tmp_path / 'cut'}") and "--call-steps 3 " in line[0]
    assert runner.load_checkpoint(tmp_path / "cut")["cursor"]["call"] == 1
    signal_after(monkeypatch, 1, signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "cut", resume=True, **cut)
    assert e.value.code == 143 and "interrupted after task 1/2; resume with:" in capsys.readouterr().out
    monkeypatch.undo()
    resumed = run(tmp_path, "cut", resume=True, **cut)
    for k in KEYS:
        np.testing.assert_array_equal(resumed[k], agent_runs["l2-er"][k], err_msg=k)
    with pytest.raises(SystemExit, match="different settings.*epochs"):
        run(tmp_path, "cut", epochs=3, resume=True, **cut)
    with pytest.raises(SystemExit, match="already holds a run"):  # a new run never overwrites one
        run(tmp_path, "cut", **cut)


def test_renamed_flags_and_bad_sizes_fail_in_one_line(tmp_path, data_dir):
    for flag, new in (("--seed-mode", "--member-batching"), ("--chunk-epochs", "--call-steps")):
        proc = subprocess.run([sys.executable, "cifar.py", flag, "map"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert new in proc.stderr
    for bad, match in ((dict(agent="bp", er_batch=5), "--er-batch does not apply to agent bp"),
                       (dict(agent="er", er_batch=6), "--er-batch 6 exceeds the 5 minibatches"),
                       (dict(batch_size=51), "--batch-size 51 exceeds the 50 training images"),
                       (dict(call_steps=0), "--call-steps must be >= 1"),
                       (dict(feature_samples=-1), "--feature-samples must be >= 0"),
                       (dict(agent="bp", spectral_k=1.0), "--spectral-k does not apply to agent bp"),
                       (dict(agent="spectral-reg", power_iters=0), "--power-iters must be >= 1"),
                       (dict(agent="redo", redo_every=0), "--redo-every must be >= 1")):
        with pytest.raises(SystemExit, match=match):
            run(tmp_path, "bad", data_dir=data_dir, **bad)
