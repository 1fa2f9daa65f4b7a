r"""K-fold cross-validation within tasks over a hyperparameter grid (experiment ``"cv_grid"``).

::

    mtl-jax run configs/cv_grid_landmine.yaml --out-dir results

The experiment reads a per-person CSV, cross-validates one registered per-person model
(``mtl-net``, ``pooled-net``, ``stl-net``, ``logistic``, ``pooled-logistic``, ``lssvm``)
over a grid of hyperparameters on the training rows, picks the best setting (once for
all tasks, or per task), refits it on all training rows and scores the test rows once.
It is built on :mod:`mtl_jax.evaluate`.

Procedure
---------

1. **Rows.** The rows whose split is ``train`` or ``validation`` are the *CV rows*; the
   ``test`` rows never enter the search. A ``validation`` label has no special role here:
   such rows are CV rows like ``train`` rows.
2. **Folds.** :func:`mtl_jax.evaluate.within_task_folds` deals the CV rows into
   ``folds`` folds within each person (stratified by the label for a binary label with
   users as tasks), seeded with ``seed``.
3. **Search.** For every grid point and fold ``f`` the model is fitted
   (:func:`mtl_jax.fit`, ``method="map"``, seed ``seed``) on a frame holding only the CV
   rows of the other folds, all marked ``train``: the held-out rows are not in the data
   at all, so they inform neither the feature normalisation nor the early stopping (the
   MAP trainer holds out ``validation_fraction`` of the remaining rows for that by
   itself; models with their own solver have none). The fitted model then predicts the
   held-out rows and :func:`mtl_jax.metrics.task_metrics` scores them.
   :func:`mtl_jax.evaluate.run_grid` appends each evaluation to ``out_csv`` as soon as it
   is done, so an interrupted search resumes where it stopped (``resume``).
4. **Selection.** ``select: global`` picks the grid point with the best pooled metric
   averaged over folds; ``select: task`` picks, for every task, the grid point with the
   best mean over folds of that task's own metric (a task whose metric is undefined in
   every fold and grid point -- e.g. one class only -- gets the global choice). Ties go to
   the earlier grid point.
5. **Refit and test.** The chosen setting is refitted on all CV rows (per-task
   selection: one refit per distinct chosen grid point, each task predicted by the fit of
   its own choice; test rows of a person absent from the CV rows by the global choice)
   and the test rows, if there are any, are scored with ``task_metrics``.

CSV layout (wide)
-----------------

One row per (grid point, fold): the grid parameters (in the order of ``grid``), ``fold``,
then ``<metric>[pooled]`` (all held-out rows together), ``<metric>[task_mean]`` (the
unweighted mean over tasks), ``<metric>[<task>]`` for every task of the CV rows (persons
in order of first appearance; NaN where undefined, e.g. the AUC of a one-class fold),
``converged`` (1 or 0), ``steps`` (training steps or solver iterations) and ``seconds``
(fit and score). Floats are written as their reprs, lists (``hidden``) as ``[16]``.
Next to it, ``<out_csv stem>.settings.json`` records the settings that determine every
evaluation (data, data options, split, model, fixed options, training, folds, seed);
resuming against a file written with other settings is refused, so stale evaluations are
never reused. Adding grid values and rerunning only runs the new grid points.

Config keys
-----------

``experiment``
    ``cv_grid``.
``data``
    Path of the CSV file (required); ``{data_dir}`` is replaced by
    :func:`mtl_jax.data.settings.data_dir`.
``data_options``
    Keywords of :meth:`mtl_jax.data.personal.PersonData.from_dataframe`: ``person``
    (required), ``labels``, ``features``, ``tasks`` (``users`` or ``labels``),
    ``timestamp``, ``split``, ``normalise``, ``missing``, ``categorical``, ``positive``.
``split_fraction``
    Optional training share in ``(0, 1)`` used when the CSV has no split column (the
    column named by ``data_options.split``, or none named): the experiment then makes a
    split column (``data_options.split``, default ``split``) with this share of each
    person's rows -- of each person and class for a binary label with users as tasks --
    drawn at random (seeded with ``seed``) as ``train`` and the rest ``test``. Ignored
    when the CSV has the split column. Without it and without a split column every row
    is a CV row and nothing is tested.
``model``
    A registered per-person model name (default ``mtl-net``).
``options``
    Fixed model options (the model dataclass's fields, e.g. ``hidden: [16]``; lists become
    tuples).
``training``
    Fixed MAP training options (:func:`mtl_jax.infer.optimize.train`: ``max_steps``,
    ``learning_rate``, ``lr_decay``, ``task_sampling``, ``task_weighting``,
    ``gradnorm_alpha``, ``eval_every``, ``patience``, ``validation_fraction``). Models
    fitted by their own solver (``logistic``, ``pooled-logistic``, ``lssvm``) take none.
``grid``
    ``{name: [values, ...]}``, expanded by :func:`mtl_jax.evaluate.grid` (the last name
    varies fastest; a non-list value is a single value). Each name is a field of the
    model's dataclass (a model option) or a training option; any other name is an error.
    A list-valued option lists its values as lists: ``hidden: [[8], [16, 16]]``.
    ``{}`` cross-validates the fixed setting alone.
``folds``
    Number of folds, at least 2 (default 3).
``metric``
    A column of :func:`mtl_jax.metrics.task_metrics`: ``auc``, ``accuracy``,
    ``precision``, ``recall``, ``f1``, ``balanced_accuracy`` (binary labels) or ``rmse``
    (real labels). Default ``auc`` for binary labels, ``rmse`` otherwise.
``higher_is_better``
    Whether a larger metric is better; default ``false`` for ``rmse``, else ``true``.
``select``
    ``global`` (default) or ``task``.
``name``
    Optional name of the run, the stem of the default ``out_csv`` (``mtl-jax run`` does
    not pass the YAML file's name to the experiment, so set it to that stem to get
    ``results/<config stem>.csv``).
``out_csv``
    The CV results file (default ``results/<name or "cv_grid">.csv``); a relative path is
    relative to the working directory.
``resume``
    Skip evaluations already in ``out_csv`` (default ``true``); ``false`` starts afresh.
``seed``
    Seed of the split, the folds and every fit (default 0).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from mtl_jax.data.personal import PersonData
from mtl_jax.data.settings import data_dir
from mtl_jax.data.tabular import _label
from mtl_jax.evaluate import grid, params_key, run_grid, select, within_task_folds
from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.infer.fit import FitWarning, fit
from mtl_jax.infer.optimize import train
from mtl_jax.metrics import BINARY_COLUMNS, REGRESSION_COLUMNS, task_metrics
from mtl_jax.models.protocol import model_class

DEFAULT_CONFIG = {
    "experiment": "cv_grid",
    "name": None,
    "data": None,
    "data_options": {},
    "split_fraction": None,
    "model": "mtl-net",
    "options": {},
    "training": {},
    "grid": {},
    "folds": 3,
    "metric": None,
    "higher_is_better": None,
    "select": "global",
    "out_csv": None,
    "resume": True,
    "seed": 0,
}
"""Every config key with its default (``data`` and ``data_options.person`` are required)."""

TRAINING_OPTIONS = tuple(name for name in inspect.signature(train).parameters
                         if name not in ("model", "design", "key", "init_params", "progress"))
"""MAP training options a grid or ``training`` may set (models trained by :func:`~mtl_jax.infer.optimize.train`)."""

SELECTIONS = ("global", "task")


# ------------------------------------------------------------------------ options
def option_kinds(model: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(model options, training options)`` that ``model`` accepts.

    Model options are the fields of the registered dataclass; training options are
    :data:`TRAINING_OPTIONS`, or none for a model fitted by its own solver (``solve``).
    """
    cls = model_class(model)
    fields = tuple(f.name for f in dataclasses.fields(cls) if f.init)
    return fields, (() if hasattr(cls, "solve") else TRAINING_OPTIONS)


