"""Export of a trained run to ONNX for serving, with a parity check that refuses a model which drifted.

``model.onnx`` outputs ``[logit (N,), features (N, D)]`` (features feed the lesion detector), and for a
``--target diagnosis`` model a third, ``diagnosis_logits (N, K)`` (softmax: P(diagnosis)), for a
normalised float32 NCHW input with a dynamic batch axis; ``preprocess.json`` tells any runtime how to
build that input and how to read the logit (temperature, threshold). Optional int8 static
quantization is kept only when it does not cost test AUC.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit

from lesionlab import files
from lesionlab import runs as rf
from lesionlab.data.dataset import Sample
from lesionlab.inference.predictor import onnx_session
from lesionlab.models.batching import map_batches

INPUT_NAME = "input"
OUTPUT_NAMES = ("logit", "features")
DIAGNOSIS_OUTPUT = "diagnosis_logits"  # the third output, of a diagnosis model only
OPSET = 17
PARITY_IMAGES = 32
PARITY_TOLERANCE = 1e-4
MAX_AUC_DROP = 0.005
CALIBRATION_IMAGES = 64


class ExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch model, or quantization cannot run."""


@dataclass
class ExportResult:
    onnx_path: Path
    preprocess_path: Path
    parity_max_abs_dp: float
    parity_images: int
    parity_source: str  # "validation" or "generated"


@dataclass
class QuantizeResult:
    kept: bool
    auc_float: float
    auc_int8: float
    n_test: int
    path: Path | None

    @property
    def message(self) -> str:
        verdict = (
            f"kept {self.path.name}"
            if self.kept and self.path is not None  # a kept model always has its path
            else f"discarded (AUC drop above {MAX_AUC_DROP}); serve the float model"
        )
        return (
            f"int8: test AUC {self.auc_int8:.4f} vs float {self.auc_float:.4f} "
            f"(delta {self.auc_int8 - self.auc_float:+.4f}, n={self.n_test}): {verdict}"
        )


# ------------------------------------------------------------------ inputs


def _run_context(run_dir: Path) -> tuple[rf.RunConfig, rf.OperatingPoint, int]:
    """config, calibration and input size of an evaluated single run; refuses anything else."""
    run = rf.RunFolder(run_dir)
    if run.is_ensemble:
        raise rf.RunError(f"{run_dir} is an ensemble; export its member runs one by one")
    run.require_trained()
    if not run.has(rf.CALIBRATION):
        raise rf.RunError(
            f"{run_dir} has no {rf.CALIBRATION}; run `lesionlab evaluate {run_dir}` first so the "
            "exported model carries its temperature and threshold"
        )
    config = run.config
    return config, run.require_operating_point(), config.preprocessing.input_size


def _splits(run_dir: Path, config: rf.RunConfig, data: Path | None) -> dict[str, list[Sample]] | None:
    """The run's own validation and test samples, or None when its data is not here."""
    from lesionlab.data.loading import dataset_from_record

    root = Path(data) if data else config.data_root
    if not root.exists():
        return None
    dataset = dataset_from_record(config.data, data, progress=False)
    return rf.RunFolder(run_dir).dataset_splits(dataset)


def parity_batch(
    run_dir: Path, config: rf.RunConfig, size: int, data: Path | None, n: int = PARITY_IMAGES
) -> tuple[np.ndarray, str]:
    """uint8 NxHxWx3: the run's first ``n`` validation images (resized as the run resizes), else seeded synthetic
    ones."""
    splits = _splits(run_dir, config, data)
    if splits and splits["val"]:
        decoded = config.preprocessing.decode(splits["val"][:n], progress=False)
        if len(decoded.images):
            return decoded.images, "validation"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, (yy + xx) / 2], -1)
    images = [np.clip(255 * (base * rng.uniform(0.3, 1, 3) + rng.normal(0, 0.1, base.shape)), 0, 255) for _ in range(n)]
    return np.stack(images).astype(np.uint8), "generated"


# ------------------------------------------------------------------ export


def output_names(model) -> tuple[str, ...]:
    """model.onnx's outputs: logit and features, and the diagnosis logits of a diagnosis model."""
    return OUTPUT_NAMES + ((DIAGNOSIS_OUTPUT,) if model.diagnoses is not None else ())


