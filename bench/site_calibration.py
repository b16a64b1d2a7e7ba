"""Site calibration, measured: how well an operating point re-fitted on a small site sample holds on the rest of
the site (docs/results.md, site calibration).

    python bench/site_calibration.py [RUN] [--data SPEC] [--sizes 100 200 400] [--draws 10] [--seed 0]
                                     [--policy sensitivity:0.90 ...] [--tta | --no-tta] [--runtime auto]
                                     [--scores FILE.npz] [--json FILE]

RUN defaults to the bundled model, ``--data`` to ../shared/data/isic2018-task3-test (any ``--data`` spec that
``load_external`` reads). Every image is scored ONCE (raw logits, TTA as the model's operating point was fitted
unless told); ``--scores`` caches them in an .npz (reused when it lists the same images, labels and TTA). Then for
each sample size n and each of ``--draws`` seeded draws (simple random samples of n images without replacement,
NOT stratified: a clinic labels what comes through its door, so the number of malignant images varies from draw
to draw), ``lesionlab.evaluation.site.fit_site`` refits temperature and threshold on the draw exactly as
``lesionlab calibrate`` does, and the images NOT drawn are scored at the refitted operating point and at the
model's own (uncalibrated: its validation temperature and threshold), on the same held-out images. A draw whose
sample cannot support the policy (``sensitivity-lcb`` with too few malignant images) is counted as refused.

Printed per policy: a markdown table (mean, SD and min-max over the draws of held-out sensitivity and
specificity, both operating points; ECE) and whether the bar holds: mean held-out sensitivity >= 0.90 with
specificity >= 0.65 at n=400. ``--json`` writes every draw.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lesionlab.data.sources import load_external
from lesionlab.evaluation.calibrate import score_site
from lesionlab.evaluation.metrics import check_policy, expected_calibration_error
from lesionlab.evaluation.site import SiteError, fit_site, min_positives
from lesionlab.inference.loading import DEFAULT_MODEL_DIR, load_predictor
from lesionlab.runs import RunFolder

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2018-task3-test"
BAR = {"n": 400, "sensitivity": 0.90, "specificity": 0.65}


def sens_spec(y: np.ndarray, prob: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = prob >= threshold
    return float(pred[y == 1].mean()), float((~pred[y == 0]).mean())


def cached_scores(args: argparse.Namespace, model_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, bool]:
    """(relpaths, labels, raw logits, tta) of the whole set: from ``--scores`` when it matches, else scored."""
    samples = load_external(args.data).test
    relpaths = [s.relpath for s in samples]
    y = np.asarray([s.label for s in samples], np.int64)
    predictor = load_predictor(model_dir, backend=args.runtime)
    tta = predictor.use_tta(args.tta)
    cache = Path(args.scores) if args.scores else None
    if cache and cache.exists():
        c = np.load(cache, allow_pickle=False)
        if list(c["relpaths"]) == relpaths and np.array_equal(c["labels"], y) and bool(c["tta"]) == tta:
            print(f"scores: {cache} (cached)", file=sys.stderr)
            return relpaths, y, c["logits"], tta
    t0 = time.perf_counter()
    scores = score_site(predictor, samples, tta, progress=True)
    print(f"scored {len(samples)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if cache:
        np.savez(cache, relpaths=np.asarray(relpaths), labels=y, logits=scores.logits, tta=tta)
    return relpaths, y, scores.logits, tta


def oracle(y: np.ndarray, z: np.ndarray) -> dict[str, float]:
    """What no threshold can beat on this set (the ROC of the whole set, its labels known): a ceiling."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, z)
    at_sens = 1 - fpr[np.flatnonzero(tpr >= BAR["sensitivity"])[0]]
    at_spec = tpr[np.flatnonzero(1 - fpr >= BAR["specificity"])[-1]]
    return {
        "auc": float(roc_auc_score(y, z)),
        "specificity_at_sensitivity": at_sens,
        "sensitivity_at_specificity": at_spec,
    }


def summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": a.min(), "max": a.max()}


def run_policy(
    policy: str, y: np.ndarray, z: np.ndarray, sizes: list[int], draws: int, seed: int, t0: float, thr0: float
) -> dict[str, Any]:
    """Every draw of every size for one policy: the refitted and the model's own operating point on the held-out
    images. Draws depend on (seed, n, draw) only, so every policy sees the same draws."""
    p0 = 1 / (1 + np.exp(-z / t0))
    out: dict[str, Any] = {"policy": policy, "sizes": {}}
    for n in sizes:
        rows, refused = [], []
        for d in range(draws):
            drawn = np.random.default_rng([seed, n, d]).choice(len(y), n, replace=False)
            rest = np.setdiff1d(np.arange(len(y)), drawn)
            try:
                fit = fit_site(y[drawn], z[drawn], policy, f"draw {d} (n={n})")
            except SiteError as e:
                refused.append({"draw": d, "n_malignant": int(y[drawn].sum()), "reason": str(e)})
                continue
            p = fit.probabilities(z[rest])
            sens, spec = sens_spec(y[rest], p, fit.threshold)
            sens0, spec0 = sens_spec(y[rest], p0[rest], thr0)
            rows.append(
                {
                    "draw": d,
                    "n_malignant": fit.n_malignant,
                    "n_held_out": len(rest),
                    "temperature": fit.temperature,
                    "threshold": fit.threshold,
                    "sensitivity": sens,
                    "specificity": spec,
                    "uncalibrated_sensitivity": sens0,
                    "uncalibrated_specificity": spec0,
                    "ece": expected_calibration_error(y[rest], p),
                    "uncalibrated_ece": expected_calibration_error(y[rest], p0[rest]),
                }
            )
        block: dict[str, Any] = {"draws": rows, "refused": refused}
        if rows:
            keys = [k for k in rows[0] if k not in ("draw", "n_held_out")]
            block["summary"] = {k: summary([r[k] for r in rows]) for k in keys}
            kind, _, arg = policy.partition(":")
            if kind.startswith("sensitivity"):
                block["summary"]["share_at_target"] = float(np.mean([r["sensitivity"] >= float(arg) for r in rows]))
        out["sizes"][n] = block
    return out


