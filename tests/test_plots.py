"""mtl_jax.plots and `mtl-jax plot` on real EM and SVI fits of a tiny trajectory data set.

Eight tasks (people) of six time points in two classes of trajectories (rising, falling),
fitted with the mixture GLMM with membership per task. Every figure is checked against
its inputs recomputed here: sorted dots and interval ends from the draws or tables,
highest-density intervals by brute force, class mean trajectories from the parameters.
"""

import dataclasses
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from support import run_main  # noqa: E402

from mtl_jax import MixtureGLMM, TaskData, fit, plots  # noqa: E402

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal
MODEL = MixtureGLMM(num_components=2, membership="task", mixing_covariates=())
EM_OPTIONS = dict(n_init=1, max_iter=60, tol=1e-6)


@pytest.fixture(scope="module")
def frame():
    """People p0, p2, p4, p6 rise (1 + 0.6 t), p1, p3, p5, p7 fall (4 - 0.4 t), each shifted by its own effect."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(8):
        shift = rng.normal(0.0, 0.5)
        for t in range(6):
            mean = 1.0 + 0.6 * t if k % 2 == 0 else 4.0 - 0.4 * t
            rows.append({"person": f"p{k}", "t": float(t), "y": mean + shift + rng.normal(0.0, 0.3)})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=1).reset_index(drop=True)  # rows in no order


@pytest.fixture(scope="module")
def data(frame):
    return TaskData.from_dataframe(frame, task="person", response="y", covariates=["t"], standardize=True)


@pytest.fixture(scope="module")
def em_fit(data):
    result = fit(MODEL, data, "em", **EM_OPTIONS)
    assert result.converged and "se" in result.summary()
    return result


@pytest.fixture(scope="module")
def svi_fit(data, em_fit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit(MODEL, data, "svi", num_steps=100, num_samples=200, init_params=em_fit.params)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------ Fit side
def test_fit_keeps_the_models_task_tables(em_fit, svi_fit):
    for result in (em_fit, svi_fit):
        assert sorted(result.task_tables) == ["class_probabilities", "component_sd"]
        effects = result.random_effects()["component"]
        sds = result.task_tables["component_sd"]
        assert list(sds.columns) == list(effects.columns) and list(sds.index) == list(effects.index)
        assert np.all(sds.to_numpy() > 0)
        probabilities = result.task_tables["class_probabilities"]
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-12)
        # the two simulated classes are recovered (up to the labels' order)
        most_probable = probabilities.idxmax(axis=1)
        assert most_probable[["p0", "p2", "p4", "p6"]].nunique() == 1
        assert most_probable[["p1", "p3", "p5", "p7"]].nunique() == 1
        assert most_probable["p0"] != most_probable["p1"]


def test_fit_without_the_optional_method_has_no_task_tables(data, monkeypatch):
    monkeypatch.delattr(MixtureGLMM, "task_tables")
    assert fit(MODEL, data, "em", **EM_OPTIONS).task_tables == {}


# ------------------------------------------------------------ random effects
def check_dot_plot(figure, estimates: pd.DataFrame, sds: np.ndarray):
    """Each panel: tasks sorted by estimate, dots at the estimates, intervals estimate +- 1.96 sd."""
    axes = figure.axes
    assert [axis.get_title() for axis in axes] == list(estimates.columns)
    for c, axis in enumerate(axes):
        order = np.argsort(estimates.iloc[:, c].to_numpy())
        centre, half = estimates.iloc[:, c].to_numpy()[order], Z_95 * sds[:, c][order]
        assert [label.get_text() for label in axis.get_yticklabels()] == list(estimates.index[order])
        dots = [line for line in axis.lines if line.get_label() == "predicted effect"]
        assert len(dots) == 1
        np.testing.assert_allclose(dots[0].get_xdata(), centre, rtol=0, atol=0)
        np.testing.assert_allclose(dots[0].get_ydata(), np.arange(len(order)))
        segments = np.asarray(axis.collections[0].get_segments())  # [K, 2 ends, (x, y)]
        np.testing.assert_allclose(segments[:, 0, 0], centre - half, rtol=1e-12)
        np.testing.assert_allclose(segments[:, 1, 0], centre + half, rtol=1e-12)
        np.testing.assert_allclose(segments[:, :, 1], np.arange(len(order))[:, None] * np.ones(2))


def test_random_effects_of_an_em_fit_use_the_conditional_sds(em_fit):
    effects = em_fit.random_effects()["component"]
    sds = em_fit.task_tables["component_sd"].to_numpy()
    check_dot_plot(plots.random_effects(em_fit), effects, sds)


def test_random_effects_of_an_svi_fit_use_the_sd_of_the_draws(svi_fit):
    draws = np.asarray(svi_fit.draws.component_effects)  # [1, S, K, g, r=1, p=1]
    per_draw = draws.reshape(draws.shape[1], draws.shape[2], -1)  # [S, K, g]
    effects = svi_fit.random_effects()["component"]
    np.testing.assert_allclose(effects.to_numpy(), per_draw.mean(axis=0), rtol=1e-10)  # the posterior mean
    check_dot_plot(plots.random_effects(svi_fit), effects, per_draw.std(axis=0, ddof=1))


def test_random_effects_of_the_mixing_part_use_its_table(em_fit):
    rng = np.random.default_rng(5)
    K = len(em_fit.task_names)
    params = em_fit.params._replace(mixing_effects=rng.normal(size=(K, 1)))
    sds = rng.uniform(0.1, 1.0, size=(K, 1))
    tables = {**em_fit.task_tables,
              "mixing_sd": pd.DataFrame(sds, index=pd.Index(em_fit.task_names, name="task"), columns=["A1"])}
    with_mixing = dataclasses.replace(em_fit, params=params, task_tables=tables)
    effects = with_mixing.random_effects()["mixing"]
    np.testing.assert_array_equal(effects.to_numpy(), params.mixing_effects)
    check_dot_plot(plots.random_effects(with_mixing, part="mixing"), effects, sds)


def test_random_effects_draw_on_given_axes(em_fit):
    figure, axes = plt.subplots(1, 2)
    assert plots.random_effects(em_fit, ax=axes) is figure
    with pytest.raises(ValueError, match="2 columns"):
        plots.random_effects(em_fit, ax=axes[0])


def test_random_effects_errors(em_fit):
    with pytest.raises(ValueError, match="no mixing random effects"):
        plots.random_effects(em_fit, part="mixing")
    with pytest.raises(ValueError, match="unknown part 'slopes'"):
        plots.random_effects(em_fit, part="slopes")
    without_tables = dataclasses.replace(em_fit, task_tables={})
    with pytest.raises(ValueError, match="no intervals"):
        plots.random_effects(without_tables)
    with pytest.raises(ValueError, match="level must be in"):
        plots.random_effects(em_fit, level=1.0)


# -------------------------------------------------------------- trajectories
def test_trajectories_put_each_task_in_its_class_under_the_class_mean(em_fit, frame):
    figure = plots.trajectories(em_fit, frame, "t")
    probabilities = em_fit.task_tables["class_probabilities"]
    params = em_fit.params
    (column, centre, scale), = em_fit.schema.standardized
    assert column == "t"
    times = np.arange(6.0)
    assert len(figure.axes) == 2
    for h, axis in enumerate(figure.axes):
        members = sorted(probabilities.index[probabilities.to_numpy().argmax(axis=1) == h])
        assert axis.get_title() == f"class {h + 1} ({len(members)} tasks)"
        task_lines = {line.get_label(): line for line in axis.lines if line.get_label() != "class mean"}
        assert sorted(task_lines) == members
        for name, line in task_lines.items():
            rows = frame[frame["person"] == name].sort_values("t")
            np.testing.assert_array_equal(line.get_xdata(), rows["t"].to_numpy())
            np.testing.assert_array_equal(line.get_ydata(), rows["y"].to_numpy())
        # class mean: W_h' x(t) plus the mean effect of its members (their P(class h) is 1 to rounding)
        mean_line, = [line for line in axis.lines if line.get_label() == "class mean"]
        intercept, slope = np.asarray(params.component_coef)[h, :, 0]
        effects = np.asarray(params.component_effects)[:, h, 0, 0]
        member_ids = [em_fit.task_names.index(name) for name in members]
        expected = intercept + slope * (times - centre) / scale + effects[member_ids].mean()
        np.testing.assert_array_equal(mean_line.get_xdata(), times)
        np.testing.assert_allclose(mean_line.get_ydata(), expected, rtol=1e-9)


def test_trajectories_errors(em_fit, frame):
    per_observation = dataclasses.replace(
        em_fit, task_tables={"component_sd": em_fit.task_tables["component_sd"]})
    with pytest.raises(ValueError, match="no class probabilities per task"):
        plots.trajectories(per_observation, frame, "t")
    with pytest.raises(ValueError, match=r"column\(s\) \['hour'\]"):
        plots.trajectories(em_fit, frame, "hour")
    stranger = pd.concat([frame, pd.DataFrame({"person": ["q9"], "t": [0.0], "y": [1.0]})], ignore_index=True)
    with pytest.raises(ValueError, match=r"task 'q9' \(row 48\) was not fitted"):
        plots.trajectories(em_fit, stranger, "t")


# ------------------------------------------------------------ memberships
def test_cluster_memberships_stack_each_tasks_probabilities_grouped_by_class(em_fit):
    figure = plots.cluster_memberships(em_fit)
    probabilities = em_fit.task_tables["class_probabilities"]
    axis, = figure.axes
    labels = [tick.get_text() for tick in axis.get_yticklabels()]
    assert sorted(labels) == sorted(probabilities.index)
    classes = probabilities.loc[labels].to_numpy().argmax(axis=1)
    assert np.all(np.diff(classes) >= 0)  # grouped by most probable class
    assert [bars.get_label() for bars in axis.containers] == [f"class {c}" for c in probabilities.columns]
    for bars, column in zip(axis.containers, probabilities.columns):
        np.testing.assert_allclose([bar.get_width() for bar in bars], probabilities.loc[labels, column], atol=1e-12)
    ends = np.array([bar.get_x() + bar.get_width() for bar in axis.containers[-1]])
    np.testing.assert_allclose(ends, 1.0, rtol=1e-9)  # each stack sums to one
    per_observation = dataclasses.replace(
        em_fit, task_tables={"component_sd": em_fit.task_tables["component_sd"]})
    with pytest.raises(ValueError, match="no class probabilities per task"):
        plots.cluster_memberships(per_observation)


# --------------------------------------------------------------------- trace
def test_trace_is_the_fits_trace(em_fit, svi_fit):
    for result in (em_fit, svi_fit):
        line, = plots.em_trace(result).axes[0].lines
        np.testing.assert_array_equal(line.get_ydata(), result.trace)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, len(result.trace) + 1))
    assert len(em_fit.trace) == em_fit.n_iter and len(svi_fit.trace) == 100
    with pytest.raises(ValueError, match="no trace"):
        plots.em_trace(dataclasses.replace(em_fit, trace=np.array([])))


# ------------------------------------------------------------------- compare
def shortest_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Brute force: the narrowest window of floor(level * n) + 1 sorted draws."""
    ordered = np.sort(values)
    span = int(np.floor(level * len(ordered)))
    widths = [ordered[i + span] - ordered[i] for i in range(len(ordered) - span)]
    start = int(np.argmin(widths))
    return ordered[start], ordered[start + span]


