"""The training loop every stage shares (classification, clip, instruct).

A stage is a :class:`StageTask`: it builds its data and model, computes the loss of a batch,
evaluates and exports, and says what the loop needs from it (sampler repeats, workers). :class:`Run`
(``run_stage``) owns everything else, once for all stages: processes and
threads, the run directory, the DeepSpeed engine (ZeRO from the config), the optimiser with the
paper's parameter groups, warm-up + cosine LR per step, the rising drop-path schedule, gradient
accumulation, per-step seeding (so resumed runs are exact), EMA, atomic checkpoints with a
``latest`` pointer, ``--resume``, ``train.stop_after``, progress/TensorBoard/JSONL logging and the
training-curve PNG. Every run config has ``optim: OptimConfig`` and ``train: TrainConfig``."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from defocus_vlm.data.classification import DataError
from defocus_vlm.run_lock import RunLock

from . import checkpoint as ckpt
from . import run_dir
from .config import ConfigError
from .ema import ModelEMA
from .engine import (
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    batch_layout,
    build_engine,
    deepspeed_config,
    init_distributed,
    use_bf16,
    zero_stage,
)
from .logger import HISTORY_FILE, RunLogger, plot_curve, trim_history
from .optim import build_optimizer, set_lr
from .run_dir import config_yaml
from .sampler import EpochSampler
from .schedules import drop_path_at, lr_at, scaled_lr

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass
class StepContext:
    """What a stage's loss needs to know about the current optimiser step."""

    global_step: int
    epoch: int
    drop_path: float
    accum: int
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype  # input dtype for floating tensors (bf16 on CUDA, fp32 on CPU)
    seed: int

    def seed_micro(self, micro: int) -> None:
        """Seed torch and numpy for micro-batch ``micro`` of this step (augmentation, dropout)."""
        seed = (self.seed * 1_000_003 + self.global_step * 1009 + micro * 31 + self.rank) % 2**31
        torch.manual_seed(seed)
        np.random.seed(seed)


class StageTask:
    """What one stage supplies to the shared loop (:class:`Run`). ``self.cfg`` is the stage's run config
    (``stage, model, data, [augment], optim, train``)."""

    name = "stage"
    shuffle = True
    curve_metric: str | None = None  # a key of ``evaluate``'s result to plot in the training curve

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        # integer counters (summed over processes by the stage), logged every step, kept across resumes
        self.counters: dict[str, int] = {}

    # ---- what the loop needs to know
    def sampler_repeats(self) -> int:
        """Copies of each sample per epoch (timm's repeated augmentation; 0 or 1 = off)."""
        return 0

    def num_workers(self) -> int:
        """DataLoader worker processes (training and evaluation): ``data.num_workers``, capped by the free cores."""
        return usable_workers(self.cfg.data.num_workers)

    # ---- data and model
    def build_data(self) -> Dataset:
        """Open and validate the data (before any training); return the training dataset."""
        raise NotImplementedError

    def collate_fn(self) -> Callable[[Any], Any] | None:
        return None  # torch's default collate

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def describe(self, model: torch.nn.Module) -> str:
        return f"{self.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"

    # ---- one optimiser step
    def micro_loss(self, model: Any, batch: Any, ctx: StepContext) -> torch.Tensor:
        """The loss of one micro batch (``model`` is the DeepSpeed engine; call it like the module)."""
        raise NotImplementedError

    def train_step(self, engine: Any, batches: list, ctx: StepContext) -> float:
        """Forward/backward every micro batch of the step and step the engine once per micro batch
        (DeepSpeed applies the update at the accumulation boundary). Returns the step's mean loss.
        Override when the loss couples micro batches (e.g. contrastive losses with cached features)."""
        total = 0.0
        for m, batch in enumerate(batches):
            ctx.seed_micro(m)
            loss = self.micro_loss(engine, batch, ctx)
            engine.backward(loss)
            engine.step()
            total += float(loss.detach().float()) / len(batches)
        return total

    # ---- evaluation and export
    def evaluate(self, model: torch.nn.Module, ctx: StepContext) -> dict:
        """Metrics of ``model`` (the raw module or the EMA copy); {} when the stage has none."""
        return {}

    def summary_line(self, metrics: dict) -> str:
        return json.dumps(metrics)

    def export(self, state: dict, out_dir: Path) -> None:
        """Write the model with weights ``state`` as a Hugging Face directory (process 0)."""
        raise NotImplementedError


