"""Evaluation measures used by the paper studies and the benchmarks."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def explained_variance(y, prediction) -> float:
    r"""Percentage of variance explained on a test set (the mixture-GLMM paper's measure).

    :math:`100\,(1 - \sum (y - \hat y)^2 / \sum (y - \bar y)^2)`, summed over all
    response dimensions.
    """
    y = np.asarray(y, dtype=float)
    prediction = np.asarray(prediction, dtype=float).reshape(y.shape)
    total = np.sum((y - y.mean(axis=0)) ** 2)
    return float(100.0 * (1.0 - np.sum((y - prediction) ** 2) / total))


def match_components(estimated_coef, true_coef) -> np.ndarray:
    """Order of estimated components that best matches the true ones.

    Args:
        estimated_coef: component coefficients ``[g, ...]``.
        true_coef: the true ones, same shape.

    Returns:
        ``order [g]``: estimated component ``order[h]`` plays true component ``h``
        (minimum total absolute coefficient difference, Hungarian algorithm).
    """
    est = np.asarray(estimated_coef).reshape(len(estimated_coef), -1)
    true = np.asarray(true_coef).reshape(len(true_coef), -1)
    cost = np.abs(true[:, None, :] - est[None, :, :]).sum(-1)
    _, order = linear_sum_assignment(cost)
    return order


def mean_absolute_bias(estimate, truth) -> float:
    """Average absolute difference over all elements."""
    return float(np.mean(np.abs(np.asarray(estimate) - np.asarray(truth))))


def mean_and_standard_error(values) -> tuple[float, float]:
    """Mean and its standard error ``sd / sqrt(m)`` (``ddof=1``) over replicates."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))
