r"""The mixture-GLMM paper's simulation study (section 4, Table 2).

For each number of components ``g``, ``R`` replicates of the Table 1 design are drawn
(:func:`mtl_jax.experiments.simulation.simulate_study`) and two models are fitted by EM to
every replicate in one jitted, vmapped call each:

* ``"mtl"``: the multitask mixture GLMM, ``MixtureGLMM(g)`` (task random effects in the
  mixing logits and in the component means);
* ``"independence"``: the same mixture of regressions without random effects, i.e. the
  tasks are ignored.

Each fit is relabelled to the true components (:func:`mtl_jax.metrics.match_components` on
``W``) and scored as in the paper: the average absolute bias of :math:`\hat v` (all
``(g-1) x 5`` entries), :math:`\hat w` (``g x 5``) and :math:`\hat\sigma^2` (``g``), and
the percentage of variance explained on the test set,
:math:`100\,(1 - \sum (y - \hat y)^2 / \sum (y - \bar y)^2)`. The ``"oracle"`` row
predicts the same test sets with the true parameters and the true task random effects:
the ceiling any fit can reach. Because the intercepts of ``v`` and ``w`` share their level
with the task random intercepts (only ``K = 10`` tasks), the bias of the slopes alone is
reported as well.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pandas as pd
from jax.sharding import Mesh

from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.experiments.common import (
    cast_floats,
    compile_and_run,
    plus_minus,
    resolve_dtype,
    summarize,
    unstack_tree,
)
from mtl_jax.experiments.simulation import SimulatedStudy, simulate_study
from mtl_jax.infer.em import EMResult, em_fit
from mtl_jax.infer.program_cache import cached_program
from mtl_jax.infer.sharding import batch_map, device_mesh, resolve_devices
from mtl_jax.metrics import explained_variance, match_components, mean_absolute_bias
from mtl_jax.models.mixture_glmm import MixtureGLMM

__all__ = [
    "DEFAULT_CONFIG",
    "PAPER_TABLE2",
    "cast_floats",
    "fit_replicates",
    "format_table",
    "resolve_dtype",
    "run_simulation_study",
    "replicate_mesh",
    "run_replicates",
    "simulate_replicates",
    "study_models",
]

#: Table 2 of the paper: average absolute bias of (v, w, sigma^2) and test explained
#: variance (%, mean and standard error over 10 replicates), by ``g`` and model.
PAPER_TABLE2 = {
    2: {
        "independence": {"bias": (0.09, 0.09, 0.97), "explained_variance": (11.7, 1.9)},
        "mtl": {"bias": (0.05, 0.05, 0.01), "explained_variance": (43.2, 3.0)},
    },
    4: {
        "independence": {"bias": (0.28, 0.17, 0.60), "explained_variance": (36.2, 3.7)},
        "mtl": {"bias": (0.09, 0.07, 0.03), "explained_variance": (51.1, 3.3)},
    },
    8: {
        "independence": {"bias": (0.51, 0.24, 0.57), "explained_variance": (41.3, 2.0)},
        "mtl": {"bias": (0.15, 0.10, 0.06), "explained_variance": (52.4, 1.5)},
    },
}

#: Settings of the paper's study; any of them can be overridden in the config.
DEFAULT_CONFIG = {
    "experiment": "simulation_study",
    "components": [2, 4, 8],
    "models": ["independence", "mtl"],
    "replicates": 10,
    "seed": 0,
    "num_tasks": 10,
    "n_per_task": 1000,
    "n_init": 4,
    "max_iter": 500,
    "tol": 1e-8,
    "dtype": None,
    "devices": None,
    "replicate_batch": "auto",
}

_BIASES = ("v", "w", "sigma2", "v_slopes", "w_slopes")


def study_models(num_components: int) -> dict[str, MixtureGLMM]:
    """The two models of Table 2 for ``g`` components, by name."""
    return {
        "independence": MixtureGLMM(num_components, mixing_random_effects=False, component_random_effects=False),
        "mtl": MixtureGLMM(num_components),
    }


@functools.partial(jax.jit, static_argnames=("num_components", "num_tasks", "n_per_task"))
def simulate_replicates(keys: jax.Array, num_components: int, num_tasks: int, n_per_task: int) -> SimulatedStudy:
    """Draw ``R`` replicates at once: every leaf gains a leading axis of size ``R = len(keys)``."""
    return jax.vmap(lambda key: simulate_study(key, num_components, num_tasks, n_per_task))(keys)


@cached_program(static_argnames=("model", "n_init", "max_iter", "tol", "mesh", "batch_size"))
def fit_replicates(model, designs, keys: jax.Array, *, n_init: int, max_iter: int, tol: float,
                   mesh: Mesh | None = None, batch_size: int | None = None) -> EMResult:
    """:func:`mtl_jax.infer.em.em_fit` vmapped over replicate designs ``[R, ...]`` and keys ``[R]``.

    The ``batch_size x n_init`` EM runs of a batch of replicates (``None``: all ``R``)
    share one ``lax.while_loop``, which stops when the slowest of them does; the batches
    run one after another; each replicate still reports its own iteration count. With a
    ``mesh`` the replicates are split over its devices
    (:func:`mtl_jax.infer.sharding.batch_map`; ``R`` a multiple of the device count, see
    :func:`~mtl_jax.infer.sharding.place_batch`), each device running its own loops.
    """
    fit_one = functools.partial(em_fit, model, n_init=n_init, max_iter=max_iter, tol=tol)
    return batch_map(fit_one, mesh, batch_size)(designs, keys)


def run_simulation_study(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Run the Table 2 simulation study and compare it with the paper.

    Args:
        config: overrides of :data:`DEFAULT_CONFIG`: ``components`` (list of ``g``),
            ``models`` (which of :func:`study_models` to fit), ``replicates`` (``R``),
            ``seed``, ``num_tasks`` (``K``), ``n_per_task``,
            EM settings ``n_init``, ``max_iter``, ``tol``, ``dtype`` (``None`` for
            JAX's default float, ``"float32"`` or ``"float64"``), and ``devices``: the
            number of devices the replicates are split over (``None``: every device,
            :func:`jax.device_count`; any ``R`` works, padded to a multiple), and
            ``replicate_batch``: replicates fitted at once on a device
            (:func:`replicate_batch`; ``"auto"``: one at a time on the CPU, all on an
            accelerator).
        progress: print one line per fitted model and the final table.
        checkpoint: journal of finished units (:mod:`~mtl_jax.experiments.checkpoint`;
            default none). A unit is one ``(g, model)`` pair: all ``R`` replicates, fitted
            in one compiled call, are the work in flight that a killed run loses.

    Returns:
        A JSON-serialisable dict: the resolved ``config``, the ``dtype`` used, the
        ``paper`` numbers, ``results[str(g)][model]`` with ``mean``/``se`` summaries,
        per-replicate values, convergence and timings for ``"independence"``, ``"mtl"``
        and ``"oracle"`` (explained variance only), and the printed ``table``. The
        timings of a model are ``compile_seconds`` (about 0, with ``compile_reused``
        true, when a study of the same sizes was compiled earlier in the process) and
        ``fit_seconds``, the run of all replicates without compilation, with its rates
        ``seconds_per_replicate`` and ``seconds_per_iteration``.

    Raises:
        ValueError: on an unknown config key, a bad ``dtype`` or more ``devices`` than there are.
    """
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown simulation_study settings {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    dtype = resolve_dtype(config["dtype"])
    resolve_devices(config["devices"])  # a bad count or batch fails before any work
    replicate_batch(config["replicate_batch"])
    num_replicates = int(config["replicates"])
    root = jax.random.key(int(config["seed"]))
    checkpoint = checkpoint or Checkpoint()
    checkpoint.start(len(config["components"]) * len(config["models"]), "simulation study (g, model)")
    results = {}
    for g in config["components"]:
        g = int(g)
        data_key, fit_key = jax.random.split(jax.random.fold_in(root, g))
        studies = simulate_replicates(
            jax.random.split(data_key, num_replicates), g, int(config["num_tasks"]), int(config["n_per_task"])
        )
        studies = cast_floats(studies, dtype)
        fit_keys = jax.random.split(fit_key, num_replicates)
        by_model = {}
        models = study_models(g)
        for name in config["models"]:
            if name not in models:
                raise ValueError(f"unknown model {name!r} in models; choose from {sorted(models)}")
            by_model[name] = checkpoint.unit(f"g={g}/{name}", lambda: _fit_and_score(models[name], studies, fit_keys,
                                                                                    config))
            if progress:
                checkpoint.write(_progress_line(g, name, by_model[name], num_replicates))
        by_model["oracle"] = _score_oracle(g, studies)
        results[str(g)] = by_model
    output = {
        "experiment": "simulation_study",
        "config": config,
        "dtype": str(dtype),
        "paper": {
            str(g): {name: {key: list(value) for key, value in reported.items()} for name, reported in models.items()}
            for g, models in PAPER_TABLE2.items()
        },
        "results": results,
    }
    output["table"] = format_table(output).to_string(index=False)
    if progress:
        print(output["table"], flush=True)
    return output


def _fit_and_score(model: MixtureGLMM, studies: SimulatedStudy, keys: jax.Array, config: dict) -> dict:
    """One model fitted to every replicate: its scores (:func:`_score`) and timings (:func:`_timed_fit`)."""
    fits, timing = _timed_fit(model, studies.train, keys, config)
    return {**_score(model, fits, studies), **timing}


def replicate_mesh(devices: int | None, replicates: int) -> Mesh | None:
    """The mesh a batch of ``replicates`` fits is split over, or ``None`` for one device.

    ``devices`` is a study's setting (``None``: every device, :func:`resolve_devices`);
    at most one device per replicate is used (rounded down to a multiple of the number of
    processes), so a small batch is not padded beyond one round.
    """
    count = min(resolve_devices(devices), replicates)
    count = max(count - count % jax.process_count(), jax.process_count())
    return device_mesh(count) if count > 1 else None


def replicate_batch(batch: int | str | None = "auto") -> int | None:
    """Replicates fitted at once (:func:`fit_replicates`'s ``batch_size``) for a study's setting.

    ``"auto"``: one at a time on the CPU, where a batch costs its size times one fit (each
    replicate then stops at its own slowest restart instead of the batch's), all at once
    on an accelerator, which a single small fit leaves idle. ``None``: all at once; an
    integer: that many.
    """
    if batch == "auto":
        return 1 if jax.default_backend() == "cpu" else None
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"replicate_batch must be 'auto', null or a positive integer, got {batch!r}")
    return batch


