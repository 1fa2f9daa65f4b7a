"""What every per-person model shares (``mtl-net``, ``pooled-net``, the baselines): it takes
:class:`~mtl_jax.data.personal.PersonData`, reads CSV files (or, with ``--allow-pickle``,
the original project's task-dict pickles), and has the same data options on the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import ClassVar

import pandas as pd

from mtl_jax.data.personal import PersonData, PersonSchema, encode, read_task_dict_pickle
from mtl_jax.data.tabular import DataError

PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


def default_hidden(num_inputs: int) -> tuple[int, ...]:
    """One hidden layer of ``2 q`` units, clipped to ``[8, 64]``: the default architecture of the nets."""
    return (int(min(64, max(8, 2 * num_inputs))),)


def net_widths(hidden: tuple[int, ...] | None, num_inputs: int) -> tuple[int, ...]:
    """The hidden widths of a net: ``hidden``, or :func:`default_hidden` when it is ``None``."""
    return default_hidden(num_inputs) if hidden is None else tuple(int(w) for w in hidden)


def check_net_settings(hidden, activation: str, dropout: float) -> None:
    """Raises ``ValueError`` for an unknown activation, a dropout outside ``[0, 1)`` or a width below 1."""
    from mtl_jax.models.mtl_net.network import ACTIVATIONS

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), not {dropout}")
    if hidden is not None and any(int(width) < 1 for width in hidden):
        raise ValueError(f"hidden widths must be positive, got {hidden}")


class PersonModel:
    """The data side of the model protocol for per-person models (a mixin of their dataclasses)."""

    name: ClassVar[str]

    def design(self, data) -> PersonData:
        """The :class:`~mtl_jax.data.personal.PersonData` itself.

        Raises:
            ValueError: for other data.
        """
        if not isinstance(data, PersonData):
            raise ValueError(f"{self.name} needs PersonData (mtl_jax.data.personal), got {type(data).__name__}")
        return data

    @classmethod
    def add_data_arguments(cls, parser) -> None:
        """Data options: person/task column, labels, features, tasks from users or labels, normalisation."""
        add_person_data_arguments(parser, cls.name)

    def data_from_frame(self, frame, args=None, *, labels: dict | None = None, schema=None,
                        require_response: bool = False) -> PersonData:
        """Training data from ``args``, or new data encoded with a fit's ``schema`` and task names."""
        return person_data_from_frame(frame, args, labels=labels, schema=schema, require_response=require_response)

    @staticmethod
    def read_frame(path, args: argparse.Namespace):
        """The training file: CSV, or (``.p``, ``.pkl``, ``.pickle``) a task-dict pickle with ``--allow-pickle``."""
        if Path(path).suffix.lower() in PICKLE_SUFFIXES:
            return read_task_dict_pickle(path, allow_pickle=args.allow_pickle)
        return pd.read_csv(path)


def add_net_arguments(group, hidden_help: str, no_hidden: str) -> None:
    """``--hidden``, ``--activation``, ``--dropout`` of the nets."""
    from mtl_jax.models.mtl_net.network import ACTIVATIONS  # here: the net's package imports this module
    group.add_argument("--hidden", type=int, nargs="*", metavar="H", default=None,
                       help=f"{hidden_help} (default: one layer of 2 x features, in [8, 64]; give none for {no_hidden})")
    group.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    group.add_argument("--dropout", type=float, default=0.0, help="dropout rate in MAP training (default 0)")


def add_person_data_arguments(parser, model_name: str) -> None:
    """The data options every per-person model shares (``mtl-jax fit --model ...``)."""
    data = parser.add_argument_group(f"data options ({model_name})")
    data.add_argument("--task", help="the person column (one task per person; with --tasks labels, still the "
                                     "person column used for per-person normalisation)")
    data.add_argument("--response", nargs="+", metavar="COL",
                      help="label column(s) (default: every column containing '_Label')")
    data.add_argument("--covariates", nargs="+", metavar="COL",
                      help="feature columns (default: every column but the person, timestamp, split and labels)")
    data.add_argument("--tasks", choices=("users", "labels"), default="users",
                      help="one task per person (users, default) or per label column (labels)")
    data.add_argument("--timestamp", metavar="COL", help="timestamp column (not a feature)")
    data.add_argument("--split", metavar="COL", help="column of train/validation/test per row")
    data.add_argument("--normalise", choices=("global", "person", "none"), default=None,
                      help="feature normalisation from the training rows: global (default), per person, or none")
    data.add_argument("--no-standardize", dest="standardize", action="store_false",
                      help="same as --normalise none")
    data.add_argument("--missing", choices=("fill", "error"), default="fill",
                      help="missing features: training mean plus indicator (fill, default) or an error")
    data.add_argument("--categorical", nargs="+", default=[], metavar="COL", help="features to dummy-code")
    data.add_argument("--positive", metavar="LABEL", help="the level coded 1 of a two-level text label")
    data.add_argument("--allow-pickle", action="store_true",
                      help="read a .p/.pkl/.pickle task-dict list of the original project (runs code from the file: "
                           "only for files you trust); its columns are task, features and Y")


def person_data_from_frame(frame, args=None, *, labels: dict | None = None, schema=None,
                           require_response: bool = False) -> PersonData:
    """Encodes a frame for the per-person models: training data from the parsed ``args``,
    or new data from a fit's ``schema`` (tasks unseen in training get ids after the known ones).

    Raises:
        DataError: for invalid data; ValueError for a missing ``--task``.
    """
    if isinstance(frame, PersonData):
        return frame
    if labels is not None:
        if not isinstance(schema, PersonSchema):
            raise ValueError("this fit has no per-person schema to encode new data with")
        if require_response:
            absent = [c for c in schema.labels if c not in frame.columns]
            if absent:
                raise DataError(f"label column(s) {absent} needed to score are not in the data")
        return encode(frame, schema, labels["task_names"])
    if not args.task:
        raise ValueError("--task COL (the person column) is required")
    normalise = args.normalise or ("global" if args.standardize else "none")
    if not args.standardize and args.normalise not in (None, "none"):
        raise ValueError("--no-standardize contradicts --normalise " + args.normalise)
    return PersonData.from_dataframe(frame, person=args.task, labels=args.response, features=args.covariates,
                                     tasks=args.tasks, timestamp=args.timestamp, split=args.split,
                                     normalise=normalise, missing=args.missing, categorical=args.categorical,
                                     positive=args.positive)
