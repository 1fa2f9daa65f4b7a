r"""Personalised multitask studies on real data: landmine, computer survey, SARCOS, EMA.

Every study builds a per-person frame with a ``split`` column (``train`` / ``test``; early
stopping holds out part of the training rows by itself), fits each model of the config
through :func:`mtl_jax.fit` (``method="map"``) and scores the test rows with
:func:`mtl_jax.metrics.task_metrics` (pooled over rows and averaged over tasks). Models are
given by a label and options, the label being the registered name unless a ``model`` key
names it, e.g. ``{"mtl-net": {"hidden": [16]}, "per-person linear": {"model": "stl-net",
"hidden": []}}``; ``method`` (default ``"map"``) and ``backend`` (the backend's options)
fit it otherwise, e.g. ``{"mtl-net, SVI": {"model": "mtl-net", "method": "svi", "backend":
{"num_steps": 3000}}}`` (predictions are then the posterior-mean plug-in of :meth:`Fit.predict`).

* **landmine** (29 tasks, binary): the test AUC against the number of training rows per
  task (``sizes``, drawn at random per task, stratified so both classes are present), over
  ``repeats`` random draws; the rest of each task is its test set. A model that clusters
  the tasks (``hblr``) also gets the adjusted Rand index of its clusters against the
  foliated (tasks 1-15) / bare-earth (16-29) split (``cluster_table``).
* **computer survey** (190 people rate 20 PC profiles 0-10; 13 attributes coded -1/+1):
  users as tasks, profiles 1-16 for training and 17-20 (the data's hold-out design) for
  testing; RMSE.
* **SARCOS** (test split only, 4,449 rows): labels as tasks, the seven torques from the 21
  joint positions, velocities and accelerations; a random ``test_fraction`` of the rows is
  the test set (the training file is not available); torques are standardised with the
  training rows' mean and sd so RMSE is comparable across torques.
* **EMA motivation** (20 people, 9 self-report items per beep): users as tasks; at each
  beep predict whether ``pleasure`` is above the person's training median from the nine
  answers of the *previous* beep (beeps ordered by time; the first beep of each person has
  no predecessor and is dropped); each person's first ``train_fraction`` of beeps train,
  the rest test.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pandas as pd

from mtl_jax.data.personal import PersonData
from mtl_jax.data.settings import data_dir
from mtl_jax.experiments.checkpoint import Checkpoint
from mtl_jax.infer.fit import fit
from mtl_jax.metrics import adjusted_rand_index, task_metrics
from mtl_jax.models.protocol import model_class

STUDIES = ("landmine", "computer_survey", "sarcos", "ema")

DEFAULT_CONFIG = {
    "experiment": "personal_study",
    "study": "landmine",
    "models": {"mtl-net": {"hidden": [16]}, "pooled-net": {"hidden": [16]}},
    "sizes": [20, 40, 80, 160, 300],
    "repeats": 10,
    "test_fraction": 0.3,
    "train_fraction": 0.7,
    "max_steps": 5000,
    "seed": 0,
}


def landmine_frame() -> pd.DataFrame:
    """The landmine data: ``task``, ``x1 .. x9``, ``label``."""
    return pd.read_csv(data_dir() / "landmine" / "landmine.csv")


def landmine_split(frame: pd.DataFrame, size: int, rng: np.random.Generator) -> pd.DataFrame:
    """``frame`` with ``split``: ``size`` training rows per task (both classes present), the rest test."""
    split = np.full(len(frame), "test", dtype=object)
    for _, rows in frame.groupby("task").indices.items():
        labels = frame["label"].to_numpy()[rows]
        positives, negatives = rows[labels == 1], rows[labels == 0]
        take_pos = max(1, int(round(size * len(positives) / len(rows))))
        chosen = np.concatenate([rng.choice(positives, min(take_pos, len(positives)), replace=False),
                                 rng.choice(negatives, min(size - take_pos, len(negatives)), replace=False)])
        split[chosen] = "train"
    return frame.assign(split=split)


def computer_survey_frame() -> pd.DataFrame:
    """Ratings with ``split`` (profiles 17-20 test) and the 13 attributes."""
    frame = pd.read_csv(data_dir() / "computer_survey" / "ratings_long.csv")
    return frame.assign(split=np.where(frame["holdout"] == 1, "test", "train")).drop(columns=["holdout", "profile"])


def sarcos_frame(test_fraction: float, rng: np.random.Generator) -> pd.DataFrame:
    """SARCOS test file with a constant ``robot`` column, torques standardised on the training rows, and ``split``."""
    frame = pd.read_csv(data_dir() / "sarcos_test" / "sarcos_inv_test.csv")
    split = np.where(rng.uniform(size=len(frame)) < test_fraction, "test", "train")
    torques = [f"tau{j}" for j in range(1, 8)]
    train = frame.loc[split == "train", torques]
    frame[torques] = (frame[torques] - train.mean()) / train.std(ddof=0)
    return frame.assign(robot="sarcos", split=split)


EMA_ITEMS = ("autonomy", "competence", "relatedness", "pleasure", "interest", "importance", "situation_requires",
             "anxiety_guilt_avoidance", "another_wants")


def ema_frame(train_fraction: float) -> pd.DataFrame:
    """Previous-beep answers (``prev_<item>``), ``high_pleasure_Label`` and ``split`` per beep."""
    frame = pd.read_csv(data_dir() / "ema_motivation" / "ema_motivation_20p.csv")
    frame = frame.sort_values(["User", "Date"], kind="stable").reset_index(drop=True)
    previous = frame.groupby("User")[list(EMA_ITEMS)].shift(1).add_prefix("prev_")
    position = frame.groupby("User").cumcount()
    count = frame.groupby("User")["User"].transform("size")
    split = np.where(position < np.ceil(train_fraction * count), "train", "test")
    out = pd.concat([frame[["User", "Date"]], previous], axis=1).assign(split=split, pleasure=frame["pleasure"])
    out = out[previous.notna().all(axis=1)].reset_index(drop=True)
    median = out[out.split == "train"].groupby("User")["pleasure"].median()
    out["high_pleasure_Label"] = (out["pleasure"] > out["User"].map(median)).astype(float)
    return out.drop(columns=["pleasure"])


def model_entry(name: str, options: dict | None):
    """``(model, method, backend options)`` of a config's model entry (module docstring): the
    label is the registered name unless ``model`` names it; ``method`` defaults to ``"map"``."""
    options = dict(options or {})
    registered = options.pop("model", name)
    method = options.pop("method", "map")
    backend = options.pop("backend", {})
    model = model_class(registered)(**{key: tuple(v) if isinstance(v, list) else v for key, v in options.items()})
    return model, method, backend


def evaluate_models(models: dict, frame: pd.DataFrame, data_options: dict, kind: str, max_steps: int,
                    seed: int, *, checkpoint: Checkpoint | None = None, unit: str = "") -> dict:
    """Fit each model on the training rows and score the test rows: per model the pooled and task-mean metrics.

    Each model is one unit of ``checkpoint`` (:mod:`~mtl_jax.experiments.checkpoint`),
    named ``"<unit>/<model label>"``; a model finished in an earlier run is not fitted again.
    """
    checkpoint = checkpoint or Checkpoint()
    data = PersonData.from_dataframe(frame, **data_options)
    test = frame[frame["split"] == "test"]
    return {name: checkpoint.unit(f"{unit}/{name}", lambda: _evaluate_model(name, options, data, test, data_options,
                                                                             kind, max_steps, seed))
            for name, options in models.items()}


def _evaluate_model(name: str, options: dict | None, data: PersonData, test: pd.DataFrame, data_options: dict,
                    kind: str, max_steps: int, seed: int) -> dict:
    """One model of :func:`evaluate_models`: fitted on ``data``'s training rows, scored on the ``test`` rows."""
    labels = data.schema.labels
    model, method, backend = model_entry(name, options)
    start = time.perf_counter()
    training = {"max_steps": max_steps} if method == "map" and not hasattr(model, "solve") else {}
    fitted = fit(model, data, method=method, seed=seed, **{**training, **backend})
    prediction = fitted.predict(test)
    if data.schema.tasks == "labels":  # long: one row per (sample, label)
        y = test[list(labels)].to_numpy().reshape(-1)
        task = np.tile(np.arange(len(labels)), len(test))
        table = task_metrics(y, prediction.reshape(-1), task, kind=kind, names=list(labels))
    else:
        table = task_metrics(test[labels[0]].to_numpy(), prediction[:, 0], test[data_options["person"]].to_numpy(),
                             kind=kind)
    result = {"pooled": table.loc["pooled"].to_dict(), "task_mean": table.loc["task_mean"].to_dict(),
              "per_task": table.drop(index=["pooled", "task_mean"]).to_dict(orient="index"),
              "converged": bool(fitted.converged), "method": method, "seconds": time.perf_counter() - start}
    if "class_probabilities" in fitted.task_tables:  # a model that clusters the tasks (hblr)
        probabilities = fitted.task_tables["class_probabilities"]
        result["clusters"] = dict(zip(probabilities.index.astype(str),
                                      (probabilities.to_numpy().argmax(axis=1) + 1).tolist()))
    return result


