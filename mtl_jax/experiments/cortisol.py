r"""The mixture-GLMM paper's clustering of synthetic cortisol trajectories (section 4, Figure 2).

**Design.** ``K = 34`` individuals (tasks), each with one cortisol trajectory measured at
``T = 9`` time points ``t = 0, ..., 8``, split into three periods: baseline (``t = 0, 1``),
response to a stressor (``t = 2, 3, 4``) and dissipation (``t = 5, ..., 8``). Each
individual belongs to one of two clusters, ``h = 1`` "typical" (cortisol rises during the
response period and returns to baseline during dissipation) and ``h = 2`` "chronic
stress" (it rises and does not come back), with a constant mixing proportion
:math:`\pi_1 = P(z_i = 1)` (no mixing covariates, so ``v`` is one-dimensional):

.. math::

    y_{it} \mid z_i = h \;=\; w_h^T x(t) + B_{hi}^T z(t) + \varepsilon_{it}, \qquad
    B_{hi} \sim \mathcal N_3(0, \phi_h I_3), \quad \varepsilon_{it} \sim \mathcal N(0, \sigma_h^2),

with the cubic trend :math:`x(t) = (1, s, s^2, s^3)^T` in the scaled time
:math:`s = (t - 4) / 4 \in [-1, 1]` (centred and scaled so that the powers stay in
``[-1, 1]`` and the cubic design is well conditioned; the coefficients below are on this
scale) and :math:`z(t)` the indicators of the three periods, so that ``B_hi`` shifts the
trajectory of individual ``i`` by a separate amount in each period.

**Parameters.** Ram and Grimm's estimates (the paper's source) are not public, so the
truth is chosen to be plausible in nmol/L:

=====================  ===============================  =====================================
                       typical (``h = 1``)              chronic stress (``h = 2``)
=====================  ===============================  =====================================
``w_h``                (17.0, -1.5, -6.5, 1.5)          (18.5, 5.0, -3.0, -1.5)
mean at t = 0 .. 8     10.5, 13.8, 15.9, 17.0, 17.0,    12.0, 13.7, 15.4, 17.1, 18.5,
                       16.2, 14.8, 12.9, 10.5           19.5, 20.1, 19.9, 19.0
``phi_h``              4.0 (shift sd 2.0)               6.0 (shift sd 2.4)
``sigma_h^2``          2.0 (residual sd 1.4)            3.0 (residual sd 1.7)
``pi_h``               0.6                              0.4
=====================  ===============================  =====================================

The typical curve rises by 6.5 nmol/L from its baseline to a peak at ``t = 3, 4`` and is
back at baseline by ``t = 8``; the chronic curve rises by 7-8 and stays up. With these
values the clusters overlap a little: the Bayes classifier (class posteriors under the true
parameters) misclassifies about 3.5% of individuals, close to the paper's 0.032.

**Sensitivity.** Each cell of a grid rescales the truth: the separation of the cluster
means by ``c`` (:math:`w_h \to \bar w + c\,(w_h - \bar w)`, :math:`\bar w` the average of
the two clusters' coefficients) and both ``phi_h`` by ``f``. Every cell reuses the same
random numbers per trial (labels, standardised effects, noise), so cells differ only by the
rescaling.

**Fit.** ``MixtureGLMM(2, membership="task", random_intercept=False, random_slopes=
(baseline, response, dissipation), random_effects_covariance="identity")`` by EM through
:func:`mtl_jax.fit`. The three period indicators sum to the intercept column, which
:class:`~mtl_jax.data.TaskData`'s rank check refuses, so the data are a raw
:class:`~mtl_jax.models.mixture_glmm.MixtureDesign` (``x_comp = x(t)``, ``x_mix = 1``,
``z_comp = z(t)``).

**Statistics per trial.** Each individual is assigned to the cluster of largest posterior
class probability (``exp(class_logits)``); the misclassification rate is the share of
individuals assigned to the wrong cluster after the labels are matched to the truth
(:func:`misclassification_rate`, the best of all label permutations). The estimated
components are matched to the true ones by their mean coefficients
(:meth:`MixtureGLMM.align`) before ``phi_1`` (typical) and ``phi_2`` (chronic) are
reported with their asymptotic standard errors (observed information of the marginal
log-likelihood) and the Wald statistic :math:`z = \hat\phi_h / \operatorname{se}` with the
one-sided p-value :math:`1 - \Phi(z)` against :math:`\phi_h = 0`. This is a boundary test:
under :math:`\phi_h = 0` the estimate sits on the edge of the parameter space and the Wald
statistic is not asymptotically normal (the likelihood-ratio statistic is a 50:50 mixture
of :math:`\chi^2_0` and :math:`\chi^2_1`), so the p-value is the paper's heuristic, not an
exact level. Per trial the misclassification rate of the Bayes classifier under the true
parameters (``oracle``) is reported too, the part of the error due to overlap alone.
"""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm

