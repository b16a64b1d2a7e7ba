"""Test-time BatchNorm adaptation (AdaBN) of the bundled model on two external sets: does re-estimating the
backbone's BatchNorm statistics on a new site's unlabelled images help the model transfer? (docs/results.md,
section 8: the transfer ablation.)

What it measures, per external set (ISIC 2018 Task 3 test, PH2): the bundled model as shipped (PyTorch,
model.pt, no TTA; its temperature and threshold from calibration.json, applied as ``inference.predictor`` does:
P = sigmoid(logit / T), malignant when P >= threshold) against copies adapted by
``lesionlab.inference.adapt.adapt_batchnorm``, at each ``--priors`` weight of the original statistics (0: the
site's only; 0.5: an even mix). Reported: AUC with its 95% stratified-bootstrap CI, sensitivity and specificity
at the shipped operating point, and each difference from the unadapted model with a paired bootstrap CI (the
same resamples for both: the honest test of a change, since the two models' CIs overlap by construction).

Protocol: labels are never used to adapt, and no image is scored by a model whose statistics saw it. Each set
is split into two halves by a seeded permutation; the model adapted on half A scores half B and the one adapted
on half B scores half A, so every image is scored once, out of sample. Adaptation batches are 32 images in the
permutation's order. The threshold and temperature were fitted on the unadapted model's validation scores and are
kept as they are (a site without labels cannot refit them), so sensitivity and specificity after adaptation
measure both the ranking and the shift of the score distribution. Picking the prior with the best numbers here
would be tuning on the external sets: the table reports every prior and the JSON says which one looks best only
with that warning.

Run: python bench/bn_adapt.py [--sets isic2018,ph2] [--priors 0,0.5] [--seed 0] [--limit N] [--json FILE]
(from the repository root; the sets are ../shared/data/isic2018-task3-test and ../shared/data/ph2). It needs
quiet cores: about 10 minutes on 2 CPU cores for both sets (1712 images: one unadapted pass, then per half one
adaptation pass and one scoring pass per prior). ``--limit N`` keeps the first N images of each set, for a smoke
test; its JSON goes to bench/results/bn_adapt.limit-N.json so that it never overwrites the measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit

from lesionlab.data.sources import load_external
from lesionlab.evaluation.metrics import metrics_with_ci, paired_differences
from lesionlab.evaluation.report import cell
from lesionlab.inference.adapt import adapt_batchnorm, batchnorm_layers, mix_batchnorm
from lesionlab.inference.loading import DEFAULT_MODEL_DIR
from lesionlab.inference.predictor import TorchPredictor
from lesionlab.models.batching import map_batches
from lesionlab.models.classifier import LesionClassifier
from lesionlab.runs import Preprocessing

REPO = Path(__file__).resolve().parents[1]
SETS = {
    "isic2018": REPO.parent / "shared" / "data" / "isic2018-task3-test",
    "ph2": REPO.parent / "shared" / "data" / "ph2",
}


def model_logits(model: LesionClassifier, images: np.ndarray, pre: Preprocessing, batch_size: int) -> np.ndarray:
    """Float64 logits of uint8 N x S x S x 3 images: ``pre.network_input`` per batch, as TorchPredictor does."""

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(pre.network_input(batch)).contiguous(memory_format=torch.channels_last)
            return model(x).double().numpy()

    return map_batches(forward, images, batch_size, empty=np.zeros(0))


def rates(y: np.ndarray, p: np.ndarray, threshold: float, n_resamples: int, seed: int) -> dict[str, Any]:
    """AUC, sensitivity, specificity ({"value", "ci95"}) and the confusion matrix, from ``metrics_with_ci``; a rate
    of a class the set lacks (a ``--limit`` subset) is None, and AUC too, rather than metrics.py's 0 or NaN."""
    with warnings.catch_warnings():  # a one-class set: the bootstrap's AUCs are all NaN, and it says so
        warnings.simplefilter("ignore", RuntimeWarning)
        block = metrics_with_ci(y, p, threshold, n_resamples, seed)
    has_pos, has_neg = bool(y.any()), bool((y == 0).any())
    return {
        "auc": block["auc"] if has_pos and has_neg else None,
        "sensitivity": block["recall"] if has_pos else None,
        "specificity": block["specificity"] if has_neg else None,
        "confusion": block["confusion"],
    }


