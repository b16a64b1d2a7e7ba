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

Launched by torchrun or Ray Train, the same functions train data-parallel (``distributed.py``): DDP averages the
gradients of the ranks' shares of each global batch, the epoch's metrics are summed over the ranks, and rank 0
alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
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
from lesionlab.runtime import release_freed_memory
from lesionlab.training import distributed, tracking
from lesionlab.training.config import TrainConfig
from lesionlab.training.device import Compute, RunningMeans
from lesionlab.training.distributed import Ranks
from lesionlab.training.inputs import read_inputs
from lesionlab.training.optim import make_ema, make_loss, make_optimizer
from lesionlab.training.record import (
    HISTORY_FIELDS,
    EpochResult,
    check_existing,
    model_meta,
    run_config,
    train_identity,
)
from lesionlab.training.sources import Source, TrainingOutputs
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
    wait_seconds: float = 0.0  # of train_seconds, waiting for the data loader's next batch

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
    source: Source,
    cfg: TrainConfig,
    state: dict[str, Any] | None = None,
    progress: bool = True,
    ranks: Ranks = Ranks(),
    compute: Compute | None = None,
) -> Iterator[Epoch]:
    """Trains a module built by ``source`` for ``cfg.epochs`` epochs (or ``cfg.max_steps`` steps), from ``state``
    (a ``resume_state``) if given, yielding after each epoch. The epochs' randomness depends only on (cfg.seed,
    epoch), and the constant schedule not on the planned length, so the state after E epochs is that of a separate
    E-epoch run. ``state`` may come from another device, or a run with another number of processes (tensors are
    loaded onto this device). ``ranks``: this process's share of a distributed run (one process by default);
    ``compute``: where to train (default: ``cfg.device``)."""
    from tqdm.auto import tqdm

    compute = compute or Compute.of(cfg)
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
    net = data_parallel(module, compute, ranks)
    feed = source.feed(cfg, ranks, pin_memory=not compute.on_cpu)
    last = cfg.epochs if not cfg.max_steps else min(cfg.epochs, math.ceil(cfg.max_steps / steps))

    total = min(cfg.epochs * steps, cfg.max_steps or cfg.epochs * steps)
    show = progress and ranks.main
    bar = tqdm(
        total=total, initial=min(start * steps, total), desc=source.describe(cfg), disable=not show, unit="batch"
    )
    try:
        for epoch in range(start + 1, last + 1):
            t0 = time.perf_counter()
            source.train_mode(module)
            running = RunningMeans(compute.device)
            wait = 0.0
            batches = feed.epoch(epoch)
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                wait += time.perf_counter() - t_wait
                if batch is None or (cfg.max_steps and sched.last_epoch >= cfg.max_steps):
                    break
                x, y, c = compute.move(*batch[:3])
                opt.zero_grad(set_to_none=True)
                logits, z = source.forward(net, x, cfg)  # z: diagnosis logits (--target diagnosis), else None
                loss = loss_fn(logits, y, z, c) if len(y) else logits.sum() * 0.0
                # a rank's loss weighted by its share of the global batch: DDP's mean of the ranks' gradients is
                # then the gradient of the whole batch's mean loss (a no-op in one process)
                share = len(y) * ranks.world / batch[3]
                if scaler is None:
                    (loss * share if share != 1 else loss).backward()
                    opt.step()
                else:  # fp16: the loss scaled up so small gradients survive; a step that overflowed is skipped
                    scaler.scale(loss * share).backward()
                    scaler.step(opt)
                    scaler.update()
                sched.step()
                if ema is not None:
                    ema.update(module, step=sched.last_epoch)  # the scheduler counts optimizer steps
                if len(y):
                    running.add(loss, logits, y)
                bar.update(1)
                if (mean := running.running_loss()) is not None and running.seen:
                    bar.set_postfix(epoch=epoch, loss=f"{mean:.3f}")
            train_loss, train_acc = reduce_means(running, ranks, compute)  # on a GPU: waits for the last step
            train_seconds = time.perf_counter() - t0
            release_freed_memory()  # the epoch's activations, before validation allocates its own

            judged = module if ema is None else ema.module
            if source.rescore_train:
                train_loss, train_acc, _ = source.score(judged, "train", loss_fn, ranks)
            val_loss, val_acc, val_auc = source.score(judged, "val", loss_fn, ranks)
            release_freed_memory()
            lr = sched.get_last_lr()[0]
            assert isinstance(lr, float)  # a tensor only for a tensor cfg.lr
            result = EpochResult(epoch, train_loss, train_acc, val_loss, val_acc, val_auc, lr, time.perf_counter() - t0)
            bar.set_postfix(epoch=epoch, val_acc=f"{val_acc:.3f}", val_loss=f"{val_loss:.3f}")
            ema_module = None if ema is None else ema.module
            yield Epoch(result, module, judged, opt, sched, ema_module, scaler, train_seconds, wait)
    finally:
        bar.close()


