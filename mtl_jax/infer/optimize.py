r"""Maximum a posteriori training with optax (``method="map"``): multitask nets and any model
that gives per-task losses.

The model supplies (see :mod:`mtl_jax.models.protocol`): ``task_losses(params, design,
row_weight, key) -> [K]`` (per-task mean negative log-likelihood of the rows weighted by
``row_weight``; dropout when ``key`` is not ``None``), ``penalty(params, design,
row_weight)`` (the L2 / log-prior term :math:`\lambda R`, which may weigh a task's prior
by its number of training rows), ``shared_mask(params)`` (which leaves all tasks share)
and ``split_rows(design, key, fraction) -> (train [n], validation [n])`` weights; and
optionally ``empirical_bayes(params, design, row_weight) -> params``, which re-estimates
prior scales from the training rows after every chunk of steps.

Each step minimises the combined loss of :mod:`mtl_jax.infer.task_weighting` plus the
penalty by Adam with an exponentially decaying step (``learning_rate * lr_decay **
(step / 1000)``), on all tasks (``task_sampling="all"``, LibMTL's way) or one task per
step in a fresh random order each pass over the tasks (``"one"``, the order the original
PersonalizedMultitaskLearning code meant to use). Steps run in jitted ``lax.scan``
chunks of ``eval_every``; after each chunk the validation loss (the sum over tasks of
their mean validation losses) is computed and the best parameters so far are kept;
training stops after ``patience`` chunks without improvement (early stopping) or at
``max_steps``. Without validation rows the last parameters are kept and ``converged``
says whether the training loss has plateaued.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mtl_jax.infer.task_weighting import (
    WEIGHTINGS,
    gradnorm_weight_gradient,
    pcgrad_coefficients,
    renormalise,
    uncertainty_objective,
)
from mtl_jax.infer.results import BackendResult
from mtl_jax.infer.svi import loss_settled

TASK_SAMPLING = ("all", "one")


class TrainState(NamedTuple):
    """Training state: parameters, weighting state, optimiser states and the best point so far."""

    params: Any
    task_weights: jax.Array  # uncertainty: log-variances s_k; gradnorm: weights w_k; else ones
    opt_state: Any
    weight_opt_state: Any
    initial_losses: jax.Array
    step: jax.Array
    best_params: Any
    best_validation: jax.Array
    best_step: jax.Array


def _gram(model, params, design, row_weight, key, active):
    """Gram matrix ``[K, K]`` of the per-task gradients with respect to the shared parameters."""
    mask = model.shared_mask(params)
    shared, rest = eqx.partition(params, mask)

    def losses_of(shared_part):
        return model.task_losses(eqx.combine(shared_part, rest), design, row_weight, key) * active

    jacobian = jax.jacrev(losses_of)(shared)
    leaves = [leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree_util.tree_leaves(jacobian)]
    return sum(leaf @ leaf.T for leaf in leaves)


def make_step(model, optimizer, weight_optimizer, *, weighting: str, sampling: str, alpha: float):
    """One training step ``(state, key, design, train_weight) -> (state, objective)``."""

    def step(state: TrainState, key, design, train_weight):
        key_drop, key_order, key_pc = jax.random.split(key, 3)
        params = state.params
        K = state.task_weights.shape[0]
        if sampling == "one":
            epoch_key = jax.random.fold_in(key_order, state.step // K)
            order = jax.random.permutation(epoch_key, K)
            active = jax.nn.one_hot(order[state.step % K], K, dtype=state.task_weights.dtype)
        else:
            active = jnp.ones((K,), state.task_weights.dtype)

        def objective(trainable, coefficients):
            p, extra = trainable
            losses = model.task_losses(p, design, train_weight, key_drop) * active
            if weighting == "uncertainty":
                combined = uncertainty_objective(losses, extra)
            else:
                combined = jnp.sum(coefficients * losses)
            return combined + model.penalty(p, design, train_weight), losses

        trainable = (params, state.task_weights)
        mask = model.shared_mask(params)
        if weighting in ("gradnorm", "pcgrad"):
            gram = _gram(model, params, design, train_weight, key_drop, active)
        if weighting == "pcgrad":
            coefficients = jax.lax.stop_gradient(pcgrad_coefficients(gram, key_pc))
            (value, losses), grads_shared = jax.value_and_grad(objective, has_aux=True)(trainable, coefficients)
            grads_rest = jax.grad(lambda t: objective(t, active)[0])(trainable)
            grads = (eqx.combine(eqx.filter(grads_shared[0], mask), eqx.filter(grads_rest[0], mask, inverse=True)),
                     jnp.zeros_like(state.task_weights))
        else:
            coefficients = state.task_weights if weighting == "gradnorm" else jnp.ones((K,), state.task_weights.dtype)
            (value, losses), grads = jax.value_and_grad(objective, has_aux=True)(trainable, coefficients)
        if weighting != "uncertainty":
            grads = (grads[0], jnp.zeros_like(state.task_weights))
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        params, task_weights = optax.apply_updates(trainable, updates)
        initial = jnp.where(state.step == 0, losses, state.initial_losses)
        weight_opt_state = state.weight_opt_state
        if weighting == "gradnorm":
            norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
            safe_initial = jnp.where(initial > 0, initial, 1.0)
            weight_grad = gradnorm_weight_gradient(state.task_weights, norms, losses + (1 - active),
                                                    safe_initial + (1 - active), alpha)
            weight_updates, weight_opt_state = weight_optimizer.update(weight_grad, state.weight_opt_state)
            task_weights = renormalise(optax.apply_updates(state.task_weights, weight_updates))
        state = state._replace(params=params, task_weights=task_weights, opt_state=opt_state,
                               weight_opt_state=weight_opt_state, initial_losses=initial, step=state.step + 1)
        return state, value

    return step


class TrainSettings(NamedTuple):
    """The hashable training settings a compiled chunk depends on (a static argument of :func:`train_chunk`)."""

    learning_rate: float
    lr_decay: float
    weighting: str
    sampling: str
    gradnorm_alpha: float


def optimizers(settings: TrainSettings):
    """Adam with the decaying step for the parameters, and plain Adam for GradNorm's task weights."""
    schedule = optax.exponential_decay(settings.learning_rate, transition_steps=1000, decay_rate=settings.lr_decay)
    return optax.adam(schedule), optax.adam(settings.learning_rate)


