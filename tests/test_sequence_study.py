"""The Sequential LDA synthetic study at a tiny size, run through ``mtl-jax run``."""

import json

import numpy as np
import pytest
import yaml

from mtl_jax.experiments import EXPERIMENTS, run_experiment
from mtl_jax.experiments.sequence_study import DEFAULT_CONFIG, MODELS, sample_hmm, simulate_tasks
from tests.support import run_main

TINY = {
    "experiment": "sequence_study",
    "alphas": [0.5],
    "num_tasks": [2],
    "train_sequences": [3, 6],
    "test_sequences": 4,
    "repeats": 2,
    "n_init": 1,
    "max_iter": 5,
    "dtype": None,  # the tests run with jax_enable_x64 (tests/conftest.py); the models' starts follow it
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """``mtl-jax run`` on the tiny config: its exit status, printed output and output directory."""
    directory = tmp_path_factory.mktemp("sequence_study")
    config = directory / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    result = run_main(["run", str(config), "--out-dir", str(directory)])
    return result, directory


def test_run_writes_the_json_layout_and_the_figure(study):
    result, directory = study
    assert result.status in (0, None), result.err
    results = json.loads((directory / "tiny.json").read_text())
    assert results["config"] == {**DEFAULT_CONFIG, **TINY}
    assert list(results["results"]) == ["0.5"] and list(results["results"]["0.5"]) == ["2"]
    cell = results["results"]["0.5"]["2"]
    assert list(cell) == list(MODELS)
    for name in MODELS:
        for metric in ("loglik", "accuracy"):
            assert len(cell[name][metric]["per_repeat"]) == 2
            assert cell[name][metric]["mean"] == pytest.approx(np.mean(cell[name][metric]["per_repeat"]))
        assert all(value < 0 for value in cell[name]["loglik"]["per_repeat"])
        assert all(0 <= value <= 100 for value in cell[name]["accuracy"]["per_repeat"])
    for name in MODELS[:-1]:
        assert 0 <= cell[name]["converged_fraction"] <= 1 and 1 <= cell[name]["mean_iterations"] <= 5
        gap = np.subtract(cell["oracle"]["loglik"]["per_repeat"], cell[name]["loglik"]["per_repeat"])
        np.testing.assert_allclose(cell[name]["loglik_gap"]["per_repeat"], gap, rtol=1e-6)
    assert "loglik_gap" not in cell["oracle"] and "converged_fraction" not in cell["oracle"]
    assert "LL gap sequence-lda" in results["table"] and results["table"] in result.out
    assert (directory / "tiny.png").stat().st_size > 0


def test_oracle_loglik_equals_an_independent_forward_pass(study):
    """The oracle's mean log-likelihood per repeat equals log sum_k theta_tk P_k(x) by a numpy forward pass."""
    _, directory = study
    results = json.loads((directory / "tiny.json").read_text())
    config = results["config"]
    oracle = results["results"]["0.5"]["2"]["oracle"]["loglik"]["per_repeat"]
    for repeat in range(2):
        sim = simulate_tasks(np.random.default_rng([config["seed"], 0, repeat]), config, 0.5)
        init, trans, emit = (np.exp(leaf) for leaf in sim.topics)
        values = []
        for t, sequences in enumerate(sim.test[:2]):
            for x in sequences:
                probs = [_hmm_probability(init[k], trans[k], emit[k], x) for k in range(config["topics"])]
                values.append(np.log(np.dot(sim.theta[t], probs)))
        assert len(values) == 2 * config["test_sequences"]
        assert oracle[repeat] == pytest.approx(np.mean(values), rel=1e-5)


def _hmm_probability(init, trans, emit, x):
    """P(x) of an HMM with halting: forward recursion, then the END column."""
    S = len(init)
    forward = init * emit[:, x[0]]
    for symbol in x[1:]:
        forward = (forward @ trans[:, :S]) * emit[:, symbol]
    return forward @ trans[:, S]


def test_simulated_tasks_follow_the_config():
    config = {**DEFAULT_CONFIG, **TINY}
    sim = simulate_tasks(np.random.default_rng(0), config, 0.5)
    assert sim.theta.shape == (2, 3) and np.allclose(sim.theta.sum(axis=1), 1.0)
    assert all(3 <= len(task) <= 6 for task in sim.train) and all(len(task) == 4 for task in sim.test)
    for task in sim.train + sim.test:
        for x in task:
            assert len(x) >= 1 and x.min() >= 0 and x.max() < 8
    probabilities = [np.exp(leaf) for leaf in sim.topics]
    for leaf in probabilities:
        np.testing.assert_allclose(leaf.sum(axis=-1), 1.0)
    assert np.all((probabilities[1][..., -1] >= 0.2) & (probabilities[1][..., -1] <= 0.3))


def test_sampled_lengths_follow_the_halting_probability():
    """With END probability h in every state, lengths are geometric with mean 1 / h."""
    S, V, h = 2, 3, 0.25
    trans = np.log(np.full((1, S, S + 1), (1 - h) / S))
    trans[..., -1] = np.log(h)
    topics = (np.log(np.full((1, S), 1 / S)), trans, np.log(np.full((1, S, V), 1 / V)))
    lengths = [len(x) for x in sample_hmm(np.random.default_rng(0), topics, np.zeros(20_000, int))]
    assert np.mean(lengths) == pytest.approx(1 / h, rel=0.03)


def test_registry_and_bad_configs():
    assert "sequence_study" in EXPERIMENTS
    with pytest.raises(ValueError, match="unknown sequence_study setting"):
        run_experiment({**TINY, "repeat": 3}, progress=False)
