"""Tests of pmnist.py: tiny networks on a small synthetic dataset (injected through `main(args, dataset)`),
plus the real MNIST files when ../shared/data/mnist exists. Runs share compilations: every run below with
the same agent family, width, steps and member count reuses one compiled task function."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stop_after import StopAfter
import data as datasets
import pmnist

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
METRICS = ("online_acc", "online_loss", "test_acc", "dead_units", "effective_rank", "param_norm")
# 250 steps = 2 chunks of 100 plus a tail of 50, so the partial-chunk path runs in every test.
TINY = pmnist.Args(agent="bp", tasks=2, steps_per_task=250, width=16, eval_size=100, seed=5)

SYNTHETIC_SCRIPT = """
import numpy as np
def synthetic():
    # MNIST-like sparse images: ten random prototypes with 15% of the pixels on; each sample keeps 80% of
    # its class's prototype pixels and lights 3% random pixels.
    rng = np.random.default_rng(0)
    prototypes = (rng.random((10, 784)) < 0.15) * 255
    y = rng.integers(0, 10, 800)
    x = np.where(rng.random((800, 784)) < 0.8, prototypes[y], 0)
    x = np.where(rng.random((800, 784)) < 0.03, rng.integers(0, 256, (800, 784)), x).astype(np.uint8)
    return dict(train_x=x[:600], train_y=y[:600], test_x=x[600:], test_y=y[600:])
