"""Every script's metrics on a small fixed-seed run equal the values recorded in tests/golden/ (float32
tolerance). Refactors must not change a number; a change that does must say why and re-record:

    python tests/test_equal_metrics.py --record [SCRIPT ...]

(data: synthetic arrays of the real shapes, so the test needs no dataset)."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT))


def pmnist_runs():
    import pmnist
    small = dict(seeds=2, tasks=2, steps_per_task=250, width=16, eval_size=200, hessian_every=1,
                 hessian_samples=100, lanczos_iters=8, synthetic_data=True, member_batching="map")
    for agent in ("bp", "l2", "er", "l2-er", "cbp", "snp", "snp-l2"):
        extra = {"replacement_rate": 0.02, "maturity_threshold": 20} if agent == "cbp" else {}
        extra |= {"er_batch": 50} if agent in ("er", "l2-er") else {}
        yield agent, (lambda out, agent=agent, extra=extra: pmnist.main(
            pmnist.Args(agent=agent, out_dir=str(out), **small, **extra)))


def toy_runs():
    import toy
    yield "default", lambda out: toy.main(toy.Args(grid_size=4, out_dir=str(out)))


SCRIPTS = {"pmnist": pmnist_runs, "toy": toy_runs}


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
    import tempfile
    if sys.argv[1:2] != ["--record"]:
        sys.exit("usage: python tests/test_equal_metrics.py --record [SCRIPT ...]")
    GOLDEN.mkdir(exist_ok=True)
    for script in sys.argv[2:] or sorted(SCRIPTS):
        with tempfile.TemporaryDirectory() as tmp:
            arrays = collect(script, tmp)
        np.savez_compressed(GOLDEN / f"{script}.npz", **arrays)
        print(f"recorded {len(arrays)} arrays -> {GOLDEN / f'{script}.npz'}")
