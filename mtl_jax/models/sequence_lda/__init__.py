"""Sequential LDA (Crawford & Pineau): tasks are mixtures of shared sequence generators.

:class:`SequenceLDA` (registered as ``"sequence-lda"``) in :mod:`.model`, its variational
EM in :mod:`.vem`, the topics' generators in :mod:`.generators`.
"""

from mtl_jax.models.sequence_lda.model import SequenceLDA, SequenceLDAParams

__all__ = ["SequenceLDA", "SequenceLDAParams"]
