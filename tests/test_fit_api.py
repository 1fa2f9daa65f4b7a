"""Tests of the public fitting API: ``mtl_jax.fit`` on a ``TaskData`` and the ``Fit`` it returns."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from support import COVARIATES, set_cell, simulated_frame

from mtl_jax import DataError, Fit, FitWarning, MixtureGLMM, TaskData, fit


def encode(frame: pd.DataFrame, **kwargs) -> TaskData:
    """Encodes a simulated frame with its default roles, overridable by ``kwargs``."""
    return TaskData.from_dataframe(
        frame, **{"task": "task", "response": "y", "covariates": COVARIATES, **kwargs}
    )


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return simulated_frame()


@pytest.fixture(scope="module")
def fitted(frame) -> Fit:
    return fit(MixtureGLMM(num_components=2), encode(frame), "em", seed=1, n_init=2, max_iter=200)


def test_save_load_round_trip_is_exact(fitted, frame, tmp_path):
    path = tmp_path / "fit.json"
    fitted.save(path)
    loaded = Fit.load(path)

    for name, leaf in fitted.params._asdict().items():
        assert np.array_equal(getattr(loaded.params, name), leaf), name
        assert getattr(loaded.params, name).dtype == leaf.dtype, name
    assert loaded.model == fitted.model and loaded.schema == fitted.schema
    assert loaded.task_names == fitted.task_names
    new_rows = frame.iloc[::7].drop(columns="y")
    assert np.array_equal(loaded.predict(new_rows), fitted.predict(new_rows))
    assert (loaded.loglik, loaded.bic, loaded.n_iter) == (fitted.loglik, fitted.bic, fitted.n_iter)


def test_summary_names_every_population_parameter(fitted):
    columns = ["intercept", *COVARIATES]
    expected = (
        [f"v[1, {c}]" for c in columns]
        + [f"w[{h}, {c}]" for h in (1, 2) for c in columns]
        + ["sigma2[1]", "sigma2[2]", "lambda[1]", "phi[1]", "phi[2]"]
    )
    summary = fitted.summary()
    assert list(summary.index) == expected
    assert np.isfinite(summary["estimate"]).all()


def test_bic_is_minus_two_loglik_plus_k_log_n(fitted):
    g, q, n = 2, 1 + len(COVARIATES), 4 * 80
    k = (g - 1) * q + g * q + g + (g - 1) + g  # v, w, sigma2, lambda, phi
    assert fitted.num_obs == n
    assert fitted.bic == pytest.approx(-2 * fitted.loglik + k * np.log(n), rel=1e-12)


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (("x2", 90, np.nan), {},
         r"covariate column 'x2' has a non-finite value \(nan\) at row 90 \(task 't1'\)"),
        (("y", 300, np.inf), {},
         r"response column 'y' has a non-finite value \(inf\) at row 300 \(task 't3'\)"),
        (None, {"covariates": ["x1", "age"]}, r"unknown column 'age'"),
        (None, {"response": "grade"}, r"response 'grade' is not numeric"),
        (None, {"covariates": ["x1", "one"]}, r"covariate 'one' is constant"),
        (None, {"covariates": ["x1", "x2", "x1_plus_x2"]}, r"'x1_plus_x2' are linear combinations"),
        (None, {"task_names": ["t0", "t1", "t2", "t3", "t4"]},
         r"task\(s\) \['t4'\] .* have no rows"),
    ],
)
def test_bad_input_raises_data_error_naming_the_culprit(frame, change, kwargs, message):
    frame = frame.assign(one=1.0, x1_plus_x2=frame["x1"] + frame["x2"], grade="B")
    if change is not None:
        frame = set_cell(frame, *change)
    with pytest.raises(DataError, match=message):
        fit(MixtureGLMM(num_components=2), encode(frame, **kwargs), "em")


def test_unknown_method_and_covariate_raise_value_error(frame):
    data = encode(frame)
    with pytest.raises(ValueError, match=r"unknown method 'gibbs'"):
        fit(MixtureGLMM(num_components=2), data, "gibbs")
    with pytest.raises(ValueError, match=r"unknown covariate 'x9'"):
        fit(MixtureGLMM(num_components=2, covariates=["x9"]), data, "em")


def test_loading_a_json_that_is_not_a_fit_raises(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"loglik": -1.0, "bic": 3.0}))
    with pytest.raises(ValueError, match=r"not an mtl_jax fit file"):
        Fit.load(path)


# ----------------------------------------------------------------- issue-5 defects
def lmm_frame(K=4, n_i=5000, noise=0.1, phi=0.2, seed=0):
    """y = 3.5 + 0.7 x + b_i + N(0, noise^2), b_i ~ N(0, phi): the float32 failure case."""
    rng = np.random.default_rng(seed)
    task = np.repeat(np.arange(K), n_i)
    x = rng.normal(size=K * n_i)
    b = rng.normal(scale=np.sqrt(phi), size=K)
    y = 3.5 + 0.7 * x + b[task] + rng.normal(scale=noise, size=K * n_i)
    return pd.DataFrame({"task": [f"s{t}" for t in task], "x": x, "y": y})


def as_float32(data: TaskData) -> TaskData:
    import dataclasses

    import jax.numpy as jnp

    return dataclasses.replace(data, X=data.X.astype(jnp.float32), y=data.y.astype(jnp.float32))


def test_float32_lmm_with_dominant_task_information_matches_float64():
    """Was: intercept ~404 and phi ~1.6e5 with converged=True in float32 (Schur cancellation)."""
    data = TaskData.from_dataframe(lmm_frame(), task="task", response="y", covariates=["x"])
    model = MixtureGLMM(1)
    with pytest.warns(Warning):
        r64 = fit(model, data, "em", n_init=1, max_iter=500)
        r32 = fit(model, as_float32(data), "em", n_init=1, max_iter=500)
    assert r32.params.component_coef.dtype == np.float32
    assert r64.converged and r32.converged
    est64, est32 = r64.named_parameters(), r32.named_parameters()
    for name in ("w[1, intercept]", "w[1, x]", "sigma2[1]", "phi[1]"):
        assert est32[name] == pytest.approx(est64[name], rel=1e-3), name
    assert r32.loglik / r32.num_obs == pytest.approx(r64.loglik / r64.num_obs, rel=1e-3)
    assert 3.0 < est64["w[1, intercept]"] < 4.2


def test_nuts_on_float32_data_in_a_float64_process():
    """Was: NumPyro's tree building failed (float32 chain starts against its float64 integrator)."""
    data = as_float32(TaskData.from_dataframe(lmm_frame(n_i=50), task="task", response="y", covariates=["x"]))
    model = MixtureGLMM(1, component_random_effects=False)
    em = fit(model, data, "em", n_init=1).named_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)  # a short run: its R-hat is not the point
        nuts = fit(model, data, "nuts", num_warmup=150, num_samples=150, num_chains=2)
    assert nuts.params.component_coef.dtype == np.float32
    assert nuts.diagnostics["num_divergences"] == 0
    for name in ("w[1, intercept]", "w[1, x]"):
        assert nuts.named_parameters()[name] == pytest.approx(em[name], abs=0.1), name


