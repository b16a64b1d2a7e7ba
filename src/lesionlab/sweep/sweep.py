"""The study's hyper-parameter sweep: every (backbone, lr, epochs, seed), selected on validation, tested once.

Fast without changing results, for two reasons:

- In frozen mode the heads train on cached backbone features (``features.py``): each backbone runs
  over the images once per sweep, or never when an earlier run cached them.
- A *trial* is one training run per (backbone, lr, seed) up to max(epochs) with the constant
  schedule; it records validation metrics and the model state at every requested epoch count.
  ``fit_head`` draws each epoch's randomness from (seed, epoch) only and the constant schedule does
  not depend on the planned length, so the state after E epochs is, bit for bit, the state a
  separate E-epoch run ends with at the same thread count (``tests/test_sweep.py`` checks this).

SWEEP_DIR holds ``trials/<backbone>/lr<lr>-s<seed>.{pt,json}`` (one finished trial each, written
atomically: the JSON last, so a killed sweep redoes only unfinished trials), ``results.csv``,
``table1.{md,csv}``, ``figure{1,2,3}_*.png`` and ``selected/<backbone>/``, ordinary run folders.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.dataset import Dataset, Sample, load_dataset
from lesionlab.models.backbones import (
    ResolvedWeights,
    WeightsError,
    build_backbone,
    get_spec,
    resolve_weights,
)
from lesionlab.models.classifier import Head, LesionClassifier, build_model
from lesionlab.runtime import keep_freed_memory
from lesionlab.sweep.report import SELECTION_RULE, write_reports
from lesionlab.training.config import MODES, TrainConfig
from lesionlab.training.loop import (
    fit_head,
    fit_network,
    train_settings,
    training_inputs,
    write_run,
)

STUDY_BACKBONES = ("mobilenetv2", "resnet50v2", "efficientnetv2b0", "vgg16")
STUDY_LRS = (1e-5, 5e-4, 1e-4, 5e-3, 1e-3)
STUDY_EPOCHS = (10, 20, 30, 40, 50, 100)
RESULT_FIELDS = ["backbone", "lr", "epochs", "seed", "val_accuracy", "val_loss", "val_auc", "train_seconds"]
TRIAL_THREADS = 1  # the same thread count on every backend keeps results bit-identical across them


class SweepError(ValueError):
    """A sweep that cannot start as asked (bad grid, missing optional dependency)."""


# ------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Trial:
    """One training run: a backbone, a learning rate and a seed, trained to the grid's longest epoch count."""

    backbone: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-s{self.seed}"


@dataclass(frozen=True)
class SweepGrid:
    backbones: tuple[str, ...] = STUDY_BACKBONES
    lrs: tuple[float, ...] = STUDY_LRS
    epochs: tuple[int, ...] = STUDY_EPOCHS
    seeds: tuple[int, ...] = (0,)
    mode: str = "frozen"
    batch_size: int = 32
    split_seed: int = 0
    val_fraction: float = 0.2

    def __post_init__(self):
        if not (self.backbones and self.lrs and self.epochs and self.seeds):
            raise SweepError("the grid needs at least one backbone, learning rate, epoch count and seed")
        for name in self.backbones:
            get_spec(name)  # raises with the list of known backbones
        if any(lr <= 0 for lr in self.lrs) or any(e < 1 for e in self.epochs):
            raise SweepError("learning rates must be > 0 and epoch counts >= 1")
        if self.mode not in MODES:
            raise SweepError(f"mode must be one of {MODES}, got '{self.mode}'")
        object.__setattr__(self, "epochs", tuple(sorted(set(self.epochs))))
        for attr in ("backbones", "lrs", "seeds"):
            object.__setattr__(self, attr, tuple(dict.fromkeys(getattr(self, attr))))

    @property
    def max_epochs(self) -> int:
        return self.epochs[-1]

    def trials(self) -> list[Trial]:
        return [Trial(b, lr, s) for b in self.backbones for lr in self.lrs for s in self.seeds]

    def config(self, trial: Trial, epochs: int | None = None) -> TrainConfig:
        return TrainConfig(
            backbone=trial.backbone,
            mode=self.mode,
            lr=trial.lr,
            epochs=epochs or self.max_epochs,
            batch_size=self.batch_size,
            seed=trial.seed,
            split_seed=self.split_seed,
            val_fraction=self.val_fraction,
        )


# ------------------------------------------------------------------ one trial


