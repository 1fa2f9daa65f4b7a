"""Tests for mtl_jax.data.formula: mixed-formula parsing, encoding, JSON round trip, fit."""

import json

import numpy as np
import pandas as pd
import pytest

from mtl_jax import Fit, MixtureGLMM, TaskData, fit
from mtl_jax.data import DataError, Schema
from mtl_jax.data.formula import FormulaError, FormulaSchema, parse_mixed_formula


@pytest.fixture
def frame() -> pd.DataFrame:
    """Fourteen rows, three tasks; text, integer-coded and continuous columns."""
    rng = np.random.default_rng(3)
    n = 14
    return pd.DataFrame(
        {
            "task": ["b", "a", "b", "a", "c", "c", "b", "a", "c", "a", "b", "c", "a", "b"],
            "x1": rng.normal(size=n),
            "x2": rng.normal(size=n),
            "t": np.arange(n, dtype=float) / 2,
            "colour": ["red", "blue", "green", "blue", "red", "green", "blue",
                       "red", "green", "red", "blue", "green", "red", "blue"],
            "k": [10, 2, 3, 2, 10, 10, 2, 3, 3, 2, 10, 3, 2, 10],
            "y": rng.normal(size=n),
        },
        index=np.arange(100, 100 + n),
    )


def dummies(values, levels) -> dict[str, np.ndarray]:
    """Treatment dummies by hand: one 0/1 column per level after the first."""
    values = np.asarray(values)
    return {level: (values == level).astype(float) for level in levels[1:]}


def test_design_matches_hand_built_columns(frame):
    data, terms = TaskData.from_formula(
        frame, "y ~ x1*x2 + colour + C(k) + I(t**2) + scale(t) + (1 + x1 | task)")

    t = frame["t"].to_numpy()
    expected = {
        "intercept": np.ones(len(frame)),
        "x1": frame["x1"].to_numpy(),
        "x2": frame["x2"].to_numpy(),
        "x1:x2": frame["x1"].to_numpy() * frame["x2"].to_numpy(),
        "I(t ** 2)": t**2,
        "scale(t)": (t - t.mean()) / t.std(ddof=1),
    }
    # text levels sorted (blue < green < red), integer levels numerically (2 < 3 < 10)
    expected |= {f"colour[T.{k}]": v for k, v in dummies(frame["colour"], ["blue", "green", "red"]).items()}
    expected |= {f"C(k)[T.{k}]": v for k, v in dummies(frame["k"], [2, 3, 10]).items()}

    assert data.columns[0] == "intercept"
    assert sorted(data.columns) == sorted(expected)
    np.testing.assert_allclose(np.asarray(data.X), np.column_stack([expected[c] for c in data.columns]),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(data.y)[:, 0], frame["y"].to_numpy())
    assert data.task_names == ("b", "a", "c")

    # each term is a source: column selection by term name
    assert terms.covariates == ("x1", "x2", "colour", "C(k)", "I(t ** 2)", "scale(t)", "x1:x2")
    picked = [data.columns[i] for i in data.columns_for(["colour", "I(t ** 2)"])]
    assert picked == ["intercept", "colour[T.green]", "colour[T.red]", "I(t ** 2)"]
    assert (terms.random_intercept, terms.random_slopes, terms.random_effects) == (True, ("x1",), ("intercept", "x1"))
    assert terms.random_effects_covariance == "full"
    with pytest.raises(ValueError, match="unknown covariate 'I\\(t\\*\\*2\\)'"):
        data.columns_for(["I(t**2)"])  # term names are formulaic's normal form


def test_mixing_formula_adds_its_terms(frame):
    data, terms = TaskData.from_formula(frame, "y ~ x1 + (1 | task)", "~ x1 + colour")

    assert data.columns == ("intercept", "x1", "colour[T.green]", "colour[T.red]")
    assert terms.covariates == ("x1",)
    assert terms.mixing_covariates == ("x1", "colour")
    assert list(data.columns_for(terms.covariates)) == [0, 1]
    assert list(data.columns_for(terms.mixing_covariates)) == [0, 1, 2, 3]
    assert terms.model_kwargs() == {
        "covariates": ("x1",), "mixing_covariates": ("x1", "colour"), "random_slopes": (),
        "random_intercept": True, "random_effects_covariance": "full", "component_random_effects": True,
    }
    # intercept-only mixing
    _, only = TaskData.from_formula(frame, "y ~ x1 + (1 | task)", "~ 1")
    assert only.mixing_covariates == ()


