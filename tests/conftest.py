"""Tests import the top-level scripts (common, hessian, pmnist, ...) from the repository root."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Real MNIST lives beside the repository when it is there (../shared/data/mnist); tests that need it skip.
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