@dataclass
class TrialData:
    """What a trial trains on: features (frozen) or uint8 images (finetune). Picklable, for Ray."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    weights: ResolvedWeights | None = None  # finetune only: the backbone's starting weights


@dataclass
class TrialResult:
    trial: Trial
    history: list[dict]  # every epoch, as in history.csv
    states: dict[int, dict[str, torch.Tensor]]  # requested epoch -> model state (the head, in frozen mode)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_trial(
    cfg: TrainConfig, data: TrialData, record: tuple[int, ...], tick: Callable[[int], None] | None = None
) -> TrialResult:
    """Trains once to ``cfg.epochs``, keeping a copy of the state at each epoch in ``record``."""
    history: list[dict] = []
    states: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch(result, module, opt, sched, ema=None) -> None:
        history.append(result.row())
        if result.epoch in record:
            kept = module if ema is None else ema
            states[result.epoch] = {k: v.detach().clone() for k, v in kept.state_dict().items()}
        if tick:
            tick(1)

    args = (data.x_train, data.y_train, data.x_val, data.y_val, cfg)
    if cfg.mode == "frozen":
        with torch_threads(TRIAL_THREADS):
            fit_head(*args, on_epoch=on_epoch, progress=False)
    else:
        model = build_model(data.weights, cfg.seed, dropout=cfg.dropout)
        fit_network(model, *args, data.weights, on_epoch=on_epoch, progress=False)
    trial = Trial(cfg.backbone, cfg.lr, cfg.seed)
    return TrialResult(trial, history, states)


# ------------------------------------------------------------------ finished trials on disk (resume)


@dataclass
class TrialStore:
    """``trials/<backbone>/<trial>.pt`` (states) then ``.json`` (history): the JSON marks a finished trial."""

    root: Path

    def _path(self, trial: Trial, suffix: str) -> Path:
        return self.root / trial.backbone / f"{trial.name}.{suffix}"

    def load(self, trial: Trial, identity: dict, record: tuple[int, ...]) -> dict | None:
        """The finished trial's record if it was trained with these settings and covers ``record``."""
        path = self._path(trial, "json")
        if not path.exists() or not self._path(trial, "pt").exists():
            return None
        rec = files.read_json(path)
        if rec.get("identity") != identity or not set(record) <= set(rec.get("recorded_epochs", [])):
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


def trial_identity(cfg: TrainConfig, weights: ResolvedWeights, file_hash: str) -> dict:
    """Everything that decides a trial's numbers except its length (a longer trial covers a shorter one)."""
    train = {k: v for k, v in train_settings(cfg).items() if k != "epochs"}
    return {"train": train, "weights_sha256": weights.sha256, "file_list_sha256": file_hash}


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
    table, decoded, bad = training_inputs(dataset, weights, grid.mode, seed, skip_bad, progress)
    splits = dataset.without({p for p, _ in bad}).splits(grid.split_seed, grid.val_fraction)
    if grid.mode == "frozen":
        (x_tr, y_tr), (x_va, y_va) = table.rows(splits["train"]), table.rows(splits["val"])
        return Prepared(weights, splits, bad, TrialData(x_tr, y_tr, x_va, y_va))
    index = {s.relpath: i for i, s in enumerate(decoded.samples)}

    def pick(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
        return decoded.images[[index[s.relpath] for s in samples]], np.array([s.label for s in samples], np.float32)

    (x_tr, y_tr), (x_va, y_va) = pick(splits["train"]), pick(splits["val"])
    return Prepared(weights, splits, bad, TrialData(x_tr, y_tr, x_va, y_va, weights))


# ------------------------------------------------------------------ results and selection


def result_rows(grid: SweepGrid, records: dict[Trial, dict]) -> list[dict]:
    """A row per backbone x lr x epochs x seed; train_seconds is the trial's time up to that epoch."""
    rows = []
    for trial in grid.trials():
        history = records[trial]["history"]
        for e in grid.epochs:
            h = history[e - 1]
            rows.append(
                {
                    "backbone": trial.backbone,
                    "lr": trial.lr,
                    "epochs": e,
                    "seed": trial.seed,
                    "val_accuracy": h["val_accuracy"],
                    "val_loss": h["val_loss"],
                    "val_auc": h["val_auc"],
                    "train_seconds": sum(float(x["seconds"]) for x in history[:e]),
                }
            )
    return rows


def write_results(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "lr": f"{r['lr']:g}", "train_seconds": f"{r['train_seconds']:.3f}"})
    files.atomic_write_text(path, buf.getvalue())