import mtl_jax
from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.experiments.common import resolve_dtype
from mtl_jax.infer.fit import FitWarning
from mtl_jax.metrics import match_components
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams

__all__ = [
    "CLUSTERS",
    "DEFAULT_CONFIG",
    "PAPER_MISCLASSIFICATION",
    "PERIODS",
    "CortisolSample",
    "cortisol_design",
    "cortisol_frame",
    "cortisol_model",
    "format_table",
    "misclassification_rate",
    "plot_results",
    "run_cortisol_study",
    "simulate_cortisol",
    "true_params",
]

PAPER_MISCLASSIFICATION = 0.032
"""The paper's average misclassification over its 10 trials."""

CLUSTERS = ("typical", "chronic stress")
"""Cluster names, in component order."""

PERIODS = ("baseline", "response", "dissipation")
"""Period names, in the order of the random-effect columns."""

PERIOD_STARTS = (0, 2, 5)
"""First time point of each period."""

DEFAULT_CONFIG = {
    "experiment": "cortisol_study",
    "num_tasks": 34,
    "num_times": 9,
    "typical_coef": [17.0, -1.5, -6.5, 1.5],
    "chronic_coef": [18.5, 5.0, -3.0, -1.5],
    "phi": [4.0, 6.0],
    "sigma2": [2.0, 3.0],
    "typical_proportion": 0.6,
    "trials": 10,
    "separation_scales": [0.5, 0.75, 1.0],
    "phi_scales": [1.0, 2.0],
    "n_init": 6,
    "max_iter": 1000,
    "tol": 1e-8,
    "level": 0.05,
    "seed": 0,
    "dtype": "float64",
}
"""Settings of the study; :func:`run_cortisol_study` fills missing keys from here."""


class CortisolSample(NamedTuple):
    """One simulated data set.

    Attributes:
        design: the raw design (``y [K T, 1]``, ``x_comp [K T, 4]``, ``x_mix [K T, 1]``,
            ``z_comp [K T, 3]``), rows ordered by individual, then time.
        clusters: true cluster of each individual ``[K]`` (0 typical, 1 chronic stress).
        truth: the true parameters with the drawn effects ``B [K, 2, 3, 1]``.
    """

    design: MixtureDesign
    clusters: np.ndarray
    truth: MixtureParams


# ------------------------------------------------------------------ design
def scaled_time(t):
    """``s = (t - 4) / 4``: time points ``0 .. 8`` on ``[-1, 1]``."""
    return (np.asarray(t, dtype=float) - 4.0) / 4.0


def cubic_basis(t) -> np.ndarray:
    """The cubic trend's columns ``(1, s, s^2, s^3)`` at time points ``t`` ``[len(t), 4]``."""
    s = scaled_time(t)
    return np.stack([np.ones_like(s), s, s**2, s**3], axis=-1)


def period_of(t) -> np.ndarray:
    """Period index (0 baseline, 1 response, 2 dissipation) of each time point."""
    return np.searchsorted(PERIOD_STARTS, np.asarray(t), side="right") - 1


def cortisol_design(num_tasks: int, num_times: int = 9, dtype=None) -> MixtureDesign:
    """The design of ``num_tasks`` trajectories at ``t = 0 .. num_times - 1`` (responses zero).

    Rows are ordered by individual, then time: ``x_comp`` the cubic trend
    (:func:`cubic_basis`), ``x_mix`` a column of ones, ``z_comp`` the period indicators.
    """
    dtype = dtype or jnp.asarray(0.0).dtype
    t = np.tile(np.arange(num_times), num_tasks)
    return MixtureDesign(
        y=jnp.zeros((t.size, 1), dtype),
        x_comp=jnp.asarray(cubic_basis(t), dtype),
        x_mix=jnp.ones((t.size, 1), dtype),
        task=jnp.repeat(jnp.arange(num_tasks, dtype=jnp.int32), num_times),
        num_tasks=num_tasks,
        z_comp=jnp.asarray(np.eye(len(PERIODS))[period_of(t)], dtype),
    )


