r"""Choosing the number of mixture components by BIC: :func:`select_components`.

For every candidate ``g`` the model with ``num_components=g`` is fitted through
:func:`mtl_jax.fit` and scored by

.. math::

    \mathrm{BIC}_g = -2\,\ell(\hat\theta_g) + k_g \log n,

with :math:`\ell` the marginal log-likelihood at the estimate, :math:`k_g` the model's
``num_parameters`` and ``n`` its ``num_observations`` (both from the model protocol, so
this module names no model). The fit with the smallest finite BIC is chosen; a fit whose
log-likelihood is not finite (a failed fit, an invalid Laplace approximation) never is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from mtl_jax.infer.fit import fit
from mtl_jax.infer.results import Fit

__all__ = ["Selection", "candidate_models", "select_components"]


@dataclasses.dataclass(frozen=True)
class Selection:
    """The fits of every candidate number of components and the one BIC chooses.

    Attributes:
        table: one row per candidate, indexed by ``g`` (ascending), with columns
            ``loglik``, ``bic``, ``num_parameters``, ``converged``, ``n_iter`` and
            ``warnings`` (how many problems the fit reported).
        best: the :class:`~mtl_jax.Fit` with the smallest finite BIC (ties: the smaller ``g``).
        fits: every fit by ``g``.
    """

    table: pd.DataFrame
    best: Fit
    fits: dict[int, Fit]

    @property
    def best_components(self) -> int:
        """The chosen ``g``."""
        return int(self.best.model.num_components)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe ``{"criterion": "bic", "best": g, "table": [{"g": ..., <columns>}, ...]}``.

        Non-finite numbers (a failed fit's log-likelihood and BIC) become ``None``.
        """
        records = [
            {column: None if isinstance(value, float) and not math.isfinite(value) else value
             for column, value in record.items()}
            for record in self.table.reset_index().to_dict(orient="records")
        ]
        return {"criterion": "bic", "best": self.best_components, "table": records}


def candidate_models(model, components: Iterable[int]) -> dict[int, Any]:
    """``model`` with ``num_components = g`` for every candidate ``g``, by ``g`` (ascending).

    Raises:
        ValueError: when ``model`` is not a dataclass with a ``num_components`` field, or
            ``components`` is empty, repeats a value, or holds anything but integers
            ``g >= 1``.
    """
    if not dataclasses.is_dataclass(model) or isinstance(model, type) or "num_components" not in {
            field.name for field in dataclasses.fields(model)}:
        raise ValueError(f"model {getattr(model, 'name', type(model).__name__)!r} has no num_components field: "
                         "there is no number of components to select")
    candidates = list(components)
    if not candidates:
        raise ValueError("components is empty: give at least one number of components g >= 1")
    invalid = [g for g in candidates if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1]
    if invalid:
        raise ValueError(f"components must be integers g >= 1; invalid: {invalid}")
    repeated = sorted({int(g) for g in candidates if candidates.count(g) > 1})
    if repeated:
        raise ValueError(f"components lists g = {repeated} more than once")
    return {int(g): dataclasses.replace(model, num_components=int(g)) for g in sorted(candidates)}


def select_components(model, data, components: Iterable[int] = range(1, 7), method: str = "em", *,
                      seed: int = 0, **options) -> Selection:
    """Fit ``model`` with each number of components in ``components``; choose by BIC.

    Args:
        model: a registered model with a ``num_components`` field; its other settings are
            kept for every candidate.
        data: the data, as :func:`mtl_jax.fit` takes it.
        components: the candidate numbers of components ``g``.
        method: inference backend of every fit.
        seed: PRNG seed of every fit.
        **options: backend options (``n_init``, ``max_iter``, ``tol`` for EM, ...) and
            ``standard_errors`` of :func:`mtl_jax.fit` (default ``False`` here: the choice
            needs only the likelihoods).

    Returns:
        A :class:`Selection`. Each fit issues its own :class:`~mtl_jax.FitWarning` s.

    Raises:
        ValueError: for a model without ``num_components`` or invalid ``components``
            (see :func:`candidate_models`), or a method the model does not support.
        FloatingPointError: when no fit has a finite log-likelihood and BIC.
    """
    models = candidate_models(model, components)
    options.setdefault("standard_errors", False)
    fits = {g: fit(candidate, data, method, seed=seed, **options) for g, candidate in models.items()}
    table = pd.DataFrame(
        {
            "loglik": [result.loglik for result in fits.values()],
            "bic": [result.bic for result in fits.values()],
            "num_parameters": [int(models[g].num_parameters(models[g].design(data))) for g in fits],
            "converged": [result.converged for result in fits.values()],
            "n_iter": [result.n_iter for result in fits.values()],
            "warnings": [len(result.warnings) for result in fits.values()],
        },
        index=pd.Index(list(fits), name="g"),
    )
    finite = table[np.isfinite(table["loglik"]) & np.isfinite(table["bic"])]
    if finite.empty:
        shown = ", ".join(f"g={g}: loglik {result.loglik}" for g, result in fits.items())
        raise FloatingPointError(f"no fit has a finite log-likelihood, so BIC chooses nothing ({shown})")
    return Selection(table=table, best=fits[int(finite["bic"].idxmin())], fits=fits)
