"""Within-task folds, grid search with resume, and selection (mtl_jax.evaluate)."""

import csv
import json

import numpy as np
import pandas as pd
import pytest

from mtl_jax.evaluate import grid, run_grid, select, within_task_folds


# ---------------------------------------------------------------------------- folds
def _tasks(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [1, 3, 5, 7, 12, 20, 33]  # some tasks smaller than the number of folds
    task = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(task)
    return task


def test_folds_partition_and_cover_every_task():
    task = _tasks()
    k = 5
    folds = within_task_folds(task, k, seed=0)
    assert folds.shape == task.shape and np.issubdtype(folds.dtype, np.integer)
    assert set(np.unique(folds)) <= set(range(k))
    # Each row in exactly one fold: the validation sets partition the rows.
    valid_sets = [set(np.flatnonzero(folds == f)) for f in range(k)]
    for a in range(k):
        for b in range(a + 1, k):
            assert not valid_sets[a] & valid_sets[b]
    assert set().union(*valid_sets) == set(range(task.size))
    for f in range(k):
        train = set(np.flatnonzero(folds != f))
        assert not train & valid_sets[f]
        assert train | valid_sets[f] == set(range(task.size))
    for t in np.unique(task):
        counts = np.bincount(folds[task == t], minlength=k)
        assert counts.max() - counts.min() <= 1
        if (task == t).sum() >= k:
            assert (counts > 0).all(), f"task {t} missing from a fold"


def test_folds_deterministic_per_seed():
    task = _tasks()
    a = within_task_folds(task, 4, seed=11)
    assert np.array_equal(a, within_task_folds(task, 4, seed=11))
    assert not np.array_equal(a, within_task_folds(task, 4, seed=12))


def test_folds_accept_string_task_ids():
    task = np.array(["u", "v"] * 6)
    folds = within_task_folds(task, 3, seed=1)
    for t in ("u", "v"):
        assert sorted(np.bincount(folds[task == t], minlength=3)) == [2, 2, 2]


def test_stratified_folds_balance_classes_per_task():
    rng = np.random.default_rng(5)
    task = _tasks(1)
    labels = (rng.random(task.size) < 0.3).astype(float)
    labels[rng.random(task.size) < 0.2] = np.nan
    k = 4
    for seed in range(3):
        folds = within_task_folds(task, k, seed=seed, stratify=labels)
        for t in np.unique(task):
            in_task = task == t
            total = np.bincount(folds[in_task], minlength=k)
            assert total.max() - total.min() <= 1
            for cls in (0.0, 1.0, np.nan):
                member = in_task & (np.isnan(labels) if np.isnan(cls) else labels == cls)
                counts = np.bincount(folds[member], minlength=k)
                assert counts.max() - counts.min() <= 1, (t, cls, counts)


def test_unstratified_folds_can_unbalance_classes():
    # The check above can fail: without stratify, some (task, class) group is unbalanced.
    rng = np.random.default_rng(5)
    task = np.repeat([0, 1], 40)
    labels = (rng.random(80) < 0.5).astype(float)
    worst = 0
    folds = within_task_folds(task, 4, seed=0)
    for t in (0, 1):
        for cls in (0.0, 1.0):
            counts = np.bincount(folds[(task == t) & (labels == cls)], minlength=4)
            worst = max(worst, counts.max() - counts.min())
    assert worst > 1


def test_folds_errors():
    with pytest.raises(ValueError, match="num_folds"):
        within_task_folds([0, 0, 1], 1)
    with pytest.raises(ValueError, match="row 2"):
        within_task_folds([0, 0, 1], 2, stratify=[0, 1, 2])


# ----------------------------------------------------------------------------- grid
def test_grid_product_in_stable_order():
    points = grid({"lr": [0.1, 0.01], "depth": [1, 2, 3], "kernel": "rbf"})
    assert points == [
        {"lr": 0.1, "depth": 1, "kernel": "rbf"},
        {"lr": 0.1, "depth": 2, "kernel": "rbf"},
        {"lr": 0.1, "depth": 3, "kernel": "rbf"},
        {"lr": 0.01, "depth": 1, "kernel": "rbf"},
        {"lr": 0.01, "depth": 2, "kernel": "rbf"},
        {"lr": 0.01, "depth": 3, "kernel": "rbf"},
    ]
    assert grid({}) == [{}]
    assert grid({"c": np.array([1.0, 2.0])}) == [{"c": 1.0}, {"c": 2.0}]
    with pytest.raises(ValueError):
        grid({"c": []})


# --------------------------------------------------------------------------- search
class Recorder:
    """An evaluate function that counts calls, checks the split, and can crash."""

    def __init__(self, folds, fail_on=None, watch=None):
        self.folds = folds
        self.calls = []
        self.fail_on = fail_on
        self.watch = watch  # a file whose line count is noted at each call
        self.lines_seen = []

    def __call__(self, params, train_rows, valid_rows):
        self.calls.append((json.dumps(params, sort_keys=True), int(self.folds[valid_rows[0]])))
        if self.watch is not None:
            self.lines_seen.append(len(self.watch.read_text().splitlines()) if self.watch.exists() else 0)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("crash")
        assert not set(train_rows) & set(valid_rows)
        assert len(train_rows) + len(valid_rows) == len(self.folds)
        fold = self.folds[valid_rows[0]]
        assert (self.folds[valid_rows] == fold).all() and (self.folds[train_rows] != fold).all()
        score = params["lr"] * 10 + params["depth"] + 0.1 * fold + 1 / 3
        return {"auc": score, "loss": -score}


def test_run_grid_writes_as_it_goes_and_resumes(tmp_path):
    task = _tasks()
    folds = within_task_folds(task, 3, seed=0)
    points = grid({"lr": [0.1, 0.01], "depth": [1, 2]})
    out = tmp_path / "results.csv"

    crashing = Recorder(folds, fail_on=3, watch=out)
    with pytest.raises(RuntimeError, match="crash"):
        run_grid(crashing, points, folds, out)
    # Each result is on disk before the next evaluation starts (header + rows so far).
    assert crashing.lines_seen == [0, 2, 3]
    with open(out, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["lr", "depth", "fold", "auc", "loss"]
    assert len(rows) == 1 + 2  # header + the two finished evaluations

    resumed = Recorder(folds)
    table = run_grid(resumed, points, folds, out, resume=True)
    expected_calls = [(json.dumps(p, sort_keys=True), f) for p in points for f in range(3)]
    assert resumed.calls == expected_calls[2:]
    assert len(table) == len(points) * 3
    assert len(pd.read_csv(out)) == len(points) * 3

    fresh = Recorder(folds)
    fresh_table = run_grid(fresh, points, folds, tmp_path / "fresh.csv")
    assert fresh.calls == expected_calls
    pd.testing.assert_frame_equal(table, fresh_table)
    assert list(table.columns) == ["lr", "depth", "fold", "auc", "loss"]

    # Everything done: a further resume calls nothing and returns the same table.
    again = Recorder(folds)
    pd.testing.assert_frame_equal(run_grid(again, points, folds, out), fresh_table)
    assert again.calls == []
    # resume=False starts the file afresh.
    restart = Recorder(folds)
    run_grid(restart, points, folds, out, resume=False)
    assert len(restart.calls) == 12 and len(pd.read_csv(out)) == 12


def test_run_grid_drops_a_cut_short_last_line(tmp_path):
    folds = np.array([0, 1, 2, 0, 1, 2])
    points = grid({"lr": [0.1, 0.01], "depth": 2})
    out = tmp_path / "results.csv"
    complete = run_grid(Recorder(folds), points, folds, out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:7])  # header, 3 rows, part of the 4th
    resumed = Recorder(folds)
    table = run_grid(resumed, points, folds, out)
    assert resumed.calls == [(json.dumps(points[1], sort_keys=True), f) for f in range(3)]
    pd.testing.assert_frame_equal(table, complete)
    assert out.read_text() == "".join(lines)


def test_run_grid_refuses_mismatched_csv(tmp_path):
    folds = np.array([0, 1, 0, 1])
    out = tmp_path / "other.csv"
    out.write_text("alpha,fold,auc\n1.0,0,0.5\n")
    with pytest.raises(ValueError, match="columns"):
        run_grid(Recorder(folds), grid({"lr": 0.1, "depth": 1}), folds, out)


# ------------------------------------------------------------------------ selection
def test_select_global_and_per_task():
    table = pd.DataFrame(
        {
            "lr": [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
            "fold": [0, 1, 0, 1, 0, 1],
            "auc": [0.70, 0.80, 0.90, 0.60, 0.74, 0.74],  # means 0.75, 0.75, 0.74
            "rmse": [1.0, 3.0, 2.0, 2.0, 0.5, 4.0],  # means 2.0, 2.0, 2.25
        }
    )
    assert select(table, "auc") == {"lr": 0.1}  # tie 0.75/0.75 -> first
    assert select(table, "auc", higher_is_better=False) == {"lr": 0.001}
    assert select(table, "rmse", higher_is_better=False) == {"lr": 0.1}

    per_task = pd.DataFrame(
        {
            "lr": [0.1] * 4 + [0.01] * 4,
            "depth": [1] * 8,
            "fold": [0, 0, 1, 1] * 2,
            "task": ["a", "b"] * 4,
            "auc": [0.9, 0.2, 0.7, 0.4, 0.6, 0.8, 0.6, 0.9],
        }
    )
    # task a: lr 0.1 -> 0.8, lr 0.01 -> 0.6; task b: lr 0.1 -> 0.3, lr 0.01 -> 0.85
    assert select(per_task, "auc", per_task_column="task") == {
        "a": {"lr": 0.1, "depth": 1},
        "b": {"lr": 0.01, "depth": 1},
    }
    # Globally, means 0.55 vs 0.725.
    assert select(per_task, "auc") == {"lr": 0.01, "depth": 1}
