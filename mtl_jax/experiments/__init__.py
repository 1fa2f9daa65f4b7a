"""Paper experiments by name.

::

    from mtl_jax.experiments import run_experiment
    results = run_experiment({"experiment": "simulation_study", "replicates": 2})

Every experiment is a function ``(config: dict, *, progress: bool, checkpoint) -> dict``
returning a JSON-serialisable dict; ``config["experiment"]`` picks it from
:data:`EXPERIMENTS`, which receives the whole config. Its outer loop runs each unit of work
through ``checkpoint`` (:class:`~mtl_jax.experiments.checkpoint.Checkpoint`), which
records finished units in a journal so that a killed study resumes where it stopped
(``run_experiment(..., journal=path)``, as ``mtl-jax run`` does), and draws the progress bar. An experiment with a figure also has a function
``(results: dict, path: Path) -> Path`` in :data:`PLOTS`, which :func:`write_plot` calls
to draw it next to the JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.experiments.table2 import run_simulation_study
from mtl_jax.infer.results import to_jsonable


def _run_school_study(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """The school-effectiveness study (Table 3); its module is imported on first use."""
    from mtl_jax.experiments.school import run_school_study

    return run_school_study(config, progress=progress, checkpoint=checkpoint)


def _run_sequence_study(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """The Sequential LDA synthetic study; its module is imported on first use."""
    from mtl_jax.experiments.sequence_study import run_sequence_study

    return run_sequence_study(config, progress=progress, checkpoint=checkpoint)


def _run_bic_selection(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """How often BIC picks each number of components (simulation design); imported on first use."""
    from mtl_jax.experiments.bic_selection import run_bic_selection

    return run_bic_selection(config, progress=progress, checkpoint=checkpoint)


def _run_cortisol_study(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Clustering of synthetic cortisol trajectories (Figure 2); its module is imported on first use."""
    from mtl_jax.experiments.cortisol import run_cortisol_study

    return run_cortisol_study(config, progress=progress, checkpoint=checkpoint)


def _run_glmm_recovery(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Bias of a two-component mixture GLMM per family; its module is imported on first use."""
    from mtl_jax.experiments.glmm_recovery import run_glmm_recovery

    return run_glmm_recovery(config, progress=progress, checkpoint=checkpoint)


def _run_personal_study(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Personalised MTL on landmine, computer survey, SARCOS or EMA data; imported on first use."""
    from mtl_jax.experiments.personal import run_personal_study

    return run_personal_study(config, progress=progress, checkpoint=checkpoint)


def _run_cv_grid(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """K-fold CV within tasks over a hyperparameter grid, selection, refit and test; imported on first use."""
    from mtl_jax.experiments.cv_grid import run_cv_grid

    return run_cv_grid(config, progress=progress, checkpoint=checkpoint)


def _run_cluster_recovery(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Synthetic tasks in known clusters: recovery (ARI) and test AUC against per-task and pooled models."""
    from mtl_jax.experiments.cluster_recovery import run_cluster_recovery

    return run_cluster_recovery(config, progress=progress, checkpoint=checkpoint)


def _plot_personal_study(results: dict, path: Path) -> Path:
    """The landmine curve (AUC against training size), or the test metric per model."""
    from mtl_jax.experiments.personal import plot_results

    return plot_results(results, path)


def _plot_cortisol_study(results: dict, path: Path) -> Path:
    """Figure 2 of the cortisol study (trajectories by assigned cluster, fitted cluster means)."""
    from mtl_jax.experiments.cortisol import plot_results

    return plot_results(results, path)


def _plot_sequence_study(results: dict, path: Path) -> Path:
    """The figure of the Sequential LDA synthetic study (both metrics against the number of tasks)."""
    from mtl_jax.experiments.sequence_study import plot_results

    return plot_results(results, path)


EXPERIMENTS: dict[str, Callable[..., dict]] = {
    "simulation_study": run_simulation_study,
    "school_study": _run_school_study,
    "sequence_study": _run_sequence_study,
    "bic_selection": _run_bic_selection,
    "cortisol_study": _run_cortisol_study,
    "glmm_recovery": _run_glmm_recovery,
    "personal_study": _run_personal_study,
    "cv_grid": _run_cv_grid,
    "cluster_recovery": _run_cluster_recovery,
}

SHARDED_EXPERIMENTS = frozenset({"simulation_study", "sequence_study", "glmm_recovery"})
"""Experiments whose batches of fits split over devices (their ``devices`` setting, ``mtl-jax run --devices``)."""

PLOTS: dict[str, Callable[[dict, Path], Path]] = {
    "sequence_study": _plot_sequence_study,
    "cortisol_study": _plot_cortisol_study,
    "personal_study": _plot_personal_study,
}
"""Figure of each experiment that has one, by experiment name."""


def run_experiment(config: dict, *, progress: bool = True, journal: str | Path | None = None,
                   resume: bool = True) -> dict:
    """Run the experiment named by ``config["experiment"]`` and return its results.

    Args:
        config: ``{"experiment": name, **settings}``, passed whole to the experiment.
        progress: let the experiment print progress and its result table, and draw a
            progress bar over its units on stderr (when stderr is a terminal).
        journal: JSON-lines file of finished units (:mod:`~mtl_jax.experiments.checkpoint`):
            units recorded there by an earlier run of the same config are not run again,
            and every unit finished now is appended. ``None``: no journal.
        resume: use the units already in ``journal`` (default); ``False`` discards them.

    Returns:
        The experiment's JSON-serialisable results (the same with or without a journal,
        timings apart).

    Raises:
        ValueError: when ``config`` names no experiment or an unknown one, sets ``devices``
            for an experiment not in :data:`SHARDED_EXPERIMENTS`, or ``journal`` holds the
            units of another config (``devices`` apart: it changes where units run, not what
            they compute).
    """
    name = config.get("experiment")
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    if config.get("devices") is not None and name not in SHARDED_EXPERIMENTS:
        raise ValueError(f"experiment {name!r} runs on one device: devices (--devices) applies to "
                         f"{', '.join(sorted(SHARDED_EXPERIMENTS))}")
    settings = {key: value for key, value in config.items() if key != "devices"}
    checkpoint = Checkpoint(journal, settings, resume=resume, progress=progress)
    try:
        return EXPERIMENTS[name](config, progress=progress, checkpoint=checkpoint)
    finally:
        checkpoint.close()


def write_results(results: dict, path: str | Path) -> Path:
    """Write experiment or benchmark results as indented JSON and say where.

    NumPy scalars and arrays left in ``results`` are written as JSON numbers and lists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(results), indent=2))
    print(f"results written to {path}")
    return path


def write_plot(name: str, results: dict, json_path: str | Path) -> Path | None:
    """Draw experiment ``name``'s figure as a PNG beside its JSON file and say where.

    Returns:
        The PNG's path (``json_path`` with suffix ``.png``), or None for an experiment
        without a figure (not in :data:`PLOTS`).
    """
    if name not in PLOTS:
        return None
    path = PLOTS[name](results, Path(json_path).with_suffix(".png"))
    print(f"figure written to {path}")
    return path
