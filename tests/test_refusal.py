"""Refusal of non-lesion inputs: the detector is fitted by evaluation, measured, and used by predict."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import beta
from typer.testing import CliRunner

from lesionlab.cli import app
from lesionlab.inference.predictor import TorchPredictor
from lesionlab.models.detector import LesionDetector
from lesionlab.refusal import measure as refusal


def test_evaluation_fits_and_measures_the_detector(tiny_run):
    for name in ("ood.npz", "ood.json", "refusal.json", "refusal_scores.csv"):
        assert (tiny_run / name).exists(), name
    assert json.loads((tiny_run / "ood.json").read_text())["l2_normalize"] is True
    block = json.loads((tiny_run / "metrics.json").read_text())["refusal"]
    assert 0 <= block["auroc_test_vs_non_lesion"] <= 1 and block["n_non_lesion"] >= 100
    assert block["val_refused"] == 0.0  # 12 validation images: too few to refuse any of them
    assert "Refusal of non-lesion images" in (tiny_run / "report.md").read_text()


def test_non_lesion_set_covers_every_kind_and_is_repeatable():
    items = refusal.non_lesion_images()
    kinds = {it.kind for it in items}
    assert kinds == {"natural", "noise", "flat", "gradient", "shapes", "text"}
    assert len(items) >= 100 and sum(it.kind == "natural" for it in items) >= 20
    names = [f"{it.kind}/{it.name}" for it in items]
    assert len(set(names)) == len(names) and not any("," in n for n in names)  # names go into a CSV
    again = refusal.non_lesion_images()
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(items, again))
    assert all(it.image.mode == "RGB" and min(it.image.size) >= 32 for it in items)


@pytest.mark.parametrize("n", [12, 100, 528, 2000])
def test_conservative_threshold_bounds_the_validation_refusal_rate(n):
    scores = np.random.default_rng(n).normal(size=n)
    t = refusal.conservative_threshold(scores, 0.01)
    k = int((scores > t).sum())
    assert k == 0 or beta.ppf(0.95, k + 1, n - k) <= 0.01  # the bound holds ...
    assert k + 1 >= n or beta.ppf(0.95, k + 2, n - k - 1) > 0.01  # ... and one more refusal would break it
    assert (n, k) != (528, 0)  # enough images to refuse one


def test_served_predictor_refuses_noise_and_accepts_validation_lesions(tiny_run, small_data):
    import csv

    from lesionlab.data.images import open_image

    predictor = TorchPredictor(tiny_run)
    assert predictor.detector is not None and predictor.detector.normalize
    with open(tiny_run / "splits.csv") as f:
        val = [r["relpath"] for r in csv.DictReader(f) if r["split"] == "val"]
    lesions = predictor.analyze([open_image(small_data / r) for r in val])
    assert not any(p.refused for p in lesions)  # the threshold is at least the largest validation distance
    rng = np.random.default_rng(0)
    junk = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), Image.new("RGB", (300, 200))]
    for p in predictor.analyze(junk):
        assert p.refused and p.label == "not_a_lesion" and p.reason is not None and "does not look like" in p.reason


def test_predict_prints_not_a_lesion(tiny_run, tmp_path):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(noise)
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--model", str(tiny_run), str(noise)])
    assert res.exit_code == 0, res.output
    assert "not_a_lesion" in res.stdout
    res = runner.invoke(app, ["predict", "--model", str(tiny_run), "--json", str(noise)])
    row = json.loads(res.stdout)[0]
    assert row["label"] == "not_a_lesion" and row["refused"] is True and row["reason"]
    assert row["ood_score"] > json.loads((tiny_run / "ood.json").read_text())["threshold"]


@pytest.mark.parametrize("key, normalize", [("l2_normalize", False), ("pixel_threshold", True)])
def test_detectors_saved_by_older_versions_still_load(key, normalize, tmp_path):
    """Detectors saved before L2 normalisation, or before the pixel distance, score as they did."""
    rng = np.random.default_rng(0)
    det = LesionDetector.fit(rng.normal(size=(60, 8)), rng.normal(size=(20, 8)), n_components=4, normalize=normalize)
    det.save(tmp_path)
    meta = json.loads((tmp_path / "ood.json").read_text())
    del meta[key]
    (tmp_path / "ood.json").write_text(json.dumps(meta))
    old = LesionDetector.load(tmp_path)
    assert old is not None
    assert old.normalize is normalize and old.pixels is None
    x = rng.normal(size=(5, 8))
    np.testing.assert_allclose(old.score(x), det.score(x), rtol=1e-5)  # no images needed


def test_normalised_detector_ignores_feature_scale():
    """Flat images give small pooled features; after L2 normalisation only the direction counts."""
    rng = np.random.default_rng(0)
    train = rng.normal(5, 1, size=(200, 16))
    det = LesionDetector.fit(train, train[:50], n_components=8)
    np.testing.assert_allclose(det.score(train[:5] * 0.01), det.score(train[:5]), rtol=1e-4)


def test_detector_also_scores_input_pixels(tiny_run):
    meta = json.loads((tiny_run / "ood.json").read_text())
    assert meta["pixel_threshold"] > 0 and "colour and texture" in meta["method"]
    det = LesionDetector.load(tiny_run)
    assert det is not None and det.pixels is not None
    feats = np.random.default_rng(0).normal(size=(2, det.center.shape[0]))
    with pytest.raises(ValueError, match="pass the images"):
        det.score(feats)
    result = json.loads((tiny_run / "refusal.json").read_text())
    assert "each of the two distances" in result["threshold_rule"]


def test_pixel_statistics_put_flat_colours_and_gradients_far_from_lesions(small_data):
    """The model-free distance: what fine-tuned features miss (flat colour, smooth gradients)."""
    from lesionlab.data.dataset import load_dataset
    from lesionlab.models.detector import PixelDistance, image_statistics

    stats = refusal.pixel_statistics(load_dataset(small_data), 224, progress=False)
    lesions = np.stack(list(stats.values()))
    dist = PixelDistance.fit(lesions)
    ramp = np.linspace(0, 255, 224, dtype=np.float32)
    others = np.stack(
        [
            np.full((224, 224, 3), (180, 120, 120), np.uint8),  # skin-coloured flat
            np.full((224, 224, 3), (255, 0, 255), np.uint8),
            np.repeat(np.tile(ramp, (224, 1))[..., None], 3, axis=2).astype(np.uint8),
        ]
    )
    assert dist.score(image_statistics(others)).min() > 2 * dist.score(lesions).max()
    assert image_statistics(others).shape == (3, lesions.shape[1])


def test_ensemble_refusal_is_a_majority_not_a_union(tmp_path):
    """Each member's detector refuses ~1% of real lesions; 'any member refuses' would add those up."""
    import json

    from lesionlab.models.detector import ensemble_refusal_score
    from lesionlab.refusal.measure import combine_refusal

    assert ensemble_refusal_score([[2.0, 0.5], [0.1, 0.6], [0.2, 3.0]]).tolist() == [0.2, 0.6]
    assert ensemble_refusal_score([[1.5], [0.7]]).tolist() == [1.1]  # two members: their mean
    rows = {  # member -> (test lesion a, test lesion b, non-lesion) as distance / threshold
        "m0": (1.5, 0.2, 4.0),
        "m1": (0.3, 1.2, 5.0),
        "m2": (0.4, 0.3, 0.9),
    }
    dirs = []
    for name, (a, b, nl) in rows.items():
        d = tmp_path / name
        d.mkdir()
        (d / "refusal.json").write_text(json.dumps({"threshold": 10.0}))
        (d / "refusal_scores.csv").write_text(
            f"set,name,score,refused\ntest,a.jpg,{a * 10},0\ntest,b.jpg,{b * 10},0\nnon_lesion,noise/x,{nl * 10},1\n"
        )
        dirs.append(d)
    out = combine_refusal(dirs)
    assert out is not None
    assert out["lesions"]["test"]["refused"] == 0  # a union would refuse both lesions
    assert out["non_lesion"]["refused"] == 1 and "median" in out["method"]


