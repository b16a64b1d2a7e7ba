"""The model behind the service: loaded in the background, warmed up, then asked through admission control.

Readiness means the predictor is loaded and one warm-up inference ran, so the first real request
does not pay for graph optimisation. All model work is the Predictor's; this module only decodes
bytes with ``open_image`` and hands PIL images over.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from lesionlab import runs as rf
from lesionlab.data.images import DEFAULT_MAX_PIXELS, BadImageError, open_image
from lesionlab.inference.loading import DEFAULT_MODEL_DIR, load_predictor
from lesionlab.inference.predictor import Prediction, Predictor
from lesionlab.serve.admission import Admission
from lesionlab.serve.errors import ServiceError, from_bad_image

log = logging.getLogger("lesionlab.serve")


@dataclass
class Outcome:
    """One image's answer, or why it could not be read."""

    prediction: Prediction | None = None
    error: ServiceError | None = None


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """The folder to serve, checked up front so a typo fails at start-up and not at the first request."""
    path = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if not path.is_dir():
        hint = (
            "the bundled default model is not installed; pass --model RUN_DIR"
            if not model_dir
            else "pass the folder written by `lesionlab train` (export it with `lesionlab export`)"
        )
        raise rf.RunError(f"model folder {path} does not exist: {hint}")
    if not any((path / f).exists() for f in (rf.ONNX, rf.MODEL, rf.ENSEMBLE)):
        raise rf.RunError(f"{path} holds no {rf.ONNX}, {rf.MODEL} or {rf.ENSEMBLE}; is it a lesionlab model folder?")
    return path


