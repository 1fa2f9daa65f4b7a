"""mtl_jax: probabilistic multitask learning on JAX.

Public API::

    from mtl_jax import MixtureGLMM, TaskData, fit, Fit
    data = TaskData.from_csv("scores.csv", task="school", response="score", covariates=[...])
    result = fit(MixtureGLMM(num_components=2), data, method="em")   # or "svi", "nuts"
    result.summary(); result.predict(new_frame); result.score(new_frame); result.save("fit.json")
    selection = select_components(MixtureGLMM(num_components=1), data, components=range(1, 5))  # by BIC
    selection.table; selection.best
    people = PersonData.from_csv("ema.csv", person="user_id", labels="mood_Label")   # users as tasks
    net = fit(MTLNet(hidden=(32,)), people, method="map")                           # or "svi", "nuts"
    baseline = fit(PerTaskLogistic(penalty="l1"), people, method="map")             # also PooledLogistic, PerTaskLSSVM, STLNet
"""

from mtl_jax.data import DataError, PersonData, TaskData, data_dir, train_test_split_by_task
from mtl_jax.infer.fit import FitWarning, fit
from mtl_jax.infer.results import Fit
from mtl_jax.infer.selection import Selection, select_components
from mtl_jax.models import MODELS, model_class
from mtl_jax.data.sequences import SequenceData
from mtl_jax.models.hblr import HBLR
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureGLMM, MixtureParams, MixturePriors
from mtl_jax.models.baselines import PerTaskLogistic, PerTaskLSSVM, PooledLogistic, STLNet
from mtl_jax.models.mtl_net import MTLNet, PooledNet
from mtl_jax.models.mtmkl import MTMKL
from mtl_jax.models.sequence_lda import SequenceLDA, SequenceLDAParams, SequencePerTask, SequencePooled

__all__ = [
    "MODELS",
    "DataError",
    "Fit",
    "FitWarning",
    "HBLR",
    "MixtureDesign",
    "MixtureGLMM",
    "MixtureParams",
    "MixturePriors",
    "MTLNet",
    "MTMKL",
    "PerTaskLSSVM",
    "PerTaskLogistic",
    "PersonData",
    "PooledLogistic",
    "PooledNet",
    "STLNet",
    "Selection",
    "SequenceData",
    "SequenceLDA",
    "SequenceLDAParams",
    "SequencePerTask",
    "SequencePooled",
    "TaskData",
    "data_dir",
    "fit",
    "model_class",
    "select_components",
    "train_test_split_by_task",
]
__version__ = "0.2.0"
