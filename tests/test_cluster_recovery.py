"""The synthetic cluster-recovery experiment: its design, and a tiny run through the YAML runner."""

import numpy as np
import pytest

from mtl_jax.experiments import run_experiment
from mtl_jax.experiments.cluster_recovery import separation, simulate


def test_simulate_assigns_tasks_to_clusters_in_turn_with_train_and_test_rows():
    frame, truth, coefficients = simulate(np.random.default_rng(0), clusters=3, tasks=7, features=2, train_rows=4, test_rows=6,
                            coef_sd=1.0)
    np.testing.assert_array_equal(truth, [0, 1, 2, 0, 1, 2, 0])
    assert coefficients.shape == (3, 2)
    assert separation(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert len(frame) == 7 * 10 and set(frame["y_Label"]) <= {0.0, 1.0}
    counts = frame.groupby("task")["split"].value_counts().unstack()
    assert (counts["train"] == 4).all() and (counts["test"] == 6).all()


def test_tiny_run_recovers_well_separated_clusters():
    config = {"experiment": "cluster_recovery", "replicates": 3, "tasks": 8, "train_rows": 40, "test_rows": 40,
              "coef_sd": 3.0,
              "models": {"hblr": {"method": "vb", "backend": {"n_init": 2}},
                         "pooled logistic": {"model": "pooled-logistic", "C": [1.0]}}}
    results = run_experiment(config, progress=False)
    assert len(results["replicates"]) == 3
    separated = [entry["models"] for entry in results["replicates"] if entry["separation"] > 4.0]
    assert len(separated) >= 2  # seed 0: clusters 6.1 and 7.7 apart in replicates 2 and 3
    for models in separated:
        assert models["hblr"]["ari"] == pytest.approx(1.0)
        assert models["hblr"]["clusters_used"] == 2
        assert models["hblr"]["auc_task_mean"] > models["pooled logistic"]["auc_task_mean"]
    assert all("ari" not in entry["models"]["pooled logistic"] for entry in results["replicates"])
    aris = [entry["models"]["hblr"]["ari"] for entry in results["replicates"]]
    assert f"{np.mean(aris):.3f} ({np.std(aris, ddof=1) / np.sqrt(3):.3f})" in results["table"]
    with pytest.raises(ValueError, match="unknown cluster_recovery settings"):
        run_experiment({"experiment": "cluster_recovery", "task": 3}, progress=False)
