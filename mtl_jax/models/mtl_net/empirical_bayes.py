r"""Empirical Bayes for the scale of the head deviations' prior in MAP training.

The NumPyro program (:mod:`.program`) gives task ``k``'s head deviation the prior
:math:`\zeta_k = (\delta_k, \epsilon_k) / \mathbf u \sim \mathcal N(0, \tau^2 I_D)`, with
:math:`\mathbf u = (1/\sqrt H, \dots, 1/\sqrt H, 1)` and :math:`D = H + 1`.
MAP training with ``l2_task=None`` learns :math:`\tau` from the data instead of fixing an
L2 weight. With the trunk held fixed, each task's head is a GLM on the features
:math:`\tilde\phi_j = (h(x_j), 1) \circ \mathbf u` with coefficients :math:`v + \zeta_k`,
:math:`v = (u, c) / \mathbf u` the standardised population head. The MAP objective holds,
per task, :math:`(\sum_j w_j \ell_j + \lVert\zeta_k\rVert^2 / (2\tau^2)) / m_k`, and once
the population term :math:`\tfrac12\sum_i \pi_i v_i^2` (``population_precision``, from the
model's penalty).
:func:`refresh` alternates, ``rounds`` times,

* one Newton step per task on the penalised negative log-likelihood,
  :math:`\zeta_k \leftarrow \zeta_k - (G_k + I/\tau^2)^{-1}(g_k + \zeta_k/\tau^2)` with
  :math:`g_k = \sum_j w_j r_j \tilde\phi_j` and :math:`G_k = \sum_j w_j s_j \tilde\phi_j
  \tilde\phi_j^T` (Bernoulli: :math:`r = p - y`, :math:`s = p(1-p)`; Gaussian:
  :math:`r = (\eta - y)e^{-2 s_k}`, :math:`s = e^{-2 s_k}`);
* MacKay's evidence update :math:`\tau^2 = \sum_k \lVert\zeta_k\rVert^2 / \gamma` with
  :math:`\gamma = \sum_{k,i} \lambda_{ki}\tau^2 / (1 + \lambda_{ki}\tau^2)`, the number of
  deviation coordinates the data determine (:math:`\lambda_{ki}` the eigenvalues of :math:`G_k`);
* the exact minimisation of the objective along the shift :math:`v \to v + \mu`,
  :math:`\zeta_k \to \zeta_k - \mu`, which leaves every training task's fit unchanged:
  :math:`\mu = (\sum_k \zeta_k / (\tau^2 m_k) - \pi \circ v) / (\sum_k 1/(\tau^2 m_k) + \pi)`.
  Without it the population head, moved only by small gradient steps, lags behind the
  heads' centre, and the deviations (and :math:`\tau`) stay large however alike the tasks are.

The first two are the Laplace-approximate type-II maximum likelihood of :math:`\tau`
(MacKay 1992, "The evidence framework applied to classification networks"), exact for
Gaussian heads. :mod:`mtl_jax.infer.optimize` calls :func:`refresh` between training
chunks, so the trunk and the scale are learned together.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mtl_jax.linalg import segment_sum
from mtl_jax.models.mtl_net import network

SCALE_BOUNDS = (1e-3, 1e2)
"""Range of :math:`\\tau`: below it the heads are the population head to float32 precision."""

ROW_CHUNK = 4096
"""Rows per block when summing the per-task outer products (bounds memory at ``ROW_CHUNK * D * D``)."""


def prior_unit(width: int, dtype) -> Float[Array, " D"]:
    """:math:`\\mathbf u = (1/\\sqrt H, \\dots, 1/\\sqrt H, 1)` for ``H = width``."""
    return jnp.concatenate([jnp.full((width,), 1.0 / jnp.sqrt(width), dtype), jnp.ones((1,), dtype)])


def standardised_deviations(params: network.NetParams) -> Float[Array, "K D"]:
    """:math:`\\zeta_k = (\\delta_k, \\epsilon_k) / \\mathbf u` ``[K, D]``, whose prior is :math:`\\mathcal N(0, \\tau^2 I)`."""
    deviations = jnp.concatenate([params.head_weight, params.head_bias[:, None]], axis=1)
    return deviations / prior_unit(params.head_weight.shape[1], deviations.dtype)


def task_gram(phi: Float[Array, "n D"], weight: Float[Array, " n"], task: Int[Array, " n"],
              num_tasks: int) -> Float[Array, "K D D"]:
    """:math:`G_k = \\sum_{j \\in k} w_j \\phi_j \\phi_j^T`, summed over blocks of :data:`ROW_CHUNK` rows."""
    n, D = phi.shape
    chunk = min(ROW_CHUNK, n)
    pad = -n % chunk
    phi = jnp.pad(phi, ((0, pad), (0, 0))).reshape(-1, chunk, D)
    weight = jnp.pad(weight, (0, pad)).reshape(-1, chunk)
    task = jnp.pad(jnp.minimum(task, num_tasks - 1), (0, pad)).reshape(-1, chunk)

    def add_block(total, block):
        f, w, t = block
        return total + segment_sum(w[:, None, None] * f[:, :, None] * f[:, None, :], t, num_tasks), None

    total, _ = jax.lax.scan(add_block, jnp.zeros((num_tasks, D, D), phi.dtype), (phi, weight, task))
    return total


def refresh(params: network.NetParams, X, y, task, binary, row_weight, activation: str,
            population_precision: Float[Array, " D"], rounds: int = 5) -> network.NetParams:
    """The parameters with the head deviations and :math:`\\log\\tau` refitted (module docstring).

    Args:
        params: the current parameters (the trunk and the noise sds are kept).
        X, y, task, binary: the rows' features ``[n, q]``, labels ``[n]``, tasks ``[n]`` and
            Bernoulli flags ``[n]``.
        row_weight: each row's weight ``[n]`` (training rows with an observed label).
        activation: the trunk's activation.
        population_precision: :math:`\\pi` ``[D]``, the curvature of the objective's
            penalty on the standardised population head :math:`v`.
        rounds: Newton-and-evidence alternations.
    """
    K, H = params.head_weight.shape
    dtype = params.head_weight.dtype
    unit = prior_unit(H, dtype)
    h = network.features(params, X, activation)
    phi = jnp.concatenate([h, jnp.ones((h.shape[0], 1), dtype)], axis=1) * unit
    known = jnp.minimum(task, K - 1)
    precision = jnp.exp(-2.0 * params.log_noise_sd[known])
    row_weight = jnp.where(task < K, row_weight, 0.0)
    count = jnp.maximum(segment_sum(row_weight, known, K), 1.0)
    eye = jnp.eye(H + 1, dtype=dtype)

    def newton_evidence_and_shift(_, carry):
        zeta, v, tau = carry
        eta = phi @ v + jnp.einsum("nd,nd->n", phi, zeta[known])
        p = jax.nn.sigmoid(eta)
        residual = jnp.where(binary, p - y, (eta - y) * precision)
        curvature = jnp.where(binary, p * (1.0 - p), precision)
        gradient = segment_sum((row_weight * residual)[:, None] * phi, known, K)
        gram = task_gram(phi, row_weight * curvature, known, K)
        zeta = zeta - jnp.linalg.solve(gram + eye / tau**2, (gradient + zeta / tau**2)[..., None])[..., 0]
        eigenvalues = jnp.clip(jnp.linalg.eigvalsh(gram), 0.0, None)
        determined = jnp.sum(eigenvalues * tau**2 / (1.0 + eigenvalues * tau**2))
        tau = jnp.clip(jnp.sqrt(jnp.sum(zeta**2) / jnp.maximum(determined, jnp.finfo(dtype).tiny)), *SCALE_BOUNDS)
        task_precision = 1.0 / (tau**2 * count)
        shift = ((task_precision @ zeta - population_precision * v)
                 / (jnp.sum(task_precision) + population_precision))
        return zeta - shift, v + shift, tau

    v0 = jnp.append(params.population_weight, params.population_bias) / unit
    tau0 = jnp.clip(jnp.exp(params.head_log_scale), *SCALE_BOUNDS)
    zeta, v, tau = jax.lax.fori_loop(0, rounds, newton_evidence_and_shift, (standardised_deviations(params), v0, tau0))
    deviations, population = zeta * unit, v * unit
    return eqx.tree_at(lambda p: (p.head_weight, p.head_bias, p.population_weight, p.population_bias,
                                  p.head_log_scale), params,
                       (deviations[:, :H], deviations[:, H], population[:H], population[H], jnp.log(tau)))