# ------------------------------------------------------------------ clinical (non-dermoscopic) photos


@pytest.fixture(scope="module")
def clinical_photos(tmp_path_factory):
    """A handful of SD-198 clinical photos, 4 from each of 4 diagnosis folders, symlinked (never copied)."""
    from conftest import SHARED

    src = SHARED / "data" / "clinical-sd198" / "images"
    if not src.is_dir():
        pytest.skip("needs ../shared/data/clinical-sd198")
    root = tmp_path_factory.mktemp("clinical") / "photos"
    for diagnosis in ("Eczema", "Psoriasis", "Acne_Vulgaris", "Malignant_Melanoma"):
        (root / diagnosis).mkdir(parents=True)
        for f in sorted((src / diagnosis).glob("*.jpg"))[:4]:
            (root / diagnosis / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def clinical_run(tiny_run, clinical_photos, tmp_path_factory):
    """A copy of tiny_run whose detector was fitted again by `lesionlab refusal --non-lesion` (half the photos)."""
    import shutil

    out = tmp_path_factory.mktemp("clinical-run") / "run"
    shutil.copytree(tiny_run, out)
    res = CliRunner().invoke(app, ["refusal", str(out), "--non-lesion", str(clinical_photos), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "held-out photos: refused" in res.stdout and "dermoscopy-vs-photo" in res.stdout
    return out


def _held_out(run) -> list:
    from lesionlab.data.images import open_image

    block = json.loads((run / "refusal.json").read_text())["clinical_photos"]
    root = Path(block["sources"][0])
    return [open_image(root / n.split("/", 1)[1]) for n in block["held_out_files"]]


def test_photos_are_split_by_folder_into_fit_and_held_out(clinical_photos):
    from lesionlab.refusal.photos import split_photos

    split = split_photos([clinical_photos])
    assert len(split.fit) == len(split.held_out) == 8 and not set(split.fit) & set(split.held_out)
    assert {p.parent.name for p in split.held_out} == {p.parent.name for p in split.fit}  # every diagnosis, both
    assert split_photos([clinical_photos]).held_out == split.held_out  # seeded
    assert split_photos([clinical_photos], seed=1).held_out != split.held_out
    record = split.record()
    assert record["seed"] == 0 and len(record["held_out_files"]) == 8 and record["fit_files"][0].startswith("photos/")


def test_detector_learns_to_refuse_clinical_photos(clinical_run, small_data):
    import csv

    from lesionlab.data.images import open_image

    meta = json.loads((clinical_run / "ood.json").read_text())
    assert meta["dermoscopy_threshold"] is not None and len(meta["dermoscopy_negatives"]) == 1
    result = json.loads((clinical_run / "refusal.json").read_text())
    photos = result["clinical_photos"]
    assert photos["dermoscopy_discriminator"] and photos["n_fit"] == 8 and photos["held_out"]["n"] == 8
    assert photos["held_out"]["refused"] >= 7, photos  # photos it never saw
    assert "/ 3" in result["threshold_rule"]
    assert (
        json.loads((clinical_run / "metrics.json").read_text())["refusal"]["clinical_photos_held_out_refused"] >= 7 / 8
    )
    predictor = TorchPredictor(clinical_run)
    assert predictor.detector is not None and predictor.detector.dermoscopy is not None
    answers = predictor.analyze(_held_out(clinical_run))
    refused = [p for p in answers if p.refused]
    assert len(refused) >= 7 and all(p.label == "not_a_lesion" for p in refused)
    # the tiny run's pixel distance refuses them too; the discriminator alone refuses 7 of the 8
    clinical = [p for p in refused if p.reason and p.reason.startswith("not a dermoscopic image")]
    assert len(clinical) >= 6, [p.reason for p in answers]
    with open(clinical_run / "splits.csv") as f:
        val = [r["relpath"] for r in csv.DictReader(f) if r["split"] == "val"]
    assert not any(p.refused for p in predictor.analyze([open_image(small_data / r) for r in val]))


def test_without_photos_the_detector_stays_as_it_was(tiny_run):
    result = json.loads((tiny_run / "refusal.json").read_text())
    block = result["clinical_photos"]
    assert block["dermoscopy_discriminator"] is False and "--non-lesion" in block["note"]
    assert json.loads((tiny_run / "ood.json").read_text())["dermoscopy_threshold"] is None
    det = LesionDetector.load(tiny_run)
    assert det is not None and det.dermoscopy is None and "each of the two distances" in result["threshold_rule"]


def test_detector_with_the_discriminator_saves_and_loads_and_older_files_still_load(tmp_path):
    from lesionlab.models.dermoscopy import DermoscopyDiscriminator, discriminator_inputs
    from lesionlab.models.detector import PixelDistance

    rng = np.random.default_rng(0)
    lesions, photos = rng.normal(size=(60, 8)), rng.normal(2, 1, size=(20, 8))
    stats = lambda n: rng.normal(size=(n, 12))
    det = LesionDetector.fit(lesions, lesions[:20], n_components=4)
    det.pixels = PixelDistance.fit(stats(60))
    det.pixels.threshold = 5.0
    s_les, s_ph = stats(60), stats(20)
    det.dermoscopy = DermoscopyDiscriminator.fit(
        discriminator_inputs(lesions, s_les), discriminator_inputs(photos, s_ph)
    )
    det.dermoscopy.threshold = float(det.dermoscopy.score(discriminator_inputs(lesions, s_les)).max())
    det.dermoscopy.negatives = ("/somewhere/photos",)
    det.save(tmp_path)
    back = LesionDetector.load(tmp_path)
    assert back is not None and back.dermoscopy is not None and back.dermoscopy.negatives == ("/somewhere/photos",)
    x, s = np.vstack([lesions[:5], photos[:5]]), np.vstack([s_les[:5], s_ph[:5]])
    np.testing.assert_allclose(back.score(x, stats=s), det.score(x, stats=s), rtol=1e-6)
    assert (det.parts(photos, stats=s_ph)["dermoscopy"] > det.threshold).mean() > 0.5
    assert not (det.parts(lesions, stats=s_les)["dermoscopy"] > det.threshold).any()  # its threshold is theirs
    meta = json.loads((tmp_path / "ood.json").read_text())
    for key in ("dermoscopy_threshold", "dermoscopy_intercept", "dermoscopy_negatives"):  # as saved before it
        del meta[key]
    (tmp_path / "ood.json").write_text(json.dumps(meta))
    old = LesionDetector.load(tmp_path)
    assert old is not None and old.dermoscopy is None
    det.dermoscopy = None
    np.testing.assert_allclose(old.score(x, stats=s), det.score(x, stats=s), rtol=1e-6)


def test_service_answers_not_a_lesion_for_a_clinical_photo(clinical_run):
    import io

    from fastapi.testclient import TestClient

    from lesionlab.serve import create_app

    buf = io.BytesIO()
    _held_out(clinical_run)[0].save(buf, "JPEG", quality=95)
    with TestClient(create_app(clinical_run, runtime="torch")) as c:
        for _ in range(600):
            if c.get("/health/ready").status_code == 200:
                break
            time.sleep(0.05)
        r = c.post("/v1/predict", files={"file": ("photo.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 422, r.text
    assert r.json()["label"] == "not_a_lesion" and "not a dermoscopic image" in r.json()["message"]


def test_ensemble_gives_the_members_clinical_photo_reason(clinical_run, tmp_path):
    from lesionlab.inference.ensemble import EnsemblePredictor

    member = TorchPredictor(clinical_run)
    ensemble = EnsemblePredictor(tmp_path, [member, member])
    photos = _held_out(clinical_run)
    alone = [p.reason or "" for p in member.analyze(photos)]
    together = ensemble.analyze(photos)
    assert all(p.refused for p in together)
    for a, p in zip(alone, together):
        assert (p.reason or "").startswith("not a dermoscopic image") == a.startswith("not a dermoscopic image")


def test_a_refit_without_photos_uses_the_folders_the_detector_was_fitted_with(clinical_run):
    """`lesionlab evaluate RUN` after `lesionlab refusal RUN --non-lesion DIR` keeps refusing clinical photos."""
    again = refusal.measure_refusal(clinical_run, progress=False, refit=True)
    assert again.detector is not None and again.detector.dermoscopy is not None
    before = json.loads((clinical_run / "refusal.json").read_text())["clinical_photos"]
    assert again.result["clinical_photos"]["held_out_files"] == before["held_out_files"]
