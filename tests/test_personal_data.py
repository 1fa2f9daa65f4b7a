"""Per-person data: tasks from users or labels, normalisation from training rows only,
missing features and labels, modalities, text labels, pickles only on opt-in."""

import pickle

import numpy as np
import pandas as pd
import pytest

from mtl_jax.data import DataError
from mtl_jax.data.personal import PersonData, encode, modality_blocks, read_task_dict_pickle


def frame():
    return pd.DataFrame({
        "user_id": ["a", "a", "a", "b", "b", "b"],
        "timestamp": pd.date_range("2026-01-01", periods=6).astype(str),
        "split": ["train", "train", "test", "train", "train", "validation"],
        "phys_hr": [60.0, 70.0, 1000.0, 80.0, np.nan, 90.0],
        "phys_eda": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "survey_sleep": [7.0, 8.0, 6.0, 5.0, 4.0, 3.0],
        "mood_Label": [1.0, 0.0, 1.0, np.nan, 1.0, 0.0],
        "stress_Label": [0.5, 1.5, 2.0, 3.0, np.nan, 1.0],
    })


def test_users_as_tasks_global_normalisation_uses_training_rows_only():
    data = PersonData.from_dataframe(frame(), person="user_id", labels="mood_Label", timestamp="timestamp",
                                     split="split")
    assert data.task_names == ("a", "b") and data.num_labels == 1
    train_hr = np.array([60.0, 70.0, 80.0])  # the test row's 1000 and the validation row are not used
    X = np.asarray(data.X)
    np.testing.assert_allclose(X[[0, 1, 3], 0], (train_hr - train_hr.mean()) / train_hr.std())
    assert data.columns == ("phys_hr", "phys_eda", "survey_sleep", "phys_hr_missing")
    # the missing training value is filled with the training mean (0 after normalising) and flagged
    assert X[4, 0] == 0.0 and X[4, 3] == 1.0 and X[0, 3] == 0.0
    np.testing.assert_array_equal(np.asarray(data.split), [0, 0, 2, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(data.weight), [1, 1, 1, 0, 1, 1])  # a missing label is masked
    assert bool(data.task_binary.all())


def test_indicator_columns_are_a_modality_of_their_own():
    """Indicators come after every feature (``phys_hr_missing`` would reopen ``phys``): one block ``missing``."""
    data = PersonData.from_dataframe(frame(), person="user_id", labels="mood_Label", timestamp="timestamp",
                                     split="split")
    assert data.schema.modalities == (("phys", 0, 2), ("survey", 2, 3), ("missing", 3, 4))


def test_per_person_normalisation():
    data = PersonData.from_dataframe(frame(), person="user_id", labels="mood_Label", timestamp="timestamp",
                                     split="split", normalise="person")
    eda = np.asarray(data.X)[:, 1]
    np.testing.assert_allclose(eda[[0, 1]], [-1.0, 1.0])  # a's training eda: 1, 2
    np.testing.assert_allclose(eda[2], (3.0 - 1.5) / 0.5)
    np.testing.assert_allclose(eda[[3, 4]], [-1.0, 1.0])  # b's training eda: 4, 5
    new = frame().iloc[:1].assign(user_id="stranger")
    encoded = encode(new, data.schema, data.task_names)
    glob = np.array([1.0, 2.0, 4.0, 5.0])
    np.testing.assert_allclose(np.asarray(encoded.X)[0, 1], (1.0 - glob.mean()) / glob.std())
    assert encoded.task_names == ("a", "b", "stranger") and int(encoded.task[0]) == 2


def test_labels_as_tasks_is_long_with_masks():
    data = PersonData.from_dataframe(frame(), person="user_id", labels=None, tasks="labels", timestamp="timestamp",
                                     split="split")
    assert data.task_names == ("mood_Label", "stress_Label") and data.num_labels == 2
    assert data.X.shape[0] == 12
    np.testing.assert_array_equal(np.asarray(data.task), [0, 1] * 6)
    np.testing.assert_array_equal(np.asarray(data.weight), [1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(data.task_binary), [True, False])  # mixed losses across tasks


def test_missing_feature_error_names_column_row_and_person():
    with pytest.raises(DataError, match=r"'phys_hr' is missing at row 4 \(task 'b'\)"):
        PersonData.from_dataframe(frame(), person="user_id", labels="mood_Label", timestamp="timestamp",
                                  split="split", missing="error")


def test_non_contiguous_modality_is_an_error():
    with pytest.raises(DataError, match="modality 'phys' is not contiguous: column 'phys_eda'"):
        modality_blocks(["phys_hr", "survey_sleep", "phys_eda"])
    with pytest.raises(DataError, match="not contiguous"):
        PersonData.from_dataframe(frame(), person="user_id", labels="mood_Label",
                                  features=["phys_hr", "survey_sleep", "phys_eda"])


def test_label_not_binary_and_text_labels():
    bad = frame().assign(mood_Label=["x", "y", "z", "x", "y", "z"])
    with pytest.raises(DataError, match="3 text levels"):
        PersonData.from_dataframe(bad, person="user_id", labels="mood_Label", timestamp="timestamp", split="split")
    text = frame().assign(mood_Label=["hi", "lo", "hi", None, "lo", "hi"])
    with pytest.raises(DataError, match="say which one is 1"):
        PersonData.from_dataframe(text, person="user_id", labels="mood_Label", timestamp="timestamp", split="split")
    data = PersonData.from_dataframe(text, person="user_id", labels="mood_Label", timestamp="timestamp",
                                     split="split", positive="hi")
    np.testing.assert_array_equal(np.asarray(data.y), [1, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(data.weight), [1, 1, 1, 0, 1, 1])
    new = frame().assign(mood_Label=[0.0, 1.0, 2.0, 0.0, 1.0, 0.0])
    binary = PersonData.from_dataframe(frame(), person="user_id", labels="mood_Label", timestamp="timestamp",
                                       split="split")
    with pytest.raises(DataError, match=r"binary in training but has 2.0 at row 2 \(task 'a'\)"):
        encode(new, binary.schema, binary.task_names)


def test_bad_split_value_names_row():
    with pytest.raises(DataError, match=r"split column 'split' has 'holdout' at row 1"):
        PersonData.from_dataframe(frame().assign(split=["train", "holdout"] * 3), person="user_id",
                                  labels="mood_Label", timestamp="timestamp", split="split")


def test_task_dict_pickle_needs_opt_in(tmp_path):
    tasks = [{"Name": "u1", "X": np.arange(6.0).reshape(2, 3), "Y": np.array([0, 1]), "ModalityDict": {"phys": 0,
                                                                                                          "loc": 2}},
             {"Name": "u2", "X": np.ones((1, 3)), "Y": np.array([1]), "ModalityDict": {"phys": 0, "loc": 2}}]
    path = tmp_path / "tasks.p"
    path.write_bytes(pickle.dumps(tasks))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        read_task_dict_pickle(path)
    read = read_task_dict_pickle(path, allow_pickle=True)
    assert list(read.columns) == ["task", "phys_0", "phys_1", "loc_2", "Y"]
    np.testing.assert_array_equal(read["Y"], [0, 1, 1])
    data = PersonData.from_dataframe(read, person="task", labels="Y", normalise="none")
    assert data.schema.modalities == (("phys", 0, 2), ("loc", 2, 3))
    np.testing.assert_array_equal(np.asarray(data.X), read[["phys_0", "phys_1", "loc_2"]].to_numpy())
