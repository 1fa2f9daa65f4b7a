r"""Figures of fitted multitask models; each function takes a :class:`mtl_jax.Fit` and returns a matplotlib Figure.

* :func:`random_effects`: the predicted task effects with intervals, one panel per
  effect column and the tasks sorted by their effect (the paper's Figure 1, lme4's
  ``dotplot(ranef(fit, condVar = TRUE))``);
* :func:`trajectories`: each task's response over time in the panel of its most
  probable class, under the class's mean trajectory (the paper's Figure 2);
* :func:`cluster_memberships`: each task's class (cluster) probabilities as a stacked
  bar, the tasks grouped by their most probable class (task-level mixtures, HBLR);
* :func:`em_trace`: the EM stopping quantity, or the SVI loss, per iteration;
* :func:`compare_estimates`: the population parameters of several fits (EM, SVI, NUTS)
  side by side, each with its interval.

Intervals at level :math:`1 - \alpha`: :math:`\hat\theta \pm z_{1-\alpha/2}\,s` for a
point fit (``s`` a standard error, or the conditional sd of a predicted effect), the
highest-density interval of the draws for parameters of a fit with posterior draws, and
:math:`\bar\theta \pm z_{1-\alpha/2}\,\mathrm{sd}` of the draws for its predicted effects.

matplotlib (and arviz, scipy) are imported inside the functions, not with the module;
``mtl-jax plot`` selects the non-interactive Agg backend before drawing.
"""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd

#: Axis label of each backend's trace (:attr:`mtl_jax.Fit.trace`).
TRACE_LABELS = {"em": "EM objective (does not decrease)", "vb": "ELBO (does not decrease)",
                "svi": "SVI loss (negative ELBO)"}


def random_effects(fit, part: str = "component", level: float = 0.95, ax=None):
    """Dot plot of the predicted random effects of every task with ``level`` intervals.

    One panel per column of ``fit.random_effects()[part]`` (e.g. ``B1``, ``B2``, or
    ``B1[intercept]``, ``B1[t]``), the tasks sorted by their predicted effect
    :math:`\\hat b_i`, each drawn as a dot with the interval
    :math:`\\hat b_i \\pm z_{(1+\\text{level})/2}\\, s_i`. The sd :math:`s_i` is the sd of the
    effect over the posterior draws when the fit has draws, else the conditional sd of
    the fit's ``task_tables[f"{part}_sd"]``.

    Args:
        fit: a :class:`mtl_jax.Fit` of a model with task random effects.
        part: which effects, a key of ``fit.random_effects()`` (``"component"`` or ``"mixing"``).
        level: coverage of the intervals, in (0, 1).
        ax: an Axes, or a sequence of one Axes per effect column, to draw on; ``None``
            makes a new figure.

    Returns:
        The Figure. In each panel, ``lines`` holds the dots (label ``"predicted effect"``,
        x the sorted estimates) and ``collections[0]`` the intervals, one segment
        ``[(lower, y), (upper, y)]`` per task; the y tick labels are the task names.

    Raises:
        ValueError: for an unknown part, a fit without such effects, or without intervals
            (no draws and no ``{part}_sd`` table), or a wrong number of axes.
    """
    import matplotlib.pyplot as plt

    z = _normal_quantile(level)
    estimates, sds = _effects_and_sds(fit, part)
    columns = list(estimates.columns)
    if ax is None:
        figure, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns) + 1.0, 0.2 * len(estimates) + 1.6),
                                    squeeze=False)
        axes = list(axes[0])
    else:
        axes = list(np.ravel(np.asarray(ax, dtype=object)))
        if len(axes) != len(columns):
            raise ValueError(f"the {part} effects have {len(columns)} columns {columns}; pass as many axes, "
                             f"got {len(axes)}")
        figure = axes[0].figure
    for axis, column in zip(axes, columns):
        order = np.argsort(estimates[column].to_numpy(), kind="stable")
        centre = estimates[column].to_numpy()[order]
        half_width = z * sds[column].to_numpy()[order]
        rows = np.arange(len(order))
        axis.axvline(0.0, color="0.6", linewidth=0.8, zorder=0)
        axis.hlines(rows, centre - half_width, centre + half_width, color="C0", linewidth=1.2)
        axis.plot(centre, rows, "o", color="C0", markersize=3.5, label="predicted effect")
        axis.set_yticks(rows, [str(task) for task in estimates.index[order]],
                        fontsize=max(4.0, min(9.0, 600.0 / max(len(rows), 1))))
        axis.set_ylim(-0.7, len(rows) - 0.3)
        axis.set_title(column)
        axis.set_xlabel(f"predicted effect, {level:.0%} interval")
    source = "posterior draws" if fit.draws is not None else "conditional sds"
    figure.suptitle(f"{part} random effects ({fit.method}, intervals from {source})")
    figure.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.45 / figure.get_figheight()))  # room for the title
    return figure