@functools.partial(jax.jit, static_argnames=("model", "settings"))
def train_chunk(state: TrainState, keys, design, train_weight, validation_weight, model, settings: TrainSettings):
    """``len(keys)`` training steps in one ``lax.scan``, then the validation loss and the best point so far.

    Module-level and jitted on ``(model, settings)`` and the shapes, so repeated fits of one
    model to data of one shape compile once.
    """
    optimizer, weight_optimizer = optimizers(settings)
    step = make_step(model, optimizer, weight_optimizer, weighting=settings.weighting, sampling=settings.sampling,
                     alpha=settings.gradnorm_alpha)
    state, values = jax.lax.scan(lambda s, k: step(s, k, design, train_weight), state, keys)
    if hasattr(model, "empirical_bayes"):
        state = state._replace(params=model.empirical_bayes(state.params, design, train_weight))
    validation = jnp.sum(model.task_losses(state.params, design, validation_weight, None))
    better = validation < state.best_validation
    best = jax.tree_util.tree_map(lambda new, old: jnp.where(better, new, old), state.params, state.best_params)
    state = state._replace(best_params=best, best_validation=jnp.where(better, validation, state.best_validation),
                           best_step=jnp.where(better, state.step, state.best_step))
    return state, values


def run_map_backend(model, design, key, *, init_params=None, progress: bool = False, **training) -> BackendResult:
    """``method="map"``: the model's own solver where it has one, else :func:`train`.

    A model with ``solve(design, key) -> (params, converged, n_iter)`` (a convex fit by
    Newton, FISTA or a linear system: the single-task baselines) is fitted by it; it
    takes no training options (a ``ValueError`` names them). Any other model is trained
    by :func:`train` with ``training`` as its options.
    """
    if hasattr(model, "solve"):
        if training or init_params is not None:
            given = sorted(training) + (["init_params"] if init_params is not None else [])
            raise ValueError(f"{model.name} is fitted by its own solver and takes no training options ({given})")
        params, converged, n_iter = model.solve(design, key)
        return BackendResult(params=params, converged=bool(converged), n_iter=int(n_iter), trace=np.zeros(0))
    return train(model, design, key, init_params=init_params, progress=progress, **training)


