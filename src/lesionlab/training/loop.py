"""Training, top to bottom: config, data, model, loop, checkpoint. Resumable at epoch granularity.

Two transfer modes:
- ``frozen`` (the study): the backbone is fixed, so its features are computed once (see
  ``features.py``) and only the head trains, on vectors, in seconds.
- ``finetune``: the whole network trains on augmented images. BatchNorm layers of the backbone stay
  in eval mode (their running statistics are frozen; their scale and shift still learn), because
  batches of 32 dermoscopy images are too small and too unlike ImageNet to re-estimate them, and
  because some weights (the Coral MobileNetV2) have BatchNorm folded into the convolutions.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.dataset import Dataset, Sample, load_dataset
from lesionlab.data.images import DecodedSet, decode_samples, normalize
from lesionlab.models.backbones import ResolvedWeights, build_backbone, resolve_weights
from lesionlab.models.classifier import Head, LesionClassifier, build_model, save_model
from lesionlab.training.config import TrainConfig
from lesionlab.training.features import (
    BadDataError,
    FeatureTable,
    load_or_compute,
    preprocessing,
)

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc", "lr", "seconds"]


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_auc: float
    lr: float
    seconds: float

    def row(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ pieces shared by both modes


def binary_auc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else float("nan")


def make_loss(cfg: TrainConfig, y_train: np.ndarray) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    pos_weight = None
    if cfg.class_weight:
        pos = float(y_train.sum())
        pos_weight = torch.tensor((len(y_train) - pos) / max(pos, 1.0))
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if cfg.label_smoothing:
            y = y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
        return bce(logits, y)

    return loss


def make_optimizer(cfg: TrainConfig, params, steps_per_epoch: int):
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Each epoch's randomness depends only on (seed, epoch), so a resumed run equals an unbroken one."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


# ------------------------------------------------------------------ frozen mode: the head on cached features


@torch.inference_mode()
def evaluate_head(head: Head, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[float, float, float]:
    head.eval()
    logits = head(x)
    loss = float(loss_fn(logits, y))
    acc = float(((logits > 0).float() == y).float().mean())
    return loss, acc, binary_auc(y.numpy(), logits.numpy())


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    cfg: TrainConfig,
    on_epoch: Callable[..., None] | None = None,
    state: dict | None = None,
    progress: bool = True,
) -> Head:
    """Trains the head for ``cfg.epochs``; ``on_epoch`` sees every epoch (checkpoints, sweeps)."""
    from tqdm.auto import tqdm

    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val)
    torch.manual_seed(cfg.seed + 1)
    head = Head(xt.shape[1], dropout=cfg.dropout)
    steps = math.ceil(len(xt) / cfg.batch_size)
    opt, sched = make_optimizer(cfg, head.parameters(), steps)
    loss_fn = make_loss(cfg, y_train)
    start = 0
    if state:
        head.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["epoch"]
    bar = tqdm(
        range(start + 1, cfg.epochs + 1),
        desc="train head",
        disable=not progress,
        unit="epoch",
        initial=start,
        total=cfg.epochs,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        head.train()
        perm = torch.randperm(len(xt), generator=epoch_generator(cfg.seed, epoch))
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(head(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
        tr_loss, tr_acc, _ = evaluate_head(head, xt, yt, loss_fn)
        va_loss, va_acc, va_auc = evaluate_head(head, xv, yv, loss_fn)
        result = EpochResult(
            epoch, tr_loss, tr_acc, va_loss, va_acc, va_auc, sched.get_last_lr()[0], time.perf_counter() - t0
        )
        bar.set_postfix(val_acc=f"{va_acc:.3f}", val_loss=f"{va_loss:.3f}")
        if on_epoch:
            on_epoch(result, head, opt, sched)
    return head


# ------------------------------------------------------------------ finetune mode: the whole network on images


def augment_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Dermoscopy has no up or down: flips, 90-degree turns, a random resized crop, mild colour jitter."""
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True)
    jitter = v2.ColorJitter(0.15, 0.15, 0.1, 0.02)
    out = []
    for img in images:  # per image: v2 would share one draw across a batched tensor
        img = crop(img)
        if torch.rand(1) < 0.5:
            img = img.flip(-1)
        if torch.rand(1) < 0.5:
            img = img.flip(-2)
        img = torch.rot90(img, int(torch.randint(0, 4, (1,))), dims=(-2, -1))
        out.append(jitter(img))
    return torch.stack(out)


