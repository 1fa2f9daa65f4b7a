"""The personalised MTL studies: how each data set is split and labelled, and a tiny run of each."""

import numpy as np
import pandas as pd
import pytest

from mtl_jax.data import data_dir
from mtl_jax.experiments import run_experiment
from mtl_jax.experiments.personal import computer_survey_frame, ema_frame, landmine_frame, landmine_split, sarcos_frame
from mtl_jax.metrics import adjusted_rand_index


def test_landmine_split_has_size_rows_per_task_with_both_classes():
    frame = landmine_frame()
    split = landmine_split(frame, 20, np.random.default_rng(0))
    train = split[split.split == "train"]
    assert (train.groupby("task").size() == 20).all() and train["task"].nunique() == 29
    assert (train.groupby("task")["label"].nunique() == 2).all()
    assert len(split) == len(frame)


def test_computer_survey_tests_on_the_holdout_profiles():
    frame = computer_survey_frame()
    raw = pd.read_csv(data_dir() / "computer_survey" / "ratings_long.csv")
    assert (frame.split == "test").sum() == 190 * 4
    np.testing.assert_array_equal(frame.split == "test", raw.profile >= 17)


def test_sarcos_torques_standardised_on_training_rows():
    frame = sarcos_frame(0.3, np.random.default_rng(0))
    train = frame[frame.split == "train"]
    np.testing.assert_allclose(train[[f"tau{j}" for j in range(1, 8)]].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(train[[f"tau{j}" for j in range(1, 8)]].std(ddof=0), 1.0, rtol=1e-12)
    assert 0.25 < (frame.split == "test").mean() < 0.35


def test_ema_predicts_from_the_previous_beep_and_splits_by_time():
    frame = ema_frame(0.7)
    raw = pd.read_csv(data_dir() / "ema_motivation" / "ema_motivation_20p.csv")
    user = raw[raw.User == "Moti_P03"].sort_values("Date").reset_index(drop=True)
    mine = frame[frame.User == "Moti_P03"].reset_index(drop=True)
    assert len(mine) == len(user) - 1  # the first beep has no predecessor
    np.testing.assert_array_equal(mine["prev_pleasure"], user["pleasure"].iloc[:-1])
    np.testing.assert_array_equal(mine["Date"], user["Date"].iloc[1:])
    median = np.median(user["pleasure"].iloc[1:][(mine.split == "train").to_numpy()])
    np.testing.assert_array_equal(mine["high_pleasure_Label"], (user["pleasure"].iloc[1:] > median).astype(float))
    for _, rows in frame.groupby("User"):
        assert rows[rows.split == "train"]["Date"].max() < rows[rows.split == "test"]["Date"].min()


@pytest.mark.parametrize("study", ["landmine", "computer_survey", "sarcos", "ema"])
def test_tiny_run_of_each_study(study, tmp_path):
    config = {"experiment": "personal_study", "study": study, "models": {"mtl-net": {"hidden": [4]}},
              "sizes": [20], "repeats": 1, "max_steps": 60}
    results = run_experiment(config, progress=False)
    entry = next(iter(results["runs"].values()))["mtl-net"]
    metric = "auc" if study in ("landmine", "ema") else "rmse"
    assert np.isfinite(entry["task_mean"][metric]) and "mtl-net" in results["table"]
    expected_tasks = {"landmine": 29, "computer_survey": 190, "sarcos": 7, "ema": 20}[study]
    assert len(entry["per_task"]) == expected_tasks


def test_a_model_entry_may_name_its_method_and_backend_options():
    config = {"experiment": "personal_study", "study": "ema",
              "models": {"net, SVI": {"model": "mtl-net", "hidden": [2], "method": "svi",
                                      "backend": {"num_steps": 30, "num_samples": 5}}}}
    entry = run_experiment(config, progress=False)["runs"]["time"]["net, SVI"]
    assert np.isfinite(entry["task_mean"]["auc"]) and entry["method"] == "svi"


def test_landmine_reports_the_clusters_of_a_clustering_model_against_the_terrain_split():
    config = {"experiment": "personal_study", "study": "landmine", "sizes": [40], "repeats": 2,
              "models": {"hblr": {"model": "hblr", "method": "vb", "backend": {"n_init": 1, "max_iter": 30}},
                         "pooled logistic": {"model": "pooled-logistic", "C": [1.0]}}}
    results = run_experiment(config, progress=False)
    runs = [results["runs"][f"40/{repeat}"] for repeat in range(2)]
    assert all("clusters" not in run["pooled logistic"] for run in runs)
    aris = []
    for run in runs:
        clusters = run["hblr"]["clusters"]
        assert sorted(clusters, key=int) == [str(task) for task in range(1, 30)]
        aris.append(adjusted_rand_index([int(task) <= 15 for task in clusters], list(clusters.values())))
    table = results["cluster_table"]
    ari_mean = float(table.split("\n")[-1].split()[1])  # row "40", first column "hblr: ARI"
    assert ari_mean == pytest.approx(np.mean(aris), abs=1e-3)
    assert "hblr: clusters" in table and "pooled logistic" not in table
