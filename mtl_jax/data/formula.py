r"""Mixed-model formulas (lme4 / glmmTMB conventions) for the mixture GLMM.

A formula such as ``"y ~ x1 + C(region) + I(t**2) + (1 + t | task)"`` says in one string
which columns are the response, the fixed (component-mean) effects, the task-level random
effects and the grouping factor (the task). :func:`parse_mixed_formula` splits it;
:func:`from_formula` (also ``TaskData.from_formula``) encodes a data frame with it and
returns, besides the :class:`~mtl_jax.data.TaskData`, the :class:`FormulaTerms` that
configure :class:`~mtl_jax.MixtureGLMM`.

Random-effect terms, as in lme4:

===============================  ==========================================================
``(1 | task)``                   random intercept
``(1 + t | task)``               intercept and slope of ``t``, full covariance
``(0 + t | task)``               slope of ``t`` only (also ``(t - 1 | task)``)
``(t | task)``                   the same as ``(1 + t | task)`` (the intercept is implied)
``(1 + t || task)``              intercept and slope, independent (diagonal covariance)
``(1 | task) + (0 + t | task)``  the same as ``||``: one effect per term
===============================  ==========================================================

There is one grouping factor, a column name. Every random effect must also be a fixed
effect (the random effects are task deviations from the fixed coefficients), and a
random intercept needs the fixed intercept. Terms of several columns in one block beside
other blocks (block-diagonal covariances) are not supported: the covariance is full (one
term) or diagonal (one effect per block).

**Encoding.** The right-hand side is materialised by `formulaic
<https://matthewwardrop.github.io/formulaic/>`_: ``C(x)`` and text columns are dummy-coded
against their first sorted level (columns ``x[T.level]``), ``x1:x2`` is an interaction,
``I(t**2)`` evaluates Python, and stateful transforms (``center(x)``, ``scale(x)``,
``poly(x, 2)``, ``bs(x, df=4)``) learn their state from the training rows. There is no
implicit standardisation: write ``scale(x)`` for it. The all-ones column is named
``"intercept"`` (:data:`~mtl_jax.data.tabular.INTERCEPT`); the other columns keep
formulaic's names. Each formula term is one *source* of the schema (``schema.groups``), so
models select columns by term name, e.g. ``covariates=("x1", "I(t ** 2)")`` (formulaic's
normal form of ``I(t**2)``; :class:`FormulaTerms` lists the names).

**Why formulaic.** It is maintained (patsy is no longer developed and names formulaic
its successor), it supports stateful transforms and ``I(...)``, its model spec stores the
learned state (levels, means, knots) so that new rows are encoded identically, and that
state is plain data (numbers, lists, level lists) that this module writes to JSON, so a
saved fit re-encodes new data without pickle. ``formulae`` (Bambi's formula library) parses
``(1 | g)`` itself, but builds the lme4-style random-effect matrices that this model does
not use; the bar terms are few and simple, so they are split off here and formulaic
encodes the rest.

The data schema (:class:`FormulaSchema`) keeps the design formula and formulaic's
encoder and transform state as canonical JSON, so it is immutable, hashable and round
trips through :meth:`FormulaSchema.to_dict` / :meth:`~mtl_jax.data.Schema.from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from formulaic import Formula, ModelSpec, model_matrix
from formulaic.errors import DataMismatchWarning, FactorEvaluationError, FormulaicError
from formulaic.parser.types import Factor, Term
from formulaic.utils.variables import Variable

from mtl_jax.data.tabular import (
    INTERCEPT,
    DataError,
    Schema,
    TaskData,
    _check_missing,
    _labels,
    _require_columns,
    _response_levels,
    _where,
)

FORMULAIC_INTERCEPT = "Intercept"
"""formulaic's name of the all-ones column, renamed to :data:`INTERCEPT`."""

_COLUMN_NAME = re.compile(r"[A-Za-z_.][A-Za-z0-9_.]*")
_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


class FormulaError(ValueError):
    """A formula is malformed or asks for something the mixture GLMM cannot fit."""


