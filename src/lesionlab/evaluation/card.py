"""A run's model card in Markdown (the bundled model's MODEL_CARD.md, which GET /v1/model returns too): what the
model is, what it was trained on, how good it is on held-out and on external images, what it refuses, how a site
re-fits its operating point, and what it must not be used for.

Every number is read from the run's own files (config.json, metrics.json, refusal.json) or from a site-calibration
measurement (``bench/site_calibration.py --json``); nothing is typed in, so a card cannot disagree with its model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lesionlab import runs as rf
from lesionlab.disclaimer import DISCLAIMER
from lesionlab.evaluation.diagnosis import block_lines
from lesionlab.evaluation.report import cell, held_out_splits, metrics_table

#: What the HAM10000 / ISIC 2018 Task 3 codes stand for (the taxonomy maps names to codes, not back).
DIAGNOSIS_NAMES = {
    "akiec": "actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion (solar lentigo, seborrheic keratosis, lichen-planus-like keratosis)",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
    "scc": "squamous cell carcinoma",
}


def what_it_is(cfg: Mapping[str, Any]) -> list[str]:
    t, pre, model = cfg["train"], cfg["preprocessing"], cfg.get("model", {})
    w = cfg.get("weights", {})
    cc = pre.get("color_constancy") or "none"
    lines = [
        "## What it is",
        f"- `{cfg['backbone']}` ({w.get('source')}, ImageNet weights sha256 `{str(w.get('sha256'))[:16]}...`), "
        f"transfer mode `{cfg['mode']}`; head {model.get('head', 'Dense(100, ReLU) -> Dense(1) -> sigmoid')}.",
        f"- Training: {t['optimizer']} lr {t['lr']}, {t['schedule']} schedule, {t['warmup_epochs']} warm-up "
        f"epoch(s), {t['epochs']} epochs, batch {t['batch_size']}, label smoothing {t['label_smoothing']}, "
        f"augmentation `{t.get('augment')}`, seed {t['seed']}; the checkpoint of the best validation accuracy "
        f"(epoch {cfg.get('best_epoch')}).",
        f"- Input: RGB, {pre['resize']} to {pre['input_size']} px, colour constancy `{cc}` (applied by every "
        f"predictor before the network, as in training), scaled to [0, 1] and normalised with mean {pre['mean']} "
        f"and std {pre['std']}.",
    ]
    timing = cfg.get("timing", {})
    if "epoch_seconds_total" in timing:
        lines.append(
            f"- Compute: {timing['epoch_seconds_total'] / 60:.0f} min of training on "
            f"{timing.get('cpu_threads', '?')} CPU threads, {t.get('precision', 'fp32')}."
        )
    return lines


def diagnosis_mapping(cfg: Mapping[str, Any]) -> list[str]:
    """The diagnosis head's classes and which of them P(malignant) sums; [] for a binary model."""
    model = cfg.get("model", {})
    names, malignant = model.get("diagnoses"), set(model.get("malignant_diagnoses", ()))
    if not names:
        return []
    lines = [
        "## Diagnoses",
        f"The head gives a probability for each of {len(names)} diagnoses (softmax); P(malignant) is the sum over "
        f"the malignant ones ({', '.join(sorted(malignant))}), and the threshold, calibration and refusal act on "
        "that sum. Training images with only a benign/malignant label (no diagnosis) train that sum alone.",
        "",
        "| code | diagnosis | counted as |",
        "|---|---|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {DIAGNOSIS_NAMES.get(n, n)} | {'malignant' if n in malignant else 'benign'} |")
    return lines


