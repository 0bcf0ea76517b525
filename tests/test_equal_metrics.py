"""Every script's metrics on a small fixed-seed run equal the values recorded in tests/golden/, each within a
tolerance measured, not guessed. Refactors must not change a number; a change that does must say why and
re-record (about 20 minutes on 2 cores):

    python tests/test_equal_metrics.py --record [SCRIPT ...]

(data: synthetic arrays of the real shapes, or the tiny files in the real on-disk formats that
tests/test_imagenet.py and tests/test_cifar.py write, so the test needs no dataset). The ImageNet runs use that
file's tiny settings, so they reuse the programs it compiled (the persistent compilation cache that
tests/conftest.py turns on); CIFAR's recorded runs are tests/test_cifar.py's every-agent runs, checked there.
Regularizer strengths are raised where the paper's values would move these few steps' numbers by less than
the tolerance, so that a regression in any mechanism shows.

How the tolerances were measured. XLA rounds differently on other CPUs and with other core counts, and training
amplifies that: values recorded on one machine failed on another (AMD EPYC, AVX-512) after one task of the ImageNet
ER run (the end-of-task Hessian's extreme Ritz values 8% off, a small node -0.006 against -0.024, the effective
rank 3% and the dead units 2 off) while its task 0 agreed to 1e-4. So `--record` runs every script as the reference
(the native instruction set on one core, as under pytest: tests/conftest.py pins each worker to one core) and again
in each of VARIANTS: XLA limited to AVX2, AVX and SSE4.2 (`--xla_cpu_max_isa`), the native build on two cores, and
every random draw of the run moved by one ulp (for what no flag imitates, such as matrix products blocked for
another cache). Beside each recorded number it stores its spread, the largest deviation of any variant from the
reference; a number may then differ by SPREAD_FACTOR x its spread, and never by less than the float32 floor (RTOL,
ATOL). Most numbers have no spread beyond the floor; the ER runs' (ImageNet, CIFAR) after their first task, and
CIFAR's ResNet metrics (1e-3 at task 0 already), have. A Hessian spectrum is also compared through what is stable
in it, its first two moments (sum of w x node, sum of w x node^2) and its extreme nodes; a raw Ritz value or weight
that rounding moved in any variant is left to those. An accuracy on n examples moves in steps of 1/n (one argmax
flips when its margin is at rounding level): it may always differ by one example. Checked against a real other
machine: the values recorded there before this scheme pass these tolerances in all five scripts (tests/golden/ at
commit db08b90).

Mutation power, checked by hand at the recording (each one-line change in a copy of the tree; each fails):
common.sgd's weight decay halved (the l2 runs' spectra in pmnist, imagenet, cifar); common.er_ascent descending
instead of ascending (pmnist and imagenet er spectra at task init); hessian.lanczos's alpha taken against the
first Lanczos vector instead of the current one (every spectrum of pmnist, imagenet and ant_ppo)."""
import os
import sys
import tempfile
import zipfile
from pathlib import Path

if __name__ == "__main__":  # recording: one core and one OpenBLAS thread, as under pytest (before numpy, jax)
    ALLOWED_CORES = os.sched_getaffinity(0)  # conftest narrows this process to one; variants may use more
    import conftest  # noqa: F401

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the ImageNet and CIFAR runs reuse those tests' tiny data files


PMNIST_SMALL = dict(seeds=1, tasks=2, steps_per_task=250, width=16, eval_size=200, hessian_every=1,
                    hessian_samples=100, lanczos_iters=8, synthetic_data=True, member_batching="map")


def pmnist_runs():
    import pmnist
    small = PMNIST_SMALL
    for agent in ("bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2"):
        extra = {"replacement_rate": 0.02, "maturity_threshold": 20} if agent == "cbp" else {}
        extra |= {"er_batch": 50} if agent in ("er", "l2-er") else {}
        yield agent, (lambda out, agent=agent, extra=extra: pmnist.main(
            pmnist.Args(agent=agent, out_dir=str(out), **small, **extra)))


def toy_runs():
    import toy
    yield "default", lambda out: toy.main(toy.Args(grid_size=4, out_dir=str(out)))