def test_compare_estimates_side_by_side(em_fit, svi_fit):
    figure = plots.compare_estimates({"em": em_fit, "svi": svi_fit})
    em_table = em_fit.summary()
    named_draws = svi_fit.model.named_parameters(svi_fit.draws, svi_fit.labels, leading=2)
    names = list(em_table.index)
    assert names == list(svi_fit.summary().index)
    assert [axis.get_ylabel() for axis in figure.axes] == names
    for axis, name in zip(figure.axes, names):
        marks = {line.get_label(): line for line in axis.lines}
        intervals = {collection.get_label(): np.asarray(collection.get_segments())[0]
                     for collection in axis.collections}
        draws = np.asarray(named_draws[name]).ravel()
        expected = {
            "em": (em_table.loc[name, "estimate"], em_table.loc[name, "estimate"] - Z_95 * em_table.loc[name, "se"],
                   em_table.loc[name, "estimate"] + Z_95 * em_table.loc[name, "se"]),
            "svi": (draws.mean(), *shortest_interval(draws, 0.95)),
        }
        for b, (label, (estimate, lower, upper)) in enumerate(expected.items()):
            np.testing.assert_allclose(marks[label].get_xdata(), [estimate], rtol=1e-10)
            np.testing.assert_array_equal(marks[label].get_ydata(), [b])
            np.testing.assert_allclose(intervals[label], [[lower, b], [upper, b]], rtol=1e-10)