def cortisol_model() -> MixtureGLMM:
    """The fitted model: two clusters per individual, period shifts with ``phi_h I_3``.

    The column names document the design of :func:`cortisol_design` (the cubic terms
    ``s, s2, s3`` beside the intercept, no mixing covariate besides the intercept, the three
    period indicators); a raw design is used as it is, so they select nothing.
    """
    return MixtureGLMM(
        2,
        membership="task",
        random_intercept=False,
        random_slopes=PERIODS,
        random_effects_covariance="identity",
        covariates=("s", "s2", "s3"),
        mixing_covariates=(),
    )


def true_params(config: dict[str, Any], num_tasks: int, separation_scale: float = 1.0, phi_scale: float = 1.0,
                dtype=None) -> MixtureParams:
    """The truth of a config (module docstring), rescaled, with the random effects still zero.

    Args:
        config: a complete study config (``typical_coef``, ``chronic_coef``, ``phi``,
            ``sigma2``, ``typical_proportion``).
        num_tasks: ``K``.
        separation_scale: ``c``: :math:`w_h \\to \\bar w + c (w_h - \\bar w)`.
        phi_scale: ``f``: :math:`\\phi_h \\to f \\phi_h`.
    """
    dtype = dtype or jnp.asarray(0.0).dtype
    coef = np.array([config["typical_coef"], config["chronic_coef"]], dtype=float)  # [2, 4]
    centre = coef.mean(axis=0)
    coef = centre + separation_scale * (coef - centre)
    proportion = float(config["typical_proportion"])
    phi = phi_scale * np.asarray(config["phi"], dtype=float)
    d = len(PERIODS)
    return MixtureParams(
        mixing_coef=jnp.asarray([[np.log(proportion / (1.0 - proportion))]], dtype),
        component_coef=jnp.asarray(coef[:, :, None], dtype),
        component_cov=jnp.asarray(np.asarray(config["sigma2"], dtype=float)[:, None, None], dtype),
        mixing_cov=jnp.zeros((1, 1), dtype),
        component_effects_cov=jnp.asarray(phi[:, None, None] * np.eye(d), dtype),
        mixing_effects=jnp.zeros((num_tasks, 1), dtype),
        component_effects=jnp.zeros((num_tasks, 2, d, 1), dtype),
        class_logits=jnp.zeros((num_tasks, 2), dtype),
    )


def simulate_cortisol(key: jax.Array, params: MixtureParams, num_times: int = 9) -> CortisolSample:
    """Draw the period shifts ``B_hi ~ N(0, phi_h I)``, one cluster per individual and the responses.

    Args:
        key: PRNG key; the same key gives the same standardised draws for any ``params``.
        params: the truth (:func:`true_params`); its task axis sets ``K``.
        num_times: time points per trajectory.
    """
    num_tasks = params.class_logits.shape[0]
    design = cortisol_design(num_tasks, num_times, params.component_coef.dtype)
    truth, labels, y = _draw(key, params, design)
    return CortisolSample(design=eqx.tree_at(lambda d: d.y, design, y),
                          clusters=np.asarray(labels).reshape(num_tasks, num_times)[:, 0], truth=truth)


@jax.jit
def _draw(key: jax.Array, params: MixtureParams, design: MixtureDesign):
    """``(truth with the drawn effects, row labels [n], responses [n, 1])`` of :func:`simulate_cortisol`."""
    model = cortisol_model()
    key_effects, key_data = jax.random.split(key)
    truth = model.sample_effects(key_effects, params, design.num_tasks)
    labels, y = model.simulate(key_data, truth, design)
    return truth, labels, y


def cortisol_frame(sample: CortisolSample) -> pd.DataFrame:
    """The sample as a long frame: ``person``, ``t``, ``cortisol``, ``period``, ``true_cluster``."""
    task = np.asarray(sample.design.task)
    num_times = task.size // sample.design.num_tasks
    t = np.tile(np.arange(num_times), sample.design.num_tasks)
    width = len(str(sample.design.num_tasks))
    return pd.DataFrame({
        "person": [f"p{i + 1:0{width}d}" for i in task],
        "t": t,
        "cortisol": np.asarray(sample.design.y)[:, 0],
        "period": np.asarray(PERIODS)[period_of(t)],
        "true_cluster": np.asarray(CLUSTERS)[sample.clusters[task]],
    })


