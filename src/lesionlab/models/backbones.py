"""Backbones built, and where their ImageNet weights come from.

The table of backbones is ``models.registry`` (:func:`get_spec`); what a run carries is the
:class:`ResolvedWeights` it gets from :func:`resolve_weights`.

The hub path: ResNet50V2, EfficientNetV2B0 and VGG16 have no PyPI weights, so on a connected machine
their ImageNet weights come from timm's Hugging Face hub repo (``timm/<timm name>.<tag>``, file
``model.safetensors``), downloaded by ``huggingface_hub`` into its cache (``HF_HUB_CACHE`` / ``HF_HOME``).
Before that, :func:`hub_reachable` makes one TCP connection, with a short timeout, to the endpoint the hub
client itself will use: ``huggingface_hub.constants.ENDPOINT`` (``HF_ENDPOINT`` as read when huggingface_hub
was imported; the ``HF_ENDPOINT`` variable if huggingface_hub is missing), http or https, with its port.
``HF_HUB_OFFLINE`` (the client's constant or the variable) and ``LESIONLAB_OFFLINE`` skip the hub altogether,
so an offline machine never sits through the client's retries. The weights record timm's pretrained config
(mean, std, input size), the source ``hub:<hf_hub_id>`` and the sha256 of the tensors as loaded.
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
from urllib.parse import urlsplit

import torch
from torch import nn

from lesionlab.models.registry import BackboneSpec, WeightsError, get_spec

log = logging.getLogger(__name__)


@dataclass
class ResolvedWeights:
    """Weights as a value: where they came from, their digest and the preprocessing they expect."""

    backbone: str
    source: str  # "file" | "weights-dir" | "pypi:<package>" | "hub:<hf_hub_id>" | "random"
    pretrained: bool
    sha256: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    path: str | None = None
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    #: What timm's pretrained config says of hub weights (mean, std, input and test sizes), recorded as is.
    pretrained_cfg: dict | None = None

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


# How huggingface_hub reads a boolean variable (constants._is_true); LESIONLAB_OFFLINE is read the same way.
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
_DEFAULT_ENDPOINT = "https://huggingface.co"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in _TRUE_VALUES


def hub_endpoint() -> str:
    """The hub URL that timm's downloads will go to.

    ``huggingface_hub.constants.ENDPOINT`` when huggingface_hub is installed: the client reads ``HF_ENDPOINT``
    once, at import, so a later change of the variable does not move its downloads and must not move the probe
    either. Without huggingface_hub: ``HF_ENDPOINT``, else https://huggingface.co.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_ENDPOINT", _DEFAULT_ENDPOINT).rstrip("/")
    return str(constants.ENDPOINT)


def hub_offline() -> bool:
    """True if a setting forbids the hub: ``LESIONLAB_OFFLINE``, or ``HF_HUB_OFFLINE`` as the variable or as
    huggingface_hub's constant (read at its import, so set before lesionlab ran; it also covers
    ``TRANSFORMERS_OFFLINE``). Either reading suffices: being offline by mistake costs a clear error, being
    online by mistake costs the client's retries."""
    if _env_true("LESIONLAB_OFFLINE") or _env_true("HF_HUB_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def endpoint_address(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of an http(s) endpoint URL, the port defaulting to 80 / 443 by scheme.

    Raises ValueError for anything else (no host, another scheme, a port that is not a number).
    """
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"hub endpoint {endpoint!r} is not an http(s) URL with a host")
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)  # .port raises on a bad port


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the hub at ``endpoint`` (default :func:`hub_endpoint`) accepts a TCP connection within
    ``timeout`` seconds; False at once when :func:`hub_offline`.

    Only a connect, not an HTTP request: it is there so an offline machine does not sit through the hub
    client's retries, and the client reports anything past the connect itself. A proxy (``HTTPS_PROXY``) is
    not consulted: behind one that is the only way out, the probe says unreachable.
    """
    if hub_offline():
        log.info("hub skipped: offline (LESIONLAB_OFFLINE / HF_HUB_OFFLINE)")
        return False
    endpoint = endpoint or hub_endpoint()
    try:
        host, port = endpoint_address(endpoint)
        socket.create_connection((host, port), timeout=timeout).close()
    except (OSError, ValueError) as e:  # socket.timeout and gaierror are OSErrors
        log.info("hub %s not reachable: %s", endpoint, e)
        return False
    return True


def _from_hub(spec: BackboneSpec) -> ResolvedWeights | None:
    """timm's ImageNet weights from its hub repo, or None if the hub is off, unreachable or the download fails.

    Normalises with timm's pretrained mean and std (the spec only where the config is silent) and records its
    pretrained config, the source ``hub:<hf_hub_id>`` and the sha256 of the tensors as loaded (the classifier
    is dropped: the backbone is built with ``num_classes=0``). The input size stays the spec's, the study's
    224 px: timm trained tf_efficientnetv2_b0 at 192 and tests it at 224, and a backbone must see the same size
    whichever source its weights came from; timm's sizes are in ``pretrained_cfg``.
    """
    if not hub_reachable():
        return None
    try:
        import timm

        model = timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
    except Exception as e:  # network errors come in many types; fall through to the next source
        log.warning("hub download of %s failed: %s", spec.timm_name, e)
        return None
    cfg: dict = dict(getattr(model, "pretrained_cfg", None) or {})  # nn.Module's __getattr__ would type it Tensor
    state = model.state_dict()
    recorded = {k: cfg[k] for k in ("mean", "std", "input_size", "test_input_size", "crop_pct") if k in cfg}
    return ResolvedWeights(
        spec.name,
        f"hub:{cfg.get('hf_hub_id') or spec.timm_name}",
        True,
        tensors_sha256(state),
        tuple(cfg.get("mean") or spec.mean),
        tuple(cfg.get("std") or spec.std),
        spec.input_size,
        None,
        state,
        {k: list(v) if isinstance(v, tuple) else v for k, v in recorded.items()},
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
            f"at {hub_endpoint()} (offline, unreachable or the download failed; see the log). Give a file with "
            "--weights, or pass --allow-random-init to train from random weights (results will be far worse)."
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
        # once: state_dict() walks every module, and once per tensor made this take seconds
        target = model.state_dict()
        state = {k: v for k, v in weights.state_dict.items() if k in target}
        missing = set(target) - set(state)
        if missing:
            raise WeightsError(
                f"{weights.path or weights.source} does not fit {spec.timm_name}: "
                f"{len(missing)} tensors missing, e.g. {sorted(missing)[:3]}"
            )
        for k, v in state.items():
            if target[k].shape != v.shape:
                raise WeightsError(
                    f"{weights.path or weights.source}: {k} has shape {tuple(v.shape)}, "
                    f"{spec.timm_name} expects {tuple(target[k].shape)}"
                )
        model.load_state_dict(state, strict=True)
    return model.eval()


def num_features(model: nn.Module) -> int:
    """Width of the pooled output; VGG's pre-logits MLP makes it differ from ``num_features``."""
    # getattr, not ``model.num_features``: timm sets plain int attributes, which nn.Module's typing (its
    # ``__getattr__``) would read as a submodule or tensor
    return int(getattr(model, "head_hidden_size", None) or getattr(model, "num_features"))  # noqa: B009
