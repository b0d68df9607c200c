"""One run per output directory, checked with real processes: a live holder refuses a second run (naming
its pid), including ``defocus-vlm train`` before it trains; after ``kill -9`` of the holder the next run
takes the lock over and says whose it was."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from defocus_vlm.run_lock import LOCK_FILE, RunDirError, RunLock

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from defocus_vlm.run_lock import RunLock; lock = RunLock(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(600)")


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    first = _holder(run)
    try:
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid
        second = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(run)],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"is in use by another run (pid {first.pid} on " in second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    # the dead holder's record is still in the file, but the kernel released its lock
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid
    lock = RunLock(run)
    try:
        assert f"took over the lock of a run that is no longer running (pid {first.pid} on " in lock.message()
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    again = RunLock(run)  # released cleanly: nothing to take over
    assert again.message() is None
    again.release()


def test_train_refuses_a_directory_another_run_holds(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        cli = subprocess.run(
            [sys.executable, "-m", "defocus_vlm.cli", "train", "classification", "--config", "tiny_cpu",
             f"train.output_dir={run}", "train.progress=false"],
            capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "DEFOCUS_MALLOC_TUNING": "0"})
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert cli.returncode == 2, cli.stderr[-2000:]
    errors = [line for line in cli.stderr.splitlines() if "error:" in line]
    assert errors == [f"defocus-vlm train: error: {run} is in use by another run (pid {holder.pid} on "
                      f"{errors[0].split(' on ', 1)[1].split(',')[0]}, started {errors[0].split('started ')[1]}"]
    assert "train.output_dir" in errors[0]
    assert not (run / "config.yaml").exists()  # nothing of the holder's directory was touched


def test_lock_in_the_same_process_is_exclusive_too(tmp_path):
    lock = RunLock(tmp_path)
    with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path)
    lock.release()


@contextlib.contextmanager
def _read_only(path: Path):
    """``path`` cannot be written, even by root (whose rights ignore permission bits): immutable then."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield
        path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
        pytest.skip("running as root, and chattr +i is not available to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_checkpoints_folder_is_one_line_before_training(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with _read_only(run / "checkpoints"):
        cli = subprocess.run(
            [sys.executable, "-m", "defocus_vlm.cli", "train", "classification", "--config", "tiny_cpu",
             f"train.output_dir={run}", "train.progress=false"],
            capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "DEFOCUS_MALLOC_TUNING": "0"})
    assert cli.returncode == 2, cli.stderr[-2000:]
    errors = [line for line in cli.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.fullmatch(
        f"defocus-vlm train: error: cannot write to {re.escape(str(run / 'checkpoints'))} "
        r"\((Permission denied|Operation not permitted)\): the checkpoints folder of train.output_dir must be a "
        "writable directory", errors[0]), errors
    assert not (run / "config.yaml").exists()
