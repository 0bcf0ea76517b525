"""Statistics of truncated-normal initializers, shared by the ImageNet and CIFAR init tests."""
import math

import numpy as np


def truncated_normal_moments(a=2.0):
    """Variance and kurtosis of a standard normal truncated at +-a (integration by parts of z^2 and z^4)."""
    phi, mass = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), math.erf(a / math.sqrt(2))
    m2 = 1 - 2 * a * phi / mass
    m4 = 3 * m2 - 2 * a ** 3 * phi / mass
    return m2, m4 / m2 ** 2


def assert_truncated_normal(w, variance):
    """`w` looks like draws of a zero-mean normal truncated at 2 std and rescaled to `variance`: mean and variance
    within 4 standard errors, nothing beyond the truncation point. Returns w / sqrt(variance) for pooling."""
    w = np.asarray(w, np.float64).ravel()
    n = w.size
    m2, kurtosis = truncated_normal_moments()
    assert abs(w.mean()) < 4 * math.sqrt(variance / n), (w.mean(), variance, n)
    assert abs(w.var() / variance - 1) < 4 * math.sqrt((kurtosis - 1) / n), (w.var(), variance, n)
    assert np.abs(w).max() <= 2 * math.sqrt(variance / m2) * (1 + 1e-6)
    return w / math.sqrt(variance)


def assert_truncated_shape(z):
    """Pooled standardized draws: the kurtosis of a normal truncated at 2 std (2.37), not a uniform's (1.8)
    or an untruncated normal's (3)."""
    assert abs(np.mean(z ** 4) / np.mean(z ** 2) ** 2 - truncated_normal_moments()[1]) < 0.1