"""
exec(SYNTHETIC_SCRIPT)  # defines synthetic(); the sharding subprocess runs the same source


@pytest.fixture(scope="module")
def data():
    return synthetic()  # noqa: F821 (defined by exec above)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """run(**overrides) -> metrics dict of a TINY run (cached per overrides)."""
    cache = {}

    def go(**overrides):
        key = tuple(sorted((k, str(v)) for k, v in overrides.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("run")
            run_dir = pmnist.main(replace(TINY, out_dir=str(out), **overrides), data)
            with np.load(run_dir / "metrics.npz") as f:
                cache[key] = {k: f[k] for k in f.files}
        return cache[key]

    return go


def assert_same(a, b, atol=0.0):
    for k in METRICS:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol, err_msg=k)


@pytest.mark.parametrize("agent", pmnist.AGENTS)
def test_every_agent_runs(run, agent):
    overrides = {"cbp": {"replacement_rate": 0.01, "maturity_threshold": 20},
                 "redo": {"redo_every": 100, "redo_tau": 0.5}}.get(agent, {})  # so that both act in 250 steps
    m = run(agent=agent, **overrides)
    assert m["online_acc"].shape == (1, 1, 2) and m["test_acc"].shape == (1, 1, 2)
    assert m["dead_units"].shape == (1, 1, 2, 3) and m["effective_rank"].shape == (1, 1, 2, 3)
    assert m["diverged"].shape == (1, 1) and not m["diverged"].any()
    for k in METRICS:
        assert np.isfinite(m[k]).all(), k
    assert ((0 <= m["online_acc"]) & (m["online_acc"] <= 1)).all()
    assert ((0 <= m["dead_units"]) & (m["dead_units"] <= 16)).all()
    assert ((1 <= m["effective_rank"]) & (m["effective_rank"] <= 16)).all()
    assert m["online_acc"][..., 1].mean() > 0.5, m["online_acc"]  # learnable data (chance 0.1)
    if agent != "bp":  # every intervention changes the trajectory
        assert not np.array_equal(m["param_norm"], run(agent="bp")["param_norm"])


def test_agents_do_what_they_say(run):
    bp = run(agent="bp")
    # Weight decay shrinks the weights: with wd 0.1, lr 0.01, 250 steps shrink by (1 - 1e-3)^250 ~ 0.78.
    assert (run(agent="l2", weight_decay=(0.1,))["param_norm"] < 0.9 * bp["param_norm"]).all()
    # ER with step size 0 is exactly plain SGD: the chunked scan and ER step leave SGD untouched ...
    assert_same(run(agent="er", er_lr=(0.0,)), bp)
    # ... and with SGD frozen (lr 1e-9) the ER steps alone raise every layer's effective rank
    # (measured: 12.6/10.9/8.6 -> 13.5/12.6/11.1 at task 0).
    frozen = run(agent="bp", lr=(1e-9,))["effective_rank"]
    assert (run(agent="er", lr=(1e-9,), er_lr=(0.01,))["effective_rank"] > frozen + 0.5).all()


def test_cbp_paper_variant(run, data):
    """--cbp-variant paper runs, differs from the default, and one step of pmnist.cbp_step replaces each hidden
    layer's highest 0.01 |mean h| x mean|w_out| unit with incoming weights in U(+-sqrt(6 / fan_in)) and a
    re-randomized outgoing row (not 0) in U(+-sqrt(6 / width)), the output layer's included."""
    settings = dict(agent="cbp", replacement_rate=0.01, maturity_threshold=20)
    paper = run(cbp_variant="paper", **settings)
    # (no learning check: at this rate, 1 in 100 mature units per step, replacing the most useful ones scrambles
    # a width-16 net: online accuracy 0.22 then 0.14)
    assert np.isfinite(paper["online_acc"]).all() and not paper["diverged"].any()
    assert not np.array_equal(paper["param_norm"], run(**settings)["param_norm"])
    agent = {**pmnist.AGENTS["cbp"], "replacement_rate": 1e-4, "maturity_threshold": 0, "cbp_variant": "paper"}
    params = pmnist.init_params(jax.random.key(0), 784, 16)
    x = jnp.asarray(data["train_x"][:1], jnp.float32) / 255.0
    features = pmnist.hidden_features(params, x)
    state = {"params": params, "opt": (), "cbp": [pmnist.common.cbp_init(16)._replace(pending=jnp.array(0.9999))
                                                  for _ in range(3)]}
    opt = pmnist.common.sgd(0.01)
    new = pmnist.cbp_step(agent, opt, {**state, "opt": opt.init(params)}, features, jax.random.key(1))
    for layer in range(3):
        w_out = np.asarray(params[layer + 1]["w"])
        utility = 0.01 * np.abs(np.asarray(features[layer]).mean(0)) * np.abs(w_out).mean(1)
        j = int(np.argmax(utility))
        assert np.flatnonzero(np.asarray(new["cbp"][layer].age) == 0).tolist() == [j]
        w_in = np.asarray(new["params"][layer]["w"])
        assert np.all(np.abs(w_in[:, j]) <= np.sqrt(6 / (784 if layer == 0 else 16)))
        assert np.all(w_in[:, j] != np.asarray(params[layer]["w"])[:, j]) and new["params"][layer]["b"][j] == 0
        row = np.asarray(new["params"][layer + 1]["w"])[j]
        assert np.all(np.abs(row) <= np.sqrt(6 / 16)) and np.all(row != 0)
    with pytest.raises(SystemExit, match="--cbp-utility does not apply to --cbp-variant paper"):
        pmnist.main(replace(TINY, agent="cbp", cbp_variant="paper", cbp_utility="contribution"), data)


