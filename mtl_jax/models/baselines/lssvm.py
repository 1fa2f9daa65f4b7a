r"""**Per-task least-squares SVM** (``"lssvm"``, :class:`PerTaskLSSVM`): task :math:`k`'s
LS-SVM (:func:`.solvers.lssvm`, labels :math:`\pm1`) gives real decision scores
:math:`f_k(x) = \sum_{i\in k}\alpha_{ki}\,\kappa(x_{ki}, x) + b_k`, turned into
probabilities by **Platt scaling**: a 1-D logistic regression of the task's training
labels on its training scores,

.. math::

    P(y = 1 \mid x) = \sigma\big(a_k f_k(x) + c_k\big),

fitted by :func:`.solvers.platt_scaling` (:func:`.solvers.logistic_l2` vmapped over tasks) on Platt's smoothed targets
:math:`t_+ = (N_+ + 1)/(N_+ + 2)` for positives and :math:`t_- = 1/(N_- + 2)` for
negatives (:math:`N_\pm` the task's class counts), which keeps :math:`a_k` finite when
the training scores separate the classes, with the mild penalty :math:`a_k^2/(2C_P)`
(``platt_C``). The scores are in-sample scores of the same rows the LS-SVM was fitted
to. :meth:`PerTaskLSSVM.score_columns` gives the raw scores (``decision_score``). A task
unseen in training gets the **average of the task probabilities**,
:math:`\frac1K\sum_k \sigma(a_k f_k(x) + c_k)` (its decision score: the average of the
task scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.data.personal import PersonData
from mtl_jax.models.baselines.solvers import (
    KERNELS,
    fit_per_task,
    lssvm,
    lssvm_row_scores,
    lssvm_scores,
    pad_by_task,
    platt_scaling,
)
from mtl_jax.models.protocol import register
from mtl_jax.models.baselines.common import (
    bernoulli_log_likelihood,
    fit_rows,
    HIGHEST,
    masked_y,
    person_labels,
    PersonBaseline,
    population_branch,
    require_binary,
    require_two_classes,
    RowArrays,
    LSSVMParams,
)

# ----------------------------------------------------------------------------- LSSVM
def median_distance(X: np.ndarray, max_rows: int = 1000) -> float:
    """The median heuristic: the median Euclidean distance between pairs of distinct rows.

    At most ``max_rows`` rows are used (evenly spaced in their order); 1.0 when there are
    fewer than two rows or the median is 0.
    """
    X = np.asarray(X, dtype=float)
    if X.shape[0] > max_rows:
        X = X[np.linspace(0, X.shape[0] - 1, max_rows).astype(int)]
    if X.shape[0] < 2:
        return 1.0
    Xc = X - X.mean(axis=0)
    sq = np.sum(Xc ** 2, axis=1)
    distances = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * Xc @ Xc.T, 0.0))
    median = float(np.median(distances[np.triu_indices(X.shape[0], k=1)]))
    return median if median > 0 else 1.0


@register
@dataclasses.dataclass(frozen=True)
class PerTaskLSSVM(PersonBaseline):
    """One least-squares SVM per task, with Platt-scaled probabilities (module docstring).

    Attributes:
        kernel: ``"linear"`` or ``"rbf"``.
        gamma: the LS-SVM regularisation constant :math:`\\gamma > 0` (larger: less regularised).
        bandwidth: RBF bandwidth :math:`h`; ``None`` takes the median heuristic on the
            labelled training and validation rows (:func:`median_distance`, all tasks).
        platt_C: inverse L2 penalty on Platt's slope (default 100: nearly none).
    """

    kernel: str = "linear"
    gamma: float = 1.0
    bandwidth: float | None = None
    platt_C: float = 100.0

    name: ClassVar[str] = "lssvm"
    methods: ClassVar[frozenset] = frozenset({"map"})

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}, not {self.kernel!r}")
        if not self.gamma > 0 or not self.platt_C > 0:
            raise ValueError(f"gamma and platt_C must be positive, got {self.gamma} and {self.platt_C}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be positive (or None for the median heuristic), not {self.bandwidth}")

    def labels(self, data: PersonData) -> dict[str, Any]:
        """As the others, plus ``support_size``: the padded support rows per task ``m``."""
        rows = fit_rows(data)
        counts = np.bincount(np.asarray(data.task)[rows], minlength=data.num_tasks)
        return {**person_labels(data), "support_size": max(int(counts.max(initial=0)), 1)}

    # ------------------------------------------------------------ parameters
    def _zeros(self, K, m, q, dtype):
        return LSSVMParams(jnp.zeros((K, m, q), dtype), jnp.zeros((K, m), dtype), jnp.zeros((K,), dtype),
                           jnp.ones((K,), dtype), jnp.zeros((K,), dtype), jnp.ones((), dtype))

    def init(self, key: PRNGKeyArray, design: PersonData) -> LSSVMParams:
        """Zero support values with the training rows as support (the fit is a linear solve)."""
        del key
        labels = self.labels(design)
        return self._zeros(design.num_tasks, labels["support_size"], design.X.shape[1], design.X.dtype)

    def params_like(self, labels: dict) -> LSSVMParams:
        """Parameters shaped like a fit's (values irrelevant)."""
        return self._zeros(len(labels["task_names"]), labels["support_size"], len(labels["columns"]), jnp.float32)

    def num_parameters(self, design: PersonData) -> int:
        """One support value per labelled training row, plus a bias and Platt's two per task."""
        return int(np.sum(fit_rows(design))) + 3 * design.num_tasks

    def population(self, params: LSSVMParams):
        """Every parameter: an unseen task's answer averages all the task models."""
        return params

    # ------------------------------------------------------------------- fit
    def solve(self, design: PersonData, key: PRNGKeyArray | None = None):
        """Fits every task's LS-SVM and its Platt scaling (``method="map"``).

        Returns:
            ``(params, converged, n_iter)``: converged when the Platt fits met their
            stopping test and everything is finite; ``n_iter`` the problems solved (``2 K``).
        """
        del key
        require_binary(design, self.name)
        rows = fit_rows(design)
        task = np.asarray(design.task)
        require_two_classes(design, rows, task, list(design.task_names), self.name)
        K = design.num_tasks
        X = np.asarray(design.X)
        Xp, yp, wp, _ = pad_by_task(X[rows], np.asarray(design.y)[rows], np.asarray(design.weight)[rows],
                                    task[rows], K)
        bandwidth = 1.0 if self.kernel == "linear" else (
            median_distance(X[rows]) if self.bandwidth is None else float(self.bandwidth))
        params, converged = _fit_lssvm(Xp, yp, wp, self.gamma, self.kernel, jnp.asarray(bandwidth, Xp.dtype),
                                       self.platt_C)
        finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in params)
        return params, bool(converged) and finite, 2 * K

    # ------------------------------------------------------------ likelihood
    def decision_scores(self, params: LSSVMParams, design: PersonData) -> Float[Array, " n"]:
        """Each row's LS-SVM score under its task; an unseen task: the average of the task scores."""
        return self._answers(params, design)[2]

    def _all_task_scores(self, params: LSSVMParams, X) -> Float[Array, "n K"]:
        """Every row's score under every task ``[n, K]``."""
        if self.kernel == "linear":
            eye = jnp.eye(X.shape[1], dtype=params.support.dtype)
            weights = jax.vmap(lambda Xt, a: lssvm_scores(Xt, 0.0, a, eye))(params.support, params.alpha)
            return jnp.matmul(X, weights.T, precision=HIGHEST) + params.b
        scores = lax.map(lambda t: lssvm_scores(t[0], t[1], t[2], X, kernel=self.kernel, bandwidth=params.bandwidth),
                         (params.support, params.b, params.alpha))
        return scores.T

    def _scores_and_log_probs(self, params: LSSVMParams, design: PersonData):
        """``(scores, log P(y=1), log P(y=0))`` per row ``[n]`` each."""
        K = params.b.shape[0]
        seen = design.task < K
        index = jnp.where(seen, design.task, 0)
        X = jnp.asarray(design.X, params.support.dtype)
        own = lssvm_row_scores(params.support, params.b, params.alpha, X, index, kernel=self.kernel,
                               bandwidth=params.bandwidth)
        eta = params.platt_slope[index] * own + params.platt_intercept[index]

        def population():
            scores = self._all_task_scores(params, X)
            eta_all = scores * params.platt_slope + params.platt_intercept  # [n, K]
            log_K = jnp.log(jnp.asarray(K, X.dtype))
            return (jnp.mean(scores, axis=1),
                    jax.nn.logsumexp(jax.nn.log_sigmoid(eta_all), axis=1) - log_K,
                    jax.nn.logsumexp(jax.nn.log_sigmoid(-eta_all), axis=1) - log_K)

        pop = population_branch(jnp.any(~seen), population, (own, own, own))
        return (jnp.where(seen, own, pop[0]), jnp.where(seen, jax.nn.log_sigmoid(eta), pop[1]),
                jnp.where(seen, jax.nn.log_sigmoid(-eta), pop[2]))

    def _row_answers(self, params: LSSVMParams, design: RowArrays):
        """``(mean, loglik, decision score)`` per row: one compiled program for all three."""
        scores, log_p1, log_p0 = self._scores_and_log_probs(params, design)
        return jnp.exp(log_p1), bernoulli_log_likelihood(log_p1, log_p0, masked_y(design)), scores

    def score_columns(self, params: LSSVMParams, design: PersonData) -> dict[str, Array]:
        """The raw decision scores per sample: ``decision_score`` (one label) or
        ``decision_score[<label>]`` per label (labels as tasks)."""
        scores = self.decision_scores(params, design).reshape(-1, design.num_labels)
        if design.num_labels == 1:
            return {"decision_score": scores[:, 0]}
        return {f"decision_score[{label}]": scores[:, j] for j, label in enumerate(design.schema.labels)}

    # --------------------------------------------------------------- reports
    def _weights(self, params: LSSVMParams) -> np.ndarray:
        """Linear kernel: each task's weight vector :math:`v_k = \\sum_i \\alpha_{ki} x_{ki}` ``[..., K, q]``."""
        return np.einsum("...km,...kmq->...kq", np.asarray(params.alpha), np.asarray(params.support))

    def named_parameters(self, params: LSSVMParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """Averages over tasks: ``mean_bias``, ``mean_platt_slope``, ``mean_platt_intercept``; the
        linear kernel's ``mean_weight[<column>]``, the RBF kernel's ``bandwidth``."""
        del leading
        named = {"mean_bias": np.asarray(params.b).mean(axis=-1),
                 "mean_platt_slope": np.asarray(params.platt_slope).mean(axis=-1),
                 "mean_platt_intercept": np.asarray(params.platt_intercept).mean(axis=-1)}
        if self.kernel == "linear":
            mean_weight = self._weights(params).mean(axis=-2)
            named.update({f"mean_weight[{col}]": mean_weight[..., j] for j, col in enumerate(labels["columns"])})
        else:
            named["bandwidth"] = np.asarray(params.bandwidth)
        return named

    def report(self, params: LSSVMParams, labels: dict) -> dict[str, Any]:
        """Per task: bias, Platt's slope and intercept, the number of support vectors and (linear
        kernel) the weight vector by column; the kernel and its bandwidth."""
        b, slope, intercept = (np.asarray(leaf) for leaf in (params.b, params.platt_slope, params.platt_intercept))
        support = np.sum(np.asarray(params.alpha) != 0, axis=-1)
        weights = self._weights(params) if self.kernel == "linear" else None
        tasks = {}
        for k, task in enumerate(labels["task_names"]):
            entry = {"bias": float(b[k]), "platt_slope": float(slope[k]), "platt_intercept": float(intercept[k]),
                     "support_vectors": int(support[k])}
            if weights is not None:
                entry["weights"] = {col: float(v) for col, v in zip(labels["columns"], weights[k])}
            tasks[task] = entry
        return {"kernel": self.kernel, "bandwidth": float(np.asarray(params.bandwidth)), "task_svms": tasks}

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model lssvm``."""
        group = parser.add_argument_group(f"{cls.name} options")
        group.add_argument("--kernel", choices=KERNELS, default="linear", help="linear (default) or rbf")
        group.add_argument("--gamma", type=float, default=1.0, help="LS-SVM regularisation constant (default 1)")
        group.add_argument("--bandwidth", type=float, default=None,
                           help="RBF bandwidth (default: median distance between training rows)")
        group.add_argument("--platt-C", type=float, default=100.0, dest="platt_C",
                           help="inverse L2 penalty on Platt's slope (default 100)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace):
        """The model of the parsed options."""
        return cls(kernel=args.kernel, gamma=args.gamma, bandwidth=args.bandwidth, platt_C=args.platt_C)


@functools.partial(jax.jit, static_argnames=("kernel",))
def _fit_lssvm(Xp, yp, wp, gamma, kernel: str, bandwidth, platt_C):
    """Every task's LS-SVM, its in-sample scores and Platt's regression on them (vmapped over tasks)."""
    fits = fit_per_task(lssvm, Xp, yp, wp, gamma=gamma, kernel=kernel, bandwidth=bandwidth)
    scores = jax.vmap(lambda Xk, bk, ak: lssvm_scores(Xk, bk, ak, Xk, kernel=kernel, bandwidth=bandwidth))(
        Xp, fits.b, fits.alpha)
    slope, intercept, converged = platt_scaling(scores, yp, wp, platt_C)
    params = LSSVMParams(Xp, fits.alpha, fits.b, slope, intercept, jnp.asarray(bandwidth, Xp.dtype))
    return params, converged


