"""``lesionlab train --backend ray``: the same training function on a Ray cluster, by Ray Train's TorchTrainer.

Ray starts ``num_workers`` processes (one GPU each with ``use_gpu``), initialises their torch process group
(gloo on CPUs, NCCL on GPUs) and calls :func:`lesionlab.training.loop.train` in each; ``distributed.join`` finds
the group and the run is the data-parallel run torchrun would have made: rank 0 writes the run folder. So the
folder must be on storage every worker reaches (a shared file system on a multi-machine cluster), as must the
data; and the workers need lesionlab installed (``pip install 'lesionlab[ray]'``), the same version as here.

Ray's own checkpointing is not used: the run folder's resume state is the checkpoint, so a failed Ray run is
resumed by running the same command again (with any number of workers, or without Ray).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lesionlab.errors import LesionlabError
from lesionlab.training.config import TrainConfig


class RayTrainError(LesionlabError):
    """Ray Train is missing, or a worker failed (the message carries the worker's error)."""


def absolute_spec(spec: str | Path) -> str:
    """A data spec with its path made absolute (Ray workers may run in another working directory): ``FOLDER``,
    or ``format:FOLDER?options`` as ``sources.parse_spec`` reads it."""
    from lesionlab.data.sources import parse_spec

    text = str(spec)
    path = str(parse_spec(text).path)
    return text.replace(path, str(Path(path).resolve()), 1)


def train_on_ray(
    cfg: TrainConfig,
    data: list[str],
    out: str | Path,
    *,
    address: str | None = None,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    **train_kwargs: Any,
) -> Path:
    """Trains ``cfg`` on ``data`` into ``out`` with ``num_workers`` Ray Train workers (``address``: a running
    cluster, e.g. ``auto`` or ``ray://host:10001``; None starts a local Ray, shut down afterwards).
    ``train_kwargs`` go to ``loop.train`` (weights, weights_dir, classes, ...). Returns the run folder."""
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise RayTrainError("--backend ray needs Ray Train: pip install 'lesionlab[ray]' (ray[train])") from None
    if num_workers < 1:
        raise RayTrainError(f"--num-workers must be at least 1, got {num_workers}")
    if cfg.mode == "frozen":
        raise RayTrainError("frozen mode trains its head in seconds on one process: train it without --backend ray")
    out = Path(out).resolve()
    specs = [absolute_spec(s) for s in data]
    kwargs = {k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in train_kwargs.items()}
    kwargs["progress"] = False  # workers' bars would interleave in the driver's log

    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            num_cpus=num_workers * cpus_per_worker if address is None else None,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={"env_vars": _forwarded_env()},
        )
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg, "data": specs if len(specs) > 1 else specs[0], "out": str(out), **kwargs},
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
            ),
            run_config=RunConfig(name=f"lesionlab-{out.name}", storage_path=str(out.parent / ".ray")),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps a worker's exception; say what it was
            raise RayTrainError(f"Ray Train run failed: {e}") from e
        if getattr(result, "error", None):
            raise RayTrainError(f"Ray Train run failed: {result.error}")
    finally:
        if started:
            ray.shutdown()
    return out


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the training function, as under torchrun."""
    from lesionlab.training.loop import train

    config = dict(config)
    train(config.pop("cfg"), config.pop("data"), config.pop("out"), **config)


def _forwarded_env() -> dict[str, str]:
    """The environment lesionlab reads (cache folder, offline mode, weights folder), for the workers."""
    keys = ("LESIONLAB_CACHE_DIR", "LESIONLAB_OFFLINE", "LESIONLAB_WEIGHTS_DIR", "LESIONLAB_DATA")
    return {k: os.environ[k] for k in keys if k in os.environ}
