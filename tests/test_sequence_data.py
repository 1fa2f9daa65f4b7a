"""SequenceData: hand-computed encodings, deduplication, buckets, errors, unseen tasks."""

import jax
import numpy as np
import pandas as pd
import pytest

from mtl_jax.data import DataError, SequenceData, read_alphabet, write_alphabet
from mtl_jax.data.sequences import bucket_length, bucket_rows


def test_from_lists_hand_encoding_and_dedup_counts():
    data = SequenceData.from_lists({"A": ["abc", "b", "abc"], "B": ["ca", "abc"]})
    assert data.alphabet == ("a", "b", "c")
    assert data.task_names == ("A", "B")
    assert data.tokens.shape == (8, 4) and data.tokens.dtype == np.int32
    expected = np.zeros((8, 4), dtype=np.int32)
    expected[0, :3] = [0, 1, 2]
    expected[1, :1] = [1]
    expected[2, :2] = [2, 0]
    expected[3, :3] = [0, 1, 2]
    np.testing.assert_array_equal(data.tokens, expected)
    np.testing.assert_array_equal(data.lengths, [3, 1, 2, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(data.task, [0, 0, 1, 1, 0, 0, 0, 0])
    # "abc" twice in A -> one row with count 2; the "abc" of B is another task's row.
    np.testing.assert_array_equal(data.counts, [2, 1, 1, 1, 0, 0, 0, 0])
    assert data.values is None and data.num_tasks == 2


def test_no_deduplication_keeps_every_sequence():
    data = SequenceData.from_lists({"A": ["ab", "ab"]}, deduplicate=False)
    np.testing.assert_array_equal(data.counts[:2], [1, 1])
    np.testing.assert_array_equal(data.lengths[:3], [2, 2, 0])


def test_whitespace_tokens_and_symbol_lists():
    frame = pd.DataFrame({"t": ["u", "v"], "s": ["go  stop go", "stop"]})
    data = SequenceData.from_frame(frame, task="t", sequence="s", tokens="whitespace")
    assert data.alphabet == ("go", "stop")
    np.testing.assert_array_equal(data.tokens[0, :3], [0, 1, 0])
    lists = SequenceData.from_lists({"u": [["go", "stop", "go"]], "v": [["stop"]]})
    np.testing.assert_array_equal(lists.tokens, data.tokens)
    np.testing.assert_array_equal(lists.lengths, data.lengths)


@pytest.mark.parametrize(
    ("n", "rows"), [(1, 8), (8, 8), (9, 16), (100, 104), (129, 144), (1000, 1024), (1025, 1152)]
)
def test_row_buckets(n, rows):
    assert bucket_rows(n) == rows
    assert rows - n < max(8, n / 8 + 1)


@pytest.mark.parametrize(("n", "length"), [(1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (16, 16), (17, 32), (300, 512)])
def test_length_buckets(n, length):
    assert bucket_length(n) == length


def test_sizes_share_a_bucket_and_padding_rows_are_empty():
    small = SequenceData.from_lists({"A": ["ab"] * 1 + ["a" * 9]})
    large = SequenceData.from_lists({"A": [f"{'a' * k}b" for k in range(1, 13)]})
    assert small.tokens.shape == (8, 16) and large.tokens.shape == (16, 16)
    pad = np.asarray(large.lengths) == 0
    assert pad.sum() == 4
    assert np.all(np.asarray(large.counts)[pad] == 0)
    assert np.all(np.asarray(large.tokens)[pad] == 0)
    # A pytree: arrays (source_row included) are leaves; names and alphabet are static.
    leaves = jax.tree_util.tree_leaves(small)
    assert len(leaves) == 5
    np.testing.assert_array_equal(small.source_row, [0, 1])
    repeated = SequenceData.from_lists({"A": ["ab", "b", "ab"], "B": ["ab"]})
    np.testing.assert_array_equal(repeated.source_row, [0, 1, 0, 2])  # input order, duplicates share a row
    same = jax.tree_util.tree_map(lambda x: x, small)
    assert same.alphabet == small.alphabet and same.task_names == small.task_names


def test_given_alphabet_and_unseen_tasks_are_appended():
    train = SequenceData.from_lists({"A": ["ab"], "B": ["ba"]}, alphabet=("b", "a", "c"))
    assert train.alphabet == ("b", "a", "c")
    np.testing.assert_array_equal(train.tokens[0, :2], [1, 0])
    test = SequenceData.from_frame(
        pd.DataFrame({"t": ["Z", "B", "Y", "Z"], "s": ["c", "ab", "a", "cc"]}),
        task="t",
        sequence="s",
        alphabet=train.alphabet,
        task_names=train.task_names,
        allow_empty_tasks=True,
    )
    assert test.task_names == ("A", "B", "Z", "Y")
    np.testing.assert_array_equal(test.task[:4], [2, 1, 3, 2])
    np.testing.assert_array_equal(test.tokens[:4, :2], [[2, 0], [1, 0], [1, 0], [2, 2]])


def test_alphabet_file_round_trip(tmp_path):
    alphabet = ("a", " ", "é", "stop")
    path = tmp_path / "alphabet.txt"
    write_alphabet(path, alphabet)
    assert read_alphabet(path) == alphabet
    data = SequenceData.from_lists({"A": ["a é"]}, alphabet=path)
    np.testing.assert_array_equal(data.tokens[0, :3], [0, 1, 2])
    path.write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"repeats symbol\(s\) \['a'\]"):
        read_alphabet(path)


def test_csv_reader(tmp_path):
    path = tmp_path / "seqs.csv"
    path.write_text("task,seq\n1,0110\n2,10\n1,0110\n", encoding="utf-8")
    data = SequenceData.from_csv(path, task="task", sequence="seq")
    assert data.task_names == ("1", "2") and data.alphabet == ("0", "1")
    np.testing.assert_array_equal(data.tokens[0, :4], [0, 1, 1, 0])
    np.testing.assert_array_equal(data.counts[:2], [2, 1])


def test_error_out_of_alphabet_symbol_names_row_task_and_symbol():
    frame = pd.DataFrame({"t": ["A", "B"], "s": ["ab", "axb"]}, index=[10, 11])
    with pytest.raises(DataError, match=r"symbol 'x' at position 1 .* row 11 \(task 'B'\)"):
        SequenceData.from_frame(frame, task="t", sequence="s", alphabet=("a", "b"))
    with pytest.raises(DataError, match=r"symbol 'z' at position 0 .* sequence 1 of task 'B'"):
        SequenceData.from_lists({"A": ["a"], "B": ["a", "z"]}, alphabet=("a",))


def test_error_empty_sequence_names_row_and_task():
    frame = pd.DataFrame({"t": ["A", "B"], "s": ["ab", "   "]})
    with pytest.raises(DataError, match=r"empty sequence at row 1 \(task 'B'\)"):
        SequenceData.from_frame(frame, task="t", sequence="s", tokens="whitespace")
    with pytest.raises(DataError, match=r"empty sequence at sequence 0 of task 'A'"):
        SequenceData.from_lists({"A": [""]})


def test_error_no_sequences_at_all():
    with pytest.raises(DataError, match="there are no sequences"):
        SequenceData.from_lists({"A": []})


def test_error_listed_task_without_sequences():
    with pytest.raises(DataError, match=r"task\(s\) \['B'\] listed in task_names have no"):
        SequenceData.from_lists({"A": ["a"]}, task_names=("A", "B"))


def test_error_missing_column_and_missing_sequence():
    frame = pd.DataFrame({"t": ["A", "B"], "s": ["ab", None]})
    with pytest.raises(DataError, match=r"unknown column 'seq'"):
        SequenceData.from_frame(frame, task="t", sequence="seq")
    with pytest.raises(DataError, match=r"column 's' has a missing value at row 1 \(task 'B'\)"):
        SequenceData.from_frame(frame, task="t", sequence="s")


def _long_frame():
    return pd.DataFrame(
        {
            "task": ["x", "x", "x", "y", "y", "x"],
            "seq": [7, 7, 8, 7, 7, 7],
            "pos": [2, 0, 0, 1, 0, 1],
            "value": [0.3, 0.1, -1.0, 5.0, 4.0, 0.2],
        }
    )


def test_long_format_orders_by_position():
    data = SequenceData.from_long(_long_frame(), task="task", sequence_id="seq", position="pos",
                                  value="value")
    assert data.tokens is None and data.alphabet is None
    assert data.values.shape == (8, 4) and data.task_names == ("x", "y")
    np.testing.assert_allclose(data.values[0, :3], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(data.values[1, :1], [-1.0])
    np.testing.assert_allclose(data.values[2, :2], [4.0, 5.0])
    np.testing.assert_array_equal(data.lengths[:4], [3, 1, 2, 0])
    np.testing.assert_array_equal(data.task[:3], [0, 0, 1])
    np.testing.assert_array_equal(data.counts[:4], [1, 1, 1, 0])


def test_long_format_errors_name_row_and_task():
    frame = _long_frame()
    frame.loc[3, "value"] = np.nan
    with pytest.raises(DataError, match=r"value column 'value' has a non-finite value .* row 3 \(task 'y'\)"):
        SequenceData.from_long(frame, task="task", sequence_id="seq", position="pos", value="value")
    frame = _long_frame()
    frame.loc[5, "pos"] = 0
    with pytest.raises(DataError, match=r"position .0. of sequence '7' is repeated at row 5 \(task 'x'\)"):
        SequenceData.from_long(frame, task="task", sequence_id="seq", position="pos", value="value")
    with pytest.raises(DataError, match=r"unknown column 'v'"):
        SequenceData.from_long(_long_frame(), task="task", sequence_id="seq", position="pos", value="v")


def test_number_strings_are_real_valued_sequences():
    frame = pd.DataFrame({"task": ["x", "x", "y", "x"], "seq": ["0.1 0.2 0.3", "-1", "4e0  5", "0.1 0.2 0.3"]})
    data = SequenceData.from_frame(frame, task="task", sequence="seq", tokens="numbers")
    assert data.tokens is None and data.alphabet is None and data.task_names == ("x", "y")
    np.testing.assert_allclose(data.values[0, :3], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(data.values[1, :1], [-1.0])
    np.testing.assert_allclose(data.values[2, :2], [4.0, 5.0])
    np.testing.assert_array_equal(data.lengths[:4], [3, 1, 2, 0])
    np.testing.assert_array_equal(data.counts[:4], [2, 1, 1, 0])
    np.testing.assert_array_equal(data.source_row, [0, 1, 2, 0])
    listed = SequenceData.from_lists({"x": ["0.1 0.2 0.3", [-1.0], "0.1 0.2 0.3"], "y": ["4 5"]}, tokens="numbers")
    np.testing.assert_array_equal(listed.values, data.values)


@pytest.mark.parametrize("bad", ["0.1 abc", "0.1 nan", "inf"])
def test_number_strings_errors_name_row_task_and_item(bad):
    frame = pd.DataFrame({"task": ["x", "y"], "seq": ["1 2", bad]})
    item = bad.split()[-1]
    with pytest.raises(DataError, match=rf"'{item}' at position \d of the sequence at row 1 \(task 'y'\) is not a finite number"):
        SequenceData.from_frame(frame, task="task", sequence="seq", tokens="numbers")
    with pytest.raises(DataError, match="alphabet was given"):
        SequenceData.from_frame(frame.iloc[:1], task="task", sequence="seq", tokens="numbers", alphabet=["1", "2"])
