r"""What the single-task and pooled baselines share (``"logistic"``, ``"pooled-logistic"``,
``"lssvm"``, ``"stl-net"``): parameters, row selection, checks and the protocol plumbing.

All four take per-person data (:class:`~mtl_jax.data.personal.PersonData`: flat rows
``X [n, q]``, ``y [n]``, ``weight [n]``, ``task [n]``, ``split [n]``), fit with
``method="map"`` and share the conventions of ``"mtl-net"``:

* a row with ``weight 0`` (a missing label) contributes nothing to any fit, score or
  cross-validation loss;
* the convex baselines fit on the labelled rows of the training **and** validation
  splits (``split`` 0 and 1); the test split (2) never enters a fit;
* :meth:`score` is the log-likelihood of the observed labels of splits 0 and 1, and
  :meth:`num_observations` counts those labels (so BIC uses the rows it scores);
* :meth:`predict` gives ``[samples, L]``, the probability of the positive label
  (``"stl-net"``: the mean for a Gaussian task); :meth:`log_predictive` ``[samples]``
  the log-likelihood of a sample's observed labels.

**Bad inputs.** ``"logistic"``, ``"pooled-logistic"`` and ``"lssvm"`` are classifiers:
a task whose label is not binary raises :class:`~mtl_jax.data.tabular.DataError` naming
it, and so does a task with a **single class** (or no label at all) among its labelled
training and validation rows (the pooled model: all rows together) -- a per-task
classifier of such a task is undefined (its intercept would run off to infinity); drop
the task or fit ``"pooled-logistic"``. (Inside cross-validation a fold's training part
may hold one class; the solvers keep such a fit finite.) ``"stl-net"`` also fits
Gaussian tasks, and a single-class binary task simply learns to predict its class (as
far as the L2 penalty and early stopping let its bias grow).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from mtl_jax.data.personal import PersonData
from mtl_jax.data.tabular import DataError
from mtl_jax.models.person_model import PersonModel

DEFAULT_C = (0.01, 0.1, 1.0, 10.0, 100.0)
"""The default grid of ``C`` of the logistic baselines."""

PENALTIES = ("l2", "l1")
SELECTIONS = ("task", "global")
HIGHEST = lax.Precision.HIGHEST


# ------------------------------------------------------------------------ parameters
class LogisticParams(NamedTuple):
    """Per-task (or pooled, ``K = 1``) logistic regressions.

    Attributes:
        intercept: :math:`b_k` ``[K]``.
        beta: :math:`\\beta_k` ``[K, q]``.
        C: the ``C`` each task was fitted with ``[K]`` (chosen by cross-validation).
    """

    intercept: Array
    beta: Array
    C: Array


class LSSVMParams(NamedTuple):
    """Per-task LS-SVMs with Platt scaling; the support vectors are part of the parameters.

    Attributes:
        support: each task's training rows ``[K, m, q]`` (padded with zeros; ``m`` the
            largest number of labelled training + validation rows of a task).
        alpha: support values ``[K, m]`` (0 on padding).
        b: biases ``[K]``.
        platt_slope: :math:`a_k` ``[K]``.
        platt_intercept: :math:`c_k` ``[K]``.
        bandwidth: the RBF bandwidth :math:`h` ``[]`` (1 and unused for the linear kernel).
    """

    support: Array
    alpha: Array
    b: Array
    platt_slope: Array
    platt_intercept: Array
    bandwidth: Array


class STLNetParams(eqx.Module):
    """``K`` independent nets, stacked: every leaf has a leading task axis.

    Attributes:
        layers: hidden layers (``eqx.nn.Linear`` with ``weight [K, out, in]``, ``bias [K, out]``).
        head: output layer (``weight [K, 1, H]``, ``bias [K, 1]``).
        log_noise_sd: :math:`s_k` ``[K]``, the log noise sd of a Gaussian task (unused by binary ones).
    """

    layers: tuple[eqx.nn.Linear, ...]
    head: eqx.nn.Linear
    log_noise_sd: Float[Array, " K"]

    @property
    def num_tasks(self) -> int:
        """``K``, the training tasks."""
        return self.log_noise_sd.shape[0]


# --------------------------------------------------------------------------- helpers
def person_labels(data: PersonData) -> dict[str, Any]:
    return {"task_names": list(data.task_names), "columns": list(data.columns),
            "response_names": list(data.schema.labels),
            "task_binary": [bool(b) for b in np.asarray(data.task_binary)]}


def fit_rows(design: PersonData) -> np.ndarray:
    """Labelled rows of the training and validation splits ``[n]`` (bool, host)."""
    return (np.asarray(design.weight) > 0) & (np.asarray(design.split) <= 1)


def named_list(names) -> str:
    names = [repr(str(name)) for name in names]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def require_binary(design: PersonData, model_name: str) -> None:
    """DataError naming the tasks whose label is not binary."""
    bad = np.flatnonzero(~np.asarray(design.task_binary)[: design.num_tasks])
    if bad.size:
        raise DataError(f"{model_name} is a classifier of binary (0/1) labels; task(s) "
                        f"{named_list(np.asarray(design.task_names, dtype=object)[bad])} "
                        f"{'is' if bad.size == 1 else 'are'} not binary")


def require_two_classes(design: PersonData, rows: np.ndarray, task: np.ndarray, names, model_name: str) -> None:
    """DataError naming the tasks with fewer than two classes among ``rows``."""
    K = len(names)
    positive = np.asarray(design.y)[rows] > 0.5
    pos = np.bincount(task[rows], weights=positive, minlength=K)
    neg = np.bincount(task[rows], weights=~positive, minlength=K)
    bad = np.flatnonzero((pos == 0) | (neg == 0))
    if bad.size:
        detail = "; ".join(f"{names[k]!r}: {int(pos[k])} positive, {int(neg[k])} negative" for k in bad[:5])
        raise DataError(f"{model_name} needs both classes among each task's labelled training and validation "
                        f"rows; {bad.size} task(s) {'has' if bad.size == 1 else 'have'} fewer ({detail}"
                        f"{' ...' if bad.size > 5 else ''}). Drop such tasks, or fit pooled-logistic.")


def binary_rows(design: PersonData):
    """Whether each row's task is binary (unseen tasks: their entry of ``task_binary``)."""
    known = jnp.where(design.task < design.task_binary.shape[0], design.task, 0)
    return design.task_binary[known]


