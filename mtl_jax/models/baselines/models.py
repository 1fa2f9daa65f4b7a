r"""The single-task and pooled baselines on the model protocol: ``"logistic"``,
``"pooled-logistic"``, ``"lssvm"`` and ``"stl-net"``.

All four take per-person data (:class:`~mtl_jax.data.personal.PersonData`: flat rows
``X [n, q]``, ``y [n]``, ``weight [n]``, ``task [n]``, ``split [n]``), fit with
``method="map"`` and share the conventions of ``"mtl-net"``:

* a row with ``weight 0`` (a missing label) contributes nothing to any fit, score or
  cross-validation loss;
* the convex baselines fit on the labelled rows of the training **and** validation
  splits (``split`` 0 and 1); the test split (2) never enters a fit;
* :meth:`score` is the log-likelihood of the observed labels of splits 0 and 1, and
  :meth:`num_observations` counts those labels (so BIC uses the rows it scores);
* :meth:`predict` gives ``[samples, L]``, the probability of the positive label
  (``"stl-net"``: the mean for a Gaussian task); :meth:`log_predictive` ``[samples]``
  the log-likelihood of a sample's observed labels.

**Per-task logistic regression** (``"logistic"``, :class:`PerTaskLogistic`). Task
:math:`k` has its own :math:`(b_k, \beta_k)` minimising

.. math::

    \sum_{i \in k} w_i\,\ell(y_i, b_k + x_i^T\beta_k) + \frac{\lVert\beta_k\rVert_2^2}{2C_k}
    \quad\text{(L2)}\qquad\text{or}\qquad
    \sum_{i \in k} w_i\,\ell(y_i, b_k + x_i^T\beta_k) + \frac{\lVert\beta_k\rVert_1}{C_k}
    \quad\text{(L1)},

:math:`\ell(y, \eta) = -y\log\sigma(\eta) - (1-y)\log\sigma(-\eta)`, by the solvers of
:mod:`.solvers`. With several values of ``C``, :math:`C_k` is chosen by ``cv_folds``-fold
cross-validation *within tasks* on the labelled training rows (split 0): folds are
:func:`mtl_jax.evaluate.within_task_folds` of those rows (stratified by label, seed
``cv_seed``); for fold :math:`f`, grid value :math:`C_g` and task :math:`k` the fit on the
other folds' rows is scored by the summed log-loss of fold :math:`f`'s rows, and

.. math::

    L_{gk} = \sum_f \sum_{i \in k,\ \mathrm{fold}(i) = f} w_i\,\ell\big(y_i, b^{(-f)}_{gk}
    + x_i^T\beta^{(-f)}_{gk}\big)

is the task's total validation log-loss (each training row is validated once).
``select="task"`` takes :math:`\arg\min_g L_{gk}` per task, ``select="global"``
:math:`\arg\min_g \sum_k L_{gk}` for all tasks; ties go to the smaller ``C`` (the
stronger penalty). All folds, grid values and tasks are one vmapped computation
(:func:`.solvers.fit_grid`); the chosen :math:`C_k` is then refitted on splits 0 and 1.
A task unseen in training gets the **average of the task coefficient vectors**,
:math:`\bar b = \frac1K\sum_k b_k`, :math:`\bar\beta = \frac1K\sum_k\beta_k`.

**Pooled logistic regression** (``"pooled-logistic"``, :class:`PooledLogistic`): one
:math:`(b, \beta)` for the rows of all tasks together (the same solvers with one task;
``C`` chosen by the same within-task folds, summed over tasks); every task, seen or not,
gets it.

**Per-task least-squares SVM** (``"lssvm"``, :class:`PerTaskLSSVM`): task :math:`k`'s
LS-SVM (:func:`.solvers.lssvm`, labels :math:`\pm1`) gives real decision scores
:math:`f_k(x) = \sum_{i\in k}\alpha_{ki}\,\kappa(x_{ki}, x) + b_k`, turned into
probabilities by **Platt scaling**: a 1-D logistic regression of the task's training
labels on its training scores,

.. math::

    P(y = 1 \mid x) = \sigma\big(a_k f_k(x) + c_k\big),

fitted by :func:`.solvers.logistic_l2` (vmapped over tasks) on Platt's smoothed targets
:math:`t_+ = (N_+ + 1)/(N_+ + 2)` for positives and :math:`t_- = 1/(N_- + 2)` for
negatives (:math:`N_\pm` the task's class counts), which keeps :math:`a_k` finite when
the training scores separate the classes, with the mild penalty :math:`a_k^2/(2C_P)`
(``platt_C``). The scores are in-sample scores of the same rows the LS-SVM was fitted
to. :meth:`PerTaskLSSVM.score_columns` gives the raw scores (``decision_score``). A task
unseen in training gets the **average of the task probabilities**,
:math:`\frac1K\sum_k \sigma(a_k f_k(x) + c_k)` (its decision score: the average of the
task scores).

**Single-task nets** (``"stl-net"``, :class:`STLNet`): one small net per task, no
parameter shared. The nets are stacked (every leaf has a leading task axis ``[K, ...]``)
and applied by gathering each row's task weights and a batched ``einsum`` (memory
``n x q x H`` for the first layer), trained by the generic optax loop of
:mod:`mtl_jax.infer.optimize` on :math:`\sum_k \frac{1}{m_k}\sum_{i\in k} w_i\,
\ell_k(y_i, \eta_i) + \lambda\sum\lVert W\rVert^2`. A task unseen in training gets the
**average of the task predictions** (the equal mixture of the :math:`K` task nets:
mean :math:`\frac1K\sum_k \mu_k(x)`, density :math:`\frac1K\sum_k p_k(y \mid x)`).

**Bad inputs.** ``"logistic"``, ``"pooled-logistic"`` and ``"lssvm"`` are classifiers:
a task whose label is not binary raises :class:`~mtl_jax.data.tabular.DataError` naming
it, and so does a task with a **single class** (or no label at all) among its labelled
training and validation rows (the pooled model: all rows together) -- a per-task
classifier of such a task is undefined (its intercept would run off to infinity); drop
the task or fit ``"pooled-logistic"``. (Inside cross-validation a fold's training part
may hold one class; the solvers keep such a fit finite.) ``"stl-net"`` also fits
Gaussian tasks, and a single-class binary task simply learns to predict its class (as
far as the L2 penalty and early stopping let its bias grow).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.data.personal import PersonData
from mtl_jax.data.tabular import DataError
from mtl_jax.evaluate import within_task_folds
from mtl_jax.linalg import segment_sum
from mtl_jax.models.baselines.solvers import (
    KERNELS,
    fit_grid,
    fit_per_task,
    logistic_l1,
    logistic_l2,
    logistic_logits,
    lssvm,
    lssvm_row_scores,
    lssvm_scores,
    pad_by_task,
)
from mtl_jax.models.mtl_net import network
from mtl_jax.models.mtl_net.model import MTLNet, add_person_data_arguments, default_hidden, person_data_from_frame
from mtl_jax.models.protocol import register

DEFAULT_C = (0.01, 0.1, 1.0, 10.0, 100.0)
"""The default grid of ``C`` of the logistic baselines."""

PENALTIES = ("l2", "l1")
SELECTIONS = ("task", "global")
_HIGHEST = lax.Precision.HIGHEST


# ------------------------------------------------------------------------ parameters
class LogisticParams(NamedTuple):
    """Per-task (or pooled, ``K = 1``) logistic regressions.

    Attributes:
        intercept: :math:`b_k` ``[K]``.
        beta: :math:`\\beta_k` ``[K, q]``.
        C: the ``C`` each task was fitted with ``[K]`` (chosen by cross-validation).
    """

    intercept: Array
    beta: Array
    C: Array


class LSSVMParams(NamedTuple):
    """Per-task LS-SVMs with Platt scaling; the support vectors are part of the parameters.

    Attributes:
        support: each task's training rows ``[K, m, q]`` (padded with zeros; ``m`` the
            largest number of labelled training + validation rows of a task).
        alpha: support values ``[K, m]`` (0 on padding).
        b: biases ``[K]``.
        platt_slope: :math:`a_k` ``[K]``.
        platt_intercept: :math:`c_k` ``[K]``.
        bandwidth: the RBF bandwidth :math:`h` ``[]`` (1 and unused for the linear kernel).
    """

    support: Array
    alpha: Array
    b: Array
    platt_slope: Array
    platt_intercept: Array
    bandwidth: Array


class STLNetParams(eqx.Module):
    """``K`` independent nets, stacked: every leaf has a leading task axis.

    Attributes:
        layers: hidden layers (``eqx.nn.Linear`` with ``weight [K, out, in]``, ``bias [K, out]``).
        head: output layer (``weight [K, 1, H]``, ``bias [K, 1]``).
        log_noise_sd: :math:`s_k` ``[K]``, the log noise sd of a Gaussian task (unused by binary ones).
    """

    layers: tuple[eqx.nn.Linear, ...]
    head: eqx.nn.Linear
    log_noise_sd: Float[Array, " K"]

    @property
    def num_tasks(self) -> int:
        """``K``, the training tasks."""
        return self.log_noise_sd.shape[0]


# --------------------------------------------------------------------------- helpers
def _person_labels(data: PersonData) -> dict[str, Any]:
    return {"task_names": list(data.task_names), "columns": list(data.columns),
            "response_names": list(data.schema.labels),
            "task_binary": [bool(b) for b in np.asarray(data.task_binary)]}


def _fit_rows(design: PersonData) -> np.ndarray:
    """Labelled rows of the training and validation splits ``[n]`` (bool, host)."""
    return (np.asarray(design.weight) > 0) & (np.asarray(design.split) <= 1)


def _named_list(names) -> str:
    names = [repr(str(name)) for name in names]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _require_binary(design: PersonData, model_name: str) -> None:
    """DataError naming the tasks whose label is not binary."""
    bad = np.flatnonzero(~np.asarray(design.task_binary)[: design.num_tasks])
    if bad.size:
        raise DataError(f"{model_name} is a classifier of binary (0/1) labels; task(s) "
                        f"{_named_list(np.asarray(design.task_names, dtype=object)[bad])} "
                        f"{'is' if bad.size == 1 else 'are'} not binary")


def _require_two_classes(design: PersonData, rows: np.ndarray, task: np.ndarray, names, model_name: str) -> None:
    """DataError naming the tasks with fewer than two classes among ``rows``."""
    K = len(names)
    positive = np.asarray(design.y)[rows] > 0.5
    pos = np.bincount(task[rows], weights=positive, minlength=K)
    neg = np.bincount(task[rows], weights=~positive, minlength=K)
    bad = np.flatnonzero((pos == 0) | (neg == 0))
    if bad.size:
        detail = "; ".join(f"{names[k]!r}: {int(pos[k])} positive, {int(neg[k])} negative" for k in bad[:5])
        raise DataError(f"{model_name} needs both classes among each task's labelled training and validation "
                        f"rows; {bad.size} task(s) {'has' if bad.size == 1 else 'have'} fewer ({detail}"
                        f"{' ...' if bad.size > 5 else ''}). Drop such tasks, or fit pooled-logistic.")


def _binary_rows(design: PersonData):
    """Whether each row's task is binary (unseen tasks: their entry of ``task_binary``)."""
    known = jnp.where(design.task < design.task_binary.shape[0], design.task, 0)
    return design.task_binary[known]


