r"""Per-person data for personalised multitask learning (users or labels as tasks).

The input is one CSV/DataFrame row per sample: a person column, optionally a timestamp
and a pre-assigned split column (``train`` / ``validation`` / ``test``), feature columns
and one or more label columns (by default every column whose name contains ``_Label``).
Two ways to make tasks (the PersonalizedMultitaskLearning conventions):

* **users as tasks** (``tasks="users"``): one task per person, one target label;
* **labels as tasks** (``tasks="labels"``): one task per label column, all people.

Storage is long and flat: observation ``j`` is a (sample, label) pair with features
``X[j]``, label ``y[j]``, task ``task[j]`` and weight ``weight[j]`` (0 for a missing
label: it is masked out of every loss, never dropped, so ``n`` is always
``samples x labels``). With labels as tasks the observations of sample ``i`` are rows
``i L .. i L + L - 1`` (``L`` labels), so predictions reshape to ``[samples, L]``.

Features are encoded from the *training* rows only:

* categorical columns are dummy-coded (first sorted level is the reference);
* normalisation ``"global"`` (training mean and sd), ``"person"`` (each person's own
  training mean and sd; a person with fewer than two training rows or a constant
  feature keeps the global values; a person unseen in training is normalised with
  the global values) or ``"none"``;
* missing features: ``missing="error"`` refuses them (naming column, row and person);
  ``missing="fill"`` puts the training mean (0 after normalisation) in their place and
  adds a ``<feature>_missing`` indicator column for every feature that has missing
  training values (a feature complete in training has no indicator: a missing value
  there in new data is filled without one).

Modalities are the feature-name prefixes before the first ``_`` (``phys_hr`` ->
``phys``); each modality must be one contiguous block of feature columns (the
MTMKL kernels are built per block), else :class:`~mtl_jax.data.tabular.DataError`. The
missing-value indicators, appended after all features, form a last modality ``missing``.

The original project's pickled task-dict lists (keys ``Name``, ``X``, ``Y``,
``ModalityDict``) are read by :func:`read_task_dict_pickle` only with
``allow_pickle=True``: unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Bool, Float, Int

from mtl_jax.data.tabular import DataError, _label, _sorted_levels, _where, two_levels

SPLITS = ("train", "validation", "test")
"""Split codes ``0, 1, 2`` of :attr:`PersonData.split`."""

MISSING_SUFFIX = "_missing"
LABEL_MARKER = "_Label"


@dataclasses.dataclass(frozen=True)
class PersonSchema:
    """How a per-person frame was encoded; encodes new frames the same way.

    Attributes:
        person: the person column.
        labels: label columns (one per task with ``tasks="labels"``; the target otherwise).
        features: source feature columns, in order.
        tasks: ``"users"`` or ``"labels"``.
        timestamp: timestamp column (rows are kept in input order; used by studies), or None.
        split: split column, or None (every labelled row is training data).
        normalise: ``"global"``, ``"person"`` or ``"none"``.
        missing: ``"fill"`` or ``"error"``.
        categorical: ``(column, levels)`` of dummy-coded features.
        columns: encoded feature names (dummies ``col[level]``, indicators ``col_missing``).
        mean, sd: the normaliser: global training mean and sd per encoded column
            (indicators: 0 and 1; ``normalise="none"``: 0 and 1 throughout).
        fill: training mean of each source-encoded column (what a missing value becomes
            before normalisation; with ``normalise="person"`` a person's own mean).
        person_stats: ``(person, mean, sd)`` per training person (``normalise="person"``).
        binary: per label, whether it is a 0/1 label.
        label_levels: per label, ``(negative, positive)`` text levels or None (numeric).
        modalities: ``(name, start, stop)`` column blocks of the encoded features.
    """

    person: str
    labels: tuple[str, ...]
    features: tuple[str, ...]
    tasks: str = "users"
    timestamp: str | None = None
    split: str | None = None
    normalise: str = "global"
    missing: str = "fill"
    categorical: tuple[tuple[str, tuple[str, ...]], ...] = ()
    columns: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    sd: tuple[float, ...] = ()
    fill: tuple[float, ...] = ()
    person_stats: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...] = ()
    binary: tuple[bool, ...] = ()
    label_levels: tuple[tuple[str, str] | None, ...] = ()
    modalities: tuple[tuple[str, int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (tuples become lists)."""
        return {"kind": "person", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> PersonSchema:
        """Inverse of :meth:`to_dict`."""
        def freeze(value):
            return tuple(freeze(item) for item in value) if isinstance(value, list) else value
        return cls(**{key: freeze(value) for key, value in spec.items() if key != "kind"})


class PersonData(eqx.Module):
    """Encoded per-person data, one row per (sample, label) observation.

    Attributes:
        X: features ``[n, q]``.
        y: labels ``[n]`` (0 where missing).
        weight: ``[n]``, 1 for an observed label and 0 for a missing one.
        task: task id ``[n]`` (person or label), int32.
        split: ``[n]`` int32 codes of :data:`SPLITS`.
        task_binary: ``[K]`` whether task ``k`` has a 0/1 label (else Gaussian).
        task_names: name of each task id (``K`` of them).
        num_labels: ``L``, the observations per sample (1 with users as tasks).
        schema: the encoding.
    """

    X: Float[Array, "n q"]
    y: Float[Array, " n"]
    weight: Float[Array, " n"]
    task: Int[Array, " n"]
    split: Int[Array, " n"]
    task_binary: Bool[Array, " K"]
    task_names: tuple[str, ...] = eqx.field(static=True)
    num_labels: int = eqx.field(static=True)
    schema: PersonSchema = eqx.field(static=True)

    @property
    def num_tasks(self) -> int:
        """Number of tasks ``K`` (training tasks first; unseen ones after)."""
        return len(self.task_names)

    @property
    def columns(self) -> tuple[str, ...]:
        """Encoded feature names."""
        return self.schema.columns

    @classmethod
    def from_dataframe(cls, frame: pd.DataFrame, *, person: str, labels: str | Sequence[str] | None = None,
                       features: Sequence[str] | None = None, tasks: str = "users", timestamp: str | None = None,
                       split: str | None = None, normalise: str = "global", missing: str = "fill",
                       categorical: Sequence[str] = (), positive: Any = None) -> PersonData:
        """Encodes a training frame (statistics from its training rows).

        Args:
            frame: one row per sample.
            person: the person column.
            labels: label column(s); default every column containing ``"_Label"``. With
                ``tasks="users"`` exactly one.
            features: feature columns; default every other column (not person, timestamp,
                split, a label or another ``_Label`` column).
            tasks: ``"users"`` (one task per person) or ``"labels"`` (one per label).
            timestamp, split: optional columns (split values ``train``/``validation``/``test``).
            normalise: ``"global"``, ``"person"`` or ``"none"``.
            missing: ``"fill"`` (training mean plus indicator) or ``"error"``.
            categorical: feature columns to dummy-code (text columns always are).
            positive: the level coded 1 of two-level text labels.

        Raises:
            DataError: naming the column, row and person of any problem.
        """
        labels = _label_columns(frame, labels)
        if tasks not in ("users", "labels"):
            raise ValueError(f"tasks must be 'users' or 'labels', not {tasks!r}")
        if tasks == "users" and len(labels) != 1:
            raise DataError(f"users as tasks predicts one label; got {list(labels)} (choose one, or tasks='labels')")
        if normalise not in ("global", "person", "none"):
            raise ValueError(f"normalise must be 'global', 'person' or 'none', not {normalise!r}")
        if missing not in ("fill", "error"):
            raise ValueError(f"missing must be 'fill' or 'error', not {missing!r}")
        reserved = {person, timestamp, split, *labels, *(c for c in frame.columns if LABEL_MARKER in str(c))} - {None}
        features = tuple(features) if features is not None else tuple(c for c in frame.columns if c not in reserved)
        _require(frame, [person, *labels, *features, *(c for c in (timestamp, split) if c)])
        people = _people(frame, person)
        split_codes = _split_codes(frame, split, people)
        train = split_codes == 0
        categorical = tuple(dict.fromkeys([*categorical, *(c for c in features if not _numeric(frame[c]))]))
        levels = tuple((c, _sorted_levels(frame.loc[train, c].dropna())) for c in categorical)
        raw, names = _raw_features(frame, features, dict(levels), people)
        if missing == "error":
            _refuse_missing(frame, raw, names, people)
        filled = np.isnan(raw[train]).any(axis=0)
        mean = np.nanmean(np.where(train[:, None], raw, np.nan), axis=0)
        mean = np.where(np.isnan(mean), 0.0, mean)
        sd = np.nanstd(np.where(train[:, None], raw, np.nan), axis=0)
        sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
        mean_n, sd_n = (np.zeros_like(mean), np.ones_like(sd)) if normalise == "none" else (mean, sd)
        stats = _person_stats(raw, people, train, mean_n, sd_n) if normalise == "person" else ()
        label_levels = tuple(_text_levels(frame, label, positive) for label in labels)
        binary = tuple(_is_binary(frame, label, level) for label, level in zip(labels, label_levels))
        columns = names + tuple(f"{names[j]}{MISSING_SUFFIX}" for j in np.flatnonzero(filled))
        schema = PersonSchema(
            person=person, labels=labels, features=features, tasks=tasks, timestamp=timestamp, split=split,
            normalise=normalise, missing=missing, categorical=levels, columns=columns,
            mean=tuple(map(float, mean_n)) + (0.0,) * int(filled.sum()),
            sd=tuple(map(float, sd_n)) + (1.0,) * int(filled.sum()),
            fill=tuple(map(float, mean)), person_stats=stats, binary=binary, label_levels=label_levels,
            modalities=modality_blocks(names) + ((("missing", len(names), len(columns)),) if filled.any() else ()),
        )
        task_names = tuple(labels) if tasks == "labels" else tuple(dict.fromkeys(people[train]))
        return encode(frame, schema, task_names)

    @classmethod
    def from_csv(cls, path: str | Path, **kwargs: Any) -> PersonData:
        """:meth:`from_dataframe` of a CSV file."""
        return cls.from_dataframe(pd.read_csv(path), **kwargs)


def encode(frame: pd.DataFrame, schema: PersonSchema, task_names: Sequence[str]) -> PersonData:
    """Encodes ``frame`` with ``schema``; tasks named in ``task_names`` keep their ids, unseen
    people (users as tasks) are numbered after them.

    Raises:
        DataError: for missing columns, unseen categorical levels, missing features under
            ``missing="error"``, or labels that are not 0/1 where training labels were.
    """
    _require(frame, [schema.person, *schema.features, *(c for c in (schema.split,) if c)])
    people = _people(frame, schema.person)
    raw, names = _raw_features(frame, schema.features, dict(schema.categorical), people)
    if schema.missing == "error":
        _refuse_missing(frame, raw, names, people)
    X = _normalised(raw, people, schema)
    n, L = len(frame), len(schema.labels)
    y = np.zeros((n, L))
    weight = np.zeros((n, L))
    for k, label in enumerate(schema.labels):
        if label in frame.columns:
            y[:, k], weight[:, k] = _label_values(frame, label, schema.label_levels[k], schema.binary[k], people)
    split = _split_codes(frame, schema.split, people)
    if schema.tasks == "labels":
        task = np.tile(np.arange(L), n)
        X = np.repeat(X, L, axis=0)
        split = np.repeat(split, L)
        names_out = tuple(schema.labels)
        binary = np.asarray(schema.binary)
    else:
        names_out = tuple(task_names) + tuple(p for p in dict.fromkeys(people) if p not in set(task_names))
        task = pd.Categorical(people, categories=names_out).codes.astype(np.int32)
        binary = np.full(len(names_out), schema.binary[0])
    return PersonData(
        X=jnp.asarray(X, dtype=jnp.result_type(float)), y=jnp.asarray(y.reshape(-1), dtype=jnp.result_type(float)),
        weight=jnp.asarray(weight.reshape(-1), dtype=jnp.result_type(float)),
        task=jnp.asarray(task, dtype=jnp.int32), split=jnp.asarray(split, dtype=jnp.int32),
        task_binary=jnp.asarray(binary, dtype=bool), task_names=names_out, num_labels=L, schema=schema,
    )


def modality_blocks(columns: Sequence[str]) -> tuple[tuple[str, int, int], ...]:
    """``(prefix, start, stop)`` column blocks of the feature-name prefixes (before the first ``_``).

    Raises:
        DataError: when a modality's columns are not contiguous, naming the column that
            reopens it.
    """
    blocks: list[list] = []
    for j, column in enumerate(columns):
        prefix = column.split("_", 1)[0] if "_" in column else column
        if blocks and blocks[-1][0] == prefix:
            blocks[-1][2] = j + 1
            continue
        if any(block[0] == prefix for block in blocks):
            raise DataError(f"modality {prefix!r} is not contiguous: column {column!r} (position {j}) comes after "
                            f"other modalities; order the feature columns by modality")
        blocks.append([prefix, j, j + 1])
    return tuple((name, start, stop) for name, start, stop in blocks)


def read_task_dict_pickle(path: str | Path, *, allow_pickle: bool = False) -> pd.DataFrame:
    """A frame from the original project's pickled task-dict list (``Name``, ``X``, ``Y``, ``ModalityDict``).

    The frame has a ``task`` column (the ``Name``: the person with users as tasks, the
    label with labels as tasks), features named ``<modality>_<j>`` from ``ModalityDict``
    (``f<j>`` without one), and the label column ``Y``. Either kind is then fitted with
    ``person="task", labels="Y"``: every task's rows are its own, as in the file. Unpickling can run
    arbitrary code, so it needs ``allow_pickle=True`` (``--allow-pickle``).

    Raises:
        ValueError: without ``allow_pickle``, or for a file that is not a list of such dicts.
    """
    if not allow_pickle:
        raise ValueError(f"{path} is a pickle, which can run arbitrary code when loaded; pass allow_pickle=True "
                         "(--allow-pickle) if you trust it")
    with open(path, "rb") as handle:
        task_list = pickle.load(handle)  # noqa: S301 (explicit opt-in above)
    if not isinstance(task_list, list) or not all(isinstance(t, dict) and {"Name", "X", "Y"} <= set(t)
                                                  for t in task_list):
        raise ValueError(f"{path} is not a task-dict list (a list of dicts with keys Name, X, Y, ModalityDict)")
    frames = []
    for entry in task_list:
        X = np.asarray(entry["X"], dtype=float)
        names = _pickle_feature_names(X.shape[1], entry.get("ModalityDict") or {})
        frame = pd.DataFrame(X, columns=names)
        frame.insert(0, "task", str(entry["Name"]))
        frame["Y"] = np.asarray(entry["Y"], dtype=float).reshape(-1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- helpers
def _pickle_feature_names(q: int, modality_start: dict) -> list[str]:
    """``<modality>_<j>`` per column from a ``ModalityDict`` (modality -> start index), else ``f<j>``."""
    if not modality_start:
        return [f"f{j}" for j in range(q)]
    starts = sorted((int(start), str(name)) for name, start in modality_start.items())
    names = []
    for j in range(q):
        owner = [name for start, name in starts if start <= j][-1] if starts[0][0] <= j else "f"
        names.append(f"{owner}_{j}")
    return names


def _label_columns(frame: pd.DataFrame, labels) -> tuple[str, ...]:
    if labels is None:
        found = tuple(c for c in frame.columns if LABEL_MARKER in str(c))
        if not found:
            raise DataError(f"no label columns given and none contains {LABEL_MARKER!r}")
        return found
    return (labels,) if isinstance(labels, str) else tuple(labels)


def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise DataError(f"column(s) {absent} not in the data (columns: {list(frame.columns)[:20]})")


def _numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _people(frame: pd.DataFrame, person: str) -> np.ndarray:
    values = frame[person]
    missing = values.isna().to_numpy()
    if missing.any():
        raise DataError(f"person column {person!r} is missing at {_where(frame, int(np.argmax(missing)), None)}")
    return np.asarray([_label(v) for v in values], dtype=object)


def _split_codes(frame: pd.DataFrame, split: str | None, people: np.ndarray) -> np.ndarray:
    if split is None:
        return np.zeros(len(frame), dtype=np.int32)
    values = frame[split].astype(str).str.lower().to_numpy()
    codes = np.full(len(values), -1, dtype=np.int32)
    for code, name in enumerate(SPLITS):
        codes[values == name] = code
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        raise DataError(f"split column {split!r} has {values[bad[0]]!r} at {_where(frame, int(bad[0]), people)}; "
                        f"expected one of {list(SPLITS)}")
    return codes


def _raw_features(frame: pd.DataFrame, features: Sequence[str], levels: dict, people: np.ndarray):
    """Float features ``[n, q]`` (NaN where missing) and their encoded names (dummies expanded)."""
    blocks, names = [], []
    for column in features:
        if column in levels:
            values = frame[column]
            labels = np.asarray([_label(v) if not pd.isna(v) else None for v in values], dtype=object)
            known = np.isin(labels, levels[column]) | pd.isna(values).to_numpy()
            if not known.all():
                row = int(np.argmin(known))
                raise DataError(f"column {column!r} has level {labels[row]!r} at {_where(frame, row, people)}, "
                                f"unseen in training (levels {list(levels[column])})")
            for level in levels[column][1:]:
                dummy = (labels == level).astype(float)
                dummy[pd.isna(values).to_numpy()] = np.nan
                blocks.append(dummy)
                names.append(f"{column}[{level}]")
            continue
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        text = np.isnan(values) & frame[column].notna().to_numpy()
        if text.any():
            row = int(np.argmax(text))
            raise DataError(f"feature {column!r} is not numeric at {_where(frame, row, people)} "
                            f"({frame[column].iloc[row]!r}); declare it categorical")
        blocks.append(values)
        names.append(column)
    raw = np.stack(blocks, axis=1) if blocks else np.zeros((len(frame), 0))
    return raw, tuple(names)


def _refuse_missing(frame: pd.DataFrame, raw: np.ndarray, names: Sequence[str], people: np.ndarray) -> None:
    rows, cols = np.nonzero(np.isnan(raw))
    if rows.size:
        raise DataError(f"feature {names[cols[0]]!r} is missing at {_where(frame, int(rows[0]), people)} "
                        "(missing='error'; use missing='fill' to fill with the training mean plus an indicator)")


def _person_stats(raw, people, train, mean, sd):
    """Per training person: mean and sd of its training rows (global ones where undefined)."""
    stats = []
    for name in dict.fromkeys(people[train]):
        rows = raw[train & (people == name)]
        own_mean = np.nanmean(rows, axis=0) if len(rows) else mean
        own_sd = np.nanstd(rows, axis=0) if len(rows) > 1 else sd
        own_mean = np.where(np.isfinite(own_mean), own_mean, mean)
        own_sd = np.where(np.isfinite(own_sd) & (own_sd > 0), own_sd, sd)
        stats.append((str(name), tuple(map(float, own_mean)), tuple(map(float, own_sd))))
    return tuple(stats)


def _normalised(raw: np.ndarray, people: np.ndarray, schema: PersonSchema) -> np.ndarray:
    """Normalised features with missing values filled and indicator columns appended."""
    q = raw.shape[1]
    mean = np.broadcast_to(np.asarray(schema.mean[:q]), raw.shape).copy()
    sd = np.broadcast_to(np.asarray(schema.sd[:q]), raw.shape).copy()
    for name, own_mean, own_sd in schema.person_stats:
        rows = people == name
        mean[rows], sd[rows] = own_mean, own_sd
    missing = np.isnan(raw)
    fill = mean if schema.normalise != "none" else np.asarray(schema.fill)
    X = (np.where(missing, fill, raw) - mean) / sd
    indicators = [missing[:, schema.columns.index(c[: -len(MISSING_SUFFIX)])].astype(float)
                  for c in schema.columns[q:]]
    return np.column_stack([X, *indicators]) if indicators else X


def _text_levels(frame: pd.DataFrame, label: str, positive) -> tuple[str, str] | None:
    """``(negative, positive)`` of a text or boolean label; None for a numeric one."""
    if _numeric(frame[label].dropna()):
        return None
    return two_levels(frame[label], f"label {label!r}", positive)


def _is_binary(frame: pd.DataFrame, label: str, levels) -> bool:
    if levels is not None:
        return True
    values = pd.to_numeric(frame[label], errors="coerce").dropna().to_numpy()
    return bool(values.size) and bool(np.isin(values, (0.0, 1.0)).all())


def _label_values(frame, label, levels, binary, people):
    """Label values and weights (0 where missing) of one label column."""
    series = frame[label]
    present = series.notna().to_numpy()
    if levels is not None:
        text = np.asarray([_label(v) for v in series.where(present, levels[0])], dtype=object)
        bad = np.flatnonzero(present & ~np.isin(text, levels))
        if bad.size:
            raise DataError(f"label {label!r} has {text[bad[0]]!r} at {_where(frame, int(bad[0]), people)}; "
                            f"expected one of {list(levels)}")
        return (text == levels[1]).astype(float), present.astype(float)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    text = np.isnan(values) & present
    if text.any():
        row = int(np.argmax(text))
        raise DataError(f"label {label!r} is not numeric at {_where(frame, row, people)} ({series.iloc[row]!r})")
    if binary:
        bad = np.flatnonzero(present & ~np.isin(values, (0.0, 1.0)))
        if bad.size:
            raise DataError(f"label {label!r} is binary in training but has {float(values[bad[0]])!r} at "
                            f"{_where(frame, int(bad[0]), people)}")
    return np.where(present, values, 0.0), present.astype(float)
