from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionlab.data.dataset import load_dataset
from lesionlab.data.images import (
    BadImageError,
    decode_samples,
    open_image,
    resize_to_input,
)
from lesionlab.data.splits import split_train_val
from lesionlab.errors import DataError


def test_shared_dataset_layout(shared_data):
    ds = load_dataset(shared_data)
    assert (len(ds.train), len(ds.test)) == (2637, 660)
    assert sum(s.label for s in ds.train) == 1197  # malignant is the positive class
    assert ds.groups and len(ds.leaked) == 22
    splits = ds.splits(seed=0)
    assert len(splits["test_dedup"]) == 660 - 22
    assert not {s.relpath for s in splits["test_dedup"]} & ds.leaked


def test_validation_split_is_stratified_seeded_and_group_aware(shared_data):
    ds = load_dataset(shared_data)
    a = ds.splits(seed=0)
    b = ds.splits(seed=0)
    c = ds.splits(seed=1)
    assert [s.relpath for s in a["val"]] == [s.relpath for s in b["val"]]
    assert [s.relpath for s in a["val"]] != [s.relpath for s in c["val"]]
    n_val = len(a["val"])
    assert 0.17 < n_val / len(ds.train) < 0.23
    pos_rate = lambda xs: np.mean([s.label for s in xs])
    assert abs(pos_rate(a["val"]) - pos_rate(ds.train)) < 0.03
    val = {s.relpath for s in a["val"]}
    train = {s.relpath for s in a["train"]}
    assert not val & train and len(val | train) == len(ds.train)
    for g in set(ds.groups.values()):
        members = {r for r, gg in ds.groups.items() if gg == g and r.startswith("train/")}
        assert members <= val or members <= train, f"group {g} straddles train and validation"


def test_folds_partition_train_and_fold_zero_is_the_default_split(shared_data):
    ds = load_dataset(shared_data)
    vals = [[s.relpath for s in ds.splits(seed=0, fold=k)["val"]] for k in range(5)]
    assert vals[0] == [s.relpath for s in ds.splits(seed=0)["val"]]
    assert sum(map(len, vals)) == len(set().union(*map(set, vals))) == len(ds.train)  # disjoint, covering
    for k in (1, 4):
        groups: dict[int | None, set[str]] = {}
        for r in vals[k]:
            groups.setdefault(ds.groups.get(r), set()).add(r)
        for g, members in groups.items():
            if g is not None:
                assert {r for r, gg in ds.groups.items() if gg == g and r.startswith("train/")} == members
    with pytest.raises(DataError, match=r"fold must be in 0..4"):
        ds.splits(seed=0, fold=5)
    pair = ds.splits(seed=0, fold=1, also_fold=3)  # nested cross-fit: validate on two folds
    assert sorted(s.relpath for s in pair["val"]) == sorted(vals[1] + vals[3])
    assert {s.relpath for s in pair["train"]} == set().union(*map(set, vals)) - set(vals[1]) - set(vals[3])
    with pytest.raises(DataError, match="must differ"):
        ds.splits(seed=0, fold=2, also_fold=2)
    with pytest.raises(DataError, match=r"also-val-fold must be in 0\.\.4"):
        ds.splits(seed=0, fold=2, also_fold=7)


def test_split_without_groups_still_stratified():
    from lesionlab.data.sample import Sample

    samples = [Sample(f"train/x/{i}.jpg", Path("."), int(i % 3 == 0)) for i in range(100)]
    _, va = split_train_val(samples, {}, seed=3)
    assert len(va) == 20 and sum(s.label for s in va) in (6, 7)


def test_empty_folder_says_what_layout_was_expected(tmp_path):
    with pytest.raises(DataError, match=r"no 'train' folder.*Expected a folder laid out as train/"):
        load_dataset(tmp_path)


def test_missing_class_folder_is_named(tmp_path):
    (tmp_path / "train" / "benign").mkdir(parents=True)
    (tmp_path / "test" / "benign").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing class folder .*train/malignant"):
        load_dataset(tmp_path)


