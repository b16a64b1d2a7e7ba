"""What a training run records in its run folder, through :class:`lesionlab.runs.RunFolder` (which owns the file
names and formats): config.json's content, the identity that tells a resumable run from a different one, a history
row per epoch, and a finished folder for a model trained elsewhere (the sweep).

config.json records every training option (schema 2 on). Older folders (schema 1 left options added later out while
they were off) are compared after :func:`lesionlab.runs.migrate`, so they still resume and are still recognised.
Where a run computes and reports (device, tracker: ``config.NOT_IDENTITY``) is recorded but not compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lesionlab import runs as rf
from lesionlab.data.sample import Sample
from lesionlab.models.backbones import ResolvedWeights
from lesionlab.models.classifier import Diagnoses, LesionClassifier, save_model
from lesionlab.runs import RunFolder
from lesionlab.training.config import TrainConfig, identity_settings
from lesionlab.training.features import preprocessing


@dataclass
class EpochResult:
    """One line of history.csv."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_auc: float
    lr: float
    seconds: float

    def row(self) -> dict[str, Any]:
        return asdict(self)


HISTORY_FIELDS = [f.name for f in fields(EpochResult)]


def train_identity(cfg: TrainConfig, weights: ResolvedWeights, file_hash: str) -> dict[str, Any]:
    """What makes two runs the same run: every training option but the device and tracker, the weights and the
    file list."""
    return {"train": identity_settings(asdict(cfg)), "weights_sha256": weights.sha256, "file_list_sha256": file_hash}


def check_existing(
    run: RunFolder, identity: dict[str, Any], file_list_hash: Callable[[bool], str] | None = None
) -> None:
    """RunError when ``run`` already holds a run other than ``identity`` (any schema, compared migrated).
    ``file_list_hash(mtimes)``: the data's hash, for a run of schema 5 or earlier, whose file list included the
    files' mtimes."""
    if not run.has(rf.CONFIG):
        return
    old = {**run.config.raw}
    old["train"] = identity_settings(old.get("train", {}))

    def same(ident: dict[str, Any]) -> bool:
        return {k: old.get(k) for k in ident} == ident

    if not same(identity) and not (
        old.get(rf.FILE_LIST_WITH_MTIMES)
        and file_list_hash is not None
        and same({**identity, "file_list_sha256": file_list_hash(True)})
    ):
        old_train = old.get("train", {})
        diff = [k for k in identity["train"] if old_train.get(k) != identity["train"][k]]
        what = f"settings differ: {', '.join(diff)}" if diff else "weights or data files differ"
        # precision auto differs between devices: a run moved to another machine resumes with the one it had
        hint = f"; to resume it, pass --precision {old_train['precision']}" if diff == ["precision"] else ""
        raise rf.RunError(f"{run.path} already holds a different run ({what}); choose another --out or delete it{hint}")


def run_config(
    cfg: TrainConfig,
    resolved: ResolvedWeights,
    data: str | Path | Sequence[str | Path],
    classes: tuple[str, str],
    file_hash: str,
    splits: dict[str, list[Sample]],
    n_skipped: int,
    command: str = "",
    diagnoses: Diagnoses | None = None,
) -> dict[str, Any]:
    """config.json's content (``write_config`` adds the schema version): one schema for runs from ``train`` and
    runs written by the sweep."""
    return {
        **train_identity(cfg, resolved, file_hash),
        "train": asdict(cfg),  # every option, the device and tracker too
        "kind": rf.RUN_KIND,
        "backbone": cfg.backbone,
        "mode": cfg.mode,
        "weights": resolved.describe(),
        "pretrained": resolved.pretrained,
        "preprocessing": preprocessing(resolved, cfg.resize, cfg.color_constancy),
        "data": {
            "root": str(Path(data if isinstance(data, str | Path) else data[0]).resolve()),
            "classes": list(classes),
            "positive_class": classes[1],
            "file_list_sha256": file_hash,
            "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction,
            "fold": cfg.fold,
            # RunConfig.val_folds reads a second validation fold from the key's presence
            **({"also_val_fold": cfg.also_val_fold} if cfg.second_fold is not None else {}),
            "skipped_files": n_skipped,
            **{f"n_{k}": len(v) for k, v in splits.items()},
        },
        "model": model_record(cfg, diagnoses),
        "versions": rf.package_versions(),
        "command": command,
    }


def model_record(cfg: TrainConfig, diagnoses: Diagnoses | None = None) -> dict[str, Any]:
    """config.json's ``model`` block: the head, and a diagnosis head's classes in output order."""
    if diagnoses is None:
        return {"head": "Dense(100, ReLU) -> Dense(1) -> sigmoid", "hidden": 100, "dropout": cfg.dropout}
    head = (
        f"Dense(100, ReLU) -> Dense({len(diagnoses.names)}) -> softmax over diagnoses; "
        "P(malignant) = sum over the malignant ones = sigmoid(logsumexp(malignant) - logsumexp(benign))"
    )
    return {"head": head, "hidden": 100, "dropout": cfg.dropout, **diagnoses.to_meta()}


def model_meta(cfg: TrainConfig, epoch: int, diagnoses: Diagnoses | None = None) -> dict[str, Any]:
    """model.pt's metadata: what ``load_model`` needs to rebuild the network (a diagnosis head's classes too), and
    the epoch it holds."""
    meta = {"backbone": cfg.backbone, "hidden": 100, "dropout": cfg.dropout, "mode": cfg.mode, "epoch": epoch}
    return meta | (diagnoses.to_meta() if diagnoses else {})


def write_run(
    out: str | Path,
    cfg: TrainConfig,
    resolved: ResolvedWeights,
    data: str | Path | Sequence[str | Path],
    classes: tuple[str, str],
    file_hash: str,
    splits: dict[str, list[Sample]],
    bad: list[tuple[str, str]],
    history: list[dict[str, Any]],
    model: LesionClassifier,
    command: str = "",
    extra: dict[str, Any] | None = None,
    data_info: dict[str, Any] | None = None,
) -> Path:
    """A finished run folder from a model trained elsewhere (the sweep), as ``train`` would have left it.

    ``model`` is the state after ``cfg.epochs`` epochs, recorded as the run's best epoch; ``data_info`` is added
    to config.json's ``data`` block (``data.loading.data_record``: the sources, to read them again).
    """
    run = RunFolder(out)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_skipped(bad)
    run.write_splits(splits)
    run.write_history(history, HISTORY_FIELDS)
    save_model(model, run / rf.MODEL, model_meta(cfg, cfg.epochs, model.diagnoses))
    (run / rf.STATE).unlink(missing_ok=True)
    config = run_config(cfg, resolved, data, classes, file_hash, splits, len(bad), command, model.diagnoses)
    config["data"].update(data_info or {})
    run.write_config({**config, "best_epoch": cfg.epochs, **(extra or {})})
    return run.path


def config_from_run(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig a run folder was trained with (any schema: options it did not record get their old value)."""
    raw = RunFolder(run_dir).config.train
    return TrainConfig(**{f.name: raw[f.name] for f in fields(TrainConfig) if f.name in raw})
