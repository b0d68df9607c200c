"""Section ``training``: images/s of bf16 training, batch 128 at 224 px on one GPU, with the project's
own loop (training/loop.py: DeepSpeed engine, ZeRO-0 and ZeRO-2) on synthetic data kept on the device
(training/synthetic.py), against timm's ``deit_small_patch16_224`` trained by a plain PyTorch loop
(bf16 autocast, AdamW, the same clipping) on the identical batches. Goals: De-focus ViT-S >= 0.8x
DeiT-S, De-focus Mamba-S >= 0.5x (RetNet-S is reported). Peak memory: the most the run allocated
above what was allocated before it (CUDA only).

Both sides use the same recipe minus what the plain loop lacks: no EMA, no mixup / cutmix, no label
smoothing, drop-path 0.1, AdamW with weight decay 0.05, gradient-norm clipping at 10."""

from __future__ import annotations

import gc
import tempfile
import time

import torch
import torch.nn.functional as F

from .context import Outcome, SectionContext
from .report import INFO, NO_CUDA, Goal

PRESETS = {"defocus_vit_small": Goal(">=", 0.8, "x DeiT-S"), "defocus_mamba_small": Goal(">=", 0.5, "x DeiT-S"),
           "defocus_retnet_small": None}
ZERO_STAGES = ("zero0", "zero2")
BASELINE = "deit_small_patch16_224"
# batch, image side, warm-up steps (compilation, autotuning), timed steps, number of distinct batches
GPU_SIZES = dict(batch=128, img=224, warmup=3, timed=10, pool=2)
DRY_SIZES = dict(batch=4, img=32, warmup=1, timed=2, pool=2)
# the dry run's models: every preset shrunk (width 64, 2 blocks), on 32 px images (4 patches of 16 px)
DRY_OVERRIDES = "{embed_dim: 64, depth: 2, num_heads: 2, d_state: 8, dt_rank: 8, group_norm_size: 16}"
DRY_TIMM = dict(embed_dim=64, depth=2, num_heads=2)  # DeiT-S shrunk the same way
NUM_CLASSES = 1000
SEED = 0


class _Memory:
    """Peak bytes allocated during the block, above what was allocated when it began (CUDA)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_gib = device, None

    def __enter__(self) -> _Memory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_gib = (torch.cuda.max_memory_allocated() - self.base) / 2**30


def _overrides(preset: str, zero: str, sizes: dict, out_dir: str, dry: bool) -> list[str]:
    steps = sizes["warmup"] + sizes["timed"]
    items = [f"model.vision.source={preset}", f"data.img_size={sizes['img']}", "data.in_chans=3", "data.verify=0",
             "augment.mixup=0", "augment.cutmix=0", "augment.label_smoothing=0", "augment.repeated_aug=0",
             f"train.batch_size={sizes['batch']}", f"train.max_steps={steps}", "train.epochs=1",
             "train.ema_decay=0", f"train.deepspeed={zero}", "train.precision=bf16", "train.progress=false",
             "train.tensorboard=false", f"train.output_dir={out_dir}", "train.drop_path_min=0.1",
             "train.drop_path_max=0.1", "train.drop_path_schedule=constant", "train.eval_every=0",
             "train.keep_checkpoints=1", "optim.warmup_epochs=0", "optim.weight_decay=0.05",
             "optim.clip_grad=10.0", f"train.seed={SEED}"]
    if dry:
        items += [f"model.vision.overrides={DRY_OVERRIDES}", "train.cpu_threads=1"]
    return items


def project_loop(preset: str, zero: str, sizes: dict, dev: torch.device, dry: bool) -> dict:
    """images/s and peak memory of the project's training loop on synthetic data."""
    from defocus_vlm.training.config import load_config
    from defocus_vlm.training.loop import run_stage
    from defocus_vlm.training.synthetic import SyntheticClassificationTask

    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as out_dir:
        cfg = load_config(None, _overrides(preset, zero, sizes, out_dir, dry))
        task = SyntheticClassificationTask(cfg, num_classes=NUM_CLASSES, pool=sizes["pool"])
        with _Memory(dev) as mem:
            summary = run_stage(task, cfg)
        rate = task.images_per_second(sizes["warmup"])
    del task
    return {"img_per_s": rate, "peak_gib": mem.peak_gib, "zero_stage": summary["zero_stage"],
            "losses": summary["losses"], "steps": summary["steps"]}


