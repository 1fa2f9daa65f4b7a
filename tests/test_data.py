"""Tests for mtl_jax.data: encoding, validation, splits and the ILEA loader."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from support import set_cell

from mtl_jax.data import (
    DATA_DIR_ENV,
    STUDENT_COVARIATES,
    DataError,
    Schema,
    TaskData,
    data_dir,
    ilea_task_data,
    load_ilea,
    train_test_split_by_task,
)


@pytest.fixture
def frame() -> pd.DataFrame:
    """Eight rows, three tasks, one continuous and three categorical covariates."""
    return pd.DataFrame(
        {
            "school": ["b", "a", "b", "a", "c", "c", "b", "a"],
            "x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            "colour": ["red", "blue", "green", "blue", "red", "green", "blue", "red"],
            "level": [10, 2, 3, 2, 10, 10, 2, 2],
            "flag": [True, False, False, True, True, False, False, False],
            "score": [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0],
        },
        index=[10, 11, 12, 13, 14, 15, 16, 17],
    )


def encode(frame: pd.DataFrame, **kwargs) -> TaskData:
    """Encodes the fixture frame with its default roles, overridable by kwargs.

    ``level`` is declared categorical whenever it is a covariate.
    """
    roles = dict(task="school", response="score", covariates=["x", "colour", "level", "flag"])
    roles |= kwargs
    roles.setdefault("categorical", ["level"] if "level" in roles["covariates"] else [])
    return TaskData.from_dataframe(frame, **roles)


def test_encoding_matches_hand_computed_design(frame):
    data = encode(frame)

    z = (frame["x"].to_numpy() - 4.5) / np.sqrt(5.25)  # mean 4.5, population variance 5.25
    green = [0, 0, 1, 0, 0, 1, 0, 0]
    red = [1, 0, 0, 0, 1, 0, 0, 1]
    level3 = [0, 0, 1, 0, 0, 0, 0, 0]
    level10 = [1, 0, 0, 0, 1, 1, 0, 0]  # numeric sort: 2 < 3 < 10, reference 2
    flag = [1, 0, 0, 1, 1, 0, 0, 0]
    expected = np.column_stack([np.ones(8), z, green, red, level3, level10, flag])

    assert data.columns == (
        "intercept", "x", "colour[green]", "colour[red]", "level[3]", "level[10]", "flag[True]"
    )
    np.testing.assert_allclose(data.X, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.y, frame[["score"]].to_numpy())  # never standardised
    assert data.task_names == ("b", "a", "c")  # first appearance
    np.testing.assert_array_equal(data.task, [0, 1, 0, 1, 2, 2, 0, 1])
    assert data.X.dtype == jnp.zeros(()).dtype  # JAX default float
    assert data.task.dtype == jnp.int32
    assert (data.num_obs, data.num_tasks) == (8, 3)
    np.testing.assert_array_equal(data.task_sizes(), [3, 3, 2])
    assert data.response_names == ("score",)
    assert data.schema.categorical == (
        ("colour", ("blue", "green", "red")),
        ("level", ("2", "3", "10")),
        ("flag", ("False", "True")),
    )
    assert data.schema.standardized == (("x", 4.5, np.sqrt(5.25)),)


def test_raw_continuous_without_intercept_and_given_task_order(frame):
    data = encode(
        frame.assign(x2=frame["x"] ** 2),
        covariates=["x", "colour"],
        standardize=False,
        intercept=False,
        task_names=["c", "b", "a"],
        response=["score", "x2"],
    )
    assert data.columns == ("x", "colour[green]", "colour[red]")
    np.testing.assert_array_equal(data.X[:, 0], frame["x"])
    assert data.y.shape == (8, 2)
    assert data.task_names == ("c", "b", "a")
    np.testing.assert_array_equal(data.task, [1, 2, 1, 2, 0, 0, 1, 2])
    assert data.schema.standardized == ()


def test_columns_for(frame):
    data = encode(frame)
    np.testing.assert_array_equal(data.columns_for(["colour"]), [0, 2, 3])
    np.testing.assert_array_equal(data.columns_for(["flag", "x"]), [0, 1, 6])
    np.testing.assert_array_equal(data.columns_for([]), [0])
    np.testing.assert_array_equal(data.columns_for(None), np.arange(7))
    no_intercept = encode(frame, intercept=False)
    np.testing.assert_array_equal(no_intercept.columns_for(["level"]), [3, 4])
    with pytest.raises(ValueError, match=r"'nope'.*known covariates.*'colour'"):
        data.columns_for(["colour", "nope"])


def test_schema_round_trip_and_transform(frame):
    data = encode(frame)
    restored = Schema.from_dict(json.loads(json.dumps(data.schema.to_dict())))
    assert restored == data.schema
    assert hash(restored) == hash(data.schema)

    again = restored.transform(frame)
    for name in ("X", "y", "task"):
        np.testing.assert_array_equal(getattr(again, name), getattr(data, name))
    assert again.task_names == data.task_names

    # New data: stored mean/sd and levels are reused, new tasks are numbered afresh.
    new = frame.iloc[[5, 1]].assign(school=["z", "b"])
    encoded = data.schema.transform(new)
    np.testing.assert_allclose(encoded.X, data.X[np.array([5, 1])])
    assert encoded.task_names == ("z", "b")
    np.testing.assert_array_equal(encoded.task, [0, 1])

    # Aligned with the training task ids; listed tasks may be absent.
    aligned = data.schema.transform(frame.iloc[[4, 1]], task_names=data.task_names)
    np.testing.assert_array_equal(aligned.task, [2, 1])
    assert aligned.task_names == data.task_names

    # Prediction inputs without the response.
    inputs = data.schema.transform(frame.drop(columns="score"), require_response=False)
    assert inputs.y.shape == (8, 1) and bool(jnp.isnan(inputs.y).all())
    np.testing.assert_array_equal(inputs.X, data.X)


def test_transform_rejects_unseen_level_and_unlisted_task(frame):
    schema = encode(frame).schema
    with pytest.raises(DataError, match=r"'colour' has level 'purple' at row 13 \(task 'a'\)"):
        schema.transform(frame.iloc[[3, 2]].assign(colour=["purple", "red"]))
    with pytest.raises(DataError, match=r"task 'c' at row 14 is not in task_names"):
        schema.transform(frame, task_names=["a", "b"])


def test_subset_and_jit(frame):
    data = encode(frame)
    part = data.subset(np.array([6, 0]))
    np.testing.assert_array_equal(part.task, [0, 0])
    assert part.task_names == data.task_names and part.schema == data.schema
    np.testing.assert_array_equal(part.task_sizes(), [2, 0, 0])

    total = jax.jit(lambda d: d.X.sum() + d.y.sum())(data)
    np.testing.assert_allclose(total, data.X.sum() + data.y.sum(), rtol=1e-6)


def test_from_csv(frame, tmp_path):
    path = tmp_path / "frame.csv"
    frame.to_csv(path, index=False)
    from_file = TaskData.from_csv(
        path, task="school", response="score", covariates=["x", "colour"]
    )
    np.testing.assert_allclose(
        from_file.X, encode(frame, covariates=["x", "colour"]).X
    )


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (None, {"covariates": ["x", "nope"]}, r"unknown column 'nope'; available columns"),
        (None, {"task": "district"}, r"unknown column 'district'"),
        (None, {"response": "marks"}, r"unknown column 'marks'"),
        (("x", 12, np.nan), {}, r"covariate column 'x' has a non-finite value \(nan\) "
         r"at row 12 \(task 'b'\)"),
        (("score", 15, np.inf), {}, r"response column 'score' has a non-finite value \(inf\) "
         r"at row 15 \(task 'c'\)"),
        (("colour", 16, None), {}, r"column 'colour' has a missing value at row 16 "
         r"\(task 'b'\)"),
        (None, {"response": "colour", "covariates": ["x"]},
         r"response 'colour' is not numeric"),
        (None, {"task_names": ["a", "b", "c", "d"]}, r"task\(s\) \['d'\] .* have no rows"),
        (None, {"task_names": ["a", "b"]}, r"task 'c' at row 14 is not in task_names"),
        (None, {"covariates": ["x", "x"]}, r"'x'\] used more than once"),
        (None, {"categorical": ["score"]}, r"'score'\] are not among the covariates"),
    ],
)
def test_data_errors(frame, change, kwargs, message):
    if change is not None:
        frame = set_cell(frame, *change)
    with pytest.raises(DataError, match=message):
        encode(frame, **kwargs)


def test_constant_covariates_are_rejected(frame):
    with pytest.raises(DataError, match=r"covariate 'k' is constant"):
        encode(frame.assign(k=2.0), covariates=["x", "k"])
    with pytest.raises(DataError, match=r"covariate 'g' is constant \(single level 'u'\)"):
        encode(frame.assign(g="u"), covariates=["x", "g"])


def test_collinear_covariates_are_named(frame):
    with pytest.raises(DataError, match=r"column\(s\) 'z' are linear combinations"):
        encode(frame.assign(z=2 * frame["x"] + 1), covariates=["x", "colour", "z"])
    with pytest.raises(DataError, match=r"'hue\[green\]', 'hue\[red\]' are linear"):
        encode(frame.assign(hue=frame["colour"]), covariates=["colour", "x", "hue"])


def test_empty_frame_is_rejected(frame):
    with pytest.raises(DataError, match="no rows"):
        encode(frame.iloc[:0])


def split_frame() -> pd.DataFrame:
    """Tasks of sizes 1, 2, 5 and 10 with a row-identifying covariate."""
    sizes = {"one": 1, "two": 2, "five": 5, "ten": 10}
    tasks = np.repeat(list(sizes), list(sizes.values()))
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {"task": tasks, "row": np.arange(len(tasks)), "y": rng.normal(size=len(tasks))}
    )


def test_split_by_task():
    data = TaskData.from_dataframe(
        split_frame(), task="task", response="y", covariates=["row"], standardize=False
    )
    train, test = train_test_split_by_task(data, test_fraction=0.3, seed=1)

    train_rows = np.asarray(train.X[:, 1]).astype(int)
    test_rows = np.asarray(test.X[:, 1]).astype(int)
    assert set(train_rows).isdisjoint(test_rows)
    np.testing.assert_array_equal(np.sort(np.concatenate([train_rows, test_rows])), np.arange(18))
    # round(0.3 * n) with at least one training row: 1 -> 0, 2 -> 1, 5 -> 2 (1.5 to even), 10 -> 3
    np.testing.assert_array_equal(test.task_sizes(), [0, 1, 2, 3])
    np.testing.assert_array_equal(train.task_sizes(), [1, 1, 3, 7])
    assert train.task_names == test.task_names == data.task_names
    assert train.schema == test.schema == data.schema
    np.testing.assert_array_equal(data.task[test_rows], test.task)

    _, same = train_test_split_by_task(data, test_fraction=0.3, seed=1)
    np.testing.assert_array_equal(same.X, test.X)
    draws = {
        tuple(np.asarray(train_test_split_by_task(data, test_fraction=0.3, seed=s)[1].X[:, 1]))
        for s in range(5)
    }
    assert len(draws) > 1


def test_split_rejects_bad_fraction(frame):
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split_by_task(encode(frame), test_fraction=1.5, seed=0)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path.resolve()

    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        data_dir()

    monkeypatch.delenv(DATA_DIR_ENV)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert data_dir() == (tmp_path / "shared" / "data").resolve()


@pytest.fixture(scope="module")
def ilea() -> pd.DataFrame:
    return load_ilea()


@pytest.mark.parametrize(("covariates", "width"), [("student", 16), ("all", 21)])
def test_ilea_task_data(ilea, covariates, width):
    data = ilea_task_data(ilea, covariates)
    assert data.X.shape == (15_362, width)
    assert data.num_tasks == 139
    assert np.linalg.matrix_rank(np.asarray(data.X, dtype=np.float64)) == width
    np.testing.assert_array_equal(data.y[:, 0], ilea["exam_score"])  # raw response
    assert data.columns_for(STUDENT_COVARIATES).tolist() == list(range(16))
    # vr_band code 0 (15 pupils) is coded like the reference band 1.
    vr = np.asarray(data.X)[:, data.columns_for(["vr_band"])[1:]]
    undocumented = (ilea["vr_band"] == 0).to_numpy()  # also checks the input is unmodified
    assert undocumented.sum() == 15 and not vr[undocumented].any()


def test_ilea_school_level_columns(ilea):
    data = ilea_task_data(ilea, "all")
    assert data.columns[16:] == (
        "fsm_pct", "vr1_pct", "single_sex[1]", "school_denom[2]", "school_denom[3]"
    )
    single_sex = np.asarray(data.X[:, 18]).astype(bool)
    np.testing.assert_array_equal(single_sex, ilea["school_gender"].isin([2, 3]))
    np.testing.assert_allclose(np.asarray(data.X[:, 16:18]).mean(axis=0), 0.0, atol=1e-5)
