"""One result type for every inference backend: :class:`Fit`.

A ``Fit`` holds the point estimate (EM: the BLUP/REML estimates; SVI and NUTS: posterior
means), the draws where the backend has any, the marginal log-likelihood and BIC at the
point estimate, convergence information, timings and the data schema needed to encode
new data. It saves to JSON (no pickle) and loads back bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import pandas as pd

from mtl_jax.data import Schema, TaskData
from mtl_jax.models.mixture_glmm import MixtureGLMM, MixtureParams


class BackendResult(NamedTuple):
    """What a backend hands back to :func:`fit`.

    Attributes:
        params: point estimate (EM estimate or posterior mean), per training task.
        converged: backend-specific convergence flag.
        n_iter: EM iterations, SVI steps or NUTS samples per chain.
        trace: per-iteration objective (EM) or loss (SVI); may be empty.
        draws: posterior draws by parameter field, leading axes ``[chain, draw]``.
        diagnostics: anything else worth keeping (R-hat, ESS, restart scores).
        loglik: marginal log-likelihood at ``params`` when the backend already has it
            (EM ranks its restarts by it); ``None``: :func:`fit` computes it.
    """

    params: Any
    converged: bool
    n_iter: int
    trace: np.ndarray
    draws: dict[str, np.ndarray] | None = None
    diagnostics: dict[str, Any] = {}
    loglik: float | None = None


_MODELS = {"MixtureGLMM": (MixtureGLMM, MixtureParams)}
_FORMAT = "mtl_jax.fit/1"


@dataclasses.dataclass
class Fit:
    """A fitted multitask model.

    Attributes:
        model: the static model description.
        method: ``"em"``, ``"svi"`` or ``"nuts"``.
        params: point estimate (numpy arrays); random effects are per training task.
        loglik: marginal log-likelihood at ``params`` (random effects integrated out).
        bic: ``-2 loglik + k log n``.
        converged: EM/SVI convergence flag; for NUTS, all R-hat below 1.05.
        n_iter: EM iterations, SVI steps or NUTS samples per chain.
        trace: EM objective per iteration, or the SVI loss (negative ELBO) per step.
        task_names: training task labels, index = task id.
        component_columns, mixing_columns, response_names: labels of the design.
        schema: how the training data were encoded (for new data); ``None`` for raw designs.
        num_obs: training observations.
        draws: posterior draws per parameter field, leading axes ``[chain, draw]``.
        diagnostics: backend-specific numbers (R-hat, ESS, restart log-likelihoods ...).
        timings: seconds spent, by phase.
    """

    model: Any
    method: str
    params: Any
    loglik: float
    bic: float
    converged: bool
    n_iter: int
    trace: np.ndarray
    task_names: tuple[str, ...]
    component_columns: tuple[str, ...]
    mixing_columns: tuple[str, ...]
    response_names: tuple[str, ...]
    schema: Schema | None = None
    num_obs: int = 0
    draws: dict[str, np.ndarray] | None = None
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------ reading
    def named_parameters(self) -> dict[str, float]:
        """Population-level parameters by readable name, e.g. ``w[1, x1]``."""
        return {name: float(value) for name, value in self._labelled(self.params).items()}

    def random_effects(self) -> dict[str, pd.DataFrame]:
        """Predicted random effects per task: ``mixing`` and ``component`` DataFrames."""
        g = self.model.num_components
        a = np.asarray(self.params.mixing_effects)
        b = np.asarray(self.params.component_effects)
        index = pd.Index(self.task_names, name="task")
        mixing = pd.DataFrame(a, index=index, columns=[f"A{h + 1}" for h in range(g - 1)])
        component = pd.DataFrame(
            b.reshape(len(index), -1),
            index=index,
            columns=[f"B{h + 1}" + (f"[{r}]" if len(self.response_names) > 1 else "")
                     for h in range(g) for r in self.response_names],
        )
        return {"mixing": mixing, "component": component}

    def summary(self) -> pd.DataFrame:
        """One row per population-level parameter.

        EM fits give the estimate and, for the variance components, the asymptotic
        standard error (paper, section 3); SVI and NUTS fits add arviz posterior
        summaries of the draws (sd, HDI, ESS, R-hat).
        """
        estimates = pd.Series(self.named_parameters(), name="estimate")
        if not self.draws:
            table = estimates.to_frame()
            standard_errors = self.diagnostics.get("variance_component_se")
            if standard_errors:
                table["se"] = pd.Series(standard_errors)
            return table
        import arviz as az

        labelled = self._labelled(MixtureParams(**self.draws), leading=2)
        stats = az.summary({name: value for name, value in labelled.items()}, kind="all", round_to="none")
        return pd.concat([estimates, stats], axis=1)

    def to_arviz(self):
        """Posterior draws as an ``arviz.InferenceData`` (SVI and NUTS fits)."""
        if not self.draws:
            raise ValueError(f"a {self.method!r} fit has no posterior draws; fit with method='svi' or 'nuts'")
        import arviz as az

        return az.from_dict(posterior=self._labelled(MixtureParams(**self.draws), leading=2))

    def _labelled(self, params, leading: int = 0) -> dict[str, np.ndarray]:
        return self.model.labelled_parameters(
            params, self.component_columns, self.mixing_columns, self.response_names, leading
        )

    # ---------------------------------------------------------- prediction
    def predict(self, data: TaskData | pd.DataFrame) -> np.ndarray:
        """Predictive means ``[n, p]`` for new rows; unseen tasks get the population answer."""
        if isinstance(data, pd.DataFrame):
            if self.schema is None:
                raise ValueError("this fit has no data schema; pass a TaskData")
            data = self.schema.transform(data, require_response=False)
        known = {name: i for i, name in enumerate(self.task_names)}
        rows = np.array([known.get(name, 0) for name in data.task_names], dtype=np.int32)
        seen = np.array([name in known for name in data.task_names])
        params = self.model.align_effects(_as_jax(self.params), jnp.asarray(rows), jnp.asarray(seen))
        design = self.model.design(data)
        return np.asarray(self.model.predict(params, design))

    # --------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary; the CLI's output file."""
        re = self.random_effects()
        out = {
            "format": _FORMAT,
            "model": {"type": type(self.model).__name__, **dataclasses.asdict(self.model)},
            "method": self.method,
            "loglik": float(self.loglik),
            "bic": float(self.bic),
            "converged": bool(self.converged),
            "n_iter": int(self.n_iter),
            "num_obs": int(self.num_obs),
            "mixing_coef": _tolist(self.params.mixing_coef),
            "component_coef": _tolist(np.squeeze(self.params.component_coef, -1)
                                      if len(self.response_names) == 1 else self.params.component_coef),
            "component_cov": _tolist(self.params.component_cov),
            "variance_components": {"mixing": _tolist(self.params.mixing_var),
                                    "component": _tolist(self.params.component_var)},
            "random_effects": {part: {str(k): _tolist(v) for k, v in frame.iterrows()}
                               for part, frame in re.items()},
            "params": _typed_arrays(self.params._asdict()),
            "task_names": list(self.task_names),
            "component_columns": list(self.component_columns),
            "mixing_columns": list(self.mixing_columns),
            "response_names": list(self.response_names),
            "schema": None if self.schema is None else self.schema.to_dict(),
            "trace": _tolist(self.trace),
            "diagnostics": to_jsonable(self.diagnostics),
            "timings": to_jsonable(self.timings),
        }
        if self.draws:
            out["draws"] = _typed_arrays(self.draws)
        return out

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (floats round-trip exactly)."""
        Path(path).write_text(json.dumps(self.to_dict(), allow_nan=True))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fit":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not an mtl_jax fit file (found {found!r}, expected format {_FORMAT!r})")
        config = dict(data["model"])
        model_cls, params_cls = _MODELS[config.pop("type")]
        for key, value in config.items():
            if isinstance(value, list):
                config[key] = tuple(value)
        params = params_cls(**_read_typed_arrays(data["params"]))
        return cls(
            model=model_cls(**config),
            method=data["method"],
            params=params,
            loglik=data["loglik"],
            bic=data["bic"],
            converged=data["converged"],
            n_iter=data["n_iter"],
            trace=np.asarray(data["trace"], dtype=float),
            task_names=tuple(data["task_names"]),
            component_columns=tuple(data["component_columns"]),
            mixing_columns=tuple(data["mixing_columns"]),
            response_names=tuple(data["response_names"]),
            schema=None if data["schema"] is None else Schema.from_dict(data["schema"]),
            num_obs=data["num_obs"],
            draws=_read_typed_arrays(data["draws"]) if "draws" in data else None,
            diagnostics=data["diagnostics"],
            timings=data["timings"],
        )

    @classmethod
    def load(cls, path: str | Path) -> "Fit":
        """Read a fit written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _tolist(value) -> Any:
    return np.asarray(value).tolist()


def _typed_arrays(arrays: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Arrays with their dtype, so that loading restores them bit for bit."""
    return {k: {"dtype": str(np.asarray(v).dtype), "value": _tolist(v)} for k, v in arrays.items()}


def _read_typed_arrays(stored: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v["value"], dtype=v["dtype"]) for k, v in stored.items()}


def _as_jax(params):
    return type(params)(*(jnp.asarray(leaf) for leaf in params))


def to_jsonable(value):
    """Nested dicts, lists and NumPy/JAX arrays or scalars as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    return value
