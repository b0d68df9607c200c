"""Training stages (classification -> CLIP -> instruct) on one shared loop (loop.py) and one config
layout (config.py). :data:`STAGES` is the one registry: a stage's name -> its run config and its task.
Heavy imports happen inside the stage modules, loaded when a stage is used."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .fields import ConfigError


@dataclass(frozen=True)
class Stage:
    """A training stage: its run-config dataclass and its :class:`~.loop.StageTask`, both defined in
    ``defocus_vlm.training.<module>``."""

    name: str
    title: str  # how the configuration reference names it
    module: str
    config: str  # run-config class name
    task: str  # task class name

    def _load(self, attribute: str) -> type:
        return getattr(importlib.import_module(f"defocus_vlm.training.{self.module}"), attribute)

    def config_class(self) -> type:
        return self._load(self.config)

    def task_class(self) -> type:
        return self._load(self.task)

    def run(self, cfg: Any, resume: bool = False) -> dict:
        """Train as configured by ``cfg`` (this stage's run config); the run's summary."""
        from .loop import run_stage

        return run_stage(self.task_class()(cfg), cfg, resume)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("classification", "Stage 1, classification", "classification", "ClassificationRunConfig",
          "ClassificationTask"),
    Stage("clip", "Stage 2, CLIP", "clip", "ClipRunConfig", "ClipTask"),
    Stage("instruct", "Stage 3, instruction tuning", "instruct", "InstructRunConfig", "InstructTask"),
)}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown training stage {name!r}; known: {', '.join(STAGES)}")
    return STAGES[name]
