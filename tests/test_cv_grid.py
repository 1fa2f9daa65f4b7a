"""The ``cv_grid`` experiment: K-fold CV within tasks over a grid, selection, refit and test."""

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mtl_jax.evaluate import params_key
from mtl_jax.experiments import cv_grid
from mtl_jax.experiments.cv_grid import run_cv_grid

PEOPLE = ("ann", "bob", "cy")


def write_data(path: Path, rows_per_person: int = 24, seed: int = 0) -> Path:
    """A tiny per-person binary CSV: ``person``, ``row_id`` (not a feature), ``x1``, ``x2``, ``y``; no split column."""
    rng = np.random.default_rng(seed)
    records = []
    for k, person in enumerate(PEOPLE):
        for _ in range(rows_per_person):
            x1, x2 = rng.normal(size=2)
            p = 1.0 / (1.0 + np.exp(-((1 + k) * x1 - x2)))
            records.append({"person": person, "row_id": len(records), "x1": x1, "x2": x2,
                            "y": float(rng.random() < p)})
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def config(data: Path, out_csv: Path, **changes) -> dict:
    base = {
        "experiment": "cv_grid",
        "data": str(data),
        "data_options": {"person": "person", "labels": "y", "features": ["x1", "x2"]},
        "split_fraction": 0.75,
        "model": "mtl-net",
        "options": {"hidden": [3]},
        "training": {"max_steps": 20, "eval_every": 10},
        "grid": {"l2_task": [0.01, 1.0], "learning_rate": [0.05]},
        "folds": 2,
        "metric": "auc",
        "out_csv": str(out_csv),
        "seed": 3,
    }
    return {**base, **changes}


class Spy:
    """Records the row ids of every frame fitted on and every frame predicted, by fit."""

    def __init__(self, monkeypatch):
        self.fits, self.predictions = [], []
        real_fit, real_predict = cv_grid.fit_on_frame, cv_grid.predict_rows

        def fit_on_frame(model, frame, data_options, training, seed):
            fitted = real_fit(model, frame, data_options, training, seed)
            self.fits.append({"fitted": fitted, "rows": frozenset(frame["row_id"]), "l2_task": model.l2_task,
                              "splits": set(frame[data_options["split"]])})
            return fitted

        def predict_rows(fitted, frame):
            source = next(entry for entry in self.fits if entry["fitted"] is fitted)
            self.predictions.append({"fit": source, "rows": list(frame["row_id"])})
            return real_predict(fitted, frame)

        monkeypatch.setattr(cv_grid, "fit_on_frame", fit_on_frame)
        monkeypatch.setattr(cv_grid, "predict_rows", predict_rows)


def test_folds_never_leak_and_hold_out_every_row_once(tmp_path, monkeypatch):
    data = write_data(tmp_path / "data.csv")
    spy = Spy(monkeypatch)
    results = run_cv_grid(config(data, tmp_path / "cv.csv"), progress=False)
    every = set(pd.read_csv(data)["row_id"])
    points, folds = 2, 2
    assert len(spy.fits) == points * folds + 1 and len(spy.predictions) == points * folds + 1
    cv_steps, refit = spy.predictions[:-1], spy.predictions[-1]
    cv_rows = set(refit["fit"]["rows"])  # the refit uses every CV row ...
    test_rows = set(refit["rows"])  # ... and predicts the test rows
    assert cv_rows.isdisjoint(test_rows) and cv_rows | test_rows == every
    assert len(cv_rows) == results["split"]["cv_rows"] and len(test_rows) == results["split"]["test_rows"]
    for step in cv_steps:
        trained, held = step["fit"]["rows"], set(step["rows"])
        assert trained.isdisjoint(held), "a held-out row was in the data of its fit"
        assert trained.isdisjoint(test_rows) and trained | held == cv_rows
        assert step["fit"]["splits"] == {"train"}  # early stopping draws from these rows only
    for l2_task in (0.01, 1.0):
        held = Counter(row for step in cv_steps if step["fit"]["l2_task"] == l2_task for row in step["rows"])
        assert set(held) == cv_rows and set(held.values()) == {1}, "each CV row held out exactly once per grid point"
    # The split: 75% of each person's rows (and of each class within a person) are CV rows.
    frame = pd.read_csv(data)
    in_cv = frame["row_id"].isin(cv_rows)
    assert (abs(frame[in_cv].groupby("person").size() - 18) <= 1).all()
    for (_, _), group in frame.groupby(["person", "y"]):
        assert abs(group["row_id"].isin(cv_rows).sum() - 0.75 * len(group)) <= 0.5


def test_resume_runs_only_missing_evaluations_with_identical_results(tmp_path):
    data = write_data(tmp_path / "data.csv")
    out = tmp_path / "cv.csv"
    first = run_cv_grid(config(data, out, resume=False), progress=False)
    assert first["evaluations_run"] == 4
    full = out.read_text().splitlines(keepends=True)
    assert len(full) == 1 + 4
    out.write_text("".join(full[:-2]))  # lose the last two evaluations
    second = run_cv_grid(config(data, out), progress=False)
    assert second["evaluations_run"] == 2
    before, after = pd.read_csv(io_lines(full)), pd.read_csv(out)
    pd.testing.assert_frame_equal(before.drop(columns="seconds"), after.drop(columns="seconds"))
    for a, b in zip(first["cv"], second["cv"]):
        assert a["params"] == b["params"] and a["mean"] == b["mean"] and a["sd"] == b["sd"]
    assert first["selection"] == second["selection"] and first["test"]["pooled"] == second["test"]["pooled"]
    # A full file: nothing runs. Other fixed settings: resuming is refused.
    assert run_cv_grid(config(data, out), progress=False)["evaluations_run"] == 0
    with pytest.raises(ValueError, match="other settings"):
        run_cv_grid(config(data, out, training={"max_steps": 30, "eval_every": 10}), progress=False)


