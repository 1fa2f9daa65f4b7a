"""Within-task cross-validation and hyperparameter search for personalised multitask models.

The protocol (as in the PersonalizedMultitaskLearning studies) is:

1. **Folds within tasks.** :func:`within_task_folds` gives every row a fold id. Each task's
   rows are shuffled and dealt round-robin into the folds, so every task with at least
   ``num_folds`` rows appears in every fold, and a personalised model always sees some of
   a task's rows when it is validated on others of the same task. Each row sits in
   exactly one fold; when fold ``f`` validates, the training rows are all rows of the
   other folds, so no row is ever both trained and validated on (no leak across the
   split). With ``stratify`` the class balance of each task is also kept per fold.
2. **A grid.** :func:`grid` expands ``{name: [values, ...]}`` into a list of parameter
   dicts in a stable order.
3. **Evaluation.** :func:`run_grid` calls the caller's ``evaluate(params, train_rows,
   valid_rows)`` for every grid point and fold, appending each result to a CSV file
   as soon as it is known, so that an interrupted search resumes where it stopped.
4. **Selection.** :func:`select` averages a metric over folds and picks the best grid
   point, either once for all tasks (global) or separately for each task (per task,
   when the evaluation table has a row per task).
5. **Refit.** The caller then refits the chosen setting on training + validation rows
   together and reports it once on the held-out test rows, which never enter this
   module.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["grid", "params_key", "run_grid", "select", "within_task_folds"]


# ---------------------------------------------------------------------------- folds
def within_task_folds(task, num_folds: int, seed: int = 0, stratify=None) -> np.ndarray:
    """Fold id per row, dealt within each task.

    Within each task the rows are put in a random order (a ``numpy.random.Generator``
    seeded with ``seed``) and dealt round-robin into the folds, starting at a random fold
    per task so that the folds also balance in total size. Hence each task's row counts
    per fold differ by at most one and a task with ``>= num_folds`` rows is in every fold.

    With ``stratify`` (binary labels, NaN meaning unlabelled), each task's rows are dealt
    class by class -- its negatives, then its positives, then its unlabelled rows, each
    group shuffled -- continuing the round-robin from one class to the next. Every
    (task, class) group is then spread over the folds with counts differing by at most
    one, and so is the task as a whole.

    Args:
        task: task id per row ``[n]`` (any hashable values; none missing).
        num_folds: number of folds, at least 2.
        seed: seed of the random order; the same seed gives the same folds.
        stratify: optional labels ``[n]`` with values 0, 1 or NaN.

    Returns:
        ``folds [n]`` (int64), values in ``0 .. num_folds - 1``.

    Raises:
        ValueError: for ``num_folds < 2``, a missing task id, ``stratify`` of the wrong
            length or with values other than 0/1/NaN (the first bad row is named).
    """
    if int(num_folds) != num_folds or num_folds < 2:
        raise ValueError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    num_folds = int(num_folds)
    codes, uniques = pd.factorize(np.asarray(task, dtype=object).reshape(-1))
    if (codes < 0).any():
        raise ValueError(f"task ids must not be missing; row {int(np.flatnonzero(codes < 0)[0])} is")
    n = codes.size
    if stratify is None:
        stratum = np.zeros(n, dtype=np.int64)
    else:
        labels = np.asarray(stratify, dtype=np.float64).reshape(-1)
        if labels.size != n:
            raise ValueError(f"stratify has {labels.size} rows but task has {n}")
        good = (labels == 0.0) | (labels == 1.0) | np.isnan(labels)
        if not good.all():
            row = int(np.flatnonzero(~good)[0])
            raise ValueError(f"stratify must be 0, 1 or NaN; row {row} is {labels[row]!r}")
        stratum = np.where(np.isnan(labels), 2, labels).astype(np.int64)

    rng = np.random.default_rng(seed)
    shuffle_key = rng.permutation(n)
    offset = rng.integers(num_folds, size=len(uniques))
    # Sort by task, then class, then the random key: each task's rows become one block.
    order = np.lexsort((shuffle_key, stratum, codes))
    sorted_codes = codes[order]
    counts = np.bincount(codes, minlength=len(uniques))
    starts = np.cumsum(counts) - counts
    position = np.arange(n) - starts[sorted_codes]
    folds = np.empty(n, dtype=np.int64)
    folds[order] = (position + offset[sorted_codes]) % num_folds
    return folds


# ----------------------------------------------------------------------------- grid
def _python_scalar(value):
    """NumPy scalars as the Python values they hold (for JSON and CSV)."""
    return value.item() if isinstance(value, np.generic) else value


def grid(spec: Mapping[str, Any]) -> list[dict]:
    """All combinations of a hyperparameter grid.

    Args:
        spec: ``{name: values}``; a list, tuple, range or 1-D array gives the values, any
            other value (a string, a number, ``None``) is the single value.

    Returns:
        One dict per combination, ordered like nested loops over the names in ``spec``'s
        order (the last name varies fastest). ``grid({})`` is ``[{}]``.

    Raises:
        ValueError: if a name has an empty list of values.
    """
    names = list(spec)
    choices = []
    for name in names:
        values = spec[name]
        if isinstance(values, (list, tuple, range, np.ndarray)):
            values = [_python_scalar(v) for v in values]
            if not values:
                raise ValueError(f"grid parameter {name!r} has no values")
        else:
            values = [_python_scalar(values)]
        choices.append(values)
    return [dict(zip(names, combination)) for combination in itertools.product(*choices)]


def params_key(params: Mapping[str, Any]) -> str:
    """Stable string key of a grid point: JSON of its parameters with sorted names."""
    return json.dumps({k: _python_scalar(v) for k, v in params.items()}, sort_keys=True, default=str)


# --------------------------------------------------------------------------- search
def _cell(value) -> str:
    """The text a parameter value is written as in the CSV file."""
    value = _python_scalar(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    return str(value)


def _metric_cell(value) -> str:
    return repr(float(value))


def _row_key(param_names: Sequence[str], cells: Sequence[str], fold_cell: str) -> tuple[str, str]:
    """Key matching a CSV row to a (grid point, fold): JSON of the sorted parameter cells.

    Parameters are compared in the text they are written as, which is what survives a
    round trip through the file whatever their type.
    """
    return json.dumps(dict(zip(param_names, cells)), sort_keys=True), fold_cell


def _read_existing(path: Path, param_names: list[str]) -> tuple[list[str] | None, dict]:
    """Metric names and ``{row key: metric texts}`` already in ``path`` (if any).

    A last line without its newline (a write cut short) is dropped from the file.
    """
    if not path.exists() or path.stat().st_size == 0:
        return None, {}
    with open(path, newline="") as handle:
        text = handle.read()
    if not text.endswith("\n"):
        cut = text.rfind("\n") + 1
        with open(path, "r+", newline="") as handle:
            handle.truncate(cut)
        text = text[:cut]
        if not text:
            return None, {}
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header = rows[0]
    expected = param_names + ["fold"]
    metric_names = header[len(expected):]
    if header[: len(expected)] != expected or not metric_names:
        raise ValueError(
            f"{path} has columns {header}, but this grid needs {expected} followed by the metrics; "
            "use another file or resume=False"
        )
    done = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path} line {line} has {len(row)} fields, the header {len(header)}")
        k = len(param_names)
        done[_row_key(param_names, row[:k], row[k])] = row[k + 1 :]
    return metric_names, done


def run_grid(
    evaluate: Callable[[dict, np.ndarray, np.ndarray], Mapping[str, float]],
    grid_points: Sequence[Mapping[str, Any]],
    folds,
    out_csv,
    *,
    resume: bool = True,
    on_start: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Cross-validate every grid point, writing each result to ``out_csv`` as it comes.

    For every grid point (in order) and every fold id ``f`` (ascending), calls
    ``evaluate(params, train_rows, valid_rows)`` with ``valid_rows`` the row indices whose
    fold is ``f`` and ``train_rows`` all the others (disjoint by construction). The
    returned ``{metric: value}`` is appended at once as a CSV row -- the grid parameters,
    ``fold``, then the metrics -- and flushed to disk, so a crash loses at most the
    evaluation in progress.

    With ``resume=True`` the rows already in ``out_csv`` are read first and the
    evaluations they record (same parameters, matched on a JSON key of the sorted
    parameters as written, and same fold) are skipped; a final line cut short by a crash
    is dropped. With ``resume=False`` the file is started afresh. Rows in the file for
    other grid points are kept in the file but not returned.

    Args:
        evaluate: ``evaluate(params, train_rows, valid_rows) -> {metric: float}``; every
            call must return the same metric names.
        grid_points: parameter dicts (e.g. from :func:`grid`), all with the same names
            and distinct values.
        folds: fold id per row ``[n]`` (integers, e.g. from :func:`within_task_folds`).
        out_csv: path of the results file.
        resume: skip evaluations already recorded in ``out_csv``.
        on_start: called once, before the first evaluation, with the number of
            evaluations of this grid already recorded in ``out_csv`` (e.g. to start a
            progress bar there).

    Returns:
        The full table, one row per (grid point, fold) in evaluation order: the parameter
        columns (with the values given in ``grid_points``), ``fold``, and the metrics
        (floats; read back from the file for resumed rows).

    Raises:
        ValueError: for grid points with different names or duplicates, a parameter or
            metric called ``fold``, non-integer folds, a metric named like a parameter,
            an evaluation returning other metric names than the file's, or an existing
            file whose columns do not match.
    """
    grid_points = [dict(p) for p in grid_points]
    if not grid_points:
        raise ValueError("run_grid needs at least one grid point")
    param_names = list(grid_points[0])
    for point in grid_points:
        if set(point) != set(param_names):
            raise ValueError(f"grid points must share their parameter names: {param_names} vs {list(point)}")
    grid_points = [{name: point[name] for name in param_names} for point in grid_points]
    if "fold" in param_names:
        raise ValueError("a grid parameter may not be called 'fold'")
    keys = [params_key(p) for p in grid_points]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"grid point {duplicate} appears more than once")

    folds = np.asarray(folds).reshape(-1)
    if not np.issubdtype(folds.dtype, np.integer):
        raise ValueError(f"folds must be integers, got dtype {folds.dtype}")
    fold_ids = [int(f) for f in np.unique(folds)]

    path = Path(out_csv)
    metric_names, done = (None, {}) if not resume else _read_existing(path, param_names)
    if not resume and path.exists():
        path.unlink()

    if on_start is not None:
        on_start(sum(_row_key(param_names, [_cell(point[name]) for name in param_names], str(fold)) in done
                     for point in grid_points for fold in fold_ids))
    records = []
    handle = None
    writer = None
    try:
        for point in grid_points:
            cells = [_cell(point[name]) for name in param_names]
            for fold in fold_ids:
                key = _row_key(param_names, cells, str(fold))
                if key in done:
                    metrics = {name: float(text) for name, text in zip(metric_names, done[key])}
                else:
                    valid_rows = np.flatnonzero(folds == fold)
                    train_rows = np.flatnonzero(folds != fold)
                    result = dict(evaluate(dict(point), train_rows, valid_rows))
                    if metric_names is None:
                        metric_names = list(result)
                        clash = {"fold", *param_names}.intersection(metric_names)
                        if not metric_names or clash:
                            raise ValueError(
                                f"evaluate must return metrics not named 'fold' or like a parameter; got {metric_names}"
                            )
                    if sorted(result) != sorted(metric_names):
                        raise ValueError(f"evaluate returned metrics {sorted(result)}, expected {sorted(metric_names)}")
                    metrics = {name: float(result[name]) for name in metric_names}
                    if handle is None:
                        new_file = not path.exists() or path.stat().st_size == 0
                        path.parent.mkdir(parents=True, exist_ok=True)
                        handle = open(path, "a", newline="")
                        writer = csv.writer(handle, lineterminator="\n")
                        if new_file:
                            writer.writerow(param_names + ["fold"] + metric_names)
                    writer.writerow(cells + [str(fold)] + [_metric_cell(metrics[m]) for m in metric_names])
                    handle.flush()
                    os.fsync(handle.fileno())
                records.append({**point, "fold": fold, **metrics})
    finally:
        if handle is not None:
            handle.close()
    return pd.DataFrame.from_records(records, columns=param_names + ["fold"] + list(metric_names or []))


