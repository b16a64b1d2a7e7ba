"""Test-time BatchNorm adaptation (AdaBN, Li et al. 2016; Schneider et al. 2020): a copy of a model whose backbone
BatchNorm statistics are re-estimated on a site's unlabelled images, optionally mixed with the original ones.

Fine-tuning keeps the backbone's BatchNorm layers in eval mode (``training.sources.freeze_batchnorm``), so their
running statistics are ImageNet's; a new site's colour and contrast shift the activations those statistics
normalise. Labels are never used. Measured by ``bench/bn_adapt.py``; nothing in the pipeline calls this yet.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from lesionlab.errors import LesionlabError
from lesionlab.models.classifier import LesionClassifier
from lesionlab.runs import Preprocessing

BatchNorm = nn.modules.batchnorm._BatchNorm


class AdaptError(LesionlabError):
    """A model that cannot be adapted (no BatchNorm statistics to re-estimate), no images, or a bad prior."""


def batchnorm_layers(model: LesionClassifier) -> list[BatchNorm]:
    """The backbone's BatchNorm layers that keep running statistics, in module order."""
    return [m for m in model.backbone.modules() if isinstance(m, BatchNorm) and m.track_running_stats]


def _placeholder(bn: BatchNorm) -> bool:
    # mean 0, variance 1 (or 1 - eps): statistics never estimated (a fresh layer) or BatchNorm folded into the
    # convolutions (the Coral MobileNetV2); re-estimating these would renormalise activations the weights already
    # scale, changing what the network computes instead of correcting a shift
    assert bn.running_mean is not None and bn.running_var is not None
    return bool((bn.running_mean == 0).all()) and bool(((bn.running_var - 1).abs() <= 2 * bn.eps).all())


def mix_batchnorm(original: LesionClassifier, site: LesionClassifier, prior: float) -> LesionClassifier:
    """A copy of ``site`` whose statistics are ``prior * original + (1 - prior) * site`` (mean and variance, layer
    by layer; Schneider et al.'s N / (N + n) prior); ``prior`` 0 is ``site``'s, 1 ``original``'s. Neither input is
    modified. Raises AdaptError for a prior outside [0, 1] or models whose BatchNorm layers do not match."""
    if not 0.0 <= prior <= 1.0:
        raise AdaptError(f"prior must be in [0, 1] (the weight of the original statistics), got {prior}")
    out = copy.deepcopy(site)
    old, new = batchnorm_layers(original), batchnorm_layers(out)
    if [b.num_features for b in old] != [b.num_features for b in new]:
        raise AdaptError("the two models' backbones do not have the same BatchNorm layers")
    with torch.no_grad():
        for a, b in zip(old, new):
            assert a.running_mean is not None and a.running_var is not None
            assert b.running_mean is not None and b.running_var is not None
            b.running_mean.mul_(1 - prior).add_(a.running_mean.to(b.running_mean), alpha=prior)
            b.running_var.mul_(1 - prior).add_(a.running_var.to(b.running_var), alpha=prior)
    return out


def adapt_batchnorm(
    model: LesionClassifier, batches: Iterable[np.ndarray], pre: Preprocessing, *, prior: float = 0.0
) -> tuple[LesionClassifier, dict]:
    """A deep copy of ``model`` (which is never modified) with its backbone BatchNorm running mean and variance
    re-estimated on ``batches``: uint8 N x S x S x 3 images at ``pre.input_size`` (step 1 of ``pre``), fed through
    ``pre.network_input`` (the model's colour constancy and normalisation). Each layer's site statistics are the
    image-weighted average of its batch statistics, then mixed with the original ones by ``prior`` (see
    :func:`mix_batchnorm`; 0: the site's only). The copy is returned in eval mode, on ``model``'s device.

    Returns (copy, {"layers": BatchNorm layers adapted, "images": images seen, "batches": batches, "prior"}).
    Raises AdaptError when the backbone has no BatchNorm layer with estimated statistics (none at all, or folded
    into the convolutions), when no image was given, for a batch of the wrong shape, or a prior outside [0, 1]."""
    if not 0.0 <= prior <= 1.0:
        raise AdaptError(f"prior must be in [0, 1] (the weight of the original statistics), got {prior}")
    layers = batchnorm_layers(model)
    if not layers:
        raise AdaptError("the backbone has no BatchNorm layer with running statistics: nothing to adapt")
    if all(_placeholder(bn) for bn in layers):
        raise AdaptError(
            f"the backbone's {len(layers)} BatchNorm layers all hold mean 0 / variance 1: their statistics were "
            "folded into the convolutions (e.g. the Coral MobileNetV2 weights) or never estimated, so there are "
            "no statistics to re-estimate; adapting would change the network, not correct a shift"
        )
    site = copy.deepcopy(model).eval()  # everything else stays in eval mode: dropout off, no other buffer moves
    bns = batchnorm_layers(site)
    momenta = [bn.momentum for bn in bns]
    device = next(site.parameters()).device
    seen = n_batches = 0
    for bn in bns:
        bn.reset_running_stats()
        bn.train()  # normalise with batch statistics and update the running ones
    try:
        with torch.no_grad():  # no gradients; inference_mode would update the running buffers too (checked)
            for batch in batches:
                if batch.ndim != 4 or batch.shape[1:] != (pre.input_size, pre.input_size, 3) or batch.dtype != np.uint8:
                    raise AdaptError(
                        f"images must be uint8 N x {pre.input_size} x {pre.input_size} x 3 (resized to the model's "
                        f"input), got {batch.dtype} {tuple(batch.shape)}"
                    )
                n = len(batch)
                if not n:
                    continue
                # momentum n / (seen + n): a running average weighted by images, so a short last batch counts by
                # its size (momentum=None would weight every batch the same)
                for bn in bns:
                    bn.momentum = n / (seen + n)
                site.backbone(torch.from_numpy(pre.network_input(batch)).to(device))
                seen, n_batches = seen + n, n_batches + 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
            bn.eval()
    if not seen:
        raise AdaptError("no image was given to estimate the site's BatchNorm statistics from")
    adapted = mix_batchnorm(model, site, prior) if prior else site
    return adapted.eval(), {"layers": len(bns), "images": seen, "batches": n_batches, "prior": float(prior)}
