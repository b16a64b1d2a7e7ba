"""Where a run trains and in what arithmetic (``--device``, ``--precision``), and the per-device habits of the loop.

- CPU (as before): channels-last, bf16 autocast where the CPU computes bf16 natively, fp32 otherwise.
- CUDA: channels-last, autocast in bf16 where the GPU has it, else fp16 with a gradient scaler; cuDNN's benchmark
  mode (the input size is fixed, so the fastest kernels are timed once); batches copied from pinned memory
  without blocking; validation on the GPU too.
- MPS (Apple GPUs): fp32 unless bf16 is asked for.

The resolved device and precision are recorded in config.json's ``compute`` block (with the training throughput),
but the device is not part of a run's identity: a run started on a GPU resumes on a CPU (with the same precision;
fp16 is CUDA's only). What training writes (model.pt, the resume state) loads on a CPU-only machine.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import torch

from lesionlab.training.config import ConfigError, TrainConfig, cuda_bf16_supported

#: The autocast dtype of each precision (fp32: no autocast).
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """The torch device a ``--device`` value names, there on this machine; ConfigError saying why not.

    ``auto``: the current CUDA GPU when one is visible, else the CPU; ``cuda``: the current GPU, as ``cuda:N``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{spec}'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec} requested but torch.cuda.is_available() is False (no CUDA GPU or driver visible, or "
                f"a torch {torch.__version__} built without CUDA): train with --device cpu or auto"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise ConfigError(
                f"device {spec} requested but only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "device mps requested but torch.backends.mps.is_available() is False (it needs an Apple-silicon Mac "
            "and a torch built with MPS): train with --device cpu or auto"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got '{spec}'")
    return device


@dataclass(frozen=True)
class Compute:
    """A run's resolved device and precision (``cfg.precision``, already resolved for the device's kind)."""

    device: torch.device
    precision: str

    @classmethod
    def of(cls, cfg: TrainConfig, local_rank: int | None = None) -> Compute:
        """The device ``cfg.device`` names and its precision; ConfigError when the device is not there or cannot
        compute that precision. On CUDA it also switches cuDNN's benchmark mode on. ``local_rank``: a process of
        a distributed run, which takes GPU ``local_rank`` when the device is auto or cuda."""
        spec = cfg.device
        if local_rank is not None and spec in ("auto", "cuda") and torch.cuda.is_available():
            spec = f"cuda:{local_rank}"
        device = resolve_device(spec)
        if cfg.precision == "bf16" and device.type == "cuda" and not cuda_bf16_supported():
            raise ConfigError(
                f"precision bf16 but {torch.cuda.get_device_name(device)} does not compute bf16 natively: "
                "use fp16 (auto) or fp32"
            )
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if local_rank is not None:  # NCCL's object collectives use the current device: one GPU per rank
                torch.cuda.set_device(device)
        return cls(device, cfg.precision)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def move(self, *tensors: torch.Tensor | None) -> tuple[Any, ...]:
        """``tensors`` (None stays None) on the device: unchanged on the CPU; to a GPU from pinned memory,
        without making the CPU wait for the copy."""
        if self.on_cpu:
            return tensors
        return tuple(None if t is None else to_device(t, self.device) for t in tensors)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaler (small gradients would underflow in fp16), else None."""
        return torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def record(self) -> dict[str, Any]:
        """config.json's ``compute`` block, without the throughput (the loop adds it)."""
        return {
            "device": str(self.device),
            "device_name": device_name(self.device),
            "precision": self.precision,
            "autocast": str(AUTOCAST[self.precision]).removeprefix("torch.") if self.precision in AUTOCAST else None,
            "grad_scaler": self.precision == "fp16",
            "cudnn_benchmark": self.device.type == "cuda",
            "cpu_threads": torch.get_num_threads(),
        }


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; to a CUDA GPU through pinned memory and a non-blocking copy."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s parameters (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def device_name(device: torch.device) -> str:
    """The GPU's or CPU's model name, for config.json."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


class RunningMeans:
    """An epoch's running training loss and accuracy over its batches (the loss weighted by batch size).

    On the CPU the sums are Python floats, read for the progress bar after every batch. On a GPU they stay on the
    device (float64, the same sums) and are read once, at the end of the epoch: reading a GPU value after every
    batch would make the CPU wait for the GPU at every step."""

    def __init__(self, device: torch.device, lazy: bool | None = None):
        self.lazy = device.type != "cpu" if lazy is None else lazy
        zero = torch.zeros((), dtype=torch.float64, device=device) if self.lazy else None
        self._loss: Any = 0.0 if zero is None else zero
        self._correct: Any = 0 if zero is None else zero.clone()
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        hits = ((logits.detach() > 0).float() == y).sum()
        if self.lazy:
            self._loss += loss.detach().double() * len(y)
            self._correct += hits
        else:
            self._loss += float(loss.detach()) * len(y)
            self._correct += int(hits)
        self.seen += len(y)

    def running_loss(self) -> float | None:
        """The mean loss so far, where reading it costs nothing (the CPU), else None."""
        return None if self.lazy else self._loss / self.seen

    def means(self) -> tuple[float, float]:
        """(mean loss, accuracy) of the epoch's batches."""
        return float(self._loss) / self.seen, int(self._correct) / self.seen

    def sums(self) -> tuple[float, float, float]:
        """(summed loss, correct, images): what the ranks of a distributed run add up."""
        return float(self._loss), float(self._correct), float(self.seen)
