"""The training loop every stage shares (classification, clip, instruct).

A stage is a :class:`StageTask`: it builds its data and model, computes the loss of a batch,
evaluates and exports. :func:`run_stage` owns everything else, once for all stages: processes and
threads, the run directory, the DeepSpeed engine (ZeRO from the config), the optimiser with the
paper's parameter groups, warm-up + cosine LR per step, the rising drop-path schedule, gradient
accumulation, per-step seeding (so resumed runs are exact), EMA, atomic checkpoints with a
``latest`` pointer, ``--resume``, ``train.stop_after``, progress/TensorBoard/JSONL logging and the
training-curve PNG. Every run config has ``optim: OptimConfig`` and ``train: TrainConfig``."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from defocus_vlm.data.classification import DataError

from . import checkpoint as ckpt
from .config import ConfigError, config_to_dict
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
from .logger import RunLogger, plot_curve
from .optim import build_optimizer, set_lr
from .sampler import EpochSampler
from .schedules import drop_path_at, lr_at, scaled_lr


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
    """Hooks one stage supplies to :func:`run_stage`. ``self.cfg`` is the stage's run config."""

    name = "stage"
    shuffle = True
    curve_metric: str | None = None  # a key of ``evaluate``'s result to plot in the training curve

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        # integer counters (summed over processes by the stage), logged every step, kept across resumes
        self.counters: dict[str, int] = {}

    # ---- data and model
    def build_data(self) -> Dataset:
        """Open and validate the data (before any training); return the training dataset."""
        raise NotImplementedError

    def collate_fn(self):
        return None  # torch's default collate

    def num_workers(self) -> int:
        return int(getattr(getattr(self.cfg, "data", None), "num_workers", 0))

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

    def export(self, state: dict, ema_state: dict | None, out_dir: Path) -> Path | None:
        """Write the final model (process 0). ``state``: the raw weights; ``ema_state``: the EMA's."""
        return None