def data_parallel(module: nn.Module, compute: Compute, ranks: Ranks) -> nn.Module:
    """``module`` itself in one process; else DDP over its training outputs (``TrainingOutputs``). BatchNorm
    statistics are frozen in fine-tuning, so buffers are not synchronised at every forward."""
    if not ranks.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [compute.device.index] if compute.device.type == "cuda" else None
    return DistributedDataParallel(TrainingOutputs(module), device_ids=ids, forward_sync_buffers=False)


def reduce_means(running: RunningMeans, ranks: Ranks, compute: Compute) -> tuple[float, float]:
    """The epoch's training loss and accuracy over every rank's batches (this process's alone in one)."""
    if not ranks.distributed:
        return running.means()
    loss, correct, seen = ranks.sum(list(running.sums()), compute.device)
    return loss / max(seen, 1), correct / max(seen, 1)


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
    from lesionlab.training.config import ConfigError, device_type

    ranks, created = distributed.join(device_type(cfg.device))
    try:
        if ranks.distributed and cfg.mode == "frozen":
            raise ConfigError("frozen mode trains its head in seconds on one process: launch it without torchrun/Ray")
        return _train(cfg, data, out, weights, weights_dir, allow_random_init, skip_bad, progress, classes,
                      command, taxonomy, skip_invalid, ranks)  # fmt: skip
    finally:
        distributed.leave(created)


