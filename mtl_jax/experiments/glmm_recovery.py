r"""Recovery of a two-component mixture GLMM, family by family (bias table).

For each design (a family, a membership and a random-effect structure) ``R`` data sets
are drawn from a known ``g = 2`` model and fitted by EM; the estimates, put in the
labelling of the truth (:func:`mtl_jax.metrics.match_components` on the component
coefficients), give per parameter the bias, the sd over replicates and the RMSE.

**Data.** ``K`` tasks of ``n_per_task`` rows; covariate :math:`x \sim N(0, 1)` per row;
components :math:`\eta_{h} = w_{h0} + w_{h1} x + B_{hi}^T z` with ``z = (1)`` (random
intercept) or ``z = (1, x)`` (``random_slope``), :math:`B_{hi} \sim N(0, \Phi_h)`.
Membership per observation (the paper's eq. 3): :math:`\operatorname{logit} \pi_1 = v_0 +
v_1 x + a_i`, :math:`a_i \sim N(0, \lambda)`; per task: :math:`\operatorname{logit} \pi_1
= v_0`, one label per task. Binomial rows have ``trials`` trials each; Poisson rows an
exposure ``exp(offset)`` with ``offset ~ U(0, 1)``. The true values are
:data:`TRUTH` (one entry per family and membership).

**Backends.** For the families in ``backend_families`` the first replicate is also fitted
by SVI and NUTS through :func:`mtl_jax.fit`; their draws are aligned to the EM fit and
``(EM - posterior mean) / posterior sd`` is reported per parameter.

Note that with membership per observation the intercept ``w_{h0}`` is identified with the
mean of the realised ``B_{hi}`` of the ``K`` tasks added; that part averages out over
replicates, so the bias column still estimates the method's bias.
"""

from __future__ import annotations

import functools
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mtl_jax.experiments.checkpoint import Checkpoint, show_bars
from mtl_jax.experiments.common import cast_floats, resolve_dtype, unstack_tree
from mtl_jax.experiments.table2 import run_replicates
from mtl_jax.infer.sharding import resolve_devices
from mtl_jax.infer.fit import FitWarning, fit
from mtl_jax.infer.svi import align_draws
from mtl_jax.metrics import match_components
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams

__all__ = ["DEFAULT_CONFIG", "TRUTH", "design_model", "format_table", "run_glmm_recovery", "simulate_design"]

#: True values per ``(family, membership)``: mixing coefficients ``v`` (``(v_0, v_1)`` per
#: observation, ``(v_0,)`` per task), component coefficients ``w [2, 2]`` (intercept, x),
#: residual variance ``sigma2`` (Gaussian only), random-intercept variance ``phi`` (and
#: slope variance ``phi_slope`` and correlation ``rho`` with ``random_slope``) and the
#: mixing random-effect variance ``lambda`` (membership per observation).
TRUTH = {
    ("gaussian", "observation"): dict(v=[0.5, 0.5], w=[[1.0, 1.0], [-1.0, -1.0]], sigma2=0.5, phi=0.5, lam=0.5),
    ("binomial", "observation"): dict(v=[0.5, 0.5], w=[[-1.0, 0.5], [1.0, -0.5]], phi=0.3, lam=0.5),
    ("poisson", "observation"): dict(v=[0.5, 0.5], w=[[0.5, 0.3], [2.0, -0.3]], phi=0.3, lam=0.5),
    ("bernoulli", "task"): dict(v=[0.4], w=[[-1.0, 1.0], [1.5, -1.0]], phi=0.5, phi_slope=0.3, rho=0.3),
    ("poisson", "task"): dict(v=[0.4], w=[[0.5, 0.3], [2.0, -0.3]], phi=0.3, phi_slope=0.1, rho=0.3),
    ("gaussian", "task"): dict(v=[0.4], w=[[1.0, 1.0], [-1.0, -1.0]], sigma2=0.5, phi=0.5, phi_slope=0.3, rho=0.3),
    ("binomial", "task"): dict(v=[0.4], w=[[-1.0, 0.5], [1.0, -0.5]], phi=0.3, phi_slope=0.1, rho=0.3),
}