def _masked_y(design: PersonData):
    return jnp.where(design.weight > 0, design.y, 0.0)


def _bernoulli(log_p1, log_p0, y):
    r""":math:`y\log p + (1-y)\log(1-p)` from :math:`\log p` and :math:`\log(1-p)`."""
    return y * log_p1 + (1.0 - y) * log_p0


def _population_branch(any_unseen, compute, like):
    """``compute()`` when some row is unseen (``lax.cond``), else zeros shaped like ``like``."""
    return lax.cond(any_unseen, compute, lambda: jax.tree_util.tree_map(jnp.zeros_like, like))


class _Rows(NamedTuple):
    """The arrays of :class:`PersonData` the answers need (what the jitted answers take)."""

    X: Array
    y: Array
    weight: Array
    task: Array
    task_binary: Array


def _rows(design: PersonData) -> _Rows:
    return _Rows(design.X, design.y, design.weight, design.task, design.task_binary)


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _jitted(model, method: str, params, arguments):
    """``getattr(model, method)(params, arguments)``, compiled once per model (a hashable
    frozen dataclass) and shapes; ``arguments`` a pytree of arrays (a :class:`_Rows`)."""
    return getattr(model, method)(params, arguments)


class _PersonBaseline:
    """What the baselines share: per-person data, row answers, scores and data options.

    A subclass gives ``_row_answers(params, rows) -> (mean [n], loglik [n], ...)`` (``rows``
    a :class:`_Rows`; more per-row outputs may follow): per row the predictive mean and
    the log-likelihood of its label (rows of unseen tasks answered at population level,
    masked rows included: they are weighted out here). It runs jitted, compiled once per
    model and shapes (:func:`_jitted`).
    """

    name: ClassVar[str]

    def _answers(self, params, design: PersonData):
        return _jitted(self, "_row_answers", params, _rows(design))

    # ------------------------------------------------------------------ data
    def design(self, data) -> PersonData:
        """The :class:`~mtl_jax.data.personal.PersonData` itself.

        Raises:
            ValueError: for other data.
        """
        if not isinstance(data, PersonData):
            raise ValueError(f"{self.name} needs PersonData (mtl_jax.data.personal), got {type(data).__name__}")
        return data

    def labels(self, data: PersonData) -> dict[str, Any]:
        """Task names, feature columns, label (response) names, which tasks are binary."""
        return _person_labels(data)

    def num_observations(self, design: PersonData) -> int:
        """Observed labels of the training and validation splits (the rows :meth:`score` sums)."""
        return int(np.sum(_fit_rows(design)))

    # ------------------------------------------------------------ likelihood
    def score(self, params, design: PersonData) -> Float[Array, ""]:
        """Log-likelihood of the observed labels of splits 0 and 1 (test rows and weight-0 rows excluded)."""
        loglik = self._answers(params, design)[1]
        weight = design.weight * (design.split < 2)
        return jnp.sum(jnp.where(weight > 0, weight * loglik, 0.0))

    def predict(self, params, design: PersonData) -> Float[Array, "samples L"]:
        """Per sample and label: the probability of the positive label (a Gaussian task: the mean)."""
        mean = self._answers(params, design)[0]
        return mean.reshape(-1, design.num_labels)

    def log_predictive(self, params, design: PersonData) -> Float[Array, " samples"]:
        """Per sample: the log-likelihood of its observed labels (0 when none is observed)."""
        loglik = self._answers(params, design)[1]
        values = jnp.where(design.weight > 0, design.weight * loglik, 0.0)
        return values.reshape(-1, design.num_labels).sum(axis=1)

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_data_arguments(cls, parser) -> None:
        """Data options: person/task column, labels, features, tasks from users or labels, normalisation."""
        add_person_data_arguments(parser, cls.name)

    def data_from_frame(self, frame, args=None, *, labels: dict | None = None, schema=None,
                        require_response: bool = False) -> PersonData:
        """Training data from ``args``, or new data encoded with a fit's ``schema`` and task names."""
        return person_data_from_frame(frame, args, labels=labels, schema=schema, require_response=require_response)


