"""The GLM families, membership per task and the formula through ``mtl-jax fit/predict`` and ``fit()``.

Each CLI fit is checked against the same fit through the public API, and every bad input
against its error message (exit status 2, column, row and task named).
"""

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

import mtl_jax
from mtl_jax.cli import main

TINY = ["--method", "em", "--n-init", "2", "--max-iter", "200"]


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(7)
    K, m = 16, 10
    task = np.repeat(np.arange(K), m)
    x = rng.normal(size=K * m)
    trials = rng.integers(1, 6, K * m)
    cluster = rng.integers(0, 2, K)
    eta = np.where(cluster[task] == 0, -1.0 + x, 1.5 - 0.5 * x) + rng.normal(0, 0.3, K)[task]
    successes = rng.binomial(trials, expit(eta))
    counts = rng.poisson(np.exp(0.2 + 0.5 * x + rng.normal(0, 0.4, K)[task]) * 2.0)
    return pd.DataFrame({
        "task": [f"p{i}" for i in task], "x": x, "group": (cluster[task] * 2.0), "s": successes, "n": trials,
        "c": counts, "log_exposure": np.log(2.0), "answer": np.where(successes > trials / 2, "yes", "no"),
    })


def run(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


def test_binomial_task_membership_cli_equals_public_fit(frame, tmp_path, capsys):
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "fit.json"
    code, _ = run(["fit", path, "--task", "task", "--response", "s", "--covariates", "x", "--family", "binomial",
                   "--trials", "n", "--membership", "task", "--components", 2, "--out", out, *TINY], capsys)
    assert code == 0
    data = mtl_jax.TaskData.from_dataframe(frame, task="task", response="s", covariates=["x"], trials="n")
    model = mtl_jax.MixtureGLMM(2, covariates=("x",), mixing_covariates=(), family="binomial", membership="task")
    public = mtl_jax.fit(model, data, "em", n_init=2, max_iter=200)
    saved = mtl_jax.Fit.load(out)
    assert saved.model == public.model
    np.testing.assert_allclose(saved.params.component_coef, public.params.component_coef, rtol=1e-5)
    document = json.loads(out.read_text())
    assert document["family"] == "binomial"
    probabilities = document["class_probabilities"]
    assert set(probabilities) == set(frame["task"])
    np.testing.assert_allclose([sum(p) for p in probabilities.values()], 1.0, rtol=1e-5)
    # predict writes the success probability per trial
    pred = tmp_path / "pred.csv"
    assert run(["predict", out, path, "--out", pred], capsys)[0] == 0
    np.testing.assert_allclose(pd.read_csv(pred)["pred_s"], public.predict(frame)[:, 0], rtol=1e-5)
    assert pd.read_csv(pred)["pred_s"].between(0, 1).all()


def test_bernoulli_text_response_needs_positive(frame, tmp_path, capsys):
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    base = ["fit", path, "--task", "task", "--response", "answer", "--covariates", "x", "--family", "bernoulli",
            "--components", 1, "--out", tmp_path / "b.json", *TINY]
    code, captured = run(base, capsys)
    assert code == 2 and "--positive" in captured.err and "'no', 'yes'" in captured.err
    code, _ = run(base + ["--positive", "yes"], capsys)
    assert code == 0
    fitted = mtl_jax.Fit.load(tmp_path / "b.json")
    data = mtl_jax.TaskData.from_dataframe(frame, task="task", response="answer", covariates=["x"], positive="yes")
    np.testing.assert_array_equal(np.asarray(data.y)[:, 0], (frame["answer"] == "yes").astype(float))
    assert fitted.schema.response_levels == ("no", "yes")


def test_poisson_offset_and_formula_cli(frame, tmp_path, capsys):
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "pois.json"
    code, _ = run(["fit", path, "--formula", "c ~ x + (1 | task)", "--family", "poisson", "--offset",
                   "log_exposure", "--components", 1, "--out", out, *TINY], capsys)
    assert code == 0
    data, terms = mtl_jax.TaskData.from_formula(frame, "c ~ x + (1 | task)", offset="log_exposure")
    model = mtl_jax.MixtureGLMM(1, family="poisson", **terms.model_kwargs())
    public = mtl_jax.fit(model, data, "em", n_init=2, max_iter=200)
    saved = mtl_jax.Fit.load(out)
    np.testing.assert_allclose(saved.params.component_coef, public.params.component_coef, rtol=1e-5)
    # an unseen task's expected count integrates its effect out: E exp(eta + b) = exp(eta + phi / 2)
    new = frame.head(3).assign(task="new person")
    w = np.asarray(public.params.component_coef)[0, :, 0]
    phi = float(public.params.component_effects_cov[0, 0, 0])
    want = np.exp(w[0] + w[1] * new["x"] + np.log(2.0) + phi / 2)
    np.testing.assert_allclose(public.predict(new)[:, 0], want, rtol=1e-4)


@pytest.mark.parametrize("change, options, message", [
    (lambda f: f.assign(s=f["n"] + 1), ["--response", "s", "--family", "binomial", "--trials", "n"],
     r"between 0 and the trials .* at row 0 \(task 'p0'\)"),
    (lambda f: f.assign(c=np.where(np.arange(len(f)) == 12, -1, f["c"])), ["--response", "c", "--family", "poisson"],
     r"non-negative whole count .* -1 at row 12 \(task 'p1'\)"),
    (lambda f: f.assign(s=f["s"].clip(upper=2)), ["--response", "s", "--family", "bernoulli"],
     r"must be 0 or 1 .* got 2 at row \d+ \(task 'p\d+'\)"),
    (lambda f: f, ["--response", "s", "--family", "binomial"], r"--trials"),
    (lambda f: f, ["--response", "s", "--membership", "task", "--mixing-covariates", "x"],
     r"mixing covariate 'x' varies within task 'p0'"),
    (lambda f: f, ["--response", "s", "--component-random-effects", "nope"], r"'nope'"),
])
def test_bad_glmm_input_is_a_clear_error(frame, tmp_path, capsys, change, options, message):
    path = tmp_path / "d.csv"
    change(frame).to_csv(path, index=False)
    code, captured = run(["fit", path, "--task", "task", "--covariates", "x", "--components", 2,
                          "--out", tmp_path / "f.json", *options, *TINY], capsys)
    assert code == 2
    assert re.search(message, captured.err), captured.err
    assert not (tmp_path / "f.json").exists()


def test_unknown_formula_term_is_a_clear_error(frame, tmp_path, capsys):
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    code, captured = run(["fit", path, "--formula", "s ~ x + age + (1 | task)", "--components", 1,
                          "--out", tmp_path / "f.json", *TINY], capsys)
    assert code == 2 and "age" in captured.err


def test_task_membership_mixes_on_the_intercept_unless_told_otherwise(frame):
    """Python and CLI agree: membership per task defaults to intercept-only mixing; a covariate
    that varies within a task, named explicitly, is refused with its task and rows."""
    data = mtl_jax.TaskData.from_dataframe(frame, task="task", response="s", covariates=["x"], trials="n")
    model = mtl_jax.MixtureGLMM(2, family="binomial", membership="task")
    assert model.mixing_covariates == ()
    assert model.labels(data)["mixing_columns"] == ["intercept"]
    assert model.design(data).x_mix.shape[1] == 1
    with pytest.raises(mtl_jax.DataError, match=r"mixing covariate 'x' varies within task 'p0'"):
        mtl_jax.MixtureGLMM(2, family="binomial", membership="task", mixing_covariates=("x",)).design(data)


@pytest.mark.parametrize("options, kwargs, columns", [
    (["--family", "binomial", "--trials", "n", "--component-random-effects", "x",
      "--random-effects-covariance", "diagonal"],
     dict(family="binomial", random_slopes=("x",), random_effects_covariance="diagonal"), ["intercept", "x"]),
    (["--family", "binomial", "--trials", "n", "--component-random-effects", "x", "--no-random-intercept",
      "--quadrature-points", "5"],
     dict(family="binomial", random_slopes=("x",), random_intercept=False, quadrature_points=5), ["x"]),
])
def test_random_effect_options_cli_equal_public_fit(frame, tmp_path, capsys, options, kwargs, columns):
    """Random slopes, their covariance structure, no intercept and quadrature: the CLI fits the
    model the public fit() fits, and the JSON names each task's effects by column."""
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "fit.json"
    code, _ = run(["fit", path, "--task", "task", "--response", "s", "--covariates", "x", "--components", 1,
                   *options, "--out", out, *TINY], capsys)
    assert code == 0
    data = mtl_jax.TaskData.from_dataframe(frame, task="task", response="s", covariates=["x"], trials="n")
    public = mtl_jax.fit(mtl_jax.MixtureGLMM(1, covariates=("x",), mixing_covariates=("x",), **kwargs), data, "em", n_init=2, max_iter=200)
    saved = mtl_jax.Fit.load(out)
    assert saved.model == public.model
    np.testing.assert_allclose(saved.params.component_effects_cov, public.params.component_effects_cov, rtol=1e-5)
    np.testing.assert_allclose(saved.loglik, public.loglik, rtol=1e-6)
    document = json.loads(out.read_text())
    assert document["random_effect_columns"] == columns
    phi = np.asarray(document["variance_components"]["component_cov"])
    assert phi.shape == (1, len(columns), len(columns))
    if len(columns) == 2:  # diagonal structure: no covariance between intercept and slope
        assert phi[0, 0, 1] == 0.0 and phi[0, 0, 0] > 0 and phi[0, 1, 1] > 0
    assert set(document["component_random_effects"]["p3"]) == {f"B1[{column}]" for column in columns}


def test_mixing_formula_cli_equals_public_fit(frame, tmp_path, capsys):
    """A task-level mixing covariate from --mixing-formula, membership per task."""
    level = dict(zip(sorted(frame["task"].unique()), np.random.default_rng(3).normal(size=frame["task"].nunique())))
    frame = frame.assign(group=frame["task"].map(level))  # task-level, not separating the clusters
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    out = tmp_path / "fit.json"
    code, _ = run(["fit", path, "--formula", "s ~ x + (1 | task)", "--mixing-formula", "~ group", "--family",
                   "binomial", "--trials", "n", "--membership", "task", "--components", 2, "--out", out, *TINY],
                  capsys)
    assert code == 0
    data, terms = mtl_jax.TaskData.from_formula(frame, "s ~ x + (1 | task)", "~ group", trials="n")
    model = mtl_jax.MixtureGLMM(2, family="binomial", membership="task", **terms.model_kwargs())
    public = mtl_jax.fit(model, data, "em", n_init=2, max_iter=200)
    saved = mtl_jax.Fit.load(out)
    assert saved.model == public.model and model.mixing_covariates == ("group",)
    np.testing.assert_allclose(saved.params.mixing_coef, public.params.mixing_coef, rtol=1e-5)
    assert np.asarray(saved.params.mixing_coef).shape == (1, 2)  # intercept and group
