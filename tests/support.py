"""Small problems and helpers shared by several test modules."""

import contextlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from mtl_jax.experiments.simulation import simulate_study
from mtl_jax.models.mixture_glmm import MixtureDesign, MixtureParams

COVARIATES = ["x1", "x2", "x3", "x4"]


def random_problem(p, g=3, K=2, n=9, seed=0):
    """Random parameters (variances away from zero) and data at a tiny size."""
    rng = np.random.default_rng(seed)
    x_comp = np.column_stack([np.ones(n), rng.normal(size=(n, 2))])
    x_mix = np.column_stack([np.ones(n), rng.normal(size=n)])
    root = rng.normal(size=(g, p, p))
    lam_root = rng.normal(size=(g - 1, g - 1))
    params = MixtureParams(
        mixing_coef=rng.normal(size=(g - 1, 2)),
        component_coef=rng.normal(size=(g, 3, p)),
        component_cov=root @ np.swapaxes(root, 1, 2) + np.eye(p),
        mixing_cov=lam_root @ lam_root.T + 0.5 * np.eye(g - 1),
        component_effects_cov=np.stack([np.diag(v) for v in rng.uniform(0.5, 2, size=(g, p))]),
        mixing_effects=rng.normal(size=(K, g - 1)),
        component_effects=rng.normal(size=(K, g, 1, p)),
        class_logits=np.zeros((K, g)),
    )
    design = MixtureDesign(
        y=jnp.asarray(rng.normal(size=(n, p))),
        x_comp=jnp.asarray(x_comp),
        x_mix=jnp.asarray(x_mix),
        task=jnp.asarray(np.arange(n) % K, dtype=jnp.int32),
        num_tasks=K,
    )
    return MixtureParams(*map(jnp.asarray, params)), design


def simulated_frame() -> pd.DataFrame:
    """Four tasks of 80 rows from the Table 1 simulator with g = 2, as a raw data frame."""
    study = simulate_study(jax.random.key(0), 2, num_tasks=4, n_per_task=80)
    x = np.asarray(study.train.x_comp)
    return pd.DataFrame(
        {
            "task": [f"t{k}" for k in np.asarray(study.train.task)],
            "y": np.asarray(study.train.y)[:, 0],
            **{name: x[:, j + 1] for j, name in enumerate(COVARIATES)},
        }
    )


def set_cell(frame: pd.DataFrame, column: str, row, value) -> pd.DataFrame:
    """Returns a copy of ``frame`` with one cell replaced."""
    changed = frame.copy()
    changed.loc[row, column] = value
    return changed


def run_main(argv: list[str]) -> SimpleNamespace:
    """``mtl-jax`` in process: its exit status (0, or a SystemExit code) and printed output."""
    from mtl_jax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_info:
            status = exit_info.code
    return SimpleNamespace(status=status, out=out.getvalue(), err=err.getvalue())


def cli_fit_predict_score(tmp_path, frame: pd.DataFrame, fit_args: list[str], response: str):
    """``mtl-jax fit`` (``fit_args`` after the CSV), ``predict`` and ``score`` in fresh processes on
    ``frame``; asserts each exits 0, that ``pred_<response>`` equals the saved fit's ``predict``
    (rtol 1e-5) and ``loglik`` its ``score`` (rtol 1e-4: float32 CLI against float64 here).

    Returns:
        ``(saved fit JSON, scored table)``.
    """
    from mtl_jax import Fit

    csv, out = tmp_path / "people.csv", tmp_path / "fit.json"
    frame.to_csv(csv, index=False)
    run = [sys.executable, "-m", "mtl_jax.cli"]
    fitted = subprocess.run([*run, "fit", str(csv), *fit_args, "--out", str(out)], capture_output=True, text=True)
    assert fitted.returncode == 0, fitted.stderr
    pred, scored = tmp_path / "pred.csv", tmp_path / "scored.csv"
    done = subprocess.run([*run, "predict", str(out), str(csv), "--out", str(pred)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(pd.read_csv(pred)[f"pred_{response}"], Fit.load(out).predict(frame)[:, 0], rtol=1e-5)
    done = subprocess.run([*run, "score", str(out), str(csv), "--out", str(scored)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(scored)
    np.testing.assert_allclose(table["loglik"].to_numpy(), Fit.load(out).score(frame), rtol=1e-4)
    return json.loads(out.read_text()), table
