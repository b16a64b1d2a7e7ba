"""The study's hyper-parameter sweep: every (backbone, lr, epochs, seed), selected on validation, tested once.

Fast without changing results, for two reasons:

- In frozen mode the heads train on cached backbone features (``training/features.py``): each backbone runs
  over the images once per sweep, or never when an earlier run cached them.
- A *trial* (``trials.py``) is one training run per (backbone, lr, seed) up to max(epochs) with the constant
  schedule; it records validation metrics and the model state at every requested epoch count, each equal to a
  separate run of that length.

SWEEP_DIR holds ``trials/<backbone>/lr<lr>-s<seed>.{pt,json}`` (one finished trial each, written
atomically: the JSON last, so a killed sweep redoes only unfinished trials), ``results.csv``,
``table1.{md,csv}``, ``figure{1,2,3}_*.png`` and ``selected/<backbone>/``, ordinary run folders.

Layers: ``trials.py`` (grid, trial, backend protocol) below ``local.py`` and ``ray_backend.py``, below
``selection.py`` and ``report.py``, below this module.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.dataset import Dataset, Sample
from lesionlab.data.loading import Specs, data_record, load_training_data
from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy
from lesionlab.models.backbones import ResolvedWeights, WeightsError, build_backbone, get_spec, resolve_weights
from lesionlab.models.classifier import Head, LesionClassifier, build_model
from lesionlab.runs import RunFolder
from lesionlab.runtime import keep_freed_memory
from lesionlab.sweep.grid import STUDY_BACKBONES, STUDY_EPOCHS, STUDY_LRS, TRIAL_THREADS, SweepError, SweepGrid, Trial
from lesionlab.sweep.local import local_backend
from lesionlab.sweep.report import write_reports
from lesionlab.sweep.selection import RESULT_FIELDS, SELECTION_RULE, Choice, result_rows, select, write_results
from lesionlab.sweep.trials import Backend, Job, TrialData, TrialResult, run_trial, torch_threads
from lesionlab.training.config import TrainConfig
from lesionlab.training.inputs import read_inputs
from lesionlab.training.record import write_run

__all__ = [  # the names the CLI, the benchmarks and the tests import from here
    "RESULT_FIELDS",
    "STUDY_BACKBONES",
    "STUDY_EPOCHS",
    "STUDY_LRS",
    "TRIAL_THREADS",
    "Backend",
    "Choice",
    "Job",
    "SweepError",
    "SweepGrid",
    "SweepOutcome",
    "Trial",
    "TrialData",
    "TrialResult",
    "parse_list",
    "run_sweep",
    "run_trial",
    "select",
    "torch_threads",
]


# ------------------------------------------------------------------ finished trials on disk (resume)


@dataclass
class TrialStore:
    """``trials/<backbone>/<trial>.pt`` (states) then ``.json`` (history): the JSON marks a finished trial."""

    root: Path

    def _path(self, trial: Trial, suffix: str) -> Path:
        return self.root / trial.backbone / f"{trial.name}.{suffix}"

    def load(self, trial: Trial, identity: dict, record: tuple[int, ...]) -> dict | None:
        """The finished trial's record if it was trained with these settings and covers ``record``.

        A record of an older schema is compared migrated, as run folders are: its trials still count."""
        path = self._path(trial, "json")
        if not path.exists() or not self._path(trial, "pt").exists():
            return None
        rec = files.read_json(path)
        old = rf.migrate(rec.get("identity") or {})
        # a schema-5 trial's file list hashed mtimes too: it no longer matches and is trained again (a cache)
        old.pop(rf.FILE_LIST_WITH_MTIMES, None)
        if old != identity or not set(record) <= set(rec.get("recorded_epochs", [])):
            return None
        return rec

    def save(self, result: TrialResult, identity: dict) -> dict:
        files.atomic_save_torch({"states": result.states}, self._path(result.trial, "pt"))
        rec = {
            "trial": asdict(result.trial),
            "identity": identity,
            "recorded_epochs": sorted(result.states),
            "history": result.history,
        }
        files.atomic_write_json(self._path(result.trial, "json"), rec)
        return rec

    def state(self, trial: Trial, epoch: int) -> dict[str, torch.Tensor]:
        return torch.load(self._path(trial, "pt"), map_location="cpu", weights_only=True)["states"][epoch]


def trial_identity(cfg: TrainConfig, weights: ResolvedWeights, file_hash: str) -> dict[str, Any]:
    """Everything that decides a trial's numbers except its length (a longer trial covers a shorter one), in the
    schema of config.json's train block."""
    train = {k: v for k, v in asdict(cfg).items() if k != "epochs"}
    return {
        "schema_version": rf.SCHEMA_VERSION,
        "train": train,
        "weights_sha256": weights.sha256,
        "file_list_sha256": file_hash,
    }