def trajectories(fit, frame: pd.DataFrame, time: str, response: str | None = None, task: str | None = None):
    """Each task's response over ``time``, one panel per class, with the class mean on top.

    A task is drawn (a thin line through its rows sorted by ``time``) in the panel of its
    most probable class, :math:`\\arg\\max_h P(z_i = h \\mid y_i)` from
    ``fit.task_tables["class_probabilities"]``. The class mean trajectory is the mean over
    the class's rows of ``fit.predict(frame)`` at each distinct time.

    Args:
        fit: a :class:`mtl_jax.Fit` of a model with membership per task.
        frame: rows of training tasks (``fit.task_names``) with the task, ``time``,
            response and covariate columns.
        time: the column on the x axis.
        response: the response column drawn (default: the fit's first response).
        task: the task column (default: the fit's schema's).

    Returns:
        The Figure, one Axes per class (titled ``class h (n tasks)``): a line per task
        (label: the task name) and the class mean (label ``"class mean"``).

    Raises:
        ValueError: when the fit has no class probabilities per task (membership per
            observation), for a missing column, or a task of ``frame`` not fitted.
    """
    import matplotlib.pyplot as plt

    probabilities = class_probabilities(fit)
    response = fit.response_names[0] if response is None else response
    if response not in fit.response_names:
        raise ValueError(f"response {response!r} is not one of the fit's responses {list(fit.response_names)}")
    if task is None:
        if fit.schema is None:
            raise ValueError("this fit has no data schema (it was fitted to a raw design): name the task column")
        task = getattr(fit.schema, "task", None) or fit.schema.person  # tabular or per-person data
    missing = [column for column in dict.fromkeys((task, time, response)) if column not in frame.columns]
    if missing:
        raise ValueError(f"column(s) {missing} not in the data (it has {list(frame.columns)})")
    task_names = frame[task].astype(str).to_numpy()
    unknown = ~np.isin(task_names, probabilities.index.astype(str))
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise ValueError(f"task {task_names[row]!r} (row {row}) was not fitted, so it has no class probabilities; "
                         f"the fit's tasks are {list(probabilities.index)}")
    most_probable = probabilities.idxmax(axis=1)
    most_probable.index = most_probable.index.astype(str)
    predicted = np.asarray(fit.predict(frame)).reshape(len(frame), -1)[:, fit.response_names.index(response)]
    rows = pd.DataFrame({"task": task_names, "time": frame[time].to_numpy(), "observed": frame[response].to_numpy(),
                         "predicted": predicted, "class": most_probable.loc[task_names].to_numpy()})
    classes = list(probabilities.columns)
    figure, axes = plt.subplots(len(classes), 1, figsize=(7.0, 2.8 * len(classes) + 0.6), sharex=True, sharey=True,
                                squeeze=False)
    for axis, (h, label) in zip(axes[:, 0], enumerate(classes)):
        members = rows[rows["class"] == label]
        for name, one_task in members.groupby("task", sort=False):
            one_task = one_task.sort_values("time", kind="stable")
            axis.plot(one_task["time"], one_task["observed"], color="0.55", linewidth=0.8, alpha=0.8, label=name)
        if len(members):
            mean = members.groupby("time")["predicted"].mean()
            line, = axis.plot(mean.index, mean.to_numpy(), color=f"C{h}", linewidth=2.5, label="class mean")
            axis.legend(handles=[line], loc="best", fontsize=8)
        axis.set_title(f"class {label} ({members['task'].nunique()} tasks)")
        axis.set_ylabel(response)
    axes[-1, 0].set_xlabel(time)
    figure.tight_layout()
    return figure


