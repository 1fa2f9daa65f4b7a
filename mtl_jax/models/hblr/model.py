r"""The Dirichlet-process hierarchical Bayesian logistic regression (``"hblr"``) on the model protocol.

Xue, Liao, Carin & Krishnapuram (2007), *Multi-task learning for classification with
Dirichlet process priors*: tasks (people) share logistic regressions through a truncated
stick-breaking DP: each task belongs to one of ``K`` clusters, each cluster has its own
weights :math:`W_k` (intercept first), and the number of clusters used is learned. The
model and its closed-form variational Bayes are in :mod:`.vb`; the NumPyro program
(memberships summed out) for ``"svi"`` and ``"nuts"`` in :mod:`.program`.

**Defaults.** Covariates are standardised by the data layer, so the prior
:math:`W_k \sim \mathcal N(0, \operatorname{diag}(\sigma_b^2, \sigma_w^2, \dots))` uses
``prior_sd`` :math:`\sigma_w = 2` on the slopes (a one-sd change of a feature moves the
log-odds by up to about :math:`\pm 4` a priori) and ``intercept_sd`` :math:`\sigma_b = 3`
(base rates from about 0.25% to 99.75% within 2 sd); :math:`\alpha \sim \operatorname{Gamma}(1, 1)`
(``alpha_shape``, ``alpha_rate``; rate parameterisation). The truncation is
``clusters`` or, by default, :func:`default_clusters`: :math:`K = \min(M, \max(2, \lceil 2\sqrt M\,\rceil))`
for ``M`` training tasks (7 for 12 tasks, 20 for 100): DP posteriors use far fewer
clusters than tasks, and :meth:`HBLR.check` warns when every cluster is occupied.

**Rows.** Fits use the rows with an observed label of the training and validation
splits (as the baselines do); :meth:`score` and BIC count those.

**Prediction.** With :math:`\mu = m_k^T x`, :math:`\sigma^2 = x^T S_k x` (probit approximation)

.. math::

    p(y = 1 \mid x, m) = \sum_k \phi_{mk}\,\sigma\!\big(\mu / \sqrt{1 + \pi\sigma^2/8}\big);

a task unseen in training uses ``cluster_weight`` (:math:`E_q[\pi_k]`) for :math:`\phi_m`.
A point from SVI/NUTS draws (:func:`.program.from_sites`: ``cov = 0``) takes the same path.

**Bad inputs.** A task whose label is not binary raises
:class:`~mtl_jax.data.tabular.DataError` naming it (when the data are encoded for the
model, :meth:`design`). A task with a single class, or with one row, is fine: the prior on
its cluster's :math:`W_k` keeps everything finite, the task goes to the cluster whose
weights explain its few labels best (weighted by the cluster sizes), and it is predicted
with that cluster's weights. A task without any labelled training row gets the prior
cluster weights' posterior, :math:`\phi_m \propto \exp E[\log\pi_k]`.

**Score.** :meth:`score` of a VB posterior is its ELBO (what ranks the restarts; a lower
bound on :math:`\log p(y)`); a point (``cov = 0``: SVI/NUTS) has no :math:`q(W)`, so it is
scored by its marginal log-likelihood :math:`\sum_m\log\sum_k\pi_k\prod_{n\in m}p(y_n\mid W_k)`
(the NumPyro program's likelihood). The two are not comparable with each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.data.personal import PersonData
from mtl_jax.linalg import is_positive_definite
from mtl_jax.models.baselines.common import (
    PersonBaseline,
    RowArrays,
    bernoulli_log_likelihood,
    masked_y,
    person_labels,
    require_binary,
)
from mtl_jax.models.hblr import program, vb
from mtl_jax.models.hblr.vb import HBLRParams, Prior
from mtl_jax.models.protocol import register


def default_clusters(num_tasks: int) -> int:
    r"""The default truncation :math:`K = \min(M, \max(2, \lceil 2\sqrt M\,\rceil))` (at least 1)."""
    return max(1, min(num_tasks, max(2, math.ceil(2.0 * math.sqrt(num_tasks)))))


def occupied(membership: np.ndarray) -> np.ndarray:
    """Occupied clusters (``[..., K]`` bool): the most probable cluster of at least one task."""
    membership = np.asarray(membership)
    K = membership.shape[-1]
    best = np.argmax(membership, axis=-1)  # [..., M]
    return np.any(best[..., None] == np.arange(K), axis=-2)


@register
@dataclasses.dataclass(frozen=True)
class HBLR(PersonBaseline):
    """Dirichlet-process HBLR (module docstring).

    Attributes:
        clusters: the truncation ``K``; ``None``: :func:`default_clusters` of the training tasks.
        prior_sd: prior sd of the slopes (standardised covariates), default 2.
        intercept_sd: prior sd of the intercepts, default 3.
        alpha_shape, alpha_rate: :math:`\\tau_{10}, \\tau_{20}` of the Gamma prior of the DP
            concentration (rate parameterisation), default 1 and 1.
    """

    clusters: int | None = None
    prior_sd: float = 2.0
    intercept_sd: float = 3.0
    alpha_shape: float = 1.0
    alpha_rate: float = 1.0

    name: ClassVar[str] = "hblr"
    methods: ClassVar[frozenset] = frozenset({"vb", "svi", "nuts"})

    def __post_init__(self):
        if self.clusters is not None and (int(self.clusters) != self.clusters or self.clusters < 1):
            raise ValueError(f"clusters must be a positive integer, not {self.clusters!r}")
        values = (self.prior_sd, self.intercept_sd, self.alpha_shape, self.alpha_rate)
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError("prior_sd, intercept_sd, alpha_shape and alpha_rate must be positive and finite")

    # ------------------------------------------------------------------ data
    def design(self, data) -> PersonData:
        """The per-person data, checked: a task whose label is not binary raises DataError naming it."""
        data = super().design(data)
        require_binary(data, self.name)
        return data

    def num_clusters(self, num_tasks: int) -> int:
        """``K``: ``clusters`` or :func:`default_clusters` of ``num_tasks`` training tasks."""
        return int(self.clusters) if self.clusters is not None else default_clusters(num_tasks)

    def labels(self, data: PersonData) -> dict[str, Any]:
        """The baselines' labels plus ``clusters`` (``K``)."""
        return {**person_labels(data), "clusters": self.num_clusters(data.num_tasks)}

    def prior(self, num_features: int, dtype) -> Prior:
        """The :class:`~.vb.Prior` for ``d = num_features + 1`` (intercept first)."""
        var = jnp.concatenate([jnp.full((1,), self.intercept_sd ** 2, dtype),
                               jnp.full((num_features,), self.prior_sd ** 2, dtype)])
        return Prior(jnp.zeros((num_features + 1,), dtype), var, jnp.asarray(self.alpha_shape, dtype),
                     jnp.asarray(self.alpha_rate, dtype))

    def rows(self, design: PersonData, num_tasks: int | None = None) -> vb.Rows:
        """The rows VB and the program use (:func:`.vb.rows`), tasks ``>= num_tasks`` left out."""
        M = design.num_tasks if num_tasks is None else num_tasks
        return vb.rows(design.X, design.y, design.weight, design.split, design.task, M)

    # ------------------------------------------------------------ parameters
    def init(self, key: PRNGKeyArray, design: PersonData) -> HBLRParams:
        """A random start: memberships :math:`\\phi_m \\sim \\operatorname{Dirichlet}(1)`, :math:`q(W)`
        at the prior, :math:`E[\\alpha]` its prior mean and :math:`q(v)` updated from :math:`\\phi`."""
        M, q = design.num_tasks, design.X.shape[1]
        K = self.num_clusters(M)
        dtype = design.X.dtype
        prior = self.prior(q, dtype)
        membership = jax.random.dirichlet(key, jnp.ones((K,), dtype), (M,)).astype(dtype)
        params = HBLRParams(mean=jnp.broadcast_to(prior.mean, (K, q + 1)),
                            cov=jnp.broadcast_to(jnp.diag(prior.var), (K, q + 1, q + 1)),
                            membership=membership, cluster_weight=jnp.full((K,), 1.0 / K, dtype),
                            stick_a=jnp.ones((K - 1,), dtype), stick_b=jnp.ones((K - 1,), dtype),
                            alpha=prior.alpha_shape / prior.alpha_rate)
        return vb.update_sticks(params)

    def params_like(self, labels: dict) -> HBLRParams:
        """Parameters shaped like a fit's (values irrelevant)."""
        M, K, d = len(labels["task_names"]), int(labels["clusters"]), len(labels["columns"]) + 1
        return HBLRParams(np.zeros((K, d)), np.zeros((K, d, d)), np.zeros((M, K)), np.zeros(K),
                          np.zeros(K - 1), np.zeros(K - 1), np.zeros(()))

    def num_parameters(self, design: PersonData) -> int:
        """Cluster weights and mixture weights: :math:`K d + K - 1`."""
        K, d = self.num_clusters(design.num_tasks), design.X.shape[1] + 1
        return K * d + K - 1

    def population(self, params: HBLRParams):
        """``(mean, cov, cluster_weight)``: the clusters (no per-task leaves)."""
        return params.mean, params.cov, params.cluster_weight

    # ----------------------------------------------------------------- VB
    def em_step(self, params: HBLRParams, design: PersonData):
        """One VB sweep (:func:`.vb.sweep`): ``(new_params, ELBO at params)``."""
        M = params.membership.shape[0]
        return vb.sweep(params, self.rows(design, M), self.prior(design.X.shape[1], design.X.dtype))

    def valid(self, params: HBLRParams):
        r"""Whether ``params`` is a VB posterior (EM's acceleration rejects others): :math:`S_k`
        positive definite, memberships and cluster weights non-negative, :math:`g_1, g_2` and
        :math:`E[\alpha]` positive."""
        return (jnp.all(is_positive_definite(params.cov)) & jnp.all(params.membership >= 0)
                & jnp.all(params.cluster_weight >= 0) & jnp.all(params.stick_a > 0) & jnp.all(params.stick_b > 0)
                & (params.alpha > 0))

    def elbo(self, params: HBLRParams, design: PersonData) -> Float[Array, ""]:
        """The ELBO of a VB posterior (:func:`.vb.elbo`, optimal :math:`\\xi`)."""
        M = params.membership.shape[0]
        return vb.elbo(params, self.rows(design, M), self.prior(design.X.shape[1], design.X.dtype))

    def marginal_log_likelihood(self, params: HBLRParams, design: PersonData) -> Float[Array, ""]:
        """:math:`\\sum_m\\log\\sum_k \\pi_k\\prod_{n\\in m}p(y_n\\mid m_k)` at the point
        (``mean``, ``cluster_weight``)."""
        M = params.membership.shape[0]
        joint = (jnp.log(params.cluster_weight)[None]
                 + program.task_log_likelihood(params.mean, self.rows(design, M), M))
        return jnp.sum(jax.nn.logsumexp(joint, axis=-1))

    def score(self, params: HBLRParams, design: PersonData) -> Float[Array, ""]:
        """The ELBO of a VB posterior; the marginal log-likelihood of a point (``cov = 0``; module docstring)."""
        return jax.lax.cond(jnp.all(params.cov == 0), self.marginal_log_likelihood, self.elbo, params, design)

    # ------------------------------------------------------------ prediction
    def _row_answers(self, params: HBLRParams, rows: RowArrays):
        """Per row: :math:`p(y = 1)` (probit approximation, module docstring) and the log-likelihood of its label."""
        mu, var = vb.linear_moments(params, vb.with_intercept(rows.X))
        logit = mu / jnp.sqrt(1.0 + jnp.pi * var / 8.0)
        M = params.membership.shape[0]
        known = rows.task < M
        log_w = jnp.where(known[:, None], jnp.log(params.membership[jnp.clip(rows.task, 0, M - 1)]),
                          jnp.log(params.cluster_weight)[None])
        log_p1 = jax.nn.logsumexp(log_w + jax.nn.log_sigmoid(logit), axis=1)
        log_p0 = jax.nn.logsumexp(log_w + jax.nn.log_sigmoid(-logit), axis=1)
        return jnp.exp(log_p1), bernoulli_log_likelihood(log_p1, log_p0, masked_y(rows))

    # --------------------------------------------------------------- reports
    def _coefficient_names(self, labels: dict) -> list[str]:
        return ["(intercept)", *labels["columns"]]

    def named_parameters(self, params: HBLRParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """``alpha`` (:math:`E[\\alpha]` or a draw), ``cluster_weight[k]`` and ``W[k,<coefficient>]``
        (clusters numbered from 1; ``"(intercept)"`` first)."""
        del leading  # "..." indexing keeps leading axes
        mean, weight = np.asarray(params.mean), np.asarray(params.cluster_weight)
        named = {"alpha": np.asarray(params.alpha)}
        names = self._coefficient_names(labels)
        for k in range(weight.shape[-1]):
            named[f"cluster_weight[{k + 1}]"] = weight[..., k]
            named.update({f"W[{k + 1},{name}]": mean[..., k, j] for j, name in enumerate(names)})
        return named

    def report(self, params: HBLRParams, labels: dict) -> dict[str, Any]:
        """``clusters`` (per task: the most probable cluster, 1-based, and its probabilities),
        ``occupied_clusters``, ``cluster_weights``, ``alpha`` and each cluster's coefficients by name."""
        membership = np.asarray(params.membership)
        names = self._coefficient_names(labels)
        mean = np.asarray(params.mean)
        return {
            "clusters": {task: {"cluster": int(np.argmax(membership[m])) + 1,
                                "probabilities": [float(p) for p in membership[m]]}
                         for m, task in enumerate(labels["task_names"])},
            "occupied_clusters": int(np.sum(occupied(membership))),
            "cluster_weights": [float(w) for w in np.asarray(params.cluster_weight)],
            "alpha": float(np.asarray(params.alpha)),
            "cluster_coefficients": {str(k + 1): {name: float(mean[k, j]) for j, name in enumerate(names)}
                                     for k in range(mean.shape[0])},
        }

    def task_tables(self, params: HBLRParams, design: PersonData, labels: dict) -> dict[str, pd.DataFrame]:
        """``class_probabilities``: each training task's cluster probabilities, columns ``"1" .. "K"``."""
        membership = np.asarray(params.membership)
        return {"class_probabilities": pd.DataFrame(
            membership, index=pd.Index(labels["task_names"], name="task"),
            columns=[str(k + 1) for k in range(membership.shape[1])])}

    def check(self, params: HBLRParams, design: PersonData, labels: dict) -> list[str]:
        """Non-finite parameters; every one of ``K > 1`` clusters occupied (the truncation may bind)."""
        leaves = jax.tree_util.tree_leaves(params)
        if not all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves):
            return ["non-finite parameters: the fit failed numerically"]
        used = int(np.sum(occupied(params.membership)))
        K = np.asarray(params.membership).shape[1]
        if K > 1 and used == K:
            return [f"all {K} clusters are occupied: the truncation may bind; fit with more --clusters"]
        return []

    def align(self, params: HBLRParams, reference: HBLRParams) -> HBLRParams:
        """``params`` with its clusters permuted to best match ``reference`` (Hungarian matching on
        the means). Predictions and a point's score are unchanged; the stick factors :math:`q(v)`
        are tied to the stick order and are left as they are (a VB posterior's ELBO is not
        invariant under permutation, which is why only points (draws) are aligned in practice)."""
        from mtl_jax.metrics import match_components

        order = np.asarray(match_components(np.asarray(params.mean), np.asarray(reference.mean)))
        return params._replace(mean=params.mean[order], cov=params.cov[order],
                               membership=params.membership[..., order],
                               cluster_weight=params.cluster_weight[order])

    # -------------------------------------------------------------- NumPyro
    def numpyro_model(self, design: PersonData, centred: bool = False) -> None:
        """The program of :mod:`.program` (``centred`` is irrelevant: no location-scale task effects)."""
        del centred
        M = design.num_tasks
        program.numpyro_model(self.prior(design.X.shape[1], design.X.dtype), self.rows(design, M), M,
                              self.num_clusters(M))

    def site_values(self, params: HBLRParams) -> dict[str, Array]:
        """The sampled sites at ``params`` (:func:`.program.site_values`)."""
        return program.site_values(params)

    def param_sites(self) -> tuple[str, ...]:
        """The sites :meth:`from_sites` reads."""
        return program.PARAM_SITES

    def from_sites(self, samples: dict[str, Array]) -> HBLRParams:
        """Point parameters from samples (:func:`.program.from_sites`)."""
        return program.from_sites(samples)

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model hblr``."""
        group = parser.add_argument_group(f"{cls.name} options")
        group.add_argument("--clusters", type=int, default=None, metavar="K",
                           help="DP truncation K (default min(M, max(2, ceil(2 sqrt(M)))) for M tasks)")
        group.add_argument("--prior-sd", type=float, default=2.0, help="prior sd of the slopes (default 2)")
        group.add_argument("--intercept-sd", type=float, default=3.0, help="prior sd of the intercepts (default 3)")
        group.add_argument("--alpha-shape", type=float, default=1.0,
                           help="shape of the Gamma prior of the DP concentration (default 1)")
        group.add_argument("--alpha-rate", type=float, default=1.0,
                           help="rate of the Gamma prior of the DP concentration (default 1)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace):
        """The model of the parsed options."""
        return cls(clusters=args.clusters, prior_sd=args.prior_sd, intercept_sd=args.intercept_sd,
                   alpha_shape=args.alpha_shape, alpha_rate=args.alpha_rate)


__all__ = ["HBLR", "default_clusters"]
