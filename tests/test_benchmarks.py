"""Smoke runs of the benchmark scripts at tiny sizes: they run and write the expected JSON."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    """Import ``benchmarks/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table2_script(tmp_path):
    path = tmp_path / "table2.json"
    # The sizes of tests/test_experiments_table2.py, so the compiled fits are reused.
    load("table2").main(["--components", "2", "--replicates", "2", "--num-tasks", "4", "--n-per-task", "100",
                         "--n-init", "2", "--max-iter", "200", "--json", str(path)])
    results = json.loads(path.read_text())
    assert results["config"]["n_per_task"] == 100
    assert set(results["results"]["2"]) == {"independence", "mtl", "oracle"}
    assert "paper EV %" in results["table"]


def test_speed_script(tmp_path):
    path = tmp_path / "speed.json"
    load("speed").main(["--num-tasks", "3", "--n-per-task", "40", "--replicates", "2", "--n-init", "1",
                        "--iterations", "5", "--repeats", "1", "--json", str(path)])
    results = json.loads(path.read_text())
    for key in ("single_fit", "vmapped_replicates", "looped_replicates"):
        assert results[key]["seconds_per_iteration"] > 0
    assert results["loop_over_vmap_time_ratio"] > 0
    peer = results["numpy_peer"]
    assert peer["iterations"] == 5
    # Same algorithm, same start, same number of iterations: the same answer.
    assert peer["max_abs_param_difference"] < 1e-6
    lmm = results["statsmodels_lmm"]
    if "skipped" not in lmm:
        assert lmm["max_abs_fixed_effect_difference"] < 1e-3


