r"""Flat storage of multitask sequence data (each task a "document" of sequences).

A :class:`SequenceData` holds every sequence of every task in one padded matrix with a
task id per row, so per-task sums are ``jax.ops.segment_sum`` over rows and memory is
``O(S * L_max)``, never ``O(K * S_max * L_max)``.

Shapes (``S`` rows after deduplication and bucketing, ``L`` the bucketed maximum length):

* ``tokens [S, L]`` int32 symbol ids into ``alphabet`` (discrete data), or
  ``values [S, L]`` float (real-valued data); positions ``>= lengths[s]`` hold 0 and are
  masked by ``lengths``, never by a sentinel value.
* ``lengths [S]`` int32, ``task [S]`` int32 task ids, ``counts [S]`` float multiplicities.
* ``source_row [N]`` int32: the stored row of each of the ``N`` input sequences, in input
  order (for :meth:`SequenceData.from_frame`, the frame's rows), so per-row answers map
  back to the input with ``answers[source_row]``.

Encoding rules:

* Identical sequences of the same task are stored once with their multiplicity in
  ``counts`` (``deduplicate=True``, the default); rows keep the order of first appearance.
* Bucketing, so that fits of different data sizes reuse compiled code: ``L`` is the
  maximum length rounded up to a power of two, and ``S`` is the number of
  distinct sequences rounded up to a multiple of ``max(8, 2**(b - 4))`` where ``b`` is its
  bit length (at most 1/8 padding, about eight row buckets per doubling). Padding rows
  have ``lengths == 0``, ``counts == 0`` and task 0, so any count-weighted sum ignores them.
* ``tokens="numbers"`` reads each string as whitespace-separated real numbers: real-valued
  sequences (``values``, no alphabet), as :meth:`SequenceData.from_long` makes them.
* The alphabet is the sorted set of training symbols unless given (a tuple, or a file of
  one symbol per line, see :func:`read_alphabet`). Tasks are numbered in order of first
  appearance unless ``task_names`` are given; then listed tasks keep their ids and tasks
  not listed (unseen in training) are appended after them, ids ``>= len(task_names)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float, Int

from mtl_jax.data.tabular import DataError, _floats, _label, _labels, _require_columns, _where

Tokenizer = Literal["chars", "whitespace", "numbers"]


def bucket_length(n: int) -> int:
    """The padded length of sequences of maximum length ``n``: the next power of two.

    Single-token rows (plain LDA's word counts) stay at length 1.
    """
    return 1 << max(0, n - 1).bit_length()


def bucket_rows(n: int) -> int:
    """The padded number of rows for ``n`` sequences.

    ``n`` rounded up to a multiple of ``max(8, 2**(b - 4))``, ``b = n.bit_length()``:
    e.g. 5 -> 8, 100 -> 104, 1000 -> 1024.
    """
    step = max(8, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def read_alphabet(path: str | Path) -> tuple[str, ...]:
    """Reads an alphabet file: one symbol per line, in id order.

    Only the line break is stripped, so a symbol may be a space; empty lines are skipped.

    Raises:
        DataError: If the file lists no symbol or a symbol twice.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    symbols = tuple(line.rstrip("\r") for line in lines if line.rstrip("\r"))
    return _checked_alphabet(symbols, f"alphabet file {str(path)!r}")


def write_alphabet(path: str | Path, alphabet: Sequence[str]) -> None:
    """Writes an alphabet as one symbol per line (the inverse of :func:`read_alphabet`)."""
    Path(path).write_text("".join(f"{symbol}\n" for symbol in alphabet), encoding="utf-8")


class SequenceData(eqx.Module):
    """Encoded multitask sequences; a pytree whose leaves are the arrays.

    Attributes:
        tokens: Symbol ids, int32 ``[S, L]`` (discrete data), else None.
        values: Observations, float ``[S, L]`` (real-valued data), else None.
        lengths: Length of each row, int32 ``[S]`` (0 for padding rows).
        task: Task id of each row, int32 ``[S]``.
        counts: Multiplicity of each row, float ``[S]`` (0 for padding rows).
        task_names: Label of each task id, length K (static).
        alphabet: Symbol of each token id (static); None for real-valued data.
        source_row: Stored row of each input sequence, int32 ``[N]`` in input order
            (duplicates share a row); None once dropped (a model's design drops it, so
            compiled code depends on the bucketed shapes only).
    """

    tokens: Int[Array, "S L"] | None
    values: Float[Array, "S L"] | None
    lengths: Int[Array, " S"]
    task: Int[Array, " S"]
    counts: Float[Array, " S"]
    task_names: tuple[str, ...] = eqx.field(static=True)
    alphabet: tuple[str, ...] | None = eqx.field(static=True)
    source_row: Int[Array, " N"] | None = None

    @property
    def num_tasks(self) -> int:
        """K, the number of task names."""
        return len(self.task_names)

    @classmethod
    def from_lists(
        cls,
        sequences: Mapping[Any, Iterable[str | Sequence[Any]]],
        *,
        tokens: Tokenizer = "chars",
        alphabet: Sequence[str] | str | Path | None = None,
        task_names: Sequence[Any] | None = None,
        deduplicate: bool = True,
        allow_empty_tasks: bool = False,
    ) -> SequenceData:
        """Encodes ``{task: [sequence, ...]}``; a sequence is a string or a list of symbols.

        Strings are split by ``tokens`` (``"chars"``: one symbol per character,
        ``"whitespace"``: whitespace-separated symbols, ``"numbers"``: whitespace-separated
        real numbers); list items become ``str`` symbols (numbers with ``"numbers"``).
        Errors name a sequence as ``"sequence j of task 'A'"``. Other arguments are those
        of :meth:`from_frame`.
        """
        records = [
            (_label(name), _symbols(sequence, tokens), f"sequence {j} of task {_label(name)!r}")
            for name, task_sequences in sequences.items()
            for j, sequence in enumerate(task_sequences)
        ]
        return _encode_split(records, tokens, alphabet, task_names, deduplicate, allow_empty_tasks)

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        *,
        task: str,
        sequence: str,
        tokens: Tokenizer = "chars",
        alphabet: Sequence[str] | str | Path | None = None,
        task_names: Sequence[Any] | None = None,
        deduplicate: bool = True,
        allow_empty_tasks: bool = False,
    ) -> SequenceData:
        """Encodes a frame with one sequence (a string) per row.

        Args:
            frame: The data.
            task: Column of task labels.
            sequence: Column of sequences, split into symbols by ``tokens``.
            tokens: ``"chars"`` (one symbol per character), ``"whitespace"``, or
                ``"numbers"`` (whitespace-separated real numbers: real-valued data).
            alphabet: The symbols in id order (a sequence, or the path of a file read by
                :func:`read_alphabet`); None infers the sorted set of symbols present.
            task_names: Known tasks in id order (the training tasks); tasks of ``frame``
                not listed get the next ids in order of first appearance.
            deduplicate: Store identical (task, sequence) pairs once, with counts.
            allow_empty_tasks: Whether a listed task may have no sequence (new data).

        Returns:
            The encoded data.

        Raises:
            DataError: Naming the column, row, task or symbol, for a missing column or
                value, an empty sequence, a symbol outside a given alphabet, a number that
                does not parse or is not finite, or (unless ``allow_empty_tasks``) a
                listed task without sequences.
        """
        _require_columns(frame, (task, sequence))
        if len(frame) == 0:
            raise DataError("the data frame has no rows")
        task_labels = _labels(frame, task, None)
        missing = frame[sequence].isna().to_numpy()
        if missing.any():
            position = int(np.argmax(missing))
            raise DataError(
                f"column {sequence!r} has a missing value at "
                f"{_where(frame, position, task_labels)}"
            )
        records = [
            (label, _symbols(_label(raw), tokens), _where(frame, position, task_labels))
            for position, (label, raw) in enumerate(zip(task_labels, frame[sequence]))
        ]
        return _encode_split(records, tokens, alphabet, task_names, deduplicate, allow_empty_tasks)

    @classmethod
    def from_csv(
        cls, path: str | Path, *, task: str, sequence: str, **options: Any
    ) -> SequenceData:
        """Reads a CSV file (sequences kept as strings) and encodes it with :meth:`from_frame`."""
        frame = pd.read_csv(
            path, dtype={task: str, sequence: str}, keep_default_na=False, na_values=[""]
        )
        return cls.from_frame(frame, task=task, sequence=sequence, **options)

    @classmethod
    def from_long(
        cls,
        frame: pd.DataFrame,
        *,
        task: str,
        sequence_id: str,
        position: str,
        value: str,
        task_names: Sequence[Any] | None = None,
        deduplicate: bool = True,
        allow_empty_tasks: bool = False,
    ) -> SequenceData:
        """Encodes real-valued sequences from long format: one observation per row.

        A sequence is the rows sharing ``(task, sequence_id)``, ordered by ``position``.

        Raises:
            DataError: For a missing column, a missing task, sequence id or position, a
                non-finite or non-numeric value, a repeated position within a sequence, or
                (unless ``allow_empty_tasks``) a listed task without sequences; naming the
                row and task.
        """
        _require_columns(frame, (task, sequence_id, position, value))
        if len(frame) == 0:
            raise DataError("the data frame has no rows")
        task_labels = _labels(frame, task, None)
        ids = _labels(frame, sequence_id, task_labels)
        order_key = frame[position]
        if order_key.isna().any():
            row = int(np.argmax(order_key.isna().to_numpy()))
            raise DataError(
                f"column {position!r} has a missing value at {_where(frame, row, task_labels)}"
            )
        observations = _floats(frame, value, task_labels, "value")
        keyed = pd.DataFrame(
            {
                "task": task_labels,
                "id": ids,
                "pos": order_key.to_numpy(),
                "row": np.arange(len(frame)),
            }
        )
        repeated = keyed.duplicated(["task", "id", "pos"]).to_numpy()
        if repeated.any():
            row = int(np.argmax(repeated))
            raise DataError(
                f"position {_label(keyed['pos'].iloc[row])!r} of sequence {ids[row]!r} is "
                f"repeated at {_where(frame, row, task_labels)}"
            )
        keyed = keyed.sort_values(["pos"], kind="stable")
        groups = sorted(keyed.groupby(["task", "id"], sort=False), key=lambda g: g[1]["row"].min())
        records = [
            (label, observations[group["row"].to_numpy()], f"sequence {seq!r} of task {label!r}")
            for (label, seq), group in groups
        ]
        return _encode(records, None, task_names, deduplicate, allow_empty_tasks, np.float64)


