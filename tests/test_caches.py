"""Caches go where the user's environment says (docs/runs_and_caches.md): HF_DATASETS_CACHE and
TORCH_EXTENSIONS_DIR set by the user are kept, never overridden, by the package, the CLI's re-execution
and the training code; with them set nothing is written under the home directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, sys
from defocus_vlm.cli import malloc_reexec_command
from defocus_vlm.data.classification import open_source
import defocus_vlm.training.loop  # everything a training run imports
from torch.utils.cpp_extension import _get_build_directory
source = open_source("imagefolder", sys.argv[1], "train")
env = (malloc_reexec_command() or (None, dict(os.environ)))[1]
print(json.dumps({"images": len(source), "build": _get_build_directory("probe", False),
                  "env": [os.environ.get(k) for k in ("HF_DATASETS_CACHE", "TORCH_EXTENSIONS_DIR")],
                  "reexec_env": [env.get(k) for k in ("HF_DATASETS_CACHE", "TORCH_EXTENSIONS_DIR")]}))
"""


def test_user_cache_locations_are_respected(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "data" / "train" / cls / "0.png")
    datasets_cache, extensions, home = tmp_path / "hf-datasets", tmp_path / "torch-ext", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "XDG_CACHE_HOME", "HF_DATASETS_CACHE")}
    env.update(HOME=str(home), HF_DATASETS_CACHE=str(datasets_cache), TORCH_EXTENSIONS_DIR=str(extensions),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "data")], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["images"] == 2
    assert found["env"] == found["reexec_env"] == [str(datasets_cache), str(extensions)]
    assert found["build"].startswith(str(extensions))
    assert any(datasets_cache.rglob("*.arrow"))  # the imagefolder's cache went where the user said
    assert not (home / ".cache" / "huggingface" / "datasets").exists()
