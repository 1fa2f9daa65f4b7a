r"""How often BIC finds the true number of components on the paper's simulation design.

For each true ``g`` (default 1, 2 and 3), ``R`` replicates of the Table 1 design
(:func:`mtl_jax.experiments.simulation.simulate_study`: ``K`` tasks of ``n_per_task``
training rows, ``x = (1, four N(0, 1))``, Table 1's ``v`` and ``w``, ``sigma_h^2 = 0.5``,
``lambda_h = phi_h = 1``; ``g = 1`` is the first component alone, a linear mixed model)
are drawn, and the multitask mixture GLMM is fitted by EM with ``g' = 1 .. G_max``
components to each replicate's training rows through :func:`mtl_jax.select_components`,
which picks

.. math::

    \hat g = \arg\min_{g'} \; -2\,\ell(\hat\theta_{g'}) + k_{g'} \log n .

The result counts, per true ``g``, how often each ``g'`` is picked. Replicates of one true
``g`` share their shapes, so every ``g'`` is compiled once and each later fit only runs.
"""

from __future__ import annotations

import time
import warnings

import jax
import pandas as pd

from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.experiments.common import cast_floats, resolve_dtype, unstack_tree
from mtl_jax.experiments.table2 import simulate_replicates
from mtl_jax.infer.fit import FitWarning
from mtl_jax.infer.selection import select_components
from mtl_jax.models.mixture_glmm import MixtureGLMM

__all__ = ["DEFAULT_CONFIG", "format_table", "run_bic_selection"]

#: Settings of the study; any of them can be overridden in the config.
DEFAULT_CONFIG = {
    "experiment": "bic_selection",
    "true_components": [1, 2, 3],
    "max_components": 4,
    "replicates": 10,
    "num_tasks": 10,
    "n_per_task": 1000,
    "n_init": 4,
    "max_iter": 500,
    "tol": 1e-8,
    "seed": 0,
    "dtype": None,
}


def run_bic_selection(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Run the BIC selection study.

    Args:
        config: overrides of :data:`DEFAULT_CONFIG`: ``true_components`` (the ``g`` that
            generate data, each in 1..8), ``max_components`` (``G_max``: every replicate
            is fitted with ``g' = 1 .. G_max``), ``replicates`` (``R`` per true ``g``),
            ``num_tasks`` (``K``), ``n_per_task``, EM settings ``n_init``, ``max_iter``,
            ``tol``, ``seed`` (data from ``fold_in(key(seed), g)``, replicate ``r``'s
            restarts from seed ``seed + r``) and ``dtype``.
        progress: print one line per replicate and the final table.
        checkpoint: journal of finished units (:mod:`~mtl_jax.experiments.checkpoint`;
            default none); a unit is one replicate of one true ``g`` (its ``G_max`` fits).

    Returns:
        A JSON-serialisable dict: the resolved ``config``, the ``dtype`` used,
        ``results[str(g)]`` with ``chosen`` (the picked ``g'`` per replicate),
        ``counts`` (``{str(g'): how many replicates picked it}``), ``correct_fraction``,
        ``not_converged`` (fits that did not converge, over all replicates and ``g'``),
        ``seconds`` (the replicates' fits, compilation included) and ``selections`` (each replicate's BIC
        table, :meth:`mtl_jax.Selection.to_dict`); the total ``seconds`` and the printed
        ``table``.

    Raises:
        ValueError: on an unknown config key, a true ``g`` outside 1..8 or a bad ``dtype``.
    """
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown bic_selection settings {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    dtype = resolve_dtype(config["dtype"])
    candidates = range(1, int(config["max_components"]) + 1)
    num_replicates = int(config["replicates"])
    em_options = dict(n_init=int(config["n_init"]), max_iter=int(config["max_iter"]), tol=float(config["tol"]))
    root = jax.random.key(int(config["seed"]))
    started = time.perf_counter()
    checkpoint = checkpoint or Checkpoint()
    checkpoint.start(len(config["true_components"]) * num_replicates, "BIC selection replicates")

    def select(true_g: int, r: int, design) -> dict:
        """One unit: BIC over ``g' = 1 .. G_max`` on one replicate."""
        replicate_started = time.perf_counter()
        with warnings.catch_warnings():  # counted in the tables, not printed per fit
            warnings.simplefilter("ignore", FitWarning)
            selection = select_components(MixtureGLMM(num_components=1), design, candidates, "em",
                                          seed=int(config["seed"]) + r, **em_options)
        seconds = time.perf_counter() - replicate_started
        if progress:
            checkpoint.write(f"true g={true_g} replicate {r + 1}/{num_replicates}: BIC picks "
                             f"g={selection.best_components} ({seconds:.1f} s)")
        return {"chosen": selection.best_components, "selection": selection.to_dict(),
                "not_converged": int((~selection.table["converged"]).sum()), "seconds": seconds}

    results = {}
    for true_g in map(int, config["true_components"]):
        studies = simulate_replicates(jax.random.split(jax.random.fold_in(root, true_g), num_replicates), true_g,
                                      int(config["num_tasks"]), int(config["n_per_task"]))
        units = [checkpoint.unit(f"g={true_g}/replicate={r}", lambda: select(true_g, r, design))
                 for r, design in enumerate(unstack_tree(cast_floats(studies.train, dtype)))]
        chosen = [unit["chosen"] for unit in units]
        results[str(true_g)] = {
            "chosen": chosen,
            "counts": {str(g): chosen.count(g) for g in candidates},
            "correct_fraction": chosen.count(true_g) / num_replicates,
            "not_converged": sum(unit["not_converged"] for unit in units),
            "seconds": sum(unit["seconds"] for unit in units),
            "selections": [unit["selection"] for unit in units],
        }
    output = {
        "experiment": "bic_selection",
        "config": config,
        "dtype": str(dtype),
        "results": results,
        "seconds": time.perf_counter() - started,
    }
    output["table"] = format_table(output).to_string()
    if progress:
        print(output["table"], flush=True)
    return output


def format_table(output: dict) -> pd.DataFrame:
    """One row per true ``g``: how many replicates BIC sent to each ``g'``, the share it got
    right, the fits that did not converge (of ``R x G_max``) and the seconds per replicate."""
    config = output["config"]
    fits_per_true_g = int(config["replicates"]) * int(config["max_components"])
    rows = {
        int(true_g): {
            **{f"picks g={g}": count for g, count in scores["counts"].items()},
            "correct": f"{scores['correct_fraction']:.0%}",
            "not converged": f"{scores['not_converged']}/{fits_per_true_g}",
            "s/replicate": f"{scores['seconds'] / int(config['replicates']):.1f}",
        }
        for true_g, scores in output["results"].items()
    }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("true g")