def imagenet_runs():
    import imagenet
    import test_imagenet as t  # its tiny ImageNet32 zip and settings
    with tempfile.TemporaryDirectory() as tmp:
        manual, data = Path(tmp) / "manual", Path(tmp) / "data"
        manual.mkdir()
        with zipfile.ZipFile(manual / imagenet.data.IMAGENET32_ZIP, "w") as zf:
            for number, blob in sorted(t.batch_files().items()):
                zf.writestr(f"train_data_batch_{number}.npz", blob)
        # vmap: the batching these values were recorded with (the default then; map rounds differently)
        small = dict(t.TINY, data_dir=str(data), manual_dir=str(manual), hessian_every=1, lanczos_iters=4,
                     lr=(1e-2,), member_batching="vmap")
        extra = {"l2": dict(weight_decay=(0.1,)), "l2-er": dict(weight_decay=(0.1,), er_lr=(1e-2,)),
                 "er": dict(er_lr=(1e-2,)), "cbp": t.CBP_TINY, "snp": dict(perturb_scale=1e-3),
                 "snp-l2": dict(perturb_scale=1e-3, weight_decay=(0.1,))}
        for agent in ("bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2"):
            yield f"{agent}_seed0", (lambda out, agent=agent: imagenet.main(imagenet.Args(
                agent=agent, seed=0, out_dir=str(out), **small, **extra.get(agent, {}))))


def cifar_runs():
    import cifar
    import test_cifar as t  # its tiny CIFAR-100 archive, settings and every agent's run (checked there)
    with tempfile.TemporaryDirectory() as tmp:
        manual = Path(tmp) / "manual"
        manual.mkdir()
        t.write_archive(manual / "cifar-100-python.tar.gz", t.official_arrays(), "python")
        small = dict(t.TINY, data_dir=str(Path(tmp) / "data"), manual_dir=str(manual))
        for agent in cifar.AGENTS:
            yield agent, (lambda out, agent=agent: cifar.main(cifar.Args(
                agent=agent, out_dir=str(out), **small, **t.AGENT_RUNS.get(agent, {}))))


def ant_ppo_runs():
    import ant_ppo
    # tests/test_ant_ppo.py's tiny shape (4 envs x 16 steps per update, 2 updates, width 16, 8-step episodes,
    # four friction phases), 1 seed. Strengths raised so that each mechanism moves these few Adam steps'
    # numbers; spectra for one agent (each phase's init and end).
    small = dict(seeds=1, num_envs=4, num_steps=64, num_minibatches=4, update_epochs=2, hidden_size=16,
                 total_steps=128, change_every=32, episode_length=8, updates_per_chunk=1, fast_compile=True)
    extra = {"l2": dict(weight_decay=(0.1,)), "er": dict(er_lr=(0.5,)), "l2-er": dict(weight_decay=(0.1,), er_lr=(0.5,)),
             "cbp": dict(weight_decay=(0.1,), replacement_rate=0.05, maturity_threshold=0, hessian_every_phase=True,
                         hessian_iters=4)}
    for agent in ("bp", "l2", "er", "l2-er", "cbp"):
        yield agent, (lambda out, agent=agent: ant_ppo.main(ant_ppo.Args(
            agent=agent, out_dir=str(out), **small, **extra.get(agent, {}))))
    for agent in ("bp", "l2-er"):  # the same PPO on Brax's positional Ant (--physics brax)
        yield f"brax-{agent}", (lambda out, agent=agent: ant_ppo.main(ant_ppo.Args(
            agent=agent, physics="brax", out_dir=str(out), **small, **extra.get(agent, {}))))


SCRIPTS = {"pmnist": pmnist_runs, "toy": toy_runs, "imagenet": imagenet_runs, "cifar": cifar_runs,
           "ant_ppo": ant_ppo_runs}


# Each variant re-runs the scripts with XLA's CPU code generation changed (instruction set, cores) the way another
# machine changes it. The spread of a recorded number is its largest deviation from the reference in any variant.
# Machines also differ in what no XLA flag imitates (e.g. the blocking of matrix products sized to the caches,
# LLVM's tuning for the host CPU): the "ulp" variants imitate that by moving every random draw of a run (initial
# parameters, probes, noise) by one float32 ulp, a perturbation of rounding size that the runs amplify as they
# amplify any other.
VARIANTS = {"avx2": ("--xla_cpu_max_isa=AVX2", 1, None), "avx": ("--xla_cpu_max_isa=AVX", 1, None),
            "sse4_2": ("--xla_cpu_max_isa=SSE4_2", 1, None), "two_cores": ("", 2, None),
            "ulp_a": ("", 1, 0), "ulp_b": ("", 1, 1)}