@dataclasses.dataclass(frozen=True)
class MixedFormula:
    """A mixed-model formula split into its parts (:func:`parse_mixed_formula`).

    Attributes:
        response: Response column name(s) of the left-hand side (``y`` or ``y1 + y2``).
        fixed: The fixed part's right-hand side (without the bar terms), e.g.
            ``"x1 + I(t**2)"``; ``"1"`` when it only has bar terms.
        intercept: Whether the fixed part has an intercept (``0 +`` / ``- 1`` remove it).
        fixed_terms: formulaic's names of the fixed terms besides the intercept, e.g.
            ``("x1", "I(t ** 2)")``; interactions are expanded (``a*b`` gives ``a``, ``b``,
            ``a:b``).
        group: The grouping (task) column of the bar terms, or None without bar terms.
        random_intercept: Whether the random effects include an intercept.
        random_slopes: Fixed terms with random slopes, in the order written (spelled as in
            ``fixed_terms``).
        random_effects_covariance: ``"full"`` (one bar term) or ``"diagonal"`` (``||``, or
            one single-effect bar term per effect).
    """

    response: tuple[str, ...]
    fixed: str
    intercept: bool
    fixed_terms: tuple[str, ...]
    group: str | None
    random_intercept: bool
    random_slopes: tuple[str, ...]
    random_effects_covariance: Literal["full", "diagonal"]


@dataclasses.dataclass(frozen=True)
class FormulaTerms:
    """What :class:`~mtl_jax.MixtureGLMM` needs from a formula (names of schema sources).

    Attributes:
        covariates: Terms of the component means (the fixed part), without the intercept
            (``TaskData.columns_for`` always adds it).
        mixing_covariates: Terms of the mixing logits (the mixing formula; the fixed part
            when there is none).
        random_slopes: Terms with component random slopes (sources, like ``covariates``).
        random_intercept: Whether the component random effects include the intercept.
        random_effects: Encoded names of the random-effect columns in model order, the
            labels of ``phi[h, label]`` and ``B{h}[label]``, e.g. ``("intercept", "t")``.
        random_effects_covariance: ``"full"`` or ``"diagonal"``.
    """

    covariates: tuple[str, ...]
    mixing_covariates: tuple[str, ...]
    random_slopes: tuple[str, ...]
    random_intercept: bool
    random_effects: tuple[str, ...]
    random_effects_covariance: Literal["full", "diagonal"]

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~mtl_jax.MixtureGLMM` for these terms.

        Without random-effect terms the component random effects are switched off
        (``component_random_effects=False``).
        """
        return {
            "covariates": self.covariates,
            "mixing_covariates": self.mixing_covariates,
            "random_slopes": self.random_slopes,
            "random_intercept": self.random_intercept,
            "random_effects_covariance": self.random_effects_covariance,
            "component_random_effects": bool(self.random_effects),
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> FormulaTerms:
        """Inverse of ``dataclasses.asdict`` (after a JSON round trip)."""
        return cls(
            covariates=tuple(spec["covariates"]),
            mixing_covariates=tuple(spec["mixing_covariates"]),
            random_slopes=tuple(spec["random_slopes"]),
            random_intercept=bool(spec["random_intercept"]),
            random_effects=tuple(spec["random_effects"]),
            random_effects_covariance=spec["random_effects_covariance"],
        )


# ------------------------------------------------------------------------------ parsing
def parse_mixed_formula(formula: str) -> MixedFormula:
    """Splits ``"y ~ fixed + (effects | group)"`` into response, fixed part and random effects.

    Args:
        formula: A two-sided formula; bar terms ``(effects | group)`` or
            ``(effects || group)`` are added with ``+`` anywhere on the right-hand side.

    Returns:
        The parts; see :class:`MixedFormula`.

    Raises:
        FormulaError: for a missing or repeated ``~``, unbalanced brackets, a malformed
            bar term (empty side, ``|`` outside a parenthesised term, a subtracted term),
            bar terms of different groups or a group that is not one column, a random
            effect that is not a fixed term (or a random intercept without the fixed
            one), an effect in two bar terms, a block-diagonal covariance, or a right-hand
            side formulaic cannot parse.
    """
    tildes = [i for i, char, _ in _scan(formula) if char == "~"]
    if len(tildes) != 1:
        raise FormulaError(f"expected one '~' between the response and the terms, e.g. 'y ~ x + (1 | task)'; "
                           f"got {formula!r}")
    lhs, rhs = formula[: tildes[0]], formula[tildes[0] + 1:]
    if not lhs.strip():
        raise FormulaError(f"the formula {formula!r} has no response: write 'y ~ ...'")
    response = tuple(_column_name(part, "a response") for part in _split_top_level(lhs, "+"))

    fixed_text, bars = _split_bar_terms(rhs)
    fixed_formula = _formula(fixed_text, "the fixed part")
    fixed_names = {term: str(term) for term in fixed_formula}
    intercept = _has_intercept(fixed_formula)

    groups = sorted({group for group, _, _ in bars})
    if len(groups) > 1:
        raise FormulaError(f"the random-effect terms have different groups {groups}: one grouping factor "
                           "(the task column) is supported")

    blocks: list[tuple[str, ...]] = []
    for group, effects, diagonal in bars:
        block = _bar_effects(effects, group, fixed_names, intercept)
        blocks.extend([(effect,) for effect in block] if diagonal else [block])
    effects = [effect for block in blocks for effect in block]
    repeated = sorted({effect for effect in effects if effects.count(effect) > 1})
    if repeated:
        raise FormulaError(f"random effect(s) {repeated} appear in more than one random-effect term")
    if len(blocks) > 1 and any(len(block) > 1 for block in blocks):
        raise FormulaError(
            f"random-effect blocks {[list(block) for block in blocks]} ask for a block-diagonal covariance, "
            "which is not supported: write one term (full covariance) or use '||' (diagonal)")
    return MixedFormula(
        response=response,
        fixed=fixed_text,
        intercept=intercept,
        fixed_terms=tuple(name for name in fixed_names.values() if name != "1"),
        group=groups[0] if groups else None,
        random_intercept="1" in effects,
        random_slopes=tuple(effect for effect in effects if effect != "1"),
        random_effects_covariance="diagonal" if len(blocks) > 1 else "full",
    )


def _scan(text: str) -> Iterator[tuple[int, str, int]]:
    """``(position, character, bracket depth)`` of the characters outside quotes and backticks.

    Raises:
        FormulaError: for unbalanced brackets or an unclosed quote.
    """
    depth, quote = 0, None
    for position, char in enumerate(text):
        if quote is not None:
            quote = None if char == quote else quote
            continue
        if char in "'\"`":
            quote = char
            continue
        if char in ")]}":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced {char!r} at position {position} of {text!r}")
        yield position, char, depth
        if char in "([{":
            depth += 1
    if depth or quote is not None:
        raise FormulaError(f"unbalanced brackets or quotes in {text!r}")


