"""The per-family recovery study: its generator against conditional means written here, and a
CLI smoke run of ``configs/glmm_recovery_small.yaml``.

Given the realised task effects the generator returns, each row's mean is
``sum_h pi_h(row) mu_h(row)`` with ``pi`` the softmax of ``(v^T x + a_i, 0)`` (per
observation) or of ``(v_0, 0)`` (per task), and ``mu_h`` the inverse link of
``w_h^T x + B_hi^T z + offset`` times the trials; the standardised mean of ``y - mean`` over
many rows must be within 4 standard errors of zero, and the truth of the study's table must
be the values written here.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from scipy.special import expit

from mtl_jax.cli import main
from mtl_jax.experiments.glmm_recovery import design_model, simulate_design, true_params

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def row_means(spec, design, truth):
    """Mean and variance of each row's response given the realised effects (numpy only)."""
    x, z, task = np.asarray(design.x_comp), np.asarray(design.z_comp), np.asarray(design.task)
    v = np.asarray(truth.mixing_coef)[0]
    if spec["membership"] == "observation":
        p1 = expit(np.asarray(design.x_mix) @ v + np.asarray(truth.mixing_effects)[task, 0])
    else:
        p1 = np.full(len(task), expit(v[0]))
    w = np.asarray(truth.component_coef)[:, :, 0]  # [2, 2]
    b = np.asarray(truth.component_effects)[:, :, :, 0]  # [K, 2, r]
    eta = np.stack([x @ w[h] + np.einsum("nr,nr->n", z, b[task, h]) for h in range(2)], axis=1)
    eta = eta + np.asarray(design.offset)[:, None]
    trials = np.asarray(design.trials)
    if spec["family"] == "poisson":
        mu = np.exp(eta)
        second = mu + mu**2
    elif spec["family"] == "gaussian":
        mu = eta
        second = mu**2 + np.asarray(truth.component_cov)[:, 0, 0][None]
    else:
        prob = expit(eta)
        mu = trials[:, None] * prob
        second = mu * (1 - prob) + mu**2
    weights = np.stack([p1, 1 - p1], axis=1)
    mean = (weights * mu).sum(axis=1)
    return mean, (weights * second).sum(axis=1) - mean**2


@pytest.mark.parametrize("spec", [
    {"family": "gaussian", "membership": "observation"},
    {"family": "binomial", "membership": "observation", "trials": 10},
    {"family": "poisson", "membership": "observation"},
    {"family": "bernoulli", "membership": "task", "random_slope": True},
    {"family": "poisson", "membership": "task", "random_slope": True},
])
def test_generator_rows_have_their_conditional_means(spec):
    model = design_model(spec)
    params = true_params(spec, 400, np.float64)
    design, truth = simulate_design(jax.random.key(5), model, params, 400, 50, int(spec.get("trials", 1)))
    mean, variance = row_means(spec, design, truth)
    standardised = (np.asarray(design.y)[:, 0] - mean) / np.sqrt(variance)
    assert abs(standardised.mean()) < 4 / np.sqrt(len(standardised))
    # Labels per task: the rows of a task share one component, so the standardised residual
    # is still mean zero but correlated within tasks; the variance check is for independent rows.
    if spec["membership"] == "observation":
        assert standardised.var() == pytest.approx(1.0, abs=0.05)


def test_true_parameters_are_the_documented_ones():
    slope = {"family": "bernoulli", "membership": "task", "random_slope": True}
    params = true_params(slope, 3, np.float64)
    np.testing.assert_allclose(params.component_coef[:, :, 0], [[-1.0, 1.0], [1.5, -1.0]])
    np.testing.assert_allclose(params.mixing_coef, [[0.4]])
    cov = 0.3 * np.sqrt(0.5 * 0.3)
    np.testing.assert_allclose(params.component_effects_cov[0], [[0.5, cov], [cov, 0.3]])
    poisson = true_params({"family": "poisson", "membership": "observation"}, 3, np.float64)
    np.testing.assert_allclose(poisson.component_coef[:, :, 0], [[0.5, 0.3], [2.0, -0.3]])
    np.testing.assert_allclose(poisson.mixing_cov, [[0.5]])


def test_cli_runs_the_small_study(tmp_path):
    assert main(["run", str(CONFIGS / "glmm_recovery_small.yaml"), "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "glmm_recovery_small.json").read_text())
    config = yaml.safe_load((CONFIGS / "glmm_recovery_small.yaml").read_text())
    assert list(result["results"]) == ["gaussian/observation", "bernoulli/task+slope"]
    assert result["config"]["replicates"] == config["replicates"] == 2
    gaussian = result["results"]["gaussian/observation"]["table"]
    assert gaussian["w[1, x]"]["truth"] == 1.0 and gaussian["sigma2[2]"]["truth"] == 0.5
    assert gaussian["lambda[1]"]["truth"] == 0.5 and gaussian["phi[1]"]["truth"] == 0.5
    slope = result["results"]["bernoulli/task+slope"]["table"]
    assert slope["phi[1, x]"]["truth"] == pytest.approx(0.3)
    for entry in result["results"].values():
        assert all(np.isfinite(row["mean"]) for row in entry["table"].values())
