"""Every script's metrics on a small fixed-seed run equal the values recorded in tests/golden/ (float32
tolerance). Refactors must not change a number; a change that does must say why and re-record:

    python tests/test_equal_metrics.py --record [SCRIPT ...]

(data: synthetic arrays of the real shapes, or the tiny files in the real on-disk formats that
tests/test_imagenet.py and tests/test_cifar.py write, so the test needs no dataset). The ImageNet and CIFAR
runs use those files' tiny settings, so they reuse the programs those tests compiled (the persistent
compilation cache that tests/conftest.py turns on).
Regularizer strengths are raised where the paper's values would move these few steps' numbers by less than
the tolerance, so that a regression in any mechanism shows.
The values are one core's (tests/conftest.py pins every test process to one): XLA rounds differently with more
cores, and may on another CPU model. Where this test fails on a new machine, run on that machine the last commit
that passed elsewhere: if it gives the same new values, the code is not at fault, and re-recording is right."""
import sys
import tempfile
import zipfile
from pathlib import Path

if __name__ == "__main__":  # recording: one core and one OpenBLAS thread, as under pytest (before numpy, jax)
    import conftest  # noqa: F401

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the ImageNet and CIFAR runs reuse those tests' tiny data files


def pmnist_runs():
    import pmnist
    small = dict(seeds=1, tasks=2, steps_per_task=250, width=16, eval_size=200, hessian_every=1,
                 hessian_samples=100, lanczos_iters=8, synthetic_data=True, member_batching="map")
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
    import test_cifar as t  # its tiny CIFAR-100 archive and settings
    with tempfile.TemporaryDirectory() as tmp:
        manual = Path(tmp) / "manual"
        manual.mkdir()
        t.write_archive(manual / "cifar-100-python.tar.gz", t.official_arrays(), "python")
        small = dict(t.TINY, seeds=1, data_dir=str(Path(tmp) / "data"), manual_dir=str(manual))
        # Spectra for one agent (they do not depend on it; each costs ~0.8 s of CPU here), as tests/test_cifar.py.
        hessian = dict(hessian_every=1, hessian_samples=20, hessian_batch=10, lanczos_iters=4)
        extra = {"l2": dict(weight_decay=(1e-2,), **hessian), "l2-er": dict(weight_decay=(1e-2,), er_lr=(1e-2,)),
                 "er": dict(er_lr=(1e-2,)), "cbp": t.CBP, "snp": dict(perturb_scale=1e-3),
                 "snp-l2": dict(perturb_scale=1e-3, weight_decay=(1e-2,))}
        for agent in ("bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2", "reset"):
            yield agent, (lambda out, agent=agent: cifar.main(cifar.Args(
                agent=agent, out_dir=str(out), **small, **extra.get(agent, {}))))


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


SCRIPTS = {"pmnist": pmnist_runs, "toy": toy_runs, "imagenet": imagenet_runs, "cifar": cifar_runs,
           "ant_ppo": ant_ppo_runs}


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


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_metrics_equal_the_recorded_ones(script, tmp_path):
    golden_path = GOLDEN / f"{script}.npz"
    assert golden_path.exists(), f"no recorded metrics: python tests/test_equal_metrics.py --record {script}"
    got = collect(script, tmp_path)
    with np.load(golden_path) as golden:
        assert sorted(got) == sorted(golden.files)
        for key in golden.files:
            want, have = golden[key], got[key]
            assert have.shape == want.shape and have.dtype == want.dtype, key
            if np.issubdtype(want.dtype, np.floating):
                np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=key)
            else:
                np.testing.assert_array_equal(have, want, err_msg=key)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"]:
        sys.exit("usage: python tests/test_equal_metrics.py --record [SCRIPT ...]")
    GOLDEN.mkdir(exist_ok=True)
    for script in sys.argv[2:] or sorted(SCRIPTS):
        with tempfile.TemporaryDirectory() as tmp:
            arrays = collect(script, tmp)
        np.savez_compressed(GOLDEN / f"{script}.npz", **arrays)
        print(f"recorded {len(arrays)} arrays -> {GOLDEN / f'{script}.npz'}")
