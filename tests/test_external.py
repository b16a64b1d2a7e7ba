"""External evaluation (evaluation/external.py) on real images: a balanced slice of the ISIC 2018 Task 3 test set
and a few PH2 images (a second source), scored by the bundled model. Nothing is written into the package: the
run folder tests work on a copy of the bundled model in tmp_path."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lesionlab.data.images import open_image
from lesionlab.data.sample import Sample
from lesionlab.evaluation.external import (
    SECTION,
    ExternalError,
    ExternalScores,
    evaluate_external,
    external_metrics,
    proportion,
    replace_section,
    report_section,
    score_external,
)
from lesionlab.evaluation.per_image import aligned, read_scores
from lesionlab.inference.loading import DEFAULT_MODEL_DIR, load_predictor

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ISIC, PH2 = DATA / "isic2018-task3-test", DATA / "ph2"
#: 20 malignant, 20 benign, every diagnosis present
PER_DIAGNOSIS = {"MEL": 8, "BCC": 6, "AKIEC": 6, "NV": 8, "BKL": 6, "DF": 3, "VASC": 3}
RESAMPLES = 200


def _isic() -> list[Sample]:
    if not (ISIC / "ISIC2018_Task3_Test_GroundTruth.csv").exists():
        pytest.skip("needs ../shared/data/isic2018-task3-test")
    left, out = dict(PER_DIAGNOSIS), []
    with open(ISIC / "ISIC2018_Task3_Test_GroundTruth.csv", newline="") as f:
        for row in csv.DictReader(f):
            dx = next(c for c in PER_DIAGNOSIS if float(row[c]) == 1.0)
            if left[dx]:
                left[dx] -= 1
                rel = f"images/{row['image']}.jpg"
                out.append(Sample(rel, ISIC / rel, int(dx in ("MEL", "BCC", "AKIEC")), dx.lower(), source="isic2018"))
    return out


def _ph2(per_diagnosis: int = 2) -> list[Sample]:
    if not (PH2 / "PH2_labels.csv").exists():
        pytest.skip("needs ../shared/data/ph2")
    seen: dict[str, int] = {}
    out = []
    with open(PH2 / "PH2_labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            if seen.get(row["diagnosis"], 0) < per_diagnosis:
                seen[row["diagnosis"]] = seen.get(row["diagnosis"], 0) + 1
                label = int(row["label"] == "malignant")
                out.append(Sample(row["image"], PH2 / row["image"], label, row["diagnosis"], source="ph2"))
    return out


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return _isic() + _ph2()


@pytest.fixture(scope="module")
def predictor():
    return load_predictor(None)


@pytest.fixture(scope="module")
def scores(predictor, samples) -> ExternalScores:
    return score_external(predictor, samples, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def block(scores, predictor) -> dict:
    return external_metrics(scores, predictor.info.threshold, n_resamples=RESAMPLES)


def _model_copy(tmp_path: Path) -> Path:
    """The bundled model in tmp_path: evaluate_external writes into its folder."""
    return Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model"))


def _subset(scores: ExternalScores, keep: np.ndarray) -> ExternalScores:
    """The images where ``keep``: every index-aligned field (a diagnosis model's probabilities too)."""
    idx = np.flatnonzero(keep)
    pick = lambda xs: [xs[i] for i in idx]
    return replace(
        scores,
        relpaths=pick(scores.relpaths),
        probabilities=scores.probabilities[idx],
        labels=scores.labels[idx],
        diagnoses=pick(scores.diagnoses),
        sources=pick(scores.sources),
        refused=scores.refused[idx],
        diagnosis_probs=None if scores.diagnosis_probs is None else scores.diagnosis_probs[idx],
    )


def test_scores_cover_every_image(scores, samples, predictor):
    assert scores.relpaths == [s.relpath for s in samples]
    assert scores.labels.tolist() == [s.label for s in samples]
    assert ((scores.probabilities >= 0) & (scores.probabilities <= 1)).all()
    # the same numbers as the predictor gives image by image (batching changes nothing)
    direct = predictor.analyze([open_image(samples[0].path)])[0]
    assert scores.probabilities[0] == pytest.approx(direct.probability, abs=1e-6)


def test_block_has_the_keys_and_counts_add_up(block, scores, samples):
    for key in ("n", "n_refused", "refusal_rate", "threshold", "at_threshold", "at_0.5", "ece", "by_source"):
        assert key in block
    assert "by_diagnosis" in block and "note" not in block
    assert block["n"] == len(samples) == block["n_malignant"] + block["n_benign"]
    assert block["n_malignant"] == sum(s.label for s in samples)
    assert block["n_refused"] == int(scores.refused.sum())
    assert block["refusal_rate"]["value"] == pytest.approx(block["n_refused"] / block["n"])
    for key in ("at_threshold", "at_0.5"):
        at = block[key]
        assert at["n"] == block["n"]  # refused images are in the metrics, at their probability
        assert sum(map(sum, at["confusion"])) == block["n"]
        assert at["sensitivity"] == at["recall"]
    assert block["at_threshold"]["threshold"] == pytest.approx(block["threshold"])
    assert block["at_0.5"]["threshold"] == 0.5
    json.dumps(block, allow_nan=False)  # metrics.json stays strict JSON


def test_breakdowns_sum_to_the_set(block):
    rows = block["by_diagnosis"]
    assert set(rows) == {d.lower() for d in PER_DIAGNOSIS} | {"melanoma", "common_nevus", "atypical_nevus"}
    assert sum(r["n"] for r in rows.values()) == block["n"]
    assert sum(r["n_refused"] for r in rows.values()) == block["n_refused"]
    for key in ("at_threshold", "at_0.5"):
        (_, fp), (fn, _) = block[key]["confusion"]
        assert sum(r[key]["flagged"]["count"] for r in rows.values() if "flagged" in r[key]) == fp
        assert sum(r[key]["missed"]["count"] for r in rows.values() if "missed" in r[key]) == fn
    assert rows["mel"]["class"] == "malignant" and "flagged" not in rows["mel"]["at_threshold"]
    assert rows["nv"]["class"] == "benign" and "missed" not in rows["nv"]["at_threshold"]
    by_source = block["by_source"]
    assert set(by_source) == {"isic2018", "ph2"}
    assert sum(b["n"] for b in by_source.values()) == block["n"]
    assert sum(b["n_refused"] for b in by_source.values()) == block["n_refused"]


def _intervals(block: dict):
    for key in ("at_threshold", "at_0.5"):
        for m in ("auc", "sensitivity", "specificity", "accuracy"):
            yield f"{key}.{m}", block[key][m]
    yield "ece", block["ece"]
    yield "refusal_rate", block["refusal_rate"]
    for d, r in block["by_diagnosis"].items():
        for key in ("at_threshold", "at_0.5"):
            for kind, rate in r[key].items():
                yield f"{d}.{key}.{kind}", rate


def test_intervals_contain_the_point_values(block):
    for name, b in _intervals(block):
        lo, hi = b["ci95"]
        assert 0 <= lo <= b["value"] <= hi <= 1, name


def test_proportion_is_exact_at_the_edges():
    assert proportion(0, 10)["ci95"][0] == 0.0 and proportion(10, 10)["ci95"][1] == 1.0
    lo, hi = proportion(3, 10)["ci95"]
    assert lo == pytest.approx(0.0667, abs=1e-3) and hi == pytest.approx(0.6525, abs=1e-3)  # Clopper-Pearson


@pytest.mark.parametrize("label", [0, 1])
def test_a_single_class_set_reports_what_is_defined(scores, predictor, label):
    only = _subset(scores, scores.labels == label)
    block = external_metrics(only, predictor.info.threshold, n_resamples=RESAMPLES)
    present, absent = ("specificity", "sensitivity") if label == 0 else ("sensitivity", "specificity")
    for key in ("at_threshold", "at_0.5"):
        assert block[key]["auc"] is None and absent not in block[key]
        lo, hi = block[key][present]["ci95"]
        assert lo <= block[key][present]["value"] <= hi
    assert "AUC" in block["note"] and "undefined" in block["note"]
    json.dumps(block, allow_nan=False)
    text = report_section("one class", block)
    assert "| AUC | undefined |" in text and block["note"] in text


def test_an_unreadable_image_is_named_unless_skipped(tmp_path, predictor, samples):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    items = [samples[0], Sample("broken.jpg", bad, 0, "nv"), samples[1]]
    with pytest.raises(ExternalError, match=r"broken\.jpg"):
        score_external(predictor, items, progress=False)
    got = score_external(predictor, items, progress=False, skip_bad=True)
    assert got.relpaths == [samples[0].relpath, samples[1].relpath]
    assert [r for r, _ in got.skipped] == ["broken.jpg"]
    block = external_metrics(got, predictor.info.threshold, n_resamples=20)
    assert block["skipped"][0]["relpath"] == "broken.jpg"


def test_replace_section_keeps_the_rest_of_the_report():
    report = "# run\n\n## Model\nm\n\n" + SECTION + "\n\nold\n\n## Figures\nf\n"
    once = replace_section(report, SECTION + "\n\nnew\n")
    assert once == "# run\n\n## Model\nm\n\n" + SECTION + "\n\nnew\n\n## Figures\nf\n"
    assert replace_section(once, SECTION + "\n\nnew\n") == once
    assert replace_section("", SECTION + "\n") == SECTION + "\n"


def test_evaluate_external_updates_metrics_and_report(tmp_path, samples):
    model = _model_copy(tmp_path)
    before = json.loads((model / "metrics.json").read_text())
    (model / "report.md").write_text("# lesionlab run\n\n## Model\nlite0\n")
    isic = [s for s in samples if s.source == "isic2018"]
    first = evaluate_external(model, {"isic2018": isic}, n_resamples=50, progress=False)
    assert set(first) == {"isic2018"}
    evaluate_external(model, {"isic2018": isic[:10], "ph2": _ph2(1)}, n_resamples=50, progress=False)
    metrics = json.loads((model / "metrics.json").read_text())
    outside = lambda m: {k: v for k, v in m.items() if k != "external"}  # the bundle may ship external results
    assert outside(metrics) == outside(before)
    assert set(metrics["external"]) == {"isic2018", "ph2"}
    assert metrics["external"]["isic2018"]["n"] == 10  # replaced by the second run
    assert metrics["external"]["ph2"]["n"] == 3
    report = (model / "report.md").read_text()
    assert report.startswith("# lesionlab run\n\n## Model\nlite0\n")
    assert report.count(SECTION) == 1 and report.count("### isic2018") == 1 and report.count("### ph2") == 1
    assert not (DEFAULT_MODEL_DIR / "report.md").exists()
    # per-image scores: the second evaluation replaced isic2018's rows and kept none of the first's
    scores = read_scores(model, "isic2018")
    assert len(scores) == 10 and len(read_scores(model, "ph2")) == 3
    assert {s.relpath for s in isic[:10]} == set(scores)
    block = metrics["external"]["isic2018"]
    y, p, _ = aligned(scores, scores)
    assert int(y.sum()) == block["n_malignant"]
    benign_passed = (p < block["threshold"])[y == 0]
    assert benign_passed.mean() == pytest.approx(block["at_threshold"]["specificity"]["value"])


def test_paired_scores_need_the_same_labels():
    with pytest.raises(ValueError, match="labelled differently"):
        aligned({"a.jpg": (1, 0.9), "b.jpg": (0, 0.1)}, {"a.jpg": (0, 0.9)})
    y, p, q = aligned({"a.jpg": (1, 0.9), "b.jpg": (0, 0.1)}, {"b.jpg": (0, 0.3), "c.jpg": (1, 0.5)})
    assert y.tolist() == [0] and p.tolist() == [0.1] and q.tolist() == [0.3]  # the images both scored


def test_evaluate_external_works_for_an_ensemble(tmp_path, samples):
    ens = tmp_path / "ens"
    ens.mkdir()
    member = _model_copy(tmp_path)
    (ens / "ensemble.json").write_text(json.dumps({"members": [str(member), str(member)]}))
    shutil.copy(member / "calibration.json", ens / "calibration.json")
    blocks = evaluate_external(ens, {"isic2018": samples[:12]}, n_resamples=20, progress=False)
    assert blocks["isic2018"]["n"] == 12
    assert json.loads((ens / "metrics.json").read_text())["external"]["isic2018"]["n"] == 12
    assert (ens / "report.md").read_text().count(SECTION) == 1


def test_the_bundled_model_folder_is_never_written():
    with pytest.raises(ExternalError, match="copy"):
        evaluate_external(DEFAULT_MODEL_DIR, {"x": []})
    with pytest.raises(ExternalError, match="no external sets"):
        evaluate_external(DEFAULT_MODEL_DIR, {})