# ------------------------------------------------------------------ logistic models
@functools.partial(jax.jit, static_argnames=("solver",))
def _cv_losses(solver, Xp, yp, train_weight, validation_weight, grid):
    """Total validation log-loss ``[G, K]`` of every fold, grid value and task, in one vmapped call.

    ``Xp [K, m, q]``, ``yp [K, m]``; ``train_weight`` / ``validation_weight`` ``[F, K, m]``
    (fold ``f``'s training and validation rows of each block); ``grid [G]``.
    """
    fits = jax.vmap(lambda weight: fit_grid(solver, Xp, yp, weight, grid))(train_weight)  # [F, G, K, ...]
    eta = fits.intercept[..., None] + jnp.einsum("kmq,fgkq->fgkm", Xp, fits.beta, precision=_HIGHEST)
    loss = -(yp * jax.nn.log_sigmoid(eta) + (1.0 - yp) * jax.nn.log_sigmoid(-eta))
    loss = jnp.where(validation_weight[:, None] > 0, validation_weight[:, None] * loss, 0.0)
    return jnp.sum(loss, axis=(0, 3))


@functools.partial(jax.jit, static_argnames=("solver",))
def _refit(solver, Xp, yp, wp, C):
    return fit_per_task(solver, Xp, yp, wp, C=C)