def to_input(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NxCxHxW -> normalised float."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - m) / s


def freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.inference_mode()
def model_logits(model: nn.Module, images_hwc: np.ndarray, mean, std, batch_size: int = 64) -> np.ndarray:
    model.eval().to(memory_format=torch.channels_last)
    out = [
        model(
            torch.from_numpy(normalize(images_hwc[i : i + batch_size], mean, std)).contiguous(
                memory_format=torch.channels_last
            )
        ).numpy()
        for i in range(0, len(images_hwc), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def make_ema(model: nn.Module, decay: float):
    """timm's weight EMA with warm-up (the average forgets the ImageNet start quickly), or None when off.

    It smooths the last epochs' noise, so the epoch picked on validation depends less on luck."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True)


def fit_network(
    model: LesionClassifier,
    train_imgs: np.ndarray,
    y_train: np.ndarray,
    val_imgs: np.ndarray,
    y_val: np.ndarray,
    cfg: TrainConfig,
    weights: ResolvedWeights,
    on_epoch: Callable | None = None,
    state: dict | None = None,
    progress: bool = True,
) -> LesionClassifier:
    """Fine-tunes ``model``; with ``cfg.ema_decay`` the weight average is what is validated, passed to
    ``on_epoch`` as ``ema`` and returned."""
    from tqdm.auto import tqdm

    steps = math.ceil(len(train_imgs) / cfg.batch_size)
    opt, sched = make_optimizer(cfg, model.parameters(), steps)
    loss_fn = make_loss(cfg, y_train)
    start = 0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["epoch"]
    ema = make_ema(model, cfg.ema_decay)
    if ema is not None and state and state.get("ema"):
        ema.module.load_state_dict(state["ema"])
    chw = torch.from_numpy(train_imgs).permute(0, 3, 1, 2)
    yt = torch.from_numpy(y_train)
    # channels-last lets oneDNN pick its fast convolution kernels (about 2x on CPU, same numbers);
    # bf16 autocast about 1.5x more on CPUs that compute bf16 natively. Weights and optimizer stay fp32.
    model.to(memory_format=torch.channels_last)
    bf16 = cfg.precision == "bf16"
    bar = tqdm(
        total=cfg.epochs * steps,
        initial=start * steps,
        desc=f"finetune {cfg.backbone}",
        disable=not progress,
        unit="batch",
    )
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        freeze_batchnorm(model.backbone)
        g = epoch_generator(cfg.seed, epoch)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))  # augmentation draws
        perm = torch.randperm(len(chw), generator=g)
        total, correct, seen = 0.0, 0, 0
        for i in range(0, len(chw), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            batch = chw[idx]
            if cfg.augmentation == "dermoscopy":
                batch = augment_batch(batch, weights.input_size)
            x = to_input(batch, weights.mean, weights.std).contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            logits = logits.float()
            loss = loss_fn(logits, yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model, step=sched.last_epoch)  # the scheduler counts optimizer steps
            total += float(loss.detach()) * len(idx)
            correct += int(((logits.detach() > 0).float() == yt[idx]).sum())
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{total / seen:.3f}")
        judged = model if ema is None else ema.module
        vl = model_logits(judged, val_imgs, weights.mean, weights.std)
        va_loss = float(loss_fn(torch.from_numpy(vl), torch.from_numpy(y_val)))
        va_acc = float(((vl > 0) == (y_val > 0.5)).mean())
        result = EpochResult(
            epoch,
            total / seen,
            correct / seen,
            va_loss,
            va_acc,
            binary_auc(y_val, vl),
            sched.get_last_lr()[0],
            time.perf_counter() - t0,
        )
        bar.set_postfix(epoch=epoch, val_acc=f"{va_acc:.3f}")
        if on_epoch:
            on_epoch(result, model, opt, sched, ema=None if ema is None else ema.module)
    bar.close()
    return model if ema is None else ema.module


# ------------------------------------------------------------------ the run folder


def train_settings(cfg: TrainConfig) -> dict:
    """The config as recorded; options added later are left out while off, so older runs and caches still match."""
    return {k: v for k, v in asdict(cfg).items() if not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}


LATER_OPTIONS = {"ema_decay": 0.0, "fold": 0, "also_val_fold": -1}


def _train_identity(cfg: TrainConfig, weights: ResolvedWeights, file_hash: str) -> dict:
    return {"train": train_settings(cfg), "weights_sha256": weights.sha256, "file_list_sha256": file_hash}


def write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    files.atomic_write_text(path, buf.getvalue())


def write_splits(path: Path, splits: dict[str, list[Sample]]) -> None:
    lines = ["relpath,label,split"] + [
        f"{s.relpath},{s.label},{name}" for name in ("train", "val", "test") for s in splits[name]
    ]
    files.atomic_write_text(path, "\n".join(lines) + "\n")


def _check_existing(out: Path, identity: dict) -> None:
    cfg_path = out / rf.CONFIG
    if not cfg_path.exists():
        return
    old = files.read_json(cfg_path)
    old_identity = {k: old.get(k) for k in identity}
    if old_identity != identity:
        diff = [k for k in identity["train"] if old.get("train", {}).get(k) != identity["train"][k]]
        what = f"settings differ: {', '.join(diff)}" if diff else "weights or data files differ"
        raise rf.RunError(f"{out} already holds a different run ({what}); choose another --out or delete it")


def run_config(
    cfg: TrainConfig,
    resolved: ResolvedWeights,
    data: str | Path,
    classes: tuple[str, str],
    file_hash: str,
    splits: dict[str, list[Sample]],
    n_skipped: int,
    command: str = "",
) -> dict:
    """config.json's content: one schema for runs from ``train`` and runs written by the sweep."""
    return {
        **_train_identity(cfg, resolved, file_hash),
        "kind": "lesionlab-run",
        "backbone": cfg.backbone,
        "mode": cfg.mode,
        "weights": resolved.describe(),
        "pretrained": resolved.pretrained,
        "preprocessing": preprocessing(resolved),
        "data": {
            "root": str(Path(data).resolve()),
            "classes": list(classes),
            "positive_class": classes[1],
            "file_list_sha256": file_hash,
            "split_seed": cfg.split_seed,
            "val_fraction": cfg.val_fraction,
            "fold": cfg.fold,
            **({"also_val_fold": cfg.also_val_fold} if cfg.second_fold is not None else {}),
            "skipped_files": n_skipped,
            **{f"n_{k}": len(v) for k, v in splits.items()},
        },
        "model": {"head": "Dense(100, ReLU) -> Dense(1) -> sigmoid", "hidden": 100, "dropout": cfg.dropout},
        "versions": rf.package_versions(),
        "command": command,
    }


def write_run(
    out: str | Path,
    cfg: TrainConfig,
    resolved: ResolvedWeights,
    data: str | Path,
    classes: tuple[str, str],
    file_hash: str,
    splits: dict[str, list[Sample]],
    bad: list[tuple[str, str]],
    history: list[dict],
    model: LesionClassifier,
    command: str = "",
    extra: dict | None = None,
) -> Path:
    """A finished run folder from a model trained elsewhere (the sweep), as ``train`` would have left it.

    ``model`` is the state after ``cfg.epochs`` epochs, recorded as the run's best epoch.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if bad:
        files.atomic_write_text(out / rf.SKIPPED, "".join(f"{p}\t{r}\n" for p, r in bad))
    write_splits(out / "splits.csv", splits)
    write_history(out / rf.HISTORY, history)
    meta = {"backbone": cfg.backbone, "hidden": 100, "dropout": cfg.dropout, "mode": cfg.mode, "epoch": cfg.epochs}
    save_model(model, out / rf.MODEL, meta)
    (out / rf.STATE).unlink(missing_ok=True)
    config = {
        **run_config(cfg, resolved, data, classes, file_hash, splits, len(bad), command),
        "best_epoch": cfg.epochs,
        **(extra or {}),
    }
    files.atomic_write_json(out / rf.CONFIG, config)
    return out


def training_inputs(
    dataset: Dataset, weights: ResolvedWeights, mode: str, seed: int, skip_bad: bool, progress: bool
) -> tuple[FeatureTable | None, DecodedSet | None, list[tuple[str, str]]]:
    """Cached features (frozen) or decoded images (finetune), and the unreadable files; or BadDataError."""
    if mode == "frozen":
        table = load_or_compute(dataset, weights, seed, skip_bad, progress)
        return table, None, table.bad
    decoded = decode_samples(dataset.all, weights.input_size, progress)
    if decoded.bad and not skip_bad:
        raise BadDataError(decoded.bad)
    return None, decoded, [(e.path, e.reason) for e in decoded.bad]


def train(
    cfg: TrainConfig,
    data: str | Path,
    out: str | Path,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    allow_random_init: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
    classes: tuple[str, str] = ("benign", "malignant"),
    command: str = "",
) -> Path:
    """Trains one model into ``out``. Running it again on an unfinished ``out`` resumes; on a finished one, no-op."""
    out = Path(out)
    dataset = load_dataset(data, classes)
    resolved = resolve_weights(cfg.backbone, weights, weights_dir, allow_random_init, cfg.seed)
    file_hash = dataset.file_list_hash()
    identity = _train_identity(cfg, resolved, file_hash)
    _check_existing(out, identity)
    state_path = out / rf.STATE
    if (out / rf.MODEL).exists() and (out / rf.CONFIG).exists() and not state_path.exists():
        return out  # finished earlier

    t_start = time.perf_counter()
    table, decoded, bad = training_inputs(dataset, resolved, cfg.mode, cfg.seed, skip_bad, progress)
    dataset = dataset.without({p for p, _ in bad})
    splits = dataset.splits(cfg.split_seed, cfg.val_fraction, cfg.fold, cfg.second_fold)

    out.mkdir(parents=True, exist_ok=True)
    if bad:
        files.atomic_write_text(out / rf.SKIPPED, "".join(f"{p}\t{r}\n" for p, r in bad))
    config = run_config(cfg, resolved, data, classes, file_hash, splits, len(bad), command)
    files.atomic_write_json(out / rf.CONFIG, config)
    write_splits(out / "splits.csv", splits)
    data_seconds = time.perf_counter() - t_start  # decoding, and backbone features unless cached

    state = torch.load(state_path, map_location="cpu", weights_only=False) if state_path.exists() else None
    history: list[dict] = state["history"] if state else []
    best = state["best"] if state else {"val_accuracy": -1.0, "val_loss": float("inf"), "epoch": 0}
    earlier_seconds = state.get("wall_seconds", 0.0) if state else 0.0
    meta = {"backbone": cfg.backbone, "hidden": 100, "dropout": cfg.dropout, "mode": cfg.mode}

    if cfg.mode == "frozen":
        backbone = build_backbone(resolved, cfg.seed)

        def full_model(head: nn.Module) -> LesionClassifier:
            return LesionClassifier(backbone, head)
    else:
        model = build_model(resolved, cfg.seed, dropout=cfg.dropout)

        def full_model(net: nn.Module) -> LesionClassifier:
            return net

    def on_epoch(result: EpochResult, module: nn.Module, opt, sched, ema: nn.Module | None = None) -> None:
        history.append(result.row())
        better = result.val_accuracy > best["val_accuracy"] or (
            result.val_accuracy == best["val_accuracy"] and result.val_loss < best["val_loss"]
        )
        if better:
            best.update(val_accuracy=result.val_accuracy, val_loss=result.val_loss, epoch=result.epoch)
            save_model(full_model(module if ema is None else ema), out / rf.MODEL, {**meta, "epoch": result.epoch})
        write_history(out / rf.HISTORY, history)
        files.atomic_save_torch(
            {
                "model": module.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": result.epoch,
                "history": history,
                "best": best,
                "wall_seconds": earlier_seconds + time.perf_counter() - t_start,
            },
            state_path,
        )

    if cfg.mode == "frozen":
        x_tr, y_tr = table.rows(splits["train"])
        x_va, y_va = table.rows(splits["val"])
        fit_head(x_tr, y_tr, x_va, y_va, cfg, on_epoch, state, progress)
    else:
        index = {s.relpath: i for i, s in enumerate(decoded.samples)}
        pick = lambda ss: (
            decoded.images[[index[s.relpath] for s in ss]],
            np.array([s.label for s in ss], np.float32),
        )
        (tr_img, y_tr), (va_img, y_va) = pick(splits["train"]), pick(splits["val"])
        fit_network(model, tr_img, y_tr, va_img, y_va, cfg, resolved, on_epoch, state, progress)
    config["best_epoch"] = best["epoch"]
    config["timing"] = {
        "wall_seconds": round(earlier_seconds + time.perf_counter() - t_start, 1),
        "data_seconds_last_session": round(data_seconds, 1),
        "epoch_seconds_total": round(sum(float(h["seconds"]) for h in history), 1),
        "cpu_threads": torch.get_num_threads(),
        "note": "wall_seconds sums every session of a resumed run; data_seconds is decoding plus backbone "
        "features (near zero when the feature cache already held them)",
    }
    files.atomic_write_json(out / rf.CONFIG, config)
    state_path.unlink(missing_ok=True)
    return out


def config_from_run(run_dir: Path) -> TrainConfig:
    raw = files.read_json(Path(run_dir) / rf.CONFIG)["train"]
    raw.setdefault("precision", "fp32")  # runs written before bf16 training existed trained in fp32
    return TrainConfig(**{f.name: raw[f.name] for f in fields(TrainConfig) if f.name in raw})