def class_probabilities(fit) -> pd.DataFrame:
    """The fit's per-task class probabilities (``task_tables["class_probabilities"]``).

    Raises:
        ValueError: when the fit has none (a model that assigns classes per observation, or none).
    """
    probabilities = fit.task_tables.get("class_probabilities")
    if probabilities is None:
        raise ValueError(f"this {fit.method} fit has no class probabilities per task (its model assigns a class "
                         "to each observation, or none): fit a model with membership='task', or hblr")
    return probabilities


def cluster_memberships(fit, ax=None):
    """Each task's class probabilities as one stacked horizontal bar, the tasks grouped by
    their most probable class (then by that probability).

    Returns:
        The Figure; its Axes holds one bar container per class (label ``class <name>``),
        bar ``i`` of each for the ``i``-th task in the plotted order (y tick labels: task names).

    Raises:
        ValueError: when the fit has no class probabilities per task.
    """
    import matplotlib.pyplot as plt

    probabilities = class_probabilities(fit)
    most_probable = probabilities.to_numpy().argmax(axis=1)
    order = np.lexsort((-probabilities.to_numpy().max(axis=1), most_probable))
    ordered = probabilities.iloc[order]
    if ax is None:
        figure, ax = plt.subplots(figsize=(7.0, 1.2 + 0.22 * len(ordered)))
    else:
        figure = ax.figure
    left = np.zeros(len(ordered))
    for h, column in enumerate(ordered.columns):
        values = ordered[column].to_numpy(dtype=float)
        ax.barh(np.arange(len(ordered)), values, left=left, color=f"C{h % 10}", label=f"class {column}")
        left += values
    ax.set_yticks(np.arange(len(ordered)), [str(name) for name in ordered.index])
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("class probability")
    ax.set_title(f"{fit.method.upper()}: tasks by class")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.tight_layout()
    return figure


def em_trace(fit):
    """The backend's trace per iteration: EM's stopping quantity, or the SVI loss per step.

    Returns:
        The Figure; its one Axes holds one line with y data ``fit.trace`` at
        iterations ``1 .. len(fit.trace)``.

    Raises:
        ValueError: for a fit without a trace (NUTS records none).
    """
    import matplotlib.pyplot as plt

    trace = np.asarray(fit.trace, dtype=float)
    if trace.size == 0:
        raise ValueError(f"this {fit.method} fit has no trace (EM and SVI fits record one per iteration)")
    figure, axis = plt.subplots(figsize=(6.0, 3.6))
    axis.plot(np.arange(1, trace.size + 1), trace, color="C0", linewidth=1.2)
    axis.set_xlabel("iteration" if fit.method in ("em", "vb") else "step")
    axis.set_ylabel(TRACE_LABELS.get(fit.method, f"{fit.method} trace"))
    axis.set_title(f"{fit.method.upper()}: {fit.n_iter} iterations, converged {fit.converged}")
    figure.tight_layout()
    return figure


