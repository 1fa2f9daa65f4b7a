"""Data loading and encoding for multitask learning."""

from mtl_jax.data.ilea import (
    SCHOOL_COVARIATES,
    STUDENT_COVARIATES,
    ilea_task_data,
    load_ilea,
    with_derived_columns,
)
from mtl_jax.data.personal import PersonData, PersonSchema, read_task_dict_pickle
from mtl_jax.data.sequences import SequenceData, read_alphabet, write_alphabet
from mtl_jax.data.settings import DATA_DIR_ENV, data_dir
from mtl_jax.data.tabular import (
    INTERCEPT,
    DataError,
    Schema,
    TaskData,
    train_test_split_by_task,
)



def schema_from_dict(spec: dict) -> Schema | PersonSchema:
    """The saved schema of a fit: a :class:`PersonSchema` (``kind: person``) or a tabular :class:`Schema`."""
    return PersonSchema.from_dict(spec) if spec.get("kind") == "person" else Schema.from_dict(spec)


__all__ = [
    "DATA_DIR_ENV",
    "INTERCEPT",
    "SCHOOL_COVARIATES",
    "STUDENT_COVARIATES",
    "DataError",
    "PersonData",
    "PersonSchema",
    "Schema",
    "SequenceData",
    "TaskData",
    "data_dir",
    "ilea_task_data",
    "load_ilea",
    "read_alphabet",
    "read_task_dict_pickle",
    "schema_from_dict",
    "train_test_split_by_task",
    "with_derived_columns",
    "write_alphabet",
]
