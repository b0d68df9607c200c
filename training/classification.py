"""Stage 1: classification pretraining (PAPER.md §3) on a DeepSpeed engine.

``run(cfg, resume=False)`` trains, checkpoints, evaluates (raw and EMA) and exports; it returns
a summary with the per-step losses (used by the tests)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .augment import EvalTransform, TrainTransform, build_mixup, image_processor, make_targets
from .config import ClassificationRunConfig, ConfigError, config_to_dict
from .data import ClassificationDataset, DataError, EpochSampler, open_source, verify_source
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
from .export import export_classifier
from .logger import RunLogger, plot_curve
from .optim import build_optimizer, set_lr
from .schedules import drop_path_at, lr_at, scaled_lr


class _EvalSampler(torch.utils.data.Sampler):
    """Every ``world``-th index, no padding (so no sample is counted twice)."""

    def __init__(self, n: int, world: int, rank: int):
        self.idx = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.idx)

    def __iter__(self):
        return iter(self.idx)


def build_model_config(cfg: ClassificationRunConfig, classes: list[str]):
    from defocus_vlm import DefocusVisionConfig

    overrides = dict(cfg.model.overrides)
    for key in ("num_labels", "img_size", "in_chans", "id2label", "label2id"):
        if key in overrides:
            raise ConfigError(f"model.overrides.{key} is set from the data; remove it")
    id2label = {i: name for i, name in enumerate(classes)}
    try:
        return DefocusVisionConfig.from_preset(
            cfg.model.preset,
            num_labels=len(classes),
            img_size=cfg.data.img_size,
            in_chans=cfg.data.in_chans,
            patch_size=cfg.model.patch_size,
            aux_loss=cfg.model.aux_loss,
            id2label=id2label,
            label2id={v: k for k, v in id2label.items()},
            **overrides,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model config: {err}") from err


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % 2**31


def run(cfg: ClassificationRunConfig, resume: bool = False) -> dict:
    from defocus_vlm import DefocusVisionForImageClassification

    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    rank, world = init_distributed()
    is_main = rank == 0
    t, d = cfg.train, cfg.data
    run_dir = Path(t.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt.latest_tag(ckpt_dir) is not None:
            raise ConfigError(
                f"{run_dir} already holds checkpoints; pass --resume to continue, or choose "
                f"another train.output_dir"
            )
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    barrier()

    # ---- data: validated before anything is trained
    train_src = open_source(d.source, d.path, d.train_split, d.image_column, d.label_column)
    val_src = open_source(d.source, d.path, d.val_split, d.image_column, d.label_column)
    if d.verify:
        verify_source(train_src, d.verify, "train")
        verify_source(val_src, d.verify, "val")
    classes = train_src.classes
    train_ds = ClassificationDataset(train_src, TrainTransform(d, cfg.augment), d.on_corrupt, d.limit_train)
    val_ds = ClassificationDataset(val_src, EvalTransform(d), d.on_corrupt, d.limit_val)

    micro, accum = batch_layout(t.batch_size, t.micro_batch_size, world)
    mixup = build_mixup(cfg.augment, len(classes))
    if mixup is not None and micro % 2:
        raise ConfigError(f"mixup/cutmix need an even micro batch, got {micro}")
    sampler = EpochSampler(
        len(train_ds), world, rank, shuffle=True, seed=t.seed, repeats=cfg.augment.repeated_aug
    )
    steps_per_epoch = len(sampler.indices()) // (micro * accum)
    if steps_per_epoch == 0:
        raise DataError(
            f"{d.path}: {len(train_ds)} training images are fewer than one global batch ({t.batch_size})"
        )
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    peak_lr = (
        scaled_lr(cfg.optim.lr, t.batch_size, cfg.optim.lr_batch_ref) if cfg.optim.scale_lr else cfg.optim.lr
    )
    warmup_steps = min(int(round(cfg.optim.warmup_epochs * steps_per_epoch)), max(0, total_steps - 1))

    # ---- model, optimiser, engine
    torch.manual_seed(t.seed)
    model_config = build_model_config(cfg, classes)
    if cfg.model.init_from:
        model = DefocusVisionForImageClassification.from_pretrained(
            cfg.model.init_from, config=model_config, ignore_mismatched_sizes=True
        )
    else:
        model = DefocusVisionForImageClassification(model_config)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    bf16 = use_bf16(t.precision)
    optimizer = build_optimizer(model, cfg.optim, peak_lr)
    ds_cfg = deepspeed_config(t.deepspeed, t.batch_size, micro, accum, cfg.optim.clip_grad, bf16)
    engine = build_engine(model, optimizer, ds_cfg)
    stage = zero_stage(engine)
    if stage == 3 and t.ema_decay > 0:
        raise ConfigError("EMA needs full weights on every process: use ZeRO stage 0-2, or train.ema_decay=0")
    ema = ModelEMA(engine.module, t.ema_decay) if t.ema_decay > 0 else None
    dev, in_dtype = engine.device, (torch.bfloat16 if bf16 else torch.float32)

    epoch, step_in_epoch, global_step, losses, skipped_total = 0, 0, 0, [], 0
    if resume:
        state = ckpt.load(engine, ckpt_dir)
        if state is None:
            if is_main:
                print(f"no checkpoint under {ckpt_dir}; starting from scratch", flush=True)
        else:
            epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
            losses, skipped_total = list(state["losses"]), state.get("skipped", 0)
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])

    logger = RunLogger(run_dir, total_steps, global_step, is_main, t.tensorboard, t.progress)
    logger.write(
        f"classification: {model_config.preset} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"params | {len(train_ds)} train / {len(val_ds)} val images, {len(classes)} classes | "
        f"{world} process(es), ZeRO-{stage}, {'bf16' if bf16 else 'fp32'}, global batch {t.batch_size} = "
        f"{micro} x {world} x {accum} | peak LR {peak_lr:.3g}, {total_steps} steps, warm-up {warmup_steps}"
    )

    def client_state(next_epoch: int, next_step: int) -> dict:
        return {
            "epoch": next_epoch,
            "step_in_epoch": next_step,
            "global_step": global_step,
            "losses": losses,
            "skipped": skipped_total,
            "ema": ema.state_dict() if ema is not None else None,
            "total_steps": total_steps,
        }

    eval_model = copy.deepcopy(engine.module) if ema is not None else None

    def validate() -> dict:
        loader = DataLoader(
            val_ds,
            batch_size=t.eval_batch_size,
            sampler=_EvalSampler(len(val_ds), world, rank),
            num_workers=d.num_workers,
        )
        from defocus_vlm.eval.classification import evaluate

        out = {"raw": evaluate(engine.module, loader, dev, in_dtype, reduce=all_reduce_sum)}
        if ema is not None:
            ema.copy_to(eval_model)
            out["ema"] = evaluate(eval_model, loader, dev, in_dtype, reduce=all_reduce_sum)
        return out

    start_time = time.time()
    images_per_step = t.batch_size
    metrics: dict = {}
    done = global_step >= total_steps
    engine.train()
    while not done and epoch < t.epochs:
        sampler.set_epoch(epoch, start=step_in_epoch * micro * accum)
        loader = DataLoader(
            train_ds, batch_size=micro, sampler=sampler, num_workers=d.num_workers, drop_last=True
        )
        batches = iter(loader)
        drop_path = drop_path_at(epoch, t.epochs, t.drop_path_min, t.drop_path_max, t.drop_path_schedule)
        for step in range(step_in_epoch, steps_per_epoch):
            lr = lr_at(global_step, total_steps, warmup_steps, peak_lr, cfg.optim.warmup_lr, cfg.optim.min_lr)
            set_lr(optimizer, lr)
            step_loss, skipped = 0.0, 0
            for m in range(accum):
                x, y, skip = next(batches)
                skipped += int(skip.gt(0).sum())
                seed = _step_seed(t.seed, global_step, m, rank)
                torch.manual_seed(seed)
                np.random.seed(seed)
                x, target = make_targets(x, y, mixup, cfg.augment, len(classes))
                out = engine(
                    pixel_values=x.to(dev, in_dtype), labels=target.to(dev), drop_path_rate=drop_path
                )
                engine.backward(out.loss)
                engine.step()
                step_loss += float(out.loss.detach().float()) / accum
            global_step += 1
            step_loss = all_reduce_mean(step_loss)
            skipped_total += int(all_reduce_sum(torch.tensor(skipped)).item())
            losses.append(step_loss)
            if not np.isfinite(step_loss):
                raise FloatingPointError(
                    f"loss is {step_loss} at step {global_step}; lower optim.lr or check the data"
                )
            if ema is not None:
                ema.update(engine.module)
            logger.step(
                global_step,
                {
                    "loss": step_loss,
                    "lr": lr,
                    "drop_path": drop_path,
                    "epoch": epoch,
                    "skipped_images": skipped_total,
                },
                images_per_step,
            )
            last_in_epoch = step + 1 == steps_per_epoch
            done = global_step >= total_steps
            if (
                t.checkpoint_every
                and global_step % t.checkpoint_every == 0
                and not last_in_epoch
                and not done
            ):
                ckpt.save(engine, ckpt_dir, global_step, client_state(epoch, step + 1), t.keep_checkpoints)
            if t.stop_after and global_step == t.stop_after and not done:
                if not last_in_epoch:
                    ckpt.save(
                        engine, ckpt_dir, global_step, client_state(epoch, step + 1), t.keep_checkpoints
                    )
                else:
                    ckpt.save(engine, ckpt_dir, global_step, client_state(epoch + 1, 0), t.keep_checkpoints)
                logger.write(f"stopped after step {global_step} (train.stop_after); continue with --resume")
                logger.close()
                barrier()
                return {
                    "steps": global_step,
                    "losses": losses,
                    "interrupted": True,
                    "world_size": world,
                    "zero_stage": stage,
                }
            if done:
                break
        epoch, step_in_epoch = epoch + 1, 0
        ckpt.save(engine, ckpt_dir, global_step, client_state(epoch, 0), t.keep_checkpoints)
        if done or (t.eval_every and epoch % t.eval_every == 0):
            metrics = validate()
            logger.scalars("val", global_step, {"epoch": epoch, **metrics["raw"]})
            if "ema" in metrics:
                logger.scalars("val_ema", global_step, metrics["ema"])
            logger.write(
                f"epoch {epoch}: val top-1 {metrics['raw']['top1']:.2f}"
                + (f" (EMA {metrics['ema']['top1']:.2f})" if "ema" in metrics else "")
            )
    if not metrics:
        metrics = validate()
    wall = time.time() - start_time
    logger.close()

    # ---- export (process 0): main = EMA when kept, raw/ beside it
    export_dir = run_dir / "model"
    if is_main:
        processor = image_processor(d)
        raw_state = engine.module.state_dict()
        if ema is not None:
            export_classifier(model_config, {**raw_state, **ema.state_dict()}, processor, export_dir)
            export_classifier(model_config, raw_state, processor, export_dir / "raw")
        else:
            export_classifier(model_config, raw_state, processor, export_dir)
        plot_curve(run_dir / "history.jsonl", run_dir / "training_curve.png")
    summary = {
        "steps": global_step,
        "losses": losses,
        "val": metrics,
        "wall_s": round(wall, 2),
        "skipped_images": skipped_total,
        "export": str(export_dir),
        "world_size": world,
        "zero_stage": stage,
    }
    if is_main:
        (run_dir / "metrics.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2) + "\n"
        )
        (run_dir / "losses.json").write_text(json.dumps(losses) + "\n")
    barrier()
    return summary