def _option_value(value):
    """A config value as the model takes it: lists become tuples."""
    return tuple(value) if isinstance(value, list) else value


def split_params(model: str, params: dict) -> tuple[dict, dict]:
    """A grid point's ``(model options, training options)``.

    Raises:
        ValueError: for a name that is neither, listing what ``model`` accepts.
    """
    fields, training = option_kinds(model)
    unknown = [name for name in params if name not in fields and name not in training]
    if unknown:
        raise ValueError(f"grid names {unknown} are neither options of model {model!r} ({list(fields)}) nor "
                         f"training options ({list(training) or 'none: it is fitted by its own solver'})")
    return ({k: _option_value(v) for k, v in params.items() if k in fields},
            {k: v for k, v in params.items() if k in training})


def _check_fixed(model: str, options: dict, training: dict, grid_names) -> None:
    fields, training_names = option_kinds(model)
    bad = [k for k in options if k not in fields]
    if bad:
        raise ValueError(f"options {bad} are not options of model {model!r}; it has {list(fields)}")
    bad = [k for k in training if k not in training_names]
    if bad:
        raise ValueError(f"training options {bad} are not accepted by model {model!r}; "
                         f"it takes {list(training_names) or 'none (it is fitted by its own solver)'}")
    both = sorted(set(grid_names) & (set(options) | set(training)))
    if both:
        raise ValueError(f"{both} are both fixed (options/training) and in the grid; give each in one place")


