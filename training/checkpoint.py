"""Atomic DeepSpeed checkpoints with a ``latest`` pointer and the RNG state of every process.

Layout: ``<run>/checkpoints/step_<N>/`` (DeepSpeed model/optimizer shards, ``client_state``
with epoch / step / EMA / history, ``rng_rank<r>.pt``) and ``<run>/checkpoints/latest`` holding
the tag. A checkpoint is written into ``.tmp-step_<N>`` and renamed only when every process has
finished, so a crash never leaves a half-written directory behind ``latest``."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .engine import barrier


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, root: str | os.PathLike, step: int, client_state: dict, keep: int = 2) -> Path:
    root = Path(root)
    tag, tmp_tag = f"step_{step}", f".tmp-step_{step}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), root / tmp_tag / f"rng_rank{_rank()}.pt")
    barrier()
    if _rank() == 0:
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        _write_atomic(root / "latest", tag)
        if keep > 0:
            tags = sorted(
                (p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1])
            )
            for old in tags[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / tag


def latest_tag(root: str | os.PathLike) -> str | None:
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (Path(root) / tag).is_dir():
        raise CheckpointError(f"{pointer} names {tag!r}, but {Path(root) / tag} does not exist")
    return tag


def load(engine, root: str | os.PathLike) -> dict | None:
    """Load the latest checkpoint into the engine and this process's RNG; returns client_state
    (None when there is no checkpoint yet)."""
    root = Path(root)
    tag = latest_tag(root)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")
    rng_file = root / tag / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