def test_compare_estimates_needs_a_fit():
    with pytest.raises(ValueError, match="at least one fit"):
        plots.compare_estimates({})


# ----------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def fit_files(tmp_path_factory, frame, em_fit, svi_fit):
    folder = tmp_path_factory.mktemp("plots")
    em_fit.save(folder / "em.json")
    svi_fit.save(folder / "svi.json")
    frame.to_csv(folder / "rows.csv", index=False)
    return folder


@pytest.mark.parametrize("kind, more_fits, options", [
    ("random-effects", [], []),
    ("trajectories", [], ["--data", "rows.csv", "--time", "t"]),
    ("clusters", [], []),
    ("trace", [], []),
    ("compare", ["svi.json"], []),
])
def test_cli_writes_a_png_for_each_kind(fit_files, kind, more_fits, options):
    out = fit_files / f"{kind}.png"
    result = run_main(plot_command(fit_files, more_fits, ["--kind", kind, *options], out))
    assert result.status == 0, result.err
    content = out.read_bytes()
    assert content.startswith(b"\x89PNG\r\n\x1a\n") and len(content) > 1000
    assert f"{kind} figure written to {out}" in result.out


@pytest.mark.parametrize("more_fits, options, message", [
    ([], ["--kind", "histogram"], "invalid choice: 'histogram'"),
    ([], ["--kind", "trajectories"], "--kind trajectories needs --data CSV and --time COL"),
    ([], ["--kind", "trajectories", "--data", "rows.csv", "--time", "hour"], "column(s) ['hour'] not in the data"),
    (["svi.json"], ["--kind", "trace"], "--kind trace draws one fit; got 2 files"),
    ([], ["--kind", "trace", "--time", "t"], "--time: only for --kind trajectories, not trace"),
    ([], ["--kind", "random-effects", "--part", "mixing"], "no mixing random effects"),
])
def test_cli_bad_input_exits_with_status_2(fit_files, more_fits, options, message):
    out = fit_files / "bad.png"
    result = run_main(plot_command(fit_files, more_fits, options, out))
    assert result.status == 2
    assert message in result.err
    assert not out.exists()


def plot_command(folder, more_fits: list, options: list, out) -> list[str]:
    """``plot em.json [more fits] [options] --out OUT`` with the files of ``folder``."""
    in_folder = [str(folder / item) if item.endswith((".json", ".csv")) else item for item in options]
    return ["plot", str(folder / "em.json"), *(str(folder / name) for name in more_fits), *in_folder,
            "--out", str(out)]
