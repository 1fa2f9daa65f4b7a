"""Evaluation measures used by the paper studies and the benchmarks.

Regression and mixture studies: :func:`explained_variance`, :func:`match_components`,
:func:`mean_absolute_bias`, :func:`mean_and_standard_error`; clusterings of tasks against
known groups: :func:`adjusted_rand_index`.

Personalised multitask classification and regression (all in NumPy float64):

* ranking AUC from scores, :func:`roc_auc`;
* thresholded measures from a probability, :func:`accuracy`, :func:`precision`,
  :func:`recall`, :func:`f1` and :func:`balanced_accuracy` (the hard-label "AUC" of the
  original PersonalizedMultitaskLearning project);
* :func:`rmse` for regression;
* a per-task table with pooled and task-averaged rows, :func:`task_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd


def explained_variance(y, prediction) -> float:
    r"""Percentage of variance explained on a test set (the mixture-GLMM paper's measure).

    :math:`100\,(1 - \sum (y - \hat y)^2 / \sum (y - \bar y)^2)`, summed over all
    response dimensions.
    """
    y = np.asarray(y, dtype=float)
    prediction = np.asarray(prediction, dtype=float).reshape(y.shape)
    total = np.sum((y - y.mean(axis=0)) ** 2)
    return float(100.0 * (1.0 - np.sum((y - prediction) ** 2) / total))


def match_components(estimated_coef, true_coef) -> np.ndarray:
    """Order of estimated components that best matches the true ones.

    Args:
        estimated_coef: component coefficients ``[g, ...]``.
        true_coef: the true ones, same shape.

    Returns:
        ``order [g]``: estimated component ``order[h]`` plays true component ``h``
        (minimum total absolute coefficient difference, Hungarian algorithm).
    """
    from scipy.optimize import linear_sum_assignment

    est = np.asarray(estimated_coef).reshape(len(estimated_coef), -1)
    true = np.asarray(true_coef).reshape(len(true_coef), -1)
    cost = np.abs(true[:, None, :] - est[None, :, :]).sum(-1)
    _, order = linear_sum_assignment(cost)
    return order


def adjusted_rand_index(labels_a, labels_b) -> float:
    r"""Hubert and Arabie's adjusted Rand index of two partitions of the same items.

    With the contingency table :math:`n_{ij}`, its row sums :math:`a_i`, column sums
    :math:`b_j` and :math:`n` items,

    .. math::

        \mathrm{ARI} = \frac{\sum_{ij}\binom{n_{ij}}{2} - E}{\tfrac12[\sum_i\binom{a_i}{2}
        + \sum_j\binom{b_j}{2}] - E},\qquad E = \sum_i\binom{a_i}{2}\sum_j\binom{b_j}{2} \Big/ \binom n2:

    1 for identical partitions (whatever the label names), about 0 for unrelated ones.
    Two partitions with a single group each (the denominator 0) count as identical (1).

    Raises:
        ValueError: for inputs of different lengths or fewer than two items.
    """
    a, b = np.asarray(labels_a).reshape(-1), np.asarray(labels_b).reshape(-1)
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two labelings of the same >= 2 items, got {len(a)} and {len(b)}")
    table = pd.crosstab(a, b).to_numpy().astype(float)

    def pairs(counts) -> float:
        return float(np.sum(counts * (counts - 1.0) / 2.0))

    together, rows, columns = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = rows * columns / (len(a) * (len(a) - 1) / 2.0)
    maximum = (rows + columns) / 2.0
    return 1.0 if maximum == expected else (together - expected) / (maximum - expected)


def mean_absolute_bias(estimate, truth) -> float:
    """Average absolute difference over all elements."""
    return float(np.mean(np.abs(np.asarray(estimate) - np.asarray(truth))))


def mean_and_standard_error(values) -> tuple[float, float]:
    """Mean and its standard error ``sd / sqrt(m)`` (``ddof=1``) over replicates."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


# ------------------------------------------------------------ binary classification
def _as_vector(values, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array (a column ``[n, 1]`` is flattened)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim > 1 and array.size != array.shape[0]:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array.reshape(-1)


def _check_binary(y: np.ndarray, name: str = "y", allow_nan: bool = False) -> None:
    """Raise ``ValueError`` naming the first row of ``y`` that is not 0 or 1 (or NaN)."""
    good = (y == 0.0) | (y == 1.0)
    if allow_nan:
        good |= np.isnan(y)
    if not good.all():
        row = int(np.flatnonzero(~good)[0])
        allowed = "0, 1 or NaN" if allow_nan else "0 or 1"
        raise ValueError(f"{name} must be binary ({allowed}); row {row} is {y[row]!r}")


def _check_finite(values: np.ndarray, name: str, rows: np.ndarray | None = None) -> None:
    """Raise ``ValueError`` naming the first non-finite entry (among ``rows`` if given)."""
    bad = ~np.isfinite(values)
    if rows is not None:
        bad &= rows
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite; row {row} is {values[row]!r}")


def _binary_pair(y, prediction, name: str = "prediction") -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(y, prediction)``: binary labels and finite predictions of equal length."""
    y = _as_vector(y, "y")
    prediction = _as_vector(prediction, name)
    if y.shape != prediction.shape:
        raise ValueError(f"y has {y.size} rows but {name} has {prediction.size}")
    _check_binary(y)
    _check_finite(prediction, name)
    return y, prediction


def _confusion(y, probability, threshold: float) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` of the hard labels ``probability >= threshold`` against ``y``."""
    y, probability = _binary_pair(y, probability, "probability")
    positive = y == 1.0
    predicted = probability >= threshold
    tp = int(np.sum(positive & predicted))
    fp = int(np.sum(~positive & predicted))
    fn = int(np.sum(positive & ~predicted))
    tn = int(np.sum(~positive & ~predicted))
    return tp, fp, fn, tn


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, with ``0.0`` for a zero denominator."""
    return float(numerator / denominator) if denominator else 0.0


def roc_auc(y, score) -> float:
    r"""Area under the ROC curve: how often a positive outranks a negative.

    With :math:`P` the positive and :math:`N` the negative rows,

    .. math::

        \mathrm{AUC} = \frac{1}{|P|\,|N|} \sum_{i \in P} \sum_{j \in N}
            \Big( [s_i > s_j] + \tfrac12 [s_i = s_j] \Big),

    computed in :math:`O(n \log n)` as the Mann–Whitney statistic from average ranks
    :math:`r_i` of the scores (ties share their mean rank):
    :math:`\mathrm{AUC} = \big(\sum_{i \in P} r_i - |P|(|P|+1)/2\big) / (|P|\,|N|)`.

    Args:
        y: labels ``[n]``, each 0 or 1.
        score: real scores ``[n]`` (probabilities, logits, margins: only the order counts).

    Returns:
        The AUC in ``[0, 1]``.

    Raises:
        ValueError: if ``y`` holds anything but 0 and 1 (the first bad row is named), if a
            score is not finite, or if ``y`` has only one class (the AUC is undefined).
    """
    from scipy.stats import rankdata

    y, score = _binary_pair(y, score, "score")
    positive = y == 1.0
    n_pos = int(positive.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        missing = "positive (1)" if n_pos == 0 else "negative (0)"
        raise ValueError(f"roc_auc needs both classes; y has no {missing} labels")
    ranks = rankdata(score, method="average")
    u_statistic = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def accuracy(y, probability, threshold: float = 0.5) -> float:
    r"""Share of rows whose hard label :math:`[p_i \ge t]` equals :math:`y_i`.

    :math:`(TP + TN) / n` with :math:`t` = ``threshold``.

    Args:
        y: labels ``[n]``, each 0 or 1.
        probability: predicted probabilities of class 1 ``[n]`` (hard 0/1 labels work too).
        threshold: a row is predicted positive when its probability is ``>= threshold``.

    Raises:
        ValueError: for non-binary ``y`` (the first bad row is named), non-finite
            probabilities, mismatched lengths or no rows.
    """
    tp, fp, fn, tn = _confusion(y, probability, threshold)
    n = tp + fp + fn + tn
    if n == 0:
        raise ValueError("accuracy of no rows is undefined")
    return (tp + tn) / n


def precision(y, probability, threshold: float = 0.5) -> float:
    r"""Positive predictive value :math:`TP / (TP + FP)` of the hard labels :math:`[p_i \ge t]`.

    Defined as ``0.0`` when nothing is predicted positive (:math:`TP + FP = 0`).
    Arguments as in :func:`accuracy`.
    """
    tp, fp, _, _ = _confusion(y, probability, threshold)
    return _ratio(tp, tp + fp)


def recall(y, probability, threshold: float = 0.5) -> float:
    r"""True-positive rate :math:`TP / (TP + FN)` of the hard labels :math:`[p_i \ge t]`.

    Defined as ``0.0`` when ``y`` has no positive rows (:math:`TP + FN = 0`).
    Arguments as in :func:`accuracy`.
    """
    tp, _, fn, _ = _confusion(y, probability, threshold)
    return _ratio(tp, tp + fn)


def f1(y, probability, threshold: float = 0.5) -> float:
    r"""F1 score, the harmonic mean of precision and recall.

    :math:`F_1 = 2\,TP / (2\,TP + FP + FN)` (equal to :math:`2PR/(P+R)` whenever that is
    defined); ``0.0`` when :math:`2\,TP + FP + FN = 0`, i.e. no positive rows and none
    predicted. Arguments as in :func:`accuracy`.
    """
    tp, fp, fn, _ = _confusion(y, probability, threshold)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def balanced_accuracy(y, prediction, threshold: float = 0.5) -> float:
    r"""Mean of the true-positive and true-negative rates of hard labels.

    .. math::

        \tfrac12 \Big( \frac{TP}{TP + FN} + \frac{TN}{TN + FP} \Big),
        \qquad \hat y_i = [p_i \ge t].

    This is what the original PersonalizedMultitaskLearning project reported as "AUC": it
    passed hard 0/1 predictions to a ROC-AUC routine, and the ROC curve of a single
    threshold has area :math:`(\mathrm{TPR} + \mathrm{TNR})/2`. Use :func:`roc_auc` on
    probabilities for the ranking AUC.

    Args:
        y: labels ``[n]``, each 0 or 1.
        prediction: probabilities of class 1 or hard 0/1 labels ``[n]``.
        threshold: a row is predicted positive when its prediction is ``>= threshold``.

    Returns:
        The balanced accuracy in ``[0, 1]``, or NaN when ``y`` lacks a class (one of the
        two rates is then undefined).
    """
    tp, fp, fn, tn = _confusion(y, prediction, threshold)
    if tp + fn == 0 or tn + fp == 0:
        return float("nan")
    return 0.5 * (tp / (tp + fn) + tn / (tn + fp))


# ------------------------------------------------------------------------ regression
def rmse(y, prediction) -> float:
    r"""Root mean squared error :math:`\sqrt{\tfrac1n \sum_i (y_i - \hat y_i)^2}`."""
    y = np.asarray(y, dtype=np.float64)
    prediction = np.asarray(prediction, dtype=np.float64).reshape(y.shape)
    return float(np.sqrt(np.mean((y - prediction) ** 2)))


# --------------------------------------------------------------------- per-task table
BINARY_COLUMNS = ("n", "auc", "accuracy", "precision", "recall", "f1", "balanced_accuracy")
REGRESSION_COLUMNS = ("n", "rmse")


def _safe_divide(numerator: pd.Series, denominator: pd.Series, empty: float) -> pd.Series:
    """Element-wise ratio with ``empty`` where the denominator is zero."""
    out = numerator / denominator.where(denominator != 0)
    return out.where(denominator != 0, empty)


def _grouped_binary(y: pd.Series, p: pd.Series, keys, threshold: float) -> pd.DataFrame:
    """Binary measures per group of ``keys`` (columns :data:`BINARY_COLUMNS`)."""
    positive = y == 1.0
    predicted = p >= threshold
    counts = pd.DataFrame(
        {
            "n": np.ones(len(y)),
            "pos": positive,
            "neg": ~positive,
            "tp": positive & predicted,
            "fp": ~positive & predicted,
            "fn": positive & ~predicted,
            "tn": ~positive & ~predicted,
        },
        index=y.index,
    ).astype(np.float64)
    # Average ranks of the scores within each group, for the Mann–Whitney AUC.
    ranks = p.groupby(keys).rank(method="average")
    counts["rank_pos"] = ranks.where(positive, 0.0)
    s = counts.groupby(keys).sum()
    both = (s["pos"] > 0) & (s["neg"] > 0)
    auc = (s["rank_pos"] - s["pos"] * (s["pos"] + 1) / 2) / (s["pos"] * s["neg"]).where(both)
    tpr = s["tp"] / s["pos"].where(s["pos"] > 0)
    tnr = s["tn"] / s["neg"].where(s["neg"] > 0)
    return pd.DataFrame(
        {
            "n": s["n"],
            "auc": auc,
            "accuracy": (s["tp"] + s["tn"]) / s["n"],
            "precision": _safe_divide(s["tp"], s["tp"] + s["fp"], 0.0),
            "recall": _safe_divide(s["tp"], s["tp"] + s["fn"], 0.0),
            "f1": _safe_divide(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"], 0.0),
            "balanced_accuracy": 0.5 * (tpr + tnr),
        }
    )


def _grouped_regression(y: pd.Series, p: pd.Series, keys) -> pd.DataFrame:
    """Regression measures per group of ``keys`` (columns :data:`REGRESSION_COLUMNS`)."""
    squared = ((y - p) ** 2).groupby(keys)
    return pd.DataFrame({"n": squared.size().astype(np.float64), "rmse": np.sqrt(squared.mean())})


def task_metrics(y, prediction, task, kind: str = "binary", names=None, *, threshold: float = 0.5) -> pd.DataFrame:
    r"""Evaluation measures per task, over all rows pooled, and averaged over tasks.

    For ``kind="binary"`` the columns are ``n`` (labelled rows), ``auc`` (:func:`roc_auc`
    of the probabilities; NaN for a task with one class, not an error), ``accuracy``,
    ``precision``, ``recall``, ``f1`` and ``balanced_accuracy`` (hard labels
    :math:`[p_i \ge t]`, same conventions as the functions of those names: zero
    denominators give 0.0, a missing class gives a NaN balanced accuracy). For
    ``kind="regression"`` they are ``n`` and ``rmse``.

    Rows with a NaN label are masked: they are left out of every row of the table
    (their predictions are never read), and a task with no labelled row has no row.

    Args:
        y: labels ``[n]`` (0/1 or NaN for binary; real or NaN for regression).
        prediction: probabilities of class 1 (binary) or predicted values ``[n]``;
            must be finite on labelled rows.
        task: task id per row ``[n]``.
        kind: ``"binary"`` or ``"regression"``.
        names: optional task names, a mapping or a sequence indexed by task id; the table
            is then indexed by name instead of id.
        threshold: probability at or above which a row is predicted positive.

    Returns:
        A DataFrame with one row per task (index named ``task``, ids in sorted order),
        then a row ``"pooled"`` (measures over all labelled rows together; ``n`` is the
        total) and a row ``"task_mean"`` (the unweighted mean over the task rows of each
        column, NaNs skipped, so ``n`` is the mean rows per task).

    Raises:
        ValueError: for an unknown ``kind``, mismatched lengths, labels that are not
            0/1/NaN (binary), non-finite predictions on labelled rows, no labelled rows,
            or a task named ``"pooled"`` or ``"task_mean"``.
    """
    if kind not in ("binary", "regression"):
        raise ValueError(f"kind must be 'binary' or 'regression', got {kind!r}")
    y = _as_vector(y, "y")
    prediction = _as_vector(prediction, "prediction")
    task = np.asarray(task).reshape(-1)
    if not (y.size == prediction.size == task.size):
        raise ValueError(f"y, prediction and task have {y.size}, {prediction.size} and {task.size} rows")
    if kind == "binary":
        _check_binary(y, allow_nan=True)
    labelled = ~np.isnan(y)
    _check_finite(prediction, "prediction", rows=labelled)
    if not labelled.any():
        raise ValueError("task_metrics needs at least one labelled (non-NaN) row")

    frame = pd.DataFrame({"task": task[labelled], "y": y[labelled], "p": prediction[labelled]})
    pooled_key = np.zeros(len(frame), dtype=np.int64)
    if kind == "binary":
        per_task = _grouped_binary(frame["y"], frame["p"], frame["task"], threshold)
        pooled = _grouped_binary(frame["y"], frame["p"], pooled_key, threshold)
    else:
        per_task = _grouped_regression(frame["y"], frame["p"], frame["task"])
        pooled = _grouped_regression(frame["y"], frame["p"], pooled_key)

    index = list(per_task.index)
    if names is not None:
        index = [names[t] if isinstance(names, Mapping) else names[int(t)] for t in index]
    clash = {"pooled", "task_mean"}.intersection(map(str, index))
    if clash:
        raise ValueError(f"a task may not be named {sorted(clash)[0]!r} (reserved row name)")
    per_task.index = pd.Index(index, name="task")
    summary = pd.DataFrame(
        [pooled.iloc[0].to_numpy(), per_task.mean(axis=0, skipna=True).to_numpy()],
        index=["pooled", "task_mean"],
        columns=per_task.columns,
    )
    table = pd.concat([per_task, summary], axis=0)
    table.index.name = "task"
    return table
