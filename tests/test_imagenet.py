"""Tests for imagenet.py on tiny data written in the real ImageNet32 on-disk format (no real ImageNet here).

All training runs share one tiny shape (4 classes, 6 train + 1 test images per class, batch 4, 2 epochs of
3 minibatches). Every run compiles its own programs, so runs are cached per setting (`run`) and shared
between tests where the setting is the same.
"""
import functools
import io
import json
import math
import pickle
import runpy
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_after import StopAfter
from init_stats import assert_truncated_normal, assert_truncated_shape, truncated_normal_moments
from feature_metrics import assert_metrics_of, numpy_effective_rank
import common
import data
import imagenet

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4
# Images per class in each batch file; files are listed here in the order they are written into the zip.
FILE_COUNTS = {10: 4, 2: 3, 1: 3}  # class order = batch 1, 2, 10 -> 10 images per class
MARKER = 250  # R value at (row 0, column 1) of every image: catches a row/column swap
TINY = dict(tasks=2, epochs=2, batch_size=4, train_per_class=6, test_per_class=1)
CBP_TINY = dict(replacement_rate=0.1, maturity_threshold=1)  # replacements happen within a few steps
REDO_TINY = dict(redo_every=3, redo_tau=0.5)  # recycles within a task's 6 steps (the default period is 1000)
METRICS = ("test_acc", "train_acc", "dead_units", "effective_rank", "param_norm")


def image_code(c, k):
    """R value of the k-th image (file order) of class c; G = 100 + code, B = 200 + code."""
    return 10 * c + k


def batch_files():
    """{batch number: npz bytes} in the official layout: 'data' uint8 [N, 3072] as R plane, G plane, B plane
    (each 32x32 row-major), 'labels' 1-based, classes interleaved."""
    rng = np.random.default_rng(0)
    seen = np.zeros(NUM_CLASSES, int)
    files = {}
    for number in sorted(FILE_COUNTS):
        labels = np.repeat(np.arange(NUM_CLASSES), FILE_COUNTS[number])
        rng.shuffle(labels)
        data = np.zeros((len(labels), 3, 32, 32), np.uint8)
        for i, c in enumerate(labels):
            code = image_code(c, seen[c])
            seen[c] += 1
            data[i] = np.array([code, 100 + code, 200 + code])[:, None, None]
            data[i, 0, 0, 1] = MARKER
        buf = io.BytesIO()
        np.savez(buf, data=data.reshape(len(labels), 3072), labels=(labels + 1).tolist())
        files[number] = buf.getvalue()
    return files


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("manual")
    files = batch_files()
    with zipfile.ZipFile(folder / data.IMAGENET32_ZIP, "w") as zf:
        for number in FILE_COUNTS:  # out of numeric order on purpose
            zf.writestr(f"Imagenet32_train_npz/train_data_batch_{number}.npz", files[number])
    return folder


@pytest.fixture(scope="module")
def data_dir(manual_dir, tmp_path_factory):
    """The cache, built through the script's own loader from the fake zip."""
    folder = tmp_path_factory.mktemp("data")
    imagenet.load_data(imagenet.Args(data_dir=str(folder), manual_dir=str(manual_dir), **TINY))
    return folder


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """run(**overrides) -> (metrics dict, run directory) of a TINY run on the fake cache (cached per overrides)."""
    cache = {}

    def go(**overrides):
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("run")
            run_dir = imagenet.main(imagenet.Args(**{**TINY, "data_dir": str(data_dir), "out_dir": str(out),
                                                     **overrides}))
            with np.load(run_dir / "metrics.npz") as f:
                cache[key] = {k: f[k] for k in f.files}, run_dir
        return cache[key]

    return go


def checkpoint(run_dir):
    with open(Path(run_dir) / "checkpoint.pkl", "rb") as f:
        return pickle.load(f)


@functools.cache
def initializer(agent="bp", **kw):
    """(resolved agent, jitted init(seed) -> a member's state): the initializer a one-member run uses."""
    args = imagenet.Args(agent=agent, synthetic_data=True, **{**TINY, **kw})
    resolved, _ = imagenet.resolve(args)
    return resolved, jax.jit(imagenet.make_train(args, resolved, imagenet.load_data(args))[0])


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def test_cache_from_zip_keeps_first_images_in_file_order(data_dir):
    images = np.load(data.imagenet32_cache(data_dir, 7))
    assert images.dtype == np.uint8 and images.shape == (NUM_CLASSES, 7, 32, 32, 3)
    for c in range(NUM_CLASSES):  # label c + 1 in the files -> class c
        for k in range(7):  # batch 1's 3 images, batch 2's 3, then the first of batch 10
            code = image_code(c, k)
            assert images[c, k, 1, 0].tolist() == [code, 100 + code, 200 + code]  # RGB order
            assert images[c, k, 0, 1, 0] == MARKER  # (row 0, column 1): HWC, not HW swapped
            assert (images[c, k, 5:, :, 2] == 200 + code).all()


def test_cache_from_extracted_files_matches_zip(data_dir, tmp_path):
    for number, raw in batch_files().items():
        (tmp_path / f"train_data_batch_{number}.npz").write_bytes(raw)
    stale_mean = data.imagenet32_mean_path(data.imagenet32_cache(tmp_path / "data", 7))
    stale_mean.parent.mkdir()
    stale_mean.write_text('{"channel_mean": [0.5, 0.5, 0.5], "shape": [4, 7, 32, 32, 3]}')
    data.imagenet32(str(tmp_path / "data"), str(tmp_path), 7)
    np.testing.assert_array_equal(np.load(data.imagenet32_cache(tmp_path / "data", 7)),
                                  np.load(data.imagenet32_cache(data_dir, 7)))
    assert not stale_mean.exists()  # a rebuilt cache does not inherit the old one's channel mean