def test_trials_offset_and_text_response(frame):
    frame = frame.assign(n=frame["k"] + 1, s=frame["k"] // 2, log_n=np.log(frame["k"]),
                         answer=np.where(frame["y"] > 0, "yes", "no"))
    data, _ = TaskData.from_formula(frame, "s ~ t + (1 | task)", trials="n", offset="log_n")
    np.testing.assert_array_equal(np.asarray(data.trials), frame["n"].to_numpy())
    np.testing.assert_array_equal(np.asarray(data.offset), frame["log_n"].to_numpy())

    data, _ = TaskData.from_formula(frame, "answer ~ t + (1 | task)", positive="yes")
    np.testing.assert_array_equal(np.asarray(data.y)[:, 0], (frame["y"] > 0).to_numpy().astype(float))


@pytest.mark.parametrize(
    ("formula", "intercept", "slopes", "covariance"),
    [
        ("y ~ t + (1 | task)", True, (), "full"),
        ("y ~ t + (1 + t | task)", True, ("t",), "full"),
        ("y ~ t + (t | task)", True, ("t",), "full"),  # the intercept is implied, as in lme4
        ("y ~ t + (0 + t | task)", False, ("t",), "full"),
        ("y ~ t + (t - 1 | task)", False, ("t",), "full"),
        ("y ~ t + (1 + t || task)", True, ("t",), "diagonal"),
        ("y ~ t + (1 | task) + (0 + t | task)", True, ("t",), "diagonal"),
        ("y ~ (1 + t | task) + t", True, ("t",), "full"),
        ("y ~ x*t + (1 + x:t | task)", True, ("x:t",), "full"),
        ("y ~ t:x + (1 + x:t | task)", True, ("t:x",), "full"),  # spelled as in the fixed part
        ("y ~ t + I(t**2) + (0 + I(t ** 2) + t | task)", False, ("I(t ** 2)", "t"), "full"),
    ],
)
def test_parse_random_effect_syntax(formula, intercept, slopes, covariance):
    parsed = parse_mixed_formula(formula)

    assert parsed.response == ("y",)
    assert parsed.group == "task"
    assert parsed.intercept
    assert parsed.random_intercept is intercept
    assert parsed.random_slopes == slopes
    assert parsed.random_effects_covariance == covariance


def test_parse_fixed_part_and_names():
    parsed = parse_mixed_formula("`my y` ~ 0 + x*z + (0 + x | `my task`)")
    assert parsed.response == ("my y",)
    assert parsed.group == "my task"
    assert not parsed.intercept
    assert parsed.fixed == "0 + x*z"
    assert parsed.fixed_terms == ("x", "z", "x:z")

    parsed = parse_mixed_formula("y1 + y2 ~ x - 1")
    assert (parsed.response, parsed.group, parsed.intercept) == (("y1", "y2"), None, False)
    assert (parsed.random_intercept, parsed.random_slopes) == (False, ())


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("t + (1 | task)", "one '~'"),
        ("y ~ t ~ x", "one '~'"),
        (" ~ t + (1 | task)", "no response"),
        ("log(y) ~ t", "a response must be one column name"),
        ("y ~ t + (1 | task) + (1 | school)", "different groups \\['school', 'task'\\]"),
        ("y ~ x + (1 + t | task)", "random effect 't' .* not a fixed term: .*add 't' to the fixed part"),
        ("y ~ 0 + t + (1 | task)", "random intercept but the fixed part has no intercept"),
        ("y ~ t + (1 | task/school)", "grouping factor .* must be one column name, got 'task/school'"),
        ("y ~ t + (1 | task:school)", "must be one column name"),
        ("y ~ t + ( | task)", "both sides of the bar"),
        ("y ~ t + (1 | )", "both sides of the bar"),
        ("y ~ t + (0 | task)", "has no effect"),
        ("y ~ t + (1 ||| task)", "malformed random-effect term"),
        ("y ~ t + (1 | t | task)", "malformed random-effect term"),
        ("y ~ t | task", "malformed random-effect term"),
        ("y ~ t + (1 | task):t", "malformed random-effect term"),
        ("y ~ t - (1 | task)", "is subtracted"),
        ("y ~ t + (1 + t | task", "unbalanced"),
        ("y ~ t + )", "unbalanced"),
        ("y ~ t + + (1 | task)", "cannot parse the fixed part"),
        ("y ~ t + x + (1 + t | task) + (0 + x | task)", "block-diagonal covariance"),
        ("y ~ t + (1 + t | task) + (0 + t | task)", "\\['t'\\] appear in more than one"),
    ],
)
def test_parse_errors(formula, message):
    with pytest.raises(FormulaError, match=message):
        parse_mixed_formula(formula)