class Run:
    """One training run of a task: ``__init__`` sets everything up (processes, run directory, data,
    schedule, engine, EMA, resumed state), :meth:`train` runs :meth:`epoch` until the step budget is
    spent, then :meth:`finish` evaluates, exports and writes the metrics."""

    def __init__(self, task: StageTask, cfg: Any, resume: bool = False):
        self.task, self.cfg, self.t, self.o = task, cfg, cfg.train, cfg.optim
        if self.t.cpu_threads:
            torch.set_num_threads(self.t.cpu_threads)
        self.run_dir = Path(self.t.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.is_main = (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0
        self.lock = None
        try:
            self._open_run_dir(resume)  # before DeepSpeed starts: an unusable directory fails in a second
            self.rank, self.world = task.rank, task.world = init_distributed()
            barrier()  # the directory is ready for every process
            self.train_ds = task.build_data()  # validated before anything is trained
            self._plan_steps()
            self._build_engine()
            self.epoch, self.step_in_epoch, self.global_step, self.losses = 0, 0, 0, []
            self.wall_before: float | None = 0.0  # training time of earlier segments (None: not recorded)
            if resume:
                self._restore()
            self.logger = RunLogger(self.run_dir, self.total_steps, self.global_step, self.is_main,
                                    self.t.tensorboard, self.t.progress)
        except BaseException:
            self.release()
            raise
        self.logger.write(
            f"{task.describe(self.model)} | {self.world} process(es), ZeRO-{self.zero}, "
            f"{'bf16' if self.bf16 else 'fp32'}, global batch {self.t.batch_size} = {self.micro} x {self.world} x "
            f"{self.accum} | peak LR {self.peak_lr:.3g}, {self.total_steps} steps, warm-up {self.warmup_steps}")
        self.ctx = StepContext(self.global_step, self.epoch, 0.0, self.accum, self.rank, self.world,
                               self.engine.device, torch.bfloat16 if self.bf16 else torch.float32, self.t.seed)
        self.eval_copy = copy.deepcopy(self.engine.module) if self.ema is not None else None
        self.metrics: dict = {}

    # ---- set-up
    def _open_run_dir(self, resume: bool) -> None:
        """Process 0 locks the run directory (one run per directory), checks that it can be written and
        writes or, on --resume, checks the config (``run_dir.prepare``); the others wait at the first
        barrier (a launcher stops them when process 0 fails)."""
        if self.is_main:
            self.lock = RunLock(self.run_dir, "train.output_dir")
            if self.lock.message():
                print(self.lock.message(), flush=True)
            run_dir.prepare(self.run_dir, self.cfg, resume)

    def _plan_steps(self) -> None:
        """Batch layout, sampler, step budget and the LR schedule's constants."""
        t, o = self.t, self.o
        self.micro, self.accum = batch_layout(t.batch_size, t.micro_batch_size, self.world)
        self.sampler = EpochSampler(len(self.train_ds), self.world, self.rank, shuffle=self.task.shuffle,
                                    seed=t.seed, repeats=self.task.sampler_repeats())
        self.steps_per_epoch = len(self.sampler.indices()) // (self.micro * self.accum)
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.train_ds)} training samples are fewer than one global batch ({t.batch_size})")
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.peak_lr = scaled_lr(o.lr, t.batch_size, o.lr_batch_ref) if o.scale_lr else o.lr
        self.warmup_steps = min(int(round(o.warmup_epochs * self.steps_per_epoch)), max(0, self.total_steps - 1))

    def _build_engine(self) -> None:
        t = self.t
        torch.manual_seed(t.seed)
        self.model = self.task.build_model()
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ConfigError(f"{self.task.name}: every parameter is frozen; nothing to train")
        self.bf16 = use_bf16(t.precision)
        self.optimizer = build_optimizer(self.model, self.o, self.peak_lr)
        ds_config = deepspeed_config(t.deepspeed, t.batch_size, self.micro, self.accum, self.o.clip_grad, self.bf16)
        self.engine = build_engine(self.model, self.optimizer, ds_config)
        self.zero = zero_stage(self.engine)
        if self.zero == 3 and t.ema_decay > 0:
            raise ConfigError("EMA needs full weights on every process: use ZeRO stage 0-2, or train.ema_decay=0")
        self.ema = ModelEMA(self.engine.module, t.ema_decay) if t.ema_decay > 0 else None

    def _restore(self) -> None:
        """The position, losses, stage counters and EMA of the latest checkpoint, if there is one; the
        history is cut back to it (steps a killed run logged after its last checkpoint are redone)."""
        state = ckpt.load(self.engine, self.ckpt_dir)
        if state is None:
            if self.is_main:
                print(f"no checkpoint under {self.ckpt_dir}; starting from scratch", flush=True)
            return
        if self.is_main:
            trim_history(self.run_dir / HISTORY_FILE, state["global_step"])
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        self.losses = list(state["losses"])
        self.wall_before = state.get("wall_s")  # checkpoints written before it was recorded have none
        self.task.counters.update(state.get("extra", {}))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    # ---- training
    @property
    def finished(self) -> bool:
        return self.global_step >= self.total_steps

    def train(self) -> dict:
        """Train to the end of the budget (or to train.stop_after); the run's summary. The run directory
        is unlocked at the end, however the run ends."""
        try:
            self.start_time = time.time()
            self.engine.train()
            while not self.finished and self.epoch < self.t.epochs:
                if not self.train_epoch():
                    return self.stop()
            return self.finish()
        finally:
            self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def train_epoch(self) -> bool:
        """Train from the current position to the end of the epoch (or of the budget), checkpoint and
        evaluate as configured. False when train.stop_after stopped the run inside it."""
        t = self.t
        batches = self.batches()
        self.ctx.epoch = self.epoch
        self.ctx.drop_path = drop_path_at(self.epoch, t.epochs, t.drop_path_min, t.drop_path_max,
                                          t.drop_path_schedule)
        for step in range(self.step_in_epoch, self.steps_per_epoch):
            self.step([next(batches) for _ in range(self.accum)])
            if self.finished:
                break
            last_in_epoch = step + 1 == self.steps_per_epoch
            # where a resumed run continues: the next step, or the next epoch's start
            position = (self.epoch + 1, 0) if last_in_epoch else (self.epoch, step + 1)
            if t.stop_after and self.global_step == t.stop_after:
                self.save(*position)
                self.logger.write(f"stopped after step {self.global_step} (train.stop_after); continue with --resume")
                return False
            if t.checkpoint_every and self.global_step % t.checkpoint_every == 0 and not last_in_epoch:
                self.save(*position)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.save(self.epoch, 0)
        if self.finished or (t.eval_every and self.epoch % t.eval_every == 0):
            self.evaluate()
        return True

    def batches(self) -> Iterator:
        """This process's micro batches from the current position (epoch, step in epoch) to the epoch's end."""
        self.sampler.set_epoch(self.epoch, start=self.step_in_epoch * self.micro * self.accum)
        return iter(DataLoader(self.train_ds, batch_size=self.micro, sampler=self.sampler, drop_last=True,
                               num_workers=self.task.num_workers(), collate_fn=self.task.collate_fn()))

    def step(self, batches: list) -> None:
        """One optimiser step on ``batches`` (one per accumulated micro batch), then EMA and logging."""
        lr = lr_at(self.global_step, self.total_steps, self.warmup_steps, self.peak_lr, self.o.warmup_lr,
                   self.o.min_lr)
        set_lr(self.optimizer, lr)
        self.ctx.global_step = self.global_step
        loss = all_reduce_mean(self.task.train_step(self.engine, batches, self.ctx))
        self.global_step += 1
        self.losses.append(loss)
        if not np.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.global_step}; lower optim.lr or check the data")
        if self.ema is not None:
            self.ema.update(self.engine.module)
        scalars = {"loss": loss, "lr": lr, "drop_path": self.ctx.drop_path, "epoch": self.epoch}
        self.logger.step(self.global_step, {**scalars, **self.task.counters}, self.t.batch_size)

    def save(self, next_epoch: int, next_step: int) -> None:
        """A checkpoint from which a resumed run continues at (``next_epoch``, ``next_step``)."""
        state = {"epoch": next_epoch, "step_in_epoch": next_step, "global_step": self.global_step,
                 "losses": self.losses, "extra": self.task.counters, "total_steps": self.total_steps,
                 "wall_s": self.wall_total(time.time() - self.start_time)}
        ckpt.save(self.engine, self.ckpt_dir, self.global_step, state,
                  self.ema.state_dict() if self.ema is not None else None, config_yaml(self.cfg),
                  self.t.keep_checkpoints)

    def evaluate(self) -> None:
        """Metrics of the raw weights (and of the EMA's), logged; ``self.metrics`` = {} for a task without."""
        raw = self.task.evaluate(self.engine.module, self.ctx)
        self.metrics = {"raw": raw} if raw else {}
        if raw and self.ema is not None:
            self.ema.copy_to(self.eval_copy)
            self.metrics["ema"] = self.task.evaluate(self.eval_copy, self.ctx)
        for name, values in self.metrics.items():
            self.logger.scalars("val" if name == "raw" else f"val_{name}", self.global_step,
                                {"epoch": self.epoch, **values})
        if self.metrics:
            self.logger.write(f"epoch {self.epoch}: {self.task.summary_line(self.metrics)}")

    def wall_total(self, this_process: float) -> float | None:
        """Wall seconds of the run over all its segments up to now (the work an interruption threw away
        not counted), or None when it resumed from a checkpoint that did not record it."""
        return None if self.wall_before is None else round(self.wall_before + this_process, 2)

    # ---- the end
    def summary(self) -> dict:
        return {"steps": self.global_step, "losses": self.losses, "world_size": self.world, "zero_stage": self.zero}

    def stop(self) -> dict:
        """The summary of a run stopped by train.stop_after (its checkpoint is written)."""
        self.logger.close()
        barrier()
        return {**self.summary(), "interrupted": True}

    def finish(self) -> dict:
        """Evaluate (unless the last epoch did), export (main directory: the EMA weights when kept, raw
        weights in raw/), plot and write metrics.json / losses.json; the summary."""
        if not self.metrics:
            self.evaluate()
        wall = time.time() - self.start_time
        self.logger.close()
        export_dir = self.run_dir / "model"
        state = full_state_dict(self.engine)  # every process takes part (ZeRO-3 gathers the partitions)
        if self.is_main:
            if self.ema is not None:
                self.task.export({**state, **self.ema.state_dict()}, export_dir)
                self.task.export(state, export_dir / "raw")
            else:
                self.task.export(state, export_dir)
            plot_curve(self.run_dir / HISTORY_FILE, self.run_dir / "training_curve.png", self.task.curve_metric)
        summary = {**self.summary(), "val": self.metrics, "wall_s": round(wall, 2),
                   "wall_s_total": self.wall_total(wall), **self.task.counters,
                   "export": str(export_dir)}
        if self.is_main:
            metrics = {k: v for k, v in summary.items() if k != "losses"}
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            (self.run_dir / "losses.json").write_text(json.dumps(self.losses) + "\n")
        barrier()
        return summary


def run_stage(task: StageTask, cfg: Any, resume: bool = False) -> dict:
    """Train ``task`` as configured by ``cfg``; returns a summary (with per-step ``losses``)."""
    return Run(task, cfg, resume).train()


def full_state_dict(engine: DeepSpeedEngine) -> dict | None:
    """The whole model's weights on process 0 (None elsewhere under ZeRO-3, whose partitioned
    parameters are gathered here: call it on every process)."""
    if zero_stage(engine) == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def usable_workers(requested: int) -> int:
    """``requested`` DataLoader workers, at most as many as the cores left beside torch's threads, and none
    unless two or more are free: on a 2-core machine a worker steals the core the model runs on (measured
    1.07x slower, issue 20)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = cores - torch.get_num_threads()
    return min(requested, free) if free > 1 else 0


def reduce_count(value: int) -> int:
    """Sum an integer over all processes."""
    return int(all_reduce_sum(torch.tensor(value)).item())