def run_personal_study(config: dict, *, progress: bool = True, checkpoint: Checkpoint | None = None) -> dict:
    """Run one study of :data:`STUDIES` (module docstring) with the models of ``config``.

    A unit of ``checkpoint`` (:mod:`~mtl_jax.experiments.checkpoint`; default none) is one
    model's fit and test (landmine: of one training size and repeat; every split is still
    drawn, finished or not, so the random splits of the others do not change).

    Returns:
        ``config``, per setting (landmine: per training size and repeat) the model results
        of :func:`evaluate_models`, and a printed ``table`` (landmine: mean test AUC
        averaged over tasks, per size and model, with its standard error over repeats).

    Raises:
        ValueError: for an unknown setting or study.
    """
    unknown = set(config) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown personal_study settings {sorted(unknown)}; known: {sorted(DEFAULT_CONFIG)}")
    config = {**DEFAULT_CONFIG, **config}
    study, models, seed = config["study"], config["models"], int(config["seed"])
    rng = np.random.default_rng(seed)
    steps = int(config["max_steps"])
    checkpoint = checkpoint or Checkpoint()
    settings = len(config["sizes"]) * int(config["repeats"]) if study == "landmine" else 1
    checkpoint.start(settings * len(models), f"{study} model fits")
    if study == "landmine":
        frame = landmine_frame()
        runs = {}
        for size in config["sizes"]:
            for repeat in range(int(config["repeats"])):
                split = landmine_split(frame, int(size), rng)
                runs[f"{size}/{repeat}"] = evaluate_models(models, split, dict(person="task", labels="label",
                                                           features=[f"x{j}" for j in range(1, 10)], split="split"),
                                                           "binary", steps, seed + repeat, checkpoint=checkpoint,
                                                           unit=f"{size}/{repeat}")
                jax.clear_caches()  # each split compiles afresh; a long study would exhaust the memory maps
                if progress:
                    checkpoint.write(f"landmine size {size} repeat {repeat}: " + ", ".join(
                        f"{name} {entry['task_mean']['auc']:.3f}" for name, entry in runs[f"{size}/{repeat}"].items()))
        output = {"runs": runs, "table": landmine_table(runs, models, config["sizes"])}
        clusters = landmine_cluster_table(runs, models, config["sizes"])
        if clusters is not None:
            output["cluster_table"] = clusters
            if progress:
                print(clusters, flush=True)
    elif study == "computer_survey":
        frame = computer_survey_frame()
        output = {"runs": {"holdout": evaluate_models(models, frame, dict(person="person", labels="rating",
                                                                         split="split"), "regression", steps, seed,
                                                     checkpoint=checkpoint, unit="holdout")}}
    elif study == "sarcos":
        frame = sarcos_frame(float(config["test_fraction"]), rng)
        torques = [f"tau{j}" for j in range(1, 8)]
        output = {"runs": {"random": evaluate_models(models, frame, dict(person="robot", labels=torques,
                                                                        tasks="labels", split="split"),
                                                     "regression", steps, seed, checkpoint=checkpoint,
                                                     unit="random")}}
    elif study == "ema":
        frame = ema_frame(float(config["train_fraction"]))
        output = {"runs": {"time": evaluate_models(models, frame, dict(person="User", labels="high_pleasure_Label",
                                                                      timestamp="Date", split="split"),
                                                   "binary", steps, seed, checkpoint=checkpoint, unit="time")}}
    else:
        raise ValueError(f"unknown study {study!r}; choose one of {list(STUDIES)}")
    if "table" not in output:
        output["table"] = single_table(next(iter(output["runs"].values())))
    if progress:
        print(output["table"], flush=True)
    return {"experiment": "personal_study", "config": config, **output}


