"""The converter against an independent float64 re-derivation of the official De-focus Mamba
forward (written from the official repository's description, op by op, with explicit loops)."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from defocus_vlm.cli import main
from defocus_vlm.convert_official import (
    CheckpointError,
    convert,
    infer_config,
    load_official_checkpoint,
    load_official_state_dict,
)
from defocus_vlm.modeling_defocus import DefocusVisionForImageClassification

DIM, INNER, N, RANK, K, DEPTH, PATCH, CLASSES = 32, 128, 16, 8, 4, 2, 4, 7


def official_state_dict(mlp_head: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.1: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    sd = {"patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": r(DIM),
          "cls_token": r(1, 1, DIM, scale=0.02), "norm.weight": 1 + r(DIM), "norm.bias": r(DIM)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        k = torch.arange(1, N + 1, dtype=torch.float64)
        sd |= {
            p + "norm.weight": 1 + r(DIM),
            p + "mixer.A_log": torch.log(k).repeat(INNER, 1) + r(INNER, N),
            p + "mixer.D": 1 + r(INNER),
            p + "mixer.freq": (100.0 ** (-k / N) - 0.01) / 0.99 + r(N, scale=0.01),
            p + "mixer.conv1d.weight": r(INNER, 1, K, scale=0.3), p + "mixer.conv1d.bias": r(INNER),
            p + "mixer.in_proj.weight": r(2 * INNER, DIM, scale=0.2),
            p + "mixer.x_proj.weight": r(RANK + 2 * N, INNER, scale=0.2),
            p + "mixer.dt_proj.weight": r(INNER, RANK, scale=0.3), p + "mixer.dt_proj.bias": r(INNER) - 4,
            p + "mixer.out_proj.weight": r(DIM, INNER, scale=0.2),
        }
    for head in ("head", "head2"):
        if mlp_head:
            sd |= {f"{head}.0.weight": r(3 * DIM, DIM), f"{head}.0.bias": r(3 * DIM),
                   f"{head}.2.weight": r(CLASSES, 3 * DIM), f"{head}.2.bias": r(CLASSES)}
        else:
            sd |= {f"{head}.weight": r(CLASSES, DIM), f"{head}.bias": r(CLASSES)}
    # official checkpoints are float32: round so both sides start from the same numbers
    return {k: v.float().double() for k, v in sd.items()}


def official_forward(sd: dict[str, torch.Tensor], img: torch.Tensor, mlp_head: bool = False, delta_scale: float = 1.0,
                     rope_scale: float = 1.0, group: int = 64) -> torch.Tensor:
    """Returns the official output (B, L, C): head2 on every patch token, head on the last (cls).
    ``delta_scale`` divides Delta and ``rope_scale`` the RoPE position, as the official resolution
    transfer does; ``group`` is the size of the group RMS norm."""
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # row-major patches
    x = torch.cat([x, sd["cls_token"].expand(x.shape[0], 1, DIM)], dim=1)  # class token last
    length = x.shape[1]
    for i in range(DEPTH):
        p = f"blocks.{i}.mixer."
        w = sd[f"blocks.{i}.norm.weight"]
        h = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w
        xz = h @ sd[p + "in_proj.weight"].T
        u, z = xz[..., :INNER], xz[..., INNER:]
        conv_w, conv_b = sd[p + "conv1d.weight"][:, 0], sd[p + "conv1d.bias"]
        uc = torch.zeros_like(u)
        for t in range(length):  # causal depthwise conv, explicit taps
            acc = conv_b.clone().expand_as(u[:, t]).clone()
            for j in range(K):
                src = t - (K - 1) + j
                if src >= 0:
                    acc = acc + conv_w[:, j] * u[:, src]
            uc[:, t] = acc
        u = uc * torch.sigmoid(uc)
        dbc = u @ sd[p + "x_proj.weight"].T
        dt, b_in, c_in = dbc[..., :RANK], dbc[..., RANK:RANK + N], dbc[..., RANK + N:]
        freq = sd[p + "freq"]

        def rope(v: torch.Tensor, freq: torch.Tensor = freq) -> torch.Tensor:
            out = torch.empty_like(v)
            for t in range(length):
                for pair in range(N // 2):
                    a, b = 2 * pair, 2 * pair + 1
                    pos = t / rope_scale
                    out[:, t, a] = v[:, t, a] * math.cos(pos * freq[a]) - v[:, t, b] * math.sin(pos * freq[a])
                    out[:, t, b] = v[:, t, b] * math.cos(pos * freq[b]) + v[:, t, a] * math.sin(pos * freq[b])
            return out

        b_in, c_in = rope(b_in), rope(c_in)
        delta = F.softplus(dt @ sd[p + "dt_proj.weight"].T + sd[p + "dt_proj.bias"]) / delta_scale
        a = -torch.exp(sd[p + "A_log"])
        state = torch.zeros(x.shape[0], INNER, N, dtype=x.dtype)
        ys = []
        for t in range(length):
            inp = delta[:, t, :, None] * b_in[:, t, None, :] * u[:, t, :, None]
            state = torch.exp(delta[:, t, :, None] * a) * state + inp
            ys.append((state * c_in[:, t, None, :]).sum(-1))
        y = torch.stack(ys, dim=1)  # (B, L, E)
        groups = y.reshape(*y.shape[:2], INNER // group, group)
        y = (groups / torch.sqrt((groups**2).mean(-1, keepdim=True) + 1e-6)).reshape_as(y)
        y = (y + sd[p + "D"] * u) * (z * torch.sigmoid(z))
        x = x + y @ sd[p + "out_proj.weight"].T
    x = F.layer_norm(x, (DIM,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)

    def head(name: str, v: torch.Tensor) -> torch.Tensor:
        if mlp_head:
            v = torch.tanh(v @ sd[f"{name}.0.weight"].T + sd[f"{name}.0.bias"])
            return v @ sd[f"{name}.2.weight"].T + sd[f"{name}.2.bias"]
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    return torch.cat([head("head2", x[:, :-1]), head("head", x[:, -1:])], dim=1)


@pytest.mark.parametrize("mlp_head", [False, True])
def test_converted_model_matches_official_forward(tmp_path, mlp_head):
    sd = official_state_dict(mlp_head)
    path = tmp_path / "official.pth"
    torch.save({"model": {k: v.float() for k, v in sd.items()}, "model_ema": sd, "epoch": 3}, path)
    model = convert(path, tmp_path / "hf", ema=True, img_size=16).double()
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = official_forward(sd, img, mlp_head)
    with torch.no_grad():
        out = model(img)
        tokens = model.defocus(img).last_hidden_state
    assert torch.allclose(out.logits, expected[:, -1], atol=1e-10, rtol=1e-8)
    aux = model.aux_head(model.defocus.encoder.patch_tokens(tokens))
    assert torch.allclose(aux, expected[:, :-1], atol=1e-10, rtol=1e-8)
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.aux_loss) == (
        DIM, DEPTH, INNER, N, RANK, "token")
    assert cfg.head_type == ("mlp" if mlp_head else "linear")


def test_converted_directory_loads_with_auto_class(tmp_path):
    from transformers import AutoModelForImageClassification

    sd = official_state_dict()
    torch.save({"model": {k: v.float() for k, v in sd.items()}}, tmp_path / "o.pth")
    model = convert(tmp_path / "o.pth", tmp_path / "hf", img_size=16)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    img = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(img).logits, model(img).logits, atol=1e-6)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    sd = official_state_dict()
    sd["blocks.1.mixer.out_proj.weight"] = torch.zeros(DIM, INNER + 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mixer\.out_proj\.weight.*\(32, 128\).*\(32, 129\)"):
        convert(tmp_path / "bad.pth", tmp_path / "out", img_size=16)


def test_missing_key_is_named(tmp_path):
    sd = official_state_dict()
    del sd["blocks.1.mixer.D"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.1\.mixer\.D'"):
        convert(tmp_path / "missing.pth", tmp_path / "out", img_size=16)


def test_truncated_file_and_missing_ema(tmp_path):
    sd = official_state_dict()
    torch.save({"model": sd}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_official_state_dict(tmp_path / "trunc.pth")
    with pytest.raises(CheckpointError, match="model_ema"):
        load_official_state_dict(tmp_path / "full.pth", ema=True)
    with pytest.raises(FileNotFoundError):
        load_official_state_dict(tmp_path / "nope.pth")


def test_infer_config_reads_sizes_and_scale_factors():
    cfg = infer_config(official_state_dict(), img_size=32, rope_scale_factor=4.0, delta_scale_factor=2.0)
    assert (cfg.patch_size, cfg.in_chans, cfg.num_labels, cfg.img_size) == (PATCH, 3, CLASSES, 32)
    assert (cfg.rope_scale_factor, cfg.delta_scale_factor) == (4.0, 2.0)


def test_cli_reports_error_without_traceback(tmp_path, capsys):
    sd = official_state_dict()
    del sd["patch_embed.proj.weight"]
    torch.save(sd, tmp_path / "x.pth")
    assert main(["convert-official", str(tmp_path / "x.pth"), str(tmp_path / "out")]) == 2
    assert "missing key 'patch_embed.proj.weight'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- full training checkpoints
class StandInCfgNode(dict):
    """Pickles like yacs' CfgNode (a dict subclass with bookkeeping in __dict__), without yacs installed."""

    def __init__(self, values: dict):
        super().__init__({k: StandInCfgNode(v) if isinstance(v, dict) else v for k, v in values.items()})
        self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__renamed_keys__": {},
                              "__new_allowed__": False})


