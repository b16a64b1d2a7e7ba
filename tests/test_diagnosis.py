"""``--target diagnosis``: a head over HAM10000's seven diagnoses, trained with isic-kaggle images that only say
benign/malignant, whose P(malignant) is the malignant diagnoses' softmax sum; the predictor, ONNX export, evaluation
(balanced multi-class accuracy) and /v1/predict all carry the diagnosis probabilities."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED, make_ham_subset, make_subset
from lesionlab.data.images import open_image
from lesionlab.data.sample import Sample
from lesionlab.training.config import ConfigError, TrainConfig

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
MALIGNANT = ["akiec", "bcc", "mel"]
PER_CLASS = 3


@pytest.fixture(scope="module")
def ham_subset(tmp_path_factory) -> Path:
    """PER_CLASS images of each of HAM10000's seven diagnoses (trimmed metadata CSV beside symlinked images)."""
    return make_ham_subset(tmp_path_factory.mktemp("ham") / "ham10000", dict.fromkeys(HAM_CLASSES, PER_CLASS))


@pytest.fixture(scope="module")
def kaggle_subset(shared_data, tmp_path_factory) -> Path:
    return make_subset(shared_data, tmp_path_factory.mktemp("k") / "isic-kaggle", n_train=6, n_test=3)


@pytest.fixture(scope="module")
def diagnosis_run(kaggle_subset, ham_subset, tmp_path_factory) -> Path:
    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.training.loop import train

    out = tmp_path_factory.mktemp("runs") / "diagnosis"
    cfg = TrainConfig(epochs=3, batch_size=8, target="diagnosis", label_smoothing=0.05)
    train(cfg, [kaggle_subset, ham_subset], out, progress=False)
    evaluate_run(out, n_resamples=50, progress=False)
    return out


@pytest.fixture(scope="module")
def exported_run(diagnosis_run, tmp_path_factory) -> Path:
    from lesionlab.inference import export

    out = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(diagnosis_run, out)
    export.export_run(out, log=lambda _: None)
    return out