@pytest.mark.parametrize("mixing", [True, False])
def test_linear_mixed_model_through_public_fit(frame, mixing):
    """g = 1 with component effects (crashed in the variance-component covariance)."""
    result = fit(MixtureGLMM(1, mixing_random_effects=mixing), encode(frame), "em", n_init=1)
    assert result.converged
    table = result.summary()
    assert list(table.index) == ["w[1, intercept]"] + [f"w[1, {c}]" for c in COVARIATES] + ["sigma2[1]", "phi[1]"]
    assert np.all(np.isfinite(table["se"])) and np.all(table["se"] > 0)


def test_unseen_task_prediction_integrates_the_mixing_effect_out(fitted, frame):
    """The population prediction averages softmax over a ~ N(0, lambda) (not softmax at a = 0)."""
    rows = frame.iloc[:5].assign(task="new school")
    got = fitted.predict(rows)[:, 0]
    p = fitted.params
    lam = float(p.mixing_cov[0, 0])
    x = np.column_stack([np.ones(5), rows[COVARIATES].to_numpy()])
    x = (x - np.r_[0, [s[1] for s in fitted.schema.standardized]]) / np.r_[1, [s[2] for s in fitted.schema.standardized]]
    grid = np.linspace(-12, 12, 20001) * np.sqrt(lam)
    weight = np.exp(-0.5 * grid**2 / lam)
    weight /= weight.sum()
    eta = x @ p.mixing_coef[0]
    pi1 = (1 / (1 + np.exp(-(eta[:, None] + grid[None])))) @ weight
    means = x @ p.component_coef[:, :, 0].T
    want = pi1 * means[:, 0] + (1 - pi1) * means[:, 1]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plug_in = 1 / (1 + np.exp(-eta))
    assert np.max(np.abs(want - (plug_in * means[:, 0] + (1 - plug_in) * means[:, 1]))) > 1e-3