# ------------------------------------------------------------------ statistics
def misclassification_rate(true_labels, assigned_labels, num_clusters: int) -> tuple[float, np.ndarray]:
    """Share of items in the wrong cluster under the best matching of the labels.

    Args:
        true_labels: true cluster of each item ``[n]``, integers in ``[0, num_clusters)``.
        assigned_labels: assigned cluster of each item ``[n]``, same range.
        num_clusters: ``g``.

    Returns:
        ``(rate, mapping)``: ``mapping[a]`` is the true cluster that assigned label ``a``
        stands for (the permutation maximising agreement, Hungarian algorithm on the
        confusion matrix), and ``rate`` the share of items with ``mapping[assigned] != true``.
    """
    true_labels, assigned_labels = np.asarray(true_labels), np.asarray(assigned_labels)
    confusion = np.zeros((num_clusters, num_clusters), dtype=int)
    np.add.at(confusion, (assigned_labels, true_labels), 1)
    _, mapping = linear_sum_assignment(-confusion)  # rows (assigned labels) come back in order
    return float(np.mean(mapping[assigned_labels] != true_labels)), mapping


def _trial(model: MixtureGLMM, sample: CortisolSample, seed: int, config: dict[str, Any]) -> tuple[dict, tuple]:
    """Fits one data set and computes the trial's statistics (module docstring).

    Returns:
        The trial's record and, for the figure, ``(aligned, assigned)``: the fitted
        parameters with components matched to the true ones by their coefficients, and
        each individual's assigned cluster in that order.
    """
    with warnings.catch_warnings():  # kept in the trial's record, not printed per fit
        warnings.simplefilter("ignore", FitWarning)
        result = mtl_jax.fit(model, sample.design, "em", seed=seed, n_init=int(config["n_init"]),
                             max_iter=int(config["max_iter"]), tol=float(config["tol"]))
    num_clusters = model.num_components
    assigned = np.argmax(result.params.class_logits, axis=1)
    rate, mapping = misclassification_rate(sample.clusters, assigned, num_clusters)
    oracle = np.argmax(np.asarray(model.class_log_probabilities(sample.truth, sample.design)), axis=1)
    order = match_components(result.params.component_coef, sample.truth.component_coef)
    aligned = model.relabel(jax.tree_util.tree_map(jnp.asarray, result.params), order)
    standard_errors = result.diagnostics.get("standard_errors", {})
    phi, se, wald, p_value = [], [], [], []
    for h in range(num_clusters):
        estimate = float(aligned.component_effects_cov[h, 0, 0])
        error = standard_errors.get(f"phi[{order[h] + 1}]")
        error = error if error is not None and np.isfinite(error) else None
        phi.append(estimate)
        se.append(error)
        wald.append(None if error is None else estimate / error)
        p_value.append(None if error is None else float(norm.sf(estimate / error)))
    record = {
        "misclassified": int(round(rate * len(assigned))),
        "misclassification": rate,
        "oracle_misclassification": float(np.mean(oracle != sample.clusters)),
        "labels_agree": bool(np.array_equal(np.argsort(order), mapping)),
        "phi": phi,
        "phi_se": se,
        "wald_z": wald,
        "p_value": p_value,
        "significant": [p is not None and p < float(config["level"]) for p in p_value],
        "sigma2": np.asarray(aligned.component_cov[:, 0, 0]).tolist(),
        "typical_proportion": float(jax.nn.sigmoid(aligned.mixing_coef[0, 0])),
        "loglik": result.loglik,
        "converged": result.converged,
        "n_iter": result.n_iter,
        "warnings": list(result.warnings),
    }
    return record, (aligned, np.argsort(order)[assigned])