def test_redo_recycles_only_dormant_units_and_keeps_the_function():
    """ReDo: exactly the dormant units (here: mean |h| = 0 with tau 0) get fresh incoming weights and bias 0;
    their outgoing weights and optimizer state become 0, so the network computes the same outputs."""
    import jax
    import jax.numpy as jnp

    import common
    params = pmnist.init_params(jax.random.key(0), 784, 16)
    params[0]["b"] = params[0]["b"].at[:4].set(-1e3)  # units 0-3 of layer 1 never fire
    x = jnp.asarray(np.random.default_rng(0).random((50, 784)), jnp.float32)
    opt = common.sgd(0.01, momentum=0.9)
    state = {"params": params, "opt": jax.tree.map(jnp.ones_like, opt.init(params))}  # momentum 1 everywhere
    agent = {"redo_tau": 0.0, "redo_every": 100}
    new = pmnist.redo_step(agent, opt, state, x, jax.random.key(1), jnp.bool_(True))
    np.testing.assert_allclose(pmnist.forward(new["params"], x)[0], pmnist.forward(params, x)[0], atol=1e-4)
    features = pmnist.hidden_features(params, x)
    momentum = new["opt"][1][0].trace  # optax.chain(add_decayed_weights, sgd(momentum)): the sgd trace
    dormant = [np.asarray(jnp.all(f == 0, axis=0)) for f in features] + [np.zeros(10, bool)]
    assert dormant[0][:4].all()
    rows = np.ones(784, bool)  # inputs of layer 0; then the units of the previous layer that were not recycled
    for layer in range(3):
        w_new, w_old = (np.asarray(p[layer]["w"])[rows] for p in (new["params"], params))
        np.testing.assert_array_equal(np.any(w_new != w_old, axis=0), dormant[layer])  # fresh incoming weights
        np.testing.assert_array_equal(np.asarray(new["params"][layer]["b"]),
                                      np.where(dormant[layer], 0, params[layer]["b"]))
        # Outgoing weights of recycled units are 0 (where the next layer's unit was not recycled itself).
        out_new = np.asarray(new["params"][layer + 1]["w"])[:, ~dormant[layer + 1]]
        out_old = np.asarray(params[layer + 1]["w"])[:, ~dormant[layer + 1]]
        np.testing.assert_array_equal(out_new, np.where(dormant[layer][:, None], 0, out_old))
        trace = np.asarray(momentum[layer]["w"])
        assert (trace[:, dormant[layer]] == 0).all() and (trace[rows][:, ~dormant[layer]] == 1).all()
        assert (np.asarray(momentum[layer + 1]["w"])[dormant[layer]] == 0).all()
        rows = ~dormant[layer]
    idle = pmnist.redo_step(agent, opt, state, x, jax.random.key(1), jnp.bool_(False))  # not due: no change
    for a, b in zip(jax.tree.leaves(idle), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_spectral_start_vectors_are_the_authors():
    """The penalty's start vectors come from PRNGKey(i), i the authors' counter over kernels (their layer_0..3):
    our leaf order lists the kernels in their order, so the default keys are theirs, and the penalty equals their
    power iteration by hand."""
    import jax

    import common
    from authors_spectral import authors_penalty, kernel_paths
    params = pmnist.init_params(jax.random.key(0), 784, 16)
    table = {"[0]['w']": 0, "[1]['w']": 1, "[2]['w']": 2, "[3]['w']": 3}  # the authors' layer_0 .. layer_3
    assert kernel_paths(params) == list(table)
    for iters in (1, 10):
        np.testing.assert_allclose(float(common.spectral_penalty(params, 2.0, 2.0, iters)[0]),
                                   authors_penalty(params, table, iters=iters), rtol=1e-5)


def test_layer_norm_and_spectral_options(run):
    """layernorm-l2 normalizes each hidden layer before its ReLU; the persistent power iteration is another
    trajectory than the fixed-start one, and with 10 iterations close to it."""
    import jax
    import jax.numpy as jnp

    import common
    params = pmnist.init_params(jax.random.key(0), 784, 16)
    normed = [{**p, "scale": jnp.full(16, 2.0), "shift": jnp.full(16, 0.5)} for p in params[:-1]] + params[-1:]
    x = jnp.asarray(np.random.default_rng(0).random((5, 784)), jnp.float32)
    h = np.asarray(x @ params[0]["w"] + params[0]["b"])
    want = np.maximum(2 * (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6) + 0.5, 0)
    np.testing.assert_allclose(pmnist.forward(normed, x)[1][0], want, rtol=1e-4, atol=1e-4)
    assert len(common.spectral_starts(normed)) == 4  # the LayerNorm scales are not kernels
    fixed, carried = run(agent="spectral-reg"), run(agent="spectral-reg", spectral_persistent=True)
    assert not np.array_equal(fixed["param_norm"], carried["param_norm"])
    np.testing.assert_allclose(fixed["online_acc"], carried["online_acc"], atol=0.05)


def test_multi_seed_and_sweep_equal_single_runs(run):
    """A 2-lr x 2-seed run (4 members together) equals the four single runs: each member's randomness
    (init, permutation, order, eval subset) depends on its seed only, each config keeps its own lr."""
    lrs, seeds = (0.01, 0.03), (TINY.seed, TINY.seed + 1)
    both = run(agent="l2", lr=lrs, seeds=2)
    assert both["online_acc"].shape == (2, 2, 2)
    for c, lr in enumerate(lrs):
        for s, seed in enumerate(seeds):
            alone = run(agent="l2", lr=(lr,), seed=seed)
            for k in METRICS:
                np.testing.assert_allclose(both[k][c, s], alone[k][0, 0], rtol=0, atol=1e-5, err_msg=k)
    assert not np.array_equal(both["param_norm"][0], both["param_norm"][1])  # configs really differ
    assert not np.array_equal(both["param_norm"][:, 0], both["param_norm"][:, 1])  # seeds really differ


def test_divergence_is_reported_and_others_continue(data, tmp_path, capsys):
    run_dir = pmnist.main(replace(TINY, agent="l2", lr=(0.01, 1e30), seeds=2, out_dir=str(tmp_path)), data)
    m = np.load(run_dir / "metrics.npz")
    assert m["diverged"].tolist() == [[False, False], [True, True]]
    assert np.isfinite(m["param_norm"][0]).all() and not np.isfinite(m["param_norm"][1]).any()
    assert np.isfinite(m["online_acc"][0]).all() and np.isnan(m["online_acc"][1]).all()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "diverged" in line]
    assert len(warnings) == 2  # once per diverged member, not once per task