SPREAD_FACTOR = 4.0  # the spread is the largest of six samples of rounding's effect; another CPU is a seventh
RTOL, ATOL = 1e-4, 1e-5  # float32 floor where every variant agrees
SPREAD = "spread:"  # key prefix of the spreads in tests/golden/<script>.npz


def collect(script, tmp):
    """{label/file/key: array} over the script's runs: every array of every .npz a run writes."""
    arrays = {}
    for label, run in SCRIPTS[script]():
        out = Path(tmp) / f"{script}_{label}"
        run(out)
        for path in sorted(out.glob("*.npz")):
            with np.load(path) as f:
                arrays.update({f"{label}/{path.stem}/{k}": f[k] for k in f.files})
    return arrays


def compared(arrays):
    """The numbers the test compares: every recorded array, plus for each Hessian spectrum (a pair of
    <when>_nodes / <when>_weights arrays, [..., num_iters]) its moments and extreme nodes, which rounding moves far
    less than the small Ritz values; all in float64 (integers too, so that they get a spread)."""
    out = {}
    for key, value in arrays.items():
        out[key] = value.astype(np.float64) if np.issubdtype(value.dtype, np.number) else value
        if key.endswith("_nodes") and key[:-len("nodes")] + "weights" in arrays:
            nodes, weights = value.astype(np.float64), arrays[key[:-len("nodes")] + "weights"].astype(np.float64)
            massive = weights > 0  # an early-closed Krylov space pads with weightless zero nodes
            out[key + "/moment1"] = np.sum(weights * nodes, axis=-1)
            out[key + "/moment2"] = np.sum(weights * nodes ** 2, axis=-1)
            out[key + "/max"] = np.max(np.where(massive, nodes, -np.inf), axis=-1)
            out[key + "/min"] = np.min(np.where(massive, nodes, np.inf), axis=-1)
    return out


def accuracy_step(script, key, shape):
    """What one example is worth in an accuracy array of `script` ([config, seed, task]; 0 for other arrays):
    1 / the number of examples it counts, per task, from the recorded runs' settings."""
    name, task = key.split("/")[-1], np.arange(shape[-1]) if shape else 0
    if not name.endswith("_acc"):
        return 0.0
    if script == "pmnist":  # test_acc on eval_size images; online_acc over a task's steps
        return 1 / PMNIST_SMALL["eval_size" if name == "test_acc" else "steps_per_task"]
    if script == "imagenet":  # the task's 2 classes: their test images; the last epoch's training images
        import test_imagenet as t
        return 1 / (2 * t.TINY["test_per_class" if name == "test_acc" else "train_per_class"])
    if script == "cifar":  # every seen class's test images; the last epoch's minibatches, each a mean over its images
        import cifar
        import test_cifar as t
        per_class = t.TEST_PER_CLASS if name == "test_acc" else t.TRAIN_PER_CLASS
        return 1 / (per_class * cifar.Args().classes_per_task * (task + 1))
    raise KeyError(f"{script} has no accuracy step for {key}")


def check(script, got, golden):
    """Assert that `got` (collect's arrays) equals the recorded values within each number's tolerance."""
    want = {k: golden[k] for k in golden.files if not k.startswith(SPREAD)}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        have = got[key]
        assert have.shape == value.shape and have.dtype == value.dtype, key
    have, want = compared(got), compared(want)
    for key, value in want.items():
        if not np.issubdtype(value.dtype, np.number):
            np.testing.assert_array_equal(have[key], value, err_msg=key)
            continue
        floor, spread = ATOL + RTOL * np.abs(value), golden[SPREAD + key]
        one_example = accuracy_step(script, key, value.shape) * (1 + 1e-6)
        allowed = np.maximum(np.maximum(floor, SPREAD_FACTOR * spread), one_example)
        same = (np.abs(have[key] - value) <= allowed) | (np.isnan(have[key]) & np.isnan(value)) | (have[key] == value)
        if key.endswith(("_nodes", "_weights")):  # a raw Ritz value or weight that rounding moved in any variant
            same |= spread > floor  # is left to its spectrum's moments and extreme nodes (their own keys here)
        assert same.all(), (f"{key}: {np.count_nonzero(~same)} of {same.size} numbers off:\n got {have[key][~same]}\n"
                            f" recorded {value[~same]}\n allowed deviation {allowed[~same]}")