def _split_top_level(text: str, separator: str) -> list[str]:
    """``text`` split at the ``separator`` characters outside brackets and quotes."""
    cuts = [position for position, char, depth in _scan(text) if depth == 0 and char == separator]
    bounds = [-1, *cuts, len(text)]
    return [text[start + 1: end] for start, end in zip(bounds[:-1], bounds[1:])]


def _split_bar_terms(rhs: str) -> tuple[str, list[tuple[str, str, bool]]]:
    """Removes the bar terms from a right-hand side.

    Returns:
        ``(fixed, bars)``: the right-hand side without the bar terms (``"1"`` if nothing
        is left) and ``(group, effects, diagonal)`` per bar term in the order written.
    """
    signs = [(position, char) for position, char, depth in _scan(rhs) if depth == 0 and char in "+-"]
    bounds = [(-1, "+"), *signs, (len(rhs), "")]
    kept, bars = [], []
    for (start, sign), (end, _) in zip(bounds[:-1], bounds[1:]):
        chunk = rhs[start + 1: end]
        bar = _bar_term(chunk)
        if bar is None:
            kept.append(chunk if start < 0 else sign + chunk)
        elif sign == "-":
            raise FormulaError(f"the random-effect term {chunk.strip()!r} is subtracted; add it with '+'")
        else:
            bars.append(bar)
    fixed = "".join(kept).strip()
    if any(char == "|" for _, char, _ in _scan(fixed)):
        raise FormulaError(f"malformed random-effect term in {rhs.strip()!r}: write '(effects | group)' in its "
                           "own parentheses and add it with '+'")
    fixed = fixed[1:].strip() if fixed.startswith("+") else fixed
    return fixed or "1", bars


