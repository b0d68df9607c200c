"""Progress bar (loss, LR, throughput, ETA), TensorBoard scalars, a JSONL history and a
training-curve PNG. Only process 0 writes anything."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

HISTORY_FILE = "history.jsonl"


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        initial_step: int,
        enabled: bool,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = self.bar = None
        self.t0, self.step0 = time.time(), initial_step
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self.writer = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True
            )

    def step(self, step: int, scalars: dict, images: int) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            elapsed = max(time.time() - self.t0, 1e-9)
            rate = (step - self.step0) * images / elapsed
            self.bar.set_postfix(
                loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}", img_s=f"{rate:.0f}"
            )
            self.bar.update(1)
        with open(self.run_dir / HISTORY_FILE, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def scalars(self, prefix: str, step: int, values: dict) -> None:
        if self.enabled and self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        if self.enabled:
            with open(self.run_dir / HISTORY_FILE, "a") as f:
                f.write(json.dumps({"step": step, prefix: values}) + "\n")

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def trim_history(history_file: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (a resumed run's checkpoint): a run killed after it
    logged later steps would otherwise leave them twice. A last line cut off mid-write goes too."""
    if not history_file.is_file():
        return
    kept = []
    for line in history_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = history_file.with_name(history_file.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, history_file)


def plot_curve(history_file: Path, out: Path, metric: str | None = "top1") -> Path | None:
    """Loss and LR per step, and the validation ``metric`` per evaluation: one PNG."""
    if not history_file.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, lrs, ev_steps, ev_top1 = [], [], [], [], []
    seen = {}
    for line in history_file.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            seen[rec["step"]] = (rec["loss"], rec["lr"])  # a resumed run rewrites later steps
        elif metric and metric in rec.get("val", {}):
            ev_steps.append(rec["step"])
            ev_top1.append(rec["val"][metric])
    for s in sorted(seen):
        steps.append(s)
        losses.append(seen[s][0])
        lrs.append(seen[s][1])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(steps, losses)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot(steps, lrs)
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot(ev_steps, ev_top1, marker="o")
    axes[2].set(title=f"val {metric}", xlabel="step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