def _grid(values) -> tuple[float, ...]:
    """A sorted tuple of distinct floats from a scalar or a sequence."""
    return tuple(sorted({float(c) for c in np.atleast_1d(np.asarray(values, dtype=float))}))


@register
@dataclasses.dataclass(frozen=True)
class PerTaskLogistic(_PersonBaseline):
    """One penalised logistic regression per task (module docstring).

    Attributes:
        penalty: ``"l2"`` (Newton, :func:`.solvers.logistic_l2`) or ``"l1"`` (FISTA,
            :func:`.solvers.logistic_l1`).
        C: the inverse penalty strength, or a grid of values to choose from by
            cross-validation (stored sorted, without repeats).
        cv_folds: folds of the within-task cross-validation (with several ``C``).
        select: choose ``C`` per ``"task"`` or once for all tasks (``"global"``).
        cv_seed: seed of the folds (:func:`mtl_jax.evaluate.within_task_folds`); the
            fit's own ``seed`` is not used: the fit is deterministic.
        pooled: one regression for all tasks (``"pooled-logistic"``).
    """

    penalty: str = "l2"
    C: tuple[float, ...] = DEFAULT_C
    cv_folds: int = 3
    select: str = "task"
    cv_seed: int = 0
    pooled: bool = False

    name: ClassVar[str] = "logistic"
    methods: ClassVar[frozenset] = frozenset({"map"})

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {list(PENALTIES)}, not {self.penalty!r}")
        grid = _grid(self.C)
        if not grid or not all(np.isfinite(c) and c > 0 for c in grid):
            raise ValueError(f"C must be positive and finite, got {self.C}")
        object.__setattr__(self, "C", grid)
        if int(self.cv_folds) != self.cv_folds or self.cv_folds < 2:
            raise ValueError(f"cv_folds must be an integer >= 2, not {self.cv_folds!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {list(SELECTIONS)}, not {self.select!r}")

    @property
    def _solver(self):
        return logistic_l2 if self.penalty == "l2" else logistic_l1

    # ------------------------------------------------------------ parameters
    def _num_fits(self, labels_or_design) -> int:
        if self.pooled:
            return 1
        names = labels_or_design["task_names"] if isinstance(labels_or_design, dict) else labels_or_design.task_names
        return len(names)

    def init(self, key: PRNGKeyArray, design: PersonData) -> LogisticParams:
        """Small random coefficients, ``C`` the middle of the grid (the fit itself starts from its own point)."""
        K, q = self._num_fits(design), design.X.shape[1]
        dtype = design.X.dtype
        return LogisticParams(jnp.zeros((K,), dtype), 0.01 * jax.random.normal(key, (K, q), dtype),
                              jnp.full((K,), self.C[len(self.C) // 2], dtype))

    def params_like(self, labels: dict) -> LogisticParams:
        """Parameters shaped like a fit's (values irrelevant)."""
        K, q = self._num_fits(labels), len(labels["columns"])
        return LogisticParams(np.zeros(K), np.zeros((K, q)), np.zeros(K))

    def num_parameters(self, design: PersonData) -> int:
        """Intercept and coefficients of every regression: ``K (q + 1)`` (pooled: ``q + 1``)."""
        return self._num_fits(design) * (design.X.shape[1] + 1)

    def population(self, params: LogisticParams):
        """``(mean intercept, mean coefficients)``: what an unseen task gets."""
        return jnp.mean(params.intercept, axis=-1), jnp.mean(params.beta, axis=-2)

    # ------------------------------------------------------------------- fit
    def folds(self, design: PersonData) -> np.ndarray:
        """Fold id ``[n]`` of each labelled training row (split 0), -1 for every other row.

        :func:`mtl_jax.evaluate.within_task_folds` of those rows' tasks, ``cv_folds`` folds,
        seed ``cv_seed``, stratified by label.
        """
        rows = (np.asarray(design.weight) > 0) & (np.asarray(design.split) == 0)
        folds = np.full(rows.shape, -1, dtype=np.int64)
        if rows.any():
            folds[rows] = within_task_folds(np.asarray(design.task)[rows], self.cv_folds, seed=self.cv_seed,
                                            stratify=np.asarray(design.y)[rows])
        return folds

    def cv_losses(self, design: PersonData) -> np.ndarray:
        """Total validation log-loss ``[G, K]`` per value of ``C`` (sorted) and task (pooled: ``K = 1``).

        Every fold's fit of every grid value and task is one vmapped computation; a row of
        fold ``f`` is validated by the fit on the training rows of the other folds.
        """
        folds = self.folds(design)
        rows = folds >= 0
        task = np.zeros_like(np.asarray(design.task)) if self.pooled else np.asarray(design.task)
        K = self._num_fits(design)
        Xp, yp, wp, index = pad_by_task(np.asarray(design.X)[rows], np.asarray(design.y)[rows],
                                        np.asarray(design.weight)[rows], task[rows], K)
        fold_p = np.where(index >= 0, folds[rows][np.maximum(index, 0)], -1)
        in_fold = fold_p[None] == np.arange(self.cv_folds)[:, None, None]  # [F, K, m]
        train_weight = np.where(in_fold, 0.0, wp[None]).astype(wp.dtype)
        validation_weight = np.where(in_fold, wp[None], 0.0).astype(wp.dtype)
        grid = np.asarray(self.C, dtype=Xp.dtype)
        return np.asarray(_cv_losses(self._solver, Xp, yp, train_weight, validation_weight, grid))

    def choose_C(self, design: PersonData) -> np.ndarray:
        """The ``C`` of each regression ``[K]``: the only value, or the cross-validated choice."""
        K = self._num_fits(design)
        if len(self.C) == 1:
            return np.full(K, self.C[0])
        losses = self.cv_losses(design)
        if self.select == "task":
            choice = np.argmin(losses, axis=0)
        else:
            choice = np.full(K, np.argmin(losses.sum(axis=1)))
        return np.asarray(self.C)[choice]

    def solve(self, design: PersonData, key: PRNGKeyArray | None = None):
        """Fits every regression (``method="map"``).

        Checks the labels (binary, two classes per task: :class:`DataError` otherwise),
        chooses ``C`` (:meth:`choose_C`) and refits on the labelled rows of splits 0 and 1.
        ``key`` is unused (the folds come from ``cv_seed``).

        Returns:
            ``(params, converged, n_iter)``: converged when every final fit met its
            stopping test; ``n_iter`` the number of single-task problems solved
            (cross-validation fits and refits).
        """
        del key
        _require_binary(design, self.name)
        rows = _fit_rows(design)
        task = np.zeros_like(np.asarray(design.task)) if self.pooled else np.asarray(design.task)
        names = ["all tasks"] if self.pooled else list(design.task_names)
        _require_two_classes(design, rows, task, names, self.name)
        K = self._num_fits(design)
        C = self.choose_C(design)
        Xp, yp, wp, _ = pad_by_task(np.asarray(design.X)[rows], np.asarray(design.y)[rows],
                                    np.asarray(design.weight)[rows], task[rows], K)
        fits = _refit(self._solver, Xp, yp, wp, jnp.asarray(C, Xp.dtype))
        params = LogisticParams(fits.intercept, fits.beta, jnp.asarray(C, Xp.dtype))
        n_cv = self.cv_folds * len(self.C) * K if len(self.C) > 1 else 0
        return params, bool(np.all(np.asarray(fits.converged))), n_cv + K

    # ------------------------------------------------------------ likelihood
    def logits(self, params: LogisticParams, design: PersonData) -> Float[Array, " n"]:
        """Log-odds of each row: its task's regression; an unseen task (or any task, pooled) the average one."""
        K = params.intercept.shape[0]
        intercept = jnp.concatenate([params.intercept, jnp.mean(params.intercept, keepdims=True)])
        beta = jnp.concatenate([params.beta, jnp.mean(params.beta, axis=0, keepdims=True)])
        index = jnp.zeros_like(design.task) if self.pooled else jnp.where(design.task < K, design.task, K)
        return logistic_logits(design.X, index, intercept, beta)

    def _row_answers(self, params: LogisticParams, design: _Rows):
        eta = self.logits(params, design)
        loglik = _bernoulli(jax.nn.log_sigmoid(eta), jax.nn.log_sigmoid(-eta), _masked_y(design))
        return jax.nn.sigmoid(eta), loglik

    # --------------------------------------------------------------- reports
    def named_parameters(self, params: LogisticParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """Pooled: ``intercept``, ``beta[<column>]``, ``C``. Per task: the averages over tasks
        (``mean_intercept``, ``mean_beta[<column>]``, what an unseen task gets) and the chosen
        ``C[<task>]`` (``C`` alone when one value serves every task)."""
        del leading  # the "..." indexing keeps any leading axes
        intercept, beta, C = (np.asarray(leaf) for leaf in params)
        columns = labels["columns"]
        if self.pooled:
            named = {"intercept": intercept[..., 0]}
            named.update({f"beta[{col}]": beta[..., 0, j] for j, col in enumerate(columns)})
            named["C"] = C[..., 0]
            return named
        named = {"mean_intercept": intercept.mean(axis=-1)}
        mean_beta = beta.mean(axis=-2)
        named.update({f"mean_beta[{col}]": mean_beta[..., j] for j, col in enumerate(columns)})
        if self.select == "task" and len(self.C) > 1:
            named.update({f"C[{task}]": C[..., k] for k, task in enumerate(labels["task_names"])})
        else:
            named["C"] = C[..., 0]
        return named

    def report(self, params: LogisticParams, labels: dict) -> dict[str, Any]:
        """Coefficients by column name (``(intercept)`` first) and the chosen ``C``: per task
        and their average (``population_coefficients``); pooled: the one regression."""
        intercept, beta, C = (np.asarray(leaf) for leaf in params)
        columns = labels["columns"]

        def named(b, coefficients):
            return {"(intercept)": float(b), **{col: float(v) for col, v in zip(columns, coefficients)}}

        if self.pooled:
            return {"coefficients": named(intercept[0], beta[0]), "C": float(C[0])}
        tasks = labels["task_names"]
        return {"task_coefficients": {task: named(intercept[k], beta[k]) for k, task in enumerate(tasks)},
                "chosen_C": {task: float(C[k]) for k, task in enumerate(tasks)},
                "population_coefficients": named(intercept.mean(), beta.mean(axis=0))}

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model logistic`` (``pooled-logistic``: no ``--select``)."""
        group = parser.add_argument_group(f"{cls.name} options")
        group.add_argument("--penalty", choices=PENALTIES, default="l2", help="l2 (default) or l1 penalty")
        group.add_argument("--C", type=float, nargs="+", default=list(DEFAULT_C), metavar="C",
                           help="inverse penalty strength; several values are chosen from by within-task "
                                f"cross-validation (default {' '.join(map(str, DEFAULT_C))})")
        group.add_argument("--cv-folds", type=int, default=3, help="cross-validation folds (default 3)")
        group.add_argument("--cv-seed", type=int, default=0, help="seed of the folds (default 0)")
        if not cls.pooled:
            group.add_argument("--select", choices=SELECTIONS, default="task",
                               help="choose C per task (default) or once for all tasks (global)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace):
        """The model of the parsed options."""
        extra = {} if cls.pooled else {"select": args.select}
        return cls(penalty=args.penalty, C=tuple(args.C), cv_folds=args.cv_folds, cv_seed=args.cv_seed, **extra)


@register
@dataclasses.dataclass(frozen=True)
class PooledLogistic(PerTaskLogistic):
    """One penalised logistic regression for all tasks' rows together; every task (seen or not) gets it."""

    pooled: bool = True
    name: ClassVar[str] = "pooled-logistic"


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
class PerTaskLSSVM(_PersonBaseline):
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
        rows = _fit_rows(data)
        counts = np.bincount(np.asarray(data.task)[rows], minlength=data.num_tasks)
        return {**_person_labels(data), "support_size": max(int(counts.max(initial=0)), 1)}

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
        return int(np.sum(_fit_rows(design))) + 3 * design.num_tasks

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
        _require_binary(design, self.name)
        rows = _fit_rows(design)
        task = np.asarray(design.task)
        _require_two_classes(design, rows, task, list(design.task_names), self.name)
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
            return jnp.matmul(X, weights.T, precision=_HIGHEST) + params.b
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

        pop = _population_branch(jnp.any(~seen), population, (own, own, own))
        return (jnp.where(seen, own, pop[0]), jnp.where(seen, jax.nn.log_sigmoid(eta), pop[1]),
                jnp.where(seen, jax.nn.log_sigmoid(-eta), pop[2]))

    def _row_answers(self, params: LSSVMParams, design: _Rows):
        """``(mean, loglik, decision score)`` per row: one compiled program for all three."""
        scores, log_p1, log_p0 = self._scores_and_log_probs(params, design)
        return jnp.exp(log_p1), _bernoulli(log_p1, log_p0, _masked_y(design)), scores

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
    positive = (yp > 0.5) & (wp > 0)
    n_pos = jnp.sum(jnp.where(positive, wp, 0.0), axis=1, keepdims=True)
    n_neg = jnp.sum(jnp.where(positive, 0.0, wp), axis=1, keepdims=True)
    targets = jnp.where(positive, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    platt = fit_per_task(logistic_l2, scores[..., None], targets, wp, C=platt_C)
    params = LSSVMParams(Xp, fits.alpha, fits.b, platt.beta[:, 0], platt.intercept,
                         jnp.asarray(bandwidth, Xp.dtype))
    return params, jnp.all(platt.converged)


# --------------------------------------------------------------------------- STL net
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def init_stl_params(key: PRNGKeyArray, num_inputs: int, hidden: tuple[int, ...], num_tasks: int,
                    dtype=jnp.float32) -> STLNetParams:
    """``num_tasks`` independent nets, stacked: each layer is ``eqx.nn.Linear`` built per task
    with its own key (Glorot-uniform, equinox's default) under ``eqx.filter_vmap``."""
    widths = (num_inputs, *hidden)
    keys = jax.random.split(key, len(widths))

    def stacked(layer_key, fan_in, fan_out):
        make = eqx.filter_vmap(lambda k: eqx.nn.Linear(fan_in, fan_out, key=k, dtype=dtype))
        return make(jax.random.split(layer_key, num_tasks))

    layers = tuple(stacked(k, a, b) for k, a, b in zip(keys[:-1], widths[:-1], widths[1:]))
    return STLNetParams(layers=layers, head=stacked(keys[-1], widths[-1], 1),
                        log_noise_sd=jnp.zeros((num_tasks,), dtype))


def stl_rows_forward(params: STLNetParams, X, index, activation: str = "relu", dropout: float = 0.0,
                     key: PRNGKeyArray | None = None) -> Float[Array, " n"]:
    r""":math:`\eta_i` of each row under the net of task ``index[i]``: its weights gathered per
    row (``[n, out, in]``) and applied by a batched ``einsum``; dropout on the hidden layers when ``key`` is given."""
    act = network.ACTIVATIONS[activation]
    keys = jax.random.split(key, max(len(params.layers), 1)) if key is not None else [None] * len(params.layers)
    h = X
    for layer, layer_key in zip(params.layers, keys):
        h = act(jnp.einsum("noi,ni->no", layer.weight[index], h) + layer.bias[index])
        if layer_key is not None and dropout > 0.0:
            h = eqx.nn.Dropout(dropout)(h, key=layer_key)
    return jnp.einsum("ni,ni->n", params.head.weight[index, 0], h) + params.head.bias[index, 0]


def stl_all_forward(params: STLNetParams, X, activation: str = "relu") -> Float[Array, "K n"]:
    r""":math:`\eta` of every row under every task's net ``[K, n]`` (``jax.vmap`` over the stacked nets)."""
    act = network.ACTIVATIONS[activation]

    def one(layers, head):
        h = X
        for layer in layers:
            h = act(h @ layer.weight.T + layer.bias)
        return h @ head.weight[0] + head.bias[0]

    return jax.vmap(one)(params.layers, params.head)


@register
@dataclasses.dataclass(frozen=True)
class STLNet(_PersonBaseline):
    """One small net per task, nothing shared (module docstring), trained by ``method="map"``.

    Attributes:
        hidden: widths of each net's hidden layers; ``None`` sizes them like ``"mtl-net"``
            (:func:`~mtl_jax.models.mtl_net.model.default_hidden`); ``()``: per-task linear models.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        dropout: dropout rate on the hidden layers during training.
        l2: :math:`\\lambda` on every weight matrix (biases unpenalised).

    The nets share no parameter, and Adam's updates are per parameter, so each task's
    training is that of its net alone -- except for early stopping, which (the generic
    loop of :mod:`mtl_jax.infer.optimize`) keeps the step with the best *total*
    validation loss. With ``validation_fraction=0`` and no validation rows, each net is
    exactly what training it alone would give. The task weightings that act on shared
    parameters (``gradnorm``, ``pcgrad``) have nothing to act on.
    """

    hidden: tuple[int, ...] | None = None
    activation: str = "relu"
    dropout: float = 0.0
    l2: float = 1e-3

    name: ClassVar[str] = "stl-net"
    methods: ClassVar[frozenset] = frozenset({"map"})

    def __post_init__(self):
        if self.activation not in network.ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(network.ACTIVATIONS)}, not {self.activation!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.hidden is not None and any(int(width) < 1 for width in self.hidden):
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, not {self.l2}")

    def widths(self, num_inputs: int) -> tuple[int, ...]:
        """The hidden layers' widths for ``num_inputs`` features."""
        return default_hidden(num_inputs) if self.hidden is None else tuple(int(w) for w in self.hidden)

    def labels(self, data: PersonData) -> dict[str, Any]:
        """As the others, plus the hidden widths."""
        return {**_person_labels(data), "hidden": list(self.widths(data.X.shape[1]))}

    # ------------------------------------------------------------ parameters
    def init(self, key: PRNGKeyArray, design: PersonData) -> STLNetParams:
        """Glorot-uniform layers, each task's from its own key (:func:`init_stl_params`)."""
        return init_stl_params(key, design.X.shape[1], self.widths(design.X.shape[1]), design.num_tasks,
                               np.dtype(design.X.dtype))

    def params_like(self, labels: dict) -> STLNetParams:
        """Parameters shaped like a fit's (values irrelevant)."""
        return init_stl_params(jax.random.key(0), len(labels["columns"]), tuple(labels["hidden"]),
                               len(labels["task_names"]), np.dtype(np.float32))

    def num_parameters(self, design: PersonData) -> int:
        """Every weight and bias of every net, plus a noise sd per Gaussian task."""
        q, widths = design.X.shape[1], self.widths(design.X.shape[1])
        sizes = (q, *widths, 1)
        per_task = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
        gaussian = int(np.sum(~np.asarray(design.task_binary)[: design.num_tasks]))
        return design.num_tasks * per_task + gaussian

    def population(self, params: STLNetParams):
        """Every parameter: an unseen task's answer averages all the task nets."""
        return params

    def shared_mask(self, params: STLNetParams):
        """``False`` everywhere: nothing is shared."""
        return jax.tree_util.tree_map(lambda _: False, params)

    def split_rows(self, design: PersonData, key: PRNGKeyArray, fraction: float):
        """``(train, validation)`` row weights, as ``"mtl-net"`` (:meth:`MTLNet.split_rows`)."""
        return MTLNet.split_rows(self, design, key, fraction)

    # ------------------------------------------------------------ likelihood
    def _own(self, params: STLNetParams, design: PersonData, key=None):
        """``(eta, log_sd)`` of each row under its own task's net (unseen rows: task 0's, to be replaced)."""
        K = params.num_tasks
        index = jnp.where(design.task < K, design.task, 0)
        eta = stl_rows_forward(params, design.X, index, self.activation, self.dropout, key)
        return eta, params.log_noise_sd[index]

    def task_losses(self, params: STLNetParams, design: PersonData, row_weight, key=None) -> Float[Array, " K"]:
        """Per-task mean negative log-likelihood of the rows weighted by ``row_weight`` (times the label mask)."""
        return _jitted(self, "_task_losses", params, (_rows(design), row_weight, key))

    def _task_losses(self, params: STLNetParams, arguments) -> Float[Array, " K"]:
        design, row_weight, key = arguments
        weight = row_weight * design.weight
        eta, log_sd = self._own(params, design, key)
        loglik = network.row_log_likelihood(eta, log_sd, _masked_y(design), _binary_rows(design))
        K = params.num_tasks
        total = segment_sum(jnp.where(weight > 0, -weight * loglik, 0.0), design.task, K)
        count = segment_sum(weight, design.task, K)
        return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)

    def penalty(self, params: STLNetParams) -> Float[Array, ""]:
        """:math:`\\lambda` times the sum of squares of every weight matrix (all tasks)."""
        weights = [layer.weight for layer in params.layers] + [params.head.weight]
        return self.l2 * sum(jnp.sum(w ** 2) for w in weights)

    def _row_answers(self, params: STLNetParams, design: _Rows):
        K = params.num_tasks
        seen = design.task < K
        binary, y = _binary_rows(design), _masked_y(design)
        eta, log_sd = self._own(params, design)
        own_mean = network.mean_response(eta, binary)
        own_loglik = network.row_log_likelihood(eta, log_sd, y, binary)

        def population():
            eta_all = stl_all_forward(params, design.X, self.activation)  # [K, n]
            mean = network.mean_response(eta_all, binary[None])
            loglik = network.row_log_likelihood(eta_all, params.log_noise_sd[:, None], y[None], binary[None])
            return jnp.mean(mean, axis=0), jax.nn.logsumexp(loglik, axis=0) - jnp.log(jnp.asarray(K, eta.dtype))

        pop_mean, pop_loglik = _population_branch(jnp.any(~seen), population, (own_mean, own_loglik))
        return jnp.where(seen, own_mean, pop_mean), jnp.where(seen, own_loglik, pop_loglik)

    # --------------------------------------------------------------- reports
    def named_parameters(self, params: STLNetParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
        """Over tasks: ``mean_head_bias``, the rms of each layer's weights (``weight_rms[<l>]``,
        the head last) and each Gaussian task's ``noise_sd[<task>]``."""
        del leading
        named = {"mean_head_bias": np.asarray(params.head.bias)[..., 0].mean(axis=-1)}
        weights = [layer.weight for layer in params.layers] + [params.head.weight]
        for index, weight in enumerate(weights):
            named[f"weight_rms[{index}]"] = np.sqrt(np.mean(np.asarray(weight) ** 2, axis=(-3, -2, -1)))
        log_sd = np.asarray(params.log_noise_sd)
        for k, (task, binary) in enumerate(zip(labels["task_names"], labels["task_binary"])):
            if not binary:
                named[f"noise_sd[{task}]"] = np.exp(log_sd[..., k])
        return named

    def report(self, params: STLNetParams, labels: dict) -> dict[str, Any]:
        """The hidden widths and per task its head (``bias``, ``weight``)."""
        bias, weight = np.asarray(params.head.bias)[:, 0], np.asarray(params.head.weight)[:, 0]
        return {"hidden": labels["hidden"], "task_nets": {
            task: {"head_bias": float(bias[k]), "head_weight": weight[k].tolist()}
            for k, task in enumerate(labels["task_names"])}}

    # ------------------------------------------------------------------- CLI
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of ``mtl-jax fit --model stl-net``."""
        group = parser.add_argument_group(f"{cls.name} options")
        group.add_argument("--hidden", type=int, nargs="*", metavar="H", default=None,
                           help="hidden widths of each task's net (default: one layer of 2 x features, in [8, 64]; "
                                "give none for per-task linear models)")
        group.add_argument("--activation", default="relu", choices=sorted(network.ACTIVATIONS))
        group.add_argument("--dropout", type=float, default=0.0, help="dropout rate in MAP training (default 0)")
        group.add_argument("--l2", type=float, default=1e-3, help="L2 on every weight matrix (default 1e-3)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace):
        """The model of the parsed options."""
        return cls(hidden=None if args.hidden is None else tuple(args.hidden), activation=args.activation,
                   dropout=args.dropout, l2=args.l2)


__all__ = [
    "DEFAULT_C",
    "LSSVMParams",
    "LogisticParams",
    "PerTaskLSSVM",
    "PerTaskLogistic",
    "PooledLogistic",
    "STLNet",
    "STLNetParams",
    "init_stl_params",
    "median_distance",
    "stl_all_forward",
    "stl_rows_forward",
]
