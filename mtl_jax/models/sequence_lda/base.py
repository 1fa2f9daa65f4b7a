r"""What the sequence models share: generator settings, data, parameter names, scores, CLI.

:class:`SequenceModel` is a mixin of the frozen model dataclasses that fit the generators
of :mod:`.generators` to :class:`mtl_jax.data.SequenceData`: Sequential LDA
(:mod:`.model`) and its two baselines (:mod:`.baselines`). Its methods read the fields

``generator``, ``num_states``, ``halting``, ``pseudo_count``
    the generator (a name of :data:`GENERATORS`), its hidden states (``hmm``,
    ``gaussian-hmm``), whether Markov/HMM generators model the end of a sequence, and its
    Dirichlet (MAP) pseudo-count;
``task_column``, ``sequence_column``, ``tokens``
    how a CSV frame is read (one sequence string per row);

and give the protocol methods these models have in common (:meth:`design`,
:meth:`labels`, :meth:`num_observations`, :meth:`score_columns`, the data options of the
command line) plus helpers for naming and reporting generator parameters. A model adds
``next_symbol_log_probs(params, design) -> [S, L + 1, V + 1]``, from which
:meth:`score_columns` counts the next outcomes its argmax gets right.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, PRNGKeyArray

from mtl_jax.data.sequences import SequenceData
from mtl_jax.data.tabular import DataError
from mtl_jax.infer.program_cache import cached_program
from mtl_jax.models.sequence_lda import prediction
from mtl_jax.models.sequence_lda.generators import GENERATORS, HMM, Categorical, GaussianHMM, Markov

STATE_GENERATORS = ("hmm", "gaussian-hmm")
"""Generators with hidden states (they need ``num_states``)."""


def readable_fields(generators) -> dict[str, np.ndarray]:
    """A generator's fields as numpy arrays named without ``log_``, ``log_`` fields exponentiated.

    ``log_trans -> trans`` (probabilities), ``log_var -> var`` (variances), ``mean`` as is;
    any leading axes (topics, tasks, draws) are kept. Host (numpy) function.
    """
    return {field.removeprefix("log_"): np.exp(np.asarray(value)) if field.startswith("log_") else np.asarray(value)
            for field, value in generators._asdict().items()}


class SequenceModel:
    """Mixin of the sequence models (fields in the module docstring)."""

    name: ClassVar[str]

    def check_generator(self) -> None:
        """Validates the generator settings (called by the models' ``__post_init__``).

        Raises:
            ValueError: for an unknown generator, a state generator without
                ``num_states >= 1``, or a negative ``pseudo_count``.
        """
        if self.generator not in GENERATORS:
            raise ValueError(f"unknown generator {self.generator!r}; choose one of {sorted(GENERATORS)}")
        if self.generator in STATE_GENERATORS and (self.num_states is None or self.num_states < 1):
            raise ValueError(f"generator {self.generator!r} needs num_states >= 1, got {self.num_states}")
        if self.pseudo_count < 0:
            raise ValueError(f"pseudo_count must be >= 0, got {self.pseudo_count}")

    # ------------------------------------------------------------ generator
    def make_generator(self, alphabet):
        """The generator for ``alphabet`` (``None`` for real-valued data).

        Raises:
            ValueError: when the generator reads the other kind of data.
        """
        a, halting = self.pseudo_count, self.halting
        observations = GENERATORS[self.generator].observations
        if (alphabet is None) != (observations == "values"):
            kind = "real-valued" if alphabet is None else "discrete (tokens)"
            hint = " (real-valued sequences: tokens='numbers', or SequenceData.from_long)" if alphabet is not None else ""
            raise ValueError(f"generator {self.generator!r} reads {observations}, but the data are {kind}{hint}")
        if self.generator == "gaussian-hmm":
            return GaussianHMM(self.num_states, halting, a)
        V = len(alphabet)
        if self.generator == "categorical":
            return Categorical(V, a)
        if self.generator == "markov":
            return Markov(V, halting, a)
        return HMM(V, self.num_states, halting, a)

    def generator_for(self, design: SequenceData):
        """The generator for a design (its static alphabet)."""
        return self.make_generator(design.alphabet)

    def init_generators(self, key: PRNGKeyArray, design: SequenceData, count: int):
        """``count`` stacked random generators (the generator's ``init``) in the design's float dtype.

        The generators draw in JAX's default float; a float32 design under ``jax_enable_x64``
        would otherwise start EM from float64 generators.
        """
        generators = self.generator_for(design).init(key, count)
        return jax.tree_util.tree_map(lambda leaf: leaf.astype(design.counts.dtype), generators)

    def zero_generators(self, labels: dict, count: int):
        """Zeros shaped like ``count`` stacked generators for the labels' alphabet (a ``params_like`` skeleton).

        The shapes come from ``jax.eval_shape`` of the generator's ``init``, so nothing
        random is drawn or compiled.
        """
        generator = self.make_generator(labels.get("alphabet"))
        shapes = jax.eval_shape(lambda key: generator.init(key, count), jax.random.key(0))
        return jax.tree_util.tree_map(lambda shape: jnp.zeros(shape.shape, shape.dtype), shapes)

    def observed(self, design: SequenceData) -> Array:
        """The design's array the generator reads: ``tokens [S, L]`` or ``values [S, L]``."""
        return getattr(design, self.generator_for(design).observations)

    # --------------------------------------------------------------- data
    def design(self, data) -> SequenceData:
        """A :class:`SequenceData` (checked against the generator) without its ``source_row``.

        Dropping ``source_row`` (one entry per input row, not bucketed) keeps compiled
        code dependent on the bucketed shapes only.

        Raises:
            ValueError: for other data, or data of the wrong kind for the generator.
        """
        if not isinstance(data, SequenceData):
            raise ValueError(f"{self.name} needs a SequenceData, got {type(data).__name__}")
        self.make_generator(data.alphabet)
        return dataclasses.replace(data, source_row=None)

    def labels(self, data) -> dict[str, Any]:
        """``task_names`` and ``alphabet`` (``None`` for real-valued data)."""
        return {"task_names": list(data.task_names),
                "alphabet": None if data.alphabet is None else list(data.alphabet)}

    def num_observations(self, design: SequenceData) -> int:
        """The number of sequences (multiplicities included)."""
        return int(round(float(jnp.sum(design.counts))))

    # -------------------------------------------------------------- scores
    def require_tokens(self, design: SequenceData) -> None:
        """Raises ``ValueError`` for real-valued data (no symbols to predict)."""
        if design.alphabet is None:
            raise ValueError(f"generator {self.generator!r} models real values; next-symbol prediction needs tokens")

    @cached_program(static_argnames="self")
    def score_columns(self, params, design: SequenceData) -> dict[str, Array]:
        """Per row: ``next_correct`` / ``next_total``, next outcomes the predictive argmax gets right.

        The argmax of the model's ``next_symbol_log_probs`` over the prefixes
        ``j = 0 .. length`` (``length + 1`` outcomes, the last one HALT) for Markov/HMM
        generators with halting, ``j = 0 .. length - 1`` for generators without a HALT
        outcome (categorical, ``halting=False``); see
        :func:`.prediction.next_outcome_hits`. Real-valued data: no columns.
        """
        if design.alphabet is None:
            return {}
        halting = self.halting and self.generator != "categorical"
        correct, total = prediction.next_outcome_hits(self.next_symbol_log_probs(params, design),
                                                      design.tokens, design.lengths, halting)
        return {"next_correct": correct, "next_total": total}

    # ------------------------------------------------------------ reading
    def axis_labels(self, labels: dict) -> dict[str, tuple[list[str], ...]]:
        """Index labels of each axis of one generator's fields (symbols, states, HALT/END)."""
        symbols = [str(s) for s in labels.get("alphabet") or []]
        states = [f"s{i + 1}" for i in range(self.num_states or 0)]
        end = ["HALT"] if self.halting else []
        if self.generator == "categorical":
            return {"log_beta": (symbols,)}
        if self.generator == "markov":
            return {"log_init": (symbols,), "log_trans": (symbols, symbols + end)}
        moves = {"log_init": (states,), "log_trans": (states, states + (["END"] if self.halting else []))}
        if self.generator == "hmm":
            return {**moves, "log_emit": (states, symbols)}
        return {**moves, "mean": (states,), "log_var": (states,)}

    def generator_parameters(self, generators, labels: dict, prefixes: list[str],
                             leading: int = 0) -> dict[str, np.ndarray]:
        """Every entry of a stack of generators by name, ``prefix + field[index]``.

        ``generators`` has ``leading`` batch axes (draws), then one axis over
        ``prefixes`` (e.g. ``"topic1 "``, ``"task A "``, or ``""`` for a single
        generator), then the generator's own axes. Fields are shown as by
        :func:`readable_fields`; two-axis fields are indexed ``[row->column]``, e.g.
        ``topic1 trans[a->HALT]``.
        """
        lead = (slice(None),) * leading
        values = readable_fields(generators)
        out = {}
        for field, axes in self.axis_labels(labels).items():
            shown = field.removeprefix("log_")
            for k, prefix in enumerate(prefixes):
                for index in np.ndindex(*(len(axis) for axis in axes)):
                    name = "->".join(axis[i] for axis, i in zip(axes, index))
                    out[f"{prefix}{shown}[{name}]"] = values[shown][lead + (k, *index)]
        return out

    # ------------------------------------------------------------------ CLI
    @staticmethod
    def add_generator_arguments(group) -> None:
        """The generator options ``--generator --states --no-halting`` (in an argument group)."""
        group.add_argument("--generator", choices=sorted(GENERATORS), default="markov",
                           help="sequence generator (default: markov)")
        group.add_argument("--states", type=int, metavar="S", default=None, help="HMM states (hmm, gaussian-hmm)")
        group.add_argument("--no-halting", dest="halting", action="store_false",
                           help="score sequences by their prefix probability (no end-of-sequence outcome)")

    @staticmethod
    def generator_options(args: argparse.Namespace) -> dict[str, Any]:
        """The fields set by the generator and data options of a parsed ``mtl-jax fit`` line."""
        return dict(generator=args.generator, num_states=args.states, halting=args.halting,
                    task_column=args.task, sequence_column=args.sequence, tokens=args.tokens)

    @classmethod
    def add_data_arguments(cls, parser) -> None:
        """Data options of ``mtl-jax fit``: one sequence (a string) per CSV row."""
        group = parser.add_argument_group(f"data options ({cls.name})")
        group.add_argument("--task", required=True, help="column holding the task labels")
        group.add_argument("--sequence", required=True, metavar="COL", help="column holding the sequences")
        group.add_argument("--alphabet", type=Path, metavar="FILE", default=None,
                           help="symbols in id order, one per line (default: the sorted symbols of the data)")
        group.add_argument("--tokens", choices=("chars", "whitespace", "numbers"), default="chars",
                           help="how a sequence splits into symbols (default: chars); numbers: "
                                "whitespace-separated real numbers, for --generator gaussian-hmm")

    def data_from_frame(self, frame, args: argparse.Namespace | None = None, *, labels: dict | None = None,
                        schema=None, require_response: bool = False) -> SequenceData:
        """Encodes a frame of sequences: training data from ``args``, new data from a fit's ``labels``.

        Training (``args`` given): the alphabet of ``--alphabet`` or the data's sorted
        symbols. New data (``labels`` given): the fit's alphabet and task ids; tasks unseen
        in training get ids ``>= K`` (the model answers them at population level). The
        result's ``source_row`` maps each frame row to its stored (deduplicated) row. An
        encoded :class:`SequenceData` passes through unchanged. ``schema`` and
        ``require_response`` are unused (a sequence is its own response).

        Raises:
            DataError: for a missing column or value, a sequence column read as numbers,
                an empty sequence or a symbol outside the alphabet (naming the row).
            ValueError: for a model without ``task_column`` / ``sequence_column``.
        """
        if isinstance(frame, SequenceData):
            return frame
        if self.task_column is None or self.sequence_column is None:
            raise ValueError(f"this {self.name} model has no task_column/sequence_column to read a frame with")
        column = frame.get(self.sequence_column)
        if column is not None and not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
            raise DataError(f"column {self.sequence_column!r} holds numbers ({column.dtype}), not sequence strings")
        options = dict(task=self.task_column, sequence=self.sequence_column, tokens=self.tokens)
        if labels is None:
            return SequenceData.from_frame(frame, alphabet=args.alphabet, **options)
        return SequenceData.from_frame(frame, alphabet=labels["alphabet"], task_names=labels["task_names"],
                                       allow_empty_tasks=True, **options)