# ------------------------------------------------------------------------ selection
def select(
    table: pd.DataFrame,
    metric: str,
    *,
    higher_is_better: bool = True,
    per_task_column: str | None = None,
    params: Sequence[str] | None = None,
) -> dict:
    """Best grid point by a metric averaged over folds, globally or per task.

    Args:
        table: evaluation results with parameter columns, ``fold`` and metric columns
            (the layout of :func:`run_grid`); with ``per_task_column``, also a task column
            (one row per grid point, fold and task).
        metric: the column to optimise; its mean over folds (NaNs skipped) is compared.
        higher_is_better: maximise (AUC, accuracy) or minimise (RMSE, loss).
        per_task_column: if given, choose a grid point for each task separately.
        params: the parameter columns; by default the columns before ``fold``, less the
            task column.

    Returns:
        Global selection: the best parameter dict. Per task: ``{task: parameter dict}``.
        Ties go to the grid point met first in ``table``.

    Raises:
        ValueError: for missing columns, or a task (or the table) whose metric is NaN for
            every grid point.
    """
    if metric not in table.columns:
        raise ValueError(f"metric {metric!r} is not a column of the table: {list(table.columns)}")
    if per_task_column is not None and per_task_column not in table.columns:
        raise ValueError(f"task column {per_task_column!r} is not in the table")
    if params is None:
        if "fold" not in table.columns:
            raise ValueError("the table has no 'fold' column; pass params= to name the parameter columns")
        params = list(table.columns[: list(table.columns).index("fold")])
        params = [c for c in params if c != per_task_column]
    params = list(params)
    missing = [c for c in params if c not in table.columns]
    if missing:
        raise ValueError(f"parameter columns {missing} are not in the table")

    work = table.copy()
    work["_point"] = [params_key(dict(zip(params, values))) for values in work[params].itertuples(index=False)]
    groups = ["_point"] if per_task_column is None else [per_task_column, "_point"]
    mean = work.groupby(groups, sort=False, dropna=False)[metric].mean()
    first_row = work.drop_duplicates("_point").set_index("_point")[params]

    def best(scores: pd.Series, where: str) -> dict:
        scores = scores.dropna()
        if scores.empty:
            raise ValueError(f"{metric!r} is NaN for every grid point{where}")
        point = scores.idxmax() if higher_is_better else scores.idxmin()
        return {name: _python_scalar(value) for name, value in first_row.loc[point].items()}

    if per_task_column is None:
        return best(mean, "")
    return {
        _python_scalar(task): best(scores.droplevel(0), f" of task {task!r}")
        for task, scores in mean.groupby(level=0, sort=False)
    }