# ------------------------------------------------------------------ inputs per (backbone, seed)


@dataclass
class Prepared:
    weights: ResolvedWeights
    splits: dict[str, list[Sample]]
    bad: list[tuple[str, str]]
    data: TrialData


def resolve_all(grid: SweepGrid, weights_dir, allow_random_init: bool) -> dict[tuple[str, int], ResolvedWeights]:
    """Weights for every (backbone, seed), or one error naming every backbone without weights, before any work."""
    out, missing = {}, []
    for name in grid.backbones:
        try:
            first = resolve_weights(name, None, weights_dir, allow_random_init, grid.seeds[0])
        except WeightsError:
            missing.append(f"{name} ({get_spec(name).timm_name})")
            continue
        for seed in grid.seeds:  # random init depends on the seed, as in `lesionlab train --seed`
            out[name, seed] = first if first.pretrained else resolve_weights(name, None, weights_dir, True, seed)
    if missing:
        raise WeightsError(
            f"no ImageNet weights for {', '.join(missing)}: put <timm name>.pth in --weights-dir (now "
            f"{weights_dir or 'the default'}), drop them from --backbones, or pass --allow-random-init to sweep "
            "them from random weights (timing only: not comparable to the study). Nothing was trained."
        )
    return out


def prepare(
    dataset: Dataset, weights: ResolvedWeights, grid: SweepGrid, seed: int, skip_bad: bool, progress: bool
) -> Prepared:
    """Features (frozen, from the shared cache) or decoded images (finetune), split as ``train`` splits them."""
    inputs = read_inputs(dataset, weights, grid.mode, seed, skip_bad, progress)
    splits = dataset.without({p for p, _ in inputs.bad}).splits(grid.split_seed, grid.val_fraction)
    return Prepared(weights, splits, inputs.bad, inputs.source(splits))


# ------------------------------------------------------------------ selected models as run folders


def write_selected(
    out: Path,
    choice: Choice,
    grid: SweepGrid,
    prep: Prepared,
    store: TrialStore,
    history: list[dict],
    data: Specs,
    data_info: dict,
    classes: tuple[str, str],
    file_hash: str,
    n_resamples: int,
    progress: bool,
    command: str,
) -> Path:
    """``selected/<backbone>/``: a run folder as ``lesionlab train`` leaves it, then evaluated like ``evaluate``.

    Skipped when the folder already holds this choice, evaluated (report.md is evaluation's last file).
    """
    from lesionlab.evaluation.evaluate import evaluate_run

    trial = Trial(choice.backbone, choice.lr, choice.seed)
    cfg = grid.config(trial, choice.epochs)
    selection = {"rule": SELECTION_RULE, **asdict(choice)}
    run = RunFolder(out)
    if run.has(rf.CONFIG) and run.has(rf.REPORT):
        old = run.config.raw  # migrated: a folder of an older schema still holds the same choice
        if (
            old.get("train") == asdict(cfg)
            and old.get("weights_sha256") == prep.weights.sha256
            and old.get("file_list_sha256") == file_hash
            and old.get("sweep_selection") == selection
        ):
            return out
    for name in (rf.REPORT, rf.METRICS):  # an interrupted rewrite must not look finished
        (run / name).unlink(missing_ok=True)
    state = store.state(trial, choice.epochs)
    if grid.mode == "frozen":
        head = Head(state["net.1.weight"].shape[1], dropout=cfg.dropout)
        head.load_state_dict(state)
        model = LesionClassifier(build_backbone(prep.weights, choice.seed), head)
    else:
        model = build_model(prep.weights, choice.seed, dropout=cfg.dropout)
        model.load_state_dict(state)
    timing = {
        "epoch_seconds_total": round(sum(float(h["seconds"]) for h in history[: choice.epochs]), 1),
        "cpu_threads": TRIAL_THREADS if grid.mode == "frozen" else torch.get_num_threads(),
        "note": "trained as one trial of a sweep (see sweep_selection); backbone features are shared "
        "by every trial and not counted here",
    }
    write_run(
        out,
        cfg,
        prep.weights,
        data,
        classes,
        file_hash,
        prep.splits,
        prep.bad,
        history[: choice.epochs],
        model,
        command,
        extra={"sweep_selection": selection, "timing": timing},
        data_info=data_info,
    )
    evaluate_run(out, n_resamples=n_resamples, progress=progress)  # reads the data again from config.json
    return out


# ------------------------------------------------------------------ the sweep


@dataclass
class SweepOutcome:
    out: Path
    rows: list[dict]
    choices: dict[str, Choice]
    selected: dict[str, Path]
    trained: int  # trials trained by this call (the rest were finished earlier)
    seconds: dict[str, float] = field(default_factory=dict)


