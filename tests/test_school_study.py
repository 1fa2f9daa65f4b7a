"""The Table 3 school study at a reduced size, run through ``benchmarks/table3.py``."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mtl_jax.data import ilea_task_data, load_ilea
from mtl_jax.experiments.school import PAPER_TABLE3, run_school_study, school_splits

TABLE3_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "table3.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Results of a 2-split, 1-start, 60-iteration run of all three models, via the JSON file."""
    spec = importlib.util.spec_from_file_location("benchmarks_table3", TABLE3_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path_factory.mktemp("table3") / "table3.json"
    script.main(["--splits", "2", "--n-init", "1", "--max-iter", "60", "--json", str(path)])
    return json.loads(path.read_text())


def test_study_structure(results):
    assert results["config"]["splits"] == 2 and results["config"]["max_iter"] == 60
    assert results["data"] == {
        "num_obs": 15_362, "num_tasks": 139, "train_obs": 11_168, "test_obs": 4_194, "dtype": "float64"
    }
    assert list(results["models"]) == list(PAPER_TABLE3)
    expected_components = {
        "independence": {"sigma2": 2},
        "mtl_student": {"sigma2": 2, "phi": 2, "lambda": 1},
        "mtl_all": {"sigma2": 2, "phi": 2, "lambda": 1},
    }
    for name, model in results["models"].items():
        assert model["paper"] == dict(zip(("mean", "se"), PAPER_TABLE3[name]))
        for key in ("loglik", "n_iter", "converged"):
            assert len(model[key]) == 2
        assert len(model["explained_variance"]["per_split"]) == 2
        assert all(1 <= n <= 60 for n in model["n_iter"])
        assert model["compile_seconds"] > 0 and model["fit_seconds"] > 0
        components = model["variance_components"]
        assert {label: len(values["mean"]) for label, values in components.items()} == expected_components[name]
        for values in components.values():
            assert np.all(np.asarray(values["per_split"]) >= 0)
        assert f"{PAPER_TABLE3[name][0]:.1f} +- {PAPER_TABLE3[name][1]:.1f}" in results["table"]


def test_explained_variance_is_sane_and_school_effects_help(results):
    ev = {name: model["explained_variance"] for name, model in results["models"].items()}
    for summary in ev.values():
        assert all(0 < value < 100 for value in summary["per_split"])
        assert summary["mean"] == pytest.approx(np.mean(summary["per_split"]))
    # School random effects add several points of explained variance (about 6 in the paper).
    assert ev["mtl_student"]["mean"] > ev["independence"]["mean"]


def test_splits_partition_every_school():
    data = ilea_task_data(load_ilea(), covariates="all")
    sizes = data.task_sizes()
    pairs = school_splits(data, splits=2, test_fraction=3 / 11, seed=0)
    full = _sorted_rows(data)
    for train, test in pairs:
        train_sizes, test_sizes = train.task_sizes(), test.task_sizes()
        assert np.all(train_sizes > 0) and np.all(test_sizes > 0)
        np.testing.assert_array_equal(test_sizes, np.rint(3 / 11 * sizes))
        # Train and test together hold every row exactly once.
        stacked = np.concatenate([_rows(train), _rows(test)])
        np.testing.assert_array_equal(stacked[np.lexsort(stacked.T)], full)
    assert not np.array_equal(_rows(pairs[0][1]), _rows(pairs[1][1]))


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="unknown config key"):
        run_school_study({"split": 2}, progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        run_school_study({"models": ["mtl"]}, progress=False)


def _rows(data):
    """Task id, design and response of every row, shape [n, 1 + q + p]."""
    return np.column_stack([np.asarray(data.task), np.asarray(data.X), np.asarray(data.y)])


def _sorted_rows(data):
    """:func:`_rows` in lexicographic order."""
    rows = _rows(data)
    return rows[np.lexsort(rows.T)]