def run_replicates(model, designs, keys, *, devices: int | None, n_init: int, max_iter: int, tol: float,
                   batch: int | str | None = None):
    """:func:`fit_replicates` compiled (once per model, EM options, mesh and shapes in this
    process) and run, its replicates split over ``devices`` (:func:`replicate_mesh`) and
    fitted ``batch`` at a time on each (:func:`replicate_batch`).

    Returns:
        A :class:`~mtl_jax.experiments.common.TimedRun` whose output (host arrays when
        sharded) has the ``R`` replicates of ``designs``.
    """
    mesh = replicate_mesh(devices, len(keys))
    static = dict(model=model, n_init=int(n_init), max_iter=int(max_iter), tol=float(tol), mesh=mesh,
                  batch_size=replicate_batch(batch))
    return compile_and_run(fit_replicates, static=static, cache=True, batch_mesh=mesh, designs=designs, keys=keys)


def _timed_fit(model, designs, keys, config) -> tuple[EMResult, dict]:
    """The replicate fits (:func:`run_replicates`) and their timings."""
    run = run_replicates(model, designs, keys, devices=config["devices"], n_init=config["n_init"],
                         max_iter=config["max_iter"], tol=config["tol"], batch=config["replicate_batch"])
    fits = run.output
    n_iter = np.asarray(fits.n_iter)
    return fits, {
        "compile_seconds": run.compile_seconds,
        "compile_reused": run.reused,
        "fit_seconds": run.run_seconds,
        "seconds_per_replicate": run.run_seconds / len(n_iter),
        "seconds_per_iteration": run.run_seconds / max(int(n_iter.sum()), 1),
        "converged_fraction": float(np.mean(np.asarray(fits.converged))),
        "mean_iterations": float(n_iter.mean()),
    }


