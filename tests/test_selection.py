"""Tests of choosing the number of components by BIC: :func:`mtl_jax.select_components`,
``mtl-jax fit --components 1 2`` and the ``bic_selection`` experiment.

Every fit has the same shapes (5 tasks of 60 rows, an intercept and four covariates) and
the same EM settings, so each number of components is compiled once for the whole module.
The data are drawn here, by hand, with a known number of components.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from support import run_main

import mtl_jax.infer.selection
from mtl_jax import Fit, MixtureGLMM, SequenceLDA, TaskData, select_components
from mtl_jax.experiments import run_experiment
from mtl_jax.experiments.bic_selection import DEFAULT_CONFIG

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COVARIATES = ["x1", "x2", "x3", "x4"]
NUM_TASKS, PER_TASK = 5, 60
EM = {"n_init": 2, "max_iter": 200}
#: The fits' warnings (a spurious second component not converging, lambda at its floor when the
#: mixing does not vary by task) are expected; the tables count them.
pytestmark = pytest.mark.filterwarnings("ignore::mtl_jax.FitWarning")
#: The model ``mtl-jax fit --covariates x1 x2 x3 x4`` builds (so the CLI test reuses the compiled fits).
MODEL = MixtureGLMM(num_components=1, covariates=tuple(COVARIATES), mixing_covariates=tuple(COVARIATES))


def make_frame(two_components: bool, seed: int) -> pd.DataFrame:
    """``y = c + 0.5 x1 - 0.5 x2 + b_task + e`` with ``b ~ N(0, 0.5^2)``, ``e ~ N(0, 0.5^2)``.

    One component: ``c = 1``. Two: ``c = -3`` or ``+3`` with probability 1/2 each, means
    twelve residual sds apart.
    """
    rng = np.random.default_rng(seed)
    n = NUM_TASKS * PER_TASK
    task = np.repeat(np.arange(NUM_TASKS), PER_TASK)
    x = rng.normal(size=(n, 4))
    level = np.where(rng.random(n) < 0.5, -3.0, 3.0) if two_components else np.ones(n)
    y = level + 0.5 * x[:, 0] - 0.5 * x[:, 1] + rng.normal(0, 0.5, NUM_TASKS)[task] + rng.normal(0, 0.5, n)
    return pd.DataFrame({"task": [f"t{k}" for k in task], "y": y, **dict(zip(COVARIATES, x.T))})


def task_data(frame: pd.DataFrame) -> TaskData:
    return TaskData.from_dataframe(frame, task="task", response="y", covariates=COVARIATES)


@pytest.fixture(scope="module")
def two_frame() -> pd.DataFrame:
    return make_frame(two_components=True, seed=1)


@pytest.fixture(scope="module")
def two(two_frame):
    """Selection among g = 1, 2 on the two-component data."""
    return select_components(MODEL, task_data(two_frame), [1, 2], **EM)


@pytest.fixture(scope="module")
def one():
    """Selection among g = 1, 2 on the one-component data."""
    return select_components(MODEL, task_data(make_frame(two_components=False, seed=2)), [1, 2], **EM)


# ----------------------------------------------------------------- the BIC table
#: Free parameters of the Gaussian mixture GLMM with q = 5 columns (intercept + 4) in both
#: the mixing and the component means, one response and a task random intercept:
#: g = 1: w (5) + sigma^2 (1) + phi (1) = 7 (no mixing part);
#: g = 2: v (1 x 5) + w (2 x 5) + sigma^2 (2) + lambda (1) + phi (2) = 20.
PARAMETERS_BY_HAND = {1: 7, 2: 20}


@pytest.mark.parametrize("name", ["two", "one"])
def test_bic_is_minus_two_loglik_plus_k_log_n(name, request):
    selection = request.getfixturevalue(name)
    n = NUM_TASKS * PER_TASK
    assert list(selection.table.index) == [1, 2]
    for g, k in PARAMETERS_BY_HAND.items():
        result = selection.fits[g]
        assert result.model.num_components == g and result.num_obs == n
        assert math.isfinite(result.loglik)
        assert selection.table.loc[g, "num_parameters"] == k
        assert selection.table.loc[g, "loglik"] == result.loglik
        assert selection.table.loc[g, "bic"] == pytest.approx(-2 * result.loglik + k * math.log(n), rel=1e-12)
        assert selection.table.loc[g, "converged"] == result.converged
        assert selection.table.loc[g, "n_iter"] == result.n_iter
        assert selection.table.loc[g, "warnings"] == len(result.warnings)
    by_hand = {g: -2 * selection.fits[g].loglik + k * math.log(n) for g, k in PARAMETERS_BY_HAND.items()}
    assert selection.best is selection.fits[min(by_hand, key=by_hand.get)]
    assert selection.best_components == selection.table["bic"].idxmin()


def test_two_component_data_choose_two(two):
    assert two.best_components == 2 and two.best.converged
    assert two.table.loc[1, "bic"] - two.table.loc[2, "bic"] > 100
    # the chosen fit finds the two levels -3 and 3 (covariates are standardised, so the
    # intercept is the level plus the slopes times the covariate means, about 0)
    intercepts = np.sort(np.asarray(two.best.params.component_coef)[:, 0, 0])
    np.testing.assert_allclose(intercepts, [-3.0, 3.0], atol=0.5)


def test_one_component_data_choose_one(one):
    assert one.best_components == 1 and one.best.converged
    assert one.table.loc[2, "bic"] > one.table.loc[1, "bic"]


def test_to_dict_is_the_table(two):
    record = two.to_dict()
    assert record["criterion"] == "bic" and record["best"] == 2
    assert [row["g"] for row in record["table"]] == [1, 2]
    assert [row["bic"] for row in record["table"]] == list(two.table["bic"])
    json.dumps(record)  # plain JSON types


def test_a_fit_without_a_finite_loglik_never_wins(two, two_frame, monkeypatch):
    """g = 2 with a NaN log-likelihood (and a BIC of -inf) loses to g = 1; all NaN is an error."""
    broken = {1: two.fits[1], 2: dataclasses.replace(two.fits[2], loglik=float("nan"), bic=-math.inf)}
    monkeypatch.setattr(mtl_jax.infer.selection, "fit",
                        lambda model, *args, **kwargs: broken[model.num_components])
    data = task_data(two_frame)
    assert select_components(MODEL, data, [1, 2]).best_components == 1
    broken[1] = dataclasses.replace(two.fits[1], loglik=float("nan"), bic=float("nan"))
    with pytest.raises(FloatingPointError, match="no fit has a finite log-likelihood"):
        select_components(MODEL, data, [1, 2])


@pytest.mark.parametrize(
    "components, message",
    [([0, 1], r"integers g >= 1; invalid: \[0\]"), ([], "components is empty"), ([1, 1], r"g = \[1\] more than once"),
     ([1, 2.5], r"invalid: \[2.5\]"), ([True, 2], r"invalid: \[True\]")],
)
def test_invalid_components(components, message):
    with pytest.raises(ValueError, match=message):
        select_components(MODEL, None, components)


def test_a_model_without_num_components():
    with pytest.raises(ValueError, match="'sequence-lda' has no num_components field"):
        select_components(SequenceLDA(num_topics=2), None, [1, 2])


# ---------------------------------------------------------------------- the CLI
def cli_fit(csv: Path, out: Path, *components: str):
    return run_main(["fit", str(csv), "--task", "task", "--response", "y", "--covariates", *COVARIATES,
                     "--components", *components, "--method", "em", "--n-init", str(EM["n_init"]),
                     "--max-iter", str(EM["max_iter"]), "--out", str(out)])


def test_cli_components_one_two_writes_the_best_fit_and_the_table(two, two_frame, tmp_path):
    csv, out = tmp_path / "two.csv", tmp_path / "fit.json"
    two_frame.to_csv(csv, index=False)
    run = cli_fit(csv, out, "1", "2")
    assert run.status == 0, run.err
    assert "BIC" in run.out and "BIC chooses g = 2" in run.out
    saved = Fit.load(out)
    assert saved.model.num_components == 2
    assert saved.bic == pytest.approx(two.best.bic, rel=1e-8)
    table = json.loads((tmp_path / "fit.selection.json").read_text())
    assert table["criterion"] == "bic" and table["best"] == 2
    assert [row["g"] for row in table["table"]] == [1, 2]
    np.testing.assert_allclose([row["bic"] for row in table["table"]], two.table["bic"], rtol=1e-8)
    assert [row["num_parameters"] for row in table["table"]] == [PARAMETERS_BY_HAND[1], PARAMETERS_BY_HAND[2]]


def test_cli_single_component_writes_no_table(two_frame, tmp_path):
    csv, out = tmp_path / "two.csv", tmp_path / "fit.json"
    two_frame.to_csv(csv, index=False)
    run = cli_fit(csv, out, "1")
    assert run.status == 0, run.err
    assert Fit.load(out).model.num_components == 1
    assert not (tmp_path / "fit.selection.json").exists()


def test_cli_invalid_components_are_bad_input(two_frame, tmp_path):
    csv, out = tmp_path / "two.csv", tmp_path / "fit.json"
    two_frame.to_csv(csv, index=False)
    run = cli_fit(csv, out, "1", "0")
    assert run.status == 2
    assert "mtl-jax: error: components must be integers g >= 1; invalid: [0]" in run.err
    assert not out.exists()


# --------------------------------------------------------------- the experiment
def test_bic_selection_experiment_smoke():
    """Two replicates of the Table 1 design (true g = 1 and 2) at the module's shapes."""
    config = {"experiment": "bic_selection", "true_components": [1, 2], "max_components": 2, "replicates": 2,
              "num_tasks": NUM_TASKS, "n_per_task": PER_TASK, **EM}
    output = run_experiment(config, progress=False)
    assert set(output["results"]) == {"1", "2"}
    for true_g, scores in output["results"].items():
        assert len(scores["chosen"]) == 2 and sum(scores["counts"].values()) == 2
        for chosen, selection in zip(scores["chosen"], scores["selections"]):
            bics = {row["g"]: row["bic"] for row in selection["table"]}
            assert chosen == selection["best"] == min(bics, key=bics.get)
        # the design separates its components well: BIC finds the truth at n = 300
        assert scores["chosen"] == [int(true_g)] * 2 and scores["correct_fraction"] == 1.0
    assert "picks g=1" in output["table"] and "picks g=2" in output["table"]
    json.dumps(output)


def test_bic_selection_settings():
    with pytest.raises(ValueError, match="unknown bic_selection settings"):
        run_experiment({"experiment": "bic_selection", "replicate": 2}, progress=False)
    for name in ("bic_selection.yaml", "bic_selection_small.yaml"):
        config = yaml.safe_load((CONFIGS / name).read_text())
        assert config["experiment"] == "bic_selection" and set(config) <= set(DEFAULT_CONFIG), name
