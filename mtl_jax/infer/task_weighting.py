r"""How per-task losses combine into one training step (multitask loss weighting).

With per-task mean losses :math:`L_k` (``K`` tasks) and the gradients
:math:`g_k = \nabla_\theta L_k` with respect to the *shared* parameters:

* ``"equal"`` — :math:`\sum_k L_k` (the joint objective :math:`\sum_i \frac1{m_i}\sum_j
  L_i(\cdot)` of the MTL overview).
* ``"uncertainty"`` (Kendall, Gal & Cipolla 2018) — learned log-variances :math:`s_k`:
  :math:`\sum_k \tfrac12 e^{-s_k} L_k + \tfrac12 s_k`.
* ``"gradnorm"`` (Chen et al. 2018) — learned weights :math:`w_k` (renormalised to
  :math:`\sum_k w_k = K`) on :math:`\sum_k w_k L_k`; the weights follow the gradient of
  :math:`\sum_k |G_k - \bar G\, r_k^\alpha|` with :math:`G_k = w_k\lVert g_k\rVert`,
  :math:`r_k = \tilde L_k / \operatorname{mean}(\tilde L)`, :math:`\tilde L_k = L_k /
  L_k(0)` and the target :math:`\bar G r_k^\alpha` held constant.
* ``"pcgrad"`` (Yu et al. 2020) — each :math:`g_i` is projected, in a random order of
  the other tasks, off every :math:`g_j` it conflicts with
  (:math:`g_i \leftarrow g_i - \frac{g_i\cdot g_j}{\lVert g_j\rVert^2} g_j` when
  :math:`g_i\cdot g_j < 0`), and the projected gradients are summed.

Every projection is onto an *original* :math:`g_j`, so PCGrad's result is a linear
combination :math:`\sum_j a_j g_j`: :func:`pcgrad_coefficients` finds :math:`a` from the
Gram matrix :math:`G_{ij} = g_i\cdot g_j` alone, and the step is the gradient of
:math:`\sum_j a_j L_j` (``a`` held constant). No per-task gradient vector is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

WEIGHTINGS = ("equal", "uncertainty", "gradnorm", "pcgrad")


def uncertainty_objective(losses: Float[Array, " K"], log_variance: Float[Array, " K"]) -> Float[Array, ""]:
    r""":math:`\sum_k \tfrac12 e^{-s_k} L_k + \tfrac12 s_k`."""
    return jnp.sum(0.5 * jnp.exp(-log_variance) * losses + 0.5 * log_variance)


def pcgrad_coefficients(gram: Float[Array, "K K"], key: PRNGKeyArray) -> Float[Array, " K"]:
    r"""``a [K]`` with :math:`\sum_i g_i^{PC} = \sum_j a_j g_j`, from :math:`G_{ij} = g_i\cdot g_j`.

    Task ``i`` keeps coefficients :math:`c_{i\cdot}` (starting at the unit vector
    :math:`e_i`); for each other task ``j`` in its own random order,
    :math:`d = c_i^T G_{\cdot j}` is :math:`g_i^{PC}\cdot g_j`, and when :math:`d < 0`,
    :math:`c_{ij} \leftarrow c_{ij} - d / G_{jj}`. Finally :math:`a = \sum_i c_{i\cdot}`.
    A task with a zero gradient (:math:`G_{jj} = 0`) is never projected on.
    """
    K = gram.shape[0]
    orders = jax.vmap(lambda k: jax.random.permutation(k, K))(jax.random.split(key, K))

    def one_task(i, order):
        def visit(position, coef):
            j = order[position]
            dot = coef @ gram[:, j]
            conflict = (j != i) & (dot < 0.0) & (gram[j, j] > 0.0)
            step = jnp.where(conflict, dot / jnp.where(gram[j, j] > 0.0, gram[j, j], 1.0), 0.0)
            return coef.at[j].add(-step)

        return jax.lax.fori_loop(0, K, visit, jax.nn.one_hot(i, K, dtype=gram.dtype))

    return jax.vmap(one_task)(jnp.arange(K), orders).sum(axis=0)


def gradnorm_weight_gradient(weights: Float[Array, " K"], grad_norms: Float[Array, " K"],
                             losses: Float[Array, " K"], initial_losses: Float[Array, " K"],
                             alpha: float) -> Float[Array, " K"]:
    r"""Gradient of :math:`\sum_k |w_k n_k - \bar G r_k^\alpha|` in :math:`w` (target constant).

    Args:
        weights: :math:`w` ``[K]``.
        grad_norms: :math:`n_k = \lVert g_k\rVert` of the unweighted losses ``[K]``.
        losses, initial_losses: :math:`L_k` now and at the first step ``[K]``.
        alpha: the restoring-force strength :math:`\alpha`.

    Returns:
        :math:`\operatorname{sign}(G_k - \bar G r_k^\alpha)\, n_k`.
    """
    G = weights * grad_norms
    ratio = losses / initial_losses
    target = jax.lax.stop_gradient(G.mean() * (ratio / ratio.mean()) ** alpha)
    return jnp.sign(G - target) * grad_norms


def renormalise(weights: Float[Array, " K"]) -> Float[Array, " K"]:
    """Weights kept positive and rescaled to sum to ``K``."""
    weights = jnp.maximum(weights, 1e-3)
    return weights * (weights.shape[0] / weights.sum())
