"""Where and how a job runs: the device, precision, loader workers and DDP rank (`TrainEnv`), and
the helpers training and evaluation share (autocast, DataLoader settings)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .config import DEVICES
from .errors import InputError, TrainingError, setting


@dataclass
class TrainEnv:
    device: torch.device
    precision: str = "fp32"        # fp32 | bf16 | fp16
    workers: int = 0
    seed: int = 1
    on_error: str = "skip"
    progress: bool = True
    rank: int = 0
    world_size: int = 1
    cuda_graphs: bool = True       # capture the training step as a CUDA graph (CUDA, one process)
    #: settings that were changed to run at all, one line each (the job warns with them)
    notes: list = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str | None) -> TrainEnv:
    """TrainEnv from torchrun's environment (WORLD_SIZE/RANK/LOCAL_RANK) or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg is not None and not DEVICES.fullmatch(str(device_arg)):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {str(device_arg)[:40]!r}")
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if str(device_arg).startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"{setting('--device', device_arg)} but no CUDA device is visible: use "
                            f"{setting('--device', 'cpu')}")
    index = local
    if str(device_arg).startswith("cuda:"):
        index, count = int(device_arg[5:]), torch.cuda.device_count()
        if index >= count:
            raise InputError(f"--device {device_arg}: torch sees {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
        if world > 1:
            raise InputError(f"--device {device_arg} under torchrun: each process takes the GPU of "
                             f"its LOCAL_RANK; pass --device cuda")
    device = torch.device(f"cuda:{index}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return TrainEnv(device=device, rank=rank, world_size=world)


def runtime_env(config) -> TrainEnv:
    """The TrainEnv of a run's `TrainConfig` (device, precision, workers, seed, ...)."""
    env = init_distributed(config.device)
    cuda = env.device.type == "cuda"
    env.precision = ("bf16" if cuda else "fp32") if config.precision == "auto" else config.precision
    env.workers = config.workers if config.workers is not None else (4 if cuda else 0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if env.workers > cpus:  # --workers 100000 would fork that many processes
        if config.workers is not None:
            env.notes.append(f"--workers {config.workers} is more than the {cpus} CPUs this process "
                             f"may use: loading with {cpus} worker processes")
        env.workers = cpus
    env.seed, env.on_error, env.progress = config.seed, config.on_error, config.progress
    env.cuda_graphs = config.cuda_graphs and not config.plain
    return env


def loader_kwargs(device: torch.device, workers: int) -> dict:
    kw = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        kw["persistent_workers"] = False
    return kw


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16/fp16 autocast on CUDA (or bf16 on CPU when asked); a no-op for fp32.
    `cache=False` for CUDA-graph capture (autocast's weight-cast cache must be off there)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)
