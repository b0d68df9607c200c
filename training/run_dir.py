"""What a run directory holds besides checkpoints and logs: the run's config, never overwritten once a
checkpoint exists, and a record of every ``--resume``.

``config.yaml`` is written when a run starts from scratch. ``--resume`` compares the new config with the
one saved in the latest checkpoint (``fields.resume_changes``): a changed field that the data order, the
model or the optimiser state depends on is refused, listing every such difference, before DeepSpeed is
touched; changes of fields declared ``resume_free`` (logging, checkpoint and eval cadence, workers,
``train.stop_after``) are allowed, and each resume is recorded as ``config.resume-<n>.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from defocus_vlm.run_lock import writable_dir

from . import checkpoint as ckpt
from .config import ConfigError, config_to_dict
from .fields import resume_changes

CONFIG_FILE = "config.yaml"


def config_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def saved_config(checkpoint: Path, run_dir: Path) -> tuple[dict, Path]:
    """The config that wrote ``checkpoint`` (checkpoints of earlier versions: the run's config.yaml)."""
    for path in (checkpoint / ckpt.CONFIG_FILE, run_dir / CONFIG_FILE):
        if path.is_file():
            try:
                saved = yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML ({err}); expected the config saved by the run") from None
            if isinstance(saved, dict):
                return saved, path
    raise ConfigError(f"--resume: no saved config beside {checkpoint} (expected {checkpoint / ckpt.CONFIG_FILE} "
                      f"or {run_dir / CONFIG_FILE}) to check the new one against")


def check_resume(cfg: Any, checkpoint: Path, run_dir: Path) -> list[str]:
    """The allowed changes of ``cfg`` against the checkpoint's config; :class:`ConfigError` listing the
    refused ones."""
    saved, path = saved_config(checkpoint, run_dir)
    fixed, allowed = resume_changes(saved, cfg)
    if fixed:
        raise ConfigError(f"--resume with a changed config: {'; '.join(fixed)}. These change the data order, the "
                          f"model or the optimiser state of the run in {run_dir}, so it cannot continue exactly; "
                          f"resume with the values of {path}, or start a new run in another train.output_dir")
    return allowed


def prepare(run_dir: Path, cfg: Any, resume: bool) -> None:
    """Check the run directory and its checkpoints folder can be written, then write the config (a new
    run) or check and record it (a resumed one). Process 0 only."""
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.exists():
        writable_dir(ckpt_dir, "the checkpoints folder of train.output_dir")
    checkpoint = ckpt.latest_dir(ckpt_dir)
    if checkpoint is not None and not resume:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue, or choose another "
                          f"train.output_dir")
    if checkpoint is None:  # a new run (or --resume before the first checkpoint: nothing to continue)
        (run_dir / CONFIG_FILE).write_text(config_yaml(cfg))
        return
    allowed = check_resume(cfg, checkpoint, run_dir)
    n = 1 + sum(1 for _ in run_dir.glob("config.resume-*.yaml"))
    record = run_dir / f"config.resume-{n}.yaml"
    header = f"# resume {n} from {checkpoint.name}; changed: {', '.join(allowed) if allowed else 'nothing'}\n"
    record.write_text(header + config_yaml(cfg))
    if allowed:
        print(f"resuming {run_dir} with {', '.join(allowed)} (recorded in {record.name})", flush=True)
