"""Bundle an evaluated, exported run as the package's default model, with its MODEL_CARD.md.

    python tools/make_default_model.py RUN_DIR [--command "a command that made it" ...] [--site-calibration FILE]

Copies the ONNX model and what serving needs (preprocess, calibration, lesion detector, metrics,
config) into ``src/lesionlab/default_model/``, plus ``model.pt`` in float16 for Grad-CAM
explanations (predictions use the float32 ONNX model), and writes MODEL_CARD.md from the run's
own files (``lesionlab.evaluation.card``), with a ``bench/site_calibration.py --json`` measurement
when given. Refuses a run without model.onnx (run ``lesionlab export RUN_DIR`` first) or larger
than the package budget.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from lesionlab.evaluation.card import model_card
from lesionlab.inference.loading import DEFAULT_MODEL_DIR

MAX_ONNX_BYTES = 25 * 1024 * 1024
COPY = (
    "model.onnx",
    "preprocess.json",
    "calibration.json",
    "config.json",
    "metrics.json",
    "ood.npz",
    "ood.json",
    "refusal.json",
)


def _half_checkpoint(src: Path, dst: Path) -> None:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    ckpt["meta"] = {**ckpt["meta"], "stored_as": "float16 (explanations only; predictions use model.onnx)"}
    torch.save(ckpt, dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument(
        "--command", action="append", default=[], help="how it was made, in order (default: config.json's command)"
    )
    ap.add_argument("--site-calibration", type=Path, help="a bench/site_calibration.py --json record to report")
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    args = ap.parse_args()
    run: Path = args.run
    if not (run / "model.onnx").exists():
        sys.exit(f"{run} has no model.onnx: run `lesionlab export {run}` first")
    if (run / "model.onnx").stat().st_size > MAX_ONNX_BYTES:
        sys.exit(f"{run}/model.onnx is over {MAX_ONNX_BYTES // 2**20} MB: too large to bundle")
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COPY:
        if (run / name).exists():
            shutil.copy2(run / name, tmp / name)
    _half_checkpoint(run / "model.pt", tmp / "model.pt")
    site = json.loads(args.site_calibration.read_text()) if args.site_calibration else None
    (tmp / "MODEL_CARD.md").write_text(model_card(run, args.command, site))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"bundled {run} into {args.out}")


if __name__ == "__main__":
    main()