def test_center_input_subtracts_the_cache_channel_mean_without_rescaling(data_dir):
    """The default input (the authors' code fed Dohare et al.'s centred, unscaled arrays): pixels in [0, 1]
    minus the per-channel mean over every cached image; the spread stays that of the [0, 1] pixels."""
    assert imagenet.Args().input_norm == "center"
    images = np.load(data.imagenet32_cache(data_dir, 7))
    pixels = images.reshape(-1, 3) / 255.0
    # Hand-computed: R = 10c + k (one pixel per image 250), G = R + 100, B = R + 200, over c < 4, k < 7.
    codes = np.array([image_code(c, k) for c in range(NUM_CLASSES) for k in range(7)], np.float64)
    r_mean = (codes.mean() * 1023 + MARKER) / 1024
    expected = np.array([r_mean, codes.mean() + 100, codes.mean() + 200]) / 255.0
    mean = data.imagenet32_channel_mean(images, data_dir)
    np.testing.assert_allclose(mean, expected, rtol=1e-12)
    stored = json.loads(data.imagenet32_mean_path(data.imagenet32_cache(data_dir, 7)).read_text())
    np.testing.assert_allclose(stored["channel_mean"], expected, rtol=1e-12)
    assert data.imagenet32_channel_mean(np.zeros((4, 7, 32, 32, 3), np.uint8), data_dir) == mean  # read back
    loaded = imagenet.load_data(imagenet.Args(data_dir=str(data_dir), **TINY))  # what a run subtracts
    assert loaded["pixel_mean"] == mean
    x = np.asarray(imagenet.preprocess(jnp.asarray(images.reshape((-1,) + data.IMAGENET32_SHAPE)), "center", mean))
    x = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(x.std(0), pixels.std(0), rtol=1e-5)  # centred, not divided by anything
    assert pixels.std(0).min() > 0.01
    first = images[0, 0, 0, 0].astype(np.float64) / 255.0  # one pixel under the other two options
    for norm, value in (("imagenet", (first - imagenet.IMAGENET_MEAN) / imagenet.IMAGENET_STD), ("unit", first)):
        out = imagenet.preprocess(jnp.asarray(images[:1, 0]), norm)
        np.testing.assert_allclose(out[0, 0, 0], value, rtol=1e-6)
    with pytest.raises(ValueError, match="channel mean"):
        imagenet.preprocess(jnp.asarray(images[:1, 0]), "center")


def test_too_few_images_per_class_fails(manual_dir, tmp_path):
    with pytest.raises(SystemExit, match="has 10 training images"):
        data.imagenet32(str(tmp_path), str(manual_dir), 11)
    assert not data.imagenet32_cache(tmp_path, 11).exists()


def test_cache_through_tfds_without_files(tmp_path, monkeypatch):
    """No ImageNet32 files: the cache is built from tensorflow-datasets' imagenet_resized/32x32 (mocked here:
    1000 classes, 3 images each, shuffled), keeping the first images of every class in tfds's order."""
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "online", lambda host, timeout=5.0: True)  # the mock needs no network
    per_class = 3
    labels = np.repeat(np.arange(data.IMAGENET32_CLASSES), per_class)
    np.random.default_rng(0).shuffle(labels)
    rank = np.zeros(len(labels), np.uint8)  # position of each image within its class, in tfds order
    seen = np.zeros(data.IMAGENET32_CLASSES, int)
    for i, c in enumerate(labels):
        rank[i], seen[c] = seen[c], seen[c] + 1
    images = np.zeros((len(labels), 32, 32, 3), np.uint8)
    images[:, 0, 0] = np.stack([labels % 256, labels // 256, rank], 1)
    images[:, 0, 1, 0] = MARKER

    def as_dataset(builder, split, **kwargs):
        assert builder.name == "imagenet_resized" and split == "train"
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        cached = data.imagenet32(str(tmp_path), None, 2)
    assert cached.shape == (data.IMAGENET32_CLASSES, 2, 32, 32, 3)
    classes = np.arange(data.IMAGENET32_CLASSES)
    for k in range(2):
        np.testing.assert_array_equal(cached[:, k, 0, 0], np.stack([classes % 256, classes // 256,
                                                                    np.full_like(classes, k)], 1))
    assert (cached[:, :, 0, 1, 0] == MARKER).all()


def test_missing_data_is_one_line_exit_1(tmp_path):
    """No files, no cache and no tensorflow-datasets (blocked here, so that a machine with network does not
    start a 3.5 GB download): within seconds, one line naming the file and the folder, exit 1, no folder made."""
    script = ("import runpy, sys; sys.modules['tensorflow_datasets'] = None; "
              f"sys.argv = ['imagenet.py', '--data-dir', {str(tmp_path / 'd')!r}, '--tasks', '1']; "
              "runpy.run_path('imagenet.py', run_name='__main__')")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and time.time() - start < 60
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and data.IMAGENET32_ZIP in lines[0] and str(tmp_path / "d") in lines[0], proc.stderr
    assert "tensorflow-datasets" in lines[0]
    assert not (tmp_path / "d").exists()


def test_old_seed_batching_flag_names_its_replacement(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["imagenet.py", "--seed-batching", "map"])
    with pytest.raises(SystemExit, match=r"--seed-batching is now --member-batching \{auto,vmap,map\}") as e:
        runpy.run_path(str(ROOT / "imagenet.py"), run_name="__main__")
    assert len(str(e.value).splitlines()) == 1


def test_task_split_and_wrapping(data_dir):
    """Task t of a seed: classes order[2t] (label 0) and order[2t+1] (label 1) of the seed's class permutation
    (its key's stream 3), wrapping around; the first train_per_class images of each class train, the rest test."""
    args = imagenet.Args(data_dir=str(data_dir), **TINY)
    agent, _ = imagenet.resolve(args)
    task_data = imagenet.make_train(args, agent, imagenet.load_data(args))[1]
    orders = [np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(s), 3), NUM_CLASSES))
              for s in (0, 5)]
    assert sorted(orders[0]) == list(range(NUM_CLASSES)) and not np.array_equal(orders[0], orders[1])
    for task in (0, 1, 2):  # 4 classes: task 2 wraps around to the first pair
        x_train, x_test = task_data(np.array([0, 5, 0]), task)  # members: seed 0, seed 5, seed 0 again
        assert x_train.shape == (3, 12, 32, 32, 3) and x_test.shape == (3, 2, 32, 32, 3)
        np.testing.assert_array_equal(x_train[2], x_train[0])
        for s, order in enumerate(orders):
            first, second = order[(2 * task) % 4], order[(2 * task + 1) % 4]
            assert [x[1, 0, 0] for x in x_train[s]] == [image_code(first, k) for k in range(6)] + \
                [image_code(second, k) for k in range(6)]
            assert [x[1, 0, 0] for x in x_test[s]] == [image_code(first, 6), image_code(second, 6)]


def test_synthetic_images_have_the_cache_shape():
    images = data.synthetic_imagenet32(7)
    assert images.shape == (1000, 7, 32, 32, 3) and images.dtype == np.uint8
    pair = images[[3, 999]]
    assert pair.shape == (2, 7, 32, 32, 3) and pair.dtype == np.uint8
    np.testing.assert_array_equal(pair[0], images[3])  # a class is the same every time it is drawn
    assert not np.array_equal(pair[0], pair[1]) and abs(pair.mean() / 255 - 0.5) < 0.01