StandInCfgNode.__module__, StandInCfgNode.__qualname__ = "yacs.config", "CfgNode"


def official_config(**mamba) -> dict:
    """The shape of the official config tree (classification/utils/config.py) at test size, with the
    settings of the 384 px Large fine-tune (configs/defocus_mamba_large.yaml)."""
    return {
        "DATA": {"IMG_SIZE": 16, "BATCH_SIZE": 32, "DATA_PATH": "path/to/imagenet1k"},
        "MODEL": {"TYPE": "mamba", "NAME": "defocus_mamba_large", "NUM_CLASSES": CLASSES, "depth": DEPTH,
                  "use_rope": True, "use_pos_embed": False, "use_aux_loss": True, "head_type": "IN22kto1k_cls",
                  "patch_embed_change_res": False,
                  "MAMBA": {"state_size": N, "conv_kernel": K, "intermediate_size": INNER, "time_step_rank": RANK,
                            "group_norm_size": 32, "delta_scale_factor": 2.0, "rope_scale_factor": 4.0, **mamba}},
        "TRAIN": {"EPOCHS": 20, "BASE_LR": 2e-5, "OPTIMIZER": {"NAME": "adamw", "BETAS": (0.9, 0.999)}},
        "AUG": {"AUTO_AUGMENT": None},
    }


