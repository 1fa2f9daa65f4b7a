"""Readable names of the mixture GLMM's parameters and effects, and its saved-fit entries.

Components are numbered from 1. A component random effect is labelled by its column
(``intercept``, ``t``, ...) for one response, by the response for a random intercept of
several responses, and ``column:response`` otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mtl_jax.models.mixture_glmm.params import POPULATION_FIELDS, MixtureParams


def effect_labels(labels: dict) -> list[str]:
    """Labels of the ``d = r p`` component effects in ``vec`` order (index ``a p + k``)."""
    columns = labels.get("random_effect_columns", ["intercept"])
    responses = labels["response_names"]
    if len(responses) == 1:
        return list(columns)
    if list(columns) == ["intercept"]:
        return list(responses)
    return [f"{column}:{response}" for column in columns for response in responses]


def named_parameters(model, params: MixtureParams, labels: dict, leading: int = 0) -> dict[str, np.ndarray]:
    """Population-level parameters by readable name, keeping ``leading`` batch axes.

    Names: ``v[h, col]``, ``w[h, col]`` or ``w[h, col, response]``, ``sigma2[h]`` or
    ``Sigma[h, k, l]`` (Gaussian family), ``lambda[h]`` (and ``lambda[h, k]`` off the
    diagonal for ``g > 2``), and the component-effect covariance: ``phi[h]`` for a single
    effect or an identity structure, ``phi[h, label]`` for a variance and
    ``phi[h, label1, label2]`` for a covariance (full structure).
    """
    response_names = labels["response_names"]
    p = len(response_names)
    lead = (slice(None),) * leading
    out: dict[str, np.ndarray] = {}
    arrays = {field: np.asarray(getattr(params, field)) for field in POPULATION_FIELDS}
    g = model.num_components
    for h in range(g - 1):
        for c, col in enumerate(labels["mixing_columns"]):
            out[f"v[{h + 1}, {col}]"] = arrays["mixing_coef"][lead + (h, c)]
    for h in range(g):
        for c, col in enumerate(labels["component_columns"]):
            for k, resp in enumerate(response_names):
                suffix = f", {resp}" if p > 1 else ""
                out[f"w[{h + 1}, {col}{suffix}]"] = arrays["component_coef"][lead + (h, c, k)]
    if model.response_family.is_gaussian:
        for h in range(g):
            if p == 1:
                out[f"sigma2[{h + 1}]"] = arrays["component_cov"][lead + (h, 0, 0)]
                continue
            for k in range(p):
                for m in range(k, p):
                    out[f"Sigma[{h + 1}, {response_names[k]}, {response_names[m]}]"] = arrays["component_cov"][
                        lead + (h, k, m)]
    if model.has_mixing_effects:
        for h in range(g - 1):
            for k in range(h, g - 1):
                name = f"lambda[{h + 1}]" if k == h else f"lambda[{h + 1}, {k + 1}]"
                out[name] = arrays["mixing_cov"][lead + (h, k)]
    if model.component_random_effects:
        out.update(_effects_cov_names(model, arrays["component_effects_cov"], labels, lead))
    return out


def _effects_cov_names(model, phi: np.ndarray, labels: dict, lead: tuple) -> dict[str, np.ndarray]:
    """The named entries of each ``Phi_h`` that the covariance structure leaves free."""
    names = effect_labels(labels)
    out = {}
    for h in range(model.num_components):
        if len(names) == 1 or model.random_effects_covariance == "identity":
            out[f"phi[{h + 1}]"] = phi[lead + (h, 0, 0)]
            continue
        for e, label in enumerate(names):
            out[f"phi[{h + 1}, {label}]"] = phi[lead + (h, e, e)]
        if model.random_effects_covariance == "full":
            for e in range(len(names)):
                for f in range(e + 1, len(names)):
                    out[f"phi[{h + 1}, {names[e]}, {names[f]}]"] = phi[lead + (h, e, f)]
    return out


def params_like(model, labels: dict) -> MixtureParams:
    """Zeros with the structure and shapes of a fit with these labels."""
    g, K = model.num_components, len(labels["task_names"])
    p, qc, qm = len(labels["response_names"]), len(labels["component_columns"]), len(labels["mixing_columns"])
    r = len(labels.get("random_effect_columns", ["intercept"]))
    return MixtureParams(
        np.zeros((g - 1, qm)), np.zeros((g, qc, p)), np.zeros((g, p, p)), np.zeros((g - 1, g - 1)),
        np.zeros((g, r * p, r * p)), np.zeros((K, g - 1)), np.zeros((K, g, r, p)), np.zeros((K, g)),
    )


def effect_columns(model, labels: dict) -> tuple[list[str], list[str]]:
    """Column names of the mixing (``A1 ..``) and component (``B1[label] ..``) effect tables."""
    g = model.num_components
    names = effect_labels(labels)
    single = len(names) == 1 and names[0] == "intercept"
    component = [f"B{h + 1}" if single else f"B{h + 1}[{label}]" for h in range(g) for label in names]
    return [f"A{h + 1}" for h in range(g - 1)], component


def random_effects(model, params: MixtureParams, labels: dict) -> dict[str, pd.DataFrame]:
    """Predicted random effects per task: ``mixing`` and ``component`` DataFrames (index: task)."""
    index = pd.Index(labels["task_names"], name="task")
    mixing_columns, component_columns = effect_columns(model, labels)
    a, b = np.asarray(params.mixing_effects), np.asarray(params.component_effects)
    return {
        "mixing": pd.DataFrame(a, index=index, columns=mixing_columns),
        "component": pd.DataFrame(b.reshape(len(index), -1), index=index, columns=component_columns),
    }


def report(model, params: MixtureParams, labels: dict) -> dict[str, Any]:
    """The readable entries of a saved fit (documented JSON keys).

    ``random_effects`` keeps each task's effects as lists (component effects in the order
    of ``random_effect_columns``); ``component_random_effects`` gives them by name, e.g.
    ``{"school 1": {"B1[intercept]": 0.3, "B1[t]": -0.1, ...}}``.
    """
    p = len(labels["response_names"])
    coef = np.asarray(params.component_coef)
    effects = random_effects(model, params, labels)
    phi = np.asarray(params.component_effects_cov)
    return {
        "family": model.family,
        "membership": model.membership,
        "random_effect_columns": list(labels.get("random_effect_columns", ["intercept"])),
        "mixing_coef": np.asarray(params.mixing_coef).tolist(),
        "component_coef": (coef[..., 0] if p == 1 else coef).tolist(),
        "component_cov": np.asarray(params.component_cov).tolist(),
        "variance_components": {
            "mixing": np.diagonal(np.asarray(params.mixing_cov)).tolist(),
            "mixing_cov": np.asarray(params.mixing_cov).tolist(),
            "component": np.diagonal(phi, axis1=1, axis2=2).tolist(),
            "component_cov": phi.tolist(),
        },
        "random_effects": {
            part: {str(task): row.tolist() for task, row in frame.iterrows()} for part, frame in effects.items()
        },
        "component_random_effects": {
            str(task): {column: float(value) for column, value in row.items()}
            for task, row in effects["component"].iterrows()
        },
    }