def limit_blas_threads() -> None:
    """One BLAS thread for this process: a server's parallelism is across requests, and idle BLAS threads
    waking for the lesion detector's small matrix product cost up to ~20 ms under load (p99) instead of 0.4 ms.

    Process-wide, so only server processes (``app_from_env``, the Lambda handler) call it, not ``create_app``.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    threadpool_limits(1, user_api="blas")


#: Besides the weights, the files that decide a label: threshold and temperature, and the lesion detector.
LABEL_FILES = (rf.CALIBRATION, rf.OOD_META, rf.OOD_ARRAYS)


def artifact_files(predictor: Predictor) -> list[Path]:
    """The files that decide the served labels, in a fixed order: the weights file actually loaded (or
    ensemble.json) and the LABEL_FILES present; for an ensemble, then the same for each member in turn."""
    folder = Path(predictor.info.path)
    members: list[Predictor] = getattr(predictor, "members", [])
    if (folder / rf.ENSEMBLE).exists():
        head = rf.ENSEMBLE
    else:
        head = rf.ONNX if predictor.info.runtime == "onnxruntime" else rf.MODEL
    files = [folder / head] + [folder / name for name in LABEL_FILES if (folder / name).exists()]
    return files + [f for m in members for f in artifact_files(m)]


def artifact_version(predictor: Predictor) -> str:
    """First 12 hex digits of a sha256 over everything in ``artifact_files``: a retrained, re-calibrated or
    re-fitted model (or ensemble member) gets a new version, while moving the folder keeps it."""
    h = hashlib.sha256()
    for i, path in enumerate(artifact_files(predictor)):
        h.update(f"{i}:{path.name}:".encode())  # position and name, never the absolute path
        h.update(_file_digest(path))
    return h.hexdigest()[:12]


def _file_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


@dataclass
class _ModuleExplainer:
    """An explain module without ``Explainer``: its module-level ``overlay_png`` per request."""

    module: ModuleType
    model_dir: Path

    def overlay_png(self, image: Image.Image, target: str) -> bytes:
        return self.module.overlay_png(self.model_dir, image, target)


class ModelService:
    def __init__(
        self,
        model_dir: str | Path | None,
        *,
        backend: str = "auto",
        num_threads: int | None = None,
        max_concurrency: int = 32,
        timeout_s: float = 15.0,
        inference_threads: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.model_dir = resolve_model_dir(model_dir)
        self.backend = backend
        self.num_threads = num_threads
        self.max_pixels = max_pixels
        self.admission = Admission(max_concurrency, timeout_s, inference_threads)
        self.predictor: Predictor | None = None
        self.version = ""
        self.error: str | None = None
        self._lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self._explainer: tuple[ModuleType, Any] | None = None  # (explain module, its Explainer), built once
        self._explainer_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self.predictor is not None

    @property
    def state(self) -> str:
        return "ready" if self.ready else ("failed" if self.error else "loading")

    def load(self) -> None:
        """Loads and warms the predictor once; records a failure instead of raising (readiness reports it)."""
        with self._lock:
            if self.predictor is not None or self.error:
                return
            try:
                predictor = load_predictor(self.model_dir, self.backend, self.num_threads)
                size = predictor.info.input_size
                predictor.analyze([Image.new("RGB", (size, size), (180, 120, 100))])
                self.version = artifact_version(predictor)
                self.predictor = predictor
                log.info("model %s (%s, %s) ready", predictor.info.model_id, predictor.info.runtime, self.version)
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
                log.error("model failed to load from %s: %s", self.model_dir, self.error)

    def start(self) -> None:
        """Starts loading without blocking start-up, so liveness answers while the model loads."""
        self._task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.load))

    def stop(self) -> None:
        self.admission.shutdown()

    def require_ready(self) -> Predictor:
        if self.predictor is not None:
            return self.predictor
        if self.error:
            raise ServiceError(
                503,
                "model_failed",
                f"the model could not be loaded ({self.error}); fix the model folder and restart the service",
            )
        raise ServiceError(503, "loading", "the model is still loading; retry in a few seconds", {"Retry-After": "2"})

    # ------------------------------------------------------------ work (runs on the inference threads)

    def _decode(self, data: bytes, label: str) -> Image.Image:
        try:
            return open_image(data, label, max_pixels=self.max_pixels)
        except BadImageError as e:
            raise from_bad_image(e, label) from None
        except Exception as e:
            raise ServiceError(
                415, "unsupported_image", f"{label}: could not be decoded ({type(e).__name__}); send a JPEG or PNG file"
            ) from None

    def classify_blocking(self, images: list[bytes], tta: bool | None) -> tuple[list[Outcome], float]:
        predictor = self.require_ready()
        outcomes: list[Outcome] = []
        decoded: list[Image.Image] = []
        for i, data in enumerate(images):
            try:
                decoded.append(self._decode(data, "image" if len(images) == 1 else f"images[{i}]"))
                outcomes.append(Outcome())
            except ServiceError as e:
                outcomes.append(Outcome(error=e))
        start = time.perf_counter()
        predictions = iter(predictor.analyze(decoded, tta=tta))
        elapsed_ms = (time.perf_counter() - start) * 1000
        for o in outcomes:
            if o.error is None:
                o.prediction = next(predictions)
        return outcomes, elapsed_ms

    def _explain(self, data: bytes, target: str) -> bytes:
        return self.explainer().overlay_png(self._decode(data, "image"), target)

    def explainer(self) -> Any:
        """The service's one Explainer, built on first use around the loaded predictor and kept for every later
        request (an ensemble's members are not loaded again). Raises ServiceError like ``require_explainer``.

        Built again only if the explain module itself is replaced (a reload). A module without ``Explainer``
        (an older build, or a stand-in) is asked through its ``overlay_png(model_dir, image, target)``."""
        explain = self.require_explainer()
        predictor = self.require_ready()
        with self._explainer_lock:
            if self._explainer is None or self._explainer[0] is not explain:
                build = getattr(explain, "Explainer", None)
                if build is None:
                    made: Any = _ModuleExplainer(explain, self.model_dir)
                else:
                    try:
                        made = build(self.model_dir, predictor)
                    except (rf.RunError, ValueError) as e:
                        raise ServiceError(
                            501, "explain_unavailable", f"explanations are not available for this model ({e})"
                        ) from None
                self._explainer = (explain, made)
            return self._explainer[1]

    def require_explainer(self) -> ModuleType:
        """lesionlab.inference.explain, or 501 unless a Grad-CAM can be drawn (it needs the PyTorch model.pt)."""
        try:
            # import_module asks sys.modules on every call: the check before a request and the explainer agree
            explain = importlib.import_module("lesionlab.inference.explain")
        except ImportError as e:
            raise ServiceError(
                501,
                "explain_unavailable",
                f"explanations are not available in this build ({e}); ask without explain=true",
            ) from None
        check = getattr(explain, "explainable_dir", None)  # knows ensembles: their first member's model.pt
        try:
            if check is not None:
                check(self.model_dir)
            elif not (self.model_dir / rf.MODEL).exists():
                raise rf.RunError(f"{self.model_dir.name} has no {rf.MODEL}")
        except (rf.RunError, ValueError) as e:
            raise ServiceError(
                501,
                "explain_unavailable",
                f"explanations need the PyTorch checkpoint {rf.MODEL} ({e}); ask without explain=true",
            ) from None
        return explain

    # ------------------------------------------------------------ async entry points

    async def classify(self, images: list[bytes], tta: bool | None = None) -> tuple[list[Outcome], float]:
        """``tta`` None: as the model's operating point was fitted."""
        self.require_ready()
        return await self.admission.run(self.classify_blocking, images, tta)

    async def explain(self, data: bytes, target: str) -> bytes:
        """Grad-CAM of the evidence for ``target`` (benign or malignant): the label served, which for an
        ensemble or with TTA can differ from the explained model's own answer."""
        self.require_explainer()
        return await self.admission.run(self._explain, data, target)