#: Settings of the study; any of them can be overridden in the config.
DEFAULT_CONFIG = {
    "experiment": "glmm_recovery",
    "designs": [
        {"family": "gaussian", "membership": "observation"},
        {"family": "bernoulli", "membership": "task", "random_slope": True},
        {"family": "binomial", "membership": "observation", "trials": 10},
        {"family": "poisson", "membership": "observation"},
        {"family": "poisson", "membership": "task", "random_slope": True},
    ],
    "replicates": 20,
    "num_tasks": 50,
    "n_per_task": 40,
    "n_init": 4,
    "max_iter": 500,
    "tol": 1e-8,
    "backend_families": ["bernoulli", "poisson"],
    "num_warmup": 500,
    "num_samples": 500,
    "num_chains": 2,
    "svi_steps": 4000,
    "seed": 0,
    "dtype": None,
    "devices": None,
}

_DESIGN_KEYS = {"family", "membership", "random_slope", "trials"}


def design_model(spec: dict) -> MixtureGLMM:
    """The fitted model of one design: two components (the data are raw designs, see :func:`simulate_design`)."""
    return MixtureGLMM(2, family=spec["family"], membership=spec["membership"],
                       random_slopes=("x",) if spec.get("random_slope") else ())


def true_params(spec: dict, num_tasks: int, dtype) -> MixtureParams:
    """:data:`TRUTH` of a design as model parameters (random effects still zero)."""
    truth = TRUTH[(spec["family"], spec["membership"])]
    r = 2 if spec.get("random_slope") else 1
    if r == 2:
        sd = np.sqrt([truth["phi"], truth["phi_slope"]])
        phi = np.outer(sd, sd) * np.array([[1.0, truth["rho"]], [truth["rho"], 1.0]])
    else:
        phi = np.array([[truth["phi"]]])
    lam = truth.get("lam", 0.0)
    return MixtureParams(
        mixing_coef=jnp.asarray([truth["v"]], dtype),
        component_coef=jnp.asarray(np.asarray(truth["w"])[:, :, None], dtype),
        component_cov=jnp.full((2, 1, 1), truth.get("sigma2", 1.0), dtype),
        mixing_cov=jnp.full((1, 1), lam, dtype),
        component_effects_cov=jnp.asarray(np.stack([phi, phi]), dtype),
        mixing_effects=jnp.zeros((num_tasks, 1), dtype),
        component_effects=jnp.zeros((num_tasks, 2, r, 1), dtype),
        class_logits=jnp.zeros((num_tasks, 2), dtype),
    )


@functools.partial(jax.jit, static_argnames=("model", "num_tasks", "n_per_task", "trials"))
def simulate_design(key, model: MixtureGLMM, params: MixtureParams, num_tasks: int, n_per_task: int,
                    trials: int = 1) -> tuple[MixtureDesign, MixtureParams]:
    """One data set of a design and the truth with its realised task effects (jittable)."""
    key_effects, key_x, key_offset, key_y = jax.random.split(key, 4)
    truth = model.sample_effects(key_effects, params, num_tasks)
    n = num_tasks * n_per_task
    dtype = params.component_coef.dtype
    x = jnp.stack([jnp.ones(n, dtype), jax.random.normal(key_x, (n,), dtype)], axis=1)
    task = jnp.repeat(jnp.arange(num_tasks, dtype=jnp.int32), n_per_task)
    offset = (jax.random.uniform(key_offset, (n,), dtype) if model.family == "poisson"
              else jnp.zeros(n, dtype))
    design = MixtureDesign(
        y=jnp.zeros((n, 1), dtype), x_comp=x, x_mix=x[:, :1] if model.membership == "task" else x, task=task,
        num_tasks=num_tasks, z_comp=x if model.random_slopes else x[:, :1], trials=jnp.full(n, trials, dtype),
        offset=offset,
    )
    _, y = model.simulate(key_y, truth, design)
    return eqx.tree_at(lambda d: d.y, design, y), truth


