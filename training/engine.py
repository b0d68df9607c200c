"""DeepSpeed set-up shared by every stage: the CPU accelerator with gloo on CPU, CUDA (NCCL, bf16)
on GPUs, the ZeRO stage from a JSON in configs/deepspeed/, gradient clipping and accumulation.

The same code runs as one plain process, under ``torchrun`` and under the ``deepspeed``
launcher: the launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .config import CONFIG_ROOT, ConfigError

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Start the process group once (a single process needs no launcher). Returns (rank, world)."""
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def use_bf16(precision: str) -> bool:
    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available()


def load_deepspeed_json(name_or_path: str) -> dict:
    p = Path(name_or_path)
    if not p.is_file():
        p = (
            CONFIG_ROOT
            / "deepspeed"
            / (name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json")
        )
    if not p.is_file():
        known = sorted(q.stem for q in (CONFIG_ROOT / "deepspeed").glob("*.json"))
        raise ConfigError(f"DeepSpeed config {name_or_path!r} not found; use a path or one of {known}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p}: not valid JSON: {err}") from err


def deepspeed_config(
    name_or_path: str, global_batch: int, micro_batch: int, accumulation: int, clip_grad: float, bf16: bool
) -> dict:
    cfg = load_deepspeed_json(name_or_path)
    cfg.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=float(clip_grad),
        steps_per_print=cfg.get("steps_per_print", 10**9),
    )
    cfg["bf16"] = {"enabled": bool(bf16)}
    cfg.pop("fp16", None)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


def batch_layout(global_batch: int, micro_batch: int, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) for a global batch."""
    micro = micro_batch or global_batch // world
    if micro <= 0 or global_batch % (micro * world):
        raise ConfigError(
            f"train.batch_size {global_batch} must be a multiple of micro_batch_size ({micro}) "
            f"x processes ({world})"
        )
    return micro, global_batch // (micro * world)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> DeepSpeedEngine:
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def zero_stage(engine: DeepSpeedEngine) -> int:
    return int(engine.zero_optimization_stage())


def all_reduce_mean(value: float | torch.Tensor) -> float:
    t = torch.as_tensor(
        value, dtype=torch.float64, device="cpu" if not torch.cuda.is_available() else device()
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(device())
        dist.all_reduce(t)
    return t.cpu()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
