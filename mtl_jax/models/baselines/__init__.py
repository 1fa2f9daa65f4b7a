"""Single-task baselines for multitask learning: one model per task, fitted independently.

:mod:`mtl_jax.models.baselines.solvers` holds the pure-JAX solvers (L2- and L1-penalised
logistic regression, least-squares SVM) for one task, written once and ``jax.vmap``-ed
over tasks gathered into padded blocks (``pad_by_task`` / ``unpad``).

:mod:`.logistic`, :mod:`.lssvm` and :mod:`.stl_net` put them on the model protocol for
per-person data (:class:`~mtl_jax.data.personal.PersonData`), each fitted with
``method="map"``; :mod:`.common` holds what they share:

* ``"logistic"`` (:class:`PerTaskLogistic`): one L2- or L1-penalised logistic regression
  per task, ``C`` chosen by within-task cross-validation (per task or globally); an
  unseen task gets the average of the task coefficient vectors;
* ``"pooled-logistic"`` (:class:`PooledLogistic`): one regression for all tasks;
* ``"lssvm"`` (:class:`PerTaskLSSVM`): one least-squares SVM per task (linear or RBF
  kernel), probabilities by Platt scaling, raw decision scores as a score column; an
  unseen task gets the average of the task probabilities;
* ``"stl-net"`` (:class:`STLNet`): one small net per task, stacked and trained together
  by the generic optax loop with nothing shared; an unseen task gets the average of the
  task predictions.
"""

from mtl_jax.models.baselines.common import LogisticParams, LSSVMParams, STLNetParams
from mtl_jax.models.baselines.logistic import PerTaskLogistic, PooledLogistic
from mtl_jax.models.baselines.lssvm import PerTaskLSSVM
from mtl_jax.models.baselines.stl_net import STLNet

__all__ = ["LSSVMParams", "LogisticParams", "PerTaskLSSVM", "PerTaskLogistic", "PooledLogistic", "STLNet",
           "STLNetParams"]
