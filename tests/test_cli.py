"""Tests for the ``mtl-jax`` command line, run in-process through ``mtl_jax.cli.main``."""

import contextlib
import importlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import yaml
from support import COVARIATES, simulated_frame

import mtl_jax.experiments
from mtl_jax import Fit
from mtl_jax.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def fit_args(csv: Path, out: Path, *extra: str) -> list[str]:
    """Arguments of a small, quick ``mtl-jax fit`` call."""
    return [
        "fit", str(csv), "--task", "task", "--response", "y", "--covariates", *COVARIATES,
        "--components", "2", "--method", "em", "--n-init", "2", "--max-iter", "200",
        "--out", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """One CLI fit (mixing covariates x1, x2): frame, CSV and JSON paths, printed output."""
    root = tmp_path_factory.mktemp("cli")
    frame = simulated_frame()
    csv = root / "train.csv"
    frame.to_csv(csv, index=False)
    out = root / "fit.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(fit_args(csv, out, "--mixing-covariates", "x1", "x2"))
    assert status == 0
    return SimpleNamespace(frame=frame, csv=csv, out=out, printed=printed.getvalue())


def test_fit_writes_json_with_all_fields_and_shapes(fitted):
    saved = json.loads(fitted.out.read_text())
    g, q_comp, q_mix, tasks = 2, 1 + len(COVARIATES), 3, ["t0", "t1", "t2", "t3"]

    assert np.isfinite(saved["loglik"]) and np.isfinite(saved["bic"])
    assert isinstance(saved["converged"], bool) and saved["n_iter"] > 0
    assert np.shape(saved["mixing_coef"]) == (g - 1, q_mix)
    assert np.shape(saved["component_coef"]) == (g, q_comp)
    assert np.shape(saved["component_cov"]) == (g, 1, 1)
    assert np.shape(saved["variance_components"]["mixing"]) == (g - 1,)
    assert np.shape(saved["variance_components"]["component"]) == (g, 1)
    assert sorted(saved["random_effects"]["mixing"]) == tasks
    assert sorted(saved["random_effects"]["component"]) == tasks
    assert np.shape(saved["random_effects"]["mixing"]["t0"]) == (g - 1,)
    assert np.shape(saved["random_effects"]["component"]["t0"]) == (g,)
    assert saved["mixing_columns"] == ["intercept", "x1", "x2"]


def test_fit_prints_progress_and_summary(fitted):
    assert "with EM (n_init=2, max_iter=200) ..." in fitted.printed
    for word in ("loglik", "BIC", "converged", "n_iter", "v[1, x2]", "w[2, x4]", "phi[2]"):
        assert word in fitted.printed
    assert "v[1, x3]" not in fitted.printed  # x3 is not a mixing covariate


def test_predict_matches_fit_predict_and_keeps_input_columns(fitted, tmp_path):
    predictions = tmp_path / "pred.csv"
    assert main(["predict", str(fitted.out), str(fitted.csv), "--out", str(predictions)]) == 0

    inputs = pd.read_csv(fitted.csv)
    written = pd.read_csv(predictions)
    assert list(written.columns) == [*inputs.columns, "pred_y"]
    pd.testing.assert_frame_equal(written[inputs.columns], inputs)
    expected = Fit.load(fitted.out).predict(inputs)[:, 0]
    exact = pd.read_csv(predictions)["pred_y"].to_numpy()
    assert np.array_equal(exact, expected)


def test_unseen_task_gets_population_prediction(fitted, tmp_path):
    csv, predictions = tmp_path / "new.csv", tmp_path / "pred.csv"
    fitted.frame.head(5).drop(columns="y").assign(task="new school").to_csv(csv, index=False)
    main(["predict", str(fitted.out), str(csv), "--out", str(predictions)])

    result = Fit.load(fitted.out)
    design = result.model.design(result.schema.transform(pd.read_csv(csv), require_response=False))
    zeroed = result.params._replace(
        mixing_effects=np.zeros((1, 1)), component_effects=np.zeros((1, 2, 1))
    )
    expected = np.asarray(result.model.predict(type(zeroed)(*map(jnp.asarray, zeroed)), design))
    exact = pd.read_csv(predictions)["pred_y"].to_numpy()
    np.testing.assert_allclose(exact, expected[:, 0], rtol=1e-12)


def test_missing_covariate_value_exits_2_naming_column_row_and_task(tmp_path, capsys):
    frame = simulated_frame()
    frame.loc[85, "x3"] = np.nan
    csv = tmp_path / "bad.csv"
    frame.to_csv(csv, index=False)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(csv, tmp_path / "fit.json"))

    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("mtl-jax: error: ")
    assert "'x3'" in message and "row 85" in message and "task 't1'" in message
    assert "Traceback" not in message


def test_missing_file_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path / "absent.json"), str(tmp_path / "x.csv"), "--out", "p.csv"])
    assert exit_info.value.code == 2
    assert "absent.json" in capsys.readouterr().err


def test_run_passes_config_and_writes_results(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_experiment(config, *, progress=True):
        calls.append((config, progress))
        return {"table": [[1.0, np.float32(2.0)]], "replicates": np.int64(3)}

    monkeypatch.setattr(mtl_jax.experiments, "run_experiment", fake_run_experiment, raising=False)
    config = tmp_path / "tiny.yaml"
    config.write_text("experiment: simulation_study\ncomponents: [2]\ntol: 1.0e-8\n")
    out_dir = tmp_path / "out"
    assert main(["run", str(config), "--out-dir", str(out_dir)]) == 0

    assert calls == [
        ({"experiment": "simulation_study", "components": [2], "tol": 1e-8}, True)
    ]
    written = json.loads((out_dir / "tiny.json").read_text())
    assert written == {"table": [[1.0, 2.0]], "replicates": 3}
    assert str(out_dir / "tiny.json") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("simulation_study", "table2"),
        ("simulation_study_small", "table2"),
        ("school_study", "school"),
    ],
)
def test_configs_use_only_settings_their_experiment_knows(name, module):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    defaults = importlib.import_module(f"mtl_jax.experiments.{module}").DEFAULT_CONFIG
    assert config["experiment"] == defaults["experiment"] == name.removesuffix("_small")
    assert config["experiment"] in mtl_jax.experiments.EXPERIMENTS
    assert set(config) <= set(defaults)
    assert isinstance(config["tol"], float) and isinstance(config["seed"], int)
