"""Classification and per-task measures of mtl_jax.metrics against independent references."""

import numpy as np
import pytest

from mtl_jax.metrics import (
    accuracy,
    adjusted_rand_index,
    balanced_accuracy,
    f1,
    precision,
    recall,
    rmse,
    roc_auc,
    task_metrics,
)


def pairwise_auc(y, score):
    """O(n^2) reference: over all (positive, negative) pairs, 1 if the positive scores
    higher, 1/2 for a tie, 0 otherwise."""
    total = 0.0
    pairs = 0
    for i in range(len(y)):
        if y[i] != 1:
            continue
        for j in range(len(y)):
            if y[j] != 0:
                continue
            pairs += 1
            if score[i] > score[j]:
                total += 1.0
            elif score[i] == score[j]:
                total += 0.5
    return total / pairs


# ------------------------------------------------------------------------------- AUC
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_roc_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60 + 10 * seed
    y = rng.integers(0, 2, n)
    # Scores rounded to one decimal: many ties, within and across classes.
    score = np.round(rng.random(n) + 0.3 * y, 1)
    assert len(np.unique(score)) < n // 3
    assert roc_auc(y, score) == pytest.approx(pairwise_auc(y, score), abs=1e-12)


def test_roc_auc_small_hand_example():
    # positives score 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4)=1, (0.8>0.1)=1,
    # (0.4=0.4)=1/2, (0.4>0.1)=1  ->  3.5 / 4
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert roc_auc([0, 1], [0.3, 0.3]) == pytest.approx(0.5)
    assert roc_auc([1, 0], [0.1, 0.9]) == pytest.approx(0.0)


def test_roc_auc_single_class_raises():
    with pytest.raises(ValueError, match="no negative"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="no positive"):
        roc_auc([0, 0], [0.1, 0.2])


def test_roc_auc_non_binary_names_row():
    with pytest.raises(ValueError, match="row 2"):
        roc_auc([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="row 1"):
        roc_auc([0, 0.5, 1], [0.1, 0.2, 0.3])


# --------------------------------------------------------------- thresholded measures
def test_thresholded_measures_hand_counts():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [0.9, 0.5, 0.2, 0.7, 0.1, 0.4, 0.3, 0.6]
    # hard labels at 0.5: 1, 1, 0, 1, 0, 0, 0, 1
    # TP = rows 0, 1, 7 -> 3; FN = row 2 -> 1; FP = row 3 -> 1; TN = rows 4, 5, 6 -> 3
    assert accuracy(y, p) == pytest.approx(6 / 8)
    assert precision(y, p) == pytest.approx(3 / 4)
    assert recall(y, p) == pytest.approx(3 / 4)
    assert f1(y, p) == pytest.approx(3 / 4)
    assert balanced_accuracy(y, p) == pytest.approx((3 / 4 + 3 / 4) / 2)


def test_thresholded_measures_other_threshold_and_asymmetry():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [0.9, 0.5, 0.2, 0.7, 0.1, 0.4, 0.3, 0.6]
    # threshold 0.35: hard 1, 1, 0, 1, 0, 1, 0, 1 -> TP 3, FN 1, FP 2, TN 2
    assert accuracy(y, p, threshold=0.35) == pytest.approx(5 / 8)
    assert precision(y, p, threshold=0.35) == pytest.approx(3 / 5)
    assert recall(y, p, threshold=0.35) == pytest.approx(3 / 4)
    assert f1(y, p, threshold=0.35) == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert balanced_accuracy(y, p, threshold=0.35) == pytest.approx((3 / 4 + 2 / 4) / 2)
    # Balanced accuracy differs from plain accuracy under class imbalance:
    # y has 1 positive, 3 negatives; hard 1, 1, 0, 0 -> TP 1, FP 1, TN 2, FN 0
    assert accuracy([1, 0, 0, 0], [0.8, 0.6, 0.2, 0.1]) == pytest.approx(3 / 4)
    assert balanced_accuracy([1, 0, 0, 0], [0.8, 0.6, 0.2, 0.1]) == pytest.approx((1 + 2 / 3) / 2)


def test_zero_denominators_are_zero():
    # Nothing predicted positive: precision TP/(TP+FP) = 0/0 -> 0.0; recall 0/2 = 0.
    y = [1, 0, 1, 0]
    p = [0.1, 0.2, 0.3, 0.4]
    assert precision(y, p) == 0.0
    assert recall(y, p) == 0.0
    assert f1(y, p) == 0.0
    assert accuracy(y, p) == pytest.approx(0.5)
    # No positive labels and none predicted: recall 0/0 -> 0.0, F1 0/0 -> 0.0,
    # precision 0/0 -> 0.0; balanced accuracy undefined (NaN).
    y = [0, 0, 0]
    p = [0.1, 0.2, 0.3]
    assert recall(y, p) == 0.0
    assert f1(y, p) == 0.0
    assert precision(y, p) == 0.0
    assert accuracy(y, p) == 1.0
    assert np.isnan(balanced_accuracy(y, p))


def test_balanced_accuracy_equals_auc_of_hard_labels():
    # The original project's "AUC": ROC AUC of 0/1 predictions == (TPR + TNR) / 2.
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 40)
    p = rng.random(40)
    hard = (p >= 0.5).astype(float)
    assert balanced_accuracy(y, p) == pytest.approx(pairwise_auc(y, hard))