def run_sweep(
    grid: SweepGrid,
    data: Specs,
    out: str | Path,
    weights_dir: str | Path | None = None,
    allow_random_init: bool = False,
    backend: str = "local",
    ray_address: str | None = None,
    skip_bad: bool = False,
    classes: tuple[str, str] = ("benign", "malignant"),
    n_resamples: int = 1000,
    progress: bool = True,
    command: str = "",
    workers: int | None = None,
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    gpus_per_trial: float = 0.0,
) -> SweepOutcome:
    """Runs what is left of the grid, selects per backbone, evaluates, and writes every output file.

    ``data``: one data folder or several sources, united leak-proof as ``train`` unites them
    (``data.loading.load_training_data``)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    keep_freed_memory()
    out = Path(out)
    runner = _backend(backend, ray_address, workers, gpus_per_trial)
    dataset = load_training_data(data, taxonomy, classes, progress=progress)
    data_info = data_record(data, dataset, taxonomy)
    file_hash = dataset.file_list_hash(mtimes=False)  # as a run's: a copy of the data is the same data
    weights = resolve_all(grid, weights_dir, allow_random_init)
    out.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(
        out / "sweep.json",
        {
            "grid": asdict(grid),
            "backend": backend,
            "command": command,
            "data": data_info["root"],
            **({"specs": data_info["specs"]} if "specs" in data_info else {}),
            "versions": rf.package_versions(),
        },
    )
    prepared, seconds = {}, {}
    for (bb, seed), w in weights.items():
        t0 = time.perf_counter()
        prepared[bb, seed] = prepare(dataset, w, grid, seed, skip_bad, progress)
        seconds[f"prepare:{bb}:{seed}"] = time.perf_counter() - t0
    t_prepared = time.perf_counter()

    store = TrialStore(out / "trials")
    records: dict[Trial, dict] = {}
    jobs: list[Job] = []
    for trial in grid.trials():
        cfg = grid.config(trial)
        rec = store.load(trial, trial_identity(cfg, weights[trial.backbone, trial.seed], file_hash), grid.epochs)
        if rec is not None:
            records[trial] = rec
        else:
            jobs.append((cfg, prepared[trial.backbone, trial.seed].data, grid.epochs))

    bar = tqdm(
        total=len(grid.trials()) * grid.max_epochs,
        initial=len(records) * grid.max_epochs,
        desc=f"sweep ({len(jobs)} of {len(grid.trials())} trials to train)",
        unit="epoch",
        disable=not progress,
        smoothing=0.05,
    )

    def on_done(result: TrialResult) -> None:
        cfg = grid.config(result.trial)
        ident = trial_identity(cfg, weights[result.trial.backbone, result.trial.seed], file_hash)
        records[result.trial] = store.save(result, ident)
        bar.set_postfix_str(f"{result.trial.backbone} {result.trial.name} done")

    try:
        runner(jobs, on_done, bar.update)
    finally:
        bar.close()
    t_trained = time.perf_counter()

    rows = result_rows(grid, records)
    write_results(out / "results.csv", rows)
    choices = select(rows)
    selected = {}
    for bb, choice in choices.items():
        trial = Trial(bb, choice.lr, choice.seed)
        selected[bb] = write_selected(
            out / "selected" / bb,
            choice,
            grid,
            prepared[bb, choice.seed],
            store,
            records[trial]["history"],
            data,
            data_info,
            classes,
            file_hash,
            n_resamples,
            progress,
            command,
        )
    write_reports(out, grid, rows, choices, selected)
    t_end = time.perf_counter()
    seconds.update(
        {
            "prepare": t_prepared - t_start,
            "trials": t_trained - t_prepared,
            "select_evaluate_report": t_end - t_trained,
            "total": t_end - t_start,
        }
    )
    return SweepOutcome(out, rows, choices, selected, len(jobs), seconds)


def _backend(name: str, ray_address: str | None, workers: int | None = None, gpus_per_trial: float = 0.0) -> Backend:
    if name == "local":
        if gpus_per_trial:
            raise SweepError("--gpus-per-trial shares GPUs between Ray tasks: use it with --backend ray")
        return local_backend(workers)
    if name == "ray":
        from lesionlab.sweep.ray_backend import ray_backend  # Ray is an optional extra: imported only when asked

        return ray_backend(ray_address, gpus_per_trial=gpus_per_trial)
    raise SweepError(f"backend must be local or ray, got '{name}'")


def parse_list(text: str, kind: type, what: str) -> tuple:
    """'1e-5,5e-4' -> (1e-05, 0.0005), with an error that names the option."""
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise SweepError(f"{what}: expected a comma-separated list of {kind.__name__} values, got '{text}'") from None