def _bar_term(chunk: str) -> tuple[str, str, bool] | None:
    """``(group, effects, diagonal)`` of a chunk ``"(effects | group)"``; None for other chunks.

    Raises:
        FormulaError: for more than one bar, an empty side, or a group that is not one
            column name.
    """
    body = chunk.strip()
    if not (body.startswith("(") and body.endswith(")")):
        return None
    closing = next(position for position, char, depth in _scan(body) if char == ")" and depth == 0)
    if closing != len(body) - 1:
        return None
    inner = body[1:-1]
    bars = [position for position, char, depth in _scan(inner) if depth == 0 and char == "|"]
    if not bars:
        return None
    diagonal = len(bars) == 2 and bars[1] == bars[0] + 1
    if len(bars) > 2 or (len(bars) == 2 and not diagonal):
        raise FormulaError(f"malformed random-effect term {body!r}: expected '(effects | group)' or "
                           "'(effects || group)'")
    effects, group = inner[: bars[0]], inner[bars[-1] + 1:]
    if not effects.strip() or not group.strip():
        raise FormulaError(f"malformed random-effect term {body!r}: both sides of the bar are needed, e.g. "
                           "'(1 + t | task)'")
    return _column_name(group, f"the grouping factor of {body!r}"), effects, diagonal


def _bar_effects(effects: str, group: str, fixed_names: dict[Term, str], fixed_intercept: bool) -> tuple[str, ...]:
    """Names of the effects of one bar term: ``"1"`` for the intercept, fixed-term names otherwise.

    Raises:
        FormulaError: for no effect, an effect that is not a fixed term, or a random
            intercept without a fixed intercept.
    """
    term_text = f"({effects.strip()} | {group})"
    parsed = _formula(effects, f"the random-effect term {term_text!r}")
    names = []
    for term in parsed:
        if str(term) == "1":
            if not fixed_intercept:
                raise FormulaError(f"the random-effect term {term_text!r} has a random intercept but the fixed part "
                                   "has no intercept: remove '0 +' / '- 1' from the fixed part")
            names.append("1")
        elif term in fixed_names:
            names.append(fixed_names[term])
        else:
            raise FormulaError(
                f"random effect {str(term)!r} of {term_text!r} is not a fixed term: random effects are task "
                f"deviations from fixed coefficients, so add {str(term)!r} to the fixed part too")
    if not names:
        raise FormulaError(f"the random-effect term {term_text!r} has no effect: write e.g. '(1 | {group})'")
    return tuple(names)


def _column_name(text: str, role: str) -> str:
    """A column name written plainly (``task``) or in backticks (```my task```).

    Raises:
        FormulaError: if ``text`` is anything else (an expression, several names).
    """
    text = text.strip()
    if len(text) > 2 and text[0] == text[-1] == "`":
        return text[1:-1]
    if _COLUMN_NAME.fullmatch(text):
        return text
    raise FormulaError(f"{role} must be one column name, got {text!r}")


def _formula(text: str, where: str) -> Formula:
    """formulaic's parse of a right-hand side, its errors as :class:`FormulaError`."""
    if any(char in "~|" for _, char, _ in _scan(text)):
        raise FormulaError(f"{where} {text.strip()!r} cannot contain '~' or '|'")
    try:
        return Formula(text)
    except FormulaicError as error:
        raise FormulaError(f"cannot parse {where} {text.strip()!r}: {_plain(error)}") from None


def _has_intercept(formula: Formula) -> bool:
    """Whether a parsed right-hand side has the intercept term ``1``."""
    return any(str(term) == "1" for term in formula)


def _plain(error: Exception) -> str:
    """An exception's message without formulaic's terminal colour codes."""
    return _ANSI_CODES.sub("", str(error)).replace("⧛", "").replace("⧚", "").strip()


