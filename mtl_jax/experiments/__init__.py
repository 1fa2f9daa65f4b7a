"""Paper experiments by name.

::

    from mtl_jax.experiments import run_experiment
    results = run_experiment({"experiment": "simulation_study", "replicates": 2})

Every experiment is a function ``(config: dict, *, progress: bool) -> dict`` returning a
JSON-serialisable dict; ``config["experiment"]`` picks it from :data:`EXPERIMENTS`, which
receives the whole config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mtl_jax.experiments.table2 import run_simulation_study


def _run_school_study(config: dict, *, progress: bool = True) -> dict:
    """The school-effectiveness study (Table 3); its module is imported on first use."""
    from mtl_jax.experiments.school import run_school_study

    return run_school_study(config, progress=progress)


EXPERIMENTS: dict[str, Callable[..., dict]] = {
    "simulation_study": run_simulation_study,
    "school_study": _run_school_study,
}


def run_experiment(config: dict, *, progress: bool = True, out_dir: str | Path | None = None) -> dict:
    """Run the experiment named by ``config["experiment"]`` and return its results.

    Args:
        config: ``{"experiment": name, **settings}``, passed whole to the experiment.
        progress: let the experiment print progress and its result table.
        out_dir: when given and the results carry a printed ``"table"``, the table is
            also saved as ``<out_dir>/<experiment>.txt`` (writing the JSON is the caller's job).

    Returns:
        The experiment's JSON-serialisable results.

    Raises:
        ValueError: when ``config`` names no experiment or an unknown one.
    """
    name = config.get("experiment")
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    results = EXPERIMENTS[name](config, progress=progress)
    if out_dir is not None and isinstance(results.get("table"), str):
        Path(out_dir, f"{name}.txt").write_text(results["table"] + "\n")
    return results
