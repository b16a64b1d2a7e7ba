"""bench/score_ensemble.py: an ensemble scored from kept per-image files (bench/results/runs/, committed)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEPT = ROOT / "bench" / "results" / "runs"
RUN = KEPT / "r8-a5-ft-dx-s1"  # the bundled model's run


@pytest.fixture(scope="module")
def bench() -> dict:
    return runpy.run_path(str(ROOT / "bench" / "score_ensemble.py"))


def test_a_run_with_itself_reproduces_its_own_threshold_and_metrics(bench, tmp_path):
    out = tmp_path / "e.json"
    assert bench["main"]([str(RUN), str(RUN), "--n-resamples", "50", "--json", str(out)]) == 0
    got, own = json.loads(out.read_text()), json.loads((RUN / "metrics.json").read_text())
    assert got["threshold"] == pytest.approx(own["threshold"]["value"], abs=1e-5)
    assert got["sets"]["val"]["auc"]["value"] == pytest.approx(own["val"]["auc"]["value"], abs=1e-5)
    for name in ("isic2018", "ph2"):
        mine, theirs = got["sets"][name], own["external"][name]["at_threshold"]
        assert mine["n"] == own["external"][name]["n"]
        for k, their_key in (("auc", "auc"), ("sensitivity", "recall"), ("specificity", "specificity")):
            assert mine[k]["value"] == pytest.approx(theirs[their_key]["value"], abs=1e-4)


def test_the_paired_difference_from_a_member_of_an_identical_ensemble_is_zero(bench, tmp_path):
    out = tmp_path / "e.json"
    bench["main"]([str(RUN), str(RUN), "--against", str(RUN), "--n-resamples", "50", "--json", str(out)])
    for block in json.loads(out.read_text())["sets"].values():
        assert all(block["paired"][k]["value"] == pytest.approx(0.0, abs=1e-12) for k in ("auc", "specificity"))


def test_one_run_is_not_an_ensemble(bench):
    with pytest.raises(SystemExit):
        bench["main"]([str(RUN)])
