"""Resumable studies (mtl_jax.experiments.checkpoint) through ``mtl-jax run``, as a user runs them.

The study is a tiny ``cluster_recovery`` (numpy simulation, one pooled logistic fit per
replicate: each unit takes milliseconds once compiled). A resumed run must write the same
results file as an uninterrupted one and must not redo the units its journal records.
"""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import mtl_jax.experiments.cluster_recovery as cluster_recovery
from mtl_jax.cli import main
from mtl_jax.experiments.checkpoint import Checkpoint, config_hash

CONFIG = """experiment: cluster_recovery
replicates: {replicates}
tasks: 4
train_rows: 10
test_rows: 10
coef_sd: {coef_sd}
models: {{pooled logistic: {{model: pooled-logistic, C: [1.0]}}}}
"""


def write_config(directory, name="study", replicates=5, coef_sd=2.0):
    path = directory / f"{name}.yaml"
    path.write_text(CONFIG.format(replicates=replicates, coef_sd=coef_sd))
    return path


def journal_units(path) -> list[str]:
    """The unit keys of a journal, in order (the header and a torn last line left out)."""
    units = []
    for line in path.read_text().split("\n")[1:]:
        try:
            units.append(json.loads(line)["unit"])
        except ValueError:
            pass
    return units


class Interrupted(Exception):
    """Stands for the run being stopped (the replicate in flight is lost)."""


@pytest.fixture
def counted(monkeypatch):
    """Counts the replicates actually computed; ``counted.stop_after = k`` interrupts the (k+1)-th."""

    class Counter:
        calls = 0
        stop_after = None

    real = cluster_recovery._replicate

    def replicate(*args, **kwargs):
        if Counter.stop_after is not None and Counter.calls >= Counter.stop_after:
            raise Interrupted
        Counter.calls += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cluster_recovery, "_replicate", replicate)
    return Counter


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """An uninterrupted run of the 5- and the 60-replicate study: ``{replicates: results}``."""
    directory = tmp_path_factory.mktemp("clean")
    results = {}
    for replicates in (5, 60):
        config = write_config(directory, f"study{replicates}", replicates)
        assert main(["run", str(config), "--out-dir", str(directory), "--quiet"]) == 0
        results[replicates] = json.loads((directory / f"study{replicates}.json").read_text())
        assert journal_units(directory / f"study{replicates}.jsonl") == [f"replicate={r}" for r in range(replicates)]
    return results