def test_predict_refuses_a_taskdata_encoded_with_another_schema(fitted, frame):
    other = encode(frame.iloc[::2])  # standardised with other means and sds
    with pytest.raises(ValueError, match="another schema"):
        fitted.predict(other)
    same = fitted.schema.transform(frame.iloc[::2])
    np.testing.assert_array_equal(fitted.predict(same), fitted.predict(frame.iloc[::2]))


def test_laplace_needs_its_mode_and_a_definite_hessian(fitted, frame):
    from mtl_jax.models.mixture_glmm import likelihood

    import jax.numpy as jnp

    design = fitted.model.design(fitted.schema.transform(frame))
    params = jax_params(fitted.params)
    far = params._replace(component_effects=params.component_effects + 3.0)
    value, ok = likelihood.laplace_log_marginal(far, design, fitted.model.response_family, use_mixing=True, use_component=True)
    assert bool(ok) and float(value) == pytest.approx(fitted.loglik, rel=1e-9)  # step halving recovers the mode
    _, ok = likelihood.laplace_log_marginal(far, design, fitted.model.response_family, use_mixing=True, use_component=True, newton_steps=0)
    assert not bool(ok)
    assert np.isnan(float(fitted.model.score(far._replace(component_cov=-jnp.ones_like(far.component_cov)), design)))


def jax_params(params):
    import jax

    import jax.numpy as jnp

    return jax.tree_util.tree_map(jnp.asarray, params)


def test_degenerate_data_warn_and_never_report_success(frame):
    """A task with a constant response, too many components, too few tasks: warnings, no NaN saved."""
    constant = frame.copy()
    constant.loc[constant["task"] == "t0", "y"] = 1.0
    result = fit(MixtureGLMM(2), encode(constant), "em", n_init=2, max_iter=200)
    assert np.isfinite(result.loglik) and all(np.all(np.isfinite(v)) for v in result.params)
    many = fit(MixtureGLMM(12), encode(frame.iloc[:120]), "em", n_init=1, max_iter=50)
    assert not many.converged or any("empty" in w for w in many.warnings)
    assert any("empty" in w or "converge" in w for w in many.warnings)
    tiny = fit(MixtureGLMM(2), encode(frame.groupby("task").head(5).iloc[:10]), "em", n_init=2, max_iter=200)
    assert any("tasks" in w for w in tiny.warnings)


def test_timings_split_compile_from_run_and_a_repeat_fit_compiles_nothing(fitted, frame):
    timings = fitted.timings
    assert timings["compile"] + timings["run"] == pytest.approx(timings["fit"] + timings["score"], rel=1e-9)
    assert timings["compile"] > timings["run"] > 0  # a first fit of a tiny data set is mostly compilation
    again = fit(MixtureGLMM(num_components=2), encode(frame), "em", seed=1, n_init=2, max_iter=200)
    assert again.timings["compile"] == 0.0  # every program (EM, score, standard errors, tables) is cached
    assert again.loglik == fitted.loglik


def test_compile_clock_counts_only_compilation():
    import jax
    import jax.numpy as jnp

    from mtl_jax.infer.compile_clock import CompileClock

    @jax.jit
    def cube_sum(x):
        return jnp.sum(x ** 3)

    x = jnp.arange(5.0)
    with CompileClock() as first:
        assert float(cube_sum(x)) == 100.0
    with CompileClock() as second:
        cube_sum(x).block_until_ready()
    assert 0 < first.compile_seconds <= first.seconds
    assert second.compile_seconds == 0.0 and second.run_seconds > 0


@pytest.mark.parametrize("setting", ["dir", "off", "default"])
def test_command_line_compilation_cache_setting(setting, tmp_path):
    """``MTL_JAX_CACHE_DIR`` moves the command line's cache or turns it off; default under XDG_CACHE_HOME."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if not key.startswith("JAX_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    env["MTL_JAX_CACHE_DIR"] = {"dir": str(tmp_path / "mine"), "off": "off"}.get(setting, "")
    if setting == "default":
        del env["MTL_JAX_CACHE_DIR"]
    script = ("import jax, jax.numpy as jnp\n"
              "from mtl_jax.infer.compile_clock import enable_persistent_cache\n"
              "print(enable_persistent_cache())\n"
              "jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()\n")
    printed = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                             text=True).stdout.strip()
    expected = {"dir": tmp_path / "mine", "off": None, "default": tmp_path / "xdg" / "mtl_jax" / "xla"}[setting]
    assert printed == str(expected)
    written = sorted(path.parent for path in tmp_path.rglob("*") if path.is_file())
    assert (set(written) == {expected}) if expected else written == []