def training_data(config: rf.RunConfig) -> list[str]:
    data = config.data
    lines = [
        "## Training data",
        "| source | format | images (benign / malignant) |",
        "|---|---|---|",
    ]
    for s in config.sources:
        counts = "; ".join(
            f"{split} {c.get('benign', 0)} / {c.get('malignant', 0)}" for split, c in s.get("counts", {}).items()
        )
        lines.append(f"| {s['name']} | {s['format']} | {counts or 'n/a'} |")
    linked = data.get("duplicate_pairs_linked")
    lines += [
        "",
        f"Validation is a seeded, stratified, group-aware {data.get('val_fraction', 0.2):.0%} of the training pool "
        f"(groups: one lesion, patient or near-duplicate never on both sides; seed {data.get('split_seed')}): train "
        f"{data.get('n_train')}, validation {data.get('n_val')}. The threshold, temperature and checkpoint were "
        f"chosen on validation only. Fixed test images: {data.get('n_test')}; `test_dedup` "
        f"({data.get('n_test_dedup')}) drops those that match any training image of any source"
        + (f" ({linked} cross-source duplicate pairs were linked into groups)." if linked is not None else "."),
    ]
    return lines


def performance(m: Mapping[str, Any], malignant: Sequence[str] = ()) -> list[str]:
    splits = held_out_splits(m)
    thr, cal = m["threshold"], m["calibration"]
    tta = "with test-time augmentation (serve with `tta=true`)" if m.get("tta") else "without test-time augmentation"
    lines = [
        "## Performance on held-out images (95% stratified bootstrap CIs)",
        f"Evaluated {tta}, as the service predicts by default. At the operating threshold {thr['value']:.4f} "
        f"(policy `{thr['policy']}`, chosen on validation: the label `malignant` is given from this probability on):",
        "",
        metrics_table(m, splits=splits, key="at_threshold"),
        "",
        "At threshold 0.5:",
        "",
        metrics_table(m, splits=splits),
        "",
    ]
    test = cal.get("test")
    if test:
        lines.append(
            f"Calibration: temperature {cal['temperature']:.3f} (fitted on validation); test ECE "
            f"{test['ece_before']:.3f} before, {test['ece_after']:.3f} after; Brier {test['brier_after']:.3f}."
        )
    diag = [(s, m[s]["diagnosis"]) for s in splits if isinstance(m[s].get("diagnosis"), Mapping)]
    for s, block in diag:
        lines += ["", f"Diagnoses on {s}:", "", *block_lines(block, malignant)]
    return lines