def _cell(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} ± {s['sd']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def table(result: dict[str, Any], draws: int) -> str:
    lines = [
        f"policy `{result['policy']}`, {draws} random draws per n (not stratified), metrics on the images not drawn "
        "(mean ± SD [min, max] over draws):",
        "",
        "| n | draws fitted | malignant in draw | threshold | sensitivity, site-calibrated | specificity, "
        "site-calibrated | sensitivity, uncalibrated | specificity, uncalibrated | draws with sensitivity >= target "
        "| ECE uncalibrated -> calibrated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    kind, _, arg = result["policy"].partition(":")
    need = f"fewer than {min_positives(float(arg))} malignant" if kind == "sensitivity-lcb" else "one class only"
    for n, b in result["sizes"].items():
        s = b.get("summary")
        fitted = f"{len(b['draws'])} of {draws}" + (f" ({len(b['refused'])} refused: {need})" if b["refused"] else "")
        if s is None:
            mal = [r["n_malignant"] for r in b["refused"]]
            lines.append(f"| {n} | {fitted} | {min(mal)}-{max(mal)} | | | | | | | |")
            continue
        mal = s["n_malignant"]
        share = f"{s['share_at_target']:.0%}" if "share_at_target" in s else ""
        lines.append(
            f"| {n} | {fitted} | {mal['min']:.0f}-{mal['max']:.0f} | {s['threshold']['mean']:.3f} "
            f"[{s['threshold']['min']:.3f}, {s['threshold']['max']:.3f}] | {_cell(s['sensitivity'])} | "
            f"{_cell(s['specificity'])} | {_cell(s['uncalibrated_sensitivity'])} | "
            f"{_cell(s['uncalibrated_specificity'])} | {share} | {s['uncalibrated_ece']['mean']:.3f} -> "
            f"{s['ece']['mean']:.3f} |"
        )
    bar = result["sizes"].get(BAR["n"], {}).get("summary")
    if bar is not None:
        ok = bar["sensitivity"]["mean"] >= BAR["sensitivity"] and bar["specificity"]["mean"] >= BAR["specificity"]
        lines += [
            "",
            f"Bar (mean held-out sensitivity >= {BAR['sensitivity']} with specificity >= {BAR['specificity']} at "
            f"n={BAR['n']}): {'met' if ok else 'NOT met'} ({bar['sensitivity']['mean']:.3f} / "
            f"{bar['specificity']['mean']:.3f}).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="the site set, read whole (a --data spec)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", action="append", help="repeatable (default: sensitivity:0.90)")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--runtime", default="auto")
    ap.add_argument("--scores", help="an .npz caching the set's logits")
    ap.add_argument("--json", help="write every draw here")
    args = ap.parse_args(argv)
    policies = [check_policy(p) for p in (args.policy or ["sensitivity:0.90"])]
    model_dir = Path(args.run) if args.run else DEFAULT_MODEL_DIR
    op = RunFolder(model_dir).require_operating_point()
    _, y, z, tta = cached_scores(args, model_dir)
    if max(args.sizes) >= len(y):
        sys.exit(f"--sizes must stay below the set's {len(y)} images")
    p0 = 1 / (1 + np.exp(-z / op.temperature))
    sens0, spec0 = sens_spec(y, p0, op.threshold)
    ceiling = oracle(y, z)
    print(
        f"{model_dir.name} on {Path(args.data.split('?')[0]).name}: {len(y)} images ({int(y.sum())} malignant), "
        f"TTA {'on' if tta else 'off'}; uncalibrated (threshold {op.threshold:.4f}, temperature "
        f"{op.temperature:.4f}, `{op.policy}` on its validation) on all of them: sensitivity {sens0:.3f}, "
        f"specificity {spec0:.3f}, ECE {expected_calibration_error(y, p0):.3f}; AUC {ceiling['auc']:.3f}. "
        f"Ceiling of any threshold (set on all {len(y)} labels, not an estimate): specificity "
        f"{ceiling['specificity_at_sensitivity']:.3f} at sensitivity >= {BAR['sensitivity']}, sensitivity "
        f"{ceiling['sensitivity_at_specificity']:.3f} at specificity >= {BAR['specificity']}.\n"
    )
    results = []
    for policy in policies:
        result = run_policy(policy, y, z, args.sizes, args.draws, args.seed, op.temperature, op.threshold)
        results.append(result)
        print(table(result, args.draws) + "\n")
    if args.json:
        record = {
            "model": str(model_dir.resolve()),
            "data": args.data,
            "n": len(y),
            "n_malignant": int(y.sum()),
            "tta": tta,
            "draws": args.draws,
            "seed": args.seed,
            "stratified": False,
            "operating_point": op.to_dict(),
            "uncalibrated_all": {"sensitivity": sens0, "specificity": spec0},
            "ceiling": ceiling,
            "bar": BAR,
            "results": results,
            "command": "python bench/site_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        Path(args.json).write_text(json.dumps(record, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