# ---------------------------------------------------------------------------- encoding
@dataclasses.dataclass(frozen=True, kw_only=True)
class FormulaSchema(Schema):
    """A :class:`~mtl_jax.data.Schema` whose design is a formulaic model matrix.

    ``covariates`` are the term names (the sources of ``groups``); ``categorical`` and
    ``standardized`` stay empty (formulaic's state holds the levels and transform state).

    Attributes:
        formula: The mixed formula the schema was fitted with (for the record).
        mixing_formula: The one-sided mixing formula, or None.
        design_formula: The right-hand side that is materialised: the fixed terms, then the
            mixing terms not among them.
        encoded_columns: Names of the design columns (``columns``), intercept first.
        term_groups: ``(term, column indices)`` per term (``groups``).
        variables: Data columns the design reads.
        state: formulaic's encoder and transform state as canonical JSON text.
        terms: What the model needs (:class:`FormulaTerms`).
    """

    formula: str
    mixing_formula: str | None
    design_formula: str
    encoded_columns: tuple[str, ...]
    term_groups: tuple[tuple[str, tuple[int, ...]], ...]
    variables: tuple[str, ...]
    state: str
    terms: FormulaTerms

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the q encoded design columns, ``"intercept"`` first when present."""
        return self.encoded_columns

    @property
    def groups(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``(term, encoded column indices)`` pairs, one per formula term (no intercept)."""
        return self.term_groups

    def encoded_names(self, column: str) -> tuple[str, ...]:
        """Names of the encoded columns of one term."""
        return tuple(self.encoded_columns[i] for i in dict(self.term_groups)[column])

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable description (``Schema.from_dict`` rebuilds it)."""
        return {
            "kind": "formula",
            "task": self.task,
            "response": list(self.response),
            "trials": self.trials,
            "offset": self.offset,
            "response_levels": None if self.response_levels is None else list(self.response_levels),
            "formula": self.formula,
            "mixing_formula": self.mixing_formula,
            "design_formula": self.design_formula,
            "intercept": self.intercept,
            "columns": list(self.encoded_columns),
            "groups": [{"term": term, "columns": list(indices)} for term, indices in self.term_groups],
            "variables": list(self.variables),
            "state": json.loads(self.state),
            "terms": dataclasses.asdict(self.terms),
        }

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> FormulaSchema:
        """Rebuilds the schema from :meth:`to_dict` (e.g. after a JSON round trip)."""
        groups = tuple((item["term"], tuple(item["columns"])) for item in spec["groups"])
        return cls(
            task=spec["task"],
            response=tuple(spec["response"]),
            covariates=tuple(term for term, _ in groups),
            intercept=bool(spec["intercept"]),
            trials=spec["trials"],
            offset=spec["offset"],
            response_levels=None if spec["response_levels"] is None else tuple(spec["response_levels"]),
            formula=spec["formula"],
            mixing_formula=spec["mixing_formula"],
            design_formula=spec["design_formula"],
            encoded_columns=tuple(spec["columns"]),
            term_groups=groups,
            variables=tuple(spec["variables"]),
            state=_canonical_json(spec["state"]),
            terms=FormulaTerms.from_dict(spec["terms"]),
        )

    def model_spec(self) -> ModelSpec:
        """formulaic's model spec of the design, with the state learned from the training rows."""
        state = json.loads(self.state)
        return ModelSpec(
            formula=Formula(self.design_formula),
            materializer="pandas",
            ensure_full_rank=True,
            na_action="ignore",
            output="pandas",
            transform_state=_from_json(state["transform_state"]),
            encoder_state={
                factor: (Factor.Kind(item["kind"]), _from_json(item["state"]))
                for factor, item in state["encoder_state"].items()
            },
        )

    def _source_columns(self) -> tuple[str, ...]:
        """Data columns the design reads."""
        return self.variables

    def _design(self, frame: pd.DataFrame, task_labels: np.ndarray) -> np.ndarray:
        """The model matrix of ``frame`` with the stored state, shape [n, q].

        Raises:
            DataError: naming the column, row and task of a missing value, a categorical
                level not seen in training, or a non-finite design entry.
        """
        for column in self.variables:
            _check_missing(frame, column, task_labels)
        spec = self.model_spec()
        for factor, (kind, state) in spec.encoder_state.items():
            if kind is Factor.Kind.CATEGORICAL:
                _check_levels(frame, factor, state["categories"], self.variables, task_labels)
        matrix = _materialize(spec, frame)
        names = _encoded_names(matrix.columns)
        if names != self.encoded_columns:
            raise DataError(f"the formula encodes these rows to columns {list(names)}, not the fitted "
                            f"{list(self.encoded_columns)}")
        X = matrix.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(X)
        if bad.any():
            row, column = (int(index[0]) for index in np.nonzero(bad))
            raise DataError(f"design column {names[column]!r} is {X[row, column]} at "
                            f"{_where(frame, row, task_labels)}")
        return X


