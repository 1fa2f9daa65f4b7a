"""Tests for the ``mtl-jax`` command line.

Almost everything runs in-process through ``mtl_jax.cli.main`` (float64, see conftest); one
test runs the installed console script in a subprocess (``--version`` and one short fit).
The fits are kept small (one EM start, few SVI steps and NUTS draws) and shared per module.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from support import COVARIATES, run_main, simulated_frame

import mtl_jax
import mtl_jax.cli
import mtl_jax.experiments
from mtl_jax import Fit, MixtureGLMM, TaskData
from mtl_jax.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASKS = ["t0", "t1", "t2", "t3"]
EM_QUICK = ["--method", "em", "--n-init", "1", "--max-iter", "50"]
LMM_VARIANTS = {"lmm": [], "lmm_no_mixing": ["--no-mixing-random-effects"]}


def fit_args(csv: Path, out: Path, *extra: str) -> list[str]:
    """Arguments of an ``mtl-jax fit`` call on the simulated frame's columns."""
    return ["fit", str(csv), "--task", "task", "--response", "y", "--covariates", *COVARIATES,
            "--out", str(out), *extra]


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


def normal_logpdf(y, mean, var):
    return -0.5 * (np.log(2 * np.pi * var) + (y - mean) ** 2 / var)


def design_matrix(frame: pd.DataFrame, train: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """``[1, standardised columns]``, standardised with the training mean and population sd."""
    x = (frame[columns] - train[columns].mean()) / train[columns].std(ddof=0)
    return np.column_stack([np.ones(len(frame)), x.to_numpy()])


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """The training CSV, rows of training tasks, and rows of a task unseen in training."""
    root = tmp_path_factory.mktemp("cli")
    frame = simulated_frame()
    paths = SimpleNamespace(root=root, frame=frame, train=root / "train.csv", seen=root / "seen.csv",
                            unseen=root / "unseen.csv")
    frame.to_csv(paths.train, index=False)
    frame.iloc[::16].to_csv(paths.seen, index=False)  # rows of every training task
    frame[frame.task == "t2"].head(12).assign(task="new school").to_csv(paths.unseen, index=False)
    return paths


@pytest.fixture(scope="module")
def console(data):
    """The installed ``mtl-jax`` script started in the background (a fresh float32 process):
    ``--version``, and EM with ``--max-iter 3``; returns ``finish() -> {name: (status, stdout, stderr)}``."""
    script = Path(sys.executable).with_name("mtl-jax")
    assert script.exists(), script
    out = data.root / "console.json"
    commands = {
        "version": [str(script), "--version"],
        "fit": [str(script), *fit_args(data.train, out, "--components", "1", "--method", "em",
                                       "--n-init", "1", "--max-iter", "3")],
    }
    started = {}
    for name, command in commands.items():
        streams = (data.root / f"console_{name}.out").open("w"), (data.root / f"console_{name}.err").open("w")
        started[name] = subprocess.Popen(command, stdout=streams[0], stderr=streams[1], text=True), streams

    def finish() -> dict:
        results = {}
        for name, (process, streams) in started.items():
            status = process.wait(timeout=300)
            for stream in streams:
                stream.close()
            results[name] = (status, *(Path(stream.name).read_text() for stream in streams))
        return results

    yield SimpleNamespace(out=out, finish=finish)
    for process, _ in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def lmm(data, console) -> dict[str, SimpleNamespace]:
    """The linear mixed model (g = 1, component effects) fitted by the CLI, with and
    without ``--no-mixing-random-effects``, each with predict and score on seen and unseen rows.

    Takes ``console`` only to start the subprocess test early: it runs while these fit."""
    fits = {}
    for name, extra in LMM_VARIANTS.items():
        out = data.root / f"{name}.json"
        run = run_main(fit_args(data.train, out, "--components", "1", *extra, *EM_QUICK))
        assert run.status == 0, run.err
        fitted = SimpleNamespace(out=out, run=run, saved=json.loads(out.read_text()), fit=Fit.load(out))
        for command in ("predict", "score"):
            for rows in ("seen", "unseen"):
                written = data.root / f"{name}_{command}_{rows}.csv"
                run = run_main([command, str(out), str(getattr(data, rows)), "--out", str(written)])
                assert run.status == 0, run.err
                setattr(fitted, f"{command}_{rows}", read_csv(written))
        fits[name] = fitted
    return fits


@pytest.fixture(scope="module")
def svi(data) -> SimpleNamespace:
    """A g = 2 SVI fit with mixing effects (mixing covariates x1, x2; no component effects,
    whose integration the LMM tests check), scored on unseen rows."""
    out, scores = data.root / "svi.json", data.root / "svi_scores.csv"
    run = run_main(fit_args(data.train, out, "--components", "2", "--mixing-covariates", "x1", "x2",
                            "--no-component-random-effects", "--method", "svi", "--num-steps", "123",
                            "--svi-samples", "100"))
    assert run.status == 0, run.err
    scored = run_main(["score", str(out), str(data.unseen), "--out", str(scores)])
    assert scored.status == 0, scored.err
    return SimpleNamespace(out=out, run=run, saved=json.loads(out.read_text()), fit=Fit.load(out),
                           scores=read_csv(scores))


@pytest.fixture(scope="module")
def nuts(data) -> SimpleNamespace:
    """A short two-chain NUTS fit (g = 2 without random effects, the cheapest program)."""
    out = data.root / "nuts.json"
    run = run_main(fit_args(data.train, out, "--components", "2", "--no-mixing-random-effects",
                            "--no-component-random-effects", "--method", "nuts", "--num-warmup", "50",
                            "--num-samples", "40", "--num-chains", "2", "--mass-matrix", "dense"))
    assert run.status == 0, run.err
    return SimpleNamespace(out=out, run=run, saved=json.loads(out.read_text()), fit=Fit.load(out))


# ------------------------------------------------------ 1. the linear mixed model
@pytest.mark.parametrize("variant", LMM_VARIANTS)
def test_lmm_json_has_documented_keys_and_shapes(lmm, variant):
    saved = lmm[variant].saved
    assert saved["format"] == "mtl_jax.fit/2" and saved["method"] == "em"
    assert saved["model"]["config"]["num_components"] == 1
    assert saved["model"]["config"]["mixing_random_effects"] == (variant == "lmm")
    assert np.isfinite(saved["loglik"]) and np.isfinite(saved["bic"])
    assert isinstance(saved["converged"], bool) and 0 < saved["n_iter"] <= 50
    assert np.shape(saved["mixing_coef"]) == (0,)  # g - 1 = 0 rows
    assert np.shape(saved["component_coef"]) == (1, 1 + len(COVARIATES))
    assert np.shape(saved["component_cov"]) == (1, 1, 1)
    components = saved["variance_components"]
    assert components["mixing"] == [] and components["mixing_cov"] == []
    assert np.shape(components["component"]) == (1, 1) and components["component"][0][0] > 0
    assert sorted(saved["random_effects"]["mixing"]) == sorted(saved["random_effects"]["component"]) == TASKS
    assert all(np.shape(saved["random_effects"]["component"][task]) == (1,) for task in TASKS)
    assert all(saved["random_effects"]["mixing"][task] == [] for task in TASKS)
    assert saved["diagnostics"]["restart_logliks"] and len(saved["diagnostics"]["restart_logliks"]) == 1  # --n-init 1


@pytest.mark.parametrize("variant", LMM_VARIANTS)
def test_lmm_prints_options_and_summary(lmm, variant):
    printed = lmm[variant].run.out
    assert "with EM (n_init=1, max_iter=50) ..." in printed
    for word in ("loglik", "BIC", "converged", "n_iter", "w[1, intercept]", "w[1, x4]", "sigma2[1]", "phi[1]"):
        assert word in printed
    assert "lambda" not in printed and "v[" not in printed  # no mixing part at g = 1


@pytest.mark.filterwarnings("ignore::mtl_jax.FitWarning")
@pytest.mark.parametrize("variant", LMM_VARIANTS)
def test_lmm_cli_fit_equals_public_fit(lmm, data, variant):
    cli = lmm[variant]
    model = MixtureGLMM(num_components=1, covariates=tuple(COVARIATES), mixing_covariates=tuple(COVARIATES),
                        mixing_random_effects=variant == "lmm")
    public = mtl_jax.fit(model, TaskData.from_csv(data.train, task="task", response="y", covariates=COVARIATES),
                         "em", seed=0, n_init=1, max_iter=50)
    assert cli.fit.model == public.model
    for field in ("component_coef", "component_cov", "component_effects_cov", "component_effects"):
        np.testing.assert_allclose(getattr(cli.fit.params, field), getattr(public.params, field), rtol=1e-12)
    np.testing.assert_allclose(cli.saved["component_coef"], public.params.component_coef[..., 0], rtol=1e-12)
    assert cli.saved["loglik"] == pytest.approx(public.loglik, rel=1e-12)
    assert cli.saved["n_iter"] == public.n_iter


def test_lmm_mixing_effects_flag_is_moot_at_one_component(lmm):
    with_flag, without = lmm["lmm"].fit, lmm["lmm_no_mixing"].fit
    for field in ("component_coef", "component_cov", "component_effects_cov", "component_effects"):
        np.testing.assert_allclose(getattr(with_flag.params, field), getattr(without.params, field), rtol=1e-8)
    assert with_flag.loglik == pytest.approx(without.loglik, rel=1e-10)


@pytest.mark.parametrize("variant", LMM_VARIANTS)
def test_lmm_predict_keeps_inputs_and_uses_task_effects(lmm, data, variant):
    saved = lmm[variant].saved
    w = np.asarray(saved["component_coef"][0])
    for rows in ("seen", "unseen"):
        inputs = read_csv(getattr(data, rows))
        written = getattr(lmm[variant], f"predict_{rows}")
        assert list(written.columns) == [*inputs.columns, "pred_y"]
        pd.testing.assert_frame_equal(written[inputs.columns], inputs)
        np.testing.assert_array_equal(written["pred_y"], lmm[variant].fit.predict(inputs)[:, 0])
        effect = 0.0 if rows == "unseen" else np.array([saved["random_effects"]["component"][t][0]
                                                        for t in inputs.task])
        expected = design_matrix(inputs, data.frame, COVARIATES) @ w + effect
        np.testing.assert_allclose(written["pred_y"], expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------- 4. score
@pytest.mark.parametrize("variant", LMM_VARIANTS)
@pytest.mark.parametrize("rows", ["seen", "unseen"])
def test_lmm_score_is_the_normal_log_density(lmm, data, variant, rows):
    fitted = lmm[variant]
    saved = fitted.saved
    inputs = read_csv(getattr(data, rows))
    written = getattr(fitted, f"score_{rows}")
    assert list(written.columns) == [*inputs.columns, "loglik"]
    np.testing.assert_allclose(written["loglik"], fitted.fit.score(inputs), rtol=1e-12)

    mean = design_matrix(inputs, data.frame, COVARIATES) @ np.asarray(saved["component_coef"][0])
    sigma2 = saved["component_cov"][0][0][0]
    if rows == "seen":  # the task's predicted effect plugged in
        mean = mean + np.array([saved["random_effects"]["component"][task][0] for task in inputs.task])
        var = sigma2
    else:  # the effect b ~ N(0, phi) integrated out exactly
        var = sigma2 + saved["variance_components"]["component"][0][0]
    np.testing.assert_allclose(written["loglik"], normal_logpdf(inputs.y.to_numpy(), mean, var), rtol=1e-9)


def test_mixture_score_of_unseen_task_integrates_the_effects_out(svi, data):
    saved, inputs, loglik = svi.saved, read_csv(data.unseen), svi.scores["loglik"].to_numpy()
    np.testing.assert_allclose(loglik, svi.fit.score(inputs), rtol=1e-12)

    y = inputs.y.to_numpy()
    means = design_matrix(inputs, data.frame, COVARIATES) @ np.asarray(saved["component_coef"]).T  # [n, 2]
    sigma2 = np.asarray(saved["component_cov"])[:, 0, 0]
    phi = np.asarray(saved["variance_components"]["component"])[:, 0]  # zeros: no component effects
    base = design_matrix(inputs, data.frame, ["x1", "x2"]) @ np.asarray(saved["mixing_coef"][0])
    lam = saved["variance_components"]["mixing_cov"][0][0]
    assert lam > 0

    # reference: sum_h E_a[pi_h(x, a)] N(y; mu_h, sigma2_h + phi_h), a ~ N(0, lambda), by a converged
    # 200-point Gauss-Hermite rule; the model's 1-d rule has 20 points, off by ~1e-3 when lambda is ~10
    nodes, weights = np.polynomial.hermite.hermgauss(200)
    pi1 = (weights / np.sqrt(np.pi)) @ (1 / (1 + np.exp(-(base[None] + np.sqrt(2 * lam) * nodes[:, None]))))
    integrated = np.log(pi1 * np.exp(normal_logpdf(y, means[:, 0], sigma2[0] + phi[0]))
                        + (1 - pi1) * np.exp(normal_logpdf(y, means[:, 1], sigma2[1] + phi[1])))
    np.testing.assert_allclose(loglik, integrated, rtol=0, atol=5e-3)

    zero_pi1 = 1 / (1 + np.exp(-base))  # plugging in a = 0, b = 0 instead
    plug_in = np.log(zero_pi1 * np.exp(normal_logpdf(y, means[:, 0], sigma2[0]))
                     + (1 - zero_pi1) * np.exp(normal_logpdf(y, means[:, 1], sigma2[1])))
    assert np.max(np.abs(loglik - plug_in)) > 0.05, np.abs(loglik - plug_in)


def test_three_component_mixture_ends_where_the_loglik_is_flat_in_the_mixing_coefficients(data, tmp_path):
    """g = 3 by the command line (two mixing logits: the Newton step's weights have off-diagonal
    blocks): the saved log-likelihood is the mixture's, computed here from the saved
    parameters, and its gradient in the mixing coefficients (central differences) is zero."""
    out = tmp_path / "g3.json"
    run = run_main(fit_args(data.train, out, "--components", "3", "--no-mixing-random-effects",
                            "--no-component-random-effects", "--mixing-covariates", "x1", "x2",
                            "--method", "em", "--n-init", "2", "--max-iter", "1000"))
    assert run.status == 0, run.err
    saved = json.loads(out.read_text())
    assert saved["converged"]
    y = data.frame.y.to_numpy()
    means = design_matrix(data.frame, data.frame, COVARIATES) @ np.asarray(saved["component_coef"]).T  # [n, 3]
    sigma2 = np.asarray(saved["component_cov"])[:, 0, 0]
    x_mix = design_matrix(data.frame, data.frame, ["x1", "x2"])

    def loglik(v):
        logits = np.column_stack([x_mix @ v.T, np.zeros(len(y))])
        log_pi = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return np.log(np.exp(log_pi + normal_logpdf(y[:, None], means, sigma2)).sum(1)).sum()

    v = np.asarray(saved["mixing_coef"])
    assert v.shape == (2, 3)
    np.testing.assert_allclose(saved["loglik"], loglik(v), rtol=1e-9)
    for shift, small in ((0.0, True), (0.1, False)):  # flat at the fit, steep off it
        grad = np.zeros_like(v)
        for index in np.ndindex(v.shape):
            step = np.zeros_like(v)
            step[index] = 1e-6
            grad[index] = (loglik(v + shift + step) - loglik(v + shift - step)) / 2e-6
        assert (np.max(np.abs(grad)) < 1e-2) == small, grad


# ----------------------------------------------------- 2. backend options arrive
def test_svi_options_reach_the_backend(svi):
    assert "with SVI (num_steps=123, num_samples=100) ..." in svi.run.out
    assert svi.saved["method"] == "svi" and svi.saved["n_iter"] == 123
    assert len(svi.saved["trace"]) == 123
    assert {tuple(record["shape"][:2]) for record in svi.saved["draws"]} == {(1, 100)}  # --svi-samples
    assert svi.saved["labels"]["mixing_columns"] == ["intercept", "x1", "x2"]
    assert np.shape(svi.saved["mixing_coef"]) == (1, 3)
    assert np.shape(svi.saved["random_effects"]["mixing"]["t0"]) == (1,)
    assert np.shape(svi.saved["random_effects"]["component"]["t0"]) == (2,)
    assert svi.saved["variance_components"]["component"] == [[0.0], [0.0]]


def test_nuts_options_reach_the_backend(nuts):
    assert "with NUTS (num_warmup=50, num_samples=40, num_chains=2, mass_matrix=dense) ..." in nuts.run.out
    assert nuts.saved["diagnostics"]["mean_leapfrog_steps"] >= 1
    assert nuts.saved["method"] == "nuts" and nuts.saved["n_iter"] == 40
    assert {tuple(record["shape"][:2]) for record in nuts.saved["draws"]} == {(2, 40)}
    assert nuts.fit.draws.component_coef.shape == (2, 40, 2, 1 + len(COVARIATES), 1)
    assert "r_hat" in nuts.fit.summary().columns
    if not nuts.saved["converged"]:
        assert "warning: " in nuts.run.err


@pytest.mark.parametrize(
    ("method", "flag", "owner"),
    [
        ("em", "--num-steps", "svi"),
        ("em", "--num-samples", "nuts"),
        ("em", "--guide", "svi"),
        ("svi", "--num-samples", "nuts"),
        ("svi", "--max-iter", "em"),
        ("nuts", "--svi-samples", "svi"),
        ("nuts", "--tol", "em"),
        ("nuts", "--svi-parameterisation", "svi"),
        ("svi", "--nuts-parameterisation", "nuts"),
    ],
)
def test_option_of_another_backend_exits_2_naming_it(data, tmp_path, method, flag, owner):
    out = tmp_path / "fit.json"
    value = {"--guide": "normal", "--svi-parameterisation": "centred", "--nuts-parameterisation": "centred"}.get(flag, "5")
    run = run_main(fit_args(data.train, out, "--components", "1", "--method", method, flag, value))
    assert run.status == 2
    assert run.err.startswith("mtl-jax: error: ")
    assert flag in run.err and repr(owner) in run.err and repr(method) in run.err
    assert not out.exists() and "fitting" not in run.out


@pytest.mark.parametrize(("method", "flag", "value"), [
    ("svi", "--num-steps", "0"), ("svi", "--svi-samples", "0"), ("nuts", "--num-samples", "0"),
    ("nuts", "--num-chains", "0"), ("nuts", "--num-warmup", "-1"),
])
def test_a_count_below_its_minimum_exits_2_naming_the_flag(data, tmp_path, method, flag, value):
    out = tmp_path / "fit.json"
    run = run_main(fit_args(data.train, out, "--components", "1", "--method", method, flag, value))
    assert run.status == 2 and f"mtl-jax fit: error: argument {flag}: must be at least" in run.err
    assert not out.exists() and "fitting" not in run.out


def test_backend_help_survives_repeated_parsers():
    for _ in range(2):
        run = run_main(["fit", "--help"])
        assert run.status == 0
        for text in ("[em/vb] EM random restarts", "[svi] SVI Adam steps", "[nuts] NUTS draws per chain",
                     "--svi-samples", "--num-samples", "--components"):
            assert text in run.out


def test_console_script_version_and_a_short_fit(console):
    """The installed ``mtl-jax`` in a fresh process (float32): ``--version``, then EM with
    ``--max-iter 3``, which stops early and warns on stderr."""
    results = console.finish()
    status, out, err = results["version"]
    assert status == 0, err
    assert out.strip() == f"mtl-jax {mtl_jax.__version__}"

    status, out, err = results["fit"]
    assert status == 0, err
    assert "with EM (n_init=1, max_iter=3) ..." in out
    saved = json.loads(console.out.read_text())
    assert 0 < saved["n_iter"] <= 3
    if not saved["converged"]:
        assert "warning: em did not converge" in err
    assert any(line.startswith("warning: ") for line in err.splitlines())
    loaded = Fit.load(console.out)
    assert loaded.n_iter == saved["n_iter"] and loaded.task_names == tuple(TASKS)


# ---------------------------------------------------- 3. --version, --model
def test_version_in_process(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mtl-jax {mtl_jax.__version__}"


def test_unknown_model_exits_2_listing_known_models(data, tmp_path):
    run = run_main(fit_args(data.train, tmp_path / "fit.json", "--model", "nonexistent", "--components", "2",
                            "--method", "em"))
    assert run.status == 2
    assert "nonexistent" in run.err and "mixture-glmm" in run.err
    assert not (tmp_path / "fit.json").exists()


def test_missing_components_exits_2(data, tmp_path):
    run = run_main(fit_args(data.train, tmp_path / "fit.json", "--method", "em"))
    assert run.status == 2 and "--components" in run.err


# ------------------------------------------------- 5. failed and doubtful fits
def test_numerically_failed_fit_exits_1_and_writes_nothing(data, tmp_path):
    """Responses of order 1e155 overflow the variance (y^2 is infinite): a genuine failure."""
    csv, out = tmp_path / "huge.csv", tmp_path / "fit.json"
    data.frame.assign(y=data.frame.y * 1e155).to_csv(csv, index=False)
    out.write_text("previous content")
    run = run_main(fit_args(csv, out, "--components", "1", *EM_QUICK))
    assert run.status == 1
    assert run.err.splitlines()[-1].startswith("mtl-jax: error: ")
    assert "non-finite" in run.err and "Traceback" not in run.err
    assert out.read_text() == "previous content"
    assert "fit written" not in run.out


def test_error_inside_the_backend_exits_1_and_writes_nothing(data, tmp_path, monkeypatch):
    def broken_fit(model, data, method, **options):
        raise ValueError("cannot reshape array of size 0")

    monkeypatch.setattr(mtl_jax.cli, "fit", broken_fit)
    out = tmp_path / "fit.json"
    run = run_main(fit_args(data.train, out, "--components", "1", *EM_QUICK))
    assert run.status == 1
    assert run.err.startswith("mtl-jax: error: the em fit failed (ValueError: cannot reshape")
    assert not out.exists()


# ------------------------------------------------------------- 6. bad input
def test_missing_covariate_value_exits_2_naming_column_row_and_task(data, tmp_path):
    frame = data.frame.copy()
    frame.loc[85, "x3"] = np.nan
    csv = tmp_path / "bad.csv"
    frame.to_csv(csv, index=False)
    run = run_main(fit_args(csv, tmp_path / "fit.json", "--components", "1", *EM_QUICK))
    assert run.status == 2
    assert run.err.startswith("mtl-jax: error: ")
    assert "'x3'" in run.err and "row 85" in run.err and "task 't1'" in run.err
    assert "Traceback" not in run.err


def test_unknown_column_exits_2_naming_it(data, tmp_path):
    args = fit_args(data.train, tmp_path / "fit.json", "--components", "1", *EM_QUICK)
    args[args.index("x4")] = "x9"
    run = run_main(args)
    assert run.status == 2 and run.err.startswith("mtl-jax: error: ") and "'x9'" in run.err


def test_score_without_response_exits_2_naming_it(lmm, data, tmp_path):
    csv = tmp_path / "no_y.csv"
    read_csv(data.unseen).drop(columns="y").to_csv(csv, index=False)
    run = run_main(["score", str(lmm["lmm"].out), str(csv), "--out", str(tmp_path / "s.csv")])
    assert run.status == 2 and "'y'" in run.err
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("command", ["fit", "predict", "score"])
def test_missing_file_exits_2(data, tmp_path, command):
    absent = tmp_path / "absent.csv"
    if command == "fit":
        argv = fit_args(absent, tmp_path / "fit.json", "--components", "1", *EM_QUICK)
    else:
        argv = [command, str(tmp_path / "absent.json"), str(data.seen), "--out", str(tmp_path / "p.csv")]
    run = run_main(argv)
    assert run.status == 2 and run.err.startswith("mtl-jax: error: ") and "absent." in run.err


def test_malformed_fit_file_exits_2(data, tmp_path):
    for content in ("not json", '{"format": "mtl_jax.fit/1"}', '{"format": "mtl_jax.fit/2"}'):
        path = tmp_path / "fit.json"
        path.write_text(content)
        run = run_main(["predict", str(path), str(data.seen), "--out", str(tmp_path / "p.csv")])
        assert run.status == 2 and run.err.startswith("mtl-jax: error: "), run.err
        assert "Traceback" not in run.err


def test_missing_output_directory_exits_2_before_fitting(data, tmp_path):
    run = run_main(fit_args(data.train, tmp_path / "no" / "fit.json", "--components", "1", *EM_QUICK))
    assert run.status == 2 and "does not exist" in run.err and "fitting" not in run.out


# ----------------------------------------------------------------------- run
def test_run_passes_config_and_writes_results(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_experiment(config, *, progress=True, journal=None, resume=True):
        calls.append((config, progress, journal, resume))
        return {"table": [[1.0, np.float32(2.0)]], "replicates": np.int64(3)}

    monkeypatch.setattr(mtl_jax.experiments, "run_experiment", fake_run_experiment, raising=False)
    config = tmp_path / "tiny.yaml"
    config.write_text("experiment: simulation_study\ncomponents: [2]\ntol: 1.0e-8\n")
    out_dir = tmp_path / "out"
    assert main(["run", str(config), "--out-dir", str(out_dir)]) == 0

    assert calls == [
        ({"experiment": "simulation_study", "components": [2], "tol": 1e-8}, True, out_dir / "tiny.jsonl", True)
    ]
    written = json.loads((out_dir / "tiny.json").read_text())
    assert written == {"table": [[1.0, 2.0]], "replicates": 3}
    assert str(out_dir / "tiny.json") in capsys.readouterr().out


def test_run_rejects_a_config_that_is_not_a_mapping(tmp_path):
    config = tmp_path / "list.yaml"
    config.write_text("- 1\n- 2\n")
    run = run_main(["run", str(config)])
    assert run.status == 2 and "YAML mapping" in run.err


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("simulation_study", "table2"),
        ("simulation_study_small", "table2"),
        ("school_study", "school"),
        ("sequence_study", "sequence_study"),
        ("sequence_study_small", "sequence_study"),
    ],
)
def test_configs_use_only_settings_their_experiment_knows(name, module):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    defaults = importlib.import_module(f"mtl_jax.experiments.{module}").DEFAULT_CONFIG
    assert config["experiment"] == defaults["experiment"] == name.removesuffix("_small")
    assert config["experiment"] in mtl_jax.experiments.EXPERIMENTS
    assert set(config) <= set(defaults)
    assert isinstance(config["tol"], float) and isinstance(config["seed"], int)