def save_training_checkpoint(path, monkeypatch, config: dict, **extra) -> tuple[dict, dict]:
    """A checkpoint laid out as the official save_checkpoint_ema writes it; returns (raw, ema) weights."""
    raw, ema = official_state_dict(mlp_head=True, seed=1), official_state_dict(mlp_head=True, seed=2)
    yacs = types.ModuleType("yacs")
    yacs.config = types.ModuleType("yacs.config")
    yacs.config.CfgNode = StandInCfgNode
    with monkeypatch.context() as m:  # importable only while pickling: reading must not need it
        m.setitem(sys.modules, "yacs", yacs)
        m.setitem(sys.modules, "yacs.config", yacs.config)
        torch.save({"model": {k: v.float() for k, v in raw.items()},
                    "model_ema": {k: v.float() for k, v in ema.items()},
                    "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                                  "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999), "params": [0]}]},
                    "lr_scheduler": {"t_initial": 20, "base_values": [2e-5], "noise_range_t": None},
                    "max_accuracy": 85.9, "scaler": {"scale": 65536.0}, "epoch": 19,
                    "config": StandInCfgNode(config), **extra}, path)
    assert "yacs" not in sys.modules
    return raw, ema


def test_training_checkpoint_config_sets_size_factors_norm_and_head(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_epoch_19.pth"
    _, ema = save_training_checkpoint(path, monkeypatch, official_config())
    with pytest.raises(pickle.UnpicklingError, match="yacs.config.CfgNode"):  # why a restricted unpickler is needed
        torch.load(path, weights_only=True)
    config = load_official_checkpoint(path).config
    assert type(config) is dict and type(config["MODEL"]["MAMBA"]) is dict  # plain dicts, not the stand-in
    assert config["TRAIN"]["OPTIMIZER"]["BETAS"] == (0.9, 0.999) and "yacs" not in sys.modules
    notes: list[str] = []
    model = convert(path, tmp_path / "hf", say=notes.append).double()  # no flags at all
    cfg = model.config
    assert (cfg.img_size, cfg.delta_scale_factor, cfg.rope_scale_factor, cfg.group_norm_size, cfg.head_type) == (
        16, 2.0, 4.0, 32, "mlp")
    assert notes == [f"converting 'model_ema' (the EMA weights, which the official evaluation reports) of {path}; "
                     f"--raw converts 'model' instead",
                     "from the checkpoint's training config: img_size=16, delta_scale_factor=2.0, "
                     "rope_scale_factor=4.0, group_norm_size=32, head_type=mlp"]
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected = official_forward(ema, img, mlp_head=True, delta_scale=2.0, rope_scale=4.0, group=32)
    with torch.no_grad():
        assert torch.allclose(model(img).logits, expected[:, -1], atol=1e-10, rtol=1e-8)
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == 16  # the image processor resizes to the training size


def test_flags_override_the_checkpoint_config_and_say_so(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ckpt.pth"
    raw, _ = save_training_checkpoint(path, monkeypatch, official_config())
    assert main(["convert-official", str(path), str(tmp_path / "hf"), "--raw", "--img-size", "32",
                 "--delta-scale-factor", "4"]) == 0
    out = capsys.readouterr().out
    assert "note: img_size=32 as given, instead of the checkpoint's DATA.IMG_SIZE = 16" in out
    assert ("note: delta_scale_factor=4.0 as given, instead of the checkpoint's MODEL.MAMBA.delta_scale_factor "
            "= 2.0") in out
    assert "model_ema" not in out and "32px, delta/rope scale 4/4" in out
    model = DefocusVisionForImageClassification.from_pretrained(tmp_path / "hf")
    assert torch.equal(model.defocus.encoder.norm.weight, raw["norm.weight"].float())  # --raw: 'model', not the EMA


def test_config_of_another_run_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_training_checkpoint(path, monkeypatch, official_config(intermediate_size=2 * INNER))
    with pytest.raises(CheckpointError, match=re.escape(
            f"{path}: config MODEL.MAMBA.intermediate_size is 256 but the weights say 128; expected the config of "
            f"the run that wrote these weights")):
        convert(path, tmp_path / "hf")


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
def test_planted_global_is_refused_without_running_it(tmp_path, monkeypatch, capsys, protocol):
    marker, path = tmp_path / "it-ran", tmp_path / "planted.pth"
    sd = official_state_dict()
    torch.save({"model": sd, "hook": RunsAShellCommand(marker)}, path, pickle_protocol=protocol)
    assert main(["convert-official", str(path), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"defocus-vlm convert-official: error: refusing to read {path}: its pickle references "
                           f"{os.system.__module__}.system, which is not a tensor, a plain container or a yacs config; "
                           f"expected an official checkpoint")
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_ema_is_preferred_and_required_or_refused_on_request(tmp_path):
    sd = official_state_dict()
    torch.save({"model": sd}, tmp_path / "raw_only.pth")
    notes: list[str] = []
    convert(tmp_path / "raw_only.pth", tmp_path / "a", img_size=16, say=notes.append)
    assert notes == []  # nothing to choose, and the size was given
    with pytest.raises(CheckpointError, match=r"--ema asked for, but .*raw_only\.pth has no 'model_ema' entry"):
        convert(tmp_path / "raw_only.pth", tmp_path / "b", ema=True)
    torch.save(sd, tmp_path / "bare.pth")
    convert(tmp_path / "bare.pth", tmp_path / "c", say=notes.append)
    assert notes == [f"{tmp_path / 'bare.pth'} carries no training config: img_size 224 and scale factors 1 are "
                     f"assumed; docs/official_checkpoints.md lists the flags each released file needs"]


def test_inner_width_not_a_multiple_of_the_width_is_named(tmp_path):
    sd = official_state_dict()
    sd["blocks.0.mixer.in_proj.weight"] = torch.zeros(2 * 100, DIM)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=re.escape(
            "key 'blocks.0.mixer.in_proj.weight' (200, 32): inner width 100 is not a multiple of the width 32")):
        convert(tmp_path / "odd.pth", tmp_path / "hf", img_size=16)
