"""Fine-tuning's data pipeline: the on-disk image cache and the seeded, streamed DataLoader."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lesionlab.data.dataset import load_dataset
from lesionlab.data.image_cache import ImageCache, ImageSpec
from lesionlab.data.images import open_image, resize_to_input, shades_of_gray
from lesionlab.training.config import TrainConfig
from lesionlab.training.features import BadDataError
from lesionlab.training.loop import train
from lesionlab.training.stream import EpochBatches, epoch_order, image_seed
from test_train import assert_same_run


@pytest.fixture
def copied_images(shared_data, tmp_path):
    """Real files (copies, in a temp folder), so that a test may change one."""
    src = sorted((shared_data / "train" / "benign").iterdir())[:4]
    out = tmp_path / "data" / "train" / "benign"
    out.mkdir(parents=True)
    for f in src:
        shutil.copy(f, out / f.name)
    return tmp_path / "data", src


def _count_decoding(monkeypatch) -> list[str]:
    """The relpaths ImageSpec.make decodes from now on (in this process), in order."""
    decoded: list[str] = []
    real = ImageSpec.make

    def counting(spec: ImageSpec, sample):
        decoded.append(sample.relpath)
        return real(spec, sample)

    monkeypatch.setattr(ImageSpec, "make", counting)
    return decoded


def _samples(folder):
    from lesionlab.data.sample import Sample

    return [Sample(str(p.relative_to(folder)), p, 0) for p in sorted(folder.rglob("*.jpg"))]


def test_the_cache_decodes_once_and_a_changed_file_again(copied_images, tmp_path, monkeypatch):
    folder, originals = copied_images
    samples = _samples(folder)
    cache = ImageCache(ImageSpec(64, "crop", "shades-of-gray"), tmp_path / "cache")
    decoded = _count_decoding(monkeypatch)

    slots = cache.slots(samples)
    assert cache.fill(samples, slots, progress=False) == [] and len(decoded) == 4
    want = shades_of_gray(resize_to_input(open_image(samples[0].path), 64))
    np.testing.assert_array_equal(cache.read(slots[:1])[0], want)

    again = ImageCache(ImageSpec(64, "crop", "shades-of-gray"), tmp_path / "cache")  # a later run
    assert np.array_equal(again.slots(samples), slots)
    assert again.fill(samples, slots, progress=False) == [] and len(decoded) == 4  # nothing decoded

    shutil.copy(originals[3], samples[0].path)  # the file changes: another image under the same name
    decoded.clear()
    assert np.array_equal(again.slots(samples), slots)  # same slot, emptied
    again.fill(samples, slots, progress=False)
    assert decoded == [samples[0].relpath]
    np.testing.assert_array_equal(again.read(slots[:1])[0], again.read(slots[3:4])[0])

    other = ImageCache(ImageSpec(64, "squash", "none"), tmp_path / "cache")  # other preprocessing, other entries
    assert other.dir != cache.dir and len(other.missing(other.slots(samples))) == 4


def test_unreadable_files_are_reported_not_cached(copied_images, tmp_path):
    folder, _ = copied_images
    (folder / "train" / "benign" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    samples = _samples(folder)
    cache = ImageCache(ImageSpec(64), tmp_path / "cache")
    slots = cache.slots(samples)
    bad = cache.fill(samples, slots, workers=1, progress=False)  # in a worker process: the reason comes back
    assert [(e.path, e.status) for e in bad] == [("train/benign/broken.jpg", 415)]
    assert len(cache.missing(slots)) == 1 and cache.decoded() == 4


def test_epoch_batches_split_each_global_batch_between_ranks():
    single = [b for b in EpochBatches(10, 4, seed=3)]
    assert [len(b) for b in single] == [4, 4, 2]
    assert [i for b in single for _, i in b] == epoch_order(10, 3, 1).tolist()  # the loop's seeded order
    for world in (2, 3):
        shares = [list(EpochBatches(10, 4, seed=3, rank=r, world=world)) for r in range(world)]
        assert all(len(s) == len(single) for s in shares)  # every rank steps as often (some shares empty)
        for k, batch in enumerate(single):
            assert sorted(i for s in shares for _, i in s[k]) == sorted(i for _, i in batch)
    sampler = EpochBatches(10, 4, seed=3)
    sampler.set_epoch(2)
    assert [i for b in sampler for _, i in b] != [i for b in single for _, i in b]
    assert image_seed(0, 1, 5) != image_seed(0, 1, 6) != image_seed(0, 2, 5)


def test_a_finetune_run_decodes_each_image_once_and_repeats_whatever_the_workers_or_checkpointing(
    few_images, shared_weights, tmp_path, monkeypatch
):
    cfg = TrainConfig(backbone="mobilenetv2", mode="finetune", epochs=2, batch_size=4, precision="fp32", input_size=64)
    decoded = _count_decoding(monkeypatch)
    monkeypatch.setenv("LESIONLAB_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(weights_dir=shared_weights, progress=False)
    a = train(TrainConfig(**{**vars(cfg), "data_workers": 0}), few_images, tmp_path / "w0", **kw)
    n = len(load_dataset(few_images).all)
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == n  # once each, over both epochs
    b = train(TrainConfig(**{**vars(cfg), "data_workers": 1}), few_images, tmp_path / "w1", **kw)
    assert len(decoded) == n  # the second run decodes nothing
    assert_same_run(a, b)  # each image's augmentation is seeded by (seed, epoch, index), not by the worker
    checkpointing = TrainConfig(**{**vars(cfg), "data_workers": 0, "grad_checkpointing": True})
    c = train(checkpointing, few_images, tmp_path / "gc", **kw)
    assert_same_run(a, c)  # recomputing the blocks' activations gives the very same gradients (BatchNorm is frozen)
    import json

    compute = json.loads((b / "config.json").read_text())["compute"]
    assert compute["data_workers"] == 1 and 0 <= compute["data_wait_fraction"] <= 1
    assert json.loads((b / "config.json").read_text())["preprocessing"]["input_size"] == 64


def test_input_size_reaches_predict(few_images, shared_weights, tmp_path):
    from lesionlab.evaluation.evaluate import evaluate_run
    from lesionlab.inference.predictor import TorchPredictor

    cfg = TrainConfig(backbone="mobilenetv2", mode="finetune", epochs=1, batch_size=4, input_size=96, data_workers=0)
    out = train(cfg, few_images, tmp_path / "run", weights_dir=shared_weights, progress=False)
    evaluate_run(out, n_resamples=20, progress=False)  # fits the operating point predict needs
    predictor = TorchPredictor(out)
    assert predictor.info.input_size == 96
    image = open_image(next((few_images / "test" / "benign").iterdir()))
    assert 0 <= predictor.analyze([image])[0].probability <= 1
    assert predictor.prepare([image]).shape == (1, 96, 96, 3)
    with pytest.raises(ValueError, match="input_size"):
        TrainConfig(input_size=8)


def test_grad_checkpointing_is_refused_where_it_cannot_work():
    from lesionlab.models.backbones import _create
    from lesionlab.models.classifier import CheckpointingError, set_grad_checkpointing
    from lesionlab.models.registry import REGISTRY

    with pytest.raises(ValueError, match="only with mode finetune"):
        TrainConfig(mode="frozen", grad_checkpointing=True)
    with pytest.raises(ValueError, match="vgg16 does not support grad_checkpointing"):
        TrainConfig(backbone="vgg16", mode="finetune", grad_checkpointing=True)
    with pytest.raises(CheckpointingError, match="VGG"):  # the spec's flag says what timm does
        set_grad_checkpointing(_create(REGISTRY["vgg16"]))


def test_bad_files_stop_a_finetune_run_unless_skipped(few_images, shared_weights, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(few_images, data, symlinks=True)
    (data / "train" / "benign" / "zz-broken.jpg").write_bytes(b"not an image")
    cfg = TrainConfig(backbone="mobilenetv2", mode="finetune", epochs=1, batch_size=4, input_size=64, data_workers=0)
    with pytest.raises(BadDataError, match=r"zz-broken\.jpg"):
        train(cfg, data, tmp_path / "a", weights_dir=shared_weights, progress=False)
    out = train(cfg, data, tmp_path / "b", weights_dir=shared_weights, progress=False, skip_bad=True)
    assert "zz-broken.jpg" in (out / "skipped_files.txt").read_text()
    assert torch.load(out / "model.pt", weights_only=False) is not None


def test_validation_batches_hold_a_bounded_number_of_pixels(monkeypatch):
    """64 images of 224 px a batch, as many pixels at other sizes, half with gradient checkpointing; read from the
    cache four batches at a time."""
    from lesionlab.models.backbones import ResolvedWeights
    from lesionlab.training import sources

    calls: list[tuple[int, int]] = []

    def fake_outputs(module, images, mean, std, batch_size):
        calls.append((len(images), batch_size))
        return np.zeros(len(images), np.float32), None

    class FakeCache:
        def read(self, slots):
            return np.zeros((len(slots), 1, 1, 3), np.uint8)

    monkeypatch.setattr(sources, "model_outputs", fake_outputs)
    for size, pixels, batch in ((224, sources.VALIDATION_PIXELS, 64), (384, sources.VALIDATION_PIXELS, 22),
                                (384, sources.VALIDATION_PIXELS // 2, 11)):  # fmt: skip
        calls.clear()
        weights = ResolvedWeights("mobilenetv2", "test", True, "", (0.5,) * 3, (0.5,) * 3, size)
        logits, _ = sources.cached_outputs(None, FakeCache(), np.arange(300), weights, pixels)  # type: ignore[arg-type]
        assert len(logits) == 300 and {b for _, b in calls} == {batch}
        assert [n for n, _ in calls] == [min(4 * batch, 300 - i) for i in range(0, 300, 4 * batch)]
