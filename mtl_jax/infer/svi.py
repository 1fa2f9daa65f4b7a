r"""Stochastic variational inference on a model's NumPyro program.

The model's ``numpyro_model(design)`` (priors, non-centred random effects, labels summed
out) is fitted with NumPyro's SVI: an autoguide ``q`` maximises the evidence lower bound
:math:`\operatorname{ELBO}(q) = E_q[\log p(y, \theta) - \log q(\theta)]` by optax Adam on
one-sample reparameterised gradients. The guide starts at an EM fit, so SVI refines a good
point rather than searching the label-switched landscape from scratch.

The guides: ``"normal"`` (mean-field Gaussian in the unconstrained space, AutoNormal),
``"lowrank"`` (Gaussian with low-rank plus diagonal covariance) and ``"map"`` (a point
mass, AutoDelta: MAP estimation with the priors as penalties).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_value

from mtl_jax.infer.em import em_fit
from mtl_jax.infer.results import BackendResult
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams

GUIDES = {"normal": AutoNormal, "map": AutoDelta, "lowrank": AutoLowRankMultivariateNormal}

#: Smallest random-effect sd used when mapping an EM fit to the sampled sites: a variance
#: component estimated as zero would otherwise sit at ``log 0`` in the unconstrained space.
MIN_SD = 1e-3


def starting_point(model: MixtureGLMM, design: MixtureDesign, key: Array, init_params=None) -> MixtureParams:
    """``init_params`` in the design's dtype, or else the best of two EM starts."""
    if init_params is None:
        return em_fit(model, design, key, n_init=2).params
    return MixtureParams(*(jnp.asarray(leaf, design.y.dtype) for leaf in init_params))


def site_values(model: MixtureGLMM, params: MixtureParams) -> dict[str, Array]:
    r"""The sampled sites of :meth:`MixtureGLMM.numpyro_model` at the point ``params``.

    Standard deviations are :math:`s = \max(\sqrt{\text{var}}, \texttt{MIN\_SD})`; the
    non-centred effects are ``effects / s``, so ``s * z`` reproduces the effects exactly.
    For ``p > 1`` the residual covariance splits into
    :math:`\sigma = \sqrt{\operatorname{diag}\Sigma_h}` and the Cholesky factor of the
    correlation :math:`\Sigma_h / \sigma\sigma^T`.

    Returns:
        Values keyed by site name (constrained space), for ``init_to_value``.
    """
    cov = params.component_cov
    scale = jnp.sqrt(jnp.diagonal(cov, axis1=1, axis2=2))  # [g, p]
    values = {"component_coef": params.component_coef, "component_scale": scale}
    if model.num_components > 1:
        values["mixing_coef"] = params.mixing_coef
    if cov.shape[-1] > 1:
        values["component_corr_chol"] = jnp.linalg.cholesky(cov / (scale[:, :, None] * scale[:, None, :]))
    parts = (
        ("mixing", model.has_mixing_effects, params.mixing_var, params.mixing_effects),
        ("component", model.component_random_effects, params.component_var, params.component_effects),
    )
    for name, present, var, effects in parts:
        if present:
            sd = jnp.maximum(jnp.sqrt(var), MIN_SD)
            values[f"{name}_effects_sd"] = sd
            values[f"{name}_effects_z"] = effects / sd
    return values


