"""Times the study's full grid with ``lesionlab sweep`` and compares it with naive per-configuration retraining.

    python bench/sweep.py --weights-dir ../shared/weights --out /tmp/bench-sweep

Sweep: ``run_sweep`` end to end (weights, feature extraction, every trial, selection, evaluation of the
selected models, Table 1 and figures) with an EMPTY feature cache, so extraction is paid in full, for
  A. mobilenetv2 + efficientnet_lite0 (ImageNet weights), and
  B. the same two plus resnet50v2 and vgg16 (random init: no ImageNet weights here; timing only).

Naive: what the study's procedure costs, retraining every (lr, epochs) configuration from scratch
with the frozen backbone run on every batch of every epoch (a Keras model with a frozen base). One
epoch = decode the training images from disk, backbone forward + head step per batch of 32, then
the validation pass. Measured on ``--naive-batches`` training batches (and a quarter as many
validation batches), scaled to the full epoch, then multiplied by the grid's total epoch count
(5 lrs x (10+20+30+40+50+100) = 1250 epochs per backbone). Model construction per configuration
is not counted, which favours naive.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PRETRAINED = ("mobilenetv2", "efficientnet_lite0")


def cpu_seconds() -> float:
    """This process's CPU time (user + system): the work done, whatever else the machine is running."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Clock:
    """Wall and CPU seconds since start; on a shared machine the two tell contention apart from work."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, cpu_seconds() - self.cpu


RANDOM_INIT = ("resnet50v2", "vgg16")


def naive_epoch_seconds(backbone_name: str, dataset, weights_dir, n_batches: int, batch_size: int = 32) -> dict:
    """Seconds of one naive training epoch (frozen backbone run on every batch), from a measured sample."""
    from lesionlab.data.images import normalize, open_image, resize_to_input
    from lesionlab.models.backbones import build_backbone, num_features, resolve_weights
    from lesionlab.models.classifier import Head
    from lesionlab.training.config import TrainConfig
    from lesionlab.training.optim import make_loss, make_optimizer

    weights = resolve_weights(backbone_name, None, weights_dir, allow_random_init=True)
    splits = dataset.splits()
    train, val = splits["train"], splits["val"]
    backbone = build_backbone(weights).eval().to(memory_format=torch.channels_last)  # as features.extract
    head = Head(num_features(backbone))
    opt, _ = make_optimizer(TrainConfig(lr=1e-3), head.parameters(), 1)
    loss_fn = make_loss(TrainConfig(), np.zeros(1, np.float32))
    rng = np.random.default_rng(0)

    def batch(samples):
        imgs = np.stack([resize_to_input(open_image(s.path), weights.input_size) for s in samples])
        return torch.from_numpy(normalize(imgs, weights.mean, weights.std)), torch.tensor(
            [float(s.label) for s in samples]
        )

    def timed(samples, n, step: bool) -> tuple[float, float]:
        order = rng.permutation(len(samples))
        clock = Clock()
        for i in range(-1, n):  # batch -1 warms up (allocator, kernels) and is not timed
            if i == 0:
                clock = Clock()
            x, y = batch([samples[j] for j in order[max(i, 0) * batch_size : (max(i, 0) + 1) * batch_size]])
            with torch.no_grad():
                feats = backbone(x.contiguous(memory_format=torch.channels_last))
            if step:
                opt.zero_grad()
                loss_fn(head(feats), y).backward()
                opt.step()
            else:
                with torch.no_grad():
                    head(feats)
        wall, cpu = clock.read()
        return wall / n, cpu / n

    n_val = max(1, n_batches // 4)
    load = os.getloadavg()[0]
    (train_wall, train_cpu), (val_wall, val_cpu) = timed(train, n_batches, True), timed(val, n_val, False)
    steps_train, steps_val = math.ceil(len(train) / batch_size), math.ceil(len(val) / batch_size)
    return {
        "backbone": backbone_name,
        "pretrained": weights.pretrained,
        "measured_train_batches": n_batches,
        "measured_val_batches": n_val,
        "wall_per_train_batch": train_wall,
        "wall_per_val_batch": val_wall,
        "seconds_per_epoch": train_wall * steps_train + val_wall * steps_val,
        "cpu_seconds_per_epoch": train_cpu * steps_train + val_cpu * steps_val,
        "loadavg_1min_before": load,
    }


def time_sweep(backbones, args, cache: Path, out: Path) -> dict:
    """One cold end-to-end sweep (empty feature cache) in this process."""
    from lesionlab.sweep.sweep import SweepGrid, run_sweep

    os.environ["LESIONLAB_CACHE_DIR"] = str(cache)  # read by features.cache_dir() at call time
    grid = SweepGrid(backbones=tuple(backbones), lrs=tuple(args.lrs), epochs=tuple(args.epochs))
    load = os.getloadavg()[0]
    clock = Clock()
    result = run_sweep(grid, args.data, out, args.weights_dir, allow_random_init=True, progress=not args.quiet)
    wall, cpu = clock.read()
    trial_seconds = {}
    for r in result.rows:
        if r["epochs"] == grid.max_epochs:
            trial_seconds[r["backbone"]] = trial_seconds.get(r["backbone"], 0.0) + r["train_seconds"]
    return {
        "backbones": list(backbones),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "rows": len(result.rows),
        "loadavg_1min_before": load,
        "loadavg_1min_after": os.getloadavg()[0],
        "phases": result.seconds,
        "trial_epoch_seconds_by_backbone": trial_seconds,
        "grid_epochs_per_backbone": len(grid.lrs) * sum(grid.epochs) * len(grid.seeds),
        "out": str(out),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/isic-kaggle")
    p.add_argument("--weights-dir", default="../shared/weights")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lesionlab-bench-sweep")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 5e-4, 1e-4, 5e-3, 1e-3])
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 20, 30, 40, 50, 100])
    p.add_argument("--naive-batches", type=int, default=24, help="training batches measured per backbone")
    p.add_argument("--skip", nargs="*", default=[], choices=["A", "B", "naive"], help="parts to skip")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    from lesionlab.data.dataset import load_dataset
    from lesionlab.runtime import keep_freed_memory

    keep_freed_memory()  # what run_sweep does: naive is measured under the same allocator settings
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_start": os.getloadavg(),
        },
        "grid": {"lrs": args.lrs, "epochs": args.epochs},
    }
    path = args.out / "bench.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=2))

    if "A" not in args.skip:
        report["sweep_A"] = time_sweep(PRETRAINED, args, args.out / "cache-A", args.out / "sweep-A")
        save()
    if "B" not in args.skip:
        report["sweep_B"] = time_sweep(PRETRAINED + RANDOM_INIT, args, args.out / "cache-B", args.out / "sweep-B")
        save()
    if "naive" not in args.skip:
        dataset = load_dataset(args.data)
        epochs_per_backbone = len(args.lrs) * sum(args.epochs)
        report["naive"] = {}
        for name in PRETRAINED + RANDOM_INIT:
            n = naive_epoch_seconds(name, dataset, args.weights_dir, args.naive_batches)
            n["grid_seconds"] = n["seconds_per_epoch"] * epochs_per_backbone
            n["grid_cpu_seconds"] = n["cpu_seconds_per_epoch"] * epochs_per_backbone
            report["naive"][name] = n
            save()
            print(
                f"naive {name}: {n['seconds_per_epoch']:.1f} s/epoch -> {n['grid_seconds'] / 3600:.1f} h "
                f"for {epochs_per_backbone} epochs",
                flush=True,
            )
    report["machine"]["loadavg_end"] = os.getloadavg()
    for key in ("sweep_A", "sweep_B"):
        if key in report and "naive" in report:
            s = report[key]
            naive = sum(report["naive"][b]["grid_seconds"] for b in s["backbones"])
            naive_cpu = sum(report["naive"][b]["grid_cpu_seconds"] for b in s["backbones"])
            s.update(
                naive_grid_seconds=naive,
                naive_grid_cpu_seconds=naive_cpu,
                ratio=naive / s["wall_seconds"],
                ratio_cpu=naive_cpu / s["cpu_seconds"],
            )
            print(
                f"{key} {'+'.join(s['backbones'])}: sweep {s['wall_seconds'] / 60:.1f} min wall, "
                f"{s['cpu_seconds'] / 60:.1f} min CPU ({s['rows']} rows); naive {naive / 3600:.1f} h wall, "
                f"{naive_cpu / 3600:.1f} h CPU; ratio {s['ratio']:.0f}x wall, {s['ratio_cpu']:.0f}x CPU",
                flush=True,
            )
        elif key in report:
            print(
                f"{key}: sweep {report[key]['wall_seconds'] / 60:.1f} min wall, "
                f"{report[key]['cpu_seconds'] / 60:.1f} min CPU",
                flush=True,
            )
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