def test_statsmodels_row_is_skipped_without_statsmodels(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_statsmodels(name, *args, **kwargs):
        if name.startswith("statsmodels"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_statsmodels)
    assert "skipped" in load("speed").statsmodels_peer(None, None, None)


def test_scaling_script(tmp_path):
    path = tmp_path / "scaling.json"
    load("scaling").main(["--num-tasks", "20", "--n", "600", "--max-iter", "5", "--task-sizes", "random",
                          "--iterations", "2", "--repeats", "1", "--json", str(path)])
    results = json.loads(path.read_text())
    assert results["iterations"] == 5 or results["converged"]
    for key in ("compile_seconds", "run_seconds", "seconds_per_iteration", "peak_rss_mb"):
        assert results[key] > 0
    assert results["design_bytes"] == 600 * (1 + 5 + 5 + 1) * 4  # y, x_comp, x_mix (float32), task (int32)
    assert results["em_step_seconds"] > results["floor_seconds"] > 0  # an EM step does more than read the data once
    assert results["em_step_over_floor"] == pytest.approx(results["em_step_seconds"] / results["floor_seconds"])
    assert "device_memory_stats" in results and results["loglik"] < 0


def test_float32_grid_script(tmp_path):
    path = tmp_path / "float32_grid.json"
    # One hard cell, g = 1 (ratio n_i phi / sigma^2 = 1e4); g = 2 in float32 against float64 is
    # tested in test_mixture_glmm.py and test_glmm_float32.py, the grid itself is the benchmark's job.
    load("float32_grid").main(["--components", "1", "--num-tasks", "5", "--ratios", "1e4", "--n-init", "1",
                               "--n-per-task", "50", "--max-iter", "1000", "--json", str(path)])
    results = json.loads(path.read_text())
    assert results["config"]["same_start"] is True
    cells = results["cells"]
    assert [(cell["components"], cell["ratio"]) for cell in cells] == [(1, 1e4)]
    for cell in cells:
        assert cell["float32"]["dtype"] == "float32" and cell["float64"]["dtype"] == "float64"
        # From the float64 estimate, float32 EM lands on the same fixed effects and marginal
        # log-likelihood (per observation, in nats) in the regime that used to lose everything.
        assert cell["relative_difference"]["fixed"] < 1e-3, cell
        assert cell["relative_difference"]["fixed_same_steps"] < 1e-3, cell
        assert cell["relative_difference"]["loglik_per_obs"] < 1e-4, cell
    assert results["summary"]["cells"] == 1 and "loglik/obs" in results["table"]


@pytest.mark.parametrize("name", ["table2", "speed", "scaling", "float32_grid", "glmm_peers", "mtl_net_step"])
def test_scripts_reject_bad_flags(name):
    with pytest.raises(SystemExit):
        load(name).main(["--no-such-flag"])


def test_sequence_speed_script(tmp_path):
    import hmmlearn  # noqa: F401  (in the [test] extra: the hmmlearn parity below always runs)

    path = tmp_path / "sequence_speed.json"
    module = load("sequence_speed")
    module.main(["--sequences", "30", "--length", "12", "--symbols", "4", "--states", "3", "--hmm-iterations", "2",
                 "--documents", "20", "--tokens-per-document", "15", "--vocabulary", "30", "--topics", "3",
                 "--lda-iterations", "2", "--scaling-tasks", "2", "--scaling-per-task", "5",
                 "--scaling-factors", "1", "2", "--inner-iterations", "3", "--repeats", "1", "--json", str(path)])
    results = json.loads(path.read_text())
    assert results["dtype"] == "float64" and set(results) >= {"config", "hmm", "lda", "scaling", "table"}
    hmm = results["hmm"]
    assert hmm["data"] == {"sequences": 30, "length": 12, "symbols": 4, "states": 3, "tokens": 360}
    assert hmm["ours"]["seconds_per_iteration"] > 0 and hmm["ours"]["loglik_start"] < 0
    reference = hmm["hmmlearn"]
    assert reference["iterations"] == 2 and reference["over_ours_time_per_iteration"] > 0
    # Same data and start in float64: one EM iteration has hmmlearn's log-likelihoods and parameters.
    assert reference["loglik_max_relative_difference"] < 1e-8, reference
    assert reference["max_abs_param_difference"] < 1e-8, reference
    dynamax = hmm["dynamax"]
    assert "skipped" in dynamax or dynamax["loglik_max_relative_difference"] < 1e-8, dynamax
    lda = results["lda"]
    assert lda["data"]["documents"] == 20 and lda["ours"]["seconds_per_iteration"] > 0
    assert "skipped" in lda["sklearn"] or "over_ours_time_per_iteration" in lda["sklearn"]
    rows = results["scaling"]["rows"]
    assert [(row["factor"], row["tasks"], row["sequences"]) for row in rows] == [(1, 2, 10), (2, 4, 20)]
    assert rows[0]["over_base_time_per_iteration"] == 1.0 and rows[1]["seconds_per_iteration"] > 0
    assert "hmmlearn / ours" in results["table"] and "Markov SequenceLDA x2" in results["table"]
    with pytest.raises(SystemExit):
        module.main(["--no-such-flag"])


def test_glmm_peers_script_without_r(tmp_path):
    """With no Rscript, every peer is skipped with a message and our side still runs."""
    path = tmp_path / "glmm_peers.json"
    results = load("glmm_peers").main(["--tasks", "6", "--per-task", "5", "--repeats", "1", "--cases",
                                       "gaussian_intercept", "--rscript", "no-such-rscript", "--out", str(path)])
    assert json.loads(path.read_text())["table"] == results["table"]
    assert results["r"]["rscript"] is None and "Rscript not found" in results["r"]["missing"]
    (case,) = results["cases"]
    assert case["data"] == {"tasks": 6, "per_task": 5, "rows": 30}
    ours = case["ours"]
    assert ours["seconds_per_fit"] > 0 and ours["compile_seconds"] > 0 and ours["converged"]
    assert set(ours["estimates"]) == {"w[1, intercept]", "w[1, x]", "sigma2[1]", "phi[1]"}
    assert set(case["peers"]) == {"lme4", "glmmTMB"}
    assert all("Rscript not found" in peer["skipped"] for peer in case["peers"].values())
    assert "Rscript not found" in results["table"]


def test_glmm_peers_script_against_flexmix(tmp_path):
    """The task-level mixture of binomial GLMs is exact ML on both sides: flexmix's optimum is ours.

    Without R (or flexmix) the peer is skipped and only our side is checked.
    """
    path = tmp_path / "glmm_peers.json"
    results = load("glmm_peers").main(["--tasks", "12", "--per-task", "6", "--repeats", "1", "--n-init", "4",
                                       "--cases", "mixture_binomial", "--out", str(path)])
    (case,) = results["cases"]
    ours = case["ours"]
    assert case["same_criterion"] and ours["converged"] and ours["seconds_per_fit"] > 0
    assert ours["estimates"]["pi[1]"] + ours["estimates"]["pi[2]"] == pytest.approx(1.0, abs=1e-12)
    flexmix = case["peers"]["flexmix"]
    if "skipped" in flexmix:
        assert results["r"]["missing"] or results["r"]["packages"]["flexmix"]
        return
    assert flexmix["converged"] and flexmix["peer_over_ours_time"] > 0
    # Same data, same likelihood: flexmix's log-likelihood (dbinom with its binomial coefficients)
    # equals ours at the common optimum, and the matched estimates agree.
    assert abs(flexmix["loglik_peer_minus_ours"]) < 1e-6 * abs(ours["loglik"]), flexmix
    assert flexmix["max_relative_difference"] < 1e-4, flexmix["relative_differences"]


def test_glmm_peers_matching_and_relative_differences():
    module = load("glmm_peers")
    peer = {"w[1, intercept]": -1.0, "w[1, x]": -0.8, "w[2, intercept]": 1.0, "w[2, x]": 0.5,
            "phi[1, intercept]": 4.0, "phi[1, x]": 1.0, "phi[1, intercept, x]": 0.5, "pi[1]": 0.6, "pi[2]": 0.4}
    ours = {"w[1, intercept]": 1.1, "w[1, x]": 0.5, "w[2, intercept]": -1.0, "w[2, x]": -0.8}
    order = module.match_components(module.component_coefficients(peer, 2), module.component_coefficients(ours, 2))
    assert list(order) == [1, 0]  # the peer's component 2 is our component 1
    relabelled = module.relabel(peer, order)
    assert relabelled["w[1, intercept]"] == 1.0 and relabelled["pi[1]"] == 0.4
    assert relabelled["phi[2, intercept, x]"] == 0.5
    ours.update({"phi[2, intercept]": 4.0, "phi[2, x]": 1.0, "phi[2, intercept, x]": 0.6})
    differences = module.relative_differences(ours, relabelled)
    assert differences["w[1, intercept]"] == pytest.approx(0.1)
    assert differences["phi[2, intercept, x]"] == pytest.approx(0.1 / 2.0)  # scaled by sqrt(4 * 1)
    assert "pi[1]" not in differences


def test_mtl_net_step_script(tmp_path):
    """Tiny sizes: our step is timed; with torch installed, one step from the same weights agrees."""
    path = tmp_path / "mtl_net_step.json"
    results = load("mtl_net_step").main(["--rows", "120", "--tasks", "6", "--features", "4", "--hidden", "8", "4",
                                         "--repeats", "2", "--warmup", "1", "--device", "cpu", "--out", str(path)])
    written = json.loads(path.read_text())
    assert written["table"] == results["table"] and written["dtype"] == "float32"
    assert set(written) >= {"config", "environment", "cases", "goal_torch_over_ours"}
    (case,) = written["cases"]
    assert case["data"] == {"rows": 120, "features": 4, "tasks": 6, "hidden": [8, 4], "binary_tasks": 3}
    ours = case["devices"]["cpu"]["ours"]
    assert ours["seconds_per_step"] > 0 and ours["compile_seconds"] > 0
    assert ours["scan"]["steps_per_call"] == 10 and ours["scan"]["seconds_per_step"] > 0
    peer = case["devices"]["cpu"]["torch"]
    try:
        import torch  # noqa: F401  (in the [bench] extra)
    except ImportError:
        assert "torch is not installed" in peer["skipped"] and "check" not in case["devices"]["cpu"]
        return
    check = case["devices"]["cpu"]["check"]
    # Same net, same start, same batch: the same loss before and after one Adam step, the same new weights.
    assert check["loss_agrees"] and check["loss_relative_difference"] < 1e-4, check
    assert check["loss_after_relative_difference"] < 1e-4, check
    assert check["params_agree"] and check["max_abs_param_difference"] < 1e-5, check
    assert set(check["param_abs_difference"]) >= {"trunk[0].weight", "trunk[1].bias", "head_weight", "log_noise_sd"}
    assert peer["seconds_per_step"] > 0 and peer["over_ours_time"] > 0 and peer["over_ours_scan_time"] > 0
    assert {run["threads"] for run in peer["by_threads"]} == set(written["environment"]["torch_threads"])
    assert "torch/ours" in written["table"] and "ok (loss rel" in written["table"]


def test_mtl_net_step_script_without_torch(monkeypatch, tmp_path):
    """Without torch the peer is skipped with a message and our step is still timed."""
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    results = load("mtl_net_step").main(["--rows", "40", "--tasks", "3", "--features", "2", "--hidden", "4",
                                         "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                         "--out", str(tmp_path / "out.json")])
    (case,) = results["cases"]
    assert "torch is not installed" in case["devices"]["cpu"]["torch"]["skipped"]
    assert case["devices"]["cpu"]["ours"]["seconds_per_step"] > 0
    assert "torch skipped" in results["table"] and results["environment"]["torch"] is None


def test_mtmkl_solver_script(tmp_path):
    """Tiny sizes: every contender reaches the best objective and the JSON has the table."""
    path = tmp_path / "mtmkl_solver.json"
    results = load("mtmkl_solver").main(["--tasks", "3", "--rows", "16", "--modalities", "2", "--repeats", "1",
                                         "--out", str(path)])
    written = json.loads(path.read_text())
    assert written["table"] == results["table"] and written["dtype"] == "float64"
    (case,) = written["cases"]
    assert case["data"]["tasks"] == 3 and case["data"]["modalities"] == 2
    for method in ("newton", "eg", "slsqp"):
        assert case["results"][method]["total_seconds"] > 0
    assert case["results"]["newton"]["seconds_to_target"] is not None
    assert abs(case["results"]["newton"]["objective_minus_best"]) <= 1e-6 * abs(case["best_objective"])
    with pytest.raises(SystemExit):
        load("mtmkl_solver").main(["--no-such-flag"])


def test_hblr_vb_script(tmp_path):
    """Tiny sizes: the jitted VB sweep and the NumPy loop agree after 1 and 3 sweeps in float64."""
    path = tmp_path / "hblr_vb.json"
    module = load("hblr_vb")
    results = module.main(["--tasks", "4", "--rows-per-task", "10", "--features", "2", "--repeats", "2",
                           "--numpy-repeats", "1", "--out", str(path)])
    written = json.loads(path.read_text())
    assert written["table"] == results["table"] and written["check_after_sweeps"] == [1, 3]
    (case,) = written["cases"]
    assert case["dtype"] == "float64" and case["data"]["clusters"] == 4 and case["data"]["rows"] == 40
    # Same start, same updates in float64: the same parameters, to rounding.
    check = case["check"]
    assert check["agree"] and check["max_abs_param_difference"] < 1e-10, check
    assert check["elbo_max_relative_difference"] < 1e-12, check
    assert set(check["after_sweeps"]["3"]) == {"mean", "cov", "membership", "cluster_weight", "stick_a",
                                                "stick_b", "alpha"}
    assert case["ours"]["seconds_per_sweep"] > 0 and case["ours"]["compile_seconds"] > 0
    assert case["numpy_loop"]["sweeps"] == 3 and case["numpy_loop"]["over_ours_time"] > 0
    assert "NumPy loop ms/sweep" in written["table"]
    with pytest.raises(SystemExit):
        module.main(["--no-such-flag"])


def test_peers_script(tmp_path):
    """Tiny sizes and a few rows (the shapes of the tests above, so the compiled fits come from the
    disk cache): one table and JSON; installed peers give finite ratios and agree, absent ones
    (here R, always; torch and dynamax where not installed) are skipped with a message."""
    import importlib.util
    import math

    path = tmp_path / "peers.json"
    results = load("peers").main([
        "--peers", "lme4", "hmm", "torch", "--lmm-tasks", "6", "--lmm-per-task", "5",
        "--glmm-args=--repeats 1 --rscript no-such-rscript",
        "--sequence-args=--sequences 30 --length 12 --symbols 4 --states 3 --hmm-iterations 2 --repeats 1",
        "--net-args=--rows 40 --tasks 3 --features 2 --hidden 4 --repeats 1 --warmup 0 --device cpu --scan-steps 0",
        "--json", str(path)])
    written = json.loads(path.read_text())
    assert written["table"] == results["table"] and written["environment"]["load_average_start"] is not None
    rows = {row["peer"]: row for row in written["rows"]}
    assert list(rows) == ["lme4", "hmmlearn", "dynamax", "torch"]
    absent = {"lme4": True, "hmmlearn": False, "dynamax": importlib.util.find_spec("dynamax") is None,
              "torch": importlib.util.find_spec("torch") is None}
    for peer, row in rows.items():
        if absent[peer]:
            assert row["skipped"] and row["ratio"] is None and row["goal_met"] is None, row
            continue
        assert "skipped" not in row and "failed" not in row, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["agreement"] and row["agreement_value"] is not None, row
    assert "Rscript not found" in rows["lme4"]["skipped"] and "skipped: Rscript not found" in results["table"]
    lme4 = rows["lme4"]["ours"]  # our side runs without the peer
    assert lme4["seconds_per_fit"] > 0 and lme4["iterations"] > 0 and lme4["compile_seconds"] > 0
    assert rows["lme4"]["basis"] == "fit" and rows["lme4"]["goal"] is None  # the goal is set at K = 10^5
    # One Baum-Welch step from the same start: hmmlearn's parameters and log-likelihoods.
    assert rows["hmmlearn"]["basis"] == "iteration" and rows["hmmlearn"]["agreement_value"] < 1e-8
    assert rows["hmmlearn"]["goal"] == 8.0 and isinstance(rows["hmmlearn"]["goal_met"], bool)
    with pytest.raises(SystemExit):
        load("peers").main(["--no-such-flag"])


def test_nuts_peers_script_without_stan(tmp_path):
    """Our NUTS side at tiny sizes (Stan skipped by its flag) through the public fit() with the population
    metric: the table, the JSON and the checks."""
    path = tmp_path / "nuts_peers.json"
    results = load("nuts_peers").main(["--tasks", "3", "--per-task", "20", "--warmup", "10", "--samples", "20",
                                       "--chains", "2", "--no-stan", "--dtype", "float64", "--mass-matrix", "population",
                                       "--json", str(path)])
    written = json.loads(path.read_text())
    assert written["table"] == results["table"] and written["data"] == {"tasks": 3, "rows": 60}
    ours, stan = written["samplers"]["ours"], written["samplers"]["stan"]
    assert stan == {"skipped": "--no-stan"} and "skipped" not in ours
    assert ours["sampling_seconds"] > 0 and ours["min_ess_bulk"] > 0
    assert ours["seconds_per_ess"] == pytest.approx(ours["sampling_seconds"] / ours["min_ess_bulk"])
    assert ours["min_ess_bulk"] == min(ours["ess_bulk"].values()) and ours["max_rhat"] == max(ours["rhat"].values())
    assert {"w[1, intercept]", "v[1, intercept]", "lambda[1]"} <= set(ours["ess_bulk"])
    with pytest.raises(SystemExit):
        load("nuts_peers").main(["--chains", "0", "--no-stan"])


def test_nuts_peers_stan_draws_are_read_back_into_the_parameters():
    """A point written as Stan's start (its sites, Stan's shapes and names from 1) is read back as the point."""
    import jax.numpy as jnp
    import pandas as pd

    from mtl_jax.models.mixture_glmm import MixtureGLMM, MixtureParams

    module = load("nuts_peers")
    model = MixtureGLMM(2)
    rng = np.random.default_rng(0)
    K, q = 3, 4
    sd_a, sd_b = 0.7, np.array([0.5, 1.3])
    params = MixtureParams(
        mixing_coef=jnp.asarray(rng.normal(size=(1, q))), component_coef=jnp.asarray(rng.normal(size=(2, q, 1))),
        component_cov=jnp.asarray([[[0.4]], [[2.0]]]), mixing_cov=jnp.asarray([[sd_a**2]]),
        component_effects_cov=jnp.asarray((sd_b**2)[:, None, None]),
        mixing_effects=jnp.asarray(rng.normal(size=(K, 1))),
        component_effects=jnp.asarray(rng.normal(size=(K, 2, 1, 1))), class_logits=jnp.zeros((K, 2)))
    start = module.stan_start(model, params)
    columns = {"chain": [1]}
    for name, value in start.items():
        value = np.asarray(value)
        if value.ndim == 0:
            columns[name] = [float(value)]
        for index in np.ndindex(*value.shape):
            columns[f"{name}[{','.join(str(i + 1) for i in index)}]"] = [float(value[index])]
    draws = module.stan_draws(pd.DataFrame(columns), 1, K, q)
    for field in MixtureParams._fields:
        np.testing.assert_allclose(np.asarray(getattr(draws, field))[0, 0], np.asarray(getattr(params, field)),
                                   rtol=1e-12, atol=1e-12, err_msg=field)
