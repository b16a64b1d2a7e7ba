"""Site calibration (evaluation/site.py, evaluation/calibrate.py, `lesionlab calibrate`): a tiny run re-fitted on a
made-up site sample (a CSV over symlinks to real test images), the new folder predicting and serving at once, the
source untouched, and the errors a user sees for a sample too small for its policy or a bad --data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit
from typer.testing import CliRunner

from lesionlab.cli import app
from lesionlab.data.images import open_image
from lesionlab.evaluation.calibrate import calibrate_run
from lesionlab.evaluation.site import (
    SECTION,
    SiteError,
    best_bound,
    check_sample,
    fit_site,
    min_positives,
    with_section,
)
from lesionlab.inference.loading import load_predictor

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def site(small_data, tmp_path_factory) -> Path:
    """A site folder: labels.csv (image,label) over symlinks to the small set's test images (12 + 12)."""
    root = tmp_path_factory.mktemp("site") / "clinic"
    (root / "img").mkdir(parents=True)
    lines = ["image,label"]
    for cls in ("benign", "malignant"):
        for f in sorted((small_data / "test" / cls).iterdir()):
            (root / "img" / f"{cls}-{f.name}").symlink_to(f)
            lines.append(f"img/{cls}-{f.name},{cls}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def calibrated(tiny_run, site, tmp_path_factory) -> tuple[Path, dict, dict[str, str]]:
    before = snapshot(tiny_run)
    out = tmp_path_factory.mktemp("calibrated") / "tiny-clinic"
    record = calibrate_run(tiny_run, site, out, "sensitivity:0.9", n_resamples=50, progress=False)
    return out, record, before


def test_the_new_folder_predicts_with_the_refitted_operating_point(tiny_run, site, calibrated):
    out, record, _ = calibrated
    new, old = load_predictor(out), load_predictor(tiny_run)
    assert new.info.threshold == pytest.approx(record["threshold"])
    assert new.info.temperature == pytest.approx(record["temperature"])
    assert new.info.threshold_policy == "sensitivity:0.9"
    assert new.info.model_id.endswith("-site-clinic")
    assert (new.info.threshold, new.info.temperature) != (old.info.threshold, old.info.temperature)
    images = [open_image(p) for p in sorted((site / "img").iterdir())[::4]]
    z = old.predict_logits(images)
    p = new.predict_proba(images)
    np.testing.assert_allclose(p, expit(z / record["temperature"]), rtol=1e-5)
    for answer, q in zip(new.analyze(images), p):  # a refused image (the tiny run's detector) says not_a_lesion
        assert answer.threshold == pytest.approx(record["threshold"])
        assert answer.refused or answer.label == ("malignant" if q >= record["threshold"] else "benign")
    # the sample's sensitivity meets the policy at the refitted threshold
    at = record["sample_report"]["at_site_threshold"]
    assert at["sensitivity"]["value"] >= 0.9 and at["sensitivity"]["n"] == 12


def test_the_source_is_untouched_and_provenance_recorded(tiny_run, site, calibrated):
    out, _, before = calibrated
    assert snapshot(tiny_run) == before
    cal = json.loads((out / "calibration.json").read_text())
    prov = cal["provenance"]
    assert prov["site"]["name"] == "clinic" and prov["site"]["n"] == 24 and prov["site"]["n_malignant"] == 12
    assert len(prov["site"]["file_list_sha256"]) == 64
    assert prov["source"]["path"] == str(tiny_run.resolve())
    assert prov["source"]["threshold"] == pytest.approx(load_predictor(tiny_run).info.threshold)
    assert cal["policy"] == "sensitivity:0.9"
    saved = json.loads((out / "site_calibration.json").read_text())
    assert saved["site"] == prov["site"] and saved["policy"] == "sensitivity:0.9"
    assert len((out / "site_scores.csv").read_text().splitlines()) == 25
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"]["chosen_on"] == "site:clinic"
    assert metrics["source_run"]["metrics"]["test"]  # the source's evaluation, kept apart
    assert SECTION in (out / "report.md").read_text()
    assert not (out / "predictions.csv").exists() and not (out / "figures").exists()
    assert (out / "model.pt").read_bytes() == (tiny_run / "model.pt").read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_the_new_folder_serves(calibrated, small_data):
    from fastapi.testclient import TestClient

    from lesionlab.serve import create_app

    out, record, _ = calibrated
    with TestClient(create_app(out, runtime="torch")) as c:
        for _ in range(600):
            if c.get("/health/ready").status_code == 200:
                break
            import time

            time.sleep(0.05)
        card = c.get("/v1/model").json()
        assert card["threshold"]["value"] == pytest.approx(record["threshold"])
        assert card["threshold"]["chosen_on"] == "site:clinic"
        assert card["temperature"] == pytest.approx(record["temperature"])


def test_an_ensemble_folder_is_calibrated_with_its_members_in_place(tiny_run, site, tmp_path):
    ens = tmp_path / "a" / "ens"
    ens.mkdir(parents=True)
    (ens / "ensemble.json").write_text(json.dumps({"members": [str(tiny_run), str(tiny_run)]}))
    (ens / "calibration.json").write_text(json.dumps({"threshold": 0.5, "policy": "fixed:0.5"}))
    out = tmp_path / "b" / "ens-clinic"
    record = calibrate_run(ens, site, out, "youden", n_resamples=20, progress=False)
    spec = json.loads((out / "ensemble.json").read_text())
    assert [(out / m).resolve() for m in spec["members"]] == [tiny_run.resolve()] * 2
    assert load_predictor(out).info.threshold == pytest.approx(record["threshold"])


def test_too_few_malignant_images_for_a_lower_bound(tiny_run, site, tmp_path):
    with pytest.raises(SiteError) as e:
        calibrate_run(tiny_run, site, tmp_path / "out", "sensitivity-lcb:0.95", progress=False)
    msg = str(e.value)
    assert "at least 59 malignant" in msg and "it has 12" in msg and "sensitivity:0.95" in msg
    assert "sensitivity-lcb:0.77" in msg  # the highest bound 12 malignant images can reach: 0.05 ** (1/12)
    assert not (tmp_path / "out").exists()


def test_sample_size_arithmetic():
    assert min_positives(0.95) == 59 and min_positives(0.90) == 29
    assert best_bound(59) >= 0.95 > best_bound(58)
    y = np.r_[np.ones(59), np.zeros(100)]
    check_sample(y, "sensitivity-lcb:0.95")  # enough
    with pytest.raises(SiteError, match="benign and malignant"):
        check_sample(np.ones(10), "sensitivity:0.9")
    rng = np.random.default_rng(0)
    z = np.r_[rng.normal(2, 1, 59), rng.normal(-2, 1, 100)]
    fit = fit_site(y, z, "sensitivity-lcb:0.95")
    assert (fit.probabilities(z)[:59] >= fit.threshold).all()  # 59 positives: only none missed reaches the bound


def test_the_report_section_is_replaced_not_repeated():
    text = with_section("# run\n\n## Metrics\nx\n", f"{SECTION}\n\nold\n")
    again = with_section(text + "\n## Later\ny\n", f"{SECTION}\n\nnew\n")
    assert again.count(SECTION) == 1 and "old" not in again and "## Later" in again and "new" in again


def test_cli_errors_are_one_line(tiny_run, site, tmp_path):
    res = runner.invoke(
        app, ["calibrate", str(tiny_run), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "error:" in res.output and "does not exist" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(
        app,
        [
            "calibrate",
            str(tiny_run),
            "--data",
            str(site),
            "--out",
            str(tmp_path / "o"),
            "--threshold-policy",
            "sensitivity-lcb:0.95",
        ],
    )
    assert res.exit_code == 2 and "needs at least 59 malignant" in res.output
    res = runner.invoke(app, ["calibrate", str(tiny_run), "--data", str(site), "--out", str(tiny_run)])
    assert res.exit_code == 2 and "source folder" in res.output
    res = runner.invoke(
        app, ["calibrate", str(tiny_run), "--data", str(site), "--out", str(tmp_path), "--threshold-policy", "sens:1"]
    )
    assert res.exit_code == 2 and "unknown threshold policy" in res.output


def test_evaluating_a_site_calibrated_folder_again_is_refused(calibrated):
    """evaluate refits on validation: on a site-calibrated copy that would undo the site's operating point."""
    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.runs import RunError

    out = calibrated[0]
    before = (out / "calibration.json").read_text()
    with pytest.raises(RunError, match="calibrated on a site"):
        evaluate_run(out, progress=False)
    assert (out / "calibration.json").read_text() == before
