"""Per-task tables on the Fit: kept in the fit JSON and read back (no fitting needed)."""

import json

import numpy as np
import pandas as pd

from mtl_jax import Fit, MixtureGLMM

LABELS = {"task_names": ["a", "b", "c"], "component_columns": ["intercept", "t"], "mixing_columns": ["intercept"],
          "response_names": ["y"], "random_effect_columns": ["intercept"]}


def hand_made_fit(task_tables: dict) -> Fit:
    """A Fit of a task-membership mixture GLMM with random parameters and the given tables."""
    model = MixtureGLMM(num_components=2, membership="task", mixing_covariates=())
    rng = np.random.default_rng(3)
    skeleton = model.params_like(LABELS)
    params = type(skeleton)(*(rng.normal(size=np.shape(leaf)) for leaf in skeleton))
    return Fit(model=model, method="em", params=params, loglik=-12.5, bic=40.0, converged=True, n_iter=7,
               trace=np.linspace(-20.0, -12.5, 7), labels=LABELS, num_obs=12, task_tables=task_tables)


def task_table(values, columns) -> pd.DataFrame:
    return pd.DataFrame(np.asarray(values, dtype=float), index=pd.Index(LABELS["task_names"], name="task"),
                        columns=columns)


def test_task_tables_round_trip_through_the_fit_json(tmp_path):
    tables = {
        "component_sd": task_table([[0.1, 0.25], [0.3, np.nan], [1e-300, 2.5]], ["B1", "B2"]),
        "class_probabilities": task_table([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], ["1", "2"]),
    }
    path = tmp_path / "fit.json"
    hand_made_fit(tables).save(path)

    stored = json.loads(path.read_text())
    assert stored["class_probabilities"] == {"a": [0.9, 0.1], "b": [0.2, 0.8], "c": [0.5, 0.5]}
    assert stored["task_tables"]["component_sd"] == {
        "columns": ["B1", "B2"], "rows": {"a": [0.1, 0.25], "b": [0.3, None], "c": [1e-300, 2.5]}}

    loaded = Fit.load(path)
    assert sorted(loaded.task_tables) == sorted(tables)
    for name, table in tables.items():
        pd.testing.assert_frame_equal(loaded.task_tables[name], table)  # values bit for bit, NaN kept


def test_fit_files_without_task_tables_still_load():
    content = hand_made_fit({"class_probabilities": task_table([[1, 0], [0, 1], [1, 0]], ["1", "2"])}).to_dict()
    del content["task_tables"], content["class_probabilities"]
    assert Fit.from_dict(content).task_tables == {}


def test_a_fit_without_class_probabilities_writes_no_such_key():
    content = hand_made_fit({"component_sd": task_table([[1, 2], [3, 4], [5, 6]], ["B1", "B2"])}).to_dict()
    assert "class_probabilities" not in content
    assert list(content["task_tables"]) == ["component_sd"]
