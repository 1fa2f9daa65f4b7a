"""Tests of the public fitting API: ``mtl_jax.fit`` on a ``TaskData`` and the ``Fit`` it returns."""

import json

import numpy as np
import pandas as pd
import pytest
from support import COVARIATES, set_cell, simulated_frame

from mtl_jax import DataError, Fit, MixtureGLMM, TaskData, fit


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
        (None, {"response": "grade"}, r"response column 'grade' is not numeric"),
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