def test_resume_equals_uninterrupted(data, tmp_path):
    """2 tasks straight vs 1 task, then --resume for the second; Hessian spectra included."""
    hess = dict(hessian_every=1, hessian_samples=100, lanczos_iters=8)
    full = pmnist.main(replace(TINY, out_dir=str(tmp_path / "full"), **hess), data)
    half = replace(TINY, out_dir=str(tmp_path / "half"), **hess)
    pmnist.main(replace(half, tasks=1), data)
    with np.load(tmp_path / "half" / "metrics.npz") as f:
        assert f["online_acc"].shape == (1, 1, 1)
    pmnist.main(replace(half, resume=True), data)
    for name in ("metrics.npz", "hessian.npz"):
        a, b = np.load(full / name), np.load(tmp_path / "half" / name)
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
    h = np.load(full / "hessian.npz")
    assert h["tasks"].tolist() == [0, 1]
    for k in ("init_nodes", "init_weights", "end_nodes", "end_weights"):
        assert h[k].shape == (1, 1, 2, 1, 8) and np.isfinite(h[k]).all()
    np.testing.assert_allclose(h["end_weights"].sum(-1), 1.0, atol=1e-5)
    # The init spectrum of task 1 is taken at the params that ended task 0, on task 1's data: not the same
    # point as task 0's end spectrum (other data), nor as task 1's end (other params).
    assert not np.allclose(h["init_nodes"][..., 1, :, :], h["end_nodes"][..., 0, :, :])
    with pytest.raises(SystemExit, match="different settings.*width"):
        pmnist.main(replace(half, resume=True, width=32), data)


