"""Ensembles: created from runs, evaluated like a run, and served with the same numbers."""

import csv
import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit
from typer.testing import CliRunner

from lesionlab.cli import app
from lesionlab.ensemble.build import create_ensemble, evaluate_ensemble
from lesionlab.ensemble.scores import scores_from_predictions
from lesionlab.inference.ensemble import EnsemblePredictor, mean_probability_logit
from lesionlab.inference.loading import load_predictor
from lesionlab.runs import RunError

runner = CliRunner()


def _tiny_variant(small_data, tmp_path_factory, name: str, **settings):
    """tiny_run's recipe with other settings, trained and evaluated (frozen features from the session cache)."""
    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.training.config import TrainConfig
    from lesionlab.training.loop import train

    out = tmp_path_factory.mktemp("runs") / name
    train(TrainConfig(epochs=3, lr=1e-3, **settings), small_data, out, progress=False)
    evaluate_run(out, n_resamples=100, progress=False)
    return out


@pytest.fixture(scope="module")
def second_run(small_data, tmp_path_factory):
    """Another seed on the same split."""
    return _tiny_variant(small_data, tmp_path_factory, "tiny-seed1", seed=1)


@pytest.fixture(scope="module")
def ens(tiny_run, second_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "ens"
    create_ensemble([tiny_run, second_run], out, n_resamples=100, progress=False)
    return out


def _predictions(folder):
    with open(folder / "predictions.csv") as f:
        return {(r["split"], r["relpath"]): r for r in csv.DictReader(f)}


def test_ensemble_folder_is_a_model_folder(ens, tiny_run):
    for name in (
        "ensemble.json",
        "config.json",
        "splits.csv",
        "metrics.json",
        "calibration.json",
        "predictions.csv",
        "report.md",
        "figures/roc.png",
        "figures/reliability.png",
        "refusal.json",
    ):
        assert (ens / name).exists(), name
    spec = json.loads((ens / "ensemble.json").read_text())
    assert len(spec["members"]) == 2 and not spec["members"][0].startswith("/")  # relative: movable together
    cfg = json.loads((ens / "config.json").read_text())
    assert cfg["kind"] == "lesionlab-ensemble" and cfg["members"][0]["backbone"] == "efficientnet_lite0"
    m = json.loads((ens / "metrics.json").read_text())
    assert m["val"]["n"] == json.loads((tiny_run / "metrics.json").read_text())["val"]["n"]
    assert 0 <= m["refusal"]["auroc_test_vs_non_lesion"] <= 1
    assert "ensemble of 2 runs" in (ens / "report.md").read_text()


def test_ensemble_logit_is_the_mean_of_member_probabilities(ens, tiny_run, second_run):
    a, b, e = _predictions(tiny_run), _predictions(second_run), _predictions(ens)
    assert set(e) == set(a) == set(b)
    for key in list(e)[:20]:
        expected = mean_probability_logit([[float(a[key]["probability"])], [float(b[key]["probability"])]])[0]
        assert float(e[key]["logit"]) == pytest.approx(expected, abs=1e-4)


def test_served_ensemble_gives_the_evaluated_probabilities(ens, small_data):
    from lesionlab.data.images import open_image

    predictor = load_predictor(ens)
    assert isinstance(predictor, EnsemblePredictor) and len(predictor.members) == 2
    assert predictor.refuses_non_lesions  # every member carries a lesion detector
    rows = [r for (split, _), r in _predictions(ens).items() if split == "test"][:4]
    got = predictor.predict([open_image(small_data / r["relpath"]) for r in rows])
    np.testing.assert_allclose(got, [float(r["probability"]) for r in rows], atol=2e-4)
    assert predictor.info.threshold == json.loads((ens / "calibration.json").read_text())["threshold"]


def test_evaluate_command_re_scores_the_ensemble(ens, tmp_path):
    copy = tmp_path / "ens"
    shutil.copytree(ens, copy)
    spec = json.loads((ens / "ensemble.json").read_text())
    spec["members"] = [str((ens / m).resolve()) for m in spec["members"]]
    (copy / "ensemble.json").write_text(json.dumps(spec))
    res = runner.invoke(app, ["evaluate", str(copy), "--resamples", "50", "--threshold-policy", "fixed:0.5", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((copy / "calibration.json").read_text())["threshold"] == 0.5
    np.testing.assert_allclose(
        [float(r["logit"]) for r in _predictions(copy).values()],
        [float(r["logit"]) for r in _predictions(ens).values()],
        atol=1e-4,
    )  # re-scored == reused


def test_members_must_share_the_validation_split(tiny_run, second_run, tmp_path):
    other = tmp_path / "other-split"
    shutil.copytree(tiny_run, other)
    lines = (other / "splits.csv").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.endswith(",val"))
    lines[i] = lines[i][: -len("val")] + "train"
    (other / "splits.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match="not trained on the same train/validation split"):
        create_ensemble([second_run, other], tmp_path / "ens", progress=False)


def test_bad_member_lists_are_refused(tiny_run, second_run, tmp_path):
    with pytest.raises(RunError, match="at least two"):
        create_ensemble([tiny_run], tmp_path / "e1", progress=False)
    with pytest.raises(RunError, match="listed twice"):
        create_ensemble([tiny_run, tiny_run], tmp_path / "e2", progress=False)
    unevaluated = tmp_path / "unevaluated"
    shutil.copytree(tiny_run, unevaluated)
    (unevaluated / "calibration.json").unlink()
    with pytest.raises(RunError, match="lesionlab evaluate"):
        create_ensemble([second_run, unevaluated], tmp_path / "e3", progress=False)
    with pytest.raises(RunError, match=r"no ensemble\.json"):
        evaluate_ensemble(tmp_path)


def test_stale_predictions_are_not_reused(tiny_run, tmp_path):
    assert scores_from_predictions(tiny_run) is not None
    assert scores_from_predictions(tiny_run, tta=True) is None  # scored without TTA
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    cal = json.loads((copy / "calibration.json").read_text())
    cal["temperature"] *= 2
    (copy / "calibration.json").write_text(json.dumps(cal))
    assert scores_from_predictions(copy) is None


def test_ensemble_cli_and_refusal(tiny_run, second_run, tmp_path):
    from PIL import Image

    out = tmp_path / "cli-ens"
    res = runner.invoke(
        app, ["ensemble", str(tiny_run), str(second_run), "--out", str(out), "--resamples", "50", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert (
        "test_dedup" in res.output and "lesionlab ensemble" in json.loads((out / "config.json").read_text())["command"]
    )
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    p = load_predictor(out).analyze([noise])[0]
    assert p.refused and p.label == "not_a_lesion"
    assert 0 <= p.probability <= 1 and p.probability == pytest.approx(
        expit(p.logit / load_predictor(out).info.temperature)
    )


def test_members_exported_to_onnx_give_the_same_answers(ens, tiny_run, second_run, small_data, tmp_path):
    """Exporting an ensemble = exporting its members; an ONNX member answers like its PyTorch self."""
    from PIL import Image

    from lesionlab.data.images import open_image
    from lesionlab.inference.export import export_run

    exported = tmp_path / "onnx-member"
    shutil.copytree(tiny_run, exported)
    export_run(exported)
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "ensemble.json").write_text(json.dumps({"members": [str(exported), str(second_run)]}))
    shutil.copy(ens / "calibration.json", tmp_path / "ens" / "calibration.json")
    mixed, torch_only = load_predictor(tmp_path / "ens"), load_predictor(ens)
    assert mixed.info.runtime == "onnxruntime+pytorch"
    images = [open_image(f) for f in sorted((small_data / "test" / "malignant").iterdir())[:3]]
    images.append(Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)))
    a, b = mixed.analyze(images), torch_only.analyze(images)
    np.testing.assert_allclose([p.probability for p in a], [p.probability for p in b], atol=1e-4)
    assert [p.label for p in a] == [p.label for p in b] and a[-1].refused


@pytest.fixture(scope="module")
def fold1_run(small_data, tmp_path_factory):
    """Validation on fold 1 of the same split seed (tiny_run is fold 0)."""
    return _tiny_variant(small_data, tmp_path_factory, "tiny-fold1", fold=1)


def test_cross_fit_ensemble_is_calibrated_out_of_fold(tiny_run, fold1_run, tmp_path):
    out = tmp_path / "xfit"
    m = create_ensemble([tiny_run, fold1_run], out, n_resamples=50, progress=False)
    assert m["layout"] == "cross-fit" and json.loads((out / "config.json").read_text())["layout"] == "cross-fit"
    a, b, e = _predictions(tiny_run), _predictions(fold1_run), _predictions(out)
    a_val = {k: r for k, r in a.items() if k[0] == "val"}
    b_val = {k: r for k, r in b.items() if k[0] == "val"}
    assert not set(a_val) & set(b_val)
    assert {k for k in e if k[0] == "val"} == set(a_val) | set(b_val)  # every validation image, once
    assert m["val"]["n"] == len(a_val) + len(b_val)
    for key, r in list(a_val.items())[:5] + list(b_val.items())[:5]:  # scored by the member that held it out
        assert float(e[key]["logit"]) == pytest.approx(mean_probability_logit([[float(r["probability"])]])[0], abs=1e-4)
    for key in [k for k in e if k[0] == "test"][:10]:  # test: every member
        expected = mean_probability_logit([[float(a[key]["probability"])], [float(b[key]["probability"])]])[0]
        assert float(e[key]["logit"]) == pytest.approx(expected, abs=1e-4)
    with open(out / "splits.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["split"] for r in rows} == {"val"} and {r["members"] for r in rows} == {"0", "1"}
    assert "out-of-fold predictions" in (out / "report.md").read_text()
    assert m["threshold"]["chosen_on"].startswith("val (out of fold")
    predictor = load_predictor(out)
    assert isinstance(predictor, EnsemblePredictor) and predictor.refusal_threshold == 1.0


def test_members_sharing_a_fold_score_it_together(tiny_run, second_run, fold1_run, tmp_path):
    out = tmp_path / "groups"
    m = create_ensemble([tiny_run, fold1_run, second_run], out, n_resamples=50, progress=False)
    assert m["layout"] == "cross-fit"
    a, _b, c, e = (_predictions(r) for r in (tiny_run, fold1_run, second_run, out))
    fold0 = [k for k in a if k[0] == "val"]
    assert set(fold0) == {k for k in c if k[0] == "val"}  # tiny_run and second_run share fold 0
    for key in fold0[:5]:
        expected = mean_probability_logit([[float(a[key]["probability"])], [float(c[key]["probability"])]])[0]
        assert float(e[key]["logit"]) == pytest.approx(expected, abs=1e-4)
    with open(out / "splits.csv") as f:
        assert {r["members"] for r in csv.DictReader(f)} == {"0;2", "1"}
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["n_val"] == m["val"]["n"] and data["folds"] == [0, 1]  # one fold per group, not per member


def test_overlapping_folds_are_refused(tiny_run, fold1_run, tmp_path):
    other = tmp_path / "overlap"
    shutil.copytree(fold1_run, other)
    with open(tiny_run / "splits.csv") as f:
        a_val = next(r["relpath"] for r in csv.DictReader(f) if r["split"] == "val")
    lines = [
        line.replace(f"{a_val},0,train", f"{a_val},0,val").replace(f"{a_val},1,train", f"{a_val},1,val")
        for line in (other / "splits.csv").read_text().splitlines()
    ]
    (other / "splits.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match="validation folds overlap"):
        create_ensemble([tiny_run, other], tmp_path / "ens", progress=False)


def test_threshold_transfer_bench_reads_a_cross_fit_ensemble(tiny_run, fold1_run, ens, tmp_path):
    out = tmp_path / "xfit"
    create_ensemble([tiny_run, fold1_run], out, n_resamples=50, progress=False)
    bench = runpy.run_path(str(Path(__file__).parents[1] / "bench" / "threshold_transfer.py"))
    cells = [c.strip() for c in bench["row"](out).strip("|").split("|")]
    assert cells[0] == "xfit" and len(cells) == 4
    sens, spec = (float(v) for v in cells[2].split(" / "))
    assert 0 <= sens <= 1 and 0 <= spec <= 1
    with pytest.raises(SystemExit, match="not a cross-fit ensemble"):
        bench["row"](ens)


def test_a_failed_ensemble_leaves_nothing_servable(tiny_run, second_run, tmp_path):
    out = tmp_path / "failed"
    with pytest.raises(ValueError, match="no threshold gives"):  # found late: after the members are scored
        create_ensemble([tiny_run, second_run], out, policy="sensitivity-lcb:0.99", n_resamples=20, progress=False)
    assert not out.exists()
    with pytest.raises(ValueError, match="must lie in"):  # found early: nothing is written
        create_ensemble([tiny_run, second_run], out, policy="fixed:1.5", progress=False)
    assert not out.exists()


@pytest.fixture(scope="module")
def inner_run(small_data, tmp_path_factory):
    """The inner run of a nested cross-fit over folds 0 and 1: trained on folds 2-4, validated on 0 and 1."""
    return _tiny_variant(small_data, tmp_path_factory, "tiny-nest-f01", fold=0, also_val_fold=1)


def test_nested_threshold_bench_scores_folds_with_the_inner_runs(tiny_run, fold1_run, inner_run, tmp_path):
    out = tmp_path / "xfit"
    create_ensemble([tiny_run, fold1_run], out, n_resamples=50, progress=False)
    bench = runpy.run_path(str(Path(__file__).parents[1] / "bench" / "nested_threshold.py"))
    est, counts = bench["nested"]([inner_run])
    a, b = _predictions(tiny_run), _predictions(fold1_run)
    assert set(est.relpaths) == {k[1] for k in list(a) + list(b) if k[0] == "val"} and set(counts) == {1}
    table = bench["compare"](out, [inner_run])
    assert table.count("\n") == 3 and "nested" in table
    with pytest.raises(SystemExit, match="unscored"):
        bench["compare"](out, [tiny_run])  # fold 0 alone leaves fold 1 unscored


def test_a_cross_fit_ensemble_calibrated_on_inner_runs(tiny_run, fold1_run, second_run, inner_run, tmp_path):
    out = tmp_path / "nested"
    res = runner.invoke(
        app,
        [
            "ensemble",
            str(tiny_run),
            str(fold1_run),
            "--inner",
            str(inner_run),
            "--out",
            str(out),
            "--resamples",
            "50",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["threshold"]["chosen_on"].startswith("val (nested out of fold")
    inner = _predictions(inner_run)
    e = _predictions(out)
    for key in [k for k in e if k[0] == "val"][:5]:  # validation = the inner run's score, not the member's
        assert float(e[key]["logit"]) == pytest.approx(
            mean_probability_logit([[float(inner[key]["probability"])]])[0], abs=1e-4
        )
    config = json.loads((out / "config.json").read_text())
    assert config["inner"][0]["val_folds"] == [0, 1] and "--inner" in config["command"]
    assert json.loads((out / "ensemble.json").read_text())["inner"]
    assert "nested out-of-fold estimate" in (out / "report.md").read_text()
    again = evaluate_ensemble(out, n_resamples=50, progress=False)  # re-evaluation keeps the inner runs
    assert again["threshold"]["chosen_on"] == m["threshold"]["chosen_on"]
    assert again["threshold"]["value"] == pytest.approx(m["threshold"]["value"], abs=1e-6)  # re-scored images
    with pytest.raises(RunError, match="share one split"):
        create_ensemble([tiny_run, second_run], tmp_path / "shared", inner=[inner_run], progress=False)
    with pytest.raises(RunError, match="differ from the members' folds"):
        create_ensemble([tiny_run, fold1_run], tmp_path / "gap", inner=[tiny_run], progress=False)
    assert not (tmp_path / "gap").exists()