@dataclass(frozen=True)
class Choice:
    backbone: str
    lr: float
    epochs: int
    seed: int  # the seed whose model is kept (the best on validation among seeds at this lr and epochs)
    val_accuracy: float  # mean over seeds, the selection criterion
    val_loss: float


def select(rows: list[dict]) -> dict[str, Choice]:
    """The study's rule: best validation accuracy; ties: lower validation loss, then fewer epochs."""
    by_cell: dict[tuple[str, float, int], list[dict]] = {}
    for r in rows:
        by_cell.setdefault((r["backbone"], r["lr"], r["epochs"]), []).append(r)
    best: dict[str, tuple] = {}
    for (bb, lr, ep), rs in by_cell.items():
        acc = float(np.mean([r["val_accuracy"] for r in rs]))
        loss = float(np.mean([r["val_loss"] for r in rs]))
        key = (-acc, loss, ep)
        if bb not in best or key < best[bb][0]:
            seed_row = min(rs, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["seed"]))
            best[bb] = (key, Choice(bb, lr, ep, seed_row["seed"], acc, loss))
    return {bb: choice for bb, (_, choice) in best.items()}


# ------------------------------------------------------------------ selected models as run folders


def write_selected(
    out: Path,
    choice: Choice,
    grid: SweepGrid,
    prep: Prepared,
    store: TrialStore,
    history: list[dict],
    data_root: Path,
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
    cfg_path = out / rf.CONFIG
    if cfg_path.exists() and (out / rf.REPORT).exists():
        old = files.read_json(cfg_path)
        if (
            old.get("train") == train_settings(cfg)
            and old.get("weights_sha256") == prep.weights.sha256
            and old.get("file_list_sha256") == file_hash
            and old.get("sweep_selection") == selection
        ):
            return out
    for name in (rf.REPORT, rf.METRICS):  # an interrupted rewrite must not look finished
        (out / name).unlink(missing_ok=True)
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
        data_root,
        classes,
        file_hash,
        prep.splits,
        prep.bad,
        history[: choice.epochs],
        model,
        command,
        extra={"sweep_selection": selection, "timing": timing},
    )
    evaluate_run(out, data_root, n_resamples=n_resamples, progress=progress)
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


Job = tuple[TrainConfig, TrialData, tuple[int, ...]]
Backend = Callable[[list[Job], Callable[[TrialResult], None], Callable[[int], None]], None]


def local_backend(workers: int | None = None) -> Backend:
    """Trials in this process, or (frozen mode) in ``workers`` processes, one thread each: the same numbers.

    A frozen trial is a small single-threaded loop, so one process per core keeps every core busy.
    Finetune trials use every thread of one process instead (and their images are too big to copy).
    """

    def run(jobs: list[Job], on_done: Callable[[TrialResult], None], tick: Callable[[int], None]) -> None:
        n = min(workers or os.cpu_count() or 1, len(jobs))
        if n <= 1 or jobs[0][0].mode != "frozen":
            for cfg, data, record in jobs:
                on_done(run_trial(cfg, data, record, tick))
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent's OpenMP threads (feature extraction) do not survive a fork safely
        pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(run_trial, cfg, data, record): cfg.epochs for cfg, data, record in jobs}
            for fut in as_completed(futures):
                on_done(fut.result())
                tick(futures[fut])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return run


def run_sweep(
    grid: SweepGrid,
    data: str | Path,
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
) -> SweepOutcome:
    """Runs what is left of the grid, selects per backbone, evaluates, and writes every output file."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    keep_freed_memory()
    out, data_root = Path(out), Path(data)
    runner = _backend(backend, ray_address, workers)
    dataset = load_dataset(data_root, classes)
    file_hash = dataset.file_list_hash()
    weights = resolve_all(grid, weights_dir, allow_random_init)
    out.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(
        out / "sweep.json",
        {
            "grid": asdict(grid),
            "backend": backend,
            "command": command,
            "data": str(data_root.resolve()),
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
            data_root,
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


def _backend(name: str, ray_address: str | None, workers: int | None = None) -> Backend:
    if name == "local":
        return local_backend(workers)
    if name == "ray":
        from lesionlab.sweep.ray_backend import ray_backend

        return ray_backend(ray_address)
    raise SweepError(f"backend must be local or ray, got '{name}'")


def parse_list(text: str, kind: type, what: str) -> tuple:
    """'1e-5,5e-4' -> (1e-05, 0.0005), with an error that names the option."""
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise SweepError(f"{what}: expected a comma-separated list of {kind.__name__} values, got '{text}'") from None
