"""Resumable studies: a journal of finished units of work, with a progress bar.

A study's outer loop runs each *unit* of its work (a replicate, a split, a grid cell, a
``(g, model)`` batch: whatever the study finishes at once) through :meth:`Checkpoint.unit`::

    checkpoint.start(total=len(cells), description="cortisol trials")
    for cell in cells:
        record = checkpoint.unit(f"cell={cell}", lambda: run_cell(cell))

With a journal file (``mtl-jax run CONFIG`` uses ``<out-dir>/<config stem>.jsonl``, beside
the results), every finished unit is appended as one JSON line, flushed and ``fsync``-ed
before the study goes on, so a killed run (even ``SIGKILL``) loses at most the unit in
flight. Rerunning the same config reads the journal, returns the recorded result of each
finished unit *without calling its* ``compute`` and computes only the others.

Journal format (JSON lines)::

    {"mtl_jax_journal": 1, "experiment": name, "config_hash": sha256, "config": {...}}
    {"unit": key, "seconds": s, "result": {...}}
    ...

* The header's ``config_hash`` is the SHA-256 of the config as canonical JSON (sorted
  keys). A journal of another config is refused with a :class:`ValueError` (its units may
  be invalid); ``resume=False`` (``mtl-jax run --fresh``) discards it and starts over.
* A last line cut short (the process killed while writing it: no final newline, or not
  valid JSON) is ignored and cut off before the next append. Any other malformed line is
  an error.
* Results are stored exactly: floats as their ``repr`` (NaN and infinities as Python's
  ``NaN``/``Infinity`` tokens), arrays as nested lists, tuples as lists and dict keys as
  strings (:func:`mtl_jax.infer.results.to_jsonable` with ``keep_nonfinite``).

**Same results, resumed or not.** :meth:`Checkpoint.unit` returns a fresh result after the
same JSON round trip that a recorded one has been through, so the code after a unit sees
identical values whether the unit ran now or in an earlier, interrupted run, and the
final results equal those of an uninterrupted run (timings apart: a resumed unit keeps
the seconds measured when it ran). A study whose later steps need arrays converts the
unit's lists back (``np.asarray``). Without a journal (``path=None``: the Python API's
default) nothing is written, and results are the same.

**Progress.** :meth:`Checkpoint.start` opens a ``tqdm`` bar over the study's units on
stderr (units already in the journal count as done; the ETA comes from the units run
now), when ``progress`` is on and stderr is a terminal. :meth:`Checkpoint.write` prints a
progress line without breaking the bar.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtl_jax.infer.results import to_jsonable

__all__ = ["JOURNAL_VERSION", "Checkpoint", "config_hash", "journal_path", "show_bars"]

JOURNAL_VERSION = 1
"""Version of the journal format, in every header."""


def journal_path(results_path: str | Path) -> Path:
    """The journal beside a results file: ``results/x.json`` -> ``results/x.jsonl``."""
    return Path(results_path).with_suffix(".jsonl")


def config_hash(config: dict) -> str:
    """SHA-256 (hex) of ``config`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(to_jsonable(config, keep_nonfinite=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def show_bars(progress: bool) -> bool:
    """Whether progress bars are drawn: ``progress`` is on and stderr is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(progress and isatty is not None and isatty())


class Checkpoint:
    """Finished units of one study run, read from and appended to a JSON-lines journal.

    Args:
        path: the journal file, or ``None`` to keep nothing (every unit is computed).
        config: the study's config; its hash is checked against the journal's header.
        resume: read an existing journal and skip its units (default); ``False`` deletes
            it and starts over.
        progress: draw a progress bar (when stderr is a terminal) and print progress lines.

    Raises:
        ValueError: the journal was written for another config or experiment, or a line
            other than the last is malformed.
    """

    def __init__(self, path: str | Path | None = None, config: dict | None = None, *, resume: bool = True,
                 progress: bool = False):
        self.path = None if path is None else Path(path)
        self.resume = resume
        self.config = dict(config or {})
        self.hash = config_hash(self.config)
        self.progress = progress
        self.done: dict[str, Any] = {}
        self.computed = 0
        self._seen: set[str] = set()
        self._bar = None
        self._valid_bytes = 0  # length of the journal's complete lines
        if self.path is not None:
            if not resume and self.path.exists():
                self.path.unlink()
            self._read()

    # ----------------------------------------------------------------- journal
    def _read(self) -> None:
        """Load the finished units of an existing journal; check its header."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: text after the last newline (torn write)
        records, offset = [], 0
        for number, line in enumerate(complete, start=1):
            try:
                records.append(json.loads(line))
            except ValueError:
                if number == len(complete) and not tail:  # the last line, torn inside
                    break
                raise ValueError(f"{self.path} line {number} is not valid JSON; the journal is damaged "
                                 "(delete it or rerun with --fresh)") from None
            offset += len(line) + 1
        self._valid_bytes = offset
        if not records:
            return
        header = records[0]
        if header.get("mtl_jax_journal") != JOURNAL_VERSION:
            raise ValueError(f"{self.path} is not an mtl_jax study journal (version {JOURNAL_VERSION}); "
                             "delete it or rerun with --fresh")
        if header.get("config_hash") != self.hash:
            old, new = header.get("config", {}), to_jsonable(self.config, keep_nonfinite=True)
            changed = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
            raise ValueError(f"{self.path} holds finished units of another config (changed: {changed or 'values'}); "
                             "they may not be valid for this one. Rerun with --fresh to discard them, restore "
                             "the config, or choose another --out-dir")
        for number, record in enumerate(records[1:], start=2):
            if not isinstance(record, dict) or "unit" not in record or "result" not in record:
                raise ValueError(f"{self.path} line {number} is not a unit record; delete the journal or rerun "
                                 "with --fresh")
            self.done[str(record["unit"])] = record["result"]

    def _append(self, key: str, seconds: float, result: Any) -> str:
        """Append one unit (and the header, to a new journal), flushed and fsync-ed; return its JSON line."""
        line = json.dumps({"unit": key, "seconds": seconds, "result": to_jsonable(result, keep_nonfinite=True)},
                          separators=(",", ":"))
        if self.path is None:
            return line
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "r+b" if self.path.exists() else "wb") as handle:
            handle.truncate(self._valid_bytes)  # drop a torn last line
            handle.seek(self._valid_bytes)
            text = ""
            if self._valid_bytes == 0:
                text = json.dumps({"mtl_jax_journal": JOURNAL_VERSION, "experiment": self.config.get("experiment"),
                                   "config_hash": self.hash,
                                   "config": to_jsonable(self.config, keep_nonfinite=True)}) + "\n"
            text += line + "\n"
            handle.write(text.encode())
            handle.flush()
            os.fsync(handle.fileno())
            self._valid_bytes += len(text.encode())
        return line

    # ----------------------------------------------------------------- units
    def unit(self, key: str, compute: Callable[[], Any]) -> Any:
        """The result of unit ``key``: from the journal if it finished before, else ``compute()``, recorded.

        Args:
            key: the unit's name, unique within the study (e.g. ``"g=2/mtl"``).
            compute: computes the unit's result (a JSON-serialisable tree of dicts, lists,
                numbers, strings and arrays); not called for a finished unit.

        Returns:
            The result after a JSON round trip (module docstring), the same either way.

        Raises:
            ValueError: when ``key`` was already used in this run (a study's bug).
        """
        key = str(key)
        if key in self._seen:
            raise ValueError(f"unit {key!r} appears twice in one study; unit names must be unique")
        self._seen.add(key)
        if key in self.done:
            return self.done[key]
        started = time.perf_counter()
        result = compute()
        line = self._append(key, time.perf_counter() - started, result)
        self.computed += 1
        self.tick()
        return json.loads(line)["result"]

    # ----------------------------------------------------------------- progress
    def start(self, total: int, description: str, *, done: int | None = None) -> None:
        """Open the progress bar over ``total`` units and say how many are resumed.

        ``done``: how many of them finished before (default: the units in the journal; a
        study that keeps its own record of finished units, as ``cv_grid`` its CSV file,
        gives its count and calls :meth:`tick` per unit).
        """
        resumed = min(len(self.done) if done is None else done, total)
        if resumed and self.progress:
            self.write(f"resuming{f' from {self.path}' if done is None else ''}: {resumed} of {total} units done")
        if show_bars(self.progress):
            from tqdm.auto import tqdm

            self.close()
            self._bar = tqdm(total=total, initial=resumed, desc=description, unit="unit", file=sys.stderr,
                             dynamic_ncols=True)

    def tick(self) -> None:
        """Advance the progress bar by one unit finished outside the journal."""
        if self._bar is not None:
            self._bar.update(1)

    def write(self, message: str) -> None:
        """Print a progress line on stdout (above the bar, if one is drawn)."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """Close the progress bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