def test_binary_measures_reject_non_binary_labels():
    with pytest.raises(ValueError, match="row 3"):
        accuracy([0, 1, 1, -1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="row 0"):
        f1([np.nan, 1], [0.1, 0.2])


def test_rmse():
    assert rmse([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 3.0, 6.0]) == pytest.approx(np.sqrt((4 + 4) / 4))


# ------------------------------------------------------------------------ task table
def _binary_data(seed=0, n=120, tasks=5):
    rng = np.random.default_rng(seed)
    task = rng.integers(0, tasks, n)
    y = rng.integers(0, 2, n).astype(float)
    p = np.round(rng.random(n), 1)
    y[rng.random(n) < 0.15] = np.nan
    y[task == tasks - 1] = np.where(np.isnan(y[task == tasks - 1]), np.nan, 1.0)  # single class
    return y, p, task


def test_task_metrics_binary_rows_match_direct_computation():
    y, p, task = _binary_data()
    table = task_metrics(y, p, task)
    assert list(table.columns) == ["n", "auc", "accuracy", "precision", "recall", "f1", "balanced_accuracy"]
    assert list(table.index) == [0, 1, 2, 3, 4, "pooled", "task_mean"]
    for t in range(5):
        keep = (task == t) & ~np.isnan(y)
        yt, pt = y[keep], p[keep]
        row = table.loc[t]
        assert row["n"] == keep.sum()
        if t == 4:
            assert np.isnan(row["auc"]) and np.isnan(row["balanced_accuracy"])
        else:
            assert row["auc"] == pytest.approx(pairwise_auc(yt, pt))
            hard = pt >= 0.5
            tpr = np.sum(hard & (yt == 1)) / np.sum(yt == 1)
            tnr = np.sum(~hard & (yt == 0)) / np.sum(yt == 0)
            assert row["balanced_accuracy"] == pytest.approx((tpr + tnr) / 2)
        assert row["accuracy"] == pytest.approx(np.mean((pt >= 0.5) == (yt == 1)))
        assert row["precision"] == pytest.approx(precision(yt, pt))
        assert row["recall"] == pytest.approx(recall(yt, pt))
        assert row["f1"] == pytest.approx(f1(yt, pt))
    keep = ~np.isnan(y)
    pooled = table.loc["pooled"]
    assert pooled["n"] == keep.sum()
    assert pooled["auc"] == pytest.approx(pairwise_auc(y[keep], p[keep]))
    assert pooled["accuracy"] == pytest.approx(np.mean((p[keep] >= 0.5) == (y[keep] == 1)))
    assert pooled["f1"] == pytest.approx(f1(y[keep], p[keep]))
    mean = table.loc["task_mean"]
    assert mean["n"] == pytest.approx(keep.sum() / 5)
    assert mean["auc"] == pytest.approx(np.mean([table.loc[t, "auc"] for t in range(4)]))  # NaN skipped
    assert mean["recall"] == pytest.approx(np.mean([table.loc[t, "recall"] for t in range(5)]))


def test_task_metrics_ignores_predictions_of_unlabelled_rows():
    y, p, task = _binary_data(seed=3)
    table = task_metrics(y, p, task)
    changed = p.copy()
    rng = np.random.default_rng(0)
    changed[np.isnan(y)] = rng.random(np.isnan(y).sum())
    assert np.isnan(y).sum() > 5
    assert task_metrics(y, changed, task).equals(table)
    changed[np.isnan(y)] = np.nan  # never read
    assert task_metrics(y, changed, task).equals(table)
    # A labelled row's prediction does count.
    labelled = np.flatnonzero(~np.isnan(y))[0]
    changed[labelled] = 1.0 - np.round(changed[labelled])
    assert not task_metrics(y, changed, task).equals(table)


def test_task_metrics_regression_and_names():
    rng = np.random.default_rng(1)
    task = np.repeat(["b", "a", "c"], [4, 6, 5])
    y = rng.normal(size=15)
    pred = y + rng.normal(size=15)
    y[[0, 7]] = np.nan
    names = {"a": "alice", "b": "bob", "c": "carol"}
    table = task_metrics(y, pred, task, kind="regression", names=names)
    assert list(table.columns) == ["n", "rmse"]
    assert list(table.index) == ["alice", "bob", "carol", "pooled", "task_mean"]
    for t, name in names.items():
        keep = (task == t) & ~np.isnan(y)
        assert table.loc[name, "n"] == keep.sum()
        assert table.loc[name, "rmse"] == pytest.approx(np.sqrt(np.mean((y[keep] - pred[keep]) ** 2)))
    keep = ~np.isnan(y)
    assert table.loc["pooled", "n"] == 13
    assert table.loc["pooled", "rmse"] == pytest.approx(np.sqrt(np.mean((y[keep] - pred[keep]) ** 2)))
    assert table.loc["task_mean", "rmse"] == pytest.approx(table["rmse"].iloc[:3].mean())


def test_task_metrics_sequence_names_and_errors():
    table = task_metrics([1, 0, 1, 0], [0.9, 0.1, 0.2, 0.8], [0, 0, 1, 1], names=["x", "y"])
    assert list(table.index[:2]) == ["x", "y"]
    assert table.loc["x", "auc"] == 1.0 and table.loc["y", "auc"] == 0.0
    with pytest.raises(ValueError, match="row 1"):
        task_metrics([0, 3, 1], [0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="kind"):
        task_metrics([0, 1], [0.1, 0.2], [0, 0], kind="multiclass")
    with pytest.raises(ValueError, match="row 1"):
        task_metrics([0, 1], [0.1, np.nan], [0, 0])


def pair_counted_ari(a, b):
    """Reference by enumerating all pairs of items (no contingency table)."""
    n = len(a)
    together = same_a = same_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            same_a += a[i] == a[j]
            same_b += b[i] == b[j]
            together += (a[i] == a[j]) and (b[i] == b[j])
    expected = same_a * same_b / (n * (n - 1) / 2)
    return (together - expected) / ((same_a + same_b) / 2 - expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjusted_rand_index_against_pair_counts(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 3, 25), rng.integers(0, 4, 25)
    b[:10] = a[:10]  # partly agreeing
    assert adjusted_rand_index(a, b) == pytest.approx(pair_counted_ari(a, b), abs=1e-12)


def test_adjusted_rand_index_known_values():
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)  # crossing pairs
    assert adjusted_rand_index([0, 0, 1, 1, 2], ["b", "b", "a", "a", "c"]) == 1.0  # relabelled
    assert adjusted_rand_index([1, 1, 1], [2, 2, 2]) == 1.0
    with pytest.raises(ValueError, match="same >= 2 items"):
        adjusted_rand_index([0, 1], [0, 1, 1])
