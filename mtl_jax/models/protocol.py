r"""The one model protocol every family implements, and the registry of models by name.

The inference layer (:mod:`mtl_jax.infer`), the :class:`mtl_jax.Fit` result type and the
command line reach a model only through the methods below; none of them names a model.
A new family is one module under ``mtl_jax/models/`` with a class that implements this
protocol, decorated with :func:`register`.

A model is a frozen, hashable dataclass of static settings (so it can be a static
argument of ``jax.jit``); its parameters are a separate pytree. Shapes: ``n`` rows,
``K`` training tasks.

Required (every model):

``name`` / ``methods``
    Class attributes: the registry name (``"mixture-glmm"``) and the set of backends it
    supports (``{"em", "svi", "nuts"}`` ...); ``fit`` refuses any other method.
``design(data) -> design``
    The model's array pytree from a :class:`mtl_jax.data.TaskData` (a design passes
    through unchanged). Tasks of ``data`` numbered ``>= K`` (``K`` the number of tasks of
    the parameters) are tasks unseen in training.
``labels(data) -> dict``
    JSON-safe names the fit keeps: ``task_names`` plus whatever the model needs to name
    its parameters (columns, responses).
``init(key, design) -> params``
    A random starting point.
``score(params, design) -> scalar``
    The marginal log-likelihood (random effects integrated out), or an ELBO, at
    ``params``; it ranks EM restarts and gives BIC with ``num_parameters``.
``num_parameters(design) -> int``
    Free population-level parameters counted by BIC.
``predict(params, design) -> [n, ...]``, ``log_predictive(params, design) -> [n]``
    Predictive means and the natural-log predictive density of each row; rows of
    unseen tasks get the population-level answer (the model integrates its task
    effects out itself).
``named_parameters(params, labels, leading=0) -> dict[str, array]``
    Population-level parameters by readable name (``summary()``), keeping ``leading``
    batch axes (draws).
``population(params) -> pytree``
    The population-level part of ``params`` (no per-task leaves): EM watches it for
    convergence, NUTS reports R-hat and ESS on it.
``params_like(labels) -> params``
    A pytree of the structure of the fitted parameters (leaf values irrelevant), from
    which :meth:`mtl_jax.Fit.load` rebuilds a saved parameter pytree by key paths.
``report(params, labels) -> dict``
    Readable JSON entries of a saved fit (estimates by name, effects per task).
``add_arguments(parser)`` / ``from_arguments(args)`` (class methods)
    The model's command-line options and the model built from them.
``add_data_arguments(parser)`` (class method)
    The model's data options of ``mtl-jax fit`` (columns, encodings): the CLI names none.
``data_from_frame(frame, args=None, *, labels=None, schema=None, require_response=False)``
    Training data (what :meth:`design` takes) from a DataFrame and the parsed options
    ``args``; or, given a fit's ``labels`` (and ``schema``), new data for prediction and
    scoring, with training tasks keeping their ids and unseen tasks numbered ``>= K``.
    Data that store input rows once (deduplicated, padded) carry ``source_row [n_input]``,
    the stored row of each input row; :class:`mtl_jax.Fit` answers per input row through
    it. Everything needed to encode new data must be in the model's config, its
    ``labels`` or the data's ``schema``.

Optional capabilities (checked with ``hasattr``):

``em_step(params, design) -> (params, objective)``
    One EM iteration (gives ``method="em"``). ``objective`` is the quantity the step
    does not decrease, evaluated at the old parameters (traced for tests and plots).
    A model whose step is one sweep of closed-form variational Bayes (coordinate ascent
    on an ELBO, which is then the objective) declares ``"vb"`` among its ``methods``
    instead: the same loop runs it.
``compiler_options``
    Class attribute: XLA options (``jax.jit(..., compiler_options=...)``) for the programs
    that take the model as a static argument (:func:`mtl_jax.infer.program_cache.cached_program`:
    its methods, the EM fit, the studies), where this XLA accepts them.
``valid(params) -> bool scalar``
    With ``em_step``: whether ``params`` lies in the parameter space (covariances positive
    definite, probabilities non-negative, ...). EM's acceleration (``acceleration="squarem"``,
    :func:`mtl_jax.infer.em.run_squarem`) extrapolates the flattened parameters and rejects
    an extrapolated point that is not valid; without the method only finiteness and the
    objective guard it.
``numpyro_model(design, centred=False)``, ``site_values(params) -> dict``, ``from_sites(samples) -> params``
    The model as a NumPyro program (gives ``"svi"`` and ``"nuts"``): ``site_values`` maps
    a parameter point to the program's sampled sites (an initial value; the sites of
    both forms), ``from_sites`` maps samples of the program's sites (with any leading
    axes) back to parameters. ``centred`` draws task-level location-scale effects
    directly instead of as a transform of standard normals (SVI's mean-field guides
    fit that form, NUTS the other); a model without such effects ignores it.
``task_losses(params, design, row_weight, key) -> [K]``, ``penalty(params, design, row_weight)``, ``shared_mask(params)``, ``split_rows(design, key, fraction)``
    Gives ``"map"`` by optax training (:mod:`mtl_jax.infer.optimize`): per-task mean
    negative log-likelihoods of the rows weighted by ``row_weight`` (dropout when ``key``
    is given), the L2 / log-prior term (given the training rows, so that a task's prior
    can be weighed against its mean loss), which leaves all tasks share (for GradNorm and
    PCGrad), and the training / validation row weights for early stopping.
``empirical_bayes(params, design, row_weight) -> params``
    With ``"map"`` training: re-estimates prior scales (stored in ``params``) from the
    training rows after each chunk of steps.
``solve(design, key) -> (params, converged, n_iter)``
    Gives ``"map"`` by the model's own (convex) solver instead; it takes no training options.
``align(params, reference) -> params``
    Label switching: ``params`` with its exchangeable parts (mixture components)
    permuted to best match ``reference``; a permutation must leave ``score``,
    ``predict`` and ``log_predictive`` unchanged.
``standard_errors(params, design, labels) -> dict[str, float]``
    Asymptotic standard errors of the named parameters of an EM (point) fit.
``check(params, design, labels) -> list[str]``
    Problems of a fitted point (variances at their floor, empty components, ...);
    each becomes a warning and is kept in the fit's diagnostics.
``task_tables(params, design, labels) -> dict[str, pandas.DataFrame]``
    Per-task tables of a fitted point, each indexed by task name (index name ``"task"``):
    e.g. ``mixing_sd`` / ``component_sd`` (conditional sds of the predicted effects, the
    columns of :meth:`random_effects`' tables) and ``class_probabilities`` (columns
    ``"1" .. "g"``, membership per task). :func:`mtl_jax.fit` keeps them as
    :attr:`mtl_jax.Fit.task_tables` (saved with the fit); :mod:`mtl_jax.plots` draws
    intervals and clusters from them.
``simulate(key, params, design)``
    Draws from the model.
``read_frame(path, args) -> pandas.DataFrame``
    How ``mtl-jax fit`` reads its data file (default ``pandas.read_csv``), e.g. the
    per-person models' task-dict pickles behind ``--allow-pickle``.
``score_columns(params, design) -> dict[str, [n] array]``
    Extra per-row scores (e.g. sequence-lda's ``next_correct`` / ``next_total``) that
    :meth:`mtl_jax.Fit.score_table` and ``mtl-jax score`` add after ``loglik``, mapped to
    input rows like ``loglik``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MODELS: dict[str, type] = {}
"""Registered model classes by their ``name``."""


def register(cls: type) -> type:
    """Class decorator: add a model class to :data:`MODELS` under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    MODELS[cls.name] = cls
    return cls


def model_class(name: str) -> type:
    """The registered model class called ``name``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    import mtl_jax.models  # noqa: F401  (registers the built-in families)

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def model_config(model) -> dict[str, Any]:
    """``{"name": ..., "config": {...}}``: a JSON-safe description of a model instance."""
    return {"name": model.name, "config": dataclasses.asdict(model)}


def model_from_config(spec: dict[str, Any]):
    """Inverse of :func:`model_config` (JSON lists become tuples again)."""
    config = {key: tuple(value) if isinstance(value, list) else value for key, value in spec["config"].items()}
    return model_class(spec["name"])(**config)


def supports(model, method: str) -> bool:
    """Whether ``model`` declares ``method`` among its backends."""
    return method in getattr(model, "methods", ())