# ---------------------------------------------------------------------- fit, score
def fit_on_frame(model, frame: pd.DataFrame, data_options: dict, training: dict, seed: int):
    """Encode ``frame`` (its training rows set the encoding) and fit ``model`` by MAP (warnings kept in the fit)."""
    data = PersonData.from_dataframe(frame, **data_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        return fit(model, data, method="map", seed=seed, **training)


def predict_rows(fitted, frame: pd.DataFrame) -> np.ndarray:
    """Predictions ``[rows, labels]`` of a fit for the rows of ``frame`` (probabilities or means)."""
    return np.asarray(fitted.predict(frame), dtype=np.float64).reshape(len(frame), -1)


class _Rows:
    """What scoring needs of a set of rows: labels ``Y [n, L]`` (NaN where missing) and person per row."""

    def __init__(self, frame: pd.DataFrame, data_options: dict):
        """The labels of every row of ``frame``, encoded as a training frame would encode them."""
        encoded = PersonData.from_dataframe(frame.assign(**{data_options["split"]: "train"}), **data_options)
        L = encoded.num_labels
        y = np.asarray(encoded.y, dtype=np.float64).reshape(-1, L)
        weight = np.asarray(encoded.weight).reshape(-1, L)
        self.Y = np.where(weight > 0, y, np.nan)
        self.person = np.asarray([_label(v) for v in frame[data_options["person"]]], dtype=object)
        self.labels = list(encoded.schema.labels)
        self.tasks = encoded.schema.tasks
        binary = set(bool(b) for b in encoded.schema.binary)
        if len(binary) > 1:
            raise ValueError(f"labels {self.labels} mix binary and real labels; cross-validate them separately")
        self.kind = "binary" if binary == {True} else "regression"

    def take(self, rows) -> _Rows:
        """The same for a subset of the rows (indices or a mask)."""
        part = object.__new__(_Rows)
        part.__dict__.update(self.__dict__, Y=self.Y[rows], person=self.person[rows])
        return part

    def task_names(self) -> list[str]:
        """The tasks: the persons in order of first appearance, or the labels with labels as tasks."""
        if self.tasks == "labels":
            return list(self.labels)
        return list(dict.fromkeys(self.person))

    def table(self, rows: np.ndarray, prediction: np.ndarray) -> pd.DataFrame:
        """:func:`task_metrics` of ``prediction [len(rows), L]`` on ``rows``."""
        Y = self.Y[rows]
        if self.tasks == "labels":
            task = np.tile(np.arange(len(self.labels)), len(rows))
            return task_metrics(Y.reshape(-1), prediction.reshape(-1), task, kind=self.kind, names=self.labels)
        return task_metrics(Y[:, 0], prediction[:, 0], self.person[rows], kind=self.kind)


# -------------------------------------------------------------------------- config
def _resolve(config: dict) -> dict:
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown cv_grid settings {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    for key in ("data_options", "options", "training", "grid"):
        config[key] = dict(config[key] or {})
    if not config["data"]:
        raise ValueError("cv_grid needs 'data', the path of a CSV file")
    if "person" not in config["data_options"]:
        raise ValueError("cv_grid needs data_options.person, the person column")
    if config["select"] not in SELECTIONS:
        raise ValueError(f"select must be one of {list(SELECTIONS)}, not {config['select']!r}")
    folds = config["folds"]
    if isinstance(folds, bool) or int(folds) != folds or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, not {folds!r}")
    config["folds"] = int(folds)
    fraction = config["split_fraction"]
    if fraction is not None and not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"split_fraction must be in (0, 1), not {fraction!r}")
    model_class(config["model"])  # an unknown model is an error now, not after reading the data
    _check_fixed(config["model"], config["options"], config["training"], config["grid"])
    split_params(config["model"], dict.fromkeys(config["grid"]))
    return config


def make_split(frame: pd.DataFrame, person: str, label: str | None, fraction: float, seed: int) -> np.ndarray:
    """``train`` for a random ``fraction`` of each person's rows (of each person and class
    when ``label`` is given; rounded to the nearest row), ``test`` for the rest."""
    rng = np.random.default_rng(seed)
    split = np.full(len(frame), "test", dtype=object)
    keys = [person] if label is None else [person, label]
    for _, rows in sorted(frame.groupby(keys, dropna=False, sort=False).indices.items(), key=lambda item: str(item[0])):
        chosen = rng.permutation(rows)[: int(round(fraction * len(rows)))]
        split[chosen] = "train"
    return split


def _read_frame(config: dict) -> tuple[pd.DataFrame, dict, str]:
    """The CSV with a split column, the data options naming it, and where the split came from."""
    path = str(config["data"])
    if "{data_dir}" in path:
        path = path.replace("{data_dir}", str(data_dir()))
    frame = pd.read_csv(path)
    options = dict(config["data_options"])
    for key in ("labels", "features", "categorical"):
        if isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    named = options.get("split")
    column = named or "split"
    if named and named in frame.columns:
        return frame, options, f"column {named!r}"
    if not named and column in frame.columns:
        raise ValueError(f"{path} has a column {column!r} but data_options.split names none; name it there "
                         "(to use it as the split) or rename it")
    if named and config["split_fraction"] is None:
        raise ValueError(f"{path} has no split column {named!r}; add it or give split_fraction")
    options["split"] = column
    if config["split_fraction"] is None:
        return frame.assign(**{column: "train"}), options, "none (every row is a CV row; no test rows)"
    labels = options.get("labels")
    stratify = None
    if options.get("tasks", "users") == "users":
        stratify = labels if isinstance(labels, str) else (labels[0] if labels and len(labels) == 1 else None)
        if stratify is not None and frame[stratify].dropna().nunique() != 2:
            stratify = None  # a real label: split within persons only
    fraction = float(config["split_fraction"])
    split = make_split(frame, options["person"], stratify, fraction, int(config["seed"]))
    return frame.assign(**{column: split}), options, f"random {fraction:g} train within persons (seed {config['seed']})"


def _settings_guard(path: Path, settings: dict, resume: bool) -> None:
    """Refuse to resume ``path`` if it was written with other settings; record the settings."""
    side = path.with_name(path.stem + ".settings.json")
    text = json.dumps(settings, sort_keys=True, default=str, indent=1)
    if resume and path.exists() and path.stat().st_size > 0 and side.exists():
        old = json.loads(side.read_text())
        if old != json.loads(text):
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != json.loads(text).get(k))
            raise ValueError(f"{path} was written with other settings ({changed} differ, see {side}); "
                             "set resume: false or choose another out_csv")
    side.parent.mkdir(parents=True, exist_ok=True)
    side.write_text(text)