def ham_images(ham_subset: Path, n: int = 5) -> list:
    return [open_image(p) for p in sorted((ham_subset / "images").iterdir())[:: len(HAM_CLASSES) * PER_CLASS // n][:n]]


def test_the_run_records_the_head_classes_and_which_are_malignant(diagnosis_run):
    model = json.loads((diagnosis_run / "config.json").read_text())["model"]
    assert model["diagnoses"] == HAM_CLASSES and model["malignant_diagnoses"] == MALIGNANT
    meta = torch.load(diagnosis_run / "model.pt", weights_only=True)["meta"]
    assert meta["diagnoses"] == HAM_CLASSES and meta["malignant_diagnoses"] == MALIGNANT


def test_p_malignant_is_the_sum_of_the_malignant_softmax(diagnosis_run, ham_subset):
    from lesionlab.inference.predictor import TorchPredictor

    predictor = TorchPredictor(diagnosis_run)
    model = predictor.model
    assert model.head.net[-1].out_features == 7 and model.head.net[1].out_features == 100  # Dense(100) kept
    x = torch.from_numpy(predictor.info.pre.network_input(predictor.prepare(ham_images(ham_subset))))
    with torch.inference_mode():
        p = torch.sigmoid(model(x))  # forward: one binary logit per image, as every consumer expects
        softmax = torch.softmax(model.diagnosis_logits(x), dim=1)
    assert model(x).shape == (5,)
    torch.testing.assert_close(p, softmax[:, [HAM_CLASSES.index(d) for d in MALIGNANT]].sum(1), atol=1e-6, rtol=0)

    assert predictor.info.diagnoses == tuple(HAM_CLASSES)
    for pred in predictor.analyze(ham_images(ham_subset)):  # calibrated: the malignant ones sum to the probability
        assert pred.diagnoses is not None and list(pred.diagnoses) == HAM_CLASSES
        assert sum(pred.diagnoses.values()) == pytest.approx(1.0)
        assert sum(pred.diagnoses[d] for d in MALIGNANT) == pytest.approx(pred.probability)


def test_tta_and_ensembles_keep_the_malignant_sum(diagnosis_run, ham_subset, tmp_path):
    """The mean over TTA views and the mean over an ensemble's members still sum, over the malignant diagnoses,
    to the probability they go with."""
    from scipy.special import expit

    from lesionlab.inference.ensemble import EnsemblePredictor
    from lesionlab.inference.predictor import TorchPredictor

    member = TorchPredictor(diagnosis_run)
    images = ham_images(ham_subset, 3)
    scores = member.scores_from_uint8(member.prepare(images[:2]), tta=True)
    assert scores.diagnoses is not None
    mal = [HAM_CLASSES.index(d) for d in MALIGNANT]
    np.testing.assert_allclose(scores.diagnoses[:, mal].sum(1), expit(scores.logits), atol=1e-6)

    ensemble = EnsemblePredictor(tmp_path, [member, member])
    assert ensemble.info.diagnoses == tuple(HAM_CLASSES)
    for e, m in zip(ensemble.analyze(images), member.analyze(images)):
        assert e.diagnoses == pytest.approx(m.diagnoses, abs=1e-6)


def test_onnx_export_keeps_the_logit_and_features_and_adds_the_diagnosis_logits(exported_run, ham_subset):
    from lesionlab.inference.loading import load_predictor
    from lesionlab.inference.predictor import onnx_session

    assert [o.name for o in onnx_session(exported_run / "model.onnx").get_outputs()] == [
        "logit",
        "features",
        "diagnosis_logits",
    ]
    spec = json.loads((exported_run / "preprocess.json").read_text())
    assert spec["diagnoses"] == HAM_CLASSES and spec["malignant_diagnoses"] == MALIGNANT
    images = ham_images(ham_subset)
    onnx, torch_ = load_predictor(exported_run, "onnx"), load_predictor(exported_run, "torch")
    for a, b in zip(onnx.analyze(images), torch_.analyze(images)):
        assert a.probability == pytest.approx(b.probability, abs=1e-4)
        assert a.diagnoses and b.diagnoses
        np.testing.assert_allclose(list(a.diagnoses.values()), list(b.diagnoses.values()), atol=1e-4)


def test_evaluation_writes_balanced_multiclass_accuracy_where_images_have_diagnoses(diagnosis_run):
    metrics = json.loads((diagnosis_run / "metrics.json").read_text())
    block = metrics["val"]["diagnosis"]
    ba = block["balanced_accuracy"]
    assert 0 <= ba["ci95"][0] <= ba["value"] <= ba["ci95"][1] <= 1
    assert block["classes"] == HAM_CLASSES and block["n"] + block["n_without_diagnosis"] == metrics["val"]["n"]
    recalls = [r["recall"]["value"] for r in block["per_class"].values() if r["n"]]
    assert ba["value"] == pytest.approx(np.mean(recalls))  # the mean over the diagnoses present of their recall
    assert "diagnosis" not in metrics["test"]  # isic-kaggle's test folders: no diagnoses
    assert "auc" in metrics["val"] and "threshold" in metrics  # the binary metrics as before
    assert "## Diagnoses" in (diagnosis_run / "report.md").read_text()


def test_external_isic2018_gets_the_task3_metric(diagnosis_run, tmp_path):
    from lesionlab.evaluation.external import evaluate_external

    isic = SHARED / "data" / "isic2018-task3-test"
    if not (isic / "ISIC2018_Task3_Test_GroundTruth.csv").exists():
        pytest.skip("needs ../shared/data/isic2018-task3-test")
    left, samples = dict.fromkeys(HAM_CLASSES, 1), []
    for row in csv.DictReader((isic / "ISIC2018_Task3_Test_GroundTruth.csv").open()):
        dx = next(c.lower() for c in row if c != "image" and float(row[c]) == 1.0)
        if left[dx]:
            left[dx] -= 1
            rel = f"images/{row['image']}.jpg"
            samples.append(Sample(rel, isic / rel, int(dx in MALIGNANT), dx, source="isic2018"))
    run = tmp_path / "run"
    shutil.copytree(diagnosis_run, run)
    block = evaluate_external(run, {"isic2018": samples}, n_resamples=50, progress=False)["isic2018"]
    assert block["diagnosis"]["n"] == 7 and set(block["diagnosis"]["per_class"]) == set(HAM_CLASSES)
    assert "Balanced multi-class accuracy" in (run / "report.md").read_text()
    from lesionlab.evaluation.card import model_card
    from lesionlab.evaluation.report import cell

    card = model_card(run)  # the external row and its diagnoses, read from metrics.json
    auc, bacc = cell(block["at_threshold"]["auc"]), cell(block["diagnosis"]["balanced_accuracy"])
    assert f"| isic2018 | 7 (3) | {auc} |" in card and bacc in card and "Diagnoses on isic2018" in card


def test_make_default_model_bundles_a_diagnosis_run_with_its_card(exported_run, tmp_path, monkeypatch):
    import runpy

    out = tmp_path / "default_model"
    argv = ["make_default_model.py", str(exported_run), "--out", str(out), "--command", "lesionlab train ..."]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(Path(__file__).parents[1] / "tools" / "make_default_model.py"), run_name="__main__")
    card = (out / "MODEL_CARD.md").read_text()
    config = json.loads((exported_run / "config.json").read_text())
    for s in config["data"]["sources"]:  # every source, with its counts
        assert f"| {s['name']} | {s['format']} |" in card
    assert all(f"| {d} |" in card for d in HAM_CLASSES) and "| mel | melanoma | malignant |" in card
    assert "lesionlab calibrate --data" in card and "lesionlab train ..." in card
    assert torch.load(out / "model.pt", weights_only=True)["state_dict"]["head.net.1.weight"].dtype == torch.float16
    assert (out / "model.onnx").exists() and not (out.parent / "default_model.tmp").exists()


def test_v1_predict_and_the_model_card_carry_the_diagnoses(exported_run, ham_subset):
    from fastapi.testclient import TestClient

    from lesionlab.serve import create_app

    images = [p.read_bytes() for p in sorted((ham_subset / "images").iterdir())[:6]]
    with TestClient(create_app(exported_run)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health/ready").json()
            time.sleep(0.05)
        batch = client.post("/v1/predict/batch", files=[("files", ("x.jpg", b, "image/jpeg")) for b in images]).json()
        # the tiny run's lesion detector refuses some HAM images: an accepted one, and a refused one if any
        by_status = {r["status"]: i for i, r in reversed(list(enumerate(batch["results"])))}
        answers = {
            s: client.post("/v1/predict", files={"file": ("x.jpg", images[i], "image/jpeg")})
            for s, i in by_status.items()
        }
        card = client.get("/v1/model").json()
    assert 200 in answers
    for status, r in answers.items():
        body = r.json()
        assert r.status_code == status and list(body["diagnoses"]) == HAM_CLASSES  # 422: refused, diagnoses too
        assert sum(body["diagnoses"][d] for d in MALIGNANT) == pytest.approx(body["probability"], abs=1e-6)
        assert batch["results"][by_status[status]]["diagnoses"] == pytest.approx(body["diagnoses"])
    assert card["target"] == "diagnosis" and card["diagnoses"] == HAM_CLASSES
    assert [s["name"] for s in card["training_data"]["sources"]] == ["isic-kaggle", "ham10000"]


def test_diagnosis_target_without_any_diagnosis_is_a_clear_error(kaggle_subset, tmp_path):
    from typer.testing import CliRunner

    from lesionlab.cli import app
    from lesionlab.training.loop import train

    with pytest.raises(ConfigError, match="--target diagnosis needs training images with a diagnosis"):
        train(TrainConfig(epochs=1, target="diagnosis"), kaggle_subset, tmp_path / "run", progress=False)
    res = CliRunner().invoke(
        app, ["train", "--data", str(kaggle_subset), "--target", "diagnosis", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code != 0 and "needs training images with a diagnosis" in res.output


def test_images_without_a_diagnosis_train_the_binary_logit():
    """The mixed loss: cross-entropy over diagnoses where known, binary cross-entropy of the logit elsewhere."""
    from torch.nn import functional as F

    from lesionlab.training.optim import make_loss

    cfg = TrainConfig(label_smoothing=0.1)
    loss = make_loss(cfg, np.array([0.0, 1.0, 1.0]))
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0]])
    logits, y = torch.tensor([0.3, -0.2, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    c = torch.tensor([0, -1, 2])
    ce = F.cross_entropy(z[[0, 2]], c[[0, 2]], reduction="none", label_smoothing=0.1)
    bce = F.binary_cross_entropy_with_logits(logits[1], torch.tensor(0.95))
    assert float(loss(logits, y, z, c)) == pytest.approx(float((ce.sum() + bce) / 3))
    assert float(loss(logits, y, None, None)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(logits, y * 0.9 + 0.05))
    )


def test_a_binary_head_and_its_checkpoints_are_unchanged():
    from lesionlab.models.classifier import Diagnoses, Head

    assert set(Head(16).state_dict()) == {"net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"}
    assert Head(16).diagnoses is None and Diagnoses.from_meta({"backbone": "x", "hidden": 100}) is None
    with pytest.raises(ValueError, match="binary head"):
        Head(16).diagnosis_logits(torch.zeros(2, 16))


def test_the_decision_rule_is_chosen_on_validation_and_applied_to_every_set(diagnosis_run):
    metrics = json.loads((diagnosis_run / "metrics.json").read_text())
    decision = metrics["diagnosis_decision"]
    assert decision["chosen_on"] == "val" and decision["rule"] in ("argmax", "prior_corrected")
    assert set(decision["priors"]) == set(HAM_CLASSES) and sum(decision["priors"].values()) == pytest.approx(1)
    tried = decision["val_balanced_accuracy"]
    assert decision["rule"] == max(tried, key=lambda r: (tried[r], r == "argmax"))  # argmax wins a tie
    assert tried[decision["rule"]] == pytest.approx(metrics["val"]["diagnosis"]["balanced_accuracy"]["value"])
    assert metrics["val"]["diagnosis"]["decision"] == decision["rule"]
    assert f"Decision: `{decision['rule']}`" in (diagnosis_run / "report.md").read_text()


def test_the_prior_corrected_rule_divides_by_the_training_shares():
    from lesionlab.evaluation.diagnosis import choose_decision, decide, diagnosis_metrics, training_priors

    names = ["mel", "nv", "vasc"]
    priors = training_priors(["nv"] * 8 + ["mel"] * 2 + [None, "df"], names)  # no diagnosis or another: not counted
    assert priors == {"mel": 0.2, "nv": 0.8, "vasc": 0.0}
    probs = np.array([[0.3, 0.7, 0.0], [0.1, 0.9, 0.0], [0.0, 0.4, 0.6]])
    assert decide(probs, names).tolist() == [1, 1, 2]
    # 0.3/0.2 > 0.7/0.8; a class never trained on (share 0) is never chosen, whatever its probability
    assert decide(probs, names, {"rule": "prior_corrected", "priors": priors}).tolist() == [0, 1, 1]
    truth = ["mel", "nv", "nv"]
    chosen = choose_decision(truth, probs, names, priors)
    assert chosen["rule"] == "prior_corrected" and chosen["val_balanced_accuracy"]["argmax"] == 0.25
    block = diagnosis_metrics(truth, probs, names, 20, decision=chosen)
    assert block is not None and block["decision"] == "prior_corrected" and block["balanced_accuracy"]["value"] == 1
    assert choose_decision(truth, probs, names, None)["rule"] == "argmax"  # no priors: the plain argmax
    with pytest.raises(ValueError, match="unknown diagnosis decision"):
        decide(probs, names, {"rule": "vote"})