def check_recorded(script, got):
    """`got` equals tests/golden/<script>.npz within each number's tolerance."""
    golden_path = GOLDEN / f"{script}.npz"
    assert golden_path.exists(), f"no recorded metrics: python tests/test_equal_metrics.py --record {script}"
    with np.load(golden_path) as golden:
        check(script, got, golden)


# Scripts whose test file runs the recorded runs anyway (every agent end to end) check them there, from those runs.
CHECKED_IN_THEIR_TEST_FILE = ("cifar",)


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - set(CHECKED_IN_THEIR_TEST_FILE)))
def test_metrics_equal_the_recorded_ones(script, tmp_path):
    check_recorded(script, collect(script, tmp_path))


def perturb_random_draws(bit):
    """From now on every float drawn by jax.random (and jax.nn.initializers, which call the same functions) moves by
    one ulp, up or down by bit `bit` of its own representation: a deterministic perturbation of rounding size."""
    import jax
    import jax.numpy as jnp
    from jax._src import random as internal

    def one_ulp(draw):
        def perturbed(*args, **kwargs):
            x = draw(*args, **kwargs)
            bits = jax.lax.bitcast_convert_type(x, {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize])
            up = ((bits >> bit) & 1) == 1
            return jnp.nextafter(x, jnp.where(up, jnp.inf, -jnp.inf).astype(x.dtype))
        return perturbed

    for name in ("uniform", "normal", "truncated_normal"):
        patched = one_ulp(getattr(internal, name))
        setattr(internal, name, patched)
        setattr(jax.random, name, patched)


def dump(script, path):
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(path, **collect(script, tmp))


def record(scripts):
    """Each script's reference run and its variants, every one in a subprocess pinned to its own core (two at a
    time on two cores; the two-core variants alone); then each number's spread, saved with the values."""
    import queue
    import subprocess
    from concurrent.futures import ThreadPoolExecutor
    cores, runs = sorted(ALLOWED_CORES), {"reference": ("", 1, None), **VARIANTS}
    free = queue.Queue()
    for core in cores:
        free.put(core)

    def run(tmp, script, name):
        flags, n, bit = runs[name]
        cache = ROOT / ".pytest_cache" / ("jax" if name == "reference" else f"jax_{name}")
        env = dict(os.environ, XLA_FLAGS=flags, JAX_COMPILATION_CACHE_DIR=str(cache))
        out = Path(tmp) / f"{script}_{name}.npz"
        use = cores[:n] if n > 1 else [free.get()]
        try:
            subprocess.run([sys.executable, __file__, "--dump", script, str(out), ",".join(map(str, use))]
                           + ([str(bit)] if bit is not None else []), env=env, check=True, stdout=subprocess.DEVNULL)
        finally:
            if n == 1:
                free.put(use[0])
        print(f"ran {script} {name}", flush=True)
        with np.load(out) as f:
            return {k: f[k] for k in f.files}

    GOLDEN.mkdir(exist_ok=True)
    results = {script: {} for script in scripts}
    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(len(cores)) as pool:
            jobs = {(script, name): pool.submit(run, tmp, script, name)
                    for script in scripts for name in runs if runs[name][1] == 1}
            for (script, name), job in jobs.items():
                results[script][name] = job.result()
        for script in scripts:
            for name in runs:
                if runs[name][1] > 1:
                    results[script][name] = run(tmp, script, name)
    for script in scripts:
        reference = results[script].pop("reference")
        values, spread = compared(reference), {}
        variants = [compared(arrays) for arrays in results[script].values()]
        for key, value in values.items():
            if np.issubdtype(value.dtype, np.number):
                deviations = [np.nan_to_num(np.abs(v[key] - value), nan=np.inf) for v in variants]
                spread[SPREAD + key] = np.max(deviations, axis=0)
                print(f"{script:9s} {key:60s} spread {np.max(spread[SPREAD + key], initial=0):.3g}")
        np.savez_compressed(GOLDEN / f"{script}.npz", **reference, **spread)
        print(f"recorded {len(reference)} arrays and {len(spread)} spreads -> {GOLDEN / f'{script}.npz'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--dump"]:  # one variant (from --record): script, output .npz, the cores to run on
        os.sched_setaffinity(0, {int(c) for c in sys.argv[4].split(",")})
        if sys.argv[5:]:
            perturb_random_draws(int(sys.argv[5]))
        dump(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["--record"]:
        record(sys.argv[2:] or sorted(SCRIPTS))
    else:
        sys.exit("usage: python tests/test_equal_metrics.py --record [SCRIPT ...]")
