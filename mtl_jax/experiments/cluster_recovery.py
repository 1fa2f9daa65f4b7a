r"""Synthetic tasks in known clusters: does a task-clustering model (``hblr``) find them, and
does sharing within clusters predict better than per-task and pooled models?

Design (per replicate): ``clusters`` true clusters, each a logistic regression with
coefficients drawn :math:`\beta_c \sim \mathcal N(0, \text{coef_sd}^2 I_q)` and intercept 0;
``tasks`` tasks assigned to the clusters in turn (equal sizes); each task has
``train_rows`` training and ``test_rows`` test rows with :math:`x \sim \mathcal N(0, I_q)`
and :math:`y \sim \operatorname{Bernoulli}(\sigma(\beta_{c_m}^T x))`. Every model of the
config (label -> registered model and options, as in :mod:`.personal`) is fitted on the
training rows and scored on the test rows: the task-mean and pooled test AUC
(:func:`mtl_jax.metrics.task_metrics`) and, for a model with per-task class probabilities,
the adjusted Rand index of its most probable clusters against the truth
(:func:`mtl_jax.metrics.adjusted_rand_index`) and the number of clusters it uses. Each
replicate records the smallest distance between two true clusters' coefficients
(``separation``): clusters drawn close together may be merged, rightly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from mtl_jax.data.personal import PersonData
from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.experiments.personal import model_entry
from mtl_jax.infer.fit import fit
from mtl_jax.metrics import adjusted_rand_index, mean_and_standard_error, task_metrics

DEFAULT_CONFIG = {
    "experiment": "cluster_recovery",
    "models": {"hblr": {"method": "vb"}, "per-task logistic": {"model": "logistic"},
               "pooled logistic": {"model": "pooled-logistic"}},
    "clusters": 2,
    "tasks": 12,
    "features": 3,
    "train_rows": 20,
    "test_rows": 50,
    "coef_sd": 2.0,
    "replicates": 10,
    "seed": 0,
}


def simulate(rng: np.random.Generator, clusters: int, tasks: int, features: int, train_rows: int, test_rows: int,
             coef_sd: float) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """One replicate: the rows (``task``, ``x1 ..``, ``y_Label``, ``split``), each task's true
    cluster ``[tasks]`` and the clusters' coefficients ``[clusters, features]``."""
    coefficients = coef_sd * rng.normal(size=(clusters, features))
    truth = np.arange(tasks) % clusters
    rows = train_rows + test_rows
    X = rng.normal(size=(tasks * rows, features))
    task = np.repeat(np.arange(tasks), rows)
    logit = np.einsum("nq,nq->n", X, coefficients[truth[task]])
    frame = pd.DataFrame(X, columns=[f"x{j + 1}" for j in range(features)])
    frame.insert(0, "task", [f"t{k:03d}" for k in task])
    frame["y_Label"] = (rng.uniform(size=len(frame)) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
    frame["split"] = np.tile(np.r_[np.full(train_rows, "train"), np.full(test_rows, "test")], tasks)
    return frame, truth, coefficients


def separation(coefficients: np.ndarray) -> float:
    """The smallest distance between two clusters' coefficient vectors (inf for one cluster)."""
    distances = np.linalg.norm(coefficients[:, None] - coefficients[None], axis=-1)
    return float(np.min(distances[~np.eye(len(coefficients), dtype=bool)], initial=np.inf))


def run_cluster_recovery(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Run the design of the module docstring; returns per replicate its ``separation`` and per
    model (``models``) the test AUCs (and ARI, clusters used), and a printed table of their
    means (standard errors) over replicates.

    A unit of ``checkpoint`` (:mod:`~mtl_jax.experiments.checkpoint`; default none) is one
    replicate's fits; every replicate is still simulated (the replicates share one random
    stream), finished or not.

    Raises:
        ValueError: for an unknown setting.
    """
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown cluster_recovery settings {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    rng = np.random.default_rng(int(config["seed"]))
    checkpoint = checkpoint or Checkpoint()
    checkpoint.start(int(config["replicates"]), "cluster recovery replicates")
    replicates = []
    for replicate in range(int(config["replicates"])):
        frame, truth, coefficients = simulate(rng, int(config["clusters"]), int(config["tasks"]), int(config["features"]),
                                int(config["train_rows"]), int(config["test_rows"]), float(config["coef_sd"]))
        replicates.append(checkpoint.unit(f"replicate={replicate}", lambda: _replicate(
            config, replicate, frame, truth, coefficients, checkpoint.write if progress else None)))
    table = summary_table(replicates, list(config["models"]))
    if progress:
        print(table, flush=True)
    return {"experiment": "cluster_recovery", "config": config, "replicates": replicates, "table": table}


def _replicate(config: dict, replicate: int, frame: pd.DataFrame, truth: np.ndarray, coefficients: np.ndarray,
               log: Callable[[str], None] | None) -> dict:
    """One replicate: ``separation`` and every model fitted and scored; a progress line to ``log`` (when given)."""
    data = PersonData.from_dataframe(frame, person="task", labels="y_Label", split="split")
    test = frame[frame["split"] == "test"]
    results = {}
    for name, options in config["models"].items():
        model, method, backend = model_entry(name, options)
        fitted = fit(model, data, method=method, seed=int(config["seed"]) + replicate, **backend)
        table = task_metrics(test["y_Label"].to_numpy(), fitted.predict(test)[:, 0], test["task"].to_numpy())
        entry = {"auc_task_mean": float(table.loc["task_mean", "auc"]),
                 "auc_pooled": float(table.loc["pooled", "auc"]), "converged": bool(fitted.converged)}
        if "class_probabilities" in fitted.task_tables:
            probabilities = fitted.task_tables["class_probabilities"]
            found = probabilities.loc[[f"t{k:03d}" for k in range(len(truth))]].to_numpy().argmax(axis=1)
            entry.update(ari=adjusted_rand_index(truth, found), clusters_used=int(len(np.unique(found))))
        results[name] = entry
    distance = separation(coefficients)
    if log is not None:
        log(f"replicate {replicate} (separation {distance:.2f}): " + ", ".join(
            f"{name} AUC {entry['auc_task_mean']:.3f}" + (f" ARI {entry['ari']:.2f}" if "ari" in entry else "")
            for name, entry in results.items()))
    return {"separation": distance, "models": results}


def summary_table(replicates: list[dict], models: list[str]) -> str:
    """Per model: mean (standard error) over replicates of each reported quantity."""
    rows = {}
    for name in models:
        row = {}
        for key in ("auc_task_mean", "auc_pooled", "ari", "clusters_used"):
            values = [entry["models"][name][key] for entry in replicates if key in entry["models"][name]]
            if values:
                mean, error = mean_and_standard_error(values)
                row[key] = f"{mean:.3f} ({error:.3f})"
        rows[name] = row
    return pd.DataFrame(rows).T.fillna("").to_string()
