r"""Per-modality kernels of MTMKL and their normalisation.

**Modalities.** The encoded features come in ``P`` contiguous column blocks
(:attr:`mtl_jax.data.personal.PersonSchema.modalities`, ``(name, start, stop)``). They are
carried as a 0/1 membership matrix ``mask [P, q]`` (``mask[m, j] = 1`` when column ``j``
belongs to modality ``m``), which is part of the fitted parameters: a saved fit needs no
schema to rebuild its kernels, and the kernel code has no static block bounds.

**Kernels** on the columns of modality :math:`m` (:math:`x_m` the sub-vector of ``x``):

* ``"rbf"``:    :math:`k_m(x, x') = \exp(-\gamma_m \|x_m - x'_m\|^2)` (scikit-learn's
  parameterisation, as the original MTMKL: ``gamma`` is an inverse squared length);
* ``"linear"``: :math:`k_m(x, x') = x_m^T x'_m`;
* ``"cosine"``: :math:`k_m(x, x') = x_m^T x'_m / (\|x_m\|\,\|x'_m\|)` (0 when either norm is 0).

**Normalisation rule (once, on the training rows).** Each modality's kernel is scaled by

.. math::

    c_m = \Big(\frac{1}{N}\sum_{i=1}^{N} k_m(x_i, x_i)\Big)^{-1},

the inverse mean of its diagonal over the ``N`` fit rows of all tasks (the labelled rows
of the training and validation splits), so that the *mean training diagonal* of
:math:`c_m k_m` is 1 (trace normalisation): kernels of blocks of different widths enter the
weighted sum :math:`\sum_m \eta_{tm} c_m k_m` on one scale, and the kernel weights
:math:`\eta` are comparable across modalities and tasks. One constant per modality (not per
task) keeps the tasks' :math:`\eta` comparable, which the regulariser needs. For the RBF
and cosine kernels the diagonal is 1 (cosine: 0 for an all-zero block row), so
:math:`c_m = 1` (or the inverse share of non-zero rows); for the linear kernel
:math:`c_m = 1 / \overline{\|x_m\|^2}`. A block whose diagonal is 0 throughout gets
:math:`c_m = 1`. The constants are stored in the parameters (``kernel_scale [P]``) and the
very same constants are used in the objective, its gradient and every prediction; the
original project instead divides each kernel matrix by its own maximum, which differs
between the training Gram matrix and a test matrix.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

KERNEL_KINDS = ("rbf", "linear", "cosine")
_dot = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)


def modality_mask(modalities, num_columns: int, dtype=np.float64) -> np.ndarray:
    """``mask [P, q]``: 1 where column ``j`` lies in modality ``m``'s block ``[start, stop)``.

    Args:
        modalities: ``(name, start, stop)`` blocks (a schema's ``modalities``).
        num_columns: ``q``.

    Raises:
        ValueError: when there is no modality, or the blocks do not cover ``0..q-1`` exactly once.
    """
    if not modalities:
        raise ValueError("MTMKL needs at least one modality (feature block); the data have none")
    mask = np.zeros((len(modalities), num_columns), dtype)
    for m, (_, start, stop) in enumerate(modalities):
        mask[m, int(start):int(stop)] = 1.0
    if not np.all(mask.sum(axis=0) == 1.0):
        raise ValueError(f"the modalities {[tuple(b) for b in modalities]} do not cover the {num_columns} "
                         "feature columns exactly once")
    return mask


def modality_grams(
    A: Float[Array, "a q"],
    B: Float[Array, "b q"],
    mask: Float[Array, "P q"],
    gamma: Float[Array, " P"],
    kind: str,
) -> Float[Array, "P a b"]:
    r"""Unscaled per-modality kernel matrices :math:`[k_m(a_i, b_j)]_{m, i, j}`.

    Args:
        A, B: rows ``[a, q]`` and ``[b, q]``.
        mask: modality membership ``[P, q]`` (:func:`modality_mask`).
        gamma: RBF :math:`\gamma_m` ``[P]`` (unused by the other kernels).
        kind: ``"rbf"``, ``"linear"`` or ``"cosine"`` (static).

    Returns:
        ``[P, a, b]``. The squared distances of the RBF kernel are
        :math:`\|a_m\|^2 + \|b_m\|^2 - 2 a_m^T b_m`, clipped at 0 (the rows are normalised
        features, near the origin, so the cancellation is mild).
    """
    cross = jnp.einsum("iq,jq,pq->pij", A, B, mask, precision=lax.Precision.HIGHEST)  # a_m^T b_m
    if kind == "linear":
        return cross
    sq_a = _dot(mask, (A * A).T)  # [P, a]
    sq_b = _dot(mask, (B * B).T)  # [P, b]
    if kind == "rbf":
        distance = jnp.maximum(sq_a[:, :, None] + sq_b[:, None, :] - 2.0 * cross, 0.0)
        return jnp.exp(-gamma[:, None, None] * distance)
    if kind == "cosine":
        inv_a = jnp.where(sq_a > 0, lax.rsqrt(jnp.where(sq_a > 0, sq_a, 1.0)), 0.0)
        inv_b = jnp.where(sq_b > 0, lax.rsqrt(jnp.where(sq_b > 0, sq_b, 1.0)), 0.0)
        return cross * inv_a[:, :, None] * inv_b[:, None, :]
    raise ValueError(f"kernel must be one of {KERNEL_KINDS}, not {kind!r}")


def modality_diagonal(
    X: Float[Array, "n q"], mask: Float[Array, "P q"], kind: str
) -> Float[Array, "P n"]:
    r"""The diagonals :math:`k_m(x_i, x_i)` ``[P, n]`` without forming any matrix.

    RBF: 1; linear: :math:`\|x_{i,m}\|^2`; cosine: 1 where :math:`\|x_{i,m}\| > 0`, else 0.
    """
    sq = _dot(mask, (X * X).T)
    if kind == "rbf":
        return jnp.ones_like(sq)
    if kind == "linear":
        return sq
    if kind == "cosine":
        return (sq > 0).astype(sq.dtype)
    raise ValueError(f"kernel must be one of {KERNEL_KINDS}, not {kind!r}")


def kernel_scale(
    X: Float[Array, "N q"], mask: Float[Array, "P q"], kind: str
) -> Float[Array, " P"]:
    r"""The normalisation constants :math:`c_m = 1 / \mathrm{mean}_i\,k_m(x_i, x_i)` ``[P]`` (module docstring).

    Args:
        X: the fit rows of all tasks ``[N, q]`` (and only those).
        mask: modality membership ``[P, q]``.
        kind: the kernel.

    Returns:
        ``[P]``; 1 for a modality whose diagonal is 0 on every row (or when ``N = 0``).
    """
    mean = jnp.mean(modality_diagonal(X, mask, kind), axis=1) if X.shape[0] else jnp.zeros(mask.shape[0], X.dtype)
    return jnp.where(mean > 0, 1.0 / jnp.where(mean > 0, mean, 1.0), 1.0)


def scaled_grams(A, B, mask, gamma, scale, kind: str) -> Float[Array, "P a b"]:
    r""":math:`c_m k_m(a_i, b_j)` ``[P, a, b]``: :func:`modality_grams` times ``scale [P]``.

    The one function through which training (the Gram matrices of the solver) and
    prediction (kernels between new rows and the support rows) see the kernels.
    """
    return modality_grams(A, B, mask, gamma, kind) * scale[:, None, None]


def default_gamma(mask: np.ndarray, gamma: float | None) -> np.ndarray:
    r"""RBF :math:`\gamma_m` per modality ``[P]``: ``gamma`` for all, or (``None``) :math:`1 / (2 d_m)`.

    :math:`d_m` is the block width: on standardised features
    :math:`E\|x_m - x'_m\|^2 \approx 2 d_m`, so the default puts a typical pair at
    :math:`k \approx e^{-1}` whatever the width of the block.
    """
    widths = np.asarray(mask).sum(axis=1)
    if gamma is not None:
        return np.full(widths.shape, float(gamma))
    return 1.0 / (2.0 * np.maximum(widths, 1.0))


__all__ = ["KERNEL_KINDS", "default_gamma", "kernel_scale", "modality_diagonal", "modality_grams",
           "modality_mask", "scaled_grams"]