def external(m: Mapping[str, Any], malignant: Sequence[str] = ()) -> list[str]:
    """Sets the model never saw, at its own threshold; [] when it was never scored externally."""
    sets = m.get("external") or {}
    if not sets:
        return []
    lines = [
        "## External evaluation (other collections; reported, never tuned on)",
        "Scored with the model's own temperature and operating threshold; refused images are counted at their "
        "probability. 95% CIs: stratified bootstrap.",
        "",
        "| set | n (malignant) | AUC | sensitivity | specificity | refused | balanced accuracy (diagnoses) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(sets):
        b = sets[name]
        at = b["at_threshold"]
        bacc = b.get("diagnosis", {}).get("balanced_accuracy")
        lines.append(
            f"| {name} | {b['n']} ({b['n_malignant']}) | {cell(at.get('auc'))} | {cell(at.get('sensitivity'))} | "
            f"{cell(at.get('specificity'))} | {b['n_refused']} | {cell(bacc) if bacc else ''} |"
        )
    for name in sorted(sets):
        if isinstance(sets[name].get("diagnosis"), Mapping):
            lines += ["", f"Diagnoses on {name}:", "", *block_lines(sets[name]["diagnosis"], malignant)]
    return lines


def refusal(ref: Mapping[str, Any]) -> list[str]:
    if not ref:
        return []
    les, non = ref.get("lesions", {}), ref.get("non_lesion", {})
    lines = [
        "## Refusal of images it must not judge",
        f"Method: {ref.get('method')}.",
        f"- Test lesions refused: {les.get('test', {}).get('refused')} of {les.get('test', {}).get('n')}; "
        f"generated and natural non-lesion images refused: {non.get('refused')} of {non.get('n')} "
        f"(AUROC lesion vs non-lesion {ref.get('auroc_test_vs_non_lesion', float('nan')):.4f}).",
    ]
    clinical = ref.get("clinical_photos", {})
    held = clinical.get("held_out")
    if clinical.get("dermoscopy_discriminator") and held:
        lines.append(
            f'- Clinical (non-dermoscopic) photos are refused as "not a dermoscopic image": of the photos the '
            f"detector was not fitted on ({clinical.get('split')}), {held['refused']} of {held['n']} refused "
            f"({clinical.get('n_fit')} fitted on)."
        )
    else:
        lines.append(f"- Clinical photos: {clinical.get('note', 'not measured')}.")
    return lines


def site_calibration(measured: Mapping[str, Any] | None = None) -> list[str]:
    lines = [
        "## Site calibration",
        "A clinic with a labelled sample of its own images re-fits temperature and threshold on it (the network "
        "is unchanged); the new folder predicts and serves at once:",
        "",
        "```bash",
        "lesionlab calibrate --data SITE_SAMPLE --out my-site --threshold-policy sensitivity:0.90",
        "lesionlab serve --model my-site",
        "```",
        "",
        "`sensitivity-lcb:0.95` (a 95% lower confidence bound) needs at least 59 malignant images with none "
        "missed; `calibrate` says what a smaller sample can certify.",
    ]
    if not measured:
        return lines
    lines += [
        "",
        f"Measured on {Path(str(measured['data']).split('?')[0]).name} ({measured['n']} images, "
        f"{measured['n_malignant']} malignant): {measured['draws']} random draws per sample size, each scored on the "
        "images NOT drawn (mean ± SD over draws):",
        "",
        "| policy | n drawn | sensitivity, calibrated | specificity, calibrated | sensitivity, as shipped | "
        "specificity, as shipped |",
        "|---|---|---|---|---|---|",
    ]
    for result in measured["results"]:
        for n, block in result["sizes"].items():
            s = block.get("summary")
            if s is None:
                continue

            def ms(key: str, s: Mapping[str, Any] = s) -> str:
                return f"{s[key]['mean']:.3f} ± {s[key]['sd']:.3f}"

            lines.append(
                f"| `{result['policy']}` | {n} | {ms('sensitivity')} | {ms('specificity')} | "
                f"{ms('uncalibrated_sensitivity')} | {ms('uncalibrated_specificity')} |"
            )
    return lines


def limitations(config: rf.RunConfig) -> list[str]:
    names = ", ".join(str(s["name"]) for s in config.sources)
    return [
        "## Intended use",
        "A research and screening aid: it ranks dermoscopic images of single skin lesions by how likely they are "
        "malignant, so that a clinician looks at the worrying ones first. It is not a diagnosis and must not be "
        "used to rule a lesion out.",
        "",
        "## Limitations",
        f"- Trained on dermoscopy images of ISIC-Archive collections ({names}); the external results above show how "
        "much it loses on other clinics' images and dermoscopes. Skin types under-represented in ISIC, and lesion "
        "types it was not trained on, are unmeasured.",
        "- The CIs above show how uncertain each number is; a clinic should measure, and re-fit the operating "
        "point (site calibration), on its own images before relying on it.",
        "- The refusal detector catches images far from the training lesions (photos, text, flat colour, clinical "
        "photos); it does not guarantee that an accepted image is a usable dermoscopic image.",
    ]


def model_card(
    run: str | Path,
    commands: Sequence[str] = (),
    site: Mapping[str, Any] | None = None,
    title: str = "lesionlab default model",
) -> str:
    """MODEL_CARD.md of ``run`` (a trained, evaluated run folder). ``commands``: how it was made (default: the
    training command config.json records); ``site``: a ``bench/site_calibration.py --json`` record to report."""
    folder = rf.RunFolder(run)
    config, m = folder.config, folder.metrics()
    cfg = config.raw
    malignant = cfg.get("model", {}).get("malignant_diagnoses", ())
    sections = [
        [f"# Model card: {title}", "", f"> {DISCLAIMER}"],
        what_it_is(cfg),
        diagnosis_mapping(cfg),
        training_data(config),
        performance(m, malignant),
        external(m, malignant),
        refusal(folder.refusal()),
        site_calibration(site),
        limitations(config),
        [
            "## Licence",
            "Code and weights of this package: Apache-2.0. ImageNet weights: see the weights source above. Training "
            "images: ISIC Archive, per-image CC-0 / CC-BY / CC-BY-NC licences; not redistributed here.",
        ],
        ["## How it was made", "```bash", *(commands or [cfg.get("command", "")]), "```"],
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"