def from_formula(
    frame: pd.DataFrame,
    formula: str,
    mixing_formula: str | None = None,
    *,
    task: str | None = None,
    trials: str | None = None,
    offset: str | None = None,
    positive: Any = None,
    task_names: Sequence[Any] | None = None,
) -> tuple[TaskData, FormulaTerms]:
    """Encodes a data frame with a mixed formula (and a mixing formula).

    The design's columns are the union of the fixed part's and the mixing formula's
    terms. Each term is a source of the schema, so ``data.columns_for(terms.covariates)``
    picks the component columns.

    Args:
        frame: One row per observation.
        formula: ``"y ~ fixed terms + (effects | task)"`` (:func:`parse_mixed_formula`).
        mixing_formula: One-sided formula of the mixing logits, e.g. ``"~ x1 + C(region)"``
            (the leading ``~`` is optional); None uses the fixed part. Its intercept must
            agree with the fixed part's (both use the design's intercept column).
        task: The task column when the formula has no bar term (then there are no
            component random effects); it must equal the bar terms' group otherwise.
        trials: Column of binomial trials (the response holds the successes), or None.
        offset: Column added to each row's linear predictor, or None.
        positive: For a two-level text response, the level coded 1.
        task_names: Order of the tasks, as in ``TaskData.from_dataframe``.

    Returns:
        ``(data, terms)``: the encoded data (its ``schema`` a :class:`FormulaSchema`) and
        the model's terms (``MixtureGLMM(num_components=g, **terms.model_kwargs())``).

    Raises:
        FormulaError: for a malformed formula (see :func:`parse_mixed_formula`), a
            mixing formula with a response, bar terms or another intercept, a term coded
            differently in the fixed and mixing designs, or no task column.
        DataError: for an unknown column (named), a column used in two roles, a missing
            or non-finite value (row and task named), a non-numeric response, a constant
            or collinear design column, or a term formulaic cannot evaluate.
    """
    parsed = parse_mixed_formula(formula)
    task = _task_column(parsed.group, task)
    mixing = _parse_mixing(mixing_formula, parsed.intercept) if mixing_formula is not None else None

    fixed_formula = _formula(parsed.fixed, "the fixed part")
    fixed_terms = list(fixed_formula)
    extra_terms = [] if mixing is None else [term for term in mixing if term not in fixed_terms]
    design_formula = " + ".join(
        ["1" if parsed.intercept else "0", *(str(term) for term in [*fixed_terms, *extra_terms] if str(term) != "1")])

    roles = (task, *parsed.response, *(column for column in (trials, offset) if column is not None))
    _require_columns(frame, roles)
    if len(frame) == 0:
        raise DataError("the data frame has no rows")
    labels = _labels(frame, task, None)
    spec = _materialize(design_formula, frame).model_spec
    variables = tuple(sorted(spec.variables_by_source.get("data", ())))
    for column in variables:
        _check_missing(frame, column, labels)
    reused = sorted(set(roles) & set(variables))
    if reused:
        raise DataError(f"column(s) {reused} are used in the formula's terms and as the task, response, trials or "
                        "offset column; each column has one role")
    if extra_terms:
        for part, part_formula in (("fixed part", fixed_formula), ("mixing formula", mixing)):
            _check_same_coding(spec, _materialize(part_formula, frame).model_spec, part)

    names_of = {term: str(term) for term in spec.term_indices}
    groups = tuple((str(term), tuple(indices)) for term, indices in spec.term_indices.items() if str(term) != "1")
    columns = _encoded_names(spec.column_names)
    group_of = dict(groups)
    mixing_terms = [term for term in (mixing if mixing is not None else fixed_terms) if str(term) != "1"]
    terms = FormulaTerms(
        covariates=parsed.fixed_terms,
        mixing_covariates=tuple(names_of[term] for term in mixing_terms),
        random_slopes=parsed.random_slopes,
        random_intercept=parsed.random_intercept,
        random_effects=(
            *((INTERCEPT,) if parsed.random_intercept else ()),
            *(columns[i] for slope in parsed.random_slopes for i in group_of[slope]),
        ),
        random_effects_covariance=parsed.random_effects_covariance,
    )
    schema = FormulaSchema(
        task=task,
        response=parsed.response,
        covariates=tuple(name for name, _ in groups),
        intercept=parsed.intercept,
        trials=trials,
        offset=offset,
        response_levels=_response_levels(frame, parsed.response, positive, labels),
        formula=formula,
        mixing_formula=mixing_formula,
        design_formula=design_formula,
        encoded_columns=columns,
        term_groups=groups,
        variables=variables,
        state=_canonical_json(_spec_state(spec)),
        terms=terms,
    )
    data = schema._encode(frame, require_response=True, task_names=task_names, is_fit=True)
    return data, terms