def plain_timm_loop(sizes: dict, dev: torch.device, dry: bool) -> dict:
    """DeiT-S, the reference point: a plain loop on the same batches the project's loop gets."""
    import timm

    from defocus_vlm.training.synthetic import synthetic_batches

    with _Memory(dev) as mem:  # the data counts on both sides: the project's task makes its batches inside
        batches = synthetic_batches(sizes["pool"], sizes["batch"], 3, sizes["img"], NUM_CLASSES, SEED, dev)
        torch.manual_seed(SEED)
        model = timm.create_model(BASELINE, pretrained=False, img_size=sizes["img"], num_classes=NUM_CLASSES,
                                  drop_path_rate=0.1, **(DRY_TIMM if dry else {})).to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
        ends, losses = [], []
        for step in range(sizes["warmup"] + sizes["timed"]):
            x, y = batches[step % len(batches)]
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # waits for the step, as the project's loop does
            ends.append(time.perf_counter())
    warm = sizes["warmup"]
    rate = sizes["timed"] * sizes["batch"] / (ends[-1] - ends[warm - 1])
    del model, opt, batches
    return {"img_per_s": rate, "peak_gib": mem.peak_gib, "losses": losses}


def _mem(gib: float | None) -> str:
    return f"{gib:.1f} GiB" if gib is not None else "peak n/a on CPU"


def run(ctx: SectionContext) -> None:
    sizes = DRY_SIZES if ctx.dry_run else GPU_SIZES
    base_name = f"DeiT-S ({BASELINE}) plain PyTorch loop, bf16 autocast"
    runs = [(preset, zero) for zero in ZERO_STAGES for preset in PRESETS]  # ZeRO-0 of all three first
    names = {r: f"{r[0]} ZeRO-{r[1][-1]} / DeiT-S (batch {sizes['batch']}, {sizes['img']} px)" for r in runs}
    ctx.plan([base_name, *names.values()])
    min_left = 20.0 if ctx.cuda else 0.0
    base = ctx.check(base_name, "none: the reference point",
                     lambda: _baseline_row(plain_timm_loop(sizes, ctx.device, ctx.dry_run), ctx), min_seconds=min_left)
    base_rate = base.details["img_per_s"] if base is not None else None
    for preset, zero in runs:
        goal = PRESETS[preset]
        ctx.check(names[(preset, zero)], str(goal) if goal else "none (reported)",
                  lambda p=preset, z=zero, g=goal: _ratio_row(project_loop(p, z, sizes, ctx.device, ctx.dry_run),
                                                              base_rate, g, ctx),
                  min_seconds=min_left)


def _baseline_row(res: dict, ctx: SectionContext) -> Outcome:
    return ctx.info(f"{res['img_per_s']:.0f} img/s, {_mem(res['peak_gib'])}", res)


def _ratio_row(res: dict, base_rate: float | None, goal: Goal | None, ctx: SectionContext) -> Outcome:
    ratio = res["img_per_s"] / base_rate if base_rate else None
    value = (f"{ratio:.2f}x" if ratio is not None else "- (no DeiT-S rate)") + (
        f" ({res['img_per_s']:.0f} img/s, {_mem(res['peak_gib'])})")
    status = ctx.judge(ratio, goal) if goal is not None else (INFO if ctx.cuda else NO_CUDA)
    return Outcome(value, status, {**res, "ratio": ratio, "deit_img_per_s": base_rate})
