"""Flat storage of multitask tabular data.

A multitask data set is held "long": one row per observation, with an integer task id per
row. :class:`TaskData` stores the encoded design matrix, the responses and the task ids as
JAX arrays, plus the :class:`Schema` that describes how the raw ``pandas`` columns were
encoded, so that new data (test sets, prediction inputs) can be encoded identically.

Encoding rules:

* Column 0 of the design is ``"intercept"`` (all ones) when ``intercept=True``.
* Covariates follow in the order given. A categorical covariate with sorted levels
  ``l0 < l1 < ...`` becomes dummy columns ``f"{col}[{l1}]"``, ``f"{col}[{l2}]"``, ...;
  ``l0`` is the reference level and gets no column.
* A continuous covariate keeps its name and, when standardised, is mapped to
  ``(x - mean) / sd`` with the mean and population sd (``ddof=0``) of the data the schema
  was fitted on.
* Responses are never transformed.
* Arrays use JAX's default float dtype (float32 unless x64 is enabled); task ids are int32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float, Int

INTERCEPT = "intercept"
"""Name of the all-ones design column."""


class DataError(ValueError):
    """A data frame cannot be encoded as a valid multitask data set."""


@dataclasses.dataclass(frozen=True)
class Schema:
    """How the raw columns of a data frame map to the encoded design.

    The schema is immutable and hashable (it only holds tuples), so it can be a static
    field of a JAX pytree.

    Attributes:
        task: Name of the column holding the task labels.
        response: Names of the p response columns.
        covariates: Names of the source covariate columns, in design order.
        categorical: ``(column, levels)`` pairs for the dummy-coded covariates. Levels are
            string labels sorted by their raw values; the first is the reference level.
        standardized: ``(column, mean, sd)`` triples for the continuous covariates that are
            standardised. Continuous covariates not listed here are used as they are.
        intercept: Whether design column 0 is an all-ones intercept.
        trials: Column of binomial trials per row (``TaskData.trials``), or None.
        offset: Column added to the linear predictor of each row (``TaskData.offset``,
            e.g. a log exposure for counts), or None.
        response_levels: ``(negative, positive)`` labels of a two-level text (or boolean)
            response coded 0 and 1, or None for a numeric response.
    """

    task: str
    response: tuple[str, ...]
    covariates: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    standardized: tuple[tuple[str, float, float], ...] = ()
    intercept: bool = True
    trials: str | None = None
    offset: str | None = None
    response_levels: tuple[str, str] | None = None

    def encoded_names(self, column: str) -> tuple[str, ...]:
        """Names of the encoded design columns derived from one source covariate.

        Args:
            column: A source covariate name.

        Returns:
            The dummy column names of a categorical covariate, or ``(column,)``.
        """
        levels = dict(self.categorical).get(column)
        if levels is None:
            return (column,)
        return tuple(f"{column}[{level}]" for level in levels[1:])

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the q encoded design columns, intercept first when present."""
        names = [INTERCEPT] if self.intercept else []
        for column in self.covariates:
            names.extend(self.encoded_names(column))
        return tuple(names)

    @property
    def groups(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``(source column, encoded column indices)`` pairs, one per covariate."""
        start = int(self.intercept)
        groups = []
        for column in self.covariates:
            width = len(self.encoded_names(column))
            groups.append((column, tuple(range(start, start + width))))
            start += width
        return tuple(groups)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable description of the schema (see :meth:`from_dict`)."""
        return {
            "task": self.task,
            "response": list(self.response),
            "covariates": list(self.covariates),
            "categorical": [
                {"column": column, "levels": list(levels)}
                for column, levels in self.categorical
            ],
            "standardized": [
                {"column": column, "mean": mean, "sd": sd}
                for column, mean, sd in self.standardized
            ],
            "intercept": self.intercept,
            "trials": self.trials,
            "offset": self.offset,
            "response_levels": None if self.response_levels is None else list(self.response_levels),
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> Schema:
        """Rebuilds a schema from the output of :meth:`to_dict`.

        Args:
            spec: A dictionary as produced by :meth:`to_dict` (e.g. after a JSON round trip).

        Returns:
            A schema equal to the one that produced ``spec`` (a
            :class:`~mtl_jax.data.formula.FormulaSchema` for ``kind == "formula"``).
        """
        if spec.get("kind") == "formula":
            from mtl_jax.data.formula import FormulaSchema  # lazy: formula.py imports this module

            return FormulaSchema.from_dict(spec)
        return cls(
            task=spec["task"],
            response=tuple(spec["response"]),
            covariates=tuple(spec["covariates"]),
            categorical=tuple(
                (item["column"], tuple(item["levels"])) for item in spec["categorical"]
            ),
            standardized=tuple(
                (item["column"], float(item["mean"]), float(item["sd"]))
                for item in spec["standardized"]
            ),
            intercept=bool(spec["intercept"]),
            trials=spec.get("trials"),
            offset=spec.get("offset"),
            response_levels=None if spec.get("response_levels") is None else tuple(spec["response_levels"]),
        )

    def task_labels(self, frame: pd.DataFrame) -> tuple[str, ...]:
        """Distinct task labels of ``frame`` in order of first appearance.

        Raises:
            DataError: If the task column is missing or has a missing value.
        """
        _require_columns(frame, (self.task,))
        return tuple(pd.unique(_labels(frame, self.task, None)))

    def transform(
        self,
        frame: pd.DataFrame,
        *,
        require_response: bool = True,
        task_names: Sequence[Any] | None = None,
    ) -> TaskData:
        """Encodes new data with the stored levels, means and sds.

        Args:
            frame: Data frame with the task column, the covariate columns and (when
                ``require_response``) the response columns.
            require_response: If False the response columns are neither read nor
                validated, and ``y`` is filled with NaN (shape [n, p]); use this to build
                prediction inputs.
            task_names: Task labels defining the task ids, e.g. ``train.task_names`` to
                index new rows consistently with the training data. Listed tasks may have
                no rows here; rows whose task is not listed are an error. If None, the
                tasks of ``frame`` are numbered in order of first appearance.

        Returns:
            The encoded data; its ``schema`` is this schema.

        Raises:
            DataError: On missing columns, an empty frame, missing or non-finite values, a
                non-numeric response or continuous covariate, a categorical level not seen
                when the schema was fitted, or (with ``task_names``) an unlisted task.
        """
        return self._encode(
            frame, require_response=require_response, task_names=task_names, is_fit=False
        )

    def _source_columns(self) -> tuple[str, ...]:
        """Data columns the design reads (the covariates)."""
        return self.covariates

    def _design(self, frame: pd.DataFrame, task_labels: np.ndarray) -> np.ndarray:
        """The encoded design of ``frame``, shape [n, q] (see the module docstring).

        Args:
            frame: Raw data frame with the covariate columns.
            task_labels: Task label per row, shape [n], for error messages.

        Raises:
            DataError: for a non-numeric, missing or non-finite continuous value, or an
                unseen categorical level.
        """
        n = len(frame)
        levels_of = dict(self.categorical)
        scale_of = {column: (mean, sd) for column, mean, sd in self.standardized}
        blocks = [np.ones((n, 1))] if self.intercept else []
        for column in self.covariates:
            if column in levels_of:
                blocks.append(_dummies(frame, column, levels_of[column], task_labels))
                continue
            values = _floats(frame, column, task_labels, "covariate")
            if column in scale_of:
                mean, sd = scale_of[column]
                values = (values - mean) / sd
            blocks.append(values[:, None])
        return np.concatenate(blocks, axis=1) if blocks else np.empty((n, 0))

    def _encode(
        self,
        frame: pd.DataFrame,
        *,
        require_response: bool,
        task_names: Sequence[Any] | None,
        is_fit: bool,
    ) -> TaskData:
        """Encodes ``frame``; see :meth:`transform`.

        Args:
            frame: Raw data frame.
            require_response: Whether to read and validate the response columns.
            task_names: Task labels defining the task ids, or None for first appearance.
            is_fit: True when encoding the data the schema was fitted on. Then every
                listed task must have rows and the design must have full column rank.

        Returns:
            The encoded data.
        """
        extra = tuple(column for column in (self.trials, self.offset) if column is not None)
        needed = (self.task, *self._source_columns(), *extra, *(self.response if require_response else ()))
        _require_columns(frame, needed)
        if len(frame) == 0:
            raise DataError("the data frame has no rows")

        labels = _labels(frame, self.task, None)
        task_ids, names = _task_ids(frame, labels, task_names, allow_empty=not is_fit)

        n = len(frame)
        if require_response and self.response_levels is not None:
            y = _binary_codes(frame, self.response[0], self.response_levels, labels)[:, None]
        elif require_response:
            y = np.column_stack(
                [_floats(frame, column, labels, "response") for column in self.response]
            )
        else:
            y = np.full((n, len(self.response)), np.nan)

        X = self._design(frame, labels)

        if is_fit:
            dependent = _dependent_columns(X)
            if dependent:
                culprits = ", ".join(repr(self.columns[j]) for j in dependent)
                raise DataError(
                    "the design matrix is rank deficient: column(s) "
                    f"{culprits} are linear combinations of earlier columns"
                )

        return TaskData(
            X=jnp.asarray(X),
            y=jnp.asarray(y),
            task=jnp.asarray(task_ids, dtype=jnp.int32),
            task_names=names,
            columns=self.columns,
            response_names=self.response,
            schema=self,
            trials=None if self.trials is None else jnp.asarray(_floats(frame, self.trials, labels, "trials")),
            offset=None if self.offset is None else jnp.asarray(_floats(frame, self.offset, labels, "offset")),
        )


class TaskData(eqx.Module):
    """Encoded multitask data: one row per observation, tasks given by integer ids.

    Attributes:
        X: Encoded design, shape [n, q]. Column 0 is ``"intercept"`` (all ones) when the
            schema has an intercept.
        y: Responses, shape [n, p] (always 2-D).
        task: Task id of each row, int32 in ``[0, num_tasks)``, shape [n].
        task_names: Original task label (as a string) of each task id, length K.
        columns: Encoded column names, length q (equal to ``schema.columns``).
        response_names: Response column names, length p (equal to ``schema.response``).
        schema: How the raw columns were encoded; use ``schema.transform`` for new data.
        trials: Binomial trials per row, shape [n], or None (the schema's ``trials`` column).
        offset: Offset of each row's linear predictor, shape [n], or None.
    """

    X: Float[Array, "n q"]
    y: Float[Array, "n p"]
    task: Int[Array, " n"]
    task_names: tuple[str, ...] = eqx.field(static=True)
    columns: tuple[str, ...] = eqx.field(static=True)
    response_names: tuple[str, ...] = eqx.field(static=True)
    schema: Schema = eqx.field(static=True)
    trials: Float[Array, " n"] | None = None
    offset: Float[Array, " n"] | None = None

    def __check_init__(self) -> None:
        """Checks that array shapes and names agree with each other."""
        n = self.X.shape[0]
        if self.X.ndim != 2 or self.y.ndim != 2 or self.task.shape != (n,):
            raise ValueError(
                f"expected X [n, q], y [n, p] and task [n]; got shapes {self.X.shape}, "
                f"{self.y.shape} and {self.task.shape}"
            )
        if self.y.shape[0] != n:
            raise ValueError(f"X has {n} rows but y has {self.y.shape[0]}")
        if self.columns != self.schema.columns or len(self.columns) != self.X.shape[1]:
            raise ValueError("columns must equal schema.columns and match X.shape[1]")
        if (
            self.response_names != self.schema.response
            or len(self.response_names) != self.y.shape[1]
        ):
            raise ValueError("response_names must equal schema.response and match y.shape[1]")

    @classmethod
    def from_dataframe(
        cls,
        frame: pd.DataFrame,
        *,
        task: str,
        response: str | Sequence[str],
        covariates: Sequence[str],
        categorical: Sequence[str] = (),
        standardize: bool = True,
        intercept: bool = True,
        task_names: Sequence[Any] | None = None,
        trials: str | None = None,
        offset: str | None = None,
        positive: Any = None,
    ) -> TaskData:
        """Fits a schema to a data frame and encodes it.

        Args:
            frame: One row per observation.
            task: Name of the task-label column.
            response: Name(s) of the p >= 1 numeric response columns (never standardised).
            covariates: Names of the source covariate columns, in design order.
            categorical: Covariates to dummy-code. Covariates with a non-numeric or boolean
                dtype (object, string, category, bool) are dummy-coded as well.
            standardize: Whether to standardise the continuous covariates to mean 0 and
                population sd 1.
            intercept: Whether to prepend an all-ones ``"intercept"`` column.
            task_names: Order of the tasks (labels compared as strings). Every row's task
                must be listed and every listed task must have rows. If None, tasks are
                numbered in order of first appearance.
            trials: Column of binomial trials (``TaskData.trials``), or None.
            offset: Column added to each row's linear predictor (``TaskData.offset``; a
                log exposure for counts), or None.
            positive: For a single response with two text (or boolean) levels, the level
                coded 1 (the other is 0). Required for a text response; a response with
                more than two levels is an error.

        Returns:
            The encoded data set, with float arrays in JAX's default float dtype.

        Raises:
            DataError: If a column is unknown or used twice, the frame is empty, a value is
                missing or non-finite, a response or continuous covariate is not numeric, a
                task has no rows or is not listed in ``task_names``, a covariate is
                constant, or the encoded design is rank deficient.
        """
        response = _as_names(response)
        covariates = _as_names(covariates)
        categorical = _as_names(categorical)
        if not response:
            raise DataError("at least one response column is required")
        roles = (task, *response, *covariates, *(column for column in (trials, offset) if column is not None))
        repeated = sorted({name for name in roles if roles.count(name) > 1})
        if repeated:
            raise DataError(
                f"column(s) {repeated} used more than once; the task, response and "
                "covariate columns must be distinct"
            )
        stray = [name for name in categorical if name not in covariates]
        if stray:
            raise DataError(f"categorical column(s) {stray} are not among the covariates")
        _require_columns(frame, roles)
        if len(frame) == 0:
            raise DataError("the data frame has no rows")

        labels = _labels(frame, task, None)
        levels, scales = [], []
        for column in covariates:
            series = frame[column]
            if (
                column in categorical
                or not pd.api.types.is_numeric_dtype(series)
                or pd.api.types.is_bool_dtype(series)
            ):
                _check_missing(frame, column, labels)
                column_levels = _sorted_levels(series)
                if len(column_levels) < 2:
                    raise DataError(
                        f"covariate {column!r} is constant (single level {column_levels[0]!r})"
                    )
                levels.append((column, column_levels))
                continue
            values = _floats(frame, column, labels, "covariate")
            if np.ptp(values) == 0:
                raise DataError(f"covariate {column!r} is constant (value {values[0]})")
            if standardize:
                scales.append((column, float(values.mean()), float(values.std())))

        schema = Schema(
            task=task,
            response=response,
            covariates=covariates,
            categorical=tuple(levels),
            standardized=tuple(scales),
            intercept=intercept,
            trials=trials,
            offset=offset,
            response_levels=_response_levels(frame, response, positive, labels),
        )
        return schema._encode(frame, require_response=True, task_names=task_names, is_fit=True)

    @classmethod
    def from_formula(cls, frame: pd.DataFrame, formula: str, mixing_formula: str | None = None,
                     **kwargs: Any) -> tuple[TaskData, Any]:
        """Encodes a frame with a mixed formula, ``"y ~ x + C(g) + (1 + x | task)"``.

        See :func:`mtl_jax.data.formula.from_formula` (keywords ``task``, ``trials``,
        ``offset``, ``positive``, ``task_names``).

        Returns:
            ``(data, terms)``: the encoded data and the model's
            :class:`~mtl_jax.data.formula.FormulaTerms`.
        """
        from mtl_jax.data.formula import from_formula  # lazy: formulaic is imported on use

        return from_formula(frame, formula, mixing_formula, **kwargs)

    @classmethod
    def from_csv(cls, path: str | Path, **kwargs: Any) -> TaskData:
        """Reads a CSV file with pandas and encodes it with :meth:`from_dataframe`.

        Args:
            path: CSV file with a header row.
            **kwargs: Keyword arguments of :meth:`from_dataframe`.

        Returns:
            The encoded data set.
        """
        return cls.from_dataframe(pd.read_csv(path), **kwargs)

    @property
    def num_tasks(self) -> int:
        """Number of tasks K (tasks may have no rows after :meth:`subset`)."""
        return len(self.task_names)

    @property
    def num_obs(self) -> int:
        """Number of rows n."""
        return self.X.shape[0]

    def task_sizes(self) -> np.ndarray:
        """Returns the number of rows of each task, shape [K]."""
        return np.bincount(np.asarray(self.task), minlength=self.num_tasks)

    def columns_for(self, sources: Sequence[str] | None) -> np.ndarray:
        """Indices of the encoded columns derived from some source covariates.

        Args:
            sources: Source (raw data frame) covariate names, or None for all columns.

        Returns:
            Sorted column indices into ``columns``, shape [m]. The intercept (index 0) is
            always included when the data has one.

        Raises:
            ValueError: If a name is not a covariate of the schema.
        """
        if sources is None:
            return np.arange(len(self.columns))
        sources = _as_names(sources)
        groups = dict(self.schema.groups)
        unknown = [name for name in sources if name not in groups]
        if unknown:
            raise ValueError(
                f"unknown covariate {unknown[0]!r}; known covariates: {list(groups)}"
            )
        indices = [0] if self.schema.intercept else []
        for name in sources:
            indices.extend(groups[name])
        return np.unique(np.asarray(indices, dtype=np.intp))

    def subset(self, rows: np.ndarray) -> TaskData:
        """Selects rows, keeping the task ids, task names and schema.

        Args:
            rows: Integer row indices, shape [m], or a boolean mask, shape [n].

        Returns:
            The selected rows.
        """
        rows = jnp.asarray(rows)
        return dataclasses.replace(
            self, X=self.X[rows], y=self.y[rows], task=self.task[rows],
            trials=None if self.trials is None else self.trials[rows],
            offset=None if self.offset is None else self.offset[rows],
        )


def train_test_split_by_task(
    data: TaskData, *, test_fraction: float, seed: int
) -> tuple[TaskData, TaskData]:
    """Splits every task's rows at random into a training and a test part.

    Task i with n_i rows sends ``round(test_fraction * n_i)`` rows (rounded half to even)
    to the test part, but never more than ``n_i - 1``: each task keeps at least one
    training row, and a task with a single row stays entirely in training.

    Args:
        data: The data to split.
        test_fraction: Fraction of each task's rows to hold out, in [0, 1].
        seed: Seed of the ``numpy`` random generator; equal seeds give equal splits.

    Returns:
        ``(train, test)``, both with the task ids, task names and schema of ``data`` and
        rows in their original order.

    Raises:
        ValueError: If ``test_fraction`` is outside [0, 1].
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    task = np.asarray(data.task)
    sizes = data.task_sizes()
    n_test = np.minimum(
        np.rint(test_fraction * sizes).astype(np.int64), np.maximum(sizes - 1, 0)
    )

    # A uniformly random order within each task: sort by task, then by a random key.
    keys = np.random.default_rng(seed).random(task.shape[0])
    order = np.lexsort((keys, task))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank_in_task = np.empty_like(order)
    rank_in_task[order] = np.arange(order.shape[0]) - starts[task[order]]
    is_test = rank_in_task < n_test[task]
    return data.subset(np.flatnonzero(~is_test)), data.subset(np.flatnonzero(is_test))


def _as_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """Returns a single column name or a sequence of names as a tuple."""
    return (names,) if isinstance(names, str) else tuple(names)


def _require_columns(frame: pd.DataFrame, names: Sequence[str]) -> None:
    """Raises DataError naming the first of ``names`` that is not a column of ``frame``."""
    for name in names:
        if name not in frame.columns:
            raise DataError(
                f"unknown column {name!r}; available columns: {list(frame.columns)}"
            )


def _where(frame: pd.DataFrame, position: int, task_labels: np.ndarray | None) -> str:
    """Describes a row for error messages, e.g. ``"row 7 (task 'A')"``.

    Args:
        frame: The data frame.
        position: Integer position of the row.
        task_labels: String task label per row, shape [n], or None to omit the task.

    Returns:
        The row's index label and, if known, its task.
    """
    label = frame.index[position]
    if isinstance(label, np.generic):
        label = label.item()
    where = f"row {label!r}"
    if task_labels is None:
        return where
    return f"{where} (task {task_labels[position]!r})"


def _label(value: Any) -> str:
    """String label of a raw value; integral floats lose the ``.0`` (``2.0 -> "2"``)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _check_missing(frame: pd.DataFrame, column: str, task_labels: np.ndarray | None) -> None:
    """Raises DataError naming the first row where ``column`` is missing."""
    missing = frame[column].isna().to_numpy()
    if missing.any():
        position = int(np.argmax(missing))
        raise DataError(
            f"column {column!r} has a missing value at {_where(frame, position, task_labels)}"
        )


def _labels(frame: pd.DataFrame, column: str, task_labels: np.ndarray | None) -> np.ndarray:
    """String labels of a column, shape [n] (object array).

    Args:
        frame: The data frame.
        column: Column to convert.
        task_labels: Task label per row for error messages, or None.

    Returns:
        ``_label`` of every value.

    Raises:
        DataError: If a value is missing.
    """
    _check_missing(frame, column, task_labels)
    codes, uniques = pd.factorize(frame[column])
    return np.asarray([_label(value) for value in uniques], dtype=object)[codes]


def _response_levels(frame: pd.DataFrame, response: tuple[str, ...], positive: Any,
                     task_labels: np.ndarray) -> tuple[str, str] | None:
    """``(negative, positive)`` of a two-level text or boolean response; None for a numeric one.

    Raises:
        DataError: for a text response with more (or fewer) than two levels, a text
            response without ``positive``, or a ``positive`` that is not one of its levels.
    """
    series = frame[response[0]]
    textual = not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)
    if not textual:
        if positive is not None:
            raise DataError(f"positive={positive!r} applies to a two-level text response, but response "
                            f"{response[0]!r} is numeric")
        return None
    if len(response) > 1:
        raise DataError(f"response column {response[0]!r} is not numeric: only a single two-level response "
                        "can be text")
    _check_missing(frame, response[0], task_labels)
    return two_levels(series, f"response {response[0]!r}", positive)


def two_levels(series: pd.Series, what: str, positive: Any) -> tuple[str, str]:
    """``(negative, positive)`` labels of a text or boolean series (missing values dropped).

    Args:
        series: the column.
        what: how errors name it, e.g. ``"response 'y'"``.
        positive: the level coded 1 (``None``: ``True`` for a boolean column, else an error).

    Raises:
        DataError: for other than two levels, no ``positive`` for text, or an unknown one.
    """
    levels = _sorted_levels(series.dropna())
    if len(levels) != 2:
        raise DataError(f"{what} is not numeric: it has {len(levels)} text levels {list(levels)[:5]}; only a "
                        "two-level column can be text (coded 0/1 with positive=...)")
    if positive is None and pd.api.types.is_bool_dtype(series):
        positive = "True"
    if positive is None:
        raise DataError(f"{what} has the text levels {list(levels)}: say which one is 1 (positive=..., "
                        "--positive LABEL)")
    if _label(positive) not in levels:
        raise DataError(f"positive={positive!r} is not a level of {what} {list(levels)}")
    negative = levels[1] if levels[0] == _label(positive) else levels[0]
    return negative, _label(positive)


def _binary_codes(frame: pd.DataFrame, column: str, levels: tuple[str, str], task_labels: np.ndarray) -> np.ndarray:
    """0/1 codes of a two-level response (``levels = (negative, positive)``).

    Raises:
        DataError: naming the row and task of a missing value or of a level not in ``levels``.
    """
    _check_missing(frame, column, task_labels)
    labels = np.asarray([_label(value) for value in frame[column]])
    unknown = np.flatnonzero(~np.isin(labels, levels))
    if unknown.size:
        row = int(unknown[0])
        raise DataError(f"response {column!r} has level {labels[row]!r} at {_where(frame, row, task_labels)}; "
                        f"expected one of {list(levels)}")
    return (labels == levels[1]).astype(float)


def _sorted_levels(series: pd.Series) -> tuple[str, ...]:
    """Distinct labels of a series without missing values, sorted by raw value.

    Raw values are sorted numerically when possible (so ``2 < 10``), otherwise as strings.
    """
    uniques = list(series.unique())
    try:
        ordered = sorted(uniques)
    except TypeError:
        ordered = sorted(uniques, key=str)
    return tuple(dict.fromkeys(_label(value) for value in ordered))


def _floats(frame: pd.DataFrame, column: str, task_labels: np.ndarray, role: str) -> np.ndarray:
    """A numeric column as float64, shape [n].

    Args:
        frame: The data frame.
        column: Column to convert.
        task_labels: Task label per row, shape [n], for error messages.
        role: ``"response"`` or ``"covariate"``, for error messages.

    Returns:
        The column's values.

    Raises:
        DataError: If the column is not numeric or holds a missing or non-finite value.
    """
    series = frame[column]
    if not pd.api.types.is_numeric_dtype(series):
        raise DataError(f"{role} column {column!r} is not numeric (dtype {series.dtype})")
    values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        position = int(np.argmax(bad))
        raise DataError(
            f"{role} column {column!r} has a non-finite value ({values[position]}) at "
            f"{_where(frame, position, task_labels)}"
        )
    return values


def _dummies(
    frame: pd.DataFrame, column: str, levels: tuple[str, ...], task_labels: np.ndarray
) -> np.ndarray:
    """Dummy coding of a categorical column against known levels.

    Args:
        frame: The data frame.
        column: Categorical covariate.
        levels: Known levels; the first is the reference and gets no column.
        task_labels: Task label per row, shape [n], for error messages.

    Returns:
        0/1 matrix, shape [n, len(levels) - 1].

    Raises:
        DataError: If a value is missing or is not one of ``levels``.
    """
    labels = _labels(frame, column, task_labels)
    codes = pd.Index(levels).get_indexer(labels)
    unseen = codes < 0
    if unseen.any():
        position = int(np.argmax(unseen))
        raise DataError(
            f"column {column!r} has level {labels[position]!r} at "
            f"{_where(frame, position, task_labels)} that was not seen when the schema "
            f"was fitted (known levels: {list(levels)})"
        )
    return (codes[:, None] == np.arange(1, len(levels))[None, :]).astype(np.float64)


def _task_ids(
    frame: pd.DataFrame,
    labels: np.ndarray,
    task_names: Sequence[Any] | None,
    *,
    allow_empty: bool,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Maps task labels to integer ids.

    Args:
        frame: The data frame, for error messages.
        labels: String task label per row, shape [n].
        task_names: Labels in id order (compared as strings), or None to number the
            tasks in order of first appearance.
        allow_empty: Whether a listed task may have no rows.

    Returns:
        ``(ids, names)``: int ids, shape [n], and the label of each id, length K.

    Raises:
        DataError: If ``task_names`` repeats a label, misses a row's task, or (unless
            ``allow_empty``) lists a task without rows.
    """
    if task_names is None:
        ids, uniques = pd.factorize(labels)
        return ids, tuple(uniques)
    names = tuple(_label(name) for name in task_names)
    if len(set(names)) != len(names):
        raise DataError(f"task_names contains duplicates: {list(names)}")
    ids = pd.Index(names).get_indexer(labels)
    unlisted = ids < 0
    if unlisted.any():
        position = int(np.argmax(unlisted))
        raise DataError(
            f"task {labels[position]!r} at {_where(frame, position, None)} is not in task_names"
        )
    if not allow_empty:
        empty = [names[k] for k in np.flatnonzero(np.bincount(ids, minlength=len(names)) == 0)]
        if empty:
            raise DataError(f"task(s) {empty} listed in task_names have no rows")
    return ids, names


def _dependent_columns(X: np.ndarray) -> list[int]:
    """Columns of a matrix that are linear combinations of the columns before them.

    Args:
        X: Matrix, shape [n, q].

    Returns:
        Indices j where adding column j to columns 0..j-1 does not increase the rank
        (``numpy.linalg.matrix_rank`` with its default tolerance). Empty if X has full
        column rank.
    """
    if np.linalg.matrix_rank(X) == X.shape[1]:
        return []
    dependent, rank = [], 0
    for j in range(X.shape[1]):
        grown = np.linalg.matrix_rank(X[:, : j + 1])
        if grown == rank:
            dependent.append(j)
        rank = grown
    return dependent
