"""Tests import the top-level scripts (common, hessian, pmnist, ...) from the repository root."""
import os
import sys
from pathlib import Path

# Before anything loads jax (and with it scipy's OpenBLAS): OpenBLAS threads on top of XLA's made batched CPU
# eigen/SVD solves crawl or stall on a 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Real MNIST lives beside the repository when it is there (../shared/data/mnist); tests that need it skip.
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