def _score(model: MixtureGLMM, fits: EMResult, studies: SimulatedStudy) -> dict:
    """Per-replicate biases after relabelling, and test explained variance, with summaries."""
    predictions = np.asarray(jax.vmap(model.predict)(fits.params, studies.test))
    test_y = np.asarray(studies.test.y)
    per_replicate = {f"bias_{name}": [] for name in _BIASES}
    per_replicate["explained_variance"] = []
    estimates = unstack_tree(jax.tree_util.tree_map(np.asarray, fits.params))
    truths = unstack_tree(jax.tree_util.tree_map(np.asarray, studies.truth))
    for r, (estimate, truth) in enumerate(zip(estimates, truths)):
        estimate = model.relabel(estimate, match_components(estimate.component_coef, truth.component_coef))
        for name, value in _biases(estimate, truth).items():
            per_replicate[f"bias_{name}"].append(value)
        per_replicate["explained_variance"].append(explained_variance(test_y[r], predictions[r]))
    per_replicate.update(
        n_iter=np.asarray(fits.n_iter).tolist(),
        converged=np.asarray(fits.converged).tolist(),
        loglik=np.asarray(fits.loglik, dtype=float).tolist(),
    )
    return {
        "bias": {name: summarize(per_replicate[f"bias_{name}"]) for name in _BIASES},
        "explained_variance": summarize(per_replicate["explained_variance"]),
        "per_replicate": per_replicate,
    }