def _summarise(trials: list[dict]) -> dict[str, Any]:
    """Mean statistics of a cell's trials (SEs and tests over the trials that have an SE)."""
    def mean_over(key, h):
        values = [trial[key][h] for trial in trials if trial[key][h] is not None]
        return float(np.mean(values)) if values else None

    return {
        "misclassification": float(np.mean([trial["misclassification"] for trial in trials])),
        "misclassified": float(np.mean([trial["misclassified"] for trial in trials])),
        "oracle_misclassification": float(np.mean([trial["oracle_misclassification"] for trial in trials])),
        "phi": [mean_over("phi", h) for h in range(2)],
        "phi_se": [mean_over("phi_se", h) for h in range(2)],
        "significant": [float(np.mean([trial["significant"][h] for trial in trials])) for h in range(2)],
        "both_significant": float(np.mean([all(trial["significant"]) for trial in trials])),
        "with_se": sum(all(se is not None for se in trial["phi_se"]) for trial in trials),
        "converged": sum(trial["converged"] for trial in trials),
        "labels_agree": sum(trial["labels_agree"] for trial in trials),
    }


def _figure_data(sample: CortisolSample, fitted, num_times: int) -> dict[str, Any]:
    """What Figure 2 draws: the trajectories with their assigned clusters and the fitted mean curves.

    ``fitted`` is ``(aligned, assigned)``: the fitted parameters with components matched to
    the true ones, and each individual's assigned cluster in that order.
    """
    aligned, assigned = fitted
    frame = cortisol_frame(sample)
    frame["assigned_cluster"] = np.asarray(CLUSTERS)[assigned][np.asarray(sample.design.task)]
    grid = np.linspace(0.0, num_times - 1.0, 10 * (num_times - 1) + 1)
    coef = np.asarray(aligned.component_coef)[:, :, 0]
    return {
        "trajectories": frame.to_dict(orient="list"),
        "curve_t": grid.tolist(),
        "fitted_curves": {name: (cubic_basis(grid) @ coef[h]).tolist() for h, name in enumerate(CLUSTERS)},
    }