def compare_estimates(fits: dict, level: float = 0.95):
    """The population parameters of several fits side by side, with ``level`` intervals.

    One row (Axes) per parameter name of the fits' :meth:`~mtl_jax.Fit.summary` tables,
    in order of first appearance, each with its own x scale; in it one marker per fit at
    the ``estimate`` with its interval: the highest-density interval of the draws
    (``arviz.hdi``) for fits with draws, :math:`\\hat\\theta \\pm z\\,\\mathrm{se}` from
    the ``se`` column for point fits with standard errors, none otherwise.

    Args:
        fits: ``{label: Fit}``, e.g. ``{"em": ..., "svi": ..., "nuts": ...}``.
        level: coverage of the intervals, in (0, 1).

    Returns:
        The Figure. In each parameter's Axes (y label: the name), the fit at position
        ``b`` of ``fits`` is the line labelled with its key (x: the estimate, y: ``b``)
        and, where it has an interval, the collection with the same label holding the
        segment ``[(lower, b), (upper, b)]``.

    Raises:
        ValueError: for no fits, or a level outside (0, 1).
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if not fits:
        raise ValueError("compare_estimates needs at least one fit")
    _check_level(level)
    tables = {label: _intervals(fit, level) for label, fit in fits.items()}
    names = list(dict.fromkeys(name for table in tables.values() for name in table.index))
    figure, axes = plt.subplots(len(names), 1, figsize=(7.0, 0.42 * len(names) * len(fits) + 1.2), squeeze=False)
    for axis, name in zip(axes[:, 0], names):
        for b, (label, table) in enumerate(tables.items()):
            if name not in table.index:
                continue
            estimate, lower, upper = table.loc[name, ["estimate", "lower", "upper"]]
            if np.isfinite(lower) and np.isfinite(upper):
                axis.hlines([b], [lower], [upper], color=f"C{b}", linewidth=1.5, label=label)
            axis.plot([estimate], [b], "o", color=f"C{b}", markersize=5, label=label)
        axis.set_ylim(-0.6, len(tables) - 0.4)
        axis.set_yticks([])
        axis.set_ylabel(name, rotation=0, ha="right", va="center")
    handles = [Line2D([], [], marker="o", linestyle="none", color=f"C{b}", label=label)
               for b, label in enumerate(tables)]
    figure.legend(handles=handles, loc="upper center", ncol=len(tables), frameon=False)
    figure.suptitle(f"estimates with {level:.0%} intervals", y=0.0, va="bottom", fontsize=9)
    figure.tight_layout(rect=(0.0, 0.03, 1.0, 1.0 - 0.5 / figure.get_figheight()))
    return figure


def _normal_quantile(level: float) -> float:
    """:math:`z_{(1+\\text{level})/2}`, the half-width in sds of a central normal interval."""
    from scipy.stats import norm

    _check_level(level)
    return float(norm.ppf(0.5 + level / 2.0))


def _check_level(level: float) -> None:
    """Raises ValueError unless ``0 < level < 1``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _effects_and_sds(fit, part: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The predicted ``part`` effects ``[K, columns]`` and their sds (draws first, then the fit's table)."""
    if not hasattr(fit.model, "random_effects"):
        raise ValueError(f"model {fit.model.name!r} has no task random effects to plot")
    effects = fit.random_effects()
    if part not in effects:
        raise ValueError(f"unknown part {part!r}; this fit's random effects are {sorted(effects)}")
    estimates = effects[part]
    table = f"{part}_sd"
    if estimates.shape[1] == 0 or (fit.task_tables and table not in fit.task_tables):
        raise ValueError(f"this fit's model has no {part} random effects (its per-task tables are "
                         f"{sorted(fit.task_tables)})")
    if fit.draws is not None:
        draws = _effect_draws(fit, part)
        return estimates, pd.DataFrame(draws.std(axis=0, ddof=1), index=estimates.index, columns=estimates.columns)
    if table not in fit.task_tables:
        raise ValueError(f"this {fit.method} fit has no intervals for its {part} effects: it has no posterior "
                         f"draws and no {table!r} table (refit, or fit with method='svi' or 'nuts')")
    sds = fit.task_tables[table]
    if list(sds.columns) != list(estimates.columns) or list(sds.index) != list(estimates.index):
        raise ValueError(f"the fit's {table!r} table (columns {list(sds.columns)}) does not match its {part} "
                         f"effects (columns {list(estimates.columns)})")
    return estimates, sds


def _effect_draws(fit, part: str) -> np.ndarray:
    """Every posterior draw's ``part`` effects ``[chains * draws, K, columns]`` (the model's ``random_effects``)."""
    leaves, treedef = jax.tree_util.tree_flatten(fit.draws)
    leaves = [np.asarray(leaf) for leaf in leaves]
    count = leaves[0].shape[0] * leaves[0].shape[1]
    flat = [leaf.reshape(count, *leaf.shape[2:]) for leaf in leaves]
    return np.stack([
        fit.model.random_effects(jax.tree_util.tree_unflatten(treedef, [leaf[s] for leaf in flat]),
                                 fit.labels)[part].to_numpy(dtype=float)
        for s in range(count)
    ])


def _intervals(fit, level: float) -> pd.DataFrame:
    """``estimate``, ``lower``, ``upper`` per named parameter of ``fit.summary()`` (NaN bounds: no interval)."""
    summary = fit.summary()
    table = pd.DataFrame({"estimate": summary["estimate"], "lower": np.nan, "upper": np.nan})
    if fit.draws is not None:
        import arviz as az

        hdi = az.hdi(fit.to_arviz(), hdi_prob=level)
        for name in table.index:
            table.loc[name, ["lower", "upper"]] = np.asarray(hdi[name], dtype=float)
    elif "se" in summary:
        half_width = _normal_quantile(level) * summary["se"].to_numpy(dtype=float)
        table["lower"] = table["estimate"] - half_width
        table["upper"] = table["estimate"] + half_width
    return table
