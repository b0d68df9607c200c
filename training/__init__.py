"""Stage runners (classification; later clip and instruct) sharing data, optimiser, schedules,
checkpointing and the DeepSpeed engine. Heavy imports happen inside the runners."""

from __future__ import annotations

import importlib

# stage name -> module under defocus_vlm.training exposing run(cfg, resume) -> dict
STAGES: dict[str, str] = {"classification": "classification", "instruct": "instruct", "clip": "clip"}


def get_stage(name: str):
    if name not in STAGES:
        raise ValueError(f"unknown training stage {name!r}; known: {', '.join(STAGES)}")
    return importlib.import_module(f"defocus_vlm.training.{STAGES[name]}")