def run_stage(task: StageTask, cfg: Any, resume: bool = False) -> dict:
    """Train ``task`` as configured by ``cfg``; returns a summary (with per-step ``losses``)."""
    t = cfg.train
    if t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)
    rank, world = init_distributed()
    task.rank, task.world = rank, world
    is_main = rank == 0
    run_dir = Path(t.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt.latest_tag(ckpt_dir) is not None:
            raise ConfigError(
                f"{run_dir} already holds checkpoints; pass --resume to continue, or choose another train.output_dir"
            )
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    barrier()

    train_ds = task.build_data()  # validated before anything is trained
    micro, accum = batch_layout(t.batch_size, t.micro_batch_size, world)
    repeats = int(getattr(getattr(cfg, "augment", None), "repeated_aug", 0))
    sampler = EpochSampler(len(train_ds), world, rank, shuffle=task.shuffle, seed=t.seed, repeats=repeats)
    steps_per_epoch = len(sampler.indices()) // (micro * accum)
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_ds)} training samples are fewer than one global batch ({t.batch_size})")
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    o = cfg.optim
    peak_lr = scaled_lr(o.lr, t.batch_size, o.lr_batch_ref) if o.scale_lr else o.lr
    warmup_steps = min(int(round(o.warmup_epochs * steps_per_epoch)), max(0, total_steps - 1))

    torch.manual_seed(t.seed)
    model = task.build_model()
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{task.name}: every parameter is frozen; nothing to train")
    bf16 = use_bf16(t.precision)
    optimizer = build_optimizer(model, o, peak_lr)
    ds_config = deepspeed_config(t.deepspeed, t.batch_size, micro, accum, o.clip_grad, bf16)
    engine = build_engine(model, optimizer, ds_config)
    stage = zero_stage(engine)
    if stage == 3 and t.ema_decay > 0:
        raise ConfigError("EMA needs full weights on every process: use ZeRO stage 0-2, or train.ema_decay=0")
    ema = ModelEMA(engine.module, t.ema_decay) if t.ema_decay > 0 else None

    epoch, step_in_epoch, global_step, losses = 0, 0, 0, []
    extra = task.counters  # stage counters kept across resumes (e.g. skipped images)
    if resume:
        state = ckpt.load(engine, ckpt_dir)
        if state is None:
            if is_main:
                print(f"no checkpoint under {ckpt_dir}; starting from scratch", flush=True)
        else:
            epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
            losses = list(state["losses"])
            extra.update(state.get("extra", {}))
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])

    logger = RunLogger(run_dir, total_steps, global_step, is_main, t.tensorboard, t.progress)
    logger.write(
        f"{task.describe(model)} | {world} process(es), ZeRO-{stage}, {'bf16' if bf16 else 'fp32'}, global batch "
        f"{t.batch_size} = {micro} x {world} x {accum} | peak LR {peak_lr:.3g}, {total_steps} steps, "
        f"warm-up {warmup_steps}"
    )
    ctx = StepContext(global_step, epoch, 0.0, accum, rank, world, engine.device,
                      torch.bfloat16 if bf16 else torch.float32, t.seed)

    def save(next_epoch: int, next_step: int) -> None:
        state = {"epoch": next_epoch, "step_in_epoch": next_step, "global_step": global_step, "losses": losses,
                 "extra": extra, "ema": ema.state_dict() if ema is not None else None, "total_steps": total_steps}
        ckpt.save(engine, ckpt_dir, global_step, state, t.keep_checkpoints)

    eval_copy = copy.deepcopy(engine.module) if ema is not None else None

    def validate() -> dict:
        out = {"raw": task.evaluate(engine.module, ctx)}
        if ema is not None:
            ema.copy_to(eval_copy)
            out["ema"] = task.evaluate(eval_copy, ctx)
        return out if out["raw"] else {}

    start_time, metrics, interrupted = time.time(), {}, False
    done = global_step >= total_steps
    engine.train()
    while not done and epoch < t.epochs:
        sampler.set_epoch(epoch, start=step_in_epoch * micro * accum)
        loader = DataLoader(train_ds, batch_size=micro, sampler=sampler, num_workers=task.num_workers(),
                            drop_last=True, collate_fn=task.collate_fn())
        batches = iter(loader)
        ctx.epoch = epoch
        ctx.drop_path = drop_path_at(epoch, t.epochs, t.drop_path_min, t.drop_path_max, t.drop_path_schedule)
        for step in range(step_in_epoch, steps_per_epoch):
            lr = lr_at(global_step, total_steps, warmup_steps, peak_lr, o.warmup_lr, o.min_lr)
            set_lr(optimizer, lr)
            ctx.global_step = global_step
            step_loss = all_reduce_mean(task.train_step(engine, [next(batches) for _ in range(accum)], ctx))
            global_step += 1
            losses.append(step_loss)
            if not np.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {global_step}; lower optim.lr or check the data")
            if ema is not None:
                ema.update(engine.module)
            scalars = {"loss": step_loss, "lr": lr, "drop_path": ctx.drop_path, "epoch": epoch}
            logger.step(global_step, {**scalars, **extra}, t.batch_size)
            last_in_epoch = step + 1 == steps_per_epoch
            done = global_step >= total_steps
            if t.checkpoint_every and global_step % t.checkpoint_every == 0 and not last_in_epoch and not done:
                save(epoch, step + 1)
            if t.stop_after and global_step == t.stop_after and not done:
                if last_in_epoch:
                    save(epoch + 1, 0)
                else:
                    save(epoch, step + 1)
                logger.write(f"stopped after step {global_step} (train.stop_after); continue with --resume")
                interrupted = True
                break
            if done:
                break
        if interrupted:
            break
        epoch, step_in_epoch = epoch + 1, 0
        save(epoch, 0)
        if done or (t.eval_every and epoch % t.eval_every == 0):
            metrics = validate()
            for name, values in metrics.items():
                logger.scalars("val" if name == "raw" else f"val_{name}", global_step, {"epoch": epoch, **values})
            if metrics:
                logger.write(f"epoch {epoch}: {task.summary_line(metrics)}")
    summary = {"steps": global_step, "losses": losses, "world_size": world, "zero_stage": stage}
    if interrupted:
        logger.close()
        barrier()
        return {**summary, "interrupted": True}
    if not metrics:
        metrics = validate()
    wall = time.time() - start_time
    logger.close()

    export_dir = run_dir / "model"
    exported = None
    state = full_state_dict(engine)  # every process takes part (ZeRO-3 gathers the partitions)
    if is_main:
        exported = task.export(state, ema.state_dict() if ema is not None else None, export_dir)
        plot_curve(run_dir / "history.jsonl", run_dir / "training_curve.png", task.curve_metric)
    summary.update({"val": metrics, "wall_s": round(wall, 2), **extra,
                    "export": str(exported) if exported is not None else None})
    if is_main:
        (run_dir / "metrics.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"},
                                                         indent=2) + "\n")
        (run_dir / "losses.json").write_text(json.dumps(losses) + "\n")
    barrier()
    return summary


def full_state_dict(engine) -> dict | None:
    """The whole model's weights on process 0 (None elsewhere under ZeRO-3, whose partitioned
    parameters are gathered here: call it on every process)."""
    if zero_stage(engine) == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def reduce_count(value: int) -> int:
    """Sum an integer over all processes."""
    return int(all_reduce_sum(torch.tensor(value)).item())