def _labels(model: MixtureGLMM, num_tasks: int) -> dict:
    return {
        "task_names": [str(i) for i in range(num_tasks)],
        "component_columns": ["intercept", "x"],
        "mixing_columns": ["intercept"] if model.membership == "task" else ["intercept", "x"],
        "response_names": ["y"],
        "random_effect_columns": ["intercept", "x"] if model.random_slopes else ["intercept"],
    }


def run_glmm_recovery(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Run the recovery study.

    Args:
        config: overrides of :data:`DEFAULT_CONFIG`: ``designs`` (list of ``{"family",
            "membership", "random_slope" (bool), "trials" (binomial)}``, each a key of
            :data:`TRUTH`), ``replicates`` (``R``), ``num_tasks`` (``K``), ``n_per_task``,
            EM settings ``n_init``, ``max_iter``, ``tol``; ``backend_families`` (families
            whose first replicate is also fitted by SVI and NUTS; ``[]`` for none),
            ``num_warmup``, ``num_samples``, ``num_chains`` (NUTS), ``svi_steps``;
            ``seed``, ``dtype``, and ``devices`` (how many devices the replicates are
            split over; ``None``: every device).
        progress: print one line per design and the final table (and the
            progress bars of the SVI and NUTS fits, when stderr is a terminal).
        checkpoint: journal of finished units (:mod:`~mtl_jax.experiments.checkpoint`;
            default none); a unit is one design (its ``R`` EM fits in one vmapped call,
            and its SVI and NUTS fits).

    Returns:
        A JSON-serialisable dict: the resolved ``config``, the ``dtype``, and per design
        (``"family/membership"``, ``+slope`` with a random slope) the ``truth``, per
        parameter ``mean`` estimate, ``bias``, ``sd``, ``rmse``, the ``converged_fraction``,
        ``seconds`` and, for the backend families, ``backends`` (per parameter EM,
        SVI mean, NUTS mean and sd, and ``z = (EM - NUTS mean) / NUTS sd``); and the
        printed ``table``.

    Raises:
        ValueError: on an unknown config or design key, or a design without a truth.
    """
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown glmm_recovery settings {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    dtype = resolve_dtype(config["dtype"])
    resolve_devices(config["devices"])  # a bad count fails before any work
    num_tasks, n_per_task, replicates = int(config["num_tasks"]), int(config["n_per_task"]), int(config["replicates"])
    root = jax.random.key(int(config["seed"]))
    for spec in config["designs"]:
        bad = set(spec) - _DESIGN_KEYS
        if bad or (spec.get("family"), spec.get("membership")) not in TRUTH:
            raise ValueError(f"design {spec} is not one of {sorted(TRUTH)} (keys {sorted(_DESIGN_KEYS)})")
    checkpoint = checkpoint or Checkpoint()
    checkpoint.start(len(config["designs"]), "GLMM recovery designs")
    bars = show_bars(progress)

    def recover(index: int, spec: dict) -> dict:
        """One unit: design ``index``'s EM fits, bias table and backend check."""
        start = time.perf_counter()
        model = design_model(spec)
        params = true_params(spec, num_tasks, dtype)
        data_key, fit_key = jax.random.split(jax.random.fold_in(root, index))
        designs, _ = jax.vmap(
            lambda key: simulate_design(key, model, params, num_tasks, n_per_task, int(spec.get("trials", 1)))
        )(jax.random.split(data_key, replicates))
        designs = cast_floats(designs, dtype)
        fits = run_replicates(model, designs, jax.random.split(fit_key, replicates), devices=config["devices"],
                              n_init=config["n_init"], max_iter=config["max_iter"], tol=config["tol"]).output
        labels = _labels(model, num_tasks)
        truth_names = model.named_parameters(jax.tree_util.tree_map(np.asarray, params), labels)
        estimates = [model.relabel(estimate, match_components(estimate.component_coef, params.component_coef))
                     for estimate in unstack_tree(jax.tree_util.tree_map(np.asarray, fits.params))]
        table = _bias_table(model, estimates, truth_names, labels)
        entry = {"table": table.to_dict(orient="index"),
                 "converged_fraction": float(np.mean(np.asarray(fits.converged)))}
        if spec["family"] in config["backend_families"]:
            design0 = jax.tree_util.tree_map(lambda leaf: leaf[0], designs)
            entry["backends"] = _backend_check(model, design0, estimates[0], labels, config,
                                               progress=bars).to_dict(orient="index")
        entry["seconds"] = time.perf_counter() - start
        if progress:
            checkpoint.write(f"{design_name(spec)}: {replicates} replicates, converged "
                             f"{entry['converged_fraction']:.0%}, {entry['seconds']:.1f} s")
        return entry

    results = {}
    for index, spec in enumerate(config["designs"]):
        results[design_name(spec)] = checkpoint.unit(f"{index}:{design_name(spec)}", lambda: recover(index, spec))
    output = {"experiment": "glmm_recovery", "config": config, "dtype": str(dtype), "results": results}
    output["table"] = format_table(output)
    if progress:
        print(output["table"], flush=True)
    return output


def design_name(spec: dict) -> str:
    """A design's name in the results: ``family/membership``, ``+slope`` with a random slope."""
    return f"{spec['family']}/{spec['membership']}" + ("+slope" if spec.get("random_slope") else "")


def _bias_table(model: MixtureGLMM, estimates: list, truth: dict, labels: dict) -> pd.DataFrame:
    """Per parameter: truth, mean estimate, bias, sd and RMSE over replicates."""
    named = [model.named_parameters(estimate, labels) for estimate in estimates]
    rows = {}
    for name, true_value in truth.items():
        values = np.array([float(entry[name]) for entry in named])
        errors = values - float(true_value)
        rows[name] = {"truth": float(true_value), "mean": float(values.mean()), "bias": float(errors.mean()),
                      "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                      "rmse": float(np.sqrt(np.mean(errors**2)))}
    return pd.DataFrame.from_dict(rows, orient="index")


def _backend_check(model: MixtureGLMM, design: MixtureDesign, em_params: MixtureParams, labels: dict,
                   config: dict, *, progress: bool = False) -> pd.DataFrame:
    """SVI and NUTS on one data set, aligned to the EM estimate: per parameter ``z = (EM - mean) / sd``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)
        nuts = fit(model, design, method="nuts", num_warmup=int(config["num_warmup"]),
                   num_samples=int(config["num_samples"]), num_chains=int(config["num_chains"]), progress=progress)
        svi = fit(model, design, method="svi", num_steps=int(config["svi_steps"]), progress=progress)
    em_named = model.named_parameters(em_params, labels)
    nuts_named = model.named_parameters(align_draws(model, nuts.draws, em_params), labels, leading=2)
    svi_named = model.named_parameters(align_draws(model, svi.draws, em_params), labels, leading=2)
    rows = {}
    for name, em_value in em_named.items():
        draws = np.asarray(nuts_named[name], dtype=float)
        mean, sd = float(draws.mean()), float(draws.std())
        em_value, svi_mean = float(em_value), float(np.mean(svi_named[name]))
        rows[name] = {"em": em_value, "svi_mean": svi_mean, "nuts_mean": mean, "nuts_sd": sd,
                      "z_em": (em_value - mean) / sd, "z_svi": (svi_mean - mean) / sd,
                      "nuts_converged": bool(nuts.converged), "svi_converged": bool(svi.converged)}
    return pd.DataFrame.from_dict(rows, orient="index")


def format_table(output: dict) -> str:
    """One block per design: truth, mean, bias, sd, RMSE (and z of EM and SVI against NUTS)."""
    blocks = []
    for name, entry in output["results"].items():
        table = pd.DataFrame.from_dict(entry["table"], orient="index")
        if "backends" in entry:
            backends = pd.DataFrame.from_dict(entry["backends"], orient="index")
            table = table.join(backends[["z_em", "z_svi"]].rename(columns={"z_em": "z(EM|NUTS)",
                                                                          "z_svi": "z(SVI|NUTS)"}))
        blocks.append(f"{name} (converged {entry['converged_fraction']:.0%})\n{table.round(3).to_string()}")
    return "\n\n".join(blocks)
