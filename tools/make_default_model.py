"""Bundle an evaluated, exported run as the package's default model, with its MODEL_CARD.md.

    python tools/make_default_model.py RUN_DIR [--command "the command that trained it"]

Copies the ONNX model and what serving needs (preprocess, calibration, lesion detector, metrics,
config) into ``src/lesionlab/default_model/``, plus ``model.pt`` in float16 for Grad-CAM
explanations (predictions use the float32 ONNX model), and writes the model card from the run's
own metrics. Refuses a run without model.onnx (run ``lesionlab export RUN_DIR`` first) or larger
than the package budget.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from lesionlab.evaluation.report import DISCLAIMER, metrics_table
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


def model_card(run: Path, command: str) -> str:
    cfg = json.loads((run / "config.json").read_text())
    m = json.loads((run / "metrics.json").read_text())
    t = cfg["train"]
    refusal = m.get("refusal")
    onnx_mb = (run / "model.onnx").stat().st_size / 2**20
    lines = [
        "# Model card: lesionlab default model",
        "",
        f"> {DISCLAIMER}",
        "",
        "## What it is",
        f"- `{cfg['backbone']}` ({cfg['weights']['source']}, ImageNet weights sha256 "
        f"`{cfg['weights']['sha256'][:16]}...`), transfer mode `{cfg['mode']}`, "
        "head Dense(100, ReLU) -> Dense(1) -> sigmoid = P(malignant).",
        f"- Training: {t['optimizer']} lr {t['lr']}, {t['schedule']} schedule, {t['warmup_epochs']} warm-up epoch(s), "
        f"{t['epochs']} epochs, batch {t['batch_size']}, label smoothing {t['label_smoothing']}, seed {t['seed']}; "
        f"checkpoint of the best validation accuracy (epoch {cfg.get('best_epoch')}).",
        f"- Arithmetic: {t.get('precision', 'fp32')} (bf16 = autocast forward pass, fp32 weights and optimizer); "
        f"{cfg.get('timing', {}).get('epoch_seconds_total', float('nan')) / 60:.1f} min of training on "
        f"{cfg.get('timing', {}).get('cpu_threads', '?')} CPU threads.",
        f"- Input: RGB, shorter side resized to {cfg['preprocessing']['input_size']} px (bicubic) and centre-cropped, "
        f"scaled to [0, 1] then normalised with mean {cfg['preprocessing']['mean']} and std "
        f"{cfg['preprocessing']['std']}.",
        f"- Files: `model.onnx` ({onnx_mb:.1f} MB, float32, served by ONNX Runtime), `model.pt` (float16 copy used "
        "only for Grad-CAM explanations), `calibration.json`, `ood.npz` (lesion detector).",
        "",
        "## Training data",
        "The Kaggle set *Skin Cancer: Malignant vs. Benign* (ISIC Archive images, 224x224): its official train "
        f"split, of which a seeded, stratified, near-duplicate-group-aware 20% was held out for validation "
        f"(train {cfg['data']['n_train']}, validation {cfg['data']['n_val']}). The official test split "
        f"({cfg['data']['n_test']} images) was used once, for the numbers below.",
        "",
        "## Performance (95% stratified bootstrap CIs, 1000 resamples)",
        "",
        (
            "Evaluated with test-time augmentation (mean of 8 flips/rotations); serve it with `tta=true` to match."
            if m.get("tta")
            else "Evaluated without test-time augmentation, as the service predicts by default."
        ),
        "",
        "At threshold 0.5:",
        "",
        metrics_table(m),
        "",
        f"At the operating threshold {m['threshold']['value']:.4f} (policy `{m['threshold']['policy']}`, chosen on "
        "validation: the label `malignant` is given from this probability on):",
        "",
        metrics_table(m, key="at_threshold"),
        "",
        f"Calibration: temperature {m['calibration']['temperature']:.3f} (fitted on validation); test ECE "
        f"{m['calibration']['test']['ece_before']:.3f} before, {m['calibration']['test']['ece_after']:.3f} after "
        f"(15 bins); Brier {m['calibration']['test']['brier_after']:.3f}.",
        "",
    ]
    if refusal:
        lines += [
            "## Refusal of non-lesion images",
            f"AUROC between real test lesions and generated/natural non-lesion images: "
            f"{refusal['auroc_test_vs_non_lesion']:.4f}; test lesions refused: "
            f"{refusal.get('test_refused', float('nan')):.2%}. Details in `refusal.json`.",
            "",
        ]
    lines += [
        "## Intended use",
        "A research and screening aid: it ranks dermoscopic images of single skin lesions by how likely they are "
        "malignant, so that a clinician looks at the worrying ones first. It is not a diagnosis and must not be "
        "used to rule a lesion out.",
        "",
        "## Limitations",
        "- Trained on 2,637 ISIC-derived dermoscopy images at 224 px from one public set; performance on other "
        "cameras, clinical (non-dermoscopic) photos, skin types under-represented in ISIC, or other lesion "
        "types is unknown.",
        "- Test metrics come from 660 images; the CIs above show how uncertain they are. `test_dedup` removes the "
        "22 test images that have a near-duplicate in train.",
        "- Labels are benign vs malignant only; the model knows nothing of lesion subtypes.",
        "- The refusal detector catches images far from the training lesions (photos, text, flat colour); it "
        "does not guarantee that an accepted image is a usable dermoscopic image.",
        "",
        "## Licence",
        "Code and weights of this package: Apache-2.0. ImageNet weights from Google's EfficientNet-Lite release "
        "(Apache-2.0). Training images: ISIC Archive, per-image CC-0 / CC-BY / CC-BY-NC licences; not "
        "redistributed here.",
        "",
        "## How it was made",
        "```bash",
        command or cfg.get("command", ""),
        f"lesionlab export {run}",
        f"python tools/make_default_model.py {run}",
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--command", default="", help="the exact training command (default: from config.json)")
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
    (tmp / "MODEL_CARD.md").write_text(model_card(run, args.command))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"bundled {run} into {args.out}")


if __name__ == "__main__":
    main()
