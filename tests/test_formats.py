"""Each adapter on a small real subset of the shared sets (symlinked, never copied) and on made-up CSVs."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from conftest import SHARED, make_subset
from lesionlab.data.dataset import load_dataset
from lesionlab.data.formats import FORMATS, ReadOptions, detect_format, read_source
from lesionlab.errors import DataError


def shared_set(name: str) -> Path:
    path = SHARED / "data" / name
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"../shared/data/{name} is missing on CI")
        pytest.skip(f"needs ../shared/data/{name}")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def link_images(src: Path, dst: Path, names: list[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        (dst / n).symlink_to(src / n)


def ham_subset(dst: Path, n: int = 12, skip_rows: int = 0) -> Path:
    """The first n metadata rows of ham10000 (a few malignant among them) and their images."""
    src = shared_set("ham10000")
    with (src / "HAM10000_metadata.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    body = [r for r in rows[1:] if r[2] in ("mel", "bcc")][:3] + [r for r in rows[1:] if r[2] == "nv"][: n - 3]
    write_csv(dst / "HAM10000_metadata.csv", header, body[skip_rows:])
    link_images(src / "images", dst / "images", [f"{r[1]}.jpg" for r in body])
    return dst


def isic2018_subset(dst: Path, n: int = 8) -> Path:
    src = shared_set("isic2018-task3-test")
    with (src / "ISIC2018_Task3_Test_GroundTruth.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    write_csv(dst / "ISIC2018_Task3_Test_GroundTruth.csv", rows[0], rows[1 : n + 1])
    link_images(src / "images", dst / "images", [f"{r[0]}.jpg" for r in rows[1 : n + 1]])
    return dst


def test_folder_adapter_keeps_todays_relpaths_and_fixes_the_split(shared_data, tmp_path):
    root = make_subset(shared_data, tmp_path / "kaggle", n_train=3, n_test=2)
    read = read_source(root, None, ReadOptions())
    assert read.format == "folder"
    ds = load_dataset(root)
    assert [s.relpath for s in read.samples] == [s.relpath for s in ds.all]
    assert {s.split for s in read.samples if s.relpath.startswith("test/")} == {"test"}
    assert read.samples[0].relpath == "train/benign/" + read.samples[0].path.name


def test_ham10000_adapter_reads_diagnosis_lesion_and_meta(tmp_path):
    root = ham_subset(tmp_path / "ham")
    read = read_source(root, None, ReadOptions())
    assert read.format == "ham10000" and len(read.samples) == 12 and read.global_ids
    s = read.samples[0]
    assert s.relpath.startswith("images/ISIC_") and s.diagnosis in ("mel", "bcc") and s.label == 1
    assert s.lesion_id and s.lesion_id.startswith("HAM_") and s.split is None
    assert {"age", "sex", "localization", "dx_type"} <= dict(s.meta).keys()
    assert {x.label for x in read.samples} == {0, 1}


def test_ham10000_images_in_the_official_part_folders(tmp_path):
    root = ham_subset(tmp_path / "ham", n=6)
    images = sorted((root / "images").iterdir())
    (root / "HAM10000_images_part_1").mkdir()
    (root / "HAM10000_images_part_2").mkdir()
    for k, p in enumerate(images):
        p.rename(root / f"HAM10000_images_part_{1 + k % 2}" / p.name)
    (root / "images").rmdir()
    read = read_source(root, "ham10000", ReadOptions())
    assert len(read.samples) == 6 and {s.relpath.split("/")[0] for s in read.samples} == {
        "HAM10000_images_part_1",
        "HAM10000_images_part_2",
    }


def test_listed_but_missing_and_unlisted_images_are_named_or_skipped(tmp_path):
    root = ham_subset(tmp_path / "ham", skip_rows=2)  # two images in images/ that the CSV does not list
    with pytest.raises(DataError, match=r"2 images not listed in HAM10000_metadata\.csv: images/ISIC_"):
        read_source(root, None, ReadOptions())
    read = read_source(root, None, ReadOptions(skip_unlisted=True))
    assert len(read.samples) == 10 and len(read.skipped) == 2 and "not listed" in read.skipped[0].reason
    gone = read.samples[-1].path
    gone.unlink()
    with pytest.raises(DataError, match=rf"1 images listed but missing: line \d+ \({gone.stem}\)"):
        read_source(root, None, ReadOptions(skip_unlisted=True))
    read = read_source(root, None, ReadOptions(skip_invalid=True))
    assert len(read.samples) == 9 and gone.stem in {s.item.split()[-1].strip("()") for s in read.skipped}


def test_isic2018_one_hot_ground_truth(tmp_path):
    root = isic2018_subset(tmp_path / "isic2018")
    read = read_source(root, None, ReadOptions())
    assert read.format == "isic2018" and len(read.samples) == 8
    assert {s.split for s in read.samples} == {"test"}  # the official test ground truth fixes test images
    assert all(s.diagnosis in DEFAULT_CODES for s in read.samples)


DEFAULT_CODES = {"mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "scc"}


def test_isic2019_unknown_rows_and_metadata_lesions(tmp_path):
    src = shared_set("isic2018-task3-test") / "images"
    root = tmp_path / "isic2019"
    names = sorted(p.name for p in src.iterdir())[:4]
    link_images(src, root / "ISIC_2019_Training_Input", names)
    ids = [n.removesuffix(".jpg") for n in names]
    cols = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    onehot = lambda k: ["1.0" if i == k else "0.0" for i in range(9)]
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", cols, [[i, *onehot(k)] for i, k in zip(ids, (0, 3, 7, 8))])
    write_csv(root / "ISIC_2019_Training_Metadata.csv", ["image", "lesion_id"], [[ids[0], "HAM_1"], [ids[1], "HAM_1"]])
    with pytest.raises(DataError, match=rf"1 rows of no class or UNK: line 5 \({ids[3]}\)"):
        read_source(root, None, ReadOptions())
    read = read_source(root, None, ReadOptions(allow_unknown=True))
    assert read.format == "isic2019"
    assert [s.diagnosis for s in read.samples] == ["mel", "akiec", "scc"] and [s.label for s in read.samples] == [1] * 3
    assert [s.lesion_id for s in read.samples] == ["HAM_1", "HAM_1", None] and read.samples[0].split is None
    assert [s.item for s in read.skipped] == [f"line 5 ({ids[3]})"]  # listed, so not also "unlisted"


def test_isic2020_label_from_target_and_unknown_diagnosis_left_unset(tmp_path):
    src = shared_set("isic2018-task3-test") / "images"
    root = tmp_path / "isic2020"
    names = sorted(p.name for p in src.iterdir())[:3]
    link_images(src, root / "jpeg" / "train", names)
    cols = (
        "image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target"
    )
    rows = [
        [names[0][:-4], "IP_1", "IL_1", "male", "45.0", "torso", "unknown", "benign", "0"],
        [names[1][:-4], "IP_1", "IL_2", "male", "45.0", "torso", "melanoma", "malignant", "1"],
        [names[2][:-4], "IP_2", "IL_3", "female", "60.0", "head/neck", "nevus", "benign", "0"],
    ]
    write_csv(root / "train.csv", cols.split(","), rows)
    read = read_source(root, None, ReadOptions())
    assert read.format == "isic2020"
    assert [(s.label, s.diagnosis, s.patient_id) for s in read.samples] == [
        (0, None, "IP_1"),
        (1, "mel", "IP_1"),
        (0, "nv", "IP_2"),
    ]
    rows[2][6] = "melanoma"  # disagrees with target 0
    write_csv(root / "train.csv", cols.split(","), rows)
    with pytest.raises(DataError, match=r"label disagrees with the diagnosis: line 4"):
        read_source(root, None, ReadOptions())


def test_ph2_is_a_generic_csv(tmp_path):
    src = shared_set("ph2")
    with (src / "PH2_labels.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    body = [r for r in rows[1:] if r[1] == "melanoma"][:2] + rows[1:4]
    root = tmp_path / "ph2"
    write_csv(root / "PH2_labels.csv", rows[0], body)
    write_csv(root / "manifest.csv", ["image", "bytes"], [[r[0], "1"] for r in body])  # provenance, not labels
    link_images(src / "images", root / "images", [Path(r[0]).name for r in body])
    read = read_source(root, None, ReadOptions())
    assert read.format == "csv" and [s.label for s in read.samples] == [1, 1, 0, 0, 0]
    assert read.samples[0].diagnosis == "mel" and read.samples[-1].diagnosis == "nv"


def make_csv_source(root: Path, header: list[str], rows: list[list[str]], n_images: int = 4) -> Path:
    src = shared_set("isic2018-task3-test") / "images"
    link_images(src, root / "img", [f"{p.name}" for p in sorted(src.iterdir())[:n_images]])
    return write_csv(root / "labels.csv", header, rows)


def img(root: Path, k: int) -> str:
    return "img/" + sorted((root / "img").iterdir())[k].name


def test_csv_columns_named_by_options_and_a_misspelt_one(tmp_path):
    root = tmp_path / "t"
    make_csv_source(root, ["file", "y", "pid"], [])
    write_csv(root / "labels.csv", ["file", "y", "pid"], [[img(root, k), str(k % 2), "p1"] for k in range(4)])
    options = ReadOptions(options={"image": "file", "label": "y", "patient": "pid"})
    read = read_source(root, "csv", options)
    assert [s.label for s in read.samples] == [0, 1, 0, 1] and {s.patient_id for s in read.samples} == {"p1"}
    bad = ReadOptions(options={"image": "file", "label": "lable"})
    with pytest.raises(DataError, match=r"no column 'lable'.*its columns are: file, y, pid"):
        read_source(root, "csv", bad)


def test_csv_unknown_diagnosis_duplicates_and_disagreement_name_rows(tmp_path):
    root = tmp_path / "t"
    make_csv_source(root, ["image"], [])
    rows = [
        [img(root, 0), "melanoma", "malignant"],
        [img(root, 1), "psoriasis", "benign"],
        [img(root, 2), "nevus", "malignant"],
        [img(root, 3), "nevus", "benign"],
        [img(root, 3), "nevus", "benign"],
    ]
    write_csv(root / "labels.csv", ["image", "diagnosis", "label"], rows)
    with pytest.raises(DataError) as e:
        read_source(root, None, ReadOptions())
    msg = str(e.value)
    assert "unknown diagnosis 'psoriasis'" in msg and "line 3" in msg and "Known diagnosis codes: akiec" in msg
    assert "disagrees with diagnosis nevus" in msg and "line 4" in msg
    assert "1 duplicate rows: line 6" in msg
    read = read_source(root, None, ReadOptions(skip_invalid=True))
    assert [s.relpath for s in read.samples] == [img(root, 0), img(root, 3)] and len(read.skipped) == 3


def test_csv_empty_split_is_an_error(tmp_path):
    root = tmp_path / "t"
    make_csv_source(root, ["image"], [])
    rows = [[img(root, k), "benign" if k else "malignant", "train"] for k in range(3)] + [[img(root, 3), "0", "test"]]
    write_csv(root / "labels.csv", ["image", "label", "split"], rows)
    with pytest.raises(DataError, match="gives split 'test' no malignant images"):
        read_source(root, None, ReadOptions())


def test_detection_and_the_error_listing_every_format(tmp_path, shared_data):
    (tmp_path / "empty").mkdir()
    write_csv(tmp_path / "empty" / "manifest.csv", ["image", "label"], [["a.jpg", "0"]])  # never a label file
    with pytest.raises(DataError) as e:
        detect_format(tmp_path / "empty")
    for name, fmt in FORMATS.items():
        assert f"{name}: {fmt.expects}" in str(e.value)
    both = ham_subset(tmp_path / "both")
    (both / "train").mkdir()
    (both / "test").mkdir()
    with pytest.raises(DataError, match=r"several formats \(folder, ham10000\); name one as <format>:"):
        detect_format(both)
    assert read_source(both, "ham10000", ReadOptions()).format == "ham10000"
    assert detect_format(shared_data).name == "folder"
    with pytest.raises(DataError, match="unknown data format 'ham'"):
        read_source(both, "ham", ReadOptions())


def test_csv_images_outside_the_source_folder_are_an_error_not_a_traceback(tmp_path):
    root = tmp_path / "t"
    make_csv_source(root, ["image"], [])
    write_csv(root / "labels.csv", ["image", "label"], [[img(root, k), str(k % 2)] for k in range(4)])
    with pytest.raises(DataError, match=r"images=\.\./elsewhere .* points outside the source folder"):
        read_source(root, "csv", ReadOptions(options={"images": "../elsewhere"}))
    write_csv(root / "labels.csv", ["image", "label"], [["../" + img(root, 0), "0"], [img(root, 1), "1"]])
    with pytest.raises(DataError, match="images outside the CSV's folder"):
        read_source(root, "csv", ReadOptions())