# --------------------------------------------------------------------------- runner
def run_cv_grid(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Cross-validate a grid, select, refit and test (module docstring).

    The study's units are its evaluations (grid point, fold), recorded in ``out_csv``
    (:func:`mtl_jax.evaluate.run_grid`, which flushes and fsyncs every row and drops a row
    cut short) rather than in ``checkpoint``'s journal; ``checkpoint`` draws the progress
    bar, and its ``resume=False`` (``mtl-jax run --fresh``) starts ``out_csv`` afresh as
    ``resume: false`` does.

    Returns:
        A JSON-serialisable dict: ``config`` (with defaults), ``out_csv``, ``split``
        (where the split came from and the row counts), ``cv`` (per grid point in grid
        order: ``params``, mean and sd over folds of the pooled and task-mean metric,
        share converged, mean seconds), ``selection`` (``mode``; ``params`` -- global: the
        chosen point, per task: ``{task: point}`` --, ``global_params``, ``fallback_tasks``
        and the chosen CV score), ``test`` (``pooled``, ``task_mean`` and ``per_task``
        metrics of the test rows, ``refits``; None without test rows), ``evaluations_run``
        (how many fits this call made, resumed ones excluded) and ``table`` (the printed
        text).

    Raises:
        ValueError: for unknown settings, grid names that are neither model nor training
            options, a metric the labels do not have, or a results file of other settings.
    """
    config = _resolve(config)
    seed, metric_name, model_name = int(config["seed"]), config["metric"], config["model"]
    frame, data_options, split_source = _read_frame(config)
    split_column = data_options["split"]
    split_values = frame[split_column].astype(str).str.lower().to_numpy()
    in_cv, in_test = np.isin(split_values, ("train", "validation")), split_values == "test"
    if not in_cv.any():
        raise ValueError("no training or validation rows to cross-validate")
    all_rows = _Rows(frame, data_options)
    cv_frame, rows = frame[in_cv].reset_index(drop=True), all_rows.take(in_cv)
    test_frame, test_rows = frame[in_test].reset_index(drop=True), all_rows.take(in_test)
    columns = BINARY_COLUMNS[1:] if rows.kind == "binary" else REGRESSION_COLUMNS[1:]
    metric_name = metric_name or columns[0]
    if metric_name not in columns:
        raise ValueError(f"metric {metric_name!r} is not a {rows.kind} metric of task_metrics; choose one of "
                         f"{list(columns)}")
    higher = config["higher_is_better"]
    higher = (metric_name != "rmse") if higher is None else bool(higher)
    config.update(metric=metric_name, higher_is_better=higher)

    stratify = rows.Y[:, 0] if rows.kind == "binary" and rows.tasks == "users" else None
    folds = within_task_folds(rows.person, config["folds"], seed=seed, stratify=stratify)
    points = grid(config["grid"])
    param_names = list(config["grid"])
    index_of = {params_key(p): i for i, p in enumerate(points)}
    tasks = rows.task_names()
    task_columns = {task: f"{metric_name}[{task}]" for task in tasks}
    base_options = {k: _option_value(v) for k, v in config["options"].items()}

    def build(params: dict):
        options, training = split_params(model_name, params)
        model = model_class(model_name)(**{**base_options, **options})
        return model, {**config["training"], **training}

    count = [0]

    def evaluate(params: dict, train_rows: np.ndarray, valid_rows: np.ndarray) -> dict:
        model, training = build(params)
        start = time.perf_counter()
        fitted = fit_on_frame(model, cv_frame.iloc[train_rows].assign(**{split_column: "train"}), data_options,
                              training, seed)
        table = rows.table(valid_rows, predict_rows(fitted, cv_frame.iloc[valid_rows]))
        seconds = time.perf_counter() - start
        values = table[metric_name]
        result = {f"{metric_name}[pooled]": values["pooled"], f"{metric_name}[task_mean]": values["task_mean"]}
        result.update({column: values.get(task, np.nan) for task, column in task_columns.items()})
        result.update(converged=float(fitted.converged), steps=float(fitted.n_iter), seconds=seconds)
        count[0] += 1
        checkpoint.tick()
        if progress:
            fold = int(folds[valid_rows[0]])
            checkpoint.write(f"[{index_of[params_key(params)] + 1}/{len(points)}] {params_key(params)} fold {fold}: "
                             f"{metric_name} pooled {values['pooled']:.4f}, task mean {values['task_mean']:.4f} "
                             f"({seconds:.1f} s)")
        return result

    out_csv = Path(config["out_csv"] or Path("results") / f"{config['name'] or 'cv_grid'}.csv")
    settings = {key: config[key] for key in ("data", "data_options", "split_fraction", "model", "options",
                                             "training", "folds", "seed")}
    checkpoint = checkpoint or Checkpoint()
    resume = bool(config["resume"]) and checkpoint.resume
    _settings_guard(out_csv, settings, resume)
    if progress:
        print(f"cv_grid: {model_name}, {len(points)} grid points x {config['folds']} folds on {len(cv_frame)} rows "
              f"({len(tasks)} tasks), {len(test_frame)} test rows; results in {out_csv}", flush=True)
    total = len(points) * len(np.unique(folds))
    table = run_grid(evaluate, points, folds, out_csv, resume=resume,
                     on_start=lambda done: checkpoint.start(total, "cv_grid evaluations", done=done))

    # --------------------------------------------------------------- summary, selection
    pooled_col, mean_col = f"{metric_name}[pooled]", f"{metric_name}[task_mean]"
    point_of_row = [params_key({n: table.at[i, n] for n in param_names}) for i in table.index]
    table = table.assign(_point=point_of_row)
    cv = []
    for point in points:
        part = table[table["_point"] == params_key(point)]
        cv.append({"params": point, "mean": _mean(part[pooled_col]), "sd": _sd(part[pooled_col]),
                   "task_mean": _mean(part[mean_col]), "task_mean_sd": _sd(part[mean_col]),
                   "converged": float(part["converged"].mean()), "seconds": float(part["seconds"].mean())})
    table = table.drop(columns="_point")
    global_choice = select(table, pooled_col, higher_is_better=higher, params=param_names)
    selection = {"mode": config["select"], "metric": metric_name, "higher_is_better": higher,
                 "global_params": global_choice,
                 "global_cv": next(e["mean"] for e in cv if params_key(e["params"]) == params_key(global_choice))}
    if config["select"] == "global":
        selection.update(params=global_choice, fallback_tasks=[])
        chosen = {}
    else:
        chosen, fallback = select_per_task(table, metric_name, tasks, param_names, higher)
        selection.update(params={task: chosen.get(task, global_choice) for task in tasks}, fallback_tasks=fallback)

    # ------------------------------------------------------------------ refit and test
    test = None
    if len(test_frame):
        test = refit_and_test(cv_frame, test_frame, test_rows, data_options, split_column, build, seed, chosen,
                              global_choice)
    text = format_table(cv, param_names, selection, test, config, len(cv_frame), len(test_frame))
    if progress:
        print(text, flush=True)
    return {"experiment": "cv_grid", "config": config, "out_csv": str(out_csv),
            "split": {"source": split_source, "cv_rows": len(cv_frame), "test_rows": len(test_frame),
                      "tasks": len(tasks)},
            "cv": cv, "selection": selection, "test": test, "evaluations_run": count[0], "table": text}


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def _sd(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def select_per_task(table: pd.DataFrame, metric: str, tasks, param_names, higher: bool) -> tuple[dict, list]:
    """``({task: grid point}, tasks without a finite metric)`` from the wide CV table.

    Each task's grid point maximises (minimises) the mean over folds of ``<metric>[task]``
    (:func:`mtl_jax.evaluate.select` on the table in long form).
    """
    columns = {f"{metric}[{task}]": task for task in tasks}
    long = table.melt(id_vars=[*param_names, "fold"], value_vars=list(columns), var_name="task", value_name=metric)
    long["task"] = long["task"].map(columns)
    finite = long.groupby("task", sort=False)[metric].apply(lambda v: bool(np.isfinite(v).any()))
    fallback = [task for task in tasks if not finite.get(task, False)]
    long = long[~long["task"].isin(fallback)]
    if long.empty:
        return {}, fallback
    long = long[[*param_names, "task", "fold", metric]]
    chosen = select(long, metric, higher_is_better=higher, per_task_column="task", params=param_names)
    return {str(task): point for task, point in chosen.items()}, fallback


def refit_and_test(cv_frame, test_frame, test_rows: _Rows, data_options, split_column, build, seed, chosen: dict,
                   global_choice: dict) -> dict:
    """Refit on all CV rows and score the test rows: one fit per distinct chosen grid point."""
    n, L = len(test_frame), len(test_rows.labels)
    if test_rows.tasks == "labels":
        owner = np.tile(np.asarray(test_rows.labels, dtype=object), (n, 1))  # task of each (row, label)
    else:
        owner = np.repeat(test_rows.person[:, None], L, axis=1)
    key_of = np.vectorize(lambda task: params_key(chosen.get(task, global_choice)), otypes=[object])(owner)
    points = {params_key(p): p for p in [global_choice, *chosen.values()]}
    training_frame = cv_frame.assign(**{split_column: "train"})
    prediction = np.full((n, L), np.nan)
    refits = []
    for key in dict.fromkeys(key_of.reshape(-1)):
        model, training = build(points[key])
        start = time.perf_counter()
        fitted = fit_on_frame(model, training_frame, data_options, training, seed)
        mask = key_of == key
        needed = np.flatnonzero(mask.any(axis=1))
        predicted = predict_rows(fitted, test_frame.iloc[needed])
        prediction[needed] = np.where(mask[needed], predicted, prediction[needed])
        refits.append({"params": points[key], "converged": bool(fitted.converged), "steps": int(fitted.n_iter),
                       "seconds": time.perf_counter() - start})
    table = test_rows.table(np.arange(n), prediction)
    return {"pooled": table.loc["pooled"].to_dict(), "task_mean": table.loc["task_mean"].to_dict(),
            "per_task": table.drop(index=["pooled", "task_mean"]).to_dict(orient="index"), "refits": refits}


def format_table(cv: list, param_names, selection: dict, test: dict | None, config: dict, cv_rows: int,
                 test_rows: int) -> str:
    """The CV table (mean (sd) over folds per grid point), the selection and the test metrics."""
    metric = selection["metric"]
    rows = []
    counts = {}
    if selection["mode"] == "task":
        for point in selection["params"].values():
            counts[params_key(point)] = counts.get(params_key(point), 0) + 1
    for entry in cv:
        row = {name: _text(entry["params"][name]) for name in param_names}
        row[f"{metric} pooled"] = f"{entry['mean']:.4f} ({entry['sd']:.4f})"
        row[f"{metric} task mean"] = f"{entry['task_mean']:.4f} ({entry['task_mean_sd']:.4f})"
        row["converged"] = f"{entry['converged']:.2f}"
        row["s/fit"] = f"{entry['seconds']:.1f}"
        key = params_key(entry["params"])
        if selection["mode"] == "global":
            row["chosen"] = "*" if key == params_key(selection["params"]) else ""
        else:
            row["tasks"] = counts.get(key, 0)
        rows.append(row)
    direction = "higher" if selection["higher_is_better"] else "lower"
    lines = [f"{config['model']}: {config['folds']}-fold CV within tasks on {cv_rows} rows, {metric} "
             f"({direction} is better), mean (sd) over folds",
             pd.DataFrame(rows).to_string(index=False)]
    if selection["mode"] == "global":
        lines.append(f"selected (global, pooled {metric}): {params_key(selection['params'])}")
    else:
        lines.append(f"selected per task: {len(counts)} distinct grid points; tasks per point in 'tasks'"
                     + (f"; {len(selection['fallback_tasks'])} task(s) without a finite {metric} take the global "
                        f"choice {params_key(selection['global_params'])}" if selection["fallback_tasks"] else ""))
    if test is None:
        lines.append("no test rows: nothing refitted or tested")
    else:
        shown = [c for c in ("auc", "accuracy", "f1", "balanced_accuracy", "rmse") if c in test["pooled"]]
        lines.append(f"test ({test_rows} rows; {len(test['refits'])} refit(s) on all {cv_rows} CV rows): "
                     + ", ".join(f"{c} pooled {test['pooled'][c]:.4f} / task mean {test['task_mean'][c]:.4f}"
                                 for c in shown))
    return "\n".join(lines)


def _text(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