def _export_module(model):
    """Wraps the classifier so the graph returns the logit and the backbone features (and diagnosis logits)."""
    import torch

    class LogitAndFeatures(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.output_names = output_names(inner)  # what _torch_to_onnx names the graph's outputs

        def forward(self, x):
            features = self.inner.backbone(x)
            logit, z = self.inner.head.outputs(features)
            return (logit, features) if z is None else (logit, features, z)

    return LogitAndFeatures(model).eval()


def _torch_to_onnx(module, size: int, path: Path, opset: int) -> None:
    """The TorchScript exporter first (fast, stable for these CNNs); the dynamo exporter if it is gone. Outputs
    are named by ``module.output_names`` (``_export_module``)."""
    import torch

    outputs = tuple(getattr(module, "output_names", OUTPUT_NAMES))
    dummy = torch.zeros(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            axes = {INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
            torch.onnx.export(
                module,
                (dummy,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=list(outputs),
                opset_version=opset,
                dynamic_axes=axes,
                dynamo=False,
            )
        except Exception as legacy_error:
            try:
                batch = torch.export.Dim("batch", min=1, max=4096)
                program = torch.onnx.export(
                    module,
                    (dummy,),
                    dynamic_shapes={"x": {0: batch}},
                    opset_version=max(opset, 18),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=list(outputs),
                )
                if program is None:  # only the TorchScript exporter returns None
                    raise ExportError("the dynamo exporter returned no program")
                program.save(str(path), external_data=False)
            except Exception as dynamo_error:
                raise ExportError(
                    f"ONNX export failed: TorchScript exporter: {legacy_error}; dynamo exporter: {dynamo_error}"
                ) from dynamo_error


def onnx_logits(session, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """float64 logits of a normalised NCHW batch, ``batch`` images per run; an empty ``x`` gives shape (0,)."""
    name = session.get_inputs()[0].name
    run = lambda b: session.run([OUTPUT_NAMES[0]], {name: b})[0].reshape(-1)
    return np.asarray(map_batches(run, x, batch, empty=np.zeros(0)), np.float64)


def check_parity(model, session, x: np.ndarray, temperature: float) -> float:
    """max |P_onnx - P_torch| over the batch, also run one image at a time to exercise the dynamic axis; for a
    diagnosis model also over its diagnosis probabilities (softmax of the diagnosis logits)."""
    import torch
    from scipy.special import softmax

    with torch.inference_mode():
        logits, z = model.outputs(torch.from_numpy(x))
    ref = logits.numpy().astype(np.float64)
    full = onnx_logits(session, x)
    single = onnx_logits(session, x[:2], batch=1)
    dp = np.abs(expit(full / temperature) - expit(ref / temperature))
    dp_single = np.abs(expit(single / temperature) - expit(ref[:2] / temperature))
    worst = max(dp.max(), dp_single.max())
    if z is not None:
        name = session.get_inputs()[0].name
        z_onnx = np.concatenate([session.run([DIAGNOSIS_OUTPUT], {name: x[i : i + 8]})[0] for i in range(0, len(x), 8)])
        worst = max(worst, np.abs(softmax(z_onnx, axis=1) - softmax(z.numpy(), axis=1)).max())
    return float(worst)


def preprocess_spec(config: rf.RunConfig, calibration: rf.OperatingPoint, size: int, opset: int = OPSET) -> dict:
    """preprocess.json: how any runtime builds the input and reads the logit (a copy of the operating point)."""
    pre = config.preprocessing
    diagnoses = config.raw.get("model", {}).get("diagnoses") or []
    return {
        "input_size": size,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "resize": pre.resize,
        "color_constancy": pre.color_constancy,  # on the uint8 resized image, before scale and normalisation
        "channels": pre.channels,
        "layout": "NCHW",
        "scale": pre.scale,
        "dtype": "float32",
        "input_name": INPUT_NAME,
        "output_names": list(OUTPUT_NAMES) + ([DIAGNOSIS_OUTPUT] if diagnoses else []),
        "probability": "sigmoid(logit / temperature)",
        **diagnosis_spec(diagnoses, config.raw.get("model", {}).get("malignant_diagnoses", [])),
        "backbone": config.backbone,
        "model_id": calibration.model_id,
        "threshold": calibration.threshold,
        "threshold_policy": calibration.policy,
        "temperature": calibration.temperature,
        "tta": calibration.tta,  # threshold and temperature fitted on the mean logit of 8 views
        "opset": opset,
    }


def diagnosis_spec(diagnoses: list[str], malignant: list[str]) -> dict:
    """preprocess.json's keys for a diagnosis model (none for a binary one): its classes and how to read them."""
    if not diagnoses:
        return {}
    return {
        "diagnoses": list(diagnoses),
        "malignant_diagnoses": list(malignant),
        "diagnosis_probability": f"softmax({DIAGNOSIS_OUTPUT}); the malignant ones sum to sigmoid(logit); lesionlab "
        "rescales the malignant group to the calibrated P(malignant) and the benign one to 1 - P",
    }


def export_run(
    run_dir: str | Path, data: str | Path | None = None, opset: int = OPSET, log: Callable[[str], None] = print
) -> ExportResult:
    """Writes model.onnx and preprocess.json; raises ExportError (writing nothing) when parity fails."""
    from lesionlab.models.classifier import load_model

    run_dir = Path(run_dir)
    config, calibration, size = _run_context(run_dir)
    model, _ = load_model(run_dir / rf.MODEL)
    images, source = parity_batch(run_dir, config, size, Path(data) if data else None)
    x = config.preprocessing.network_input(images)  # colour constancy (when set), normalisation
    target = run_dir / rf.ONNX
    with files.atomic_path(target) as tmp:
        _torch_to_onnx(_export_module(model), size, tmp, opset)
        max_dp = check_parity(model, onnx_session(tmp), x, calibration.temperature)
        log(f"parity on {len(x)} {source} images: max |dP(malignant)| = {max_dp:.2e} (limit {PARITY_TOLERANCE:.0e})")
        if not max_dp <= PARITY_TOLERANCE:
            raise ExportError(
                f"ONNX model disagrees with PyTorch: max |dP| {max_dp:.2e} > {PARITY_TOLERANCE:.0e} "
                f"on {len(x)} {source} images; nothing was written. Check the opset and the "
                "onnxruntime version, or report the backbone as not exportable."
            )
    rf.RunFolder(run_dir).write_json(rf.PREPROCESS, preprocess_spec(config, calibration, size, opset))
    return ExportResult(target, run_dir / rf.PREPROCESS, max_dp, len(x), source)


# ------------------------------------------------------------------ int8


class _ImageReader:
    """onnxruntime's CalibrationDataReader protocol over normalised validation images, one at a time."""

    def __init__(self, x: np.ndarray):
        self._items: Iterator[dict] = iter([{INPUT_NAME: x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict | None:
        return next(self._items, None)


def _auc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def quantize_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    n_calibration: int = CALIBRATION_IMAGES,
    log: Callable[[str], None] = print,
) -> QuantizeResult:
    """Static int8 quantization calibrated on validation images; kept only if test AUC moves <= 0.005."""
    run_dir = Path(run_dir)
    config, _, _ = _run_context(run_dir)
    if not (run_dir / rf.ONNX).exists():
        raise rf.RunError(f"{run_dir} has no {rf.ONNX}; export it first")
    splits = _splits(run_dir, config, Path(data) if data else None)
    if not splits:
        raise rf.RunError(f"int8 calibration needs the run's images; {config.data_root} is not here (pass --data DIR)")
    pre = config.preprocessing
    calib = pre.network_input(pre.decode(splits["val"][:n_calibration], progress=False).images)
    test = pre.decode(splits["test"], progress=False)
    y = np.array([s.label for s in test.samples])
    x_test = pre.network_input(test.images)
    target = run_dir / rf.INT8
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".int8-") as tmp_dir:
        tmp = Path(tmp_dir) / rf.INT8
        _quantize(run_dir / rf.ONNX, tmp, calib)
        auc_float = _auc(y, onnx_logits(onnx_session(run_dir / rf.ONNX), x_test))
        auc_int8 = _auc(y, onnx_logits(onnx_session(tmp), x_test))
        kept = abs(auc_int8 - auc_float) <= MAX_AUC_DROP
        if kept:
            os.replace(tmp, target)
        else:
            target.unlink(missing_ok=True)  # a stale int8 file from an earlier export must not survive
    result = QuantizeResult(kept, auc_float, auc_int8, len(y), target if kept else None)
    rf.RunFolder(run_dir).write_json(
        rf.QUANTIZATION,
        {
            "method": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax "
            "calibration on validation images",
            "calibration_images": len(calib),
            "auc_float": auc_float,
            "auc_int8": auc_int8,
            "n_test": len(y),
            "max_auc_change": MAX_AUC_DROP,
            "kept": kept,
            "file": rf.INT8 if kept else None,
        },
    )
    log(result.message)
    return result


def _quantize(src: Path, dst: Path, calib: np.ndarray) -> None:
    """The quantizer logs pages of advice and unused-initializer notes; only errors are shown meanwhile."""
    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        quantize_static(
            str(src),
            str(dst),
            _ImageReader(calib),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)
