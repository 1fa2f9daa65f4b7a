"""The mixture GLMM's design from encoded data, and the checks of its input.

:func:`build_design` picks the columns of the component means, of the mixing logits and
of the component random effects from a :class:`mtl_jax.data.TaskData`;
:func:`check_design` rejects responses the family cannot take and, with membership per
task, mixing covariates that vary within a task. Every error names the column, the row
(its position in the data) and the task.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mtl_jax.data import DataError
from mtl_jax.data.tabular import INTERCEPT
from mtl_jax.models.mixture_glmm.params import MixtureDesign


def random_effect_columns(model, data) -> list[int]:
    """Indices into ``data.columns`` of the component random effects: the intercept (unless
    switched off), then the encoded columns of ``model.random_slopes`` (any covariates of the
    data, e.g. period indicators beside a polynomial mean).

    Raises:
        ValueError: for a random-effect column that is not a covariate of the data, or a
            design without any random-effect column.
    """
    indices = []
    if model.random_intercept:
        if INTERCEPT not in data.columns:
            raise ValueError("a random intercept needs an intercept column in the data")
        indices.append(data.columns.index(INTERCEPT))
    for name in model.random_slopes:
        try:
            indices.extend(int(i) for i in data.columns_for([name]) if data.columns[i] != INTERCEPT)
        except ValueError:
            raise ValueError(f"random-effect column {name!r} is not a covariate of the data; "
                             f"covariates: {[source for source, _ in data.schema.groups]}") from None
    if not indices:
        raise ValueError("the component random effects have no column: keep the random intercept or name "
                         "random-effect columns")
    return indices


def build_design(model, data) -> MixtureDesign:
    """The model's arrays from a :class:`~mtl_jax.data.TaskData`, checked (:func:`check_design`)."""
    component = data.columns_for(model.covariates)
    z_columns = random_effect_columns(model, data) if model.component_random_effects else [
        data.columns.index(INTERCEPT) if INTERCEPT in data.columns else int(component[0])]
    columns = np.asarray(data.X)  # sliced on the host: no device program per slice
    design = MixtureDesign(
        y=data.y,
        x_comp=jnp.asarray(columns[:, component]),
        x_mix=jnp.asarray(columns[:, data.columns_for(model.mixing_covariates)]),
        task=data.task,
        num_tasks=data.num_tasks,
        z_comp=jnp.asarray(columns[:, np.asarray(z_columns)]),
        trials=data.trials,
        offset=data.offset,
    )
    names = {
        "task_names": list(data.task_names),
        "response_names": list(data.response_names),
        "mixing_columns": [data.columns[i] for i in data.columns_for(model.mixing_covariates)],
        "trials": data.schema.trials,
        "require_trials": True,
    }
    check_design(model, design, names)
    return design


def check_design(model, design: MixtureDesign, names: dict) -> None:
    """Raises a :class:`~mtl_jax.data.DataError` for input the model cannot take.

    * non-Gaussian families: a single response; Bernoulli responses 0 or 1; binomial
      successes whole numbers in ``[0, trials]`` with whole positive trials (and a trials
      column); Poisson counts whole and non-negative;
    * membership per task: mixing covariates constant within each task.
    Rows of unset responses (NaN, prediction inputs) are not checked.
    """
    y = np.asarray(design.y)
    task = np.asarray(design.task)
    task_names = names.get("task_names") or [str(i) for i in range(design.num_tasks)]
    response = (names.get("response_names") or ["y"])[0]

    def where(row: int) -> str:
        label = task_names[task[row]] if task[row] < len(task_names) else str(task[row])
        return f"row {row} (task {label!r})"

    family = model.family
    if family != "gaussian":
        if y.shape[1] != 1:
            raise DataError(f"the {family} family takes one response column, got {y.shape[1]}")
        values = y[:, 0]
        known = ~np.isnan(values)
        whole = known & (values != np.round(values))
        if family == "bernoulli":
            bad = np.flatnonzero(known & (values != 0) & (values != 1))
            if bad.size:
                raise DataError(f"response {response!r} must be 0 or 1 for the bernoulli family (or two text "
                                f"levels with --positive); got {values[bad[0]]:g} at {where(bad[0])}")
        if family == "binomial":
            if names.get("require_trials") and names.get("trials") is None:
                raise DataError("the binomial family needs a trials column (trials=..., --trials COL)")
            trials = np.asarray(design.trials)
            bad_trials = np.flatnonzero((trials < 1) | (trials != np.round(trials)))
            if bad_trials.size:
                raise DataError(f"trials column {names.get('trials')!r} must hold whole numbers >= 1; got "
                                f"{trials[bad_trials[0]]:g} at {where(bad_trials[0])}")
            bad = np.flatnonzero(whole | (known & ((values < 0) | (values > trials))))
            if bad.size:
                row = bad[0]
                raise DataError(f"response {response!r} must be a whole number of successes between 0 and the "
                                f"trials ({trials[row]:g}); got {values[row]:g} at {where(row)}")
        if family == "poisson":
            bad = np.flatnonzero(whole | (known & (values < 0)))
            if bad.size:
                raise DataError(f"response {response!r} must be a non-negative whole count for the poisson "
                                f"family; got {values[bad[0]]:g} at {where(bad[0])}")
    if model.membership == "task":
        x_mix = np.asarray(design.x_mix)
        columns = names.get("mixing_columns") or [f"x{i}" for i in range(x_mix.shape[1])]
        _, first_index = np.unique(task, return_index=True)
        first_row = np.zeros(design.num_tasks, dtype=int)
        first_row[np.unique(task)] = first_index
        differs = ~np.isclose(x_mix, x_mix[first_row[task]], rtol=1e-6, atol=1e-8)
        rows, cols = np.nonzero(differs)
        if rows.size:
            row, col = rows[0], cols[0]
            raise DataError(f"mixing covariate {columns[col]!r} varies within task "
                            f"{task_names[task[row]]!r} ({x_mix[first_row[task[row]], col]:g} at row "
                            f"{first_row[task[row]]}, {x_mix[row, col]:g} at {where(row)}); with membership per "
                            "task the mixing covariates must be constant within each task")