def _biases(estimate, truth) -> dict[str, float]:
    """Average absolute bias of ``v [g-1, q]``, ``w [g, q]``, ``sigma^2 [g]``, and of the slopes."""
    v_hat, v = np.asarray(estimate.mixing_coef), np.asarray(truth.mixing_coef)
    w_hat, w = np.asarray(estimate.component_coef)[..., 0], np.asarray(truth.component_coef)[..., 0]
    sigma2_hat, sigma2 = np.asarray(estimate.component_cov)[:, 0, 0], np.asarray(truth.component_cov)[:, 0, 0]
    return {
        "v": mean_absolute_bias(v_hat, v),
        "w": mean_absolute_bias(w_hat, w),
        "sigma2": mean_absolute_bias(sigma2_hat, sigma2),
        "v_slopes": mean_absolute_bias(v_hat[:, 1:], v[:, 1:]),
        "w_slopes": mean_absolute_bias(w_hat[:, 1:], w[:, 1:]),
    }


def _score_oracle(num_components: int, studies: SimulatedStudy) -> dict:
    """Test explained variance of the true parameters and true task random effects."""
    predictions = np.asarray(jax.vmap(MixtureGLMM(num_components).predict)(studies.truth, studies.test))
    test_y = np.asarray(studies.test.y)
    values = [explained_variance(y, prediction) for y, prediction in zip(test_y, predictions)]
    return {"explained_variance": summarize(values), "per_replicate": {"explained_variance": values}}


def _progress_line(g: int, name: str, scores: dict, num_replicates: int) -> str:
    return (
        f"g={g} {name:>12}: compile {scores['compile_seconds']:.1f} s, fit {scores['fit_seconds']:.2f} s "
        f"for {num_replicates} replicates ({scores['seconds_per_replicate']:.3f} s/fit, "
        f"{1e3 * scores['seconds_per_iteration']:.2f} ms/iteration), "
        f"converged {scores['converged_fraction']:.0%}, mean {scores['mean_iterations']:.0f} iterations, "
        f"test EV {scores['explained_variance']['mean']:.1f}%"
    )


def format_table(output: dict) -> pd.DataFrame:
    """Ours beside the paper's Table 2, one row per ``(g, model)``, plus the oracle ceiling.

    Bias columns are means over replicates; ``bias v/w slopes`` leave out the intercepts,
    whose level is shared with the task random intercepts.
    """
    rows = []
    for g, by_model in output["results"].items():
        paper = PAPER_TABLE2.get(int(g), {})
        for name, scores in by_model.items():
            bias = scores.get("bias", {})
            reference = paper.get(name)
            rows.append(
                {
                    "g": int(g),
                    "model": name,
                    **{f"bias {key.replace('_', ' ')}": _fmt(bias.get(key, {}).get("mean")) for key in _BIASES},
                    "test EV %": plus_minus(scores["explained_variance"]),
                    "paper bias (v, w, s2)": "" if reference is None else "(%.2f, %.2f, %.2f)" % reference["bias"],
                    "paper EV %": "" if reference is None else plus_minus(reference["explained_variance"]),
                    "converged": _fmt(scores.get("converged_fraction"), "{:.0%}"),
                    "iterations": _fmt(scores.get("mean_iterations"), "{:.0f}"),
                    "s/fit": _fmt(scores.get("seconds_per_replicate"), "{:.2f}"),
                    "compile s": _fmt(scores.get("compile_seconds"), "{:.1f}"),
                }
            )
    return pd.DataFrame(rows)


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "" if value is None else pattern.format(value)