def loss_settled(losses: np.ndarray, rtol: float = 1e-3) -> bool:
    r"""Whether the mean loss over the last 10% of steps moved less than ``rtol`` (relative).

    With ``m = max(T // 10, 1)`` for ``T`` steps, compares the mean of the last ``m``
    losses, :math:`\bar\ell_1`, with the mean of the ``m`` before them, :math:`\bar\ell_0`:
    settled when :math:`|\bar\ell_1 - \bar\ell_0| \le \text{rtol}\,|\bar\ell_0|`.
    Averaging smooths the one-sample ELBO noise; non-finite losses never settle.
    """
    window = max(len(losses) // 10, 1)
    if len(losses) < 2 * window:
        return False
    last, before = np.mean(losses[-window:]), np.mean(losses[-2 * window : -window])
    return bool(np.isfinite(last) and np.isfinite(before) and abs(last - before) <= rtol * abs(before))


def sample_posterior(
    model: MixtureGLMM,
    design: MixtureDesign,
    start: MixtureParams,
    key: Array,
    *,
    guide: str,
    num_steps: int,
    learning_rate: float,
    num_samples: int,
    progress: bool = False,
) -> tuple[Float[Array, " num_steps"], dict[str, Array]]:
    """Fit the guide from ``start``; return the loss per step and ``S`` posterior draws.

    The draws are guide samples pushed through the model with ``Predictive``, so they
    hold every :class:`MixtureParams` field (deterministic sites included), each with a
    leading axis ``[S]``. Jittable with all keyword arguments static (``progress=False``).
    """
    key_svi, key_draws = jax.random.split(key)
    program = model.numpyro_model
    auto = GUIDES[guide](program, init_loc_fn=init_to_value(values=site_values(model, start)))
    svi = SVI(program, auto, optax.adam(learning_rate), Trace_ELBO())
    result = svi.run(key_svi, num_steps, design, progress_bar=progress)
    predictive = Predictive(
        program,
        guide=auto,
        params=result.params,
        num_samples=num_samples,
        return_sites=list(MixtureParams._fields),
    )
    return result.losses, predictive(key_draws, design)


_sample_posterior_jit = jax.jit(
    sample_posterior,
    static_argnames=("model", "guide", "num_steps", "learning_rate", "num_samples", "progress"),
)


def run_svi_backend(
    model: MixtureGLMM,
    design: MixtureDesign,
    key: Array,
    *,
    guide: str = "normal",
    num_steps: int = 3000,
    learning_rate: float = 0.01,
    num_samples: int = 1000,
    init_params: MixtureParams | None = None,
    progress: bool = False,
) -> BackendResult:
    """SVI with an autoguide started at an EM fit.

    Args:
        model: the model description; its ``numpyro_model`` is the program fitted.
        design: the data.
        key: PRNG key (EM starts, ELBO noise, posterior draws).
        guide: ``"normal"`` (AutoNormal), ``"map"`` (AutoDelta) or ``"lowrank"``
            (AutoLowRankMultivariateNormal).
        num_steps: Adam steps.
        learning_rate: Adam step size.
        num_samples: guide draws ``S`` pushed through the model for the summaries.
        init_params: starting point; ``None`` runs :func:`em_fit` with two starts.
        progress: show NumPyro's progress bar. Without it the guide set-up, the
            optimisation (one ``lax.scan``) and the draws are one jitted call; with it
            each step is its own jitted call.

    Returns:
        Posterior means of the ``S`` draws as ``params``, the draws with axes
        ``[1, S, ...]`` (one "chain"), the loss (negative ELBO) per step as ``trace``,
        ``converged`` from :func:`loss_settled`, and ``n_iter = num_steps``.
    """

    if guide not in GUIDES:
        raise ValueError(f"unknown guide {guide!r}; choose one of {sorted(GUIDES)}")
    key_start, key_svi = jax.random.split(key)
    start = starting_point(model, design, key_start, init_params)
    run = sample_posterior if progress else _sample_posterior_jit
    losses, draws = run(
        model,
        design,
        start,
        key_svi,
        guide=guide,
        num_steps=num_steps,
        learning_rate=learning_rate,
        num_samples=num_samples,
        progress=progress,
    )
    losses = np.asarray(losses)
    draws = {field: np.asarray(value) for field, value in draws.items()}
    window = max(num_steps // 10, 1)
    return BackendResult(
        params=MixtureParams(**{field: value.mean(axis=0) for field, value in draws.items()}),
        converged=loss_settled(losses),
        n_iter=num_steps,
        trace=losses,
        draws={field: value[None] for field, value in draws.items()},
        diagnostics={"guide": guide, "final_loss": float(np.mean(losses[-window:]))},
    )
