r"""**Multitask multiple-kernel learning** (``"mtmkl"``, :class:`MTMKL`), after Kandemir et al.
(2014) as used by the PersonalizedMultitaskLearning project, on per-person data.

Each task :math:`t` is an LS-SVM (labels :math:`\pm1`, regularisation ``C``) on its own
kernel :math:`K_t = \sum_m \eta_{tm}\,c_m k_m`, a convex combination (:math:`\eta_t` on the
simplex) of one normalised kernel per **modality** (feature block of the data's schema,
:mod:`.kernels`). The weights are tied across tasks by a regulariser of weight ``V`` and
learnt by minimising :math:`J(\eta) = \sum_t D_t(\eta_t) + V R(\eta)` (:mod:`.solver`:
the maths, Danskin's gradient and the optimisers). ``V = 0`` gives
independent multiple-kernel learners; a large ``V`` with ``"pull"`` gives one shared
weighting.

Fitted on the labelled rows of the training and validation splits (as the other
per-person baselines, :mod:`mtl_jax.models.baselines.common`). Answers:

* decision scores :math:`f_t(x) = \sum_i a_{ti}\sum_m\eta_{tm}c_m k_m(x_i, x) + b_t`
  (``score_columns``: ``decision_score``), with the normalisation constants :math:`c_m`
  of the training rows stored in the parameters and used unchanged for new rows;
* probabilities by Platt scaling of the in-sample scores,
  :math:`P(y=1\mid x) = \sigma(a_t f_t(x) + c_t)` (as ``"lssvm"``), so that both rank;
* a task **unseen** in training gets the average of the task probabilities
  :math:`\frac1K\sum_t\sigma(a_t f_t(x) + c_t)` (its decision score: the average of the
  task scores), as ``"lssvm"``.

**Bad inputs** (as the baselines): a task whose label is not binary, or a task with fewer
than two classes among its fit rows, raises :class:`~mtl_jax.data.tabular.DataError`
naming it. A task with a single fit row has one class, so it is refused the same way.

**Names.** ``C`` is the LS-SVM regularisation (the ``"lssvm"`` baseline calls it
``gamma``); ``gamma`` here is the RBF kernel's :math:`\gamma` of
:math:`\exp(-\gamma\|x_m - x'_m\|^2)`, as in the original project.

**Memory**: the Gram matrices of the fit, ``K x P x m x m`` (``m`` the largest task's fit rows).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.data.personal import PersonData
from mtl_jax.models.baselines.common import (
    bernoulli_log_likelihood,
    fit_rows,
    masked_y,
    person_labels,
    PersonBaseline,
    population_branch,
    require_binary,
    require_two_classes,
    RowArrays,
)
from mtl_jax.models.baselines.solvers import pad_by_task
from mtl_jax.models.mtmkl.kernels import KERNEL_KINDS, default_gamma, kernel_scale, modality_mask, scaled_grams
from mtl_jax.models.mtmkl.solver import REGULARISERS, fit_mtmkl
from mtl_jax.models.protocol import register


class MTMKLParams(NamedTuple):
    """A fitted MTMKL: per-task LS-SVMs on weighted kernels, their kernel weights and the kernels.

    Attributes:
        support: each task's fit rows ``[K, m, q]`` (zeros on padding).
        alpha: dual solutions :math:`a_t` ``[K, m]`` (0 on padding).
        b: biases ``[K]``.
        eta: kernel weights ``[K, P]`` (each row on the simplex).
        modality_mask: column membership of each modality ``[P, q]`` (0/1).
        gamma: RBF :math:`\\gamma_m` ``[P]`` (unused by the other kernels).
        kernel_scale: normalisation constants :math:`c_m` ``[P]`` from the training rows.
        platt_slope: Platt's :math:`a_t` ``[K]``.
        platt_intercept: Platt's :math:`c_t` ``[K]``.
    """

    support: Array
    alpha: Array
    b: Array
    eta: Array
    modality_mask: Array
    gamma: Array
    kernel_scale: Array
    platt_slope: Array
    platt_intercept: Array


@register
@dataclasses.dataclass(frozen=True)
class MTMKL(PersonBaseline):
    """Multitask multiple-kernel learning (module docstring).

    Attributes:
        kernel: ``"rbf"``, ``"linear"`` or ``"cosine"``: the kernel of every modality.
        gamma: RBF :math:`\\gamma`; ``None``: :math:`1/(2 d_m)` per modality of width
            :math:`d_m` (:func:`.kernels.default_gamma`).
        C: LS-SVM regularisation (larger: less regularised).
        V: weight of the regulariser tying the tasks' kernel weights (``>= 0``).
        regulariser: ``"pull"`` (towards the mean weights) or ``"similarity"`` (the
            original's reward of similar weights).
        platt_C: inverse L2 penalty on Platt's slope.
        tol: relative change of the objective that stops the optimiser.
        max_iter: most optimiser steps.
    """

    kernel: str = "rbf"
    gamma: float | None = None
    C: float = 1.0
    V: float = 0.1
    regulariser: str = "pull"
    platt_C: float = 100.0
    tol: float = 1e-7
    max_iter: int = 500

    name: ClassVar[str] = "mtmkl"
    methods: ClassVar[frozenset] = frozenset({"map"})

    def __post_init__(self):
        if self.kernel not in KERNEL_KINDS:
            raise ValueError(f"kernel must be one of {list(KERNEL_KINDS)}, not {self.kernel!r}")
        if self.regulariser not in REGULARISERS:
            raise ValueError(f"regulariser must be one of {list(REGULARISERS)}, not {self.regulariser!r}")
        if not self.C > 0 or not self.platt_C > 0 or not self.V >= 0:
            raise ValueError(f"C and platt_C must be positive and V non-negative, got {self.C}, {self.platt_C}, "
                             f"{self.V}")
        if self.gamma is not None and not self.gamma > 0:
            raise ValueError(f"gamma must be positive (or None for 1/(2 width) per modality), not {self.gamma}")
        if not self.tol > 0 or int(self.max_iter) < 1:
            raise ValueError(f"tol must be positive and max_iter at least 1, got {self.tol}, {self.max_iter}")

    # ------------------------------------------------------------------ data
    def labels(self, data: PersonData) -> dict[str, Any]:
        """As the baselines, plus ``support_size`` (padded rows per task) and ``modalities`` (names)."""
        rows = fit_rows(data)
        counts = np.bincount(np.asarray(data.task)[rows], minlength=data.num_tasks)
        return {**person_labels(data), "support_size": max(int(counts.max(initial=0)), 1),
                "modalities": [str(name) for name, _, _ in data.schema.modalities]}

    # ------------------------------------------------------------ parameters
    def _zeros(self, K, m, q, P, dtype) -> MTMKLParams:
        return MTMKLParams(jnp.zeros((K, m, q), dtype), jnp.zeros((K, m), dtype), jnp.zeros((K,), dtype),
                           jnp.full((K, P), 1.0 / max(P, 1), dtype), jnp.zeros((P, q), dtype), jnp.ones((P,), dtype),
                           jnp.ones((P,), dtype), jnp.ones((K,), dtype), jnp.zeros((K,), dtype))

    def init(self, key: PRNGKeyArray, design: PersonData) -> MTMKLParams:
        """Uniform weights, zero dual solutions (the fit is deterministic; ``key`` is unused)."""
        del key
        labels = self.labels(design)
        return self._zeros(design.num_tasks, labels["support_size"], design.X.shape[1], len(labels["modalities"]),
                           design.X.dtype)

    def params_like(self, labels: dict) -> MTMKLParams:
        """Parameters shaped like a fit's (values irrelevant)."""
        return self._zeros(len(labels["task_names"]), labels["support_size"], len(labels["columns"]),
                           len(labels["modalities"]), jnp.float32)

    def num_parameters(self, design: PersonData) -> int:
        """One dual value per fit row, a bias and Platt's two per task, and ``P - 1`` free weights per task."""
        P = len(design.schema.modalities)
        return int(np.sum(fit_rows(design))) + 3 * design.num_tasks + (P - 1) * design.num_tasks

    def population(self, params: MTMKLParams):
        """Every parameter: an unseen task's answer averages all the task models."""
        return params

    # ------------------------------------------------------------------- fit
    def solve(self, design: PersonData, key: PRNGKeyArray | None = None):
        """Builds the kernels, optimises the weights and fits Platt scaling (``method="map"``).

        Returns:
            ``(params, converged, n_iter)``: converged when the weight optimisation met its
            stopping test, the Platt fits theirs and everything is finite; ``n_iter`` the
            optimiser's accepted steps.
        """
        del key
        params, result, platt_converged = self.fit_details(design)
        finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in params)
        return params, bool(result.converged) and bool(platt_converged) and finite, int(result.n_iter)

    def fit_details(self, design: PersonData):
        """``(params, EtaResult, platt_converged)``: :meth:`solve` with the optimiser's result
        (objective, trace, Frank-Wolfe gap) kept for inspection and tests."""
        require_binary(design, self.name)
        rows = fit_rows(design)
        task = np.asarray(design.task)
        require_two_classes(design, rows, task, list(design.task_names), self.name)
        X = np.asarray(design.X)
        mask = modality_mask(design.schema.modalities, X.shape[1], X.dtype)
        Xp, yp, wp, _ = pad_by_task(X[rows], np.asarray(design.y)[rows], np.asarray(design.weight)[rows], task[rows],
                                    design.num_tasks)
        gamma = jnp.asarray(default_gamma(mask, self.gamma), X.dtype)
        scale = kernel_scale(jnp.asarray(X[rows]), jnp.asarray(mask), self.kernel)
        result, slope, intercept, platt_converged = fit_mtmkl(
            jnp.asarray(Xp), jnp.asarray(yp), jnp.asarray(wp), jnp.asarray(mask), gamma, scale, self.kernel,
            self.C, self.V, self.regulariser, self.tol, int(self.max_iter), self.platt_C)
        params = MTMKLParams(jnp.asarray(Xp), result.alpha, result.b, result.eta, jnp.asarray(mask), gamma, scale,
                             slope, intercept)
        return params, result, platt_converged

    # ------------------------------------------------------------ likelihood
    def _task_scores(self, params: MTMKLParams, x, support, alpha, b, eta):
        """Score of one row ``x [q]`` under one task's LS-SVM."""
        grams = scaled_grams(x[None], support, params.modality_mask, params.gamma, params.kernel_scale, self.kernel)
        return jnp.dot(eta, grams[:, 0, :], precision=lax.Precision.HIGHEST) @ alpha + b

    def _own_scores(self, params: MTMKLParams, X, index):
        """Each row's score under task ``index`` ``[n]`` (rows in batches; memory ``batch x P x m``)."""
        def one_row(args):
            x, t = args
            return self._task_scores(params, x, params.support[t], params.alpha[t], params.b[t], params.eta[t])
        return lax.map(one_row, (X, index), batch_size=256)

    def _all_task_scores(self, params: MTMKLParams, X) -> Float[Array, "n K"]:
        """Every row's score under every task ``[n, K]``."""
        def one_row(x):
            return jax.vmap(lambda s, a, b, e: self._task_scores(params, x, s, a, b, e))(
                params.support, params.alpha, params.b, params.eta)
        return lax.map(one_row, X, batch_size=32)

    def _row_answers(self, params: MTMKLParams, design: RowArrays):
        """``(mean, loglik, decision score)`` per row (unseen tasks: the population answer)."""
        K = params.b.shape[0]
        seen = design.task < K
        index = jnp.where(seen, design.task, 0)
        X = jnp.asarray(design.X, params.support.dtype)
        own = self._own_scores(params, X, index)
        logit = params.platt_slope[index] * own + params.platt_intercept[index]

        def population():
            scores = self._all_task_scores(params, X)
            logits = scores * params.platt_slope + params.platt_intercept
            log_K = jnp.log(jnp.asarray(K, X.dtype))
            return (jnp.mean(scores, axis=1), jax.nn.logsumexp(jax.nn.log_sigmoid(logits), axis=1) - log_K,
                    jax.nn.logsumexp(jax.nn.log_sigmoid(-logits), axis=1) - log_K)

        pop = population_branch(jnp.any(~seen), population, (own, own, own))
        scores = jnp.where(seen, own, pop[0])
        log_p1 = jnp.where(seen, jax.nn.log_sigmoid(logit), pop[1])
        log_p0 = jnp.where(seen, jax.nn.log_sigmoid(-logit), pop[2])
        return jnp.exp(log_p1), bernoulli_log_likelihood(log_p1, log_p0, masked_y(design)), scores

    def decision_scores(self, params: MTMKLParams, design: PersonData) -> Float[Array, " n"]:
        """Each row's decision score under its task (an unseen task: the average of the task scores)."""
        return self._answers(params, design)[2]

    def score_columns(self, params: MTMKLParams, design: PersonData) -> dict[str, Array]:
        """The raw decision scores: ``decision_score`` (one label) or ``decision_score[<label>]`` per label."""
        scores = self.decision_scores(params, design).reshape(-1, design.num_labels)
        if design.num_labels == 1:
            return {"decision_score": scores[:, 0]}
        return {f"decision_score[{label}]": scores[:, j] for j, label in enumerate(design.schema.labels)}

    # --------------------------------------------------------------- reports
    def named_parameters(self, params: MTMKLParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """``eta[<task>, <modality>]`` for every task and modality, ``mean_eta[<modality>]`` and ``mean_bias``."""
        del leading
        eta = np.asarray(params.eta)
        named = {f"eta[{task}, {mod}]": eta[..., k, p] for k, task in enumerate(labels["task_names"])
                 for p, mod in enumerate(labels["modalities"])}
        named.update({f"mean_eta[{mod}]": eta[..., p].mean(axis=-1) for p, mod in enumerate(labels["modalities"])})
        named["mean_bias"] = np.asarray(params.b).mean(axis=-1)
        return named

    def report(self, params: MTMKLParams, labels: dict) -> dict[str, Any]:
        """The kernel weights per task by modality name, the kernels' constants, and per task the
        bias, Platt's slope and intercept and the number of support vectors."""
        eta = np.asarray(params.eta)
        mods = labels["modalities"]
        b, slope, intercept = (np.asarray(leaf) for leaf in (params.b, params.platt_slope, params.platt_intercept))
        support = np.sum(np.asarray(params.alpha) != 0, axis=-1)
        return {
            "kernel": self.kernel, "regulariser": self.regulariser, "C": self.C, "V": self.V,
            "gamma": {mod: float(v) for mod, v in zip(mods, np.asarray(params.gamma))},
            "kernel_scale": {mod: float(v) for mod, v in zip(mods, np.asarray(params.kernel_scale))},
            "eta": {task: {mod: float(eta[k, p]) for p, mod in enumerate(mods)}
                    for k, task in enumerate(labels["task_names"])},
            "task_svms": {task: {"bias": float(b[k]), "platt_slope": float(slope[k]),
                                 "platt_intercept": float(intercept[k]), "support_vectors": int(support[k])}
                          for k, task in enumerate(labels["task_names"])},
        }

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model mtmkl``."""
        group = parser.add_argument_group(f"{cls.name} options")
        group.add_argument("--kernel", choices=KERNEL_KINDS, default="rbf",
                           help="kernel of every modality (default rbf)")
        group.add_argument("--gamma", type=float, default=None,
                           help="RBF gamma of exp(-gamma |x - x'|^2) (default: 1 / (2 x modality width))")
        group.add_argument("--C", type=float, default=1.0, dest="C", help="LS-SVM regularisation (default 1)")
        group.add_argument("--V", type=float, default=0.1, dest="V",
                           help="weight of the regulariser tying the kernel weights (default 0.1)")
        group.add_argument("--regulariser", choices=REGULARISERS, default="pull",
                           help="pull (towards the mean weights, default) or similarity (the original's)")
        group.add_argument("--platt-C", type=float, default=100.0, dest="platt_C",
                           help="inverse L2 penalty on Platt's slope (default 100)")
        group.add_argument("--eta-tol", type=float, default=1e-7, dest="eta_tol",
                           help="relative change of the objective that stops the weight optimiser (default 1e-7)")
        group.add_argument("--eta-max-iter", type=int, default=500, dest="eta_max_iter",
                           help="most steps of the weight optimiser (default 500)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace):
        """The model of the parsed options."""
        return cls(kernel=args.kernel, gamma=args.gamma, C=args.C, V=args.V, regulariser=args.regulariser,
                   platt_C=args.platt_C, tol=args.eta_tol, max_iter=args.eta_max_iter)