SHOWN = ("auc", "accuracy", "f1", "balanced_accuracy", "rmse")


def single_table(results: dict) -> str:
    """Per model: the pooled and task-mean test AUC, accuracy, F1, balanced accuracy (binary) or RMSE."""
    rows = {}
    for name, entry in results.items():
        row = {f"{key} (pooled)": value for key, value in entry["pooled"].items() if key in SHOWN}
        row.update({f"{key} (task mean)": value for key, value in entry["task_mean"].items() if key in SHOWN})
        rows[name] = {**row, "seconds": entry["seconds"], "converged": entry["converged"]}
    return pd.DataFrame(rows).T.to_string(float_format=lambda v: f"{v:.4f}")


def landmine_table(runs: dict, models: dict, sizes) -> str:
    """Mean (standard error) over repeats of the task-mean test AUC, per training size and model."""
    rows = {}
    for size in sizes:
        row = {}
        for name in models:
            values = np.array([entry[name]["task_mean"]["auc"] for key, entry in runs.items()
                               if key.split("/")[0] == str(size)])
            error = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
            row[name] = f"{values.mean():.3f} ({error:.3f})"
        rows[size] = row
    return pd.DataFrame(rows).T.rename_axis("rows per task").to_string()


LANDMINE_FOLIATED = range(1, 16)
"""Landmine tasks 1-15 are from foliated regions, 16-29 from bare earth or desert (Xue et al. 2007)."""