def adapted_logits(
    model: LesionClassifier, images: np.ndarray, pre: Preprocessing, priors: list[float], seed: int, batch_size: int
) -> tuple[dict[float, np.ndarray], list[dict]]:
    """Per prior, every image's logit from the model adapted on the other half (the protocol above)."""
    n = len(images)
    perm = np.random.default_rng(seed).permutation(n)
    halves = (perm[: n // 2], perm[n // 2 :])
    out = {p: np.full(n, np.nan) for p in priors}
    infos = []
    for fit, score in ((halves[0], halves[1]), (halves[1], halves[0])):
        batches = (images[fit[i : i + batch_size]] for i in range(0, len(fit), batch_size))
        # one adaptation pass per half: the site statistics do not depend on the prior, which only mixes them
        site, info = adapt_batchnorm(model, batches, pre, prior=0.0)
        infos.append(info)
        for prior in priors:
            mixed = site if prior == 0 else mix_batchnorm(model, site, prior)
            out[prior][score] = model_logits(mixed, images[score], pre, batch_size)
    return out, infos


def run_set(name: str, predictor: TorchPredictor, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    samples = list(load_external(f"{SETS[name]}?name={name}").test)[: args.limit or None]
    pre = predictor.info.pre
    decoded = pre.decode(samples, progress=False)
    images, y = decoded.images, np.array([s.label for s in decoded.samples], np.int64)
    print(f"{name}: {len(y)} images ({int(y.sum())} malignant), {len(decoded.bad)} unreadable", file=sys.stderr)
    temperature, threshold = predictor.info.temperature, predictor.info.threshold
    before = predictor.logits_from_uint8(images, tta=False)
    # the direct path (used for the adapted copies) must give the predictor's logits for the unadapted model
    k = min(8, len(images))
    agreement = float(np.abs(model_logits(predictor.model, images[:k], pre, args.batch_size) - before[:k]).max())
    after, infos = adapted_logits(predictor.model, images, pre, args.priors, args.seed, args.batch_size)
    p0 = expit(before / temperature)
    block: dict[str, Any] = {
        "n": len(y), "n_malignant": int(y.sum()), "n_unreadable": len(decoded.bad),
        "max_abs_logit_diff_direct_vs_predictor": agreement,
        "unadapted": rates(y, p0, threshold, args.n_resamples, args.seed),
        "adapted": {}, "adaptation": infos,
    }  # fmt: skip
    for prior, logits in after.items():
        p = expit(logits / temperature)
        block["adapted"][str(prior)] = {
            **rates(y, p, threshold, args.n_resamples, args.seed),
            "delta": paired_differences(y, p0, p, (threshold, threshold), args.n_resamples, args.seed),
            "mean_logit_shift": float(np.mean(logits - before)),
        }
    block["seconds"] = round(time.perf_counter() - t0, 1)
    return block


def _signed(b: dict | None) -> str:
    return "" if b is None else f"{b['value']:+.3f} [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}]"


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Threshold {results['threshold']:.4f}, temperature {results['temperature']:.4f} (shipped, unchanged); "
        f"{results['bn_layers']} BatchNorm layers; seed {results['seed']}; 95% stratified-bootstrap CIs "
        f"({results['n_resamples']} resamples), differences paired.",
        "",
        "| set | model | n | AUC | sensitivity | specificity | ΔAUC | Δsensitivity | Δspecificity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, b in results["sets"].items():
        u = b["unadapted"]
        lines.append(
            f"| {name} | unadapted | {b['n']} | {cell(u['auc'])} | {cell(u['sensitivity'])} | "
            f"{cell(u['specificity'])} | | | |"
        )
        for prior, a in b["adapted"].items():
            d = a["delta"] or {}
            lines.append(
                f"| {name} | AdaBN prior {prior} | {b['n']} | {cell(a['auc'])} | {cell(a['sensitivity'])} | "
                f"{cell(a['specificity'])} | {_signed(d.get('auc'))} | {_signed(d.get('sensitivity'))} | "
                f"{_signed(d.get('specificity'))} |"
            )
    return "\n".join(lines)


def best_prior(results: dict[str, Any]) -> dict[str, Any]:
    """The prior of highest mean AUC over the sets, flagged as chosen on the reported sets themselves."""
    # over the sets where AUC is defined (a one-class --limit subset has none, for every prior alike)
    aucs = {
        prior: [a["auc"]["value"] for b in results["sets"].values() for a in [b["adapted"][prior]] if a["auc"]]
        for prior in next(iter(results["sets"].values()))["adapted"]
    }
    mean_auc = {prior: float(np.mean(v)) for prior, v in aucs.items() if v}
    return {
        "prior": max(mean_auc, key=lambda p: mean_auc[p]) if mean_auc else None,
        "mean_auc": mean_auc,
        "note": "chosen on the external sets it is reported on: that is tuning on them; choose a prior on other "
        "data before quoting these sets' numbers for it",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="isic2018,ph2", help=f"Comma-separated, of {', '.join(SETS)}.")
    ap.add_argument("--priors", default="0,0.5", help="Weights of the original statistics, each in [0, 1].")
    ap.add_argument("--seed", type=int, default=0, help="The halves' permutation and the bootstrap.")
    ap.add_argument("--limit", type=int, default=0, help="First N images of each set (a smoke test).")
    ap.add_argument("--n-resamples", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="Model folder; default: the bundled.")
    ap.add_argument("--json", type=Path, help="Default bench/results/bn_adapt.json (.limit-N.json with --limit).")
    args = ap.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or set(sets) - set(SETS):
        ap.error(f"--sets takes names among {', '.join(SETS)}, got '{args.sets}'")
    args.priors = sorted({float(p) for p in args.priors.split(",")})
    if not args.priors or not all(0 <= p <= 1 for p in args.priors):
        ap.error(f"--priors takes weights in [0, 1], got '{args.priors}'")
    predictor = TorchPredictor(args.model)
    predictor.batch_size = args.batch_size
    results: dict[str, Any] = {
        "model": str(args.model), "runtime": "pytorch (model.pt), no TTA",
        "threshold": predictor.info.threshold, "temperature": predictor.info.temperature,
        "threshold_policy": predictor.info.threshold_policy, "bn_layers": len(batchnorm_layers(predictor.model)),
        "seed": args.seed, "limit": args.limit or None, "n_resamples": args.n_resamples,
        "batch_size": args.batch_size, "priors": args.priors,
        "protocol": "two seeded halves per set; adapt on one, score the other, and back; labels never used to "
        "adapt; shipped temperature and threshold unchanged",
        "sets": {name: run_set(name, predictor, args) for name in sets},
    }  # fmt: skip
    results["best_prior"] = best_prior(results)
    print(table(results))
    print(f"\nHighest mean AUC: prior {results['best_prior']['prior']} ({results['best_prior']['note']}).")
    out = args.json or REPO / "bench" / "results" / (
        f"bn_adapt.limit-{args.limit}.json" if args.limit else "bn_adapt.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
