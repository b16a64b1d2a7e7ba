"""What GET /v1/model tells a caller: what the model is, what it was trained on, how good it is, how to use it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lesionlab import runs as rf
from lesionlab.disclaimer import DISCLAIMER
from lesionlab.evaluation.metrics import METRICS
from lesionlab.inference.predictor import Predictor

MODEL_CARD_FILE = "MODEL_CARD.md"
LICENCE_NOTES = {
    "code": "lesionlab is Apache-2.0.",
    "data": "Trained on ISIC Archive images (training_data.sources: e.g. the Kaggle 'Skin Cancer: Malignant vs. "
    "Benign' set, HAM10000); ISIC images carry per-image Creative Commons licences (many are CC BY-NC), so check "
    "them before any commercial use of this model.",
    "weights": "The backbone starts from ImageNet weights; their source is listed under weights_source and its "
    "licence applies to the derived model.",
}
INTENDED_USE = (
    "Screening aid for research: it ranks dermoscopic lesion images by the probability of malignancy. "
    "It is not a diagnosis and not a medical device."
)


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined metrics (e.g. precision with no positives) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _split_metrics(block: dict) -> dict:
    out: dict = {"n": block.get("n")}
    out.update({m: block[m] for m in METRICS if m in block})
    if "confusion" in block:
        out["confusion"] = block["confusion"]
    if "at_threshold" in block:
        out["at_threshold"] = _split_metrics(block["at_threshold"])
    return out


def external_results(metrics: dict) -> dict | None:
    """metrics.json's ``external`` sets (evaluation/external.py), compact: per set ``n``, ``n_malignant``, the
    ``threshold`` and, at it, ``auc``, ``sensitivity`` and ``specificity`` as ``{"value", "ci95"}`` (null where a
    single-class set leaves one undefined, with its ``note``). None when the model was never scored externally."""
    sets = metrics.get("external")
    if not sets:
        return None
    out: dict = {}
    for name in sorted(sets):
        block = sets[name]
        at = block.get("at_threshold", {})
        rates = {m: at.get(m) for m in ("auc", "sensitivity", "specificity")}
        out[name] = {k: block.get(k) for k in ("n", "n_malignant", "threshold")}
        out[name].update({k: {"value": r["value"], "ci95": r["ci95"]} if r else None for k, r in rates.items()})
        if block.get("note"):
            out[name]["note"] = block["note"]
    return out


def training_data(config: dict) -> dict:
    """What the model was trained on: ``sources`` (each one's name, format and counts per split and class; one
    folder for runs older than multi-source training), the split sizes and the positive class."""
    data = config.get("data", {})
    sources = [{k: s.get(k) for k in ("name", "format", "counts")} for s in rf.RunConfig(config).sources]
    return {
        "dataset": " + ".join(str(s["name"]) for s in sources) + " (ISIC Archive dermoscopy images)",
        "folder": Path(str(data.get("root", ""))).name or None,
        "sources": sources,
        "classes": data.get("classes"),
        "positive_class": data.get("positive_class", "malignant"),
        **{k: data.get(k) for k in ("n_train", "n_val", "n_test", "n_test_dedup", "split_seed")},
    }


def model_card(model_dir: Path, predictor: Predictor, version: str) -> dict:
    """GET /v1/model's body. ``preprocessing`` lists each network's input size, normalisation, resize and colour
    constancy (one entry, or one per ensemble member); the top-level ``input_size``, ``mean`` and ``std`` are that
    shared value, or null for an ensemble whose members read their inputs differently."""
    info = predictor.info
    uniform = info.uniform_preprocessing
    run = rf.RunFolder(model_dir)
    config, metrics = (run.config.raw if run.has(rf.CONFIG) else {}), run.metrics()
    card = model_dir / MODEL_CARD_FILE
    return _finite(
        {
            "model_id": info.model_id,
            "model_version": version,
            "backbone": info.backbone,
            "runtime": info.runtime,
            "transfer_mode": config.get("mode"),
            # diagnosis: /v1/predict adds P(diagnosis) per class of ``diagnoses`` (malignant ones sum to P(malignant))
            "target": "diagnosis" if info.diagnoses else "binary",
            "diagnoses": list(info.diagnoses) or None,
            "malignant_diagnoses": list(info.malignant_diagnoses) or None,
            "weights_source": config.get("weights", {}).get("source"),
            "input_size": info.input_size if uniform else None,
            "mean": list(info.mean) if uniform else None,
            "std": list(info.std) if uniform else None,
            "preprocessing": info.preprocessing,  # each member resizes and normalises the upload its own way
            "threshold": {
                "value": info.threshold,
                "policy": info.threshold_policy,
                "chosen_on": metrics.get("threshold", {}).get("chosen_on", "val"),
            },
            "temperature": info.temperature,
            "tta": info.tta,  # threshold and temperature fitted on TTA scores; requests use TTA unless they say not
            "lesion_detector": predictor.refuses_non_lesions,
            "lesion_detector_threshold": predictor.refusal_threshold,  # ood_score above it: refused
            "training_data": training_data(config),
            "metrics": {s: _split_metrics(metrics[s]) for s in ("val", "test", "test_dedup") if s in metrics},
            "metrics_note": "95% stratified bootstrap confidence intervals (ci95); top-level values at threshold 0.5, "
            "at_threshold at the operating threshold chosen on validation.",
            "external": external_results(metrics),  # other clinics' images, at the same operating threshold
            "licence": LICENCE_NOTES,
            "intended_use": INTENDED_USE,
            "disclaimer": DISCLAIMER,
            "model_card": card.read_text() if card.exists() else None,
        }
    )
