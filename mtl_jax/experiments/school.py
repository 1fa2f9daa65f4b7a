"""The mixture-GLMM paper's school-effectiveness study (section 4, Table 3).

The ILEA exam scores of 15,362 pupils in 139 schools (one task per school) are split ten
times at random, within each school, into a training and a test part in the ratio 8:3.
Three two-component mixtures of regressions are fitted to each training part by EM and
judged by the percentage of test variance they explain (test pupils come from the same
schools, so the predictions use the schools' predicted random effects):

* ``independence``: the 15 student-level covariates in the mixing proportions and the
  component means, no random effects (the mixture of regressions with concomitant
  covariates);
* ``mtl_student``: the same covariates with school random intercepts in the mixing
  logits and in the component means;
* ``mtl_all``: as ``mtl_student`` with the 5 school-level covariates added to both parts.

Every split size is fixed by the school sizes (``round(3/11 n_i)`` test pupils per
school), so the training designs of all splits have the same shape. They are stacked and
each model is fitted to all splits in one jitted call: ``lax.map`` over the splits of
:func:`mtl_jax.infer.em.em_fit`, whose restarts are vmapped. The splits run one after
the other inside the call rather than vmapped as well: with ``vmap`` over 10 splits x 4
restarts, the batched LAPACK kernels of jaxlib 0.10.2 on CPU deadlock for the
``mtl_all`` model (two concurrent kernels wait on each other's work in the intra-op
thread pool), and each split can stop as soon as its own restarts have converged.

Components are reported in a fixed order so that variance components can be averaged
over splits: component 1 is the one with the higher average fitted mean score on the
training pupils (random effects excluded), i.e. the "high ability" group of the paper.

The study runs in float64 by default (``jax_enable_x64`` is switched on for the whole
process): the relative EM tolerance of ``1e-8`` is below float32 resolution.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import (
    SCHOOL_COVARIATES,
    STUDENT_COVARIATES,
    TaskData,
    ilea_task_data,
    load_ilea,
    train_test_split_by_task,
)
from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.experiments.common import (
    cast_floats,
    compile_and_run,
    plus_minus,
    resolve_dtype,
    stack_trees,
    summarize,
    unstack_tree,
)
from mtl_jax.infer.em import EMResult, em_fit
from mtl_jax.infer.program_cache import cached_program
from mtl_jax.metrics import explained_variance
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams

PAPER_TABLE3 = {
    "independence": (31.5, 0.8),
    "mtl_student": (37.2, 0.9),
    "mtl_all": (37.4, 1.0),
}
"""Table 3 of the paper: test explained variance in % as (mean, standard error)."""

MODEL_DESCRIPTIONS = {
    "independence": "student covariates, no random effects",
    "mtl_student": "student covariates, school random effects",
    "mtl_all": "student + school covariates, school random effects",
}
"""One-line description of each model of the study."""

_SIGN = "+-"
"""Separator of mean and standard error in the (plain ASCII) progress lines and table."""

DEFAULT_CONFIG = {
    "experiment": "school_study",
    "components": 2,
    "splits": 10,
    "test_fraction": 3 / 11,
    "n_init": 4,
    "max_iter": 1000,
    "tol": 1e-8,
    "seed": 0,
    "models": list(PAPER_TABLE3),
    "dtype": "float64",
}
"""Settings of the paper's study; :func:`run_school_study` fills missing keys from here."""


def school_models(num_components: int) -> dict[str, MixtureGLMM]:
    """The three models of Table 3, keyed by name.

    Args:
        num_components: Number of mixture components ``g`` (2 in the paper).

    Returns:
        ``{"independence", "mtl_student", "mtl_all"}`` mapped to their model
        descriptions; each selects its columns from a ``covariates="all"`` ILEA data set.
    """
    student = STUDENT_COVARIATES
    everything = STUDENT_COVARIATES + SCHOOL_COVARIATES
    return {
        "independence": MixtureGLMM(
            num_components,
            covariates=student,
            mixing_covariates=student,
            mixing_random_effects=False,
            component_random_effects=False,
        ),
        "mtl_student": MixtureGLMM(num_components, covariates=student, mixing_covariates=student),
        "mtl_all": MixtureGLMM(num_components, covariates=everything, mixing_covariates=everything),
    }


def school_splits(
    data: TaskData, *, splits: int, test_fraction: float, seed: int
) -> list[tuple[TaskData, TaskData]]:
    """Random within-school train/test splits of the study.

    Args:
        data: The encoded ILEA data.
        splits: Number of splits.
        test_fraction: Fraction of each school's pupils held out (3/11 for 8:3).
        seed: Split ``s`` uses the ``numpy`` seed ``seed + s``.

    Returns:
        ``(train, test)`` pairs from :func:`mtl_jax.data.train_test_split_by_task`.
    """
    return [
        train_test_split_by_task(data, test_fraction=test_fraction, seed=seed + split)
        for split in range(splits)
    ]