def _task_column(group: str | None, task: str | None) -> str:
    """The task column from the bar terms' group and the ``task`` argument.

    Raises:
        FormulaError: if neither names it, or they disagree.
    """
    if group is None and task is None:
        raise FormulaError("the formula has no random-effect term '(... | task)' naming the task column; add one, "
                           "or pass task=... for a model without component random effects")
    if group is not None and task is not None and group != task:
        raise FormulaError(f"task={task!r} disagrees with the formula's grouping factor {group!r}")
    return group if group is not None else task


def _parse_mixing(mixing_formula: str, fixed_intercept: bool) -> Formula:
    """formulaic's parse of the one-sided mixing formula.

    Raises:
        FormulaError: for a left-hand side, bar terms, or an intercept other than the
            fixed part's.
    """
    tildes = [i for i, char, _ in _scan(mixing_formula) if char == "~"]
    if len(tildes) > 1 or (tildes and mixing_formula[: tildes[0]].strip()):
        raise FormulaError(f"the mixing formula must be one-sided, e.g. '~ x1 + C(region)'; got {mixing_formula!r}")
    rhs = mixing_formula[tildes[0] + 1:] if tildes else mixing_formula
    if any(char == "|" for _, char, _ in _scan(rhs)):
        raise FormulaError(f"the mixing formula {mixing_formula!r} cannot have random-effect terms: the mixing "
                           "random effects are switched on in the model (mixing_random_effects)")
    parsed = _formula(rhs, "the mixing formula")
    if _has_intercept(parsed) != fixed_intercept:
        state = "has" if fixed_intercept else "has no"
        raise FormulaError(f"the fixed part {state} intercept but the mixing formula {mixing_formula!r} does not "
                           "agree: both use the design's intercept column, so write both with or both without")
    return parsed


def _materialize(spec: ModelSpec | Formula | str, frame: pd.DataFrame) -> pd.DataFrame:
    """formulaic's model matrix of ``frame`` (no rows dropped), its errors as :class:`DataError`.

    Args:
        spec: A formula (its state is learned from ``frame``) or a model spec with state.
        frame: The data.

    Returns:
        The model matrix (a pandas frame with a ``model_spec``), one row per row of ``frame``.
    """
    if not isinstance(spec, ModelSpec):
        spec = Formula(spec)
        # formulaic lists the plain columns (not yet those inside stateful transforms)
        _require_columns(frame, sorted(name for name in spec.required_variables if Variable.Role.VALUE in name.roles))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataMismatchWarning)
        try:
            if isinstance(spec, ModelSpec):
                return spec.get_model_matrix(frame, context={})
            return model_matrix(spec, frame, ensure_full_rank=True, na_action="ignore", output="pandas",
                                context={})
        except DataMismatchWarning as warning:
            raise DataError(f"a categorical term has a level not seen in training: {_plain(warning)}") from None
        except FactorEvaluationError as error:
            cause = error.__cause__
            if isinstance(cause, NameError) and cause.name is not None:
                raise DataError(f"unknown column {cause.name!r} in the formula (nor a known transform); available "
                                f"columns: {list(frame.columns)}") from None
            raise DataError(f"cannot evaluate the formula: {_plain(error)}") from None
        except FormulaicError as error:
            raise DataError(f"cannot encode the formula: {_plain(error)}") from None