def _checked_alphabet(symbols: Sequence[str], source: str) -> tuple[str, ...]:
    """An alphabet as a tuple of strings, rejecting an empty or repeated one."""
    symbols = tuple(str(symbol) for symbol in symbols)
    if not symbols:
        raise DataError(f"{source} lists no symbols")
    repeated = sorted({symbol for symbol in symbols if symbols.count(symbol) > 1})
    if repeated:
        raise DataError(f"{source} repeats symbol(s) {repeated}")
    return symbols


def _symbols(sequence: str | Sequence[Any], tokens: Tokenizer) -> list[str]:
    """The symbols of one sequence: a string split by ``tokens``, or a list's items."""
    if not isinstance(sequence, str):
        return [_label(symbol) for symbol in sequence]
    if tokens == "chars":
        return list(sequence)
    if tokens in ("whitespace", "numbers"):
        return sequence.split()
    raise ValueError(f"tokens must be 'chars', 'whitespace' or 'numbers', not {tokens!r}")


def _encode_split(
    records: list[tuple[str, list[str], str]],
    tokens: Tokenizer,
    alphabet: Sequence[str] | str | Path | None,
    task_names: Sequence[Any] | None,
    deduplicate: bool,
    allow_empty_tasks: bool,
) -> SequenceData:
    """Encodes split sequences: symbols against an alphabet, or real numbers (``tokens="numbers"``)."""
    if tokens != "numbers":
        return _encode_discrete(records, alphabet, task_names, deduplicate, allow_empty_tasks)
    if alphabet is not None:
        raise DataError("an alphabet was given, but tokens='numbers' reads real-valued sequences")
    encoded = []
    for label, items, where in records:
        if not items:
            raise DataError(f"empty sequence at {where}")
        values = pd.to_numeric(pd.Series(items, dtype=object), errors="coerce").to_numpy(float)
        bad = ~np.isfinite(values)
        if bad.any():
            j = int(np.argmax(bad))
            raise DataError(f"{items[j]!r} at position {j} of the sequence at {where} is not a finite number")
        encoded.append((label, values, where))
    return _encode(encoded, None, task_names, deduplicate, allow_empty_tasks, np.float64)