def run_school_study(config: dict[str, Any], *, progress: bool = True,
                     checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Runs the school-effectiveness study of Table 3.

    Split ``s`` uses the seed ``seed + s`` both for the train/test split and for the EM
    random starts, so all models see the same splits.

    Args:
        config: Study settings; missing keys take their values from
            :data:`DEFAULT_CONFIG`. ``components``: mixture components; ``splits``:
            number of random splits; ``test_fraction``: held-out fraction per school;
            ``n_init``, ``max_iter``, ``tol``: EM restarts and stopping rule; ``seed``:
            base seed; ``models``: names from :data:`PAPER_TABLE3`, in report order;
            ``dtype``: ``"float64"`` (switches on ``jax_enable_x64``), ``"float32"`` or
            ``None`` for JAX's current default; ``experiment`` is accepted for
            :func:`mtl_jax.experiments.run_experiment`.
        progress: Whether to print a line per model and the result table.
        checkpoint: Journal of finished units (:mod:`~mtl_jax.experiments.checkpoint`;
            default none). A unit is one model fitted to all splits (one compiled call).

    Returns:
        A JSON-serialisable dictionary with the complete ``config``, a ``data`` summary
        (sizes and float dtype) and, under ``models``, per model: its ``description``,
        the ``paper`` explained variance, ``explained_variance`` (mean, standard error
        (None for a single split) and per split, in %), ``variance_components`` (``sigma2``, and ``phi`` and
        ``lambda`` where the model has random effects: per-component means over splits
        and per-split values, components ordered as described in the module docstring),
        the per-split marginal ``loglik``, ``n_iter`` and ``converged`` of the best
        restart, ``converged_fraction``, ``mean_iterations``, and, for all splits
        together, ``compile_seconds`` (tracing and compilation) and ``fit_seconds`` (the
        compiled run alone); and the printed ``table`` (:func:`format_table`).

    Raises:
        ValueError: On an unknown config key, model name or dtype.
    """
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    config["models"] = list(config["models"])
    models = school_models(config["components"])
    bad = [name for name in config["models"] if name not in models]
    if bad:
        raise ValueError(f"unknown model(s) {bad}; choose from {list(models)}")

    dtype = resolve_dtype(config["dtype"])
    data = cast_floats(ilea_task_data(load_ilea(), covariates="all"), dtype)
    pairs = school_splits(
        data, splits=config["splits"], test_fraction=config["test_fraction"], seed=config["seed"]
    )
    keys = jax.vmap(jax.random.key)(config["seed"] + jnp.arange(config["splits"]))
    results = {
        "config": config,
        "data": {
            "num_obs": data.num_obs,
            "num_tasks": data.num_tasks,
            "train_obs": pairs[0][0].num_obs,
            "test_obs": pairs[0][1].num_obs,
            "dtype": str(dtype),
        },
        "models": {},
    }
    checkpoint = checkpoint or Checkpoint()
    checkpoint.start(len(config["models"]), "school study models")
    for name in config["models"]:
        if progress and name not in checkpoint.done:
            checkpoint.write(f"{name}: fitting {config['splits']} splits x {config['n_init']} starts")
        summary = checkpoint.unit(name, lambda: _study_model(models[name], pairs, keys, config))
        results["models"][name] = {
            "description": MODEL_DESCRIPTIONS[name],
            "paper": dict(zip(("mean", "se"), PAPER_TABLE3[name])),
            **summary,
        }
        if progress:
            ev = summary["explained_variance"]
            checkpoint.write(
                f"{name}: EV {plus_minus(ev, sign=_SIGN)} % "
                f"(paper {plus_minus(PAPER_TABLE3[name], sign=_SIGN)}), "
                f"converged {sum(summary['converged'])}/{config['splits']}, "
                f"{summary['mean_iterations']:.0f} iterations, "
                f"compile {summary['compile_seconds']:.0f} s, fit {summary['fit_seconds']:.0f} s"
            )
    results["table"] = format_table(results)
    if progress:
        print(results["table"], flush=True)
    return results


def format_table(results: dict[str, Any]) -> str:
    """Formats the output of :func:`run_school_study` as a plain-text table.

    Args:
        results: The dictionary built by :func:`run_school_study` (``table`` not needed).

    Returns:
        Explained variance beside the paper's, convergence and timings, then the
        variance components averaged over splits.
    """
    config = results["config"]
    lines = [
        f"School effectiveness (Table 3): g = {config['components']}, {config['splits']} "
        f"splits, n_init = {config['n_init']}, max_iter = {config['max_iter']}, "
        f"tol = {config['tol']:g}, {results['data']['dtype']}",
        f"{'model':<14}{'EV % (ours)':>14}{'EV % (paper)':>15}{'converged':>11}"
        f"{'iterations':>12}{'compile s':>11}{'fit s':>8}",
    ]
    for name, model in results["models"].items():
        ev, paper = model["explained_variance"], model["paper"]
        converged = f"{sum(model['converged'])}/{len(model['converged'])}"
        lines.append(
            f"{name:<14}{plus_minus(ev, sign=_SIGN):>14}"
            f"{plus_minus(paper, sign=_SIGN):>15}{converged:>11}"
            f"{model['mean_iterations']:>12.0f}{model['compile_seconds']:>11.0f}"
            f"{model['fit_seconds']:>8.0f}"
        )
    lines.append(
        "variance components, mean over splits (component 1 = higher mean fitted score):"
    )
    for name, model in results["models"].items():
        parts = [
            f"{label} = " + ", ".join(f"{value:.3g}" for value in values["mean"])
            for label, values in model["variance_components"].items()
        ]
        lines.append(f"  {name:<14}" + "; ".join(parts))
    return "\n".join(lines)


@cached_program(static_argnames=("model", "n_init", "max_iter", "tol"))
def _fit_all_splits(
    model: MixtureGLMM,
    designs: MixtureDesign,
    keys: jax.Array,
    *,
    n_init: int,
    max_iter: int,
    tol: float,
) -> EMResult:
    """EM fits of one model to stacked designs, one split after the other (``lax.map``)."""
    return jax.lax.map(
        lambda split: em_fit(model, *split, n_init=n_init, max_iter=max_iter, tol=tol),
        (designs, keys),
    )


def _study_model(
    model: MixtureGLMM,
    pairs: list[tuple[TaskData, TaskData]],
    keys: jax.Array,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Fits one model to every split and summarises the test performance.

    Args:
        model: The model description.
        pairs: ``(train, test)`` per split, with equal shapes across splits.
        keys: One PRNG key per split, shape [splits].
        config: The complete study configuration.

    Returns:
        The per-model entries of :func:`run_school_study` apart from description and paper.
    """
    train = stack_trees([model.design(train) for train, _ in pairs])
    test = stack_trees([model.design(test) for _, test in pairs])
    static = dict(
        model=model, n_init=int(config["n_init"]), max_iter=int(config["max_iter"]), tol=float(config["tol"])
    )
    run = compile_and_run(_fit_all_splits, static=static, designs=train, keys=keys)
    fits = run.output

    predictions = jax.vmap(model.predict)(fits.params, test)
    explained = [
        explained_variance(y, prediction)
        for y, prediction in zip(np.asarray(test.y), np.asarray(predictions))
    ]
    components = [
        _variance_components(model, _ordered_by_mean_score(model, params, design))
        for params, design in zip(unstack_tree(fits.params), unstack_tree(train))
    ]
    converged = np.asarray(fits.converged)
    n_iter = np.asarray(fits.n_iter)
    return {
        "explained_variance": {**summarize(explained), "per_split": explained},
        "variance_components": {
            label: {
                "mean": np.mean([split[label] for split in components], axis=0).tolist(),
                "per_split": [split[label].tolist() for split in components],
            }
            for label in components[0]
        },
        "loglik": np.asarray(fits.loglik).tolist(),
        "n_iter": n_iter.tolist(),
        "converged": converged.tolist(),
        "converged_fraction": float(converged.mean()),
        "mean_iterations": float(n_iter.mean()),
        "compile_seconds": run.compile_seconds,
        "fit_seconds": run.run_seconds,
    }


def _ordered_by_mean_score(
    model: MixtureGLMM, params: MixtureParams, design: MixtureDesign
) -> MixtureParams:
    """Relabels the components by decreasing average fitted mean on ``design``.

    The fitted mean of component ``h`` is ``W_h^T x`` (random effects excluded),
    averaged over the rows of the design and the response dimensions.
    """
    average_x = design.x_comp.mean(axis=0)
    average_mean = jnp.einsum("q,gqp->g", average_x, params.component_coef)
    return model.relabel(params, np.argsort(-np.asarray(average_mean)))


def _variance_components(model: MixtureGLMM, params: MixtureParams) -> dict[str, np.ndarray]:
    """Residual variances and, where present, the random-effect variances.

    Args:
        model: The model description (which random effects it has).
        params: Fitted parameters of a single-response model.

    Returns:
        ``sigma2`` ``[g]``, plus ``phi`` ``[g]`` with component random effects and
        ``lambda`` ``[g-1]`` (the diagonal of ``Lambda``) with mixing random effects.
    """
    out = {"sigma2": np.asarray(params.component_cov[:, 0, 0])}
    if model.component_random_effects:
        out["phi"] = np.asarray(params.component_effects_cov[:, 0, 0])
    if model.has_mixing_effects:
        out["lambda"] = np.diagonal(np.asarray(params.mixing_cov)).copy()
    return out
