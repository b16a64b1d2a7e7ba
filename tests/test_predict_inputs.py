"""``lesionlab predict`` on what users point it at: files, folders (recursively), globs, dataset folders; --csv."""

from __future__ import annotations

import csv
import shutil

import pytest
from typer.testing import CliRunner

from conftest import SHARED
from lesionlab.cli import app
from lesionlab.data.inputs import expand_inputs
from lesionlab.errors import DataError


@pytest.fixture
def site(shared_data, tmp_path):
    """A site's folder: images in nested folders, a non-image file, and an unreadable 'image'."""
    files = (
        sorted((shared_data / "test" / "benign").iterdir())[:3]
        + sorted((shared_data / "test" / "malignant").iterdir())[:2]
    )
    (tmp_path / "site" / "a" / "b").mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copy(f, tmp_path / "site" / ("a/b" if i % 2 else "a") / f"img{i}.jpg")
    (tmp_path / "site" / "notes.txt").write_text("not an image")
    (tmp_path / "site" / "a" / "broken.png").write_bytes(b"\x89PNG broken")
    return tmp_path / "site"


def test_folders_are_read_recursively_and_globs_expand(site):
    found = expand_inputs([site])
    assert len(found) == 6 and all(p.suffix in (".jpg", ".png") for p in found)  # notes.txt is not an image
    assert expand_inputs([str(site / "**" / "*.jpg")]) == sorted(site.rglob("*.jpg"))
    assert expand_inputs([site / "a" / "img0.jpg", site / "a" / "img0.jpg"]) == [site / "a" / "img0.jpg"]
    with pytest.raises(DataError, match="no image found"):
        expand_inputs([str(site / "*.bmp")])


def test_a_dataset_folder_is_read_as_its_format_lists_it():
    ph2 = SHARED / "data" / "ph2"
    if not (ph2 / "PH2_labels.csv").exists():
        pytest.skip("needs ../shared/data/ph2")
    found = expand_inputs([ph2])
    assert len(found) == 200 and all(p.parent.name == "images" for p in found)


def test_predict_a_folder_writes_one_csv_row_per_image(site, tmp_path):
    out = tmp_path / "out.csv"
    res = CliRunner().invoke(app, ["predict", str(site), "--csv", str(out), "--quiet", "--batch-size", "2"])
    assert res.exit_code == 1, res.output  # the broken file is an error, reported, not dropped
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert broken and broken[0]["error"] and not broken[0]["label"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 5 and {r["label"] for r in good} <= {"benign", "malignant", "not_a_lesion"}
    assert all(0 <= float(r["probability"]) <= 1 and float(r["threshold"]) > 0 for r in good)
    assert "6 images" in res.output and "Screening aid only" in res.output
