"""Preprocessing options: Shades of Gray colour constancy and squash vs crop resizing, recorded by training and
applied identically by frozen features, finetune inputs, evaluation, the predictors (PyTorch, ONNX, ensembles) and
Grad-CAM."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.dataset import load_dataset
from lesionlab.data.images import (
    RESIZE_CROP,
    RESIZE_SQUASH,
    color_constancy,
    open_image,
    resize_to_input,
    shades_of_gray,
)
from lesionlab.models.backbones import ResolvedWeights

P = 6


def _illuminant(image: np.ndarray) -> np.ndarray:
    """Shades of Gray's estimate of each channel's illuminant, in float64: (mean of I^p)^(1/p), I in [0, 1]."""
    x = image.reshape(-1, 3).astype(np.float64) / 255
    return np.mean(x**P, axis=0) ** (1 / P)


def _cast(image: np.ndarray, rgb=(1.0, 0.75, 0.5)) -> np.ndarray:
    """The image under a warm light: each channel scaled (and rounded), as a yellowish lamp would."""
    return np.clip(np.rint(image.astype(np.float64) * np.array(rgb)), 0, 255).astype(np.uint8)


def _texture(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A grey-ish textured uint8 image that nothing clips: a lesion-like blob on skin-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2))
    base = 170 - 90 * blob[..., None] + rng.normal(0, 12, (h, w, 3))
    return np.clip(np.rint(base * np.array([1.0, 0.85, 0.8])), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ Shades of Gray


def test_shades_of_gray_makes_the_illuminant_grey_and_keeps_brightness():
    cast = _cast(_texture())
    e = _illuminant(cast)
    assert e.max() / e.min() > 1.5  # a strong cast
    out = shades_of_gray(cast)
    assert out.dtype == np.uint8 and out.shape == cast.shape
    e_out = _illuminant(out)
    assert e_out.max() / e_out.min() < 1.01  # equal channel illuminants
    assert abs(e_out.mean() - e.mean()) < 0.01  # the mean estimate (brightness) kept


def test_shades_of_gray_is_idempotent_batched_and_leaves_grey_alone():
    images = np.stack([_cast(_texture(seed=s), rgb) for s, rgb in enumerate([(1, 0.7, 0.5), (0.6, 0.9, 1.0)])])
    once = shades_of_gray(images)
    twice = shades_of_gray(once)
    assert np.abs(twice.astype(int) - once).max() <= 2  # within a grey level or two
    # two differently cast copies of one scene: the same image once corrected, up to brightness (which is kept)
    a, b = (shades_of_gray(_cast(_texture(), rgb)).astype(float) for rgb in [(1, 0.7, 0.5), (0.6, 0.9, 1.0)])
    assert np.abs(a / a.mean() - b / b.mean()).mean() < 0.02
    np.testing.assert_array_equal(once[1], shades_of_gray(images[1]))  # per image: batching changes nothing
    grey = np.full((16, 16, 3), 117, np.uint8)
    np.testing.assert_array_equal(shades_of_gray(grey), grey)
    np.testing.assert_array_equal(shades_of_gray(np.zeros((8, 8, 3), np.uint8)), 0)  # black stays black
    assert shades_of_gray(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 8, 8, 3)
    # flips and rotations get the same correction, so TTA views commute with it
    np.testing.assert_array_equal(shades_of_gray(np.rot90(images, 1, (1, 2))), np.rot90(once, 1, (1, 2)))


def test_shades_of_gray_matches_the_float_formula():
    """The table-based implementation is the textbook per-pixel formula, rounded."""
    x = np.random.default_rng(1).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    f = x.astype(np.float64) / 255
    e = np.mean(f.reshape(3, -1, 3) ** P, axis=1) ** (1 / P)
    want = np.clip(np.rint(f * (e.mean(1, keepdims=True) / e)[:, None, None, :] * 255), 0, 255)
    assert np.abs(shades_of_gray(x).astype(int) - want).max() <= 1
    assert color_constancy(x, "none") is x
    with pytest.raises(ValueError, match="color_constancy"):
        color_constancy(x, "retinex")


# ------------------------------------------------------------------ resize modes


def test_squash_keeps_the_whole_image_and_crop_is_unchanged():
    a = np.zeros((200, 400, 3), np.uint8)
    a[:, :100] = (255, 0, 0)  # a red band on the left quarter: the centre crop cuts it off, a squash keeps it
    a[:, 100:] = (0, 0, 255)
    img = Image.fromarray(a)
    crop, squash = resize_to_input(img, 64), resize_to_input(img, 64, RESIZE_SQUASH)
    assert crop.shape == squash.shape == (64, 64, 3) and crop.dtype == squash.dtype == np.uint8
    assert squash[:, 2, 0].min() > 200 and crop[:, 2, 0].max() < 50
    np.testing.assert_array_equal(squash, np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC)))
    np.testing.assert_array_equal(resize_to_input(img, 64, "squash"), squash)  # TrainConfig's word too
    # crop: the default, the recorded name and TrainConfig's word give the same pixels as before
    np.testing.assert_array_equal(resize_to_input(img, 64, RESIZE_CROP), crop)
    np.testing.assert_array_equal(resize_to_input(img, 64, "crop"), crop)
    w, h = img.size  # crop as it always was: the shorter side to 64 (bicubic, only the box), a centre crop
    nw = round(w * 64 / h)
    left = (nw - 64) // 2
    box = (left * w / nw, 0, (left + 64) * w / nw, h)
    want = img.resize((64, 64), Image.Resampling.BICUBIC, box=box, reducing_gap=None)
    np.testing.assert_array_equal(crop, np.asarray(want))
    square = Image.fromarray(a[:, :200])
    np.testing.assert_array_equal(resize_to_input(square, 64), resize_to_input(square, 64, RESIZE_SQUASH))
    with pytest.raises(ValueError, match="resize"):
        resize_to_input(img, 64, "letterbox")


def test_preprocessing_record_applies_its_steps(small_data):
    pre = rf.Preprocessing(64, (0.5,) * 3, (0.5,) * 3, resize=RESIZE_SQUASH, color_constancy="shades-of-gray")
    samples = load_dataset(small_data).all[:3]
    decoded = pre.decode(samples, progress=False)
    first = open_image(samples[0].path)
    np.testing.assert_array_equal(decoded.images[0], resize_to_input(first, 64, RESIZE_SQUASH))
    np.testing.assert_array_equal(pre.corrected(decoded.images), shades_of_gray(decoded.images))
    x = pre.network_input(decoded.images)
    assert x.shape == (3, 3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x, (shades_of_gray(decoded.images).transpose(0, 3, 1, 2) / 255 - 0.5) / 0.5, atol=1e-6)


# ------------------------------------------------------------------ training records and caches


def _weights() -> ResolvedWeights:
    return ResolvedWeights("efficientnet_lite0", "file", True, "ab" * 32, (0.5,) * 3, (0.5,) * 3, 64)


def test_feature_cache_key_names_both_settings_and_keeps_old_entries(small_data):
    from lesionlab.training.features import cache_key

    w, ds = _weights(), load_dataset(small_data)
    keys = {cache_key(w, ds, r, c) for r in ("crop", "squash") for c in ("none", "shades-of-gray")}
    assert len(keys) == 4  # caches never mix
    assert cache_key(w, ds) == cache_key(w, ds, RESIZE_CROP, "none")
    old_pre = {  # the key before either setting existed: its entries stay valid for crop + none
        "input_size": 64,
        "resize": RESIZE_CROP,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "channels": "RGB",
        "layout": "NCHW",
        "scale": "1/255",
    }
    blob = {"v": 1, "backbone": w.backbone, "sha256": w.sha256, "pre": old_pre, "files": ds.file_list_hash()}
    assert cache_key(w, ds) == hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def test_finetune_inputs_are_resized_and_corrected_before_augmentation(small_data):
    from lesionlab.training.inputs import read_inputs

    ds = load_dataset(small_data)
    inputs = read_inputs(ds, _weights(), "finetune", 0, False, False, "squash", "shades-of-gray")
    i = inputs.relpaths.index(ds.all[0].relpath)
    raw = resize_to_input(open_image(ds.all[0].path), 64, RESIZE_SQUASH)
    assert inputs.cache is not None
    np.testing.assert_array_equal(inputs.cache.read(inputs.arrays[i : i + 1])[0], shades_of_gray(raw))
    plain = read_inputs(ds, _weights(), "finetune", 0, False, False)
    assert plain.cache is not None
    np.testing.assert_array_equal(
        plain.cache.read(plain.arrays[i : i + 1])[0], resize_to_input(open_image(ds.all[0].path), 64)
    )


# ------------------------------------------------------------------ a run trained with both, end to end


@pytest.fixture(scope="module")
def cc_run(shared_data, tmp_path_factory) -> Path:
    """A frozen efficientnet_lite0 run with colour constancy and squash on 32 images at 4:3 (the real lesions
    stretched back to their originals' aspect, in a temp folder): trained, given an operating point (as evaluation
    would write it; evaluation itself is too slow for here) and exported."""
    from lesionlab.inference.export import export_run
    from lesionlab.training.config import TrainConfig
    from lesionlab.training.loop import train

    data = tmp_path_factory.mktemp("cc-data")
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("benign", "malignant"):
            (data / split / cls).mkdir(parents=True)
            for f in sorted((shared_data / split / cls).iterdir())[:n]:
                open_image(f).resize((300, 224), Image.Resampling.BICUBIC).save(data / split / cls / f"{f.stem}.png")
    out = tmp_path_factory.mktemp("runs") / "cc-squash"
    train(TrainConfig(epochs=2, color_constancy="shades-of-gray", resize="squash"), data, out, progress=False)
    rf.RunFolder(out).write_operating_point(rf.OperatingPoint("cc-squash", 0.4, "fixed:0.4", temperature=1.5))
    export_run(out, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def cc_torch(cc_run):
    from lesionlab.inference.predictor import TorchPredictor

    return TorchPredictor(cc_run)


def _non_square(small_data: Path, n: int = 3) -> list[Image.Image]:
    """Real lesions at 4:3 (as the originals were), with a warm cast."""
    paths = sorted((small_data / "test" / "malignant").iterdir())[:n]
    return [Image.fromarray(_cast(np.asarray(open_image(p).resize((300, 224))))) for p in paths]


def test_run_records_both_settings_in_config_and_preprocess(cc_run):
    run = rf.RunFolder(cc_run)
    pre = run.config.preprocessing
    assert (pre.resize, pre.color_constancy) == (RESIZE_SQUASH, "shades-of-gray")
    assert (run.config.train["resize"], run.config.train["color_constancy"]) == ("squash", "shades-of-gray")
    spec = files.read_json(cc_run / rf.PREPROCESS)
    assert spec["resize"] == RESIZE_SQUASH and spec["color_constancy"] == "shades-of-gray"
    assert rf.Preprocessing.from_dict(spec) == pre


def test_torch_and_onnx_agree_and_read_the_settings(cc_run, cc_torch, small_data):
    from lesionlab.inference.export import PARITY_TOLERANCE
    from lesionlab.inference.predictor import OnnxPredictor

    torch_p, onnx_p = cc_torch, OnnxPredictor(cc_run)
    for info in (torch_p.info, onnx_p.info):
        assert (info.resize, info.color_constancy) == (RESIZE_SQUASH, "shades-of-gray")
        assert info.preprocessing[0]["resize"] == RESIZE_SQUASH
        assert info.preprocessing[0]["color_constancy"] == "shades-of-gray"
    images = _non_square(small_data)
    assert np.max(np.abs(torch_p.predict_proba(images) - onnx_p.predict_proba(images))) <= PARITY_TOLERANCE
    tta = images[:1]
    assert np.max(np.abs(torch_p.predict_proba(tta, tta=True) - onnx_p.predict_proba(tta, tta=True))) <= 1e-4
    np.testing.assert_array_equal(torch_p.prepare(images)[0], resize_to_input(images[0], 224, RESIZE_SQUASH))


def test_predictor_applies_colour_constancy(cc_torch, small_data):
    p, without = cc_torch, copy.copy(cc_torch)
    without.info = dataclasses.replace(p.info, color_constancy="none")  # the same network, without the correction
    images = _non_square(small_data)
    assert np.max(np.abs(p.predict_logits(images) - without.predict_logits(images))) > 1e-3
    # what the predictor computes is the network on shades_of_gray(squash(image))
    corrected = shades_of_gray(np.stack([resize_to_input(im, 224, RESIZE_SQUASH) for im in images]))
    np.testing.assert_allclose(p.predict_logits(images), without.predict_logits(corrected), atol=1e-5)


def test_frozen_features_equal_the_predictors(cc_run, cc_torch):
    """Training's cached features (and so evaluation's frozen scores) are the predictor's, image for image; the
    lesion detector's pixel statistics at fit time are those of the predictor's uncorrected input."""
    from lesionlab.models.classifier import load_model
    from lesionlab.refusal.measure import _run_weights
    from lesionlab.training.features import cache_dir, load_or_compute

    run = rf.RunFolder(cc_run)
    ds = load_dataset(run.config.data_root)
    model, _ = load_model(cc_run / rf.MODEL)
    pre = run.config.preprocessing
    cached = sorted((cache_dir() / "features").iterdir())
    table = load_or_compute(
        ds,
        _run_weights(run),
        skip_bad=True,
        progress=False,
        backbone=model.backbone,
        resize=pre.resize,
        color_constancy=pre.color_constancy,
    )
    assert sorted((cache_dir() / "features").iterdir()) == cached  # training's entry: the same key
    picked = ds.all[:3]
    x, _ = table.rows(picked)
    predictor = cc_torch
    from_files = predictor.forward_uint8(pre.decode(picked, progress=False).images)[1]
    from_images = predictor.forward_uint8(predictor.prepare([open_image(s.path) for s in picked]))[1]
    np.testing.assert_allclose(from_files, x, atol=1e-4)
    np.testing.assert_allclose(from_images, x, atol=1e-4)
    from lesionlab.models.detector import image_statistics
    from lesionlab.refusal.measure import pixel_statistics

    stats = pixel_statistics(ds, pre.input_size, progress=False, resize=pre.resize)
    want = image_statistics(predictor.prepare([open_image(s.path) for s in picked]))
    np.testing.assert_allclose(np.stack([stats[s.relpath] for s in picked]), want, rtol=1e-6)
    cropped = pixel_statistics(ds, pre.input_size, progress=False)  # a cache entry of its own
    assert not np.allclose(cropped[picked[0].relpath], stats[picked[0].relpath])


def test_mixed_ensemble_keeps_each_members_preprocessing(cc_run, cc_torch, small_data):
    from scipy.special import expit

    from lesionlab.inference.ensemble import EnsemblePredictor, mean_probability_logit
    from lesionlab.inference.loading import load_predictor

    members = [cc_torch, load_predictor(None, "torch")]  # with colour constancy and squash, and the bundled model
    ens = EnsemblePredictor(cc_run, members)  # the folder only lends its operating point
    assert not ens.info.uniform_preprocessing and ens.info.color_constancy == "mixed"
    assert [d["color_constancy"] for d in ens.info.preprocessing] == ["shades-of-gray", "none"]
    assert [d["resize"] for d in ens.info.preprocessing] == [RESIZE_SQUASH, RESIZE_CROP]
    images = _non_square(small_data, 2)
    want = mean_probability_logit([expit(m.predict_logits(images, False) / m.info.temperature) for m in members])
    np.testing.assert_allclose(ens.predict_logits(images, False), want, atol=1e-9)
    assert len(ens.analyze(images)) == 2


def test_gradcam_draws_on_the_corrected_input(cc_run, cc_torch, small_data):
    import torch

    from lesionlab.data.images import normalize
    from lesionlab.inference.explain import Explainer, gradcam

    image = _non_square(small_data, 1)[0]
    explainer = Explainer(cc_run, cc_torch)
    arr, heatmap = explainer._draw(image, "malignant")
    np.testing.assert_array_equal(arr, resize_to_input(image, 224, RESIZE_SQUASH))  # the photo, uncorrected
    model, info = explainer.network.model, explainer.network.info
    corrected = torch.from_numpy(normalize(shades_of_gray(arr)[None], info.mean, info.std))
    np.testing.assert_allclose(heatmap, gradcam(model, corrected, "malignant")[0], atol=1e-5)
    assert explainer.overlay_png(image, "malignant")[:8] == b"\x89PNG\r\n\x1a\n"