def test_custom_class_names(tmp_path):
    for split in ("train", "test"):
        for cls in ("nevus", "melanoma"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(d / "a.png")
    ds = load_dataset(tmp_path, ("nevus", "melanoma"))
    assert [s.label for s in ds.train] == [0, 1]


@pytest.mark.parametrize(
    "name,status,reason",
    [
        ("zero", 415, "empty file"),
        ("text", 415, "not an image"),
        ("tiny", 422, "too small"),
        ("huge", 413, "exceeds the cap"),
        ("truncated", 415, "truncated"),
    ],
)
def test_bad_images_raise_a_reason_naming_the_file(image_files, name, status, reason):
    with pytest.raises(BadImageError) as e:
        open_image(image_files[name])
    assert e.value.status == status
    assert reason in e.value.reason
    assert str(image_files[name]) in str(e.value)


def test_alpha_png_and_odd_sizes_are_accepted(image_files):
    img = open_image(image_files["alpha"])
    assert img.mode == "RGB" and img.size == (64, 64)
    arr = resize_to_input(open_image(image_files["good"]), 224)  # 200x300 -> shorter side, centre crop
    assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert open_image(path).size == (40, 60)


def test_bytes_input_and_decode_collects_bad(image_files, tmp_path):
    assert open_image(image_files["good"].read_bytes()).size == (200, 300)
    with pytest.raises(BadImageError, match="empty"):
        open_image(b"")
    from lesionlab.data.dataset import Sample

    samples = [Sample("good", image_files["good"], 0), Sample("text", image_files["text"], 1)]
    decoded = decode_samples(samples, 64, progress=False)
    assert [s.relpath for s in decoded.samples] == ["good"]
    assert [e.path for e in decoded.bad] == ["text"]


def test_default_folders_next_to_the_repository_are_found_from_anywhere(
    shared_data, shared_weights, tmp_path, monkeypatch
):
    """README: without --data, ../shared/data/isic-kaggle next to the working directory or the repository."""
    from lesionlab.data.dataset import default_data_dir
    from lesionlab.models.backbones import default_weights_dir

    repo = Path(__file__).resolve().parents[1]
    if shared_data.resolve() != (repo.parent / "shared" / "data" / "isic-kaggle").resolve():
        pytest.skip("the data folder is not next to this repository")
    monkeypatch.delenv("LESIONLAB_DATA", raising=False)
    monkeypatch.delenv("LESIONLAB_WEIGHTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing at tmp/../shared
    assert default_data_dir() == shared_data.resolve()
    assert default_weights_dir() == shared_weights.resolve()


def _resize_then_crop(img, size):
    """The straightforward reference: the whole image resized (shorter side to ``size``), then centre-cropped."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


@pytest.mark.parametrize(
    "w,h", [(300, 224), (224, 500), (1000, 333), (33, 90), (640, 480), (300, 1000), (500, 500), (224, 224)]
)
def test_resize_to_input_matches_resize_then_crop(shared_data, w, h):
    """Resampling only the crop's source region gives the old pixels on photos, within two grey levels."""
    for path in sorted((shared_data / "test" / "malignant").iterdir())[:3]:
        img = Image.open(path).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
        got, want = resize_to_input(img, 224).astype(int), _resize_then_crop(img, 224).astype(int)
        assert got.shape == (224, 224, 3)
        diff = np.abs(got - want)
        if w == h or 224 in (w, h):
            assert diff.max() == 0  # a plain resize, or a plain crop
        assert diff.max() <= 2 and diff.mean() < 0.05


@pytest.mark.parametrize("w,h", [(100_000, 32), (32, 100_000)])
def test_elongated_image_is_not_upsampled_whole(w, h):
    """A 100000x32 strip used to become ~700000x224 (~600 MB) before the crop."""
    import time

    img = Image.new("RGB", (w, h), (200, 100, 50))
    start = time.perf_counter()
    arr = resize_to_input(img, 224)
    assert time.perf_counter() - start < 0.5
    assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
    assert (arr == (200, 100, 50)).all()


def test_16_bit_greyscale_is_rescaled_not_clipped_to_white():
    import io

    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (64, 1))
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I;16")
    arr = np.asarray(open_image(buf.getvalue()))
    assert arr.shape == (64, 256, 3)
    assert arr.min() == 0 and arr.max() == 255 and abs(arr.mean() - 127.5) < 1
    assert (np.diff(arr[0, :, 0].astype(int)) >= 0).all()  # tracks the gradient


@pytest.mark.parametrize(
    "values,mode",
    [
        (np.linspace(0, 65535, 256), "I"),
        (np.linspace(0, 255, 256), "I"),
        (np.linspace(0, 1, 256), "F"),
        (np.linspace(0, 255, 256), "F"),
    ],
)
def test_32_bit_and_float_greyscale_are_rescaled(values, mode):
    from lesionlab.data.images import to_rgb

    arr = np.tile(values, (4, 1)).astype(np.int32 if mode == "I" else np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(arr, mode)))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, -1].tolist() == [255, 255, 255]
    assert abs(rgb.mean() - 127.5) < 1
