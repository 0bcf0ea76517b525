"""Tests import the top-level scripts (common, runner, hessian, pmnist, ...) from the repository root."""
import os
import sys
from pathlib import Path

# Before anything loads jax (and with it scipy's OpenBLAS): OpenBLAS threads on top of XLA's made batched CPU
# eigen/SVD solves crawl or stall on a 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# One core per test process (pytest-xdist's worker N on the Nth core it may use): XLA's CPU results depend on how
# many cores a process may use (work split over more threads rounds differently: a 1-core and a 2-core run of the
# same ER step differ by 1e-5 after one task and by 5% in the Hessian nodes after two), and tests/golden/ holds
# one-core values. Pinning also keeps the workers from oversubscribing the cores.
# The cores come from the first process that loads this file (pytest itself, or pytest-xdist's controller), through
# the environment: the workers it starts inherit its pinning, and would otherwise all share its one core.
if hasattr(os, "sched_setaffinity"):
    os.environ.setdefault("TESTS_CORES", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    _cores = [int(c) for c in os.environ["TESTS_CORES"].split(",")]
    _worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    os.sched_setaffinity(0, {_cores[int(_worker[2:] or 0) % len(_cores)]})

ROOT = Path(__file__).resolve().parents[1]
# Compiling is most of this suite's time, and many runs compile the same programs again (every run builds its own
# closures): JAX's persistent compilation cache, shared by the test files, pytest-xdist's workers and the
# scripts the tests start as subprocesses, compiles each program once. Results do not depend on it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several workers on one GPU
sys.path.insert(0, str(ROOT))

# Real MNIST lives beside the repository when it is there (../shared/data/mnist); tests that need it skip.
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