def _encode_discrete(
    records: list[tuple[str, list[str], str]],
    alphabet: Sequence[str] | str | Path | None,
    task_names: Sequence[Any] | None,
    deduplicate: bool,
    allow_empty_tasks: bool,
) -> SequenceData:
    """Maps symbols to ids against the (given or inferred) alphabet, then encodes."""
    for label, symbols, where in records:
        if not symbols:
            raise DataError(f"empty sequence at {where}")
    if alphabet is None:
        alphabet = tuple(sorted({symbol for _, symbols, _ in records for symbol in symbols}))
    elif isinstance(alphabet, (str, Path)):
        alphabet = read_alphabet(alphabet)
    else:
        alphabet = _checked_alphabet(alphabet, "the alphabet")
    index = {symbol: i for i, symbol in enumerate(alphabet)}
    encoded = []
    for label, symbols, where in records:
        ids = [index.get(symbol, -1) for symbol in symbols]
        if -1 in ids:
            j = ids.index(-1)
            raise DataError(
                f"symbol {symbols[j]!r} at position {j} of the sequence at {where} is not in "
                f"the alphabet of {len(alphabet)} symbols {list(alphabet)[:20]}"
            )
        encoded.append((label, np.asarray(ids, dtype=np.int32), where))
    return _encode(encoded, alphabet, task_names, deduplicate, allow_empty_tasks, np.int32)