def io_lines(lines):
    return io.StringIO("".join(lines))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search of three grid points, selected globally, then per task from the same CSV."""
    root = tmp_path_factory.mktemp("cv_grid")
    data = write_data(root / "data.csv", rows_per_person=30, seed=1)
    out = root / "cv.csv"
    grid = {"l2_task": [0.01, 1.0], "learning_rate": [0.01, 0.1]}
    by_global = run_cv_grid(config(data, out, grid=grid, folds=3), progress=False)
    by_task = run_cv_grid(config(data, out, grid=grid, folds=3, select="task"), progress=False)
    return by_global, by_task, pd.read_csv(out)


def test_global_selection_is_the_best_mean_cv_metric(searched):
    by_global, _, table = searched
    assert len(table) == 4 * 3 and set(table["fold"]) == {0, 1, 2}
    means = table.groupby(["l2_task", "learning_rate"], sort=False)["auc[pooled]"].mean()
    best = means.idxmax()
    assert by_global["selection"]["params"] == {"l2_task": best[0], "learning_rate": best[1]}
    for entry in by_global["cv"]:
        key = (entry["params"]["l2_task"], entry["params"]["learning_rate"])
        assert entry["mean"] == pytest.approx(means[key], rel=1e-12)
    assert len(by_global["test"]["refits"]) == 1 and by_global["test"]["refits"][0]["params"] == by_global[
        "selection"]["params"]
    assert set(by_global["test"]["per_task"]) == set(PEOPLE)
    assert "*" in by_global["table"] and "auc pooled" in by_global["table"]
    json.dumps(by_global["cv"]) and json.dumps(by_global["selection"])


def test_per_task_selection_matches_the_csv(searched):
    by_global, by_task, table = searched
    assert by_task["evaluations_run"] == 0  # the same CSV: only the selection and refits differ
    chosen = by_task["selection"]["params"]
    assert set(chosen) == set(PEOPLE) and by_task["selection"]["fallback_tasks"] == []
    for person in PEOPLE:
        means = table.groupby(["l2_task", "learning_rate"], sort=False)[f"auc[{person}]"].mean()
        best = means.idxmax()
        assert chosen[person] == {"l2_task": best[0], "learning_rate": best[1]}, person
    distinct = {params_key(p) for p in chosen.values()}
    assert {params_key(r["params"]) for r in by_task["test"]["refits"]} == distinct
    assert by_task["selection"]["global_params"] == by_global["selection"]["params"]


def test_unknown_grid_and_option_names_are_clear_errors(tmp_path):
    data = write_data(tmp_path / "data.csv")
    with pytest.raises(ValueError, match=r"grid names \['width'\] are neither options of model 'mtl-net'"):
        run_cv_grid(config(data, tmp_path / "cv.csv", grid={"width": [1, 2]}), progress=False)
    with pytest.raises(ValueError, match="takes no training options|fitted by its own solver"):
        run_cv_grid(config(data, tmp_path / "cv.csv", model="logistic", options={}, training={},
                           grid={"learning_rate": [0.1]}), progress=False)
    with pytest.raises(ValueError, match="not options of model"):
        run_cv_grid(config(data, tmp_path / "cv.csv", options={"depth": 2}), progress=False)
    with pytest.raises(ValueError, match="unknown cv_grid settings"):
        run_cv_grid(config(data, tmp_path / "cv.csv", fold=3), progress=False)
    with pytest.raises(ValueError, match="not a binary metric"):
        run_cv_grid(config(data, tmp_path / "cv.csv", metric="rmse"), progress=False)
    assert not (tmp_path / "cv.csv").exists()


def test_mtl_jax_run_writes_json_and_csv(tmp_path):
    write_data(tmp_path / "tiny.csv")
    (tmp_path / "tiny.yaml").write_text(
        "experiment: cv_grid\n"
        "name: tiny\n"
        "data: '{data_dir}/tiny.csv'\n"
        "data_options: {person: person, labels: y, features: [x1, x2]}\n"
        "split_fraction: 0.75\n"
        "model: mtl-net\n"
        "training: {max_steps: 20, eval_every: 10}\n"
        "grid: {hidden: [[3], [2]]}\n"
        "folds: 2\n"
        "metric: f1\n"
    )
    script = Path(sys.executable).with_name("mtl-jax")
    env = {**os.environ, "MTL_JAX_DATA_DIR": str(tmp_path)}
    run = subprocess.run([str(script), "run", "tiny.yaml", "--out-dir", "out"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "tiny.json").read_text())
    table = pd.read_csv(tmp_path / "results" / "tiny.csv")  # default out_csv: results/<name>.csv
    assert len(table) == 2 * 2 and list(table.columns[:2]) == ["hidden", "fold"]
    assert set(table["hidden"]) == {"[3]", "[2]"}
    assert results["selection"]["params"]["hidden"] in ([3], [2]) and results["config"]["metric"] == "f1"
    assert "f1" in results["test"]["pooled"] and results["table"] in run.stdout


def test_landmine_config_uses_known_settings():
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "cv_grid_landmine.yaml"
    settings = yaml.safe_load(path.read_text())
    assert settings["experiment"] == "cv_grid" and set(settings) <= set(cv_grid.DEFAULT_CONFIG)
    resolved = cv_grid._resolve(settings)  # checks the model, fixed options and grid names
    assert cv_grid.split_params(resolved["model"], {"hidden": [8], "l2_task": 1.0, "learning_rate": 0.01}) == (
        {"hidden": (8,), "l2_task": 1.0}, {"learning_rate": 0.01})