def _check_same_coding(union: ModelSpec, part: ModelSpec, name: str) -> None:
    """Raises if a term of one part is coded differently in the combined design.

    formulaic drops dummy columns of an interaction when its marginal terms are present,
    so e.g. ``x:region`` alone in the fixed part has a column per level but only
    ``levels - 1`` beside a mixing term ``x``.

    Raises:
        FormulaError: naming the term and both codings.
    """
    combined = {term: [union.column_names[i] for i in indices] for term, indices in union.term_indices.items()}
    for term, indices in part.term_indices.items():
        alone = [part.column_names[i] for i in indices]
        if combined[term] != alone:
            raise FormulaError(
                f"term {str(term)!r} of the {name} is coded as {alone} there but as {combined[term]} in the design "
                "of both formulas (its marginal terms differ): give both formulas the same marginal terms")


def _encoded_names(names: Sequence[str]) -> tuple[str, ...]:
    """formulaic's column names with the intercept renamed to :data:`INTERCEPT`.

    Raises:
        DataError: if two columns get one name (a data column named ``intercept``).
    """
    renamed = tuple(INTERCEPT if name == FORMULAIC_INTERCEPT else str(name) for name in names)
    if len(set(renamed)) != len(renamed):
        raise DataError(f"the design has repeated column names {list(renamed)}; rename the data column "
                        f"{INTERCEPT!r}")
    return renamed


def _check_levels(frame: pd.DataFrame, factor: str, categories: list, variables: Sequence[str],
                  task_labels: np.ndarray) -> None:
    """Raises a :class:`DataError` naming the row and task of a level not seen in training.

    Only factors that are a column (``region``) or ``C(column, ...)`` are checked here;
    levels of other categorical expressions are caught when formulaic encodes them.
    """
    match = re.fullmatch(r"C\(\s*(`[^`]+`|[A-Za-z_.][A-Za-z0-9_.]*)\s*(,.*)?\)", factor, flags=re.DOTALL)
    column = (match.group(1).strip("`") if match else factor.strip("`"))
    if column not in variables:
        return
    unseen = ~frame[column].isin(categories).to_numpy()
    if unseen.any():
        row = int(np.argmax(unseen))
        level = frame[column].iloc[row]
        level = level.item() if isinstance(level, np.generic) else level
        raise DataError(f"column {column!r} has level {level!r} at "
                        f"{_where(frame, row, task_labels)} that was not seen when the schema was fitted "
                        f"(known levels: {list(categories)})")


# ------------------------------------------------------------------------- JSON state
def _spec_state(spec: ModelSpec) -> dict[str, Any]:
    """formulaic's learned state as JSON-able data.

    The categorical encoder state keeps its ``categories`` only: formulaic re-derives
    the contrasts from the formula and the categories (its ``contrasts`` entry is for
    introspection).
    """
    return {
        "transform_state": _to_json(spec.transform_state),
        "encoder_state": {
            factor: {
                "kind": kind.value,
                "state": _to_json({key: value for key, value in state.items() if key != "contrasts"}),
            }
            for factor, (kind, state) in spec.encoder_state.items()
        },
    }


def _to_json(value: Any) -> Any:
    """Tagged JSON form of formulaic state (numbers, strings, lists, arrays, dicts).

    numpy scalars become Python numbers; arrays (``cr``'s constraints) become
    ``{"__ndarray__": list, "dtype": str}``; dicts with string keys stay objects, other
    dicts (``poly``'s integer keys) become ``{"__items__": [[key, value], ...]}``.

    Raises:
        DataError: for a value of another type (e.g. a date level).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return _to_json(value.item())
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _to_json(value.tolist()), "dtype": value.dtype.str}
    if isinstance(value, list):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("__") for key in value):
            return {key: _to_json(item) for key, item in value.items()}
        return {"__items__": [[_to_json(key), _to_json(item)] for key, item in value.items()]}
    raise DataError(f"cannot store the formula's state value {value!r} ({type(value).__name__}) as JSON; "
                    "categorical levels must be text, numbers or booleans")


def _from_json(value: Any) -> Any:
    """Inverse of :func:`_to_json`."""
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "__ndarray__" in value:
        return np.asarray(_from_json(value["__ndarray__"]), dtype=np.dtype(value["dtype"]))
    if "__items__" in value:
        return {_from_json(key): _from_json(item) for key, item in value["__items__"]}
    return {key: _from_json(item) for key, item in value.items()}


def _canonical_json(value: Any) -> str:
    """Canonical JSON text (sorted keys), so equal states give equal schemas."""
    return json.dumps(value, sort_keys=True, allow_nan=False)
