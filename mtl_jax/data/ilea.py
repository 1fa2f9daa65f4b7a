"""The ILEA "school" exam-score data (15,362 pupils in 139 schools, 1985-87).

One task is one school (``school_id``); the response is the raw ``exam_score``. The
covariates follow the set-up of Table 3 of the mixture-GLMM paper:

* student level (15 encoded columns): ``year_code`` (reference 1 = 1985; 2 dummies),
  ``gender`` (reference 0 = male; 1 dummy), ``vr_band`` (2 dummies, see below) and
  ``ethnic_group`` (reference 1 = ESWI; 10 dummies);
* school level (5 more): ``fsm_pct`` and ``vr1_pct`` (standardised), ``single_sex``
  (1 for boys' or girls' schools, i.e. ``school_gender`` 2 or 3; 1 dummy) and
  ``school_denom`` (reference 1 = maintained; 2 dummies).

``vr_band`` codes are 2 = VR1 (top), 3 = VR2 (middle), 1 = VR3 (bottom) and 0 =
undocumented (15 pupils). Code 1 (bottom band) is the reference level, giving dummies
``vr_band[2]`` and ``vr_band[3]``; code 0 is mapped to the reference, so those 15 pupils
have both dummies 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd

from mtl_jax.data.settings import data_dir as default_data_dir
from mtl_jax.data.tabular import TaskData

STUDENT_COVARIATES = ("year_code", "gender", "vr_band", "ethnic_group")
"""Student-level source covariates (15 encoded columns)."""

SCHOOL_COVARIATES = ("fsm_pct", "vr1_pct", "single_sex", "school_denom")
"""School-level source covariates (5 encoded columns), derived ``single_sex`` included."""

_CATEGORICAL = ("year_code", "gender", "vr_band", "ethnic_group", "single_sex", "school_denom")


def load_ilea(data_dir: str | Path | None = None) -> pd.DataFrame:
    """Reads the raw ILEA school table.

    Args:
        data_dir: Shared data directory; defaults to :func:`mtl_jax.data.settings.data_dir`.

    Returns:
        The table as stored in ``<data_dir>/ilea_school/ilea_school.csv``: 15,362 rows with
        integer columns school_id, year_code, exam_score, fsm_pct, vr1_pct, gender, vr_band,
        ethnic_group, school_gender and school_denom.
    """
    root = default_data_dir() if data_dir is None else Path(data_dir)
    return pd.read_csv(root / "ilea_school" / "ilea_school.csv")


def with_derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Returns a copy of the raw table prepared for encoding.

    Apply this to new raw ILEA rows before ``schema.transform``.

    Args:
        frame: Raw table with (at least) the ``vr_band`` and ``school_gender`` columns.

    Returns:
        A copy in which ``vr_band`` code 0 is recoded to the reference code 1 and a 0/1
        column ``single_sex`` (``school_gender`` 2 or 3) is added.
    """
    return frame.assign(
        vr_band=frame["vr_band"].replace(0, 1),
        single_sex=frame["school_gender"].isin([2, 3]).astype(int),
    )


def ilea_task_data(
    frame: pd.DataFrame, covariates: Literal["student", "all"]
) -> TaskData:
    """Encodes the ILEA table as a multitask data set with one task per school.

    Args:
        frame: The raw table from :func:`load_ilea` (not modified).
        covariates: ``"student"`` for the 15 student-level columns, ``"all"`` to add the
            5 school-level ones.

    Returns:
        Data with task = ``school_id`` (schools in order of first appearance), response
        ``exam_score`` (raw, shape [n, 1]) and a design of intercept + 15 or 20 columns.

    Raises:
        ValueError: If ``covariates`` is neither ``"student"`` nor ``"all"``.
    """
    if covariates == "student":
        sources = STUDENT_COVARIATES
    elif covariates == "all":
        sources = STUDENT_COVARIATES + SCHOOL_COVARIATES
    else:
        raise ValueError(f"covariates must be 'student' or 'all', got {covariates!r}")

    return TaskData.from_dataframe(
        with_derived_columns(frame),
        task="school_id",
        response="exam_score",
        covariates=sources,
        categorical=[name for name in _CATEGORICAL if name in sources],
    )