def landmine_cluster_table(runs: dict, models: dict, sizes) -> str | None:
    """Per training size, for each model that clusters the tasks: the mean (standard error over
    repeats) adjusted Rand index of its most probable clusters against the foliated (1-15) /
    bare-earth (16-29) split, and the mean number of clusters used; ``None`` without such a model."""
    clustering = [name for name in models if any("clusters" in entry.get(name, {}) for entry in runs.values())]
    if not clustering:
        return None
    rows = {}
    for size in sizes:
        row = {}
        for name in clustering:
            entries = [entry[name]["clusters"] for key, entry in runs.items() if key.split("/")[0] == str(size)]
            aris = np.array([adjusted_rand_index([int(task) in LANDMINE_FOLIATED for task in clusters],
                                                 list(clusters.values())) for clusters in entries])
            used = np.mean([len(set(clusters.values())) for clusters in entries])
            error = aris.std(ddof=1) / np.sqrt(len(aris)) if len(aris) > 1 else float("nan")
            row[f"{name}: ARI"] = f"{aris.mean():.3f} ({error:.3f})"
            row[f"{name}: clusters"] = f"{used:.1f}"
        rows[size] = row
    return pd.DataFrame(rows).T.rename_axis("rows per task").to_string()


def plot_results(results: dict, path):
    """Landmine: test AUC (task mean) against training rows per task, one line per model
    (+- 1 se over repeats). Other studies: the task-mean test metric per model (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if results["config"]["study"] != "landmine":
        entry = next(iter(results["runs"].values()))
        metric = "auc" if "auc" in next(iter(entry.values()))["task_mean"] else "rmse"
        names = list(entry)
        ax.barh(names, [entry[name]["task_mean"][metric] for name in names])
        ax.invert_yaxis()
        ax.set_xlabel(f"test {metric.upper()} (mean over tasks)")
        ax.set_title(results["config"]["study"].replace("_", " "))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    sizes, runs = results["config"]["sizes"], results["runs"]
    for name in results["config"]["models"]:
        means, errors = [], []
        for size in sizes:
            values = np.array([entry[name]["task_mean"]["auc"] for key, entry in runs.items()
                               if key.split("/")[0] == str(size)])
            means.append(values.mean())
            errors.append(values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0.0)
        ax.errorbar(sizes, means, yerr=errors, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training rows per task")
    ax.set_ylabel("test AUC (mean over 29 tasks)")
    ax.set_title("landmine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