# ---------------------------------------------------------------------------------------------------------
# Network and CBP at the conv -> dense boundary
# ---------------------------------------------------------------------------------------------------------
forward = jax.jit(imagenet.forward, static_argnums=2)  # eager op-by-op dispatch is slow on CPU


def init_state_of_run(agent="bp", seed=0, **kw):
    """A member's state from the same initializer a one-member run of `agent` uses."""
    return initializer(agent, **kw)[1](seed)


FAN_IN = {"conv1": 5 * 5 * 3, "conv2": 3 * 3 * 32, "conv3": 3 * 3 * 64, "fc1": 512, "fc2": 128, "out": 128}


def test_init_is_lecun_normal():
    """Flax's default, as the authors' ConvNet used it: every layer truncated normal with variance 1 / fan_in
    (jax's truncated initializer rescales, so the variance is exactly that), biases 0."""
    pooled = []
    for seed in (0, 1):  # two members: 2 x 2,400 draws in conv1 at least
        params = init_state_of_run(seed=seed)["params"]
        assert set(params) == set(FAN_IN)
        for name, fan_in in FAN_IN.items():
            w = params[name]["w"]
            assert math.prod(w.shape[:-1]) == fan_in
            np.testing.assert_array_equal(params[name]["b"], 0.0)
            pooled.append(assert_truncated_normal(w, 1.0 / fan_in))
    assert_truncated_shape(np.concatenate(pooled))
    # The member's weights are jax.nn.initializers.lecun_normal() itself, not a look-alike.
    key = jax.random.key(3)
    np.testing.assert_array_equal(imagenet.KERNEL_INIT(key, (3, 3, 64, 128), jnp.float32),
                                  jax.nn.initializers.lecun_normal()(key, (3, 3, 64, 128), jnp.float32))


def test_cbp_reinit_draws_from_the_init_distribution():
    """Replacement rate 1 with every unit mature: every hidden unit of every layer is replaced in one step, so
    all incoming weights are fresh draws, which must have the init's distribution (variance 1 / fan_in)."""
    agent = initializer("cbp", replacement_rate=1.0, maturity_threshold=0)[0]
    assert agent["cbp_utility"] == "adaptable_contribution"
    assert tuple(common.cbp_max_replace(1.0, u) for u in imagenet.HIDDEN_UNITS) == imagenet.HIDDEN_UNITS
    opt = common.sgd(0.1, 0.0, 0.9)
    state = init_state_of_run("cbp", replacement_rate=1.0, maturity_threshold=0)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    _, acts = forward(state["params"], x, "xla")
    new = jax.jit(lambda m, a, k: imagenet.cbp_step(agent, opt, m, a, k))(state, acts, jax.random.key(2))
    pooled = []
    for name in imagenet.HIDDEN:
        w_old, w_new = np.asarray(state["params"][name]["w"]), np.asarray(new["params"][name]["w"])
        assert not np.any(w_new == w_old)  # every incoming weight redrawn
        pooled.append(assert_truncated_normal(w_new, 1.0 / FAN_IN[name]))
        assert np.all(np.asarray(new["cbp"][imagenet.HIDDEN.index(name)].age) == 0)
    assert_truncated_shape(np.concatenate(pooled))
    np.testing.assert_array_equal(new["params"]["out"]["w"], 0.0)  # fc2's units all replaced: outgoing 0


