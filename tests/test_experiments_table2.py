"""The Table 2 simulation study and the experiment registry, at a tiny size."""

import json

import numpy as np
import pytest
import yaml
from support import run_main

from mtl_jax.experiments import EXPERIMENTS, run_experiment
from mtl_jax.experiments.table2 import PAPER_TABLE2

TINY = {
    "experiment": "simulation_study",
    "components": [2],
    "replicates": 2,
    "num_tasks": 4,
    "n_per_task": 100,
    "n_init": 2,
    "max_iter": 200,
}


@pytest.fixture(scope="module")
def tiny_study():
    return run_experiment(TINY, progress=False)


def test_results_have_the_paper_structure_and_are_json(tiny_study):
    results = tiny_study
    assert json.loads(json.dumps(results)) == results
    assert results["config"]["replicates"] == 2 and results["dtype"] == "float64"
    assert set(results["results"]) == {"2"}
    by_model = results["results"]["2"]
    assert set(by_model) == {"independence", "mtl", "oracle"}
    for name in ("independence", "mtl"):
        scores = by_model[name]
        assert set(scores["bias"]) == {"v", "w", "sigma2", "v_slopes", "w_slopes"}
        for key in ("bias_v", "bias_w", "bias_sigma2", "explained_variance", "n_iter", "converged", "loglik"):
            assert len(scores["per_replicate"][key]) == 2
        assert 0.0 <= scores["converged_fraction"] <= 1.0
        assert scores["fit_seconds"] > 0 and scores["seconds_per_iteration"] > 0
    assert results["paper"]["2"]["mtl"]["explained_variance"] == list(PAPER_TABLE2[2]["mtl"]["explained_variance"])
    table = results["table"]
    assert "oracle" in table and "43.2 ± 3.0" in table and "bias w slopes" in table


def test_biases_and_explained_variances_are_sane(tiny_study):
    by_model = tiny_study["results"]["2"]
    for name in ("independence", "mtl"):
        for key, values in by_model[name]["per_replicate"].items():
            if key.startswith("bias_"):
                assert np.all(np.isfinite(values)) and np.all(np.asarray(values) >= 0), key
    mtl = np.asarray(by_model["mtl"]["per_replicate"]["explained_variance"])
    independence = np.asarray(by_model["independence"]["per_replicate"]["explained_variance"])
    oracle = np.asarray(by_model["oracle"]["per_replicate"]["explained_variance"])
    assert np.all(oracle >= mtl - 3.0)
    # Task random intercepts with variance 1 against residual variance 0.5: ignoring the
    # tasks costs a large share of the explainable variance.
    assert mtl.mean() > independence.mean() + 5.0
    # Without random effects sigma^2 absorbs phi = 1 (the paper's bias 0.97 for g = 2).
    assert by_model["independence"]["bias"]["sigma2"]["mean"] > 0.3 > by_model["mtl"]["bias"]["sigma2"]["mean"]


def test_registry_dispatches_and_rejects_unknown_names():
    assert set(EXPERIMENTS) >= {"simulation_study", "school_study"}
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment({"experiment": "table9"})
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment({"components": [2]})
    with pytest.raises(ValueError, match="unknown simulation_study settings"):
        run_experiment({**TINY, "replicate": 3})


def test_models_setting_fits_only_the_named_models(tiny_study):
    # The same data and keys as the tiny study, so the MTL fit alone reproduces its numbers.
    alone = run_experiment({**TINY, "models": ["mtl"]}, progress=False)
    assert set(alone["results"]["2"]) == {"mtl", "oracle"}
    assert (alone["results"]["2"]["mtl"]["per_replicate"]["explained_variance"]
            == tiny_study["results"]["2"]["mtl"]["per_replicate"]["explained_variance"])
    with pytest.raises(ValueError, match="unknown model 'glmm'"):
        run_experiment({**TINY, "models": ["glmm"]}, progress=False)


def test_replicates_one_at_a_time_equal_all_at_once(tmp_path):
    """``replicate_batch``: each replicate's fit does not depend on how many share its loop
    (float64, where the batched and single programs agree to rounding); the single ones run
    through ``mtl-jax run``, as a user runs a study; a bad value fails early (exit status 2
    from the command line, naming the setting, before any fit)."""
    config = {**TINY, "models": ["independence"], "dtype": "float64", "max_iter": 500}
    batched = run_experiment({**config, "replicate_batch": None}, progress=False)
    path = tmp_path / "one_at_a_time.yaml"
    path.write_text(yaml.safe_dump({**config, "replicate_batch": 1}))
    run = run_main(["run", str(path), "--out-dir", str(tmp_path)])
    assert run.status == 0, run.err
    single = json.loads((tmp_path / "one_at_a_time.json").read_text())
    for name in ("loglik", "explained_variance", "bias_w", "n_iter", "converged"):
        np.testing.assert_allclose(single["results"]["2"]["independence"]["per_replicate"][name],
                                   batched["results"]["2"]["independence"]["per_replicate"][name], rtol=1e-8,
                                   err_msg=name)
    path.write_text(yaml.safe_dump({**config, "replicate_batch": 0}))
    run = run_main(["run", str(path), "--out-dir", str(tmp_path / "bad")])
    assert run.status == 2 and "replicate_batch" in run.err and "Traceback" not in run.err, run.err
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*.json"))
    for bad in ("all", 1.5):
        with pytest.raises(ValueError, match="replicate_batch"):
            run_experiment({**config, "replicate_batch": bad}, progress=False)
