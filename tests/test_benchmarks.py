"""Smoke runs of the benchmark scripts at tiny sizes: they run and write the expected JSON."""

import importlib.util
import json
from pathlib import Path

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
    assert "skipped" in load("speed")._statsmodels_peer(None, None, None)


def test_scaling_script(tmp_path):
    path = tmp_path / "scaling.json"
    load("scaling").main(["--num-tasks", "20", "--n", "600", "--max-iter", "5", "--task-sizes", "random",
                          "--json", str(path)])
    results = json.loads(path.read_text())
    assert results["iterations"] == 5 or results["converged"]
    for key in ("compile_seconds", "run_seconds", "seconds_per_iteration", "peak_rss_mb"):
        assert results[key] > 0
    assert "device_memory_stats" in results and results["loglik"] < 0


def test_float32_grid_script(tmp_path):
    path = tmp_path / "float32_grid.json"
    # The hard cell only (g = 1 in float32 is tested in test_fit_api.py): ratio n_i phi / sigma^2 = 1e4.
    load("float32_grid").main(["--components", "2", "--num-tasks", "5", "--ratios", "1e4",
                               "--n-per-task", "50", "--max-iter", "1000", "--json", str(path)])
    results = json.loads(path.read_text())
    assert results["config"]["same_start"] is True
    cells = results["cells"]
    assert [(cell["components"], cell["ratio"]) for cell in cells] == [(2, 1e4)]
    for cell in cells:
        assert cell["float32"]["dtype"] == "float32" and cell["float64"]["dtype"] == "float64"
        # From the float64 estimate, float32 EM lands on the same fixed effects and marginal
        # log-likelihood (per observation, in nats) in the regime that used to lose everything.
        assert cell["relative_difference"]["fixed"] < 1e-3, cell
        assert cell["relative_difference"]["fixed_same_steps"] < 1e-3, cell
        assert cell["relative_difference"]["loglik_per_obs"] < 1e-4, cell
        assert cell["relative_difference"]["Lambda"] is not None  # g = 2 has mixing effects
    assert results["summary"]["cells"] == 1 and "loglik/obs" in results["table"]


@pytest.mark.parametrize("name", ["table2", "speed", "scaling", "float32_grid"])
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