def test_bad_arguments_fail_cleanly(data, tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "checkpoint.pkl").touch()
    for bad, match in ((dict(agent="bp", er_lr=(0.1,)), "does not apply"),
                       (dict(agent="cbp", weight_decay=(0.1,)), "does not apply"),
                       (dict(steps_per_task=601), "exceeds the 600 training images"),
                       (dict(eval_size=201), "exceeds the 200 test images"),
                       (dict(lr=(0.0,)), "lr"),
                       (dict(agent="er", er_batch=1), "er-batch"),
                       (dict(resume=True, out_dir=str(tmp_path / "empty")), "no checkpoint"),
                       (dict(out_dir=str(tmp_path / "done")), "already holds a run")):
        with pytest.raises(SystemExit, match=match):
            pmnist.main(replace(TINY, **bad), data)


def test_missing_data_is_one_line_exit_1(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "pmnist.py", "--manual-dir", str(empty), "--data-dir",
                           str(tmp_path / "tfds"), "--tasks", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert all(name in lines[0] for name in datasets.MNIST_FILES) and "--manual-dir" in lines[0]


def test_two_devices_equal_one(run, tmp_path):
    """3 members on 2 (forced host) devices, padded with a copy of member 0 to 4 and vmapped on each device,
    equal the 1-device lax.map run: the padding is in no output.

    eval_size 16: with two forced host devices on a 2-core machine, a LAPACK SVD of a 100 x 16 feature matrix
    inside the sharded program never returned (16 x 16 does); real multi-device runs are GPUs (cuSOLVER)."""
    script = SYNTHETIC_SCRIPT + f"""
import pmnist
from dataclasses import replace
pmnist.main(replace(pmnist.Args(**{TINY.__dict__!r}), agent="l2", seeds=3, eval_size=16, out_dir={str(tmp_path)!r}),
            synthetic())
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 members (1 configs x 3 seeds, 1 padding), 2 x cpu, member batching vmap" in proc.stdout
    with np.load(tmp_path / "metrics.npz") as f:
        assert_same({k: f[k] for k in f.files}, run(agent="l2", seeds=3, eval_size=16), atol=1e-5)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason="real MNIST files not present at ../shared/data/mnist")
def test_real_mnist_read_cache_and_learn(tmp_path, monkeypatch):
    """The four real files are read directly (no TensorFlow) and cached; the cache then loads without the
    files; a width-100 MLP learns Permuted MNIST well above chance (0.1)."""
    arrays = datasets.mnist(str(tmp_path), str(MNIST_DIR))
    assert arrays["train_x"].shape == (60000, 784) and arrays["test_x"].shape == (10000, 784)
    assert arrays["train_x"].dtype == np.uint8 and arrays["train_y"].max() == 9
    assert (tmp_path / datasets.MNIST_CACHE).is_file()
    monkeypatch.setattr(datasets, "read_mnist_folder", lambda *a, **k: pytest.fail("cache not used"))
    monkeypatch.setattr(datasets, "tfds_mnist", lambda *a, **k: pytest.fail("cache not used"))
    # Measured: online accuracy 0.770 (task 0) and 0.779 (task 1), test accuracy 0.868 / 0.908.
    run_dir = pmnist.main(pmnist.Args(agent="bp", tasks=2, steps_per_task=3000, width=100, eval_size=500,
                                      data_dir=str(tmp_path), out_dir=str(tmp_path / "run")))
    m = np.load(run_dir / "metrics.npz")
    assert (m["online_acc"] > 0.65).all(), m["online_acc"]
    assert (m["test_acc"] > 0.75).all(), m["test_acc"]


def test_interrupt_mid_task_then_resume_equals_uninterrupted(data, tmp_path, monkeypatch, capsys):
    """With 100-step calls a 250-step task is 3 calls: stop after the first call of task 0, resume, and get the
    uninterrupted run's metrics and spectra; splitting a task into calls changes nothing either."""
    hess = dict(hessian_every=1, hessian_samples=100, lanczos_iters=8, agent="l2-er", er_lr=(0.01,))
    whole = pmnist.main(replace(TINY, out_dir=str(tmp_path / "whole"), **hess), data)
    monkeypatch.setattr(pmnist, "CALL_STEPS", 100)
    full = pmnist.main(replace(TINY, out_dir=str(tmp_path / "full"), **hess), data)
    args = replace(TINY, out_dir=str(tmp_path / "cut"), **hess)
    monkeypatch.setattr(pmnist.runner, "StopRequests", lambda: StopAfter(1))
    with pytest.raises(SystemExit) as e:
        pmnist.main(args, data)
    assert e.value.code == 130
    out = capsys.readouterr().out
    assert "interrupted after task 1/2 (step 100 of 250); resume with: python pmnist.py" in out
    assert f"--resume --out-dir {tmp_path / 'cut'}" in out and "--er-lr 0.01" in out
    monkeypatch.setattr(pmnist.runner, "StopRequests", lambda: StopAfter(10**9))
    pmnist.main(replace(args, resume=True), data)
    for name in ("metrics.npz", "hessian.npz"):
        a, b, c = np.load(full / name), np.load(tmp_path / "cut" / name), np.load(whole / name)
        assert sorted(a.files) == sorted(b.files) == sorted(c.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")
            np.testing.assert_allclose(a[k], c[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}:{k}")


def test_ctrl_c_checkpoints_and_prints_the_resume_command(tmp_path):
    """A real SIGINT to a running process: exit 130, no traceback, one line with the command that resumes;
    that command finishes the run with the metrics of an uninterrupted one."""
    import signal
    base = [sys.executable, "pmnist.py", "--synthetic-data", "--agent", "bp", "--width", "16", "--tasks", "4",
            "--steps-per-task", "20000", "--eval-size", "100"]
    proc = subprocess.Popen(base + ["--out-dir", str(tmp_path / "cut")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("task 1/4"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    lines += out.splitlines()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    resume = [line for line in lines if line.startswith("interrupted after")]
    assert len(resume) == 1, lines
    command = resume[0].split("resume with: ")[1].split()
    assert command[:2] == ["python", "pmnist.py"] and command[-3:] == ["--resume", "--out-dir", str(tmp_path / "cut")]
    done = subprocess.run([sys.executable] + command[1:], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    whole = subprocess.run(base + ["--out-dir", str(tmp_path / "whole")], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    a, b = np.load(tmp_path / "whole" / "metrics.npz"), np.load(tmp_path / "cut" / "metrics.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_fork_names_its_runs_after_itself_and_plots_beside_pmnist(tmp_path):
    """A copy of pmnist.py saved as my_idea.py writes runs/my_idea__<agent>__<stamp>/ with script my_idea and
    benchmark pmnist in config.json, so plot.py draws it in pmnist's figures."""
    import json
    import shutil
    for name in ("common.py", "runner.py", "data.py", "hessian.py", "pmnist.py", "plot.py"):
        shutil.copy(ROOT / name, tmp_path / ("my_idea.py" if name == "pmnist.py" else name))
    base = ["--synthetic-data", "--agent", "bp", "--width", "8", "--tasks", "1", "--steps-per-task", "200",
            "--eval-size", "50"]
    for script in ("pmnist.py", "my_idea.py"):
        shutil.copy(ROOT / "pmnist.py", tmp_path / "pmnist.py")
        proc = subprocess.run([sys.executable, script] + base, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    mine = list((tmp_path / "runs").glob("my_idea__bp__*"))
    assert len(mine) == 1 and len(list((tmp_path / "runs").glob("pmnist__bp__*"))) == 1
    config = json.loads((mine[0] / "config.json").read_text())
    assert config["script"] == "my_idea" and config["benchmark"] == "pmnist"
    proc = subprocess.run([sys.executable, "plot.py", *map(str, sorted((tmp_path / "runs").iterdir())), "--out",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "performance_pmnist.png").is_file() and not list(tmp_path.glob("*my_idea*.png"))
