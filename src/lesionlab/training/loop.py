"""Training, top to bottom: config, data, model, loop, checkpoint. Resumable at epoch granularity.

One loop for both transfer modes; only the data source differs (``sources.py``):

- ``frozen`` (the study): the backbone is fixed, so its features are computed once (``features.py``) and only the
  head trains, on vectors, in seconds.
- ``finetune``: the whole network trains on augmented images.

:func:`train_epochs` is the loop (shuffle, batches, loss, optimizer and scheduler step, optional weight EMA,
validation); it yields after every epoch, and its caller keeps what it needs: :func:`train` the best epoch's model
and the resume state in a run folder, the sweep the states at the epoch counts of its grid. It trains on the device
``cfg.device`` names, in ``cfg.precision`` (``device.py``); :func:`train` also sends each epoch to the tracker
``cfg.log`` names (``tracking.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.loading import Specs, data_record, load_training_data
from lesionlab.data.taxonomy import DEFAULT_TAXONOMY, Taxonomy
from lesionlab.models.backbones import build_backbone, resolve_weights
from lesionlab.models.classifier import Head, LesionClassifier, save_model
from lesionlab.runs import RunFolder
from lesionlab.training import tracking
from lesionlab.training.config import TrainConfig
from lesionlab.training.device import Compute, RunningMeans
from lesionlab.training.optim import epoch_generator, make_ema, make_loss, make_optimizer
from lesionlab.training.record import (
    HISTORY_FIELDS,
    EpochResult,
    check_existing,
    model_meta,
    run_config,
    train_identity,
)
from lesionlab.training.sources import Source, read_inputs
from lesionlab.training.targets import diagnosis_classes


@dataclass
class Epoch:
    """The loop's state after one epoch. ``judged`` is what was validated: the EMA of the weights when on, else
    ``module``; it is the model to keep. ``train_seconds``: the epoch's training steps, without validation."""

    result: EpochResult
    module: nn.Module
    judged: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: nn.Module | None
    scaler: torch.amp.GradScaler | None = None
    train_seconds: float = 0.0

    def resume_state(self) -> dict[str, Any]:
        """What :func:`train_epochs` needs (as ``state``) to continue after this epoch."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "epoch": self.result.epoch,
        }


def train_epochs(
    source: Source, cfg: TrainConfig, state: dict[str, Any] | None = None, progress: bool = True
) -> Iterator[Epoch]:
    """Trains a module built by ``source`` for ``cfg.epochs`` epochs, from ``state`` (a ``resume_state``) if given,
    yielding after each epoch. The epochs' randomness depends only on (cfg.seed, epoch), and the constant schedule
    not on the planned length, so the state after E epochs is that of a separate E-epoch run. ``state`` may come
    from another device (tensors are loaded onto this one)."""
    from tqdm.auto import tqdm

    compute = Compute.of(cfg)
    module = source.build(cfg).to(compute.device)
    steps = math.ceil(source.n_train / cfg.batch_size)
    opt, sched = make_optimizer(cfg, module.parameters(), steps)
    loss_fn = make_loss(cfg, source.y_train)
    start = 0
    if state:
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["epoch"]
    ema = make_ema(module, cfg.ema_decay)  # after the resume: the average starts from the resumed weights
    if ema is not None and state and state.get("ema"):
        ema.module.load_state_dict(state["ema"])
    scaler = compute.grad_scaler()  # fp16 only
    if scaler is not None and state and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    source.prepare(module)

    bar = tqdm(
        total=cfg.epochs * steps, initial=start * steps, desc=source.describe(cfg), disable=not progress, unit="batch"
    )
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            source.train_mode(module)
            perm = source.order(epoch_generator(cfg.seed, epoch))
            running = RunningMeans(compute.device)
            for i in range(0, source.n_train, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                x, y, c = compute.move(*source.batch(idx, cfg))
                opt.zero_grad(set_to_none=True)
                logits, z = source.forward(module, x, cfg)  # z: diagnosis logits (--target diagnosis), else None
                loss = loss_fn(logits, y, z, c)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:  # fp16: the loss scaled up so small gradients survive; a step that overflowed is skipped
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                sched.step()
                if ema is not None:
                    ema.update(module, step=sched.last_epoch)  # the scheduler counts optimizer steps
                running.add(loss, logits, y)
                bar.update(1)
                if (mean := running.running_loss()) is not None:
                    bar.set_postfix(epoch=epoch, loss=f"{mean:.3f}")
            train_loss, train_acc = running.means()  # on a GPU: waits for the epoch's last step
            train_seconds = time.perf_counter() - t0

            judged = module if ema is None else ema.module
            if source.rescore_train:
                train_loss, train_acc, _ = source.score(judged, "train", loss_fn)
            val_loss, val_acc, val_auc = source.score(judged, "val", loss_fn)
            lr = sched.get_last_lr()[0]
            assert isinstance(lr, float)  # a tensor only for a tensor cfg.lr
            result = EpochResult(epoch, train_loss, train_acc, val_loss, val_acc, val_auc, lr, time.perf_counter() - t0)
            bar.set_postfix(epoch=epoch, val_acc=f"{val_acc:.3f}", val_loss=f"{val_loss:.3f}")
            yield Epoch(result, module, judged, opt, sched, None if ema is None else ema.module, scaler, train_seconds)
    finally:
        bar.close()


def train(
    cfg: TrainConfig,
    data: Specs,
    out: str | Path,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    allow_random_init: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    classes: tuple[str, str] = ("benign", "malignant"),
    command: str = "",
    taxonomy: Taxonomy = DEFAULT_TAXONOMY,
    skip_invalid: bool = False,
) -> Path:
    """Trains one model into ``out`` on ``data``: one data folder, or several sources (``data.sources`` specs),
    united leak-proof (``data.loading``). Running it again on an unfinished ``out`` resumes; on a finished one,
    no-op; on a folder holding a different run, RunError.

    ``skip_bad``: unreadable image files are left out instead of stopping; ``skip_invalid``: so are invalid rows
    of a dataset's table (a listed image missing, an unlisted image, a duplicate row, a diagnosis outside the
    taxonomy). Both are listed, with the reason, in the run's skipped_files.txt."""
    # config: what is asked for, and whether ``out`` already holds it
    run = RunFolder(out)
    compute = Compute.of(cfg)  # the device is there (ConfigError if not), before any data is read
    tracking.require(cfg.log)  # and so is the tracker's package
    dataset = load_training_data(data, taxonomy, classes, skip_invalid=skip_invalid, progress=progress)
    resolved = resolve_weights(cfg.backbone, weights, weights_dir, allow_random_init, cfg.seed)
    file_hash = dataset.file_list_hash()
    check_existing(run, train_identity(cfg, resolved, file_hash))
    # the head's classes: from the whole training pool, so every fold and seed of this data gets the same head
    diagnoses = diagnosis_classes(dataset.train, taxonomy) if cfg.target == "diagnosis" else None
    if run.has(rf.MODEL) and run.has(rf.CONFIG) and not run.has(rf.STATE):
        return run.path  # finished earlier
    previous = run.config.raw.get("tracking") if run.has(rf.CONFIG) else None  # an unfinished run's tracker

    # data: features or images of the readable files, split
    t_start = time.perf_counter()
    inputs = read_inputs(dataset, resolved, cfg.mode, cfg.seed, skip_bad, progress, cfg.resize, cfg.color_constancy)
    dataset = dataset.without({p for p, _ in inputs.bad})
    splits = dataset.splits(cfg.split_seed, cfg.val_fraction, cfg.fold, cfg.second_fold)
    source = inputs.source(splits, diagnoses)
    run.path.mkdir(parents=True, exist_ok=True)
    skipped = [(k.item, k.reason) for k in dataset.skipped] + inputs.bad
    run.write_skipped(skipped)
    config = run_config(cfg, resolved, data, classes, file_hash, splits, len(skipped), command, diagnoses)
    config["data"].update(data_record(data, dataset, taxonomy, skip_invalid))
    config["compute"] = compute.record()  # this session's: a resumed run may have started elsewhere
    run.write_config(config)
    run.write_splits(splits)
    data_seconds = time.perf_counter() - t_start  # decoding, and backbone features unless cached

    # resume state of an unfinished run
    state = torch.load(run / rf.STATE, map_location="cpu", weights_only=False) if run.has(rf.STATE) else None
    history: list[dict[str, Any]] = state["history"] if state else []
    best = state["best"] if state else {"val_accuracy": -1.0, "val_loss": float("inf"), "epoch": 0}
    earlier_seconds = state.get("wall_seconds", 0.0) if state else 0.0

    # model: frozen mode trains the head alone; the saved model puts the (fixed) backbone in front of it
    backbone = build_backbone(resolved, cfg.seed) if cfg.mode == "frozen" else None

    # loop, with a checkpoint of the best epoch (validation accuracy, then loss) and the resume state every epoch;
    # each epoch also to the tracker, if any (it marks its run finished, killed or failed as the loop ends)
    images, train_seconds = 0, 0.0  # this session's training throughput
    with tracking.start(cfg, run.path, config, previous) as tracker:
        if tracker.record():
            config["tracking"] = tracker.record()
            run.write_config(config)
        for ep in train_epochs(source, cfg, state, progress):
            r = ep.result
            history.append(r.row())
            if r.val_accuracy > best["val_accuracy"] or (
                r.val_accuracy == best["val_accuracy"] and r.val_loss < best["val_loss"]
            ):
                best.update(val_accuracy=r.val_accuracy, val_loss=r.val_loss, epoch=r.epoch)
                if backbone is None:  # finetune: the whole classifier trained
                    assert isinstance(ep.judged, LesionClassifier)
                    model = ep.judged
                else:  # frozen: the head alone trained
                    assert isinstance(ep.judged, Head)
                    model = LesionClassifier(backbone, ep.judged)
                save_model(model, run / rf.MODEL, model_meta(cfg, r.epoch, diagnoses))
            run.write_history(history, HISTORY_FIELDS)
            resume = {
                **ep.resume_state(),
                "history": history,
                "best": best,
                "wall_seconds": earlier_seconds + time.perf_counter() - t_start,
            }
            files.atomic_save_torch(resume, run / rf.STATE)
            tracker.log_epoch(r.row())
            images, train_seconds = images + source.n_train, train_seconds + ep.train_seconds

    # finished: the best epoch and the timings in config.json; no resume state left
    config["best_epoch"] = best["epoch"]
    config["compute"].update(throughput(images, train_seconds))
    config["timing"] = {
        "wall_seconds": round(earlier_seconds + time.perf_counter() - t_start, 1),
        "data_seconds_last_session": round(data_seconds, 1),
        "epoch_seconds_total": round(sum(float(h["seconds"]) for h in history), 1),
        "cpu_threads": torch.get_num_threads(),
        "note": "wall_seconds sums every session of a resumed run; data_seconds is decoding plus backbone "
        "features (near zero when the feature cache already held them)",
    }
    run.write_config(config)
    (run / rf.STATE).unlink(missing_ok=True)
    return run.path


def throughput(images: int, seconds: float) -> dict[str, Any]:
    """config.json's measured training speed: images (feature vectors in frozen mode) per second of training steps
    (augmentation, forward, backward, optimizer; not validation), over this session's epochs."""
    return {"images_per_second": round(images / seconds, 1) if seconds > 0 else None, "images_trained": images}
