"""The cortisol clustering study (Figure 2): misclassification, generator moments, a CLI smoke run.

* :func:`misclassification_rate` against hand-made examples with switched labels and
  against brute force over all label permutations;
* the generator at a large number of individuals against the truth written out here: the
  cluster proportion, each cluster's per-period means, the covariance of the per-period
  shifts (``phi_h I + sigma_h^2 / n_period``) and the residual variance within periods;
* ``mtl-jax run configs/cortisol_study_small.yaml`` (2 trials, 2 cells, 100 EM iterations).
"""

import itertools
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from mtl_jax.cli import main
from mtl_jax.experiments.cortisol import (
    CLUSTERS,
    DEFAULT_CONFIG,
    cortisol_frame,
    misclassification_rate,
    simulate_cortisol,
    true_params,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The truth of the study, written out independently of the module (its docstring's table).
TYPICAL = np.array([17.0, -1.5, -6.5, 1.5])
CHRONIC = np.array([18.5, 5.0, -3.0, -1.5])
PHI = np.array([4.0, 6.0])
SIGMA2 = np.array([2.0, 3.0])
PERIOD_TIMES = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5, 6, 7, 8])]


def cubic_mean(coef, t):
    s = (np.asarray(t, float) - 4.0) / 4.0
    return coef[0] + coef[1] * s + coef[2] * s**2 + coef[3] * s**3


# ------------------------------------------------------------------ misclassification
def test_misclassification_rate_with_switched_labels():
    rate, mapping = misclassification_rate([0, 0, 0, 1, 1], [1, 1, 0, 0, 0], 2)
    assert rate == pytest.approx(1 / 5)  # assigned 1 is true 0, assigned 0 is true 1: item 3 is wrong
    assert mapping.tolist() == [1, 0]
    rate, mapping = misclassification_rate([0, 0, 1, 1, 1], [1, 1, 0, 0, 0], 2)
    assert rate == 0.0 and mapping.tolist() == [1, 0]  # a pure label switch costs nothing
    rate, mapping = misclassification_rate([0, 1, 1, 2], [0, 1, 1, 2], 3)
    assert rate == 0.0 and mapping.tolist() == [0, 1, 2]


def test_misclassification_rate_is_the_best_permutation():
    rng = np.random.default_rng(3)
    for _ in range(20):
        truth, assigned = rng.integers(0, 3, 25), rng.integers(0, 3, 25)
        brute = min(np.mean(np.asarray(perm)[assigned] != truth) for perm in itertools.permutations(range(3)))
        rate, mapping = misclassification_rate(truth, assigned, 3)
        assert rate == pytest.approx(brute)
        assert np.mean(mapping[assigned] != truth) == pytest.approx(rate)


# ------------------------------------------------------------------ generator
@pytest.fixture(scope="module")
def large_sample():
    num_tasks = 4000
    return simulate_cortisol(jax.random.key(11), true_params(DEFAULT_CONFIG, num_tasks)), num_tasks


def test_design_columns(large_sample):
    sample, _ = large_sample
    t = np.arange(9)
    s = (t - 4.0) / 4.0
    np.testing.assert_allclose(np.asarray(sample.design.x_comp)[:9], np.stack([s**0, s, s**2, s**3], 1))
    period = np.asarray(sample.design.z_comp)[:9]
    for p, times in enumerate(PERIOD_TIMES):
        assert np.flatnonzero(period[:, p]).tolist() == times.tolist()
    np.testing.assert_array_equal(period.sum(1), 1.0)
    frame = cortisol_frame(sample)
    assert list(frame.columns) == ["person", "t", "cortisol", "period", "true_cluster"]
    assert frame["period"].iloc[:9].tolist() == ["baseline"] * 2 + ["response"] * 3 + ["dissipation"] * 4
    assert set(frame["true_cluster"]) == set(CLUSTERS) and frame["person"].nunique() == len(frame) // 9


