"""Sequential LDA (Crawford & Pineau): tasks are mixtures of shared sequence generators.

:class:`SequenceLDA` (registered as ``"sequence-lda"``) in :mod:`.model`, its variational
EM in :mod:`.vem`, the topics' generators in :mod:`.generators`, what the sequence
models share in :mod:`.base`, and the paper's two baselines in :mod:`.baselines`:
:class:`SequencePooled` (``"sequence-pooled"``, one generator for all tasks) and
:class:`SequencePerTask` (``"sequence-per-task"``, one generator per task).
"""

from mtl_jax.models.sequence_lda.baselines import PerTaskParams, SequencePerTask, SequencePooled
from mtl_jax.models.sequence_lda.model import SequenceLDA, SequenceLDAParams

__all__ = ["PerTaskParams", "SequenceLDA", "SequenceLDAParams", "SequencePerTask", "SequencePooled"]