# ------------------------------------------------------------------ study
def run_cortisol_study(config: dict[str, Any], *, progress: bool = True,
                       checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Runs the cortisol clustering study over the sensitivity grid.

    Trial ``r`` of every cell draws its data from ``fold_in(key(seed), r)`` and starts EM
    from seed ``seed + r``. The main result is the cell with both scales 1 (always run).

    Args:
        config: overrides of :data:`DEFAULT_CONFIG`: ``num_tasks`` (``K``), ``num_times``
            (``T``), the truth (``typical_coef``, ``chronic_coef``: ``w_h`` on the scaled
            time; ``phi``, ``sigma2``: per cluster; ``typical_proportion``), ``trials``
            per cell, the grid ``separation_scales`` x ``phi_scales``, EM settings
            ``n_init``, ``max_iter``, ``tol``, the test ``level``, ``seed`` and ``dtype``
            (``"float64"`` switches on ``jax_enable_x64``).
        progress: print a line per trial and the result table.
        checkpoint: journal of finished units (:mod:`~mtl_jax.experiments.checkpoint`;
            default none); a unit is one trial of one grid cell.

    Returns:
        A JSON-serialisable dict: the complete ``config``, the ``truth`` (mean curves at
        ``t = 0 .. T-1`` per cluster), ``cells`` (per grid cell: its scales, the per-trial
        records and their ``summary``, and ``seconds``, the sum over its trials), ``main`` (the index of the cell
        with both scales 1), the ``paper`` misclassification, the ``figure`` data of the
        main cell's first trial, the total ``seconds`` and the printed ``table``.

    Raises:
        ValueError: on an unknown config key or impossible settings.
    """
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown cortisol_study setting(s) {unknown}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    if int(config["num_times"]) < PERIOD_STARTS[-1] + 1:
        raise ValueError(f"num_times must be at least {PERIOD_STARTS[-1] + 1} so that every period "
                         f"({', '.join(PERIODS)}) has a time point, got {config['num_times']}")
    if not 0.0 < float(config["typical_proportion"]) < 1.0:
        raise ValueError(f"typical_proportion must lie in (0, 1), got {config['typical_proportion']}")
    dtype = resolve_dtype(config["dtype"])
    num_tasks, num_times, num_trials = int(config["num_tasks"]), int(config["num_times"]), int(config["trials"])
    model = cortisol_model()
    cells = [(1.0, 1.0)] + [cell for cell in itertools.product(map(float, config["separation_scales"]),
                                                               map(float, config["phi_scales"]))
                            if cell != (1.0, 1.0)]
    root = jax.random.key(int(config["seed"]))
    started = time.perf_counter()
    checkpoint = checkpoint or Checkpoint()
    checkpoint.start(len(cells) * num_trials, "cortisol trials")

    def trial(separation_scale: float, phi_scale: float, params: MixtureParams, r: int) -> dict:
        """One unit: trial ``r`` of a cell (its record, seconds, and the figure data of the very first)."""
        trial_started = time.perf_counter()
        sample = simulate_cortisol(jax.random.fold_in(root, r), params, num_times)
        record, fitted = _trial(model, sample, int(config["seed"]) + r, config)
        unit = {"record": record}
        if (separation_scale, phi_scale, r) == (*cells[0], 0):
            unit["figure"] = _figure_data(sample, fitted, num_times)
        if progress:
            checkpoint.write(f"separation x{separation_scale:g}, phi x{phi_scale:g}, trial {r + 1}/{num_trials}: "
                             f"misclassified {record['misclassified']}/{num_tasks} (oracle "
                             f"{record['oracle_misclassification'] * num_tasks:.0f}), phi = "
                             f"{', '.join(f'{v:.2f}' for v in record['phi'])}, converged {record['converged']} "
                             f"({record['n_iter']} iterations)")
        return {**unit, "seconds": time.perf_counter() - trial_started}

    results_cells, figure = [], None
    for index, (separation_scale, phi_scale) in enumerate(cells):
        params = true_params(config, num_tasks, separation_scale, phi_scale, dtype)
        units = [checkpoint.unit(f"cell={index} (separation x{separation_scale:g}, phi x{phi_scale:g})/trial={r}",
                                 lambda: trial(separation_scale, phi_scale, params, r)) for r in range(num_trials)]
        trials = [unit["record"] for unit in units]
        if figure is None and units:
            figure = units[0].get("figure")
        results_cells.append({
            "separation_scale": separation_scale,
            "phi_scale": phi_scale,
            "true_phi": (phi_scale * np.asarray(config["phi"], dtype=float)).tolist(),
            "trials": trials,
            "summary": _summarise(trials),
            "seconds": sum(unit["seconds"] for unit in units),
        })
    t = np.arange(num_times)
    coef = np.array([config["typical_coef"], config["chronic_coef"]], dtype=float)
    output = {
        "experiment": "cortisol_study",
        "config": config,
        "dtype": str(dtype),
        "truth": {"time_scale": "s = (t - 4) / 4",
                  "mean_curves": {name: (cubic_basis(t) @ coef[h]).tolist() for h, name in enumerate(CLUSTERS)}},
        "paper": {"misclassification": PAPER_MISCLASSIFICATION},
        "cells": results_cells,
        "main": 0,
        "figure": figure,
        "seconds": time.perf_counter() - started,
    }
    output["table"] = format_table(output)
    if progress:
        print(output["table"], flush=True)
    return output


def _number(value, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, ``-`` for a missing one."""
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(output: dict[str, Any]) -> str:
    """The main cell's trials, then one summary row per grid cell, as plain text."""
    config = output["config"]
    main = output["cells"][output["main"]]
    num_tasks = int(config["num_tasks"])
    level = float(config["level"])
    lines = [
        f"Cortisol trajectories: K = {num_tasks}, T = {config['num_times']}, {config['trials']} trials, "
        f"n_init = {config['n_init']}, max_iter = {config['max_iter']}, tol = {config['tol']:g}, {output['dtype']}",
        f"true phi = {', '.join(f'{v:g}' for v in main['true_phi'])}, sigma2 = "
        f"{', '.join(f'{v:g}' for v in config['sigma2'])} (1 = typical, 2 = chronic stress)",
        "",
        "main setting, per trial:",
        f"{'trial':>5}{'miscl.':>8}{'rate':>7}{'oracle':>8}{'phi1':>7}{'se1':>6}{'z1':>6}{'p1':>8}"
        f"{'phi2':>7}{'se2':>6}{'z2':>6}{'p2':>8}{'conv':>6}{'iter':>6}",
    ]
    for r, trial in enumerate(main["trials"]):
        lines.append(
            f"{r + 1:>5}{trial['misclassified']:>8}{trial['misclassification']:>7.3f}"
            f"{trial['oracle_misclassification']:>8.3f}"
            + "".join(f"{_number(trial['phi'][h]):>7}{_number(trial['phi_se'][h]):>6}"
                      f"{_number(trial['wald_z'][h], 1):>6}{_number(trial['p_value'][h], 4):>8}" for h in range(2))
            + f"{'yes' if trial['converged'] else 'no':>6}{trial['n_iter']:>6}")
    lines += [
        "",
        f"per grid cell (mean over trials; paper: misclassification {output['paper']['misclassification']}):",
        f"{'sep.':>5}{'phi x':>6}{'true phi':>11}{'miscl.':>8}{'rate':>7}{'oracle':>8}{'phi1':>7}{'se1':>6}"
        f"{'phi2':>7}{'se2':>6}{'sig1':>6}{'sig2':>6}{'both':>6}{'conv':>6}{'se ok':>6}{'s':>6}",
    ]
    for cell in output["cells"]:
        summary = cell["summary"]
        trials = len(cell["trials"])
        lines.append(
            f"{cell['separation_scale']:>5g}{cell['phi_scale']:>6g}"
            f"{', '.join(f'{v:g}' for v in cell['true_phi']):>11}{summary['misclassified']:>8.2f}"
            f"{summary['misclassification']:>7.3f}{summary['oracle_misclassification']:>8.3f}"
            + "".join(f"{_number(summary['phi'][h]):>7}{_number(summary['phi_se'][h]):>6}" for h in range(2))
            + "".join(f"{summary['significant'][h]:>6.0%}" for h in range(2))
            + f"{summary['both_significant']:>6.0%}{summary['converged']:>3}/{trials:<2}"
            f"{summary['with_se']:>3}/{trials:<2}{cell['seconds']:>6.0f}")
    lines += [
        "",
        f"miscl.: individuals in the wrong cluster (of {num_tasks}); rate: their share; oracle: the share "
        "under the true parameters (overlap alone).",
        f"sig1, sig2, both: share of trials with phi_h significant at {level:g} (Wald z = phi / se, one-sided; "
        "a boundary test, so the level is only approximate).",
        "se1, se2: mean over the trials with finite standard errors (se ok); a trial without them (EM not "
        "converged, or an information matrix that is not positive definite) counts as not significant.",
        "conv: fits that converged; s: seconds per cell (the first includes compilation).",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ figure
def plot_results(output: dict[str, Any], path: str | Path) -> Path:
    """Figure 2: the trajectories of the main cell's first trial in two panels by assigned cluster.

    Top "typical", bottom "chronic stress"; thin lines are individuals (dashed where the
    assignment is wrong), the thick line the fitted cluster mean ``w_h^T x(t)``; the
    periods are shaded. matplotlib is imported here (Agg backend), not with the module.

    Returns:
        ``path``, a PNG file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    figure_data = output["figure"]
    frame = pd.DataFrame(figure_data["trajectories"])
    num_times = int(frame["t"].max()) + 1
    fig, axes = plt.subplots(2, 1, figsize=(7, 8), sharex=True, sharey=True)
    for ax, cluster in zip(axes, CLUSTERS):
        members = frame[frame["assigned_cluster"] == cluster]
        for _, trajectory in members.groupby("person"):
            wrong = trajectory["true_cluster"].iloc[0] != cluster
            ax.plot(trajectory["t"], trajectory["cortisol"], color="tab:red" if wrong else "0.55",
                    linestyle="--" if wrong else "-", linewidth=0.9)
        ax.plot(figure_data["curve_t"], figure_data["fitted_curves"][cluster], color="black", linewidth=2.5,
                label="fitted cluster mean")
        for start, end, shade in zip(PERIOD_STARTS, (*PERIOD_STARTS[1:], num_times), ("0.95", "0.88", "0.95")):
            ax.axvspan(start - 0.5, end - 0.5, color=shade, zorder=0)
        for start, name in zip(PERIOD_STARTS, PERIODS):
            ax.text(start - 0.4, 1.0, name, transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_title(f'"{cluster}" individuals ({members["person"].nunique()})')
        ax.set_ylabel("cortisol (nmol/L)")
    axes[0].plot([], [], color="0.55", linewidth=0.9, label="individual")
    axes[0].plot([], [], color="tab:red", linestyle="--", linewidth=0.9, label="individual, wrong cluster")
    axes[0].legend(loc="lower center", fontsize=8)
    axes[1].set_xlabel("time point t")
    axes[1].set_xticks(range(num_times))
    axes[1].set_xlim(-0.5, num_times - 0.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