@pytest.mark.parametrize(
    ("formula", "mixing", "error", "message"),
    [
        ("y ~ x9 + (1 | task)", None, DataError, "unknown column 'x9'"),
        ("y ~ center(x9) + (1 | task)", None, DataError, "unknown column 'x9'"),
        ("y ~ foo(t) + (1 | task)", None, DataError, "unknown column 'foo'"),
        ("y ~ t + (1 | school)", None, DataError, "unknown column 'school'"),
        ("z ~ t + (1 | task)", None, DataError, "unknown column 'z'"),
        ("y ~ t + C(task) + (1 | task)", None, DataError, "\\['task'\\] are used in the formula's terms and as"),
        ("y ~ t", None, FormulaError, "no random-effect term"),
        ("y ~ t + (1 | task)", "y ~ x1", FormulaError, "must be one-sided"),
        ("y ~ t + (1 | task)", "~ x1 + (1 | task)", FormulaError, "cannot have random-effect terms"),
        ("y ~ t + (1 | task)", "~ 0 + x1", FormulaError, "the fixed part has intercept but the mixing formula"),
        ("y ~ t + (1 | task)", "~ x1 + nope", DataError, "unknown column 'nope'"),
        ("y ~ x1:colour + (1 | task)", "~ x1", FormulaError, "term 'x1:colour' of the fixed part is coded as"),
        ("y ~ t + I(t * 2) + (1 | task)", None, DataError, "'I\\(t \\* 2\\)' are linear combinations"),
    ],
)
def test_encoding_errors(frame, formula, mixing, error, message):
    with pytest.raises(error, match=message):
        TaskData.from_formula(frame, formula, mixing)


def test_missing_value_names_row_and_task(frame):
    frame.loc[103, "x2"] = np.nan
    with pytest.raises(DataError, match="column 'x2' has a missing value at row 103 \\(task 'a'\\)"):
        TaskData.from_formula(frame, "y ~ x1 + center(x2) + (1 | task)")
    frame.loc[103, "x2"] = 1.0
    with np.errstate(divide="ignore"), pytest.raises(DataError, match="design column 'np.log\\(t\\)' is -inf at "
                                                                       "row 100 \\(task 'b'\\)"):
        TaskData.from_formula(frame, "y ~ np.log(t) + (1 | task)")  # t = 0 in row 100


def test_task_argument_without_bar_terms(frame):
    data, terms = TaskData.from_formula(frame, "y ~ t", task="task")
    assert data.task_names == ("b", "a", "c")
    assert (terms.random_effects, terms.model_kwargs()["component_random_effects"]) == ((), False)
    with pytest.raises(FormulaError, match="task='school' disagrees with the formula's grouping factor 'task'"):
        TaskData.from_formula(frame, "y ~ t + (1 | task)", task="school")


def json_round_trip(schema: Schema) -> Schema:
    """The schema as a saved fit stores it: to_dict, JSON text, from_dict."""
    return Schema.from_dict(json.loads(json.dumps(schema.to_dict(), allow_nan=False)))


