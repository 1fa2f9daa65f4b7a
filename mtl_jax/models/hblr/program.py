r"""The DP-HBLR as a NumPyro program (``method="svi"`` / ``"nuts"``), task memberships summed out.

With ``K`` the truncation, ``M`` training tasks and :math:`x_n` the rows with an intercept 1
first (:func:`.vb.with_intercept`):

.. math::

    W_k \sim \mathcal N(\mu_0, \Sigma_0)\ \ (\texttt{W}\ [K, d]),\qquad
    \alpha \sim \operatorname{Gamma}(\tau_{10}, \tau_{20})\ \ (\texttt{alpha}),\qquad
    v_k \sim \operatorname{Beta}(1, \alpha)\ \ (\texttt{v}\ [K-1];\ \text{no such site when } K = 1),

    \log p(y \mid W, \pi) = \sum_m \log\sum_k \pi_k \prod_{n\in m}
    \operatorname{Bernoulli}(y_n \mid \sigma(W_k^T x_n))

(one ``factor``; only rows with an observed label of splits 0 and 1 enter, as in VB).
``pi`` (``cluster_weight [K]``), the task memberships
:math:`p(c_m = k \mid y, W, \pi)` (``membership [M, K]``) and ``W`` (``mean``) are
deterministic sites, which :func:`from_sites` turns into a point :class:`~.vb.HBLRParams`
(``cov = 0``, sticks 0): its predictions go through the same path as a VB posterior's.
There are no task-level location-scale effects, so ``centred`` changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from mtl_jax.linalg import segment_sum
from mtl_jax.models.hblr.vb import HBLRParams, Prior, Rows, stick_breaking_log

PARAM_SITES = ("mean", "membership", "cluster_weight", "alpha")
"""The deterministic sites :func:`from_sites` reads."""


def task_log_likelihood(W: Array, data: Rows, num_tasks: int) -> Array:
    r""":math:`\sum_{n\in m}\log\operatorname{Bernoulli}(y_n\mid\sigma(W_k^T x_n))` ``[M, K]`` (rows that enter)."""
    eta = jnp.einsum("nd,kd->nk", data.x, W, precision=jax.lax.Precision.HIGHEST)
    return segment_sum(data.use[:, None] * jax.nn.log_sigmoid(data.s[:, None] * eta), data.task, num_tasks)


def log_weights(v: Array) -> Array:
    r""":math:`\log\pi` ``[K]`` from the sticks ``v [K-1]``."""
    return stick_breaking_log(jnp.log(v), jnp.log1p(-v))


def numpyro_model(prior: Prior, data: Rows, num_tasks: int, num_clusters: int) -> None:
    """The program of the module docstring (``prior``, ``data`` from the model)."""
    import numpyro
    import numpyro.distributions as dist

    K, d = num_clusters, prior.mean.shape[0]
    dtype = data.x.dtype
    W = numpyro.sample("W", dist.Normal(jnp.broadcast_to(prior.mean, (K, d)),
                                        jnp.broadcast_to(jnp.sqrt(prior.var), (K, d))).to_event(2))
    alpha = numpyro.sample("alpha", dist.Gamma(prior.alpha_shape, prior.alpha_rate))
    if K > 1:
        v = numpyro.sample("v", dist.Beta(jnp.ones((K - 1,), dtype), alpha).to_event(1))
        log_pi = log_weights(v)
    else:  # one cluster: no sticks (alpha then only has its prior)
        log_pi = jnp.zeros((1,), dtype)
    joint = log_pi[None] + task_log_likelihood(W, data, num_tasks)  # [M, K]
    numpyro.factor("labels", jnp.sum(jax.nn.logsumexp(joint, axis=-1)))
    numpyro.deterministic("mean", W)
    numpyro.deterministic("cluster_weight", jnp.exp(log_pi))
    numpyro.deterministic("membership", jax.nn.softmax(joint, axis=-1))


def site_values(params: HBLRParams) -> dict[str, Array]:
    r"""The sampled sites at ``params``: ``W`` = the means, ``alpha``, and ``v`` from ``cluster_weight``
    (:math:`v_k = \pi_k / (1 - \sum_{j<k}\pi_j)`, kept inside ``(0, 1)`` so that it is finite unconstrained)."""
    weight = params.cluster_weight
    dtype = weight.dtype
    left = 1.0 - jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(weight)[:-1]])
    eps = jnp.sqrt(jnp.finfo(dtype).eps)
    v = jnp.clip(weight[:-1] / jnp.maximum(left[:-1], eps), eps, 1.0 - eps)
    return {"W": params.mean, "alpha": jnp.maximum(params.alpha, eps), "v": v}


def from_sites(samples: dict[str, Array]) -> HBLRParams:
    """Point parameters from samples of :data:`PARAM_SITES` (any leading axes): ``cov`` and sticks 0."""
    mean = samples["mean"]
    weight = samples["cluster_weight"]
    zeros = jnp.zeros(weight.shape[:-1] + (weight.shape[-1] - 1,), weight.dtype)
    return HBLRParams(mean=mean, cov=jnp.zeros(mean.shape + mean.shape[-1:], mean.dtype),
                      membership=samples["membership"], cluster_weight=weight, stick_a=zeros, stick_b=zeros,
                      alpha=samples["alpha"])


__all__ = ["PARAM_SITES", "numpyro_model", "site_values", "from_sites", "task_log_likelihood", "log_weights"]
