"""Data loading and encoding for multitask learning."""

from mtl_jax.data.ilea import (
    SCHOOL_COVARIATES,
    STUDENT_COVARIATES,
    ilea_task_data,
    load_ilea,
    with_derived_columns,
)
from mtl_jax.data.sequences import SequenceData, read_alphabet, write_alphabet
from mtl_jax.data.settings import DATA_DIR_ENV, data_dir
from mtl_jax.data.tabular import (
    INTERCEPT,
    DataError,
    Schema,
    TaskData,
    train_test_split_by_task,
)

__all__ = [
    "DATA_DIR_ENV",
    "INTERCEPT",
    "SCHOOL_COVARIATES",
    "STUDENT_COVARIATES",
    "DataError",
    "Schema",
    "SequenceData",
    "TaskData",
    "data_dir",
    "ilea_task_data",
    "load_ilea",
    "read_alphabet",
    "train_test_split_by_task",
    "with_derived_columns",
    "write_alphabet",
]
