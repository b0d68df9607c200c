"""Atomic DeepSpeed checkpoints with a ``latest`` pointer; nothing in a run directory is unpickled.

Layout: ``<run>/checkpoints/step_<N>/`` holds DeepSpeed's model/optimizer shards, ``loop_state.json``
(epoch, step, losses, stage counters), ``ema.safetensors``, ``rng_rank<r>.safetensors`` (every RNG of
process r) and ``config.yaml`` (the run config that wrote it); ``<run>/checkpoints/latest`` holds the
tag. A checkpoint is written into ``.tmp-step_<N>`` and renamed only when every process has finished,
so a crash never leaves a half-written directory behind ``latest``.

DeepSpeed's own files are pickles; they are read with ``torch.load(weights_only=True)`` (tensors,
containers and the few DeepSpeed classes in :data:`DEEPSPEED_GLOBALS`, allowed only during the load),
so a planted pickle that names any other global is refused before anything in it runs. Checkpoints of
earlier versions (loop state inside DeepSpeed's client state, ``rng_rank<r>.pt``) are read the same safe
way."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .engine import barrier

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

LOOP_STATE, EMA_FILE, CONFIG_FILE = "loop_state.json", "ema.safetensors", "config.yaml"
# module -> classes that DeepSpeed (0.1x) pickles into its checkpoint files besides tensors and containers
DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler": ("LossScaler", "DynamicLossScaler"),
    "deepspeed.runtime.zero.config": ("ZeroStageEnum",),
    "deepspeed.utils.tensor_fragment": ("fragment_address",),
}
# what an rng_rank<r>.pt of earlier versions holds besides tensors: NumPy's RNG state array
LEGACY_RNG_GLOBALS = (np.ndarray, np.dtype, np.dtype("uint32").__class__,
                      getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct)


class CheckpointError(ValueError):
    pass


def _deepspeed_globals() -> list:
    found = []
    for module, names in DEEPSPEED_GLOBALS.items():
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(module)
            found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


def safe_load(path: str | os.PathLike, map_location: Any = None, allowed: list | tuple = ()) -> Any:
    """``torch.load(weights_only=True)`` with ``allowed`` globals for this load only; a file that needs
    anything else (a code-executing pickle) is refused with one line naming it."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"its pickle references {found.group(1)}" if found else str(err).split("\n")[0].split(". ")[0]
        raise CheckpointError(f"refusing to load {path}: {reason}, but a checkpoint holds only tensors, plain "
                              f"containers and DeepSpeed's own state; was this file written by defocus-vlm?") from None


class _SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with its ``load`` replaced by :func:`safe_load`."""

    def __init__(self, inner):
        self._inner, self._allowed = inner, _deepspeed_globals()

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location, self._allowed)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


@contextlib.contextmanager
def _weights_only(engine):
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeCheckpointEngine(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


# --------------------------------------------------------------------------- RNG state as safetensors
def save_rng(path: Path) -> None:
    """Every RNG of this process: tensors in the file, Python's and NumPy's scalars in its metadata."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": random.getstate(), "numpy": [kind, pos, has_gauss, gauss]}
    save_file(tensors, str(path), metadata={"state": json.dumps(meta)})


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["state"])
    tensors = load_file(str(path))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _load_legacy_rng(path: Path) -> None:
    state = safe_load(path, allowed=LEGACY_RNG_GLOBALS)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine: DeepSpeedEngine, root: str | os.PathLike, step: int, loop_state: dict, ema: dict | None = None,
         config_text: str = "", keep: int = 2) -> Path:
    """Checkpoint ``step``: the engine, ``loop_state`` (JSON-able), the EMA weights and this process's
    RNG; the oldest checkpoints beyond ``keep`` are removed (0 = keep all)."""
    root = Path(root)
    tag, tmp_tag = f"step_{step}", f".tmp-step_{step}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={}, save_latest=False)
    save_rng(root / tmp_tag / f"rng_rank{_rank()}.safetensors")
    if _rank() == 0:
        (root / tmp_tag / LOOP_STATE).write_text(json.dumps(loop_state) + "\n")
        (root / tmp_tag / CONFIG_FILE).write_text(config_text)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(root / tmp_tag / EMA_FILE))
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


def latest_dir(root: str | os.PathLike) -> Path | None:
    tag = latest_tag(root)
    return None if tag is None else Path(root) / tag


def load(engine: DeepSpeedEngine, root: str | os.PathLike) -> dict | None:
    """Load the latest checkpoint into the engine and this process's RNG; returns the loop state with
    ``ema`` (a state dict or None) added; None when there is no checkpoint yet."""
    path = latest_dir(root)
    if path is None:
        return None
    with _weights_only(engine):
        loaded, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
    if (path / LOOP_STATE).is_file():
        state = json.loads((path / LOOP_STATE).read_text())
        state["ema"] = load_file(str(path / EMA_FILE)) if (path / EMA_FILE).is_file() else None
    else:  # an earlier version kept the loop state in DeepSpeed's client state
        state = dict(client_state or {})
        if "global_step" not in state:
            raise CheckpointError(f"{path} has no {LOOP_STATE} and no loop state in DeepSpeed's files: expected "
                                  f"a checkpoint written by defocus-vlm's training loop")
    rng = path / f"rng_rank{_rank()}.safetensors"
    if rng.is_file():
        load_rng(rng)
    elif (path / f"rng_rank{_rank()}.pt").is_file():
        _load_legacy_rng(path / f"rng_rank{_rank()}.pt")
    return state