def masked_y(design: PersonData):
    return jnp.where(design.weight > 0, design.y, 0.0)


def bernoulli_log_likelihood(log_p1, log_p0, y):
    r""":math:`y\log p + (1-y)\log(1-p)` from :math:`\log p` and :math:`\log(1-p)`."""
    return y * log_p1 + (1.0 - y) * log_p0


def population_branch(any_unseen, compute, like):
    """``compute()`` when some row is unseen (``lax.cond``), else zeros shaped like ``like``."""
    return lax.cond(any_unseen, compute, lambda: jax.tree_util.tree_map(jnp.zeros_like, like))


class RowArrays(NamedTuple):
    """The arrays of :class:`PersonData` the answers need (what the jitted answers take)."""

    X: Array
    y: Array
    weight: Array
    task: Array
    task_binary: Array


def row_arrays(design: PersonData) -> RowArrays:
    return RowArrays(design.X, design.y, design.weight, design.task, design.task_binary)


@functools.partial(jax.jit, static_argnames=("model", "method"))
def jitted(model, method: str, params, arguments):
    """``getattr(model, method)(params, arguments)``, compiled once per model (a hashable
    frozen dataclass) and shapes; ``arguments`` a pytree of arrays (a :class:`RowArrays`)."""
    return getattr(model, method)(params, arguments)


class PersonBaseline(PersonModel):
    """What the baselines share: per-person data, row answers, scores and data options.

    A subclass gives ``_row_answers(params, rows) -> (mean [n], loglik [n], ...)`` (``rows``
    a :class:`RowArrays`; more per-row outputs may follow): per row the predictive mean and
    the log-likelihood of its label (rows of unseen tasks answered at population level,
    masked rows included: they are weighted out here). It runs jitted, compiled once per
    model and shapes (:func:`jitted`).
    """

    name: ClassVar[str]

    def _answers(self, params, design: PersonData):
        return jitted(self, "_row_answers", params, row_arrays(design))

    # ------------------------------------------------------------------ data
    def labels(self, data: PersonData) -> dict[str, Any]:
        """Task names, feature columns, label (response) names, which tasks are binary."""
        return person_labels(data)

    def num_observations(self, design: PersonData) -> int:
        """Observed labels of the training and validation splits (the rows :meth:`score` sums)."""
        return int(np.sum(fit_rows(design)))

    # ------------------------------------------------------------ likelihood
    def score(self, params, design: PersonData) -> Float[Array, ""]:
        """Log-likelihood of the observed labels of splits 0 and 1 (test rows and weight-0 rows excluded)."""
        loglik = self._answers(params, design)[1]
        weight = design.weight * (design.split < 2)
        return jnp.sum(jnp.where(weight > 0, weight * loglik, 0.0))

    def predict(self, params, design: PersonData) -> Float[Array, "samples L"]:
        """Per sample and label: the probability of the positive label (a Gaussian task: the mean)."""
        mean = self._answers(params, design)[0]
        return mean.reshape(-1, design.num_labels)

    def log_predictive(self, params, design: PersonData) -> Float[Array, " samples"]:
        """Per sample: the log-likelihood of its observed labels (0 when none is observed)."""
        loglik = self._answers(params, design)[1]
        values = jnp.where(design.weight > 0, design.weight * loglik, 0.0)
        return values.reshape(-1, design.num_labels).sum(axis=1)


