"""Test-time BatchNorm adaptation: a copy with the site's statistics, the original untouched, the prior's mix, and
a clear refusal for a backbone whose BatchNorm was folded into its convolutions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lesionlab.data.dataset import load_dataset
from lesionlab.errors import LesionlabError
from lesionlab.inference.adapt import AdaptError, adapt_batchnorm, batchnorm_layers
from lesionlab.models.backbones import resolve_weights
from lesionlab.models.classifier import LesionClassifier, build_model
from lesionlab.runs import Preprocessing

# the networks are fully convolutional: 96 px inputs test the same mechanism as 224 px at a fifth of the cost
SIZE = 96


def _pre(model_weights) -> Preprocessing:
    return Preprocessing(SIZE, model_weights.mean, model_weights.std)


@pytest.fixture(scope="module")
def lite0() -> tuple[LesionClassifier, Preprocessing]:
    weights = resolve_weights("efficientnet_lite0")
    return build_model(weights).eval(), _pre(weights)


@pytest.fixture(scope="module")
def images(few_images: Path, lite0) -> np.ndarray:
    """Eight decoded SIZE px training images (uint8 N x S x S x 3)."""
    _, pre = lite0
    samples = load_dataset(few_images).train[:8]
    return pre.decode(samples, progress=False).images


def _stats(model: LesionClassifier) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorm_layers(model)]  # type: ignore[union-attr]


def _logits(model: LesionClassifier, pre: Preprocessing, batch: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(pre.network_input(batch)))


@pytest.fixture(scope="module")
def site(lite0, images) -> LesionClassifier:
    """lite0 adapted on the eight images in one batch (prior 0)."""
    model, pre = lite0
    return adapt_batchnorm(model, [images], pre)[0]


def test_adapted_copy_has_site_statistics_and_original_is_untouched(lite0, images, site):
    model, pre = lite0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits_before = _logits(model, pre, images)
    adapted, info = adapt_batchnorm(model, [images[:5], images[5:]], pre)

    assert adapted is not model
    assert info == {"layers": len(batchnorm_layers(model)), "images": 8, "batches": 2, "prior": 0.0}
    assert info["layers"] > 0
    for k, v in model.state_dict().items():  # every parameter and buffer of the input, bit for bit
        assert torch.equal(v, before[k]), k
    assert not model.training and not adapted.training and not any(m.training for m in adapted.modules())
    assert [bn.momentum for bn in batchnorm_layers(adapted)] == [bn.momentum for bn in batchnorm_layers(model)]
    changed = [
        not torch.allclose(a[0], b[0]) or not torch.allclose(a[1], b[1]) for a, b in zip(_stats(model), _stats(adapted))
    ]
    assert all(changed)
    # only the BatchNorm buffers moved: the weights are the model's
    for (k, v), w in zip(model.state_dict().items(), adapted.state_dict().values()):
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(v, w), k
    assert not torch.allclose(_logits(adapted, pre, images), logits_before, atol=1e-4)
    # the first layer's site mean is the image-weighted mean over both batches: as if all 8 came at once
    torch.testing.assert_close(_stats(adapted)[0][0], _stats(site)[0][0], rtol=1e-4, atol=1e-5)


def test_prior_mixes_the_original_and_site_statistics(lite0, images, site):
    model, pre = lite0
    same, info = adapt_batchnorm(model, [images], pre, prior=1.0)
    half, _ = adapt_batchnorm(model, [images], pre, prior=0.5)
    assert info["prior"] == 1.0
    for (m0, v0), (m1, v1), (ms, vs), (mh, vh) in zip(_stats(model), _stats(same), _stats(site), _stats(half)):
        assert torch.equal(m1, m0) and torch.equal(v1, v0)
        torch.testing.assert_close(mh, (m0 + ms) / 2)
        torch.testing.assert_close(vh, (v0 + vs) / 2)
    torch.testing.assert_close(_logits(same, pre, images), _logits(model, pre, images))


def test_refusals_say_why(lite0, images, shared_weights):
    model, pre = lite0
    with pytest.raises(AdaptError, match="no image"):
        adapt_batchnorm(model, [], pre)
    with pytest.raises(AdaptError, match="prior"):
        adapt_batchnorm(model, [images], pre, prior=1.5)
    with pytest.raises(AdaptError, match=f"uint8 N x {SIZE}"):
        adapt_batchnorm(model, [images[:, :50]], pre)
    coral = resolve_weights("mobilenetv2", weights_dir=shared_weights)
    with pytest.raises(LesionlabError, match="folded into the convolutions"):
        adapt_batchnorm(build_model(coral), [images], _pre(coral))