def train(
    model,
    design,
    key,
    *,
    max_steps: int = 5000,
    learning_rate: float = 0.01,
    lr_decay: float = 0.7,
    task_sampling: str = "all",
    task_weighting: str = "equal",
    gradnorm_alpha: float = 1.5,
    eval_every: int = 50,
    patience: int = 10,
    validation_fraction: float = 0.2,
    init_params=None,
    progress: bool = False,
) -> BackendResult:
    """MAP training with early stopping (module docstring).

    Args:
        model: a model with ``task_losses``, ``penalty``, ``shared_mask``, ``split_rows``.
        design: the data.
        key: PRNG key (initialisation, validation split, dropout, task order).
        max_steps: most Adam steps.
        learning_rate: initial Adam step size; ``lr_decay``: its factor per 1,000 steps.
        task_sampling: ``"all"`` or ``"one"`` task per step.
        task_weighting: one of :data:`mtl_jax.infer.task_weighting.WEIGHTINGS`.
        gradnorm_alpha: GradNorm's :math:`\\alpha`.
        eval_every: steps per jitted chunk (and between validation checks).
        patience: chunks without a better validation loss before stopping.
        validation_fraction: share of each task's training rows held out for early
            stopping when the data carry no validation split (``0``: none).
        init_params: starting parameters (default ``model.init``).
        progress: show a progress bar (steps, objective, best validation loss).

    Returns:
        The best parameters; ``trace`` the training objective per step; ``n_iter`` the
        steps run; diagnostics ``best_step``, ``best_validation_loss`` and the final
        ``task_weights``.
    """
    if task_sampling not in TASK_SAMPLING:
        raise ValueError(f"task_sampling must be one of {list(TASK_SAMPLING)}, not {task_sampling!r}")
    if task_weighting not in WEIGHTINGS:
        raise ValueError(f"task_weighting must be one of {list(WEIGHTINGS)}, not {task_weighting!r}")
    if eval_every < 1 or max_steps < 1:
        raise ValueError("max_steps and eval_every must be positive")
    key_init, key_split, key_train = jax.random.split(key, 3)
    params = init_params if init_params is not None else model.init(key_init, design)
    train_weight, validation_weight = model.split_rows(design, key_split, validation_fraction)
    has_validation = bool(jnp.sum(validation_weight) > 0)
    K = model.task_losses(params, design, train_weight, None).shape[0]
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    settings = TrainSettings(float(learning_rate), float(lr_decay), task_weighting, task_sampling,
                             float(gradnorm_alpha))
    optimizer, weight_optimizer = optimizers(settings)
    start_weights = jnp.zeros((K,), dtype) if task_weighting == "uncertainty" else jnp.ones((K,), dtype)
    state = TrainState(params, start_weights, optimizer.init((params, start_weights)),
                       weight_optimizer.init(start_weights), jnp.ones((K,), dtype), jnp.asarray(0),
                       params, jnp.asarray(jnp.inf, dtype), jnp.asarray(0))

    traces, stopped = [], False
    bar = tqdm(total=max_steps, disable=not progress, desc="map", unit="step")
    for index in range(-(-max_steps // eval_every)):
        keys = jax.random.split(jax.random.fold_in(key_train, index), eval_every)
        state, values = train_chunk(state, keys, design, train_weight, validation_weight, model, settings)
        traces.append(np.asarray(values))
        bar.update(eval_every)
        bar.set_postfix(objective=f"{float(values[-1]):.4g}", best_validation=f"{float(state.best_validation):.4g}")
        if not np.all(np.isfinite(traces[-1])):
            break
        if has_validation and (int(state.step) - int(state.best_step)) >= patience * eval_every:
            stopped = True
            break
    bar.close()
    trace = np.concatenate(traces)
    finite = bool(np.all(np.isfinite(trace)))
    best = state.best_params if has_validation else state.params
    return BackendResult(
        params=best,
        converged=finite and (stopped if has_validation else loss_settled(trace)),
        n_iter=int(state.step),
        trace=trace,
        diagnostics={"best_step": int(state.best_step), "best_validation_loss": float(state.best_validation),
                     "task_weights": np.asarray(state.task_weights).tolist(), "early_stopped": stopped},
    )


CLI_OPTIONS = (
    ("--max-steps", dict(type=int, metavar="N", help="MAP Adam steps at most (default 5000)")),
    ("--step-size", dict(type=float, metavar="LR", dest="learning_rate",
                         help="MAP Adam initial step size (default 0.01)")),
    ("--lr-decay", dict(type=float, metavar="F", help="MAP step-size factor per 1000 steps (default 0.7)")),
    ("--task-sampling", dict(choices=TASK_SAMPLING, help="MAP: all tasks per step, or one (default all)")),
    ("--task-weighting", dict(choices=WEIGHTINGS, help="MAP task weighting (default equal)")),
    ("--eval-every", dict(type=int, metavar="N", help="MAP steps between validation checks (default 50)")),
    ("--patience", dict(type=int, metavar="N", help="MAP checks without improvement before stopping (default 10)")),
    ("--validation-fraction", dict(type=float, metavar="F",
                                   help="MAP share of training rows held out for early stopping (default 0.2)")),
)
"""Command-line options of :func:`run_map_backend` (``--step-size`` sets ``learning_rate``)."""
