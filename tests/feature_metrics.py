"""Dead units and effective rank computed by hand (float64 NumPy), shared by the vision scripts' metric-sample
tests."""
import numpy as np


def numpy_effective_rank(features):
    """exp(entropy of the normalized singular values), as common.effective_rank."""
    s = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def assert_metrics_of(got, feats):
    """`got`'s dead_units and effective_rank are those of the feature matrices `feats` (one per layer)."""
    np.testing.assert_array_equal(got["dead_units"], [np.sum(np.all(np.asarray(f) == 0, axis=0)) for f in feats])
    np.testing.assert_allclose(got["effective_rank"], [numpy_effective_rank(f) for f in feats], rtol=1e-4)
