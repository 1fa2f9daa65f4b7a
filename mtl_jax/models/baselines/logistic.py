r"""**Per-task logistic regression** (``"logistic"``, :class:`PerTaskLogistic`). Task
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
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from mtl_jax.data.personal import PersonData
from mtl_jax.evaluate import within_task_folds
from mtl_jax.models.baselines.solvers import (
    fit_grid,
    fit_per_task,
    logistic_l1,
    logistic_l2,
    logistic_logits,
    pad_by_task,
)
from mtl_jax.models.protocol import register
from mtl_jax.models.baselines.common import (
    bernoulli_log_likelihood,
    fit_rows,
    HIGHEST,
    masked_y,
    PersonBaseline,
    require_binary,
    require_two_classes,
    RowArrays,
    DEFAULT_C,
    LogisticParams,
    PENALTIES,
    SELECTIONS,
)

# ------------------------------------------------------------------ logistic models
@functools.partial(jax.jit, static_argnames=("solver",))
def _cv_losses(solver, Xp, yp, train_weight, validation_weight, grid):
    """Total validation log-loss ``[G, K]`` of every fold, grid value and task, in one vmapped call.

    ``Xp [K, m, q]``, ``yp [K, m]``; ``train_weight`` / ``validation_weight`` ``[F, K, m]``
    (fold ``f``'s training and validation rows of each block); ``grid [G]``.
    """
    fits = jax.vmap(lambda weight: fit_grid(solver, Xp, yp, weight, grid))(train_weight)  # [F, G, K, ...]
    eta = fits.intercept[..., None] + jnp.einsum("kmq,fgkq->fgkm", Xp, fits.beta, precision=HIGHEST)
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
class PerTaskLogistic(PersonBaseline):
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
        require_binary(design, self.name)
        rows = fit_rows(design)
        task = np.zeros_like(np.asarray(design.task)) if self.pooled else np.asarray(design.task)
        names = ["all tasks"] if self.pooled else list(design.task_names)
        require_two_classes(design, rows, task, names, self.name)
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

    def _row_answers(self, params: LogisticParams, design: RowArrays):
        eta = self.logits(params, design)
        loglik = bernoulli_log_likelihood(jax.nn.log_sigmoid(eta), jax.nn.log_sigmoid(-eta), masked_y(design))
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