def _train(
    cfg: TrainConfig,
    data: Specs,
    out: str | Path,
    weights: str | Path | None,
    weights_dir: str | Path | None,
    allow_random_init: bool,
    skip_bad: bool,
    progress: bool,
    classes: tuple[str, str],
    command: str,
    taxonomy: Taxonomy,
    skip_invalid: bool,
    ranks: Ranks,
) -> Path:
    # config: what is asked for, and whether ``out`` already holds it
    run = RunFolder(out)
    compute = Compute.of(cfg, ranks.local_rank if ranks.distributed else None)  # ConfigError if not there
    tracking.require(cfg.log)  # and so is the tracker's package
    progress = progress and ranks.main
    with ranks.main_first():  # rank 0 fills the duplicate cache; the others find it
        dataset = load_training_data(data, taxonomy, classes, skip_invalid=skip_invalid, progress=progress)
    resolved = resolve_weights(cfg.backbone, weights, weights_dir, allow_random_init, cfg.seed)
    if cfg.input_size:  # the backbone at another input size: everything downstream reads it from the run
        resolved = dataclasses.replace(resolved, input_size=cfg.input_size)
    file_hash = dataset.file_list_hash(mtimes=False)
    check_existing(run, train_identity(cfg, resolved, file_hash), dataset.file_list_hash)
    # the head's classes: from the whole training pool, so every fold and seed of this data gets the same head
    diagnoses = diagnosis_classes(dataset.train, taxonomy) if cfg.target == "diagnosis" else None
    if run.has(rf.MODEL) and run.has(rf.CONFIG) and not run.has(rf.STATE):
        return run.path  # finished earlier
    previous = run.config.raw.get("tracking") if run.has(rf.CONFIG) else None  # an unfinished run's tracker

    # data: features or images of the readable files, split
    t_start = time.perf_counter()
    with ranks.main_first():  # rank 0 decodes into the image cache; the others find it full
        inputs = read_inputs(
            dataset, resolved, cfg.mode, cfg.seed, skip_bad, progress, cfg.resize, cfg.color_constancy, cfg.workers
        )
    dataset = dataset.without({p for p, _ in inputs.bad})
    splits = dataset.splits(cfg.split_seed, cfg.val_fraction, cfg.fold, cfg.second_fold)
    source = inputs.source(splits, diagnoses, save_memory=cfg.grad_checkpointing)
    skipped = [(k.item, k.reason) for k in dataset.skipped] + inputs.bad
    config = run_config(cfg, resolved, data, classes, file_hash, splits, len(skipped), command, diagnoses)
    config["data"].update(data_record(data, dataset, taxonomy, skip_invalid))
    config["compute"] = compute.record()  # this session's: a resumed run may have started elsewhere
    config["compute"]["data_workers"] = cfg.workers if cfg.mode == "finetune" else 0
    if ranks.distributed:
        config["compute"]["distributed"] = ranks.record()
    if ranks.main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_skipped(skipped)
        run.write_config(config)
        run.write_splits(splits)
    data_seconds = time.perf_counter() - t_start  # decoding, and backbone features unless cached

    # resume state of an unfinished run (the same on every rank: rank 0 wrote it)
    state = torch.load(run / rf.STATE, map_location="cpu", weights_only=False) if run.has(rf.STATE) else None
    history: list[dict[str, Any]] = state["history"] if state else []
    best = state["best"] if state else {"val_accuracy": -1.0, "val_loss": float("inf"), "epoch": 0}
    earlier_seconds = state.get("wall_seconds", 0.0) if state else 0.0

    # model: frozen mode trains the head alone; the saved model puts the (fixed) backbone in front of it
    backbone = build_backbone(resolved, cfg.seed) if cfg.mode == "frozen" else None

    # loop, with a checkpoint of the best epoch (validation accuracy, then loss) and the resume state every epoch;
    # each epoch also to the tracker, if any (it marks its run finished, killed or failed as the loop ends).
    # Every rank trains; rank 0 alone writes.
    images, train_seconds, wait_seconds = 0, 0.0, 0.0  # this session's training throughput
    with tracking.start(
        cfg if ranks.main else dataclasses.replace(cfg, log="none"), run.path, config, previous
    ) as tracker:
        if tracker.record():
            config["tracking"] = tracker.record()
            run.write_config(config)
        for ep in train_epochs(source, cfg, state, progress, ranks, compute):
            r = ep.result
            history.append(r.row())
            improved = r.val_accuracy > best["val_accuracy"] or (
                r.val_accuracy == best["val_accuracy"] and r.val_loss < best["val_loss"]
            )
            if improved:
                best.update(val_accuracy=r.val_accuracy, val_loss=r.val_loss, epoch=r.epoch)
            steps_done = ep.scheduler.last_epoch - (r.epoch - 1) * math.ceil(source.n_train / cfg.batch_size)
            images += min(source.n_train, steps_done * cfg.batch_size)
            train_seconds, wait_seconds = train_seconds + ep.train_seconds, wait_seconds + ep.wait_seconds
            if not ranks.main:
                continue
            if improved:
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

    # finished: the best epoch and the timings in config.json; no resume state left
    if not ranks.main:
        return run.path
    config["best_epoch"] = best["epoch"]
    config["compute"].update(throughput(images, train_seconds, wait_seconds, compute))
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


def throughput(images: int, seconds: float, wait: float = 0.0, compute: Compute | None = None) -> dict[str, Any]:
    """config.json's measured training speed: images (feature vectors in frozen mode; of all ranks) per second of
    training steps (data, forward, backward, optimizer; not validation), over this session's epochs; the share of
    that time spent waiting for the data loader; on a GPU, the peak memory its tensors took."""
    out: dict[str, Any] = {
        "images_per_second": round(images / seconds, 1) if seconds > 0 else None,
        "images_trained": images,
        "data_wait_fraction": round(wait / seconds, 3) if seconds > 0 else None,
    }
    if compute is not None and compute.device.type == "cuda":
        out["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated(compute.device) / 2**30, 2)
    return out
