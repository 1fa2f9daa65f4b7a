"""One result type for every model and inference backend: :class:`Fit`.

A ``Fit`` holds the model, the point estimate (EM/MAP estimate or posterior mean) as the
model's parameter pytree, posterior draws where the backend has any (the same pytree
with leading ``[chain, draw]`` axes), the score (marginal log-likelihood) and BIC at the
point estimate, convergence information, warnings, timings, the model's labels (task,
column and response names) and the data schema needed to encode new data. It knows no
model: everything model-specific goes through the protocol of
:mod:`mtl_jax.models.protocol`.

Saved fits are plain JSON (no pickle): every parameter leaf is stored under its pytree key
path with its dtype and shape, and rebuilt on load into the structure the model gives
(:meth:`params_like`), so any pytree, nested equinox modules included, round-trips bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mtl_jax.data import Schema, schema_from_dict
from mtl_jax.models.protocol import model_config, model_from_config


class BackendResult(NamedTuple):
    """What a backend hands back to :func:`mtl_jax.fit`.

    Attributes:
        params: point estimate (EM estimate or posterior mean), per training task.
        converged: backend-specific convergence flag.
        n_iter: EM iterations, SVI steps or NUTS samples per chain.
        trace: per-iteration objective (EM) or loss (SVI); may be empty.
        draws: posterior draws, the parameter pytree with leading axes ``[chain, draw]``.
        diagnostics: anything else worth keeping (restart scores, divergences ...).
        loglik: the model's score at ``params`` when the backend already has it;
            ``None``: :func:`mtl_jax.fit` computes it.
        iid_draws: the draws are independent (a variational guide's), so R-hat and ESS
            do not apply.
    """

    params: Any
    converged: bool
    n_iter: int
    trace: np.ndarray
    draws: Any = None
    diagnostics: dict[str, Any] = {}
    loglik: float | None = None
    iid_draws: bool = False


FORMAT = "mtl_jax.fit/2"


@dataclasses.dataclass
class Fit:
    """A fitted multitask model.

    Attributes:
        model: the static model description.
        method: the backend (``"em"``, ``"svi"``, ``"nuts"``, ...).
        params: point estimate (pytree of numpy arrays); task parts are per training task.
        loglik: the model's score at ``params`` (marginal log-likelihood).
        bic: ``-2 loglik + k log n``.
        converged: the backend's convergence flag, false whenever the fit is not
            numerically sound (non-finite score, failed checks); for NUTS, all relabelled
            R-hat of :meth:`summary` below 1.05.
        n_iter: EM iterations, SVI steps or NUTS samples per chain.
        trace: EM stopping quantity per iteration, or the SVI loss per step.
        labels: the model's names (``task_names``, columns, responses ...).
        schema: how the training data were encoded (for new data); ``None`` for raw designs.
        num_obs: training observations.
        draws: posterior draws (``[chain, draw, ...]`` leaves) or ``None``.
        iid_draws: the draws are a guide's independent draws (no R-hat/ESS).
        task_tables: the model's per-task tables at ``params`` (its optional
            ``task_tables``), each indexed by task name: e.g. ``component_sd``,
            ``mixing_sd``, ``class_probabilities``; empty for models without them.
        diagnostics: backend- and model-specific numbers (standard errors, R-hat, ...).
        warnings: problems found in the fit, also issued as :class:`FitWarning`.
        timings: seconds spent: ``fit`` (the backend) and ``score`` (scoring, checks,
            standard errors, task tables), and the same wall time split into ``compile``
            (JAX tracing, lowering and XLA compilation, or reading the persistent cache)
            and ``run`` (everything else).
    """

    model: Any
    method: str
    params: Any
    loglik: float
    bic: float
    converged: bool
    n_iter: int
    trace: np.ndarray
    labels: dict[str, Any]
    schema: Schema | None = None
    num_obs: int = 0
    draws: Any = None
    iid_draws: bool = False
    task_tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def task_names(self) -> tuple[str, ...]:
        """Training task labels, index = task id."""
        return tuple(self.labels["task_names"])

    @property
    def response_names(self) -> tuple[str, ...]:
        """Response column names (for the ``pred_<response>`` columns)."""
        return tuple(self.labels.get("response_names", ("y",)))

    # ------------------------------------------------------------ reading
    def named_parameters(self) -> dict[str, float]:
        """Population-level parameters by readable name, e.g. ``w[1, x1]``."""
        return {name: float(value) for name, value in self.model.named_parameters(self.params, self.labels).items()}

    def random_effects(self) -> dict[str, pd.DataFrame]:
        """Per-task effects as DataFrames (models with task effects)."""
        return self.model.random_effects(self.params, self.labels)

    def summary(self) -> pd.DataFrame:
        """One row per population-level parameter.

        Point fits give the estimate and, where the model provides them, asymptotic
        standard errors (``se``). Fits with draws add arviz posterior summaries: mean, sd
        and HDI for a guide's independent draws; with ESS and R-hat for MCMC chains (the
        draws are already relabelled, so R-hat is the one ``converged`` uses).
        """
        estimates = pd.Series(self.named_parameters(), name="estimate")
        if self.draws is None:
            table = estimates.to_frame()
            standard_errors = self.diagnostics.get("standard_errors")
            if standard_errors:
                table["se"] = pd.Series(standard_errors, dtype=float)
            return table
        posterior = posterior_table(self.model, self.draws, self.labels, self.iid_draws)
        if set(posterior.index) != set(estimates.index):
            raise ValueError(f"posterior summaries {sorted(set(posterior.index) ^ set(estimates.index))} do not match the estimates")
        return estimates.to_frame().join(posterior)

    def to_arviz(self):
        """Posterior draws as an ``arviz.InferenceData`` (fits with draws)."""
        if self.draws is None:
            raise ValueError(f"a {self.method!r} fit has no posterior draws; fit with method='svi' or 'nuts'")
        import arviz as az

        return az.from_dict(posterior=self.model.named_parameters(self.draws, self.labels, leading=2))

    # ---------------------------------------------------------- prediction
    def encode(self, data, *, require_response: bool = False):
        """The model's design for new rows, encoded from what the fit stored (labels, schema).

        ``data`` is a DataFrame (or data the model encodes itself); the model's
        ``data_from_frame`` keeps the ids of training tasks and numbers unseen tasks after
        them, so the model answers them at population level.
        """
        return self.model.design(self._new_data(data, require_response))

    def predict(self, data) -> np.ndarray:
        """Predictive means for new rows, in their input order; unseen tasks get the population-level answer."""
        return self._per_input_row(self.model.predict, data, require_response=False)

    def predict_draws(self, data) -> np.ndarray:
        """Predictive means under every posterior draw, ``[draws, rows, ...]`` (SVI and NUTS fits).

        Their spread is the posterior uncertainty of :meth:`predict` (e.g. intervals of a
        predicted probability); draws of all chains are stacked.

        Raises:
            ValueError: for a point fit (EM, MAP), which has no draws.
        """
        if self.draws is None:
            raise ValueError(f"a {self.method!r} fit has no posterior draws; fit with method='svi' or 'nuts'")
        encoded = self._new_data(data, require_response=False)
        design = self.model.design(encoded)
        draws = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf).reshape((-1,) + leaf.shape[2:]), self.draws)
        values = np.asarray(jax.lax.map(lambda params: self.model.predict(params, design), draws))
        rows = getattr(encoded, "source_row", None)
        return values if rows is None else values[:, np.asarray(rows)]

    def score(self, data) -> np.ndarray:
        """Natural-log predictive density of each input row ``[n]`` (unseen tasks: population)."""
        return self._per_input_row(self.model.log_predictive, data, require_response=True)

    def score_table(self, data) -> pd.DataFrame:
        """Per input row: ``loglik`` (as :meth:`score`), then the model's optional ``score_columns``.

        One encoding of ``data``; every column is mapped to the input rows like ``loglik``
        (the CLI's ``score`` writes this table after the input columns).
        """
        encoded = self._new_data(data, require_response=True)
        design, params = self.model.design(encoded), _as_jax(self.params)
        columns = {"loglik": self.model.log_predictive(params, design)}
        if hasattr(self.model, "score_columns"):
            columns.update(self.model.score_columns(params, design))
        return pd.DataFrame({name: _input_rows(values, encoded) for name, values in columns.items()})

    def _new_data(self, data, require_response: bool):
        """``data`` encoded by the model with the fit's labels and schema."""
        return self.model.data_from_frame(data, labels=self.labels, schema=self.schema,
                                          require_response=require_response)

    def _per_input_row(self, answer, data, require_response: bool) -> np.ndarray:
        """``answer(params, design)`` per input row: data that store rows once (deduplicated,
        padded) carry ``source_row``, the stored row of each input row."""
        encoded = self._new_data(data, require_response)
        return _input_rows(answer(_as_jax(self.params), self.model.design(encoded)), encoded)

    # --------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary; the CLI's output file.

        Per-task tables are kept under ``"task_tables"`` as ``{name: {"columns": [...],
        "rows": {task: [values ...]}}}``; ``class_probabilities``, when present, is also
        written on its own as ``"class_probabilities": {task: [p_1, ..., p_g]}``.
        """
        out = {
            "format": FORMAT,
            "model": model_config(self.model),
            "method": self.method,
            "loglik": _finite_or_none(self.loglik),
            "bic": _finite_or_none(self.bic),
            "converged": bool(self.converged),
            "n_iter": int(self.n_iter),
            "num_obs": int(self.num_obs),
            **to_jsonable(self.model.report(self.params, self.labels)),
            "task_names": list(self.task_names),
            "labels": to_jsonable(self.labels),
            "schema": None if self.schema is None else self.schema.to_dict(),
            "params": pytree_to_json(self.params),
            "trace": to_jsonable(self.trace),
            "iid_draws": bool(self.iid_draws),
            "task_tables": {name: _table_to_json(table) for name, table in self.task_tables.items()},
            "diagnostics": to_jsonable(self.diagnostics),
            "warnings": list(self.warnings),
            "timings": to_jsonable(self.timings),
        }
        if "class_probabilities" in self.task_tables:
            out["class_probabilities"] = out["task_tables"]["class_probabilities"]["rows"]
        if self.draws is not None:
            out["draws"] = pytree_to_json(self.draws)
        return out

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (floats round-trip exactly).

        Raises:
            ValueError: for a fit whose estimate or score is not finite: nothing NaN is
                written as a result.
        """
        leaves = jax.tree_util.tree_leaves(self.params)
        if not (math.isfinite(self.loglik) and all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)):
            raise ValueError("refusing to save a fit with a non-finite estimate or log-likelihood: "
                             + ("; ".join(self.warnings) or "the fit failed numerically"))
        Path(path).write_text(json.dumps(self.to_dict(), allow_nan=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fit":
        """Inverse of :meth:`to_dict` (files written before ``task_tables`` load with none)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not an mtl_jax fit file (found {found!r}, expected format {FORMAT!r})")
        model = model_from_config(data["model"])
        labels = data["labels"]
        skeleton = model.params_like(labels)
        return cls(
            model=model,
            method=data["method"],
            params=pytree_from_json(data["params"], skeleton),
            loglik=data["loglik"],
            bic=data["bic"],
            converged=data["converged"],
            n_iter=data["n_iter"],
            trace=np.asarray(data["trace"], dtype=float),
            labels=labels,
            schema=None if data["schema"] is None else schema_from_dict(data["schema"]),
            num_obs=data["num_obs"],
            draws=pytree_from_json(data["draws"], skeleton) if "draws" in data else None,
            iid_draws=data["iid_draws"],
            task_tables={name: _table_from_json(table) for name, table in data.get("task_tables", {}).items()},
            diagnostics=data["diagnostics"],
            warnings=data["warnings"],
            timings=data["timings"],
        )

    @classmethod
    def load(cls, path: str | Path) -> "Fit":
        """Read a fit written by :meth:`save` (JSON only; nothing is unpickled)."""
        try:
            content = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a JSON fit file: {error}") from None
        return cls.from_dict(content)


def posterior_table(model, draws, labels: dict, iid_draws: bool) -> pd.DataFrame:
    """arviz summary of the named population parameters of ``[chain, draw, ...]`` draws.

    Independent (guide) draws get the statistics only; MCMC chains also ESS and R-hat.
    """
    import arviz as az

    named = model.named_parameters(draws, labels, leading=2)
    return az.summary(named, kind="stats" if iid_draws else "all", round_to="none")


def float_dtype(tree):
    """The floating dtype of a design pytree: that of its first floating leaf.

    Integer leaves (task ids, token ids) are skipped; a tree without floating leaves gets
    JAX's default float.
    """
    floats = [leaf.dtype for leaf in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return floats[0] if floats else jnp.result_type(float)


def pytree_to_json(tree) -> list[dict[str, Any]]:
    """Leaves of any pytree as ``{"path", "dtype", "shape", "value"}`` records."""
    records = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        records.append({"path": jax.tree_util.keystr(path), "dtype": str(array.dtype),
                        "shape": list(array.shape), "value": array.tolist()})
    return records


def pytree_from_json(records: list[dict[str, Any]], skeleton):
    """Inverse of :func:`pytree_to_json` into the structure of ``skeleton`` (leaf values ignored).

    Raises:
        ValueError: when the stored paths do not match the skeleton's.
    """
    stored = {record["path"]: record for record in records}
    paths, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    names = [jax.tree_util.keystr(path) for path, _ in paths]
    missing = [name for name in names if name not in stored]
    if missing or len(names) != len(stored):
        raise ValueError(f"the stored parameters do not match the model (missing {missing}, "
                         f"stored {sorted(stored)})")
    leaves = [np.asarray(stored[name]["value"], dtype=stored[name]["dtype"]).reshape(stored[name]["shape"])
              for name in names]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _table_to_json(table: pd.DataFrame) -> dict[str, Any]:
    """A per-task table as ``{"columns": [...], "rows": {task: [values ...]}}`` (non-finite -> None)."""
    return {"columns": [str(column) for column in table.columns],
            "rows": {str(task): to_jsonable(row) for task, row in zip(table.index, table.to_numpy(dtype=float))}}


def _table_from_json(table: dict[str, Any]) -> pd.DataFrame:
    """Inverse of :func:`_table_to_json`: float columns indexed by task name (None -> NaN)."""
    rows = table["rows"]
    values = np.asarray(list(rows.values()), dtype=float).reshape(len(rows), len(table["columns"]))
    return pd.DataFrame(values, index=pd.Index(list(rows), name="task"), columns=table["columns"])


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


def _as_jax(params):
    return jax.tree_util.tree_map(jnp.asarray, params)


def _input_rows(values, encoded) -> np.ndarray:
    """Per-stored-row ``values`` per input row: through ``encoded.source_row`` where the data
    store rows once (deduplicated, padded), else unchanged."""
    values, rows = np.asarray(values), getattr(encoded, "source_row", None)
    return values if rows is None else values[np.asarray(rows)]


def to_jsonable(value, *, keep_nonfinite: bool = False):
    """Nested dicts, lists and NumPy/JAX arrays or scalars as plain JSON values.

    Non-finite floats become ``None`` (strict JSON), unless ``keep_nonfinite``: then they
    stay floats, which Python's :mod:`json` writes as ``NaN``/``Infinity`` and reads back
    (the study journals of :mod:`mtl_jax.experiments.checkpoint` need the exact values).
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, keep_nonfinite=keep_nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, keep_nonfinite=keep_nonfinite) for v in value]
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        # .tolist() of a 0-d array is a scalar
        return to_jsonable(np.asarray(value).tolist(), keep_nonfinite=keep_nonfinite)
    if isinstance(value, float) and not math.isfinite(value) and not keep_nonfinite:
        return None
    return value
