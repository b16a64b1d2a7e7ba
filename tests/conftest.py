"""Shared fixtures: the real isic-kaggle images from ../shared, used in place (symlinked, never copied)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _shared_data() -> Path | None:
    env = os.environ.get("LESIONLAB_DATA")
    for c in ([Path(env)] if env else []) + [SHARED / "data" / "isic-kaggle"]:
        if (c / "train").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    found = _shared_data()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("../shared/data/isic-kaggle is missing on CI")
        pytest.skip("needs the isic-kaggle data (set LESIONLAB_DATA)")
    return found


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    w = SHARED / "weights"
    if not (w / "mobilenetv2_100.imagenet-coral.pth").exists():
        if os.environ.get("CI"):
            pytest.fail("../shared/weights is missing on CI")
        pytest.skip("needs ../shared/weights")
    return w


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Feature caches of tests go to a temp folder, never the user's ~/.cache; no hub lookups."""
    os.environ["LESIONLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["LESIONLAB_OFFLINE"] = "1"
    yield


def make_subset(src: Path, dst: Path, n_train: int = 30, n_test: int = 12) -> Path:
    """A small data folder of symlinks to the first files of each class (sorted, so it is repeatable)."""
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("benign", "malignant"):
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                (out / f.name).symlink_to(f)
    return dst


@pytest.fixture(scope="session")
def few_images(shared_data, tmp_path_factory) -> Path:
    """Five training and two test images per class: for tests that train a run and look at its loop, not its
    numbers."""
    return make_subset(shared_data, tmp_path_factory.mktemp("few"), n_train=5, n_test=2)


def make_ham_subset(dst: Path, per_diagnosis: dict[str, int]) -> Path:
    """A HAM10000 folder of the first ``n`` metadata rows of each diagnosis (in the dict's order): a trimmed
    HAM10000_metadata.csv beside symlinks to their images. Skips the test without ../shared/data/ham10000."""
    import csv

    src = SHARED / "data" / "ham10000"
    if not (src / "HAM10000_metadata.csv").exists():
        pytest.skip("needs ../shared/data/ham10000")
    rows = list(csv.DictReader((src / "HAM10000_metadata.csv").open()))
    pick = [r for dx, n in per_diagnosis.items() for r in [r for r in rows if r["dx"] == dx][:n]]
    (dst / "images").mkdir(parents=True)
    with (dst / "HAM10000_metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(pick)
    for r in pick:
        (dst / "images" / f"{r['image_id']}.jpg").symlink_to(src / "images" / f"{r['image_id']}.jpg")
    return dst


@pytest.fixture(scope="session")
def small_data(shared_data, tmp_path_factory) -> Path:
    return make_subset(shared_data, tmp_path_factory.mktemp("small-data"))


@pytest.fixture(scope="session")
def tiny_run(small_data, tmp_path_factory) -> Path:
    """A trained and evaluated frozen efficientnet_lite0 run on the small subset (real ImageNet weights)."""
    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.training.config import TrainConfig
    from lesionlab.training.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(epochs=3, lr=1e-3), small_data, out, progress=False)
    evaluate_run(out, n_resamples=200, progress=False)
    return out


@pytest.fixture(scope="session")
def onnx_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of tiny_run exported to ONNX (never modified by the tests that share it)."""
    import shutil

    from lesionlab.inference import export

    out = tmp_path_factory.getbasetemp() / "onnx-run"
    if not (out / "model.onnx").exists():
        shutil.copytree(tiny_run, out, dirs_exist_ok=True)
        export.export_run(out, log=lambda _: None)
    return out


@pytest.fixture
def image_files(tmp_path) -> dict[str, Path]:
    """Bad and odd inputs generated on the fly."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = {}
    files["zero"] = tmp_path / "zero.jpg"
    files["zero"].write_bytes(b"")
    files["text"] = tmp_path / "text.jpg"
    files["text"].write_text("this is not an image\n")
    rgba = Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA")
    files["alpha"] = tmp_path / "alpha.png"
    rgba.save(files["alpha"])
    files["tiny"] = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 100, 50)).save(files["tiny"])
    files["huge"] = tmp_path / "huge.png"
    Image.new("L", (10000, 10000), 0).save(files["huge"], optimize=True)  # small file, 100 MP
    good = Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8), "RGB")
    files["good"] = tmp_path / "good.jpg"
    good.save(files["good"], quality=90)
    data = files["good"].read_bytes()
    files["truncated"] = tmp_path / "truncated.jpg"
    files["truncated"].write_bytes(data[: len(data) // 2])
    return files


def killed_after_epoch_2(monkeypatch):
    """The next training run dies (KeyboardInterrupt) while writing the history of its second epoch; returns the
    real ``RunFolder.write_history`` to put back."""
    from lesionlab.runs import RunFolder

    real = RunFolder.write_history

    def dies(run, rows, fields):
        if len(rows) == 2:
            raise KeyboardInterrupt
        real(run, rows, fields)

    monkeypatch.setattr(RunFolder, "write_history", dies)
    return real


def modules_imported(code: str, names: set[str]) -> list[str]:
    """Which of ``names`` are in sys.modules after ``code`` runs in a fresh interpreter (what an import costs a
    command's or a server's start), sorted."""
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted({sorted(names)!r} & sys.modules.keys())))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(res.stdout)