def test_json_round_trip_reencodes_new_rows_identically(frame):
    rng = np.random.default_rng(5)
    twice = frame.assign(x1=rng.normal(size=len(frame)), x2=rng.normal(size=len(frame)), t=frame["t"] + 7)
    frame = pd.concat([frame, twice], ignore_index=True).assign(x3=rng.normal(size=2 * len(frame)),
                                                          x4=rng.normal(size=2 * len(frame)))
    # state kinds: levels, means and sds, poly's integer-keyed dicts, bs's knot list, cr's array
    formula = ("y ~ x1 + colour + C(k) + scale(t) + poly(x2, degree=2) + bs(x3, df=3) "
               "+ cr(x4, df=4, constraints='center') + (1 + scale(t) | task)")
    data, terms = TaskData.from_formula(frame, formula, "~ x1 + colour")
    loaded = json_round_trip(data.schema)

    assert isinstance(loaded, FormulaSchema)
    assert loaded == data.schema and hash(loaded) == hash(data.schema)
    assert loaded.terms == terms
    assert loaded.groups == data.schema.groups

    # the training rows re-encode to the same design
    again = loaded.transform(frame, task_names=data.task_names)
    np.testing.assert_array_equal(np.asarray(again.X), np.asarray(data.X))

    # new rows: no "green" colour, no k = 3, t far outside the training range
    new = pd.DataFrame({"task": ["a", "z", "b"], "x1": [0.3, -0.2, 1.1], "x2": [0.1, 0.0, -0.4],
                        "x3": [0.2, -0.5, 0.9], "x4": [0.0, 0.4, -0.7], "t": [20.0, -3.0, 1.0], "colour": ["red", "blue", "red"],
                        "k": [2, 10, 10]})
    original = data.schema.transform(new, require_response=False)
    restored = loaded.transform(new, require_response=False)
    np.testing.assert_array_equal(np.asarray(restored.X), np.asarray(original.X))
    assert restored.columns == data.columns
    assert np.isnan(np.asarray(restored.y)).all()

    # by hand: the dummies of absent levels are kept (zeros), scale() uses the training mean and sd
    t = frame["t"].to_numpy()
    by_name = dict(zip(restored.columns, np.asarray(restored.X).T))
    np.testing.assert_array_equal(by_name["colour[T.green]"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(by_name["colour[T.red]"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(by_name["C(k)[T.3]"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(by_name["C(k)[T.10]"], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(by_name["scale(t)"], (new["t"].to_numpy() - t.mean()) / t.std(ddof=1), rtol=1e-12)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("colour", "purple", "column 'colour' has level 'purple' at row 1 \\(task 'a'\\) that was not seen"),
        ("k", 7, "column 'k' has level 7 at row 1 \\(task 'a'\\) that was not seen .*\\[2, 3, 10\\]"),
    ],
)
def test_unseen_level_is_an_error_after_round_trip(frame, column, value, message):
    data, _ = TaskData.from_formula(frame, "y ~ x1 + colour + C(k) + (1 | task)")
    loaded = json_round_trip(data.schema)
    new = frame.iloc[:2].reset_index(drop=True)
    new.loc[1, column] = value
    with pytest.raises(DataError, match=message):
        loaded.transform(new, require_response=False)


def test_fit_through_public_api_matches_hand_encoded_data():
    rng = np.random.default_rng(1)
    num_tasks, rows = 6, 6
    t = np.tile(np.linspace(-1.0, 1.0, rows), num_tasks)
    region = rng.choice(["north", "south"], size=t.size)
    frame = pd.DataFrame({
        "task": np.repeat([f"T{i}" for i in range(num_tasks)], rows),
        "t": t,
        "region": region,
        "y": 1 + 2 * t + 0.5 * (region == "south") + np.repeat(rng.normal(0, 0.5, num_tasks), rows)
        + rng.normal(0, 0.3, t.size),
    })
    data, terms = TaskData.from_formula(frame, "y ~ t + region + (1 + t || task)")
    model = MixtureGLMM(num_components=1, **terms.model_kwargs())
    result = fit(model, data, method="em", n_init=1, max_iter=100)

    # the same design encoded by hand through the column interface
    hand = TaskData.from_dataframe(frame, task="task", response="y", covariates=["t", "region"], standardize=False)
    np.testing.assert_array_equal(np.asarray(hand.X), np.asarray(data.X))
    reference = fit(model, hand, method="em", n_init=1, max_iter=100)
    assert result.loglik == pytest.approx(reference.loglik, rel=1e-10)
    assert result.converged

    names = list(result.summary().index)
    assert {"w[1, region[T.south]]", "phi[1, intercept]", "phi[1, t]"} <= set(names)
    assert not any(name.startswith("phi[1, intercept, t]") for name in names)  # diagonal
    assert list(result.random_effects()["component"].columns) == ["B1[intercept]", "B1[t]"]

    # saved and loaded through JSON, the fit encodes new rows with the stored formula state
    loaded = Fit.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False)))
    assert isinstance(loaded.schema, FormulaSchema)
    new = frame.iloc[[0, 7, 20]].drop(columns="y")
    np.testing.assert_allclose(loaded.predict(new), reference.predict(new), rtol=1e-8)
