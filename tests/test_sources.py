"""Several sources in one table: prefixes, groups across sources, per-source counts and test splits."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import make_subset
from lesionlab.data.dataset import load_dataset
from lesionlab.data.sources import SourceSpec, load_external, load_sources, parse_spec
from lesionlab.errors import DataError
from test_formats import ham_subset, isic2018_subset, link_images, write_csv


@pytest.fixture
def kaggle(shared_data, tmp_path) -> Path:
    return make_subset(shared_data, tmp_path / "isic-kaggle", n_train=6, n_test=3)


def share_lesion(root: Path) -> tuple[str, str]:
    """Gives the first two HAM rows one lesion id; returns their image ids."""
    path = root / "HAM10000_metadata.csv"
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    rows[2][0] = rows[1][0]
    write_csv(path, rows[0], rows[1:])
    return rows[1][1], rows[2][1]


def test_one_folder_source_is_exactly_load_dataset(shared_data):
    ds, today = load_sources([shared_data]), load_dataset(shared_data)
    assert ds == today  # samples, relpaths, groups, leaked, sources
    assert ds.file_list_hash() == today.file_list_hash()
    assert list(ds.splits(seed=0)) == ["train", "val", "test", "test_dedup"]
    assert ds.sources[0].format == "folder" and ds.sources[0].counts()["test"] == {"benign": 360, "malignant": 300}


def test_kaggle_and_ham_in_one_table(kaggle, tmp_path):
    ham = ham_subset(tmp_path / "ham10000")
    a, b = share_lesion(ham)
    ds = load_sources([kaggle, ham])
    assert [i.name for i in ds.sources] == ["isic-kaggle", "ham10000"]
    assert all(s.relpath.startswith(f"{s.source}/") for s in ds.all)
    assert {s.relpath for s in ds.test} == {f"isic-kaggle/{s.relpath}" for s in load_dataset(kaggle).test}
    assert len(ds.train) == 12 + 12  # ham has no fixed split: all of it is training pool
    assert ds.groups[f"ham10000/images/{a}.jpg"] == ds.groups[f"ham10000/images/{b}.jpg"]
    assert ds.sources[1].counts() == {"pool": {"benign": 9, "malignant": 3}}
    assert ds.counts()["ham10000"] == {"train": {"benign": 9, "malignant": 3}}
    assert ds.counts()["isic-kaggle"]["test"] == {"benign": 3, "malignant": 3}
    splits = ds.splits(seed=0, val_fraction=0.25)
    assert set(splits) == {"train", "val", "test", "test_dedup", "test:isic-kaggle", "test_dedup:isic-kaggle"}
    assert splits["test:isic-kaggle"] == ds.test
    val = {s.relpath for s in splits["val"]}
    assert (f"ham10000/images/{a}.jpg" in val) == (f"ham10000/images/{b}.jpg" in val)  # one lesion, one side


def test_names_are_made_unique_and_specs_name_format_and_options(kaggle, tmp_path):
    other = make_subset(kaggle, tmp_path / "x" / "isic-kaggle", n_train=2, n_test=1)
    ds = load_sources([kaggle, f"folder:{other}"])
    assert [i.name for i in ds.sources] == ["isic-kaggle", "isic-kaggle-2"]
    spec = parse_spec("ham10000:/d/ham?name=h&ids=source&images=a,b")
    assert spec == SourceSpec(Path("/d/ham"), "ham10000", "h", {"ids": "source", "images": "a,b"})
    assert parse_spec("C:/data").format is None and parse_spec(Path("csv:x")).path == Path("csv:x")
    with pytest.raises(DataError, match="same source is given twice"):
        load_sources([kaggle, kaggle])


def test_identical_files_across_sources_are_linked_or_refused(kaggle, tmp_path):
    ham = ham_subset(tmp_path / "ham10000")
    # a CSV source holding a copy of two HAM images, one of them as a fixed test image
    names = sorted(p.name for p in (ham / "images").iterdir())[:4]
    link_images(ham / "images", tmp_path / "copy" / "img", names)
    rows = [[f"img/{n}", str(k % 2), "test" if k >= 2 else "train"] for k, n in enumerate(names)]
    write_csv(tmp_path / "copy" / "labels.csv", ["image", "label", "split"], rows)
    with pytest.raises(DataError, match=rf"2 fixed test images .*test image copy/img/{names[2]} = training image "):
        load_sources([ham, f"{tmp_path / 'copy'}?ids=source", kaggle])
    ds = load_sources([ham, tmp_path / "copy", kaggle], skip_invalid=True)
    assert f"ham10000/images/{names[2]}" not in {s.relpath for s in ds.all}
    assert any(k.item == f"ham10000/images/{names[2]}" and "identical" in k.reason for k in ds.skipped)
    assert ds.groups[f"ham10000/images/{names[0]}"] == ds.groups[f"copy/img/{names[0]}"]


def test_isic_ids_are_global_and_links_join_groups(kaggle, tmp_path):
    ham = ham_subset(tmp_path / "ham10000")
    test2018 = isic2018_subset(tmp_path / "isic2018")
    image = sorted((test2018 / "images").iterdir())[0].name
    (ham / "images" / image).symlink_to(test2018 / "images" / image)  # the same ISIC image id in both sets
    path = ham / "HAM10000_metadata.csv"
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    write_csv(path, rows[0], [*rows[1:], ["HAM_X", image[:-4], "nv", "histo", "50", "male", "back"]])
    with pytest.raises(DataError, match="duplicate links name 1 images not in the data"):
        load_sources([ham, test2018, kaggle], links=[(f"ham10000/images/{rows[1][1]}.jpg", "isic-kaggle/nope.jpg")])
    kaggle_train = "isic-kaggle/" + load_dataset(kaggle).train[0].relpath
    ham_rel = f"ham10000/images/{rows[1][1]}.jpg"
    ds = load_sources([ham, test2018, kaggle], links=[(ham_rel, kaggle_train)], skip_invalid=True)
    assert ds.groups[ham_rel] == ds.groups[kaggle_train]
    # the ISIC image in ham (training pool) and in the 2018 test set: identical bytes, so the pool copy is dropped
    assert f"ham10000/images/{image}" not in {s.relpath for s in ds.all}
    assert {"test:isic2018", "test:isic-kaggle"} <= set(ds.splits(seed=0, val_fraction=0.25))


def test_a_shared_lesion_leaks_a_test_image(kaggle, tmp_path):
    test2018 = isic2018_subset(tmp_path / "isic2018")
    ham = ham_subset(tmp_path / "ham10000")
    gt = test2018 / "ISIC2018_Task3_Test_GroundTruth.csv"
    first = sorted((test2018 / "images").iterdir())[0].stem
    write_csv(test2018 / "meta" / "x.csv", ["a"], [])  # unrelated files in subfolders are ignored
    # a second (different) photo of a HAM lesion in the test set, grouped through the metadata's lesion id
    write_csv(test2018 / "ISIC2018_Metadata.csv", ["image", "lesion_id"], [[first, ham_lesion(ham)]])
    ds = load_sources([ham, test2018], require_test=True)
    assert gt.exists() and f"isic2018/images/{first}.jpg" in ds.leaked
    assert len(ds.splits(seed=0, val_fraction=0.34)["test_dedup:isic2018"]) == 7


def ham_lesion(root: Path) -> str:
    with (root / "HAM10000_metadata.csv").open(newline="") as f:
        return next(csv.DictReader(f))["lesion_id"]


def test_no_fixed_test_split_and_an_empty_pool_are_errors(tmp_path):
    ham = ham_subset(tmp_path / "ham10000")
    with pytest.raises(DataError, match=r"no source fixes test images \(ham10000\)"):
        load_sources([ham])
    assert len(load_sources([ham], require_test=False).train) == 12
    with pytest.raises(DataError, match=r"training pool .* has no benign images"):
        load_sources([isic2018_subset(tmp_path / "isic2018")])


def test_external_set_is_scored_whole(kaggle, tmp_path):
    ext = load_external(kaggle)
    assert ext.train == [] and len(ext.test) == 18 and {s.split for s in ext.test} == {"train", "test"}
    assert ext.test[0].relpath == load_dataset(kaggle).train[0].relpath and ext.test[0].source == "isic-kaggle"