def test_network_shapes_and_im2col_equals_xla():
    params = init_state_of_run()["params"]
    assert params["fc1"]["w"].shape == (512, 128)  # VALID padding: 2 x 2 x 128 after the third pool
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    logits, acts = forward(params, x, "xla")
    assert logits.shape == (4, 2)
    assert [a.shape[1:] for a in acts] == [(14, 14, 32), (6, 6, 64), (2, 2, 128), (128,), (128,)]
    logits2, acts2 = forward(params, x, "im2col")
    np.testing.assert_allclose(logits2, logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(acts, acts2):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_cbp_paper_variant_units_and_reinit():
    """--cbp-variant paper (the authors' imagenet/cbp.py): units conv1, conv2 (channels), conv3's 512 flattened
    outputs, fc1, fc2 (imagenet.PAPER_UNITS); one step with pending just below 1 replaces each layer's highest
    0.01 |mean h| x mean|w_out| unit: incoming weights U(+-sqrt(6 / shape[0])) (conv1 sqrt(6 / 5), conv2
    sqrt(2): the kernel height) independent per tap, outgoing weights re-randomized with the consuming kernel's
    bound (conv: one value over the taps), bias 0; a conv3 output only changes its fc1 row (conv3's filters are
    never redrawn); momentum kept."""
    agent, init = initializer("cbp", replacement_rate=1e-4, maturity_threshold=0, cbp_variant="paper")
    state = init(0)
    assert [c.utility.shape[0] for c in state["cbp"]] == list(imagenet.PAPER_UNITS) == [32, 64, 512, 128, 128]
    state["cbp"] = [c._replace(pending=jnp.float32(0.9999)) for c in state["cbp"]]
    opt = common.sgd(0.1, 0.0, 0.9)
    state["opt"] = jax.tree.map(jnp.ones_like, state["opt"])  # momentum all ones
    _, acts = forward(state["params"], jax.random.normal(jax.random.key(1), (4, 32, 32, 3)), "xla")
    new = jax.jit(lambda m, a, k: imagenet.cbp_step(agent, opt, m, a, k))(state, acts, jax.random.key(2))
    old_p, new_p = jax.tree.map(np.asarray, state["params"]), jax.tree.map(np.asarray, new["params"])
    for layer, (name, nxt) in enumerate(zip(imagenet.HIDDEN, imagenet.NEXT)):
        h = np.asarray(acts[layer]).reshape(4, -1) if name == "conv3" else np.asarray(acts[layer])
        h = h.reshape(-1, h.shape[-1])
        axis = 2 if nxt.startswith("conv") else 0
        w_out = np.moveaxis(old_p[nxt]["w"], axis, 0)
        utility = 0.01 * np.abs(h.mean(0)) * np.abs(w_out.reshape(w_out.shape[0], -1)).mean(1)
        j = int(np.argmax(utility))
        assert np.flatnonzero(np.asarray(new["cbp"][layer].age) == 0).tolist() == [j], name
        out = np.moveaxis(new_p[nxt]["w"], axis, 0)[j]
        assert np.all(np.abs(out) <= math.sqrt(6 / new_p[nxt]["w"].shape[0])) and np.all(out != 0)
        if nxt.startswith("conv"):  # one draw per (in, out) pair over the taps, but in the column that conv2's
            # own replaced unit redrew (conv3's filters are never redrawn)
            redrawn = np.flatnonzero(np.asarray(new["cbp"][layer + 1].age) == 0) if nxt == "conv2" else []
            tied = np.delete(out, redrawn, -1)
            assert np.all(tied == tied[:1, :1])
        if name == "conv3":
            j2 = np.flatnonzero(np.asarray(new["cbp"][1].age) == 0)  # conv2's unit: its conv3 input re-randomized
            np.testing.assert_array_equal(np.delete(new_p["conv3"]["w"], j2, 2), np.delete(old_p["conv3"]["w"], j2, 2))
            np.testing.assert_array_equal(new_p["conv3"]["b"], old_p["conv3"]["b"])
            continue
        fresh = new_p[name]["w"][..., j]
        bound = math.sqrt(6 / new_p[name]["w"].shape[0])
        assert np.all(np.abs(fresh) <= bound) and np.all(fresh != old_p[name]["w"][..., j])
        assert new_p[name]["b"][j] == 0.0
        if fresh.ndim == 3:  # independent per tap
            assert not np.all(fresh == fresh[:1, :1])
    assert math.isclose(math.sqrt(6 / new_p["conv1"]["w"].shape[0]), math.sqrt(6 / 5))
    for leaf in jax.tree.leaves(new["opt"]):
        np.testing.assert_array_equal(leaf, 1.0)


def test_cbp_conv_to_dense_boundary_replaces_the_right_rows():
    j = 37  # conv3 channel made the least useful
    agent = initializer("cbp", replacement_rate=1e-3, maturity_threshold=10)[0]
    assert agent["cbp_utility"] == "adaptable_contribution"  # Dohare et al.'s Continual ImageNet config
    opt = common.sgd(0.1, 0.0, 0.9)
    state = init_state_of_run("cbp", replacement_rate=1e-3, maturity_threshold=10)
    state["opt"] = jax.tree.map(jnp.ones_like, state["opt"])  # momentum all ones
    states = list(state["cbp"])
    # conv3: every unit mature, the accumulated count about to reach 1; other layers too young to replace.
    # A running mean of 0 and an activation of 0 keep channel j's (adaptable) utility at 0.
    states[2] = common.CBPState(jnp.ones(128).at[j].set(0.0), jnp.zeros(128), jnp.full(128, 50, jnp.int32),
                                jnp.float32(0.99))
    state["cbp"] = states
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    _, acts = forward(state["params"], x, "xla")
    acts[2] = acts[2].at[..., j].set(0.0)
    new = jax.jit(lambda m, a, k: imagenet.cbp_step(agent, opt, m, a, k))(state, acts, jax.random.key(2))
    old_p, new_p = state["params"], new["params"]

    rows = np.array([h * 256 + w * 128 + j for h in range(2) for w in range(2)])  # flatten order (h, w, c)
    others = np.setdiff1d(np.arange(512), rows)
    np.testing.assert_array_equal(new_p["fc1"]["w"][rows], 0.0)
    np.testing.assert_array_equal(new_p["fc1"]["w"][others], old_p["fc1"]["w"][others])
    assert not np.allclose(new_p["conv3"]["w"][..., j], old_p["conv3"]["w"][..., j])
    bound = 2 * math.sqrt(1 / (3 * 3 * 64) / truncated_normal_moments()[0])  # LeCun-normal's truncation point
    assert np.abs(new_p["conv3"]["w"][..., j]).max() <= bound * (1 + 1e-6)
    keep = np.arange(128) != j
    np.testing.assert_array_equal(new_p["conv3"]["w"][..., keep], old_p["conv3"]["w"][..., keep])
    assert new_p["conv3"]["b"][j] == 0.0
    for name in ("conv1", "conv2", "fc2", "out"):
        jax.tree.map(np.testing.assert_array_equal, new_p[name], old_p[name])
    # The replaced unit's age and utility restart; momentum of exactly the touched weights is zeroed.
    assert new["cbp"][2].age[j] == 0 and new["cbp"][2].utility[j] == 0.0
    assert all(int(new["cbp"][layer].age.min()) == 1 for layer in (0, 1, 3, 4))
    momentum = new["opt"][1][0].trace
    assert float(jnp.sum(momentum["fc1"]["w"] == 0)) == 4 * 128
    np.testing.assert_array_equal(momentum["fc1"]["w"][rows], 0.0)
    np.testing.assert_array_equal(momentum["conv3"]["w"][..., j], 0.0)
    assert float(jnp.sum(momentum["conv3"]["w"] == 0)) == 3 * 3 * 64 and momentum["conv3"]["b"][j] == 0.0
    assert float(jnp.sum(momentum["conv2"]["w"] == 0)) == 0
    # Zero outgoing weights: the new unit does not change the output; the old unit's contribution is gone.
    without_j = {**old_p, "fc1": {"w": old_p["fc1"]["w"].at[rows].set(0.0), "b": old_p["fc1"]["b"]}}
    np.testing.assert_allclose(forward(new_p, x, "xla")[0], forward(without_j, x, "xla")[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# LayerNorm, the spectral penalty and ReDo
# ---------------------------------------------------------------------------------------------------------
ONE_STEP = dict(train_per_class=2, test_per_class=1, batch_size=4, epochs=1)  # a task is one minibatch step


@functools.cache
def one_step(agent, **kw):
    """(initial state, jitted step(state, hp) -> state after one SGD step of task 0) of a one-member `agent`
    run on --synthetic-data (the run's own init and train, one epoch of one minibatch)."""
    args = imagenet.Args(agent=agent, synthetic_data=True, **{**TINY, **ONE_STEP, **kw})
    resolved, _ = imagenet.resolve(args)
    init, task_data, train, *_ = imagenet.make_train(args, resolved, imagenet.load_data(args))
    x_train = task_data(np.array([0]), 0)[0][0]
    return jax.jit(init)(0), jax.jit(lambda state, hp: train(state, hp, 0, 0, x_train, 0, 1)[0])


@pytest.mark.parametrize("feature_images", ["test", "all"])
def test_metrics_on_the_tasks_held_out_images(feature_images):
    """Dead units and effective rank of fc1 and fc2 equal a by-hand count and SVD on exactly the task's held-out
    images (test: the authors' sample) or on all its images (all), and the two samples give different ranks."""
    args = imagenet.Args(agent="bp", synthetic_data=True, **{**TINY, "test_per_class": 5},
                         feature_images=feature_images)
    agent, _ = imagenet.resolve(args)
    ds = imagenet.load_data(args)
    init, task_data, _, evaluate, *_ = imagenet.make_train(args, agent, ds)
    params = init(0)["params"]
    params = {**params, "fc2": {**params["fc2"], "b": params["fc2"]["b"].at[:3].set(-1e3)}}  # 3 dead units
    x_train, x_test = (x[0] for x in task_data(np.array([0]), 1))
    assert x_train.shape[0] == 12 and x_test.shape[0] == 10
    got = jax.device_get(jax.jit(evaluate)(params, x_train, x_test))
    ranks = {}
    for sample, images in (("test", x_test), ("all", np.concatenate([x_train, x_test]))):
        feats = forward(params, imagenet.preprocess(images, "center", ds["pixel_mean"]), "xla")[1][3:]
        ranks[sample] = [numpy_effective_rank(f) for f in feats]
        if sample == feature_images:
            assert_metrics_of(got, feats)
    assert got["dead_units"][1] >= 3
    assert np.all(np.abs(np.array(ranks["test"]) - ranks["all"]) > 0.5)  # the samples differ: the check has teeth


def test_er_step_comes_before_the_groups_sgd_steps():
    """er (once per epoch; here an epoch is one minibatch of 4 images): the ER ascent on the epoch's images,
    then the SGD step from the ascended parameters, as the authors' train_imagenet.py. A by-hand sequence
    equals the run's, and the other order differs."""
    lr, er_lr = 0.1, 0.1
    state, step = one_step("er")
    args = imagenet.Args(agent="er", synthetic_data=True, **{**TINY, **ONE_STEP})  # one_step's run
    x_train = imagenet.make_train(args, imagenet.resolve(args)[0], imagenet.load_data(args))[1](np.array([0]), 0)[0][0]
    x = imagenet.preprocess(x_train, "center", (0.5, 0.5, 0.5))
    y = jnp.array([0, 0, 1, 1])
    dense = lambda p, x: imagenet.forward(p, x, "xla")[1][3:]  # noqa: E731
    loss = lambda p: imagenet.cross_entropy(imagenet.forward(p, x, "xla")[0], y)  # noqa: E731

    def ascend(p):
        return common.er_ascent(p, dense, x, er_lr)[0]

    def sgd(p):  # the first step: momentum's trace is the gradient itself
        return jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss)(p))

    got = step(state, {"lr": jnp.float32(lr), "er_lr": jnp.float32(er_lr)})["params"]
    before, after = jax.jit(lambda p: sgd(ascend(p)))(state["params"]), jax.jit(lambda p: ascend(sgd(p)))(state["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, before)
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert gap > 1e-3  # the order matters at these step sizes: the check has teeth


def test_layer_norm_only_in_layernorm_l2_and_its_scales_decay():
    """layernorm-l2: a LayerNorm (scale 1, shift 0) in each hidden layer, none on the output layer nor in any
    other agent; conv layers normalize each pixel over its channels, before the ReLU (and the pool). The
    coupled L2 acts on every parameter: on the first step (momentum still 0) a weight decay wd moves every
    leaf, LayerNorm scales included, by exactly -lr x wd x its value more than wd 0 does."""
    params = init_state_of_run("layernorm-l2")["params"]
    for name, units in zip(imagenet.HIDDEN, imagenet.HIDDEN_UNITS):
        assert set(params[name]) == {"w", "b", "scale", "shift"}
        np.testing.assert_array_equal(params[name]["scale"], np.ones(units))
        np.testing.assert_array_equal(params[name]["shift"], np.zeros(units))
    assert set(params["out"]) == {"w", "b"}
    for agent in imagenet.AGENTS:
        if agent != "layernorm-l2":
            assert all(set(layer) == {"w", "b"} for layer in init_state_of_run(agent)["params"].values()), agent
    assert len(common.spectral_starts(params)) == 6  # the LayerNorm scales are not kernels
    # The forward pass against numpy, with a scale and shift that are not the identity.
    normed = {**params, "conv2": {**params["conv2"], "scale": jnp.linspace(0.5, 2.0, 64), "shift": jnp.full(64, 0.3)},
              "fc2": {**params["fc2"], "scale": jnp.full(128, 2.0), "shift": jnp.full(128, -0.1)}}
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    _, acts = forward(normed, x, "xla")
    z = np.asarray(imagenet.conv(acts[0], normed["conv2"], "xla"), np.float64)  # [3, 12, 12, 64]
    z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-6)
    z = np.maximum(z * np.linspace(0.5, 2.0, 64) + 0.3, 0)
    np.testing.assert_allclose(acts[1], z.reshape(3, 6, 2, 6, 2, 64).max(axis=(2, 4)), rtol=1e-4, atol=1e-4)
    d = np.asarray(acts[3] @ normed["fc2"]["w"] + normed["fc2"]["b"], np.float64)
    d = np.maximum(2 * (d - d.mean(-1, keepdims=True)) / np.sqrt(d.var(-1, keepdims=True) + 1e-6) - 0.1, 0)
    np.testing.assert_allclose(acts[4], d, rtol=1e-4, atol=1e-4)
    # Weight decay on all parameters.
    state, step = one_step("layernorm-l2")
    lr, wd = 0.1, 0.5
    decayed, plain = (step(state, {"lr": jnp.float32(lr), "weight_decay": jnp.float32(w)}) for w in (wd, 0.0))
    for (path, a), b, p in zip(jax.tree_util.tree_flatten_with_path(decayed["params"])[0],
                               jax.tree.leaves(plain["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(a - b, -lr * wd * np.asarray(p), rtol=1e-3, atol=1e-6, err_msg=str(path))
    for name in imagenet.HIDDEN:  # the scales shrank towards 0 by lr x wd (their gradient moves both alike)
        np.testing.assert_allclose(decayed["params"][name]["scale"] - plain["params"][name]["scale"], -lr * wd,
                                   rtol=1e-4)


def test_spectral_start_vectors_are_the_authors():
    """The penalty's start vectors come from PRNGKey(i), i the authors' counter over kernels (their layer_0 ..
    layer_5): our leaf order lists the kernels in their order, so the default keys are theirs, and the penalty
    equals their power iteration by hand."""
    from authors_spectral import authors_penalty, kernel_paths
    params = imagenet.init_params(jax.random.key(0))
    table = {"['conv1']['w']": 0, "['conv2']['w']": 1, "['conv3']['w']": 2, "['fc1']['w']": 3, "['fc2']['w']": 4,
             "['out']['w']": 5}  # the authors' layer_0 .. layer_5
    assert kernel_paths(params) == list(table)
    for iters in (1, 10):
        np.testing.assert_allclose(float(common.spectral_penalty(params, 2.0, 2.0, iters)[0]),
                                   authors_penalty(params, table, iters=iters), rtol=1e-5)


def test_spectral_reg_adds_the_penalty_to_the_loss():
    """The kernels are exactly the six "w" leaves (conv HWIO as (kh*kw*in, out)), the biases the "b" leaves.
    First step (momentum 0) at lr 1: spectral-reg's parameters minus bp's are -lambda x the gradient of
    common.spectral_penalty(params, k=2, target=2, iters=10); --spectral-persistent True starts from the same
    fixed vectors and carries the penalty's last right vectors in the state."""
    params = init_state_of_run("spectral-reg")["params"]
    starts = common.spectral_starts(params)
    assert [s.shape for s in starts] == [(32,), (64,), (128,), (128,), (128,), (2,)]  # conv1..3, fc1, fc2, out
    lam = 0.5
    state, step = one_step("spectral-reg", spectral_lambda=lam, spectral_persistent=True)
    jax.tree.map(np.testing.assert_array_equal, state["spectral_v"], starts)
    bp_state, bp_step = one_step("bp")
    jax.tree.map(np.testing.assert_array_equal, state["params"], bp_state["params"])  # same init
    hp = {"lr": jnp.float32(1.0)}
    reg, plain = step(state, hp), bp_step(bp_state, hp)
    (penalty, vectors), grad = jax.jit(jax.value_and_grad(lambda p: common.spectral_penalty(p, 2.0, 2.0, 10),
                                                          has_aux=True))(state["params"])
    assert float(penalty) > 0.1  # sigma_max^2 of the init's kernels is not 2
    for (path, a), b, g in zip(jax.tree_util.tree_flatten_with_path(reg["params"])[0],
                               jax.tree.leaves(plain["params"]), jax.tree.leaves(grad)):
        np.testing.assert_allclose(a - b, -lam * np.asarray(g), rtol=1e-3, atol=2e-6, err_msg=str(path))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) > 1e-2  # the comparison has teeth
    for carried, v in zip(reg["spectral_v"], vectors):
        np.testing.assert_allclose(carried, v, rtol=1e-5, atol=1e-6)


def dead_channels(params, units):
    """`params` with the given {layer: [units]} made dead on every input (bias -1e3, before the ReLU)."""
    return {**params, **{name: {**params[name], "b": params[name]["b"].at[np.array(idx)].set(-1e3)}
                         for name, idx in units.items()}}


def redo(state, x, tau=0.0):
    opt = common.sgd(0.1, 0.0, 0.9)
    return jax.jit(lambda s, x: imagenet.redo_step({"redo_tau": tau}, opt, s, x, jax.random.key(2), "xla"))(state, x)


def fc1_rows(channels):
    """fc1's rows fed by conv3's channels [128] (bool): the flatten is (h, w, c), so row p * 128 + c for each of
    the 4 spatial positions p."""
    return np.tile(channels, 4)


def test_redo_recycles_only_dormant_units_and_keeps_the_function():
    """ReDo with tau 0 (dormant = mean|h| = 0 on the batch): dead channels/units in every hidden layer get fresh
    incoming weights and bias 0; their outgoing weights (conv3: fc1's rows of every spatial position) and the
    momentum of exactly those weights become 0; nothing else changes, and the outputs stay the same. Besides
    the units killed here, the init (zero biases) already has units that are 0 on every image from conv3 on
    (measured: 25 of conv3's channels, 51 and 45 units of fc1 and fc2 on these 16 images)."""
    params = dead_channels(init_state_of_run("redo")["params"],
                           {"conv1": [0, 5], "conv2": [3], "conv3": [7, 100], "fc1": [0, 1, 2], "fc2": [64]})
    opt = common.sgd(0.1, 0.0, 0.9)
    state = {"params": params, "opt": jax.tree.map(jnp.ones_like, opt.init(params))}  # momentum 1 everywhere
    x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    new = redo(state, x)
    old_p, new_p = params, new["params"]
    _, acts = forward(params, x, "xla")
    dormant = [np.asarray(jnp.all(a.reshape(-1, a.shape[-1]) == 0, axis=0)) for a in acts]
    for d, killed in zip(dormant, ([0, 5], [3], [7, 100], [0, 1, 2], [64])):
        assert d[killed].all() and d.sum() < 0.6 * d.size
    # The same outputs on the scored images (the init's all-zero units may fire on other images).
    np.testing.assert_allclose(forward(new_p, x, "xla")[0], forward(params, x, "xla")[0], atol=1e-4)
    momentum = new["opt"][1][0].trace
    inputs = np.ones(3, bool)  # conv1's input channels
    for layer, name in enumerate(imagenet.HIDDEN + ("out",)):
        w_old, w_new, trace = (np.asarray(p[name]["w"]) for p in (old_p, new_p, momentum))
        unit = dormant[layer] if layer < 5 else np.zeros(2, bool)  # the output layer is never recycled
        rows = fc1_rows(inputs) if name == "fc1" else inputs
        keep = rows.reshape((1,) * (w_old.ndim - 2) + (-1, 1)) & ~unit  # untouched weights
        np.testing.assert_array_equal(trace, keep.astype(np.float32) * np.ones_like(w_old), err_msg=name)
        np.testing.assert_array_equal(w_new[np.broadcast_to(keep, w_old.shape)],
                                      w_old[np.broadcast_to(keep, w_old.shape)], err_msg=name)
        zeroed = np.broadcast_to(~rows.reshape((1,) * (w_old.ndim - 2) + (-1, 1)) & ~unit, w_old.shape)
        assert (w_new[zeroed] == 0).all() and (w_old[zeroed] != 0).all(), name  # outgoing of recycled units
        fresh = w_new[..., unit]
        assert (fresh[..., rows, :] != w_old[..., unit][..., rows, :]).all(), name  # redrawn incoming weights
        np.testing.assert_array_equal(new_p[name]["b"], np.where(unit, 0.0, old_p[name]["b"]))
        np.testing.assert_array_equal(momentum[name]["b"], (~unit).astype(np.float32))
        inputs = ~unit
    # The fresh incoming weights come from the init (LeCun-normal, truncated at 2 std).
    bound = 2 * math.sqrt(1 / FAN_IN["conv3"] / truncated_normal_moments()[0])
    assert np.abs(new_p["conv3"]["w"][..., [7, 100]]).max() <= bound * (1 + 1e-6)


def test_redo_conv_to_dense_boundary_keeps_the_outputs():
    """A dead conv3 channel, recycled: its fresh weights make it fire again, and only zeroing its fc1 rows in the
    (h, w, c) flatten order (every spatial position's row) keeps the outputs unchanged; a channel-major layout
    (rows 4c .. 4c + 3) would leave its old rows feeding the revived channel and the outputs would move. (The
    init's own all-zero units, conv3's and fc1's, are recycled too; fc1's get fresh columns.)"""
    j = 37
    params = dead_channels(init_state_of_run("redo")["params"], {"conv3": [j]})
    state = {"params": params, "opt": common.sgd(0.1, 0.0, 0.9).init(params)}
    x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    new_p = redo(state, x)["params"]
    acts = forward(params, x, "xla")[1]
    conv3, fc1 = (np.asarray(jnp.all(a.reshape(-1, a.shape[-1]) == 0, axis=0)) for a in acts[2:4])
    assert conv3[j] and conv3.sum() < 64 and fc1.sum() < 96
    assert np.flatnonzero(fc1_rows(np.arange(128) == j)).tolist() == [j, 128 + j, 256 + j, 384 + j]
    w_old, w_new = (np.asarray(p["fc1"]["w"])[:, ~fc1] for p in (params, new_p))  # fc1's kept units
    np.testing.assert_array_equal(w_new[fc1_rows(conv3)], 0.0)
    np.testing.assert_array_equal(w_new[~fc1_rows(conv3)], w_old[~fc1_rows(conv3)])
    revived = forward(new_p, x, "xla")[1][2]
    assert float(jnp.abs(revived[..., j]).mean()) > 0.05  # the recycled channel is alive now
    np.testing.assert_allclose(forward(new_p, x, "xla")[0], forward(params, x, "xla")[0], atol=1e-4)
    # Channel j's old fc1 rows left in place (what a wrong layout does) move the outputs: the check has teeth.
    rows = fc1_rows(np.arange(128) == j)
    wrong = {**new_p, "fc1": {**new_p["fc1"], "w": new_p["fc1"]["w"].at[rows].set(params["fc1"]["w"][rows])}}
    assert np.abs(forward(wrong, x, "xla")[0] - forward(params, x, "xla")[0]).max() > 1e-3


def test_redo_acts_every_redo_every_steps(run):
    """The default period (1000 steps) never comes in a 6-step task: exactly bp (same lr 1e-4); every 3 steps
    with tau 0.5 it recycles and the run differs."""
    bp = run(agent="bp")[0]
    never = run(agent="redo")[0]
    for key in METRICS:
        np.testing.assert_array_equal(never[key], bp[key], err_msg=key)
    acting = run(agent="redo", **REDO_TINY)[0]
    assert not np.allclose(acting["param_norm"], bp["param_norm"])


# ---------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agent", imagenet.AGENTS)
def test_every_agent_runs(agent, run):
    extra = {"cbp": CBP_TINY, "redo": REDO_TINY}.get(agent, {})
    if agent == "snp-l2":  # also the random images of --synthetic-data (1000 classes, drawn on demand)
        extra = dict(synthetic_data=True)
    m, run_dir = run(agent=agent, **extra)
    assert set(m) == set(METRICS) | {"diverged"}
    for key in ("test_acc", "train_acc", "param_norm"):
        assert m[key].shape == (1, 1, 2) and np.isfinite(m[key]).all()
    assert ((m["test_acc"] >= 0) & (m["test_acc"] <= 1)).all()
    assert m["dead_units"].shape == m["effective_rank"].shape == (1, 1, 2, 2)
    assert ((m["dead_units"] >= 0) & (m["dead_units"] <= 128)).all()
    assert ((m["effective_rank"] > 1) & (m["effective_rank"] <= 128)).all()
    assert m["diverged"].shape == (1, 1) and not m["diverged"].any()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["agent"] == agent and config["configs"] == [
        {k: v for k, v in imagenet.AGENTS[agent].items() if k in imagenet.SWEPT}]
    if agent == "cbp":  # some units were replaced: their ages restarted below the 12 steps trained
        ages = [np.asarray(s.age) for s in checkpoint(run_dir)["state"]["cbp"]]
        assert min(a.min() for a in ages) < 12


def test_regularizers_act(run):
    """Same seed, lr and data; bp and snp are test_every_agent_runs' runs."""
    bp = run(agent="bp")[0]["param_norm"][0, 0]
    assert (run(agent="l2", weight_decay=(1.0,))[0]["param_norm"][0, 0] < bp).all()  # weight decay shrinks
    snp = run(agent="snp")[0]["param_norm"][0, 0]
    assert not np.array_equal(snp, bp) and np.allclose(snp, bp, rtol=1e-2)  # small noise
    no_er = run(agent="l2-er", er_lr=(0.0,))[0]
    l2 = run(agent="l2", lr=(1e-3,))[0]  # l2-er's lr and weight decay
    for key in METRICS:
        np.testing.assert_array_equal(no_er[key], l2[key], err_msg=key)  # ER step of size 0 is a no-op
    with_er = run(agent="l2-er", er_lr=(0.01,))[0]
    assert with_er["effective_rank"].mean() > l2["effective_rank"].mean() + 0.1  # ER raises the rank


def test_learns_separable_classes(tmp_path):
    """Classes that differ in mean brightness under pixel noise: 12 SGD steps per task must do better than
    chance (0.5) on average over 12 tasks (the head is kept, so later tasks must undo earlier mappings). With
    the default centred, unscaled input and LeCun-normal init, seeds 2024, 2025 and 7 gave train accuracy
    0.82-0.90 and test accuracy 0.83-0.88 here. Also the XLA convolutions (CPU runs default to im2col)."""
    rng = np.random.default_rng(0)
    level = rng.permutation(6)[:, None, None, None, None] * 25 + 60
    images = np.clip(level + rng.normal(0, 30, (6, 7, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.save(data.imagenet32_cache(tmp_path, 7), images)
    run_dir = imagenet.main(imagenet.Args(**{**TINY, "tasks": 12, "epochs": 4}, agent="bp", lr=(0.01,), conv_impl="xla",
                                          data_dir=str(tmp_path), out_dir=str(tmp_path / "run")))
    m = np.load(run_dir / "metrics.npz")
    # 144 final-epoch training predictions: chance gives 0.5 +- 0.04.
    assert m["train_acc"].mean() > 0.65 and m["test_acc"].mean() > 0.65, dict(m)


def test_seeds_and_configs_together_equal_alone(run):
    # l2-er: per-member lr, weight decay and ER step size, per-member shuffles, one program per member.
    together = run(agent="l2-er", weight_decay=(1e-3, 1e-1), seed=0, seeds=2)[0]
    alone = run(agent="l2-er", weight_decay=(1e-1,), seed=1)[0]
    for key in METRICS:
        assert together[key].shape[:3] == (2, 2, 2)
        np.testing.assert_allclose(together[key][1, 1], alone[key][0, 0], rtol=1e-5, atol=1e-5, err_msg=key)
    # Configs are kept apart, and so are seeds.
    assert not np.allclose(together["param_norm"][0, 1], together["param_norm"][1, 1])
    assert not np.allclose(together["param_norm"][1, 0], together["param_norm"][1, 1])


def test_vmap_over_members_equals_alone(run):
    """The batched program (--member-batching vmap, the default on accelerators): member seed 2024 of a
    2-seed vmap run against test_every_agent_runs' 1-member bp run. Batched and single kernels round
    differently."""
    batched = run(agent="bp", seed=2023, seeds=2, member_batching="vmap")[0]
    alone = run(agent="bp")[0]
    for key in METRICS:
        np.testing.assert_allclose(batched[key][0, 1], alone[key][0, 0], rtol=1e-4, atol=1e-4, err_msg=key)


def test_interrupt_mid_task_then_resume_equals_uninterrupted(run, data_dir, tmp_path, monkeypatch, capsys):
    """With one epoch per call a task is 2 calls: a 1-task run stops after the first call of task 0, resumes
    mid-task, then resumes again with --tasks 2: metrics, spectra and the final state equal an uninterrupted
    2-task run's with one call per task, exactly (splitting a task into calls changes nothing).
    CBP, so its utilities and ages cross the call boundaries; spectra, so task 0's init spectrum, measured
    before the stop, survives it."""
    settings = dict(agent="cbp", hessian_every=1, lanczos_iters=4, **CBP_TINY)
    whole, whole_dir = run(**settings)
    monkeypatch.setattr(imagenet, "CALL_STEPS", 3)  # 3 minibatches = one epoch per call
    args = imagenet.Args(**{**TINY, **settings, "tasks": 1}, data_dir=str(data_dir), out_dir=str(tmp_path))
    monkeypatch.setattr(imagenet.runner, "StopRequests", lambda: StopAfter(1))
    with pytest.raises(SystemExit) as e:
        imagenet.main(args)
    assert e.value.code == 130
    out = capsys.readouterr().out
    assert "interrupted after task 1/1 (epoch 1 of 2); resume with: python imagenet.py --agent cbp --tasks 1" in out
    assert "--replacement-rate 0.1 --maturity-threshold 1" in out and f"--resume --out-dir {tmp_path}" in out
    assert not (tmp_path / "metrics.npz").exists()  # no task finished
    monkeypatch.setattr(imagenet.runner, "StopRequests", lambda: StopAfter(10**9))
    imagenet.main(replace(args, resume=True))
    with np.load(tmp_path / "metrics.npz") as f:
        assert f["test_acc"].shape == (1, 1, 1)
    imagenet.main(replace(args, resume=True, tasks=2))
    for name in ("metrics.npz", "hessian.npz"):
        a, b = np.load(whole_dir / name), np.load(tmp_path / name)
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(b[k], a[k], err_msg=f"{name}:{k}")
    h = np.load(tmp_path / "hessian.npz")
    assert h["tasks"].tolist() == [0, 1]
    for phase in ("init", "end"):
        assert h[f"{phase}_nodes"].shape == h[f"{phase}_weights"].shape == (1, 1, 2, 1, 4)
        np.testing.assert_allclose(h[f"{phase}_weights"].sum(-1), 1.0, atol=1e-5)
    # Task 1's init spectrum is measured at task 0's final parameters, on task 1's data.
    assert not np.allclose(h["init_nodes"][0, 0, 1], h["end_nodes"][0, 0, 0])
    jax.tree.map(np.testing.assert_array_equal, checkpoint(tmp_path)["state"], checkpoint(whole_dir)["state"])
    with pytest.raises(SystemExit, match="different settings.*lr"):
        imagenet.main(replace(args, resume=True, lr=(0.5,), tasks=3))


@pytest.mark.parametrize("bad, message", [
    (dict(agent="bp", er_lr=(1e-3,)), "--er-lr does not apply to agent bp"),
    (dict(agent="l2", decay_rate=0.5), "--decay-rate does not apply to agent l2 .only cbp"),
    (dict(agent="cbp", er_every=1), "--er-every does not apply"),
    (dict(batch_size=5), "must divide the 12 training images"),
    (dict(batch_size=13), "must divide the 12 training images"),
    (dict(agent="er", er_every=2), "must divide the 3 minibatches"),
    (dict(tasks=0), "must be >= 1"),
    (dict(agent="cbp", cbp_utility="utility"), "--cbp-utility must be one of contribution, adaptable_contribution"),
    (dict(agent="cbp", cbp_variant="paper", cbp_utility="contribution"),
     "--cbp-utility does not apply to --cbp-variant paper"),
    (dict(agent="cbp", decay_rate=1.0), "--decay-rate in"),
    (dict(agent="bp", redo_tau=0.1), "--redo-tau does not apply to agent bp .only redo"),
    (dict(agent="l2", layer_norm=True), "--layer-norm does not apply to agent l2 .only layernorm-l2"),
    (dict(agent="l2-er", spectral_lambda=1e-3), "--spectral-lambda does not apply"),
    (dict(agent="redo", redo_every=0), "--redo-every must be >= 1"),
    (dict(agent="spectral-reg", power_iters=0), "--power-iters and --redo-every must be >= 1"),
])
def test_bad_flags_fail_cleanly(bad, message):
    with pytest.raises(SystemExit, match=message):
        imagenet.resolve(imagenet.Args(**{**TINY, **bad}))
