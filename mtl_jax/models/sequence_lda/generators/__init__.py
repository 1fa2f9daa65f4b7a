"""Topics of Sequential LDA: distributions over sequences shared by all tasks.

Each generator is a frozen dataclass of static settings with pure functions over a
NamedTuple of log-probabilities with a leading topic axis ``[K, ...]``:

``init(key, num_topics) -> params``
    Random (Dirichlet) topics.
``log_prob(params_one_topic, x [L], length) -> scalar``
    Natural-log probability of one sequence under one topic (``vmap`` over both);
    positions ``>= length`` are ignored and ``length == 0`` (a padding row) scores 0.
``log_probs(params_one_topic, x [N, L], lengths [N]) -> [N]`` (:class:`.common.Generator`)
    The same for a batch: ``vmap`` of ``log_prob``, or a faster batched pass (the HMMs).
``m_step(params, x [N, L], lengths [N], weights [N, K]) -> params``
    Maximises :math:`\\sum_n \\sum_k w_{nk} \\log P_k(x_n)` plus the Dirichlet prior (closed
    form, or one Baum-Welch step for the HMMs); weights include multiplicities.
``log_prior(params) -> scalar``
    The log of the prior the M-step's MAP maximises (up to a constant), so that
    variational EM can report an objective that never decreases.
``next_symbol_log_probs(params_one_topic, tokens [L], length) -> [L + 1, V + 1]``
    Discrete generators: next-outcome log-distribution (``V`` symbols, then HALT) after
    each prefix.

``sample_topics(num_topics, dtype) -> params`` (:class:`.common.Generator`)
    The topics as NumPyro sample sites (one per field, named without ``log_``) under
    their priors (``field_prior``), for the SVI and NUTS backends.

``observations`` (class attribute) names the :class:`mtl_jax.data.SequenceData` array
a generator reads: ``"tokens"`` or ``"values"``, ``params_type`` its parameter NamedTuple;
``num_parameters`` counts the free parameters of one topic.
"""

from mtl_jax.models.sequence_lda.generators.categorical import Categorical, CategoricalParams
from mtl_jax.models.sequence_lda.generators.gaussian_hmm import GaussianHMM, GaussianHMMParams
from mtl_jax.models.sequence_lda.generators.hmm import HMM, HMMParams
from mtl_jax.models.sequence_lda.generators.markov import Markov, MarkovParams

GENERATORS: dict[str, type] = {
    "categorical": Categorical,
    "markov": Markov,
    "hmm": HMM,
    "gaussian-hmm": GaussianHMM,
}
"""Generator classes by name."""

__all__ = [
    "GENERATORS",
    "HMM",
    "Categorical",
    "CategoricalParams",
    "GaussianHMM",
    "GaussianHMMParams",
    "HMMParams",
    "Markov",
    "MarkovParams",
]
