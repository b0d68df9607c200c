"""``defocus-vlm bench models`` at tiny sizes (no timing asserts): the base config, its variants and timm
run interleaved; a variant's overrides reach its model; kernels=SPEC is a variant's backend, not an override;
bad variant specs are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from defocus_vlm.bench.models import parse_variant
from defocus_vlm.cli import main

torch.set_num_threads(1)
TINY = ["model.vision.overrides.depth=1"]


def test_bench_models_train_json(tmp_path, capsys):
    out = tmp_path / "models.json"
    assert main(["bench", "models", "--config", "fashion_defocus_vit", *TINY, "--batch-size", "4", "--repeats", "2",
                 "--variant", "no_rope", "model.vision.overrides.rope=none",
                 "--variant", "reference", "kernels=attention=reference", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["contenders"]
    assert list(rows) == ["base", "no_rope", "reference", "timm"]
    assert rows["no_rope"]["overrides"] == ["model.vision.overrides.rope=none"] and rows["no_rope"]["kernels"] is None
    assert rows["reference"] == rows["reference"] | {"overrides": [], "kernels": "attention=reference"}
    # the learnable RoPE's frequencies are parameters: switching it off leaves fewer
    assert rows["no_rope"]["params"] < rows["base"]["params"]
    for name, row in rows.items():
        assert row["median_ms"] > 0 and row["mem_mb"] > 0, name  # training mode: autograd saved tensors
    assert rows["base"]["ratio_vs_base"] == 1.0 and "ratio_vs_timm" in rows["base"]
    assert result["mode"] == "forward+backward" and result["batch"] == 4 and result["img_size"] == 28
    assert "| no_rope |" in capsys.readouterr().err  # the table


def test_bench_models_inference_without_timm(tmp_path):
    out = tmp_path / "models.json"
    assert main(["bench", "models", "--config", "fashion_defocus_mamba", *TINY, "--batch-size", "2", "--repeats", "1",
                 "--inference", "--no-timm", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["contenders"]) == ["base"] and result["mode"] == "inference"
    assert "ratio_vs_timm" not in result["contenders"]["base"]


@pytest.mark.parametrize("spec, message", [
    (["rope=none"], "expected a name first"),
    (["a", "kernels=reference", "kernels=attention=sdpa"], "one kernels=SPEC at most"),
])
def test_parse_variant_refuses(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(spec)


def test_bench_models_refuses_a_reserved_name(capsys):
    assert main(["bench", "models", "--config", "fashion_defocus_vit", *TINY, "--variant", "timm"]) == 2
    assert "must be unique" in capsys.readouterr().err


def test_bench_models_refuses_a_variant_with_other_images(capsys):
    assert main(["bench", "models", "--config", "fashion_defocus_vit", *TINY,
                 "--variant", "big", "data.img_size=32"]) == 2
    assert "differs from the config's" in capsys.readouterr().err