def _encode(
    records: list[tuple[str, np.ndarray, str]],
    alphabet: tuple[str, ...] | None,
    task_names: Sequence[Any] | None,
    deduplicate: bool,
    allow_empty_tasks: bool,
    dtype: type,
) -> SequenceData:
    """Numbers tasks, deduplicates and pads encoded sequences into a :class:`SequenceData`.

    Args:
        records: ``(task label, sequence [length], description)`` per sequence.
        alphabet: Symbols of the token ids, or None for real-valued sequences.
        task_names: Known task labels in id order, or None.
        deduplicate: Merge identical (task, sequence) pairs into one row with a count.
        allow_empty_tasks: Whether a listed task may have no sequence.
        dtype: ``np.int32`` (tokens) or ``np.float64`` (values, cast to JAX's float).
    """
    names = [] if task_names is None else [_label(name) for name in task_names]
    if len(set(names)) != len(names):
        raise DataError(f"task_names contains duplicates: {names}")
    ids = {name: k for k, name in enumerate(names)}
    for label, _, _ in records:
        ids.setdefault(label, len(ids))
    if task_names is not None and not allow_empty_tasks:
        present = {label for label, _, _ in records}
        empty = [name for name in names if name not in present]
        if empty:
            raise DataError(f"task(s) {empty} listed in task_names have no sequences")

    if not records:
        raise DataError("there are no sequences")
    rows: dict[Any, int] = {}
    sequences, task, counts, source_row = [], [], [], []
    for label, sequence, _ in records:
        key = (label, sequence.tobytes()) if deduplicate else len(sequences)
        if key in rows:
            counts[rows[key]] += 1.0
            source_row.append(rows[key])
            continue
        rows[key] = len(sequences)
        source_row.append(rows[key])
        sequences.append(sequence)
        task.append(ids[label])
        counts.append(1.0)

    num_rows = bucket_rows(len(sequences))
    length = bucket_length(max(len(sequence) for sequence in sequences))
    padded = np.zeros((num_rows, length), dtype=dtype)
    lengths = np.zeros(num_rows, dtype=np.int32)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
        lengths[row] = len(sequence)
    pad = num_rows - len(sequences)
    array = jnp.asarray(padded)
    return SequenceData(
        tokens=array if alphabet is not None else None,
        values=array if alphabet is None else None,
        lengths=jnp.asarray(lengths),
        task=jnp.asarray(np.asarray(task + [0] * pad, dtype=np.int32)),
        counts=jnp.asarray(np.asarray(counts + [0.0] * pad)),
        task_names=tuple(ids),
        alphabet=alphabet,
        source_row=jnp.asarray(np.asarray(source_row, dtype=np.int32)),
    )