def test_generator_moments_match_the_truth(large_sample):
    sample, num_tasks = large_sample
    y = np.asarray(sample.design.y)[:, 0].reshape(num_tasks, 9)
    clusters = sample.clusters
    share = np.mean(clusters == 0)
    assert abs(share - 0.6) < 4 * math.sqrt(0.24 / num_tasks)
    t = np.arange(9)
    for h, coef in enumerate((TYPICAL, CHRONIC)):
        rows = y[clusters == h]
        count = len(rows)
        residual = rows - cubic_mean(coef, t)
        # per-period means of the cluster: sd of one individual's period mean is sqrt(phi + sigma2 / n_period)
        for times in PERIOD_TIMES:
            sd = math.sqrt(PHI[h] + SIGMA2[h] / len(times))
            got = rows[:, times].mean()
            assert abs(got - cubic_mean(coef, times).mean()) < 4.5 * sd / math.sqrt(count), (h, times)
        # the individual's period shifts: covariance diag(phi + sigma2 / n_period), independent periods
        shifts = np.stack([residual[:, times].mean(1) for times in PERIOD_TIMES], axis=1)
        want = np.diag([PHI[h] + SIGMA2[h] / len(times) for times in PERIOD_TIMES])
        got = np.cov(shifts.T)
        sd = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want**2) / count)  # sd of a sample covariance
        assert np.all(np.abs(got - want) < 4.5 * sd), (h, got, want)
        # around the period means only the residual noise is left: pooled variance sigma2
        squares = sum(((residual[:, times] - residual[:, times].mean(1, keepdims=True)) ** 2).sum()
                      for times in PERIOD_TIMES)
        dof = count * sum(len(times) - 1 for times in PERIOD_TIMES)
        assert abs(squares / dof - SIGMA2[h]) < 4.5 * SIGMA2[h] * math.sqrt(2 / dof), h


def test_separation_scale_pulls_the_means_together():
    params = true_params(DEFAULT_CONFIG, 3, separation_scale=0.5, phi_scale=2.0)
    centre = (TYPICAL + CHRONIC) / 2
    np.testing.assert_allclose(np.asarray(params.component_coef)[:, :, 0],
                               [centre + 0.5 * (TYPICAL - centre), centre + 0.5 * (CHRONIC - centre)])
    np.testing.assert_allclose(np.asarray(params.component_effects_cov), 2 * PHI[:, None, None] * np.eye(3))
    assert float(jax.nn.sigmoid(params.mixing_coef[0, 0])) == pytest.approx(0.6)


# ------------------------------------------------------------------ configs and the CLI
def test_configs_know_their_settings():
    full = yaml.safe_load((CONFIGS / "cortisol_study.yaml").read_text())
    small = yaml.safe_load((CONFIGS / "cortisol_study_small.yaml").read_text())
    for config in (full, small):
        assert config["experiment"] == "cortisol_study" and set(config) <= set(DEFAULT_CONFIG)
    assert full == DEFAULT_CONFIG  # the documented config is the module's default
    assert full["typical_coef"] == TYPICAL.tolist() and full["phi"] == PHI.tolist()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cortisol")
    assert main(["run", str(CONFIGS / "cortisol_study_small.yaml"), "--out-dir", str(out_dir)]) == 0
    return json.loads((out_dir / "cortisol_study_small.json").read_text()), out_dir


def test_small_run_writes_results_and_figure(small_run):
    results, out_dir = small_run
    assert (out_dir / "cortisol_study_small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = results["cells"]
    assert [(cell["separation_scale"], cell["phi_scale"]) for cell in cells] == [(1.0, 1.0), (0.5, 1.0)]
    assert results["main"] == 0 and results["paper"]["misclassification"] == 0.032
    for cell in cells:
        trials = cell["trials"]
        assert len(trials) == 2
        for trial in trials:
            assert trial["misclassification"] == pytest.approx(trial["misclassified"] / 34)
            for phi, se, z, p in zip(trial["phi"], trial["phi_se"], trial["wald_z"], trial["p_value"]):
                assert phi > 0
                if se is not None:
                    assert z == pytest.approx(phi / se) and p == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
        summary = cell["summary"]
        assert summary["misclassification"] == pytest.approx(np.mean([t["misclassification"] for t in trials]))
        assert summary["both_significant"] == np.mean([all(t["significant"]) for t in trials])
    figure = results["figure"]["trajectories"]
    assert set(figure) == {"person", "t", "cortisol", "period", "true_cluster", "assigned_cluster"}
    assert len(figure["person"]) == 34 * 9
    assert "0.032" in results["table"] and "boundary test" in results["table"]


def test_small_run_main_cell_clusters_well(small_run):
    results, _ = small_run
    main_cell = results["cells"][results["main"]]
    for trial in main_cell["trials"]:
        assert trial["converged"] and trial["labels_agree"]
        # the clusters overlap a little (oracle error about 3.5%): the fit must be close to the oracle
        assert trial["misclassified"] <= trial["oracle_misclassification"] * 34 + 2
        assert all(se is not None for se in trial["phi_se"])
        assert all(0.3 * true < est < 3 * true for est, true in zip(trial["phi"], main_cell["true_phi"]))
    # pulling the cluster means together makes the clustering harder
    harder = results["cells"][1]["summary"]
    assert harder["oracle_misclassification"] > main_cell["summary"]["oracle_misclassification"]
