"""Which predictor a model folder becomes: an ensemble (of its loaded members), ONNX Runtime or PyTorch."""

from __future__ import annotations

from pathlib import Path

from lesionlab import runs as rf
from lesionlab.errors import LesionlabError
from lesionlab.inference.ensemble import EnsemblePredictor
from lesionlab.inference.predictor import OnnxPredictor, Predictor, TorchPredictor

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"
BACKENDS = ("auto", "onnx", "torch")


def require_operating_point(model_dir: str | Path) -> rf.OperatingPoint:
    """``RunFolder.require_operating_point``: a model without its validation-chosen threshold would silently
    label at 0.5, so it is refused (RunError)."""
    return rf.RunFolder(model_dir).require_operating_point()


def load_predictor(
    model_dir: str | Path | None = None, backend: str = "auto", num_threads: int | None = None
) -> Predictor:
    """``auto`` prefers ONNX Runtime when the folder has model.onnx; ``None`` means the bundled default. An
    ensemble's members are loaded the same way (``backend``, ``num_threads``), then handed to the ensemble.

    Raises LesionlabError for an unknown backend, RunError (a LesionlabError) for a folder that cannot be served."""
    if backend not in BACKENDS:
        raise LesionlabError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    model_dir = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
    if not model_dir.is_dir():
        raise rf.RunError(f"model folder {model_dir} does not exist")
    folder = rf.RunFolder(model_dir)
    folder.require_operating_point()
    if folder.is_ensemble:
        members = [load_predictor(m, backend, num_threads) for m in folder.members()]
        return EnsemblePredictor(model_dir, members)
    has_onnx = folder.has(rf.ONNX)
    if backend == "onnx" or (backend == "auto" and has_onnx):
        if not has_onnx:
            raise rf.RunError(f"{model_dir} has no {rf.ONNX}; run `lesionlab export {model_dir}` first")
        return OnnxPredictor(model_dir, num_threads)
    if not folder.has(rf.MODEL):
        raise rf.RunError(f"{model_dir} holds neither {rf.MODEL} nor {rf.ONNX}; is it a lesionlab run folder?")
    return TorchPredictor(model_dir, num_threads)