def test_interrupted_run_resumes_with_the_same_results_and_no_unit_redone(tmp_path, clean, counted, capsys):
    config = write_config(tmp_path)
    counted.stop_after = 2
    with pytest.raises(Interrupted):
        main(["run", str(config), "--out-dir", str(tmp_path)])
    assert journal_units(tmp_path / "study.jsonl") == ["replicate=0", "replicate=1"]
    assert not (tmp_path / "study.json").exists()

    counted.calls, counted.stop_after = 0, None
    capsys.readouterr()
    assert main(["run", str(config), "--out-dir", str(tmp_path)]) == 0
    assert counted.calls == 3  # replicates 2, 3, 4 only
    out = capsys.readouterr().out
    assert "resuming from" in out and "2 of 5 units done" in out
    assert "replicate 1 (" not in out and "replicate 2 (" in out  # progress lines of computed units only
    assert json.loads((tmp_path / "study.json").read_text()) == clean[5]
    assert journal_units(tmp_path / "study.jsonl") == [f"replicate={r}" for r in range(5)]

    counted.calls = 0  # a finished study reruns from its journal alone
    assert main(["run", str(config), "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert counted.calls == 0 and json.loads((tmp_path / "study.json").read_text()) == clean[5]


def test_sigkilled_run_resumes_with_the_same_results(tmp_path, clean, counted, capsys):
    """``mtl-jax run`` in a subprocess, SIGKILLed once a unit is journaled, then rerun (in-process, to count)."""
    config = write_config(tmp_path, replicates=60)
    journal = tmp_path / "study.jsonl"
    command = [sys.executable, "-m", "mtl_jax.cli", "run", str(config), "--out-dir", str(tmp_path)]
    env = {**os.environ, "JAX_ENABLE_X64": "1"}  # the float64 of these tests (conftest)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (journal.exists() and journal.read_text().count("\n") >= 2):  # header and one unit
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no unit finished in 120 s"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    done = journal_units(journal)
    assert 1 <= len(done) < 60, f"the kill came too late to interrupt the study ({len(done)} units done)"

    capsys.readouterr()
    assert main(["run", str(config), "--out-dir", str(tmp_path)]) == 0
    assert counted.calls == 60 - len(done)  # the journal's units were not redone
    assert f"{len(done)} of 60 units done" in capsys.readouterr().out
    assert journal_units(journal) == [f"replicate={r}" for r in range(60)]
    assert json.loads((tmp_path / "study.json").read_text()) == clean[60]


def test_torn_last_line_is_ignored_and_cut_off(tmp_path, clean, counted):
    config = write_config(tmp_path)
    counted.stop_after = 3
    with pytest.raises(Interrupted):
        main(["run", str(config), "--out-dir", str(tmp_path), "--quiet"])
    journal = tmp_path / "study.jsonl"
    lines = journal.read_text().split("\n")
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # unit 2 cut mid-write
    assert journal_units(journal) == ["replicate=0", "replicate=1"]

    counted.calls, counted.stop_after = 0, None
    assert main(["run", str(config), "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert counted.calls == 3
    assert json.loads((tmp_path / "study.json").read_text()) == clean[5]
    text = journal.read_text()
    assert text.endswith("\n") and [json.loads(line)["unit"] for line in text.splitlines()[1:]] == [
        f"replicate={r}" for r in range(5)]


def test_changed_config_is_refused_until_fresh(tmp_path, clean, counted, capsys):
    config = write_config(tmp_path)
    counted.stop_after = 2
    with pytest.raises(Interrupted):
        main(["run", str(config), "--out-dir", str(tmp_path), "--quiet"])
    write_config(tmp_path, coef_sd=3.0)
    counted.calls, counted.stop_after = 0, None
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(config), "--out-dir", str(tmp_path), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "another config (changed: ['coef_sd'])" in err and "--fresh" in err
    assert counted.calls == 0 and len(journal_units(tmp_path / "study.jsonl")) == 2

    assert main(["run", str(config), "--out-dir", str(tmp_path), "--quiet", "--fresh"]) == 0
    assert counted.calls == 5
    header = json.loads((tmp_path / "study.jsonl").read_text().split("\n")[0])
    assert header["config"]["coef_sd"] == 3.0 and header["config_hash"] == config_hash(header["config"])
    fresh = json.loads((tmp_path / "study.json").read_text())
    assert fresh["config"]["coef_sd"] == 3.0 and fresh["replicates"] != clean[5]["replicates"]


# ------------------------------------------------------------------ the Checkpoint itself
def test_results_are_exact_after_the_journal_and_the_same_fresh_or_resumed(tmp_path):
    path = tmp_path / "j.jsonl"
    value = {"x": np.float32(0.1), "a": np.arange(3.0) / 3, "nan": float("nan"), "inf": -math.inf,
             "t": (1, True), 2: "two"}
    fresh = Checkpoint(path, {"experiment": "e"}).unit("u", lambda: value)
    resumed = Checkpoint(path, {"experiment": "e"}).unit("u", lambda: pytest.fail("recomputed"))
    for result in (fresh, resumed):
        assert result["x"] == float(np.float32(0.1)) and result["a"] == (np.arange(3.0) / 3).tolist()
        assert math.isnan(result["nan"]) and result["inf"] == -math.inf
        assert result["t"] == [1, True] and result["2"] == "two"
    assert Checkpoint(None).unit("u", lambda: value)["a"] == fresh["a"]  # no journal: the same round trip


def test_unit_names_must_be_unique_and_a_damaged_journal_is_refused(tmp_path):
    checkpoint = Checkpoint(tmp_path / "j.jsonl", {})
    checkpoint.unit("u", lambda: 1)
    with pytest.raises(ValueError, match="appears twice"):
        checkpoint.unit("u", lambda: 1)
    checkpoint.unit("v", lambda: 2)
    lines = (tmp_path / "j.jsonl").read_text().split("\n")
    (tmp_path / "j.jsonl").write_text("\n".join([lines[0], "{broken", lines[2], ""]))
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        Checkpoint(tmp_path / "j.jsonl", {})
    (tmp_path / "other.jsonl").write_text('{"some": "json"}\n')
    with pytest.raises(ValueError, match="not an mtl_jax study journal"):
        Checkpoint(tmp_path / "other.jsonl", {})


def test_progress_bar_only_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, progress, drawn in ((Terminal(), True, True), (io.StringIO(), True, False),
                                    (Terminal(), False, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        checkpoint = Checkpoint(None, {}, progress=progress)
        checkpoint.start(2, "units")
        checkpoint.unit("a", lambda: 1)
        checkpoint.unit("b", lambda: 2)
        checkpoint.close()
        assert ("units: 100%" in stream.getvalue() and "2/2" in stream.getvalue()) == drawn
