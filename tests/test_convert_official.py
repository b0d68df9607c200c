"""The converter against an independent float64 re-derivation of the official De-focus Mamba
forward (written from the official repository's description, op by op, with explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from defocus_vlm.convert_official import CheckpointError, convert, infer_config, load_official_state_dict

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


def official_forward(sd: dict[str, torch.Tensor], img: torch.Tensor, mlp_head: bool = False) -> torch.Tensor:
    """Returns the official output (B, L, C): head2 on every patch token, head on the last (cls)."""
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
                    out[:, t, a] = v[:, t, a] * math.cos(t * freq[a]) - v[:, t, b] * math.sin(t * freq[a])
                    out[:, t, b] = v[:, t, b] * math.cos(t * freq[b]) + v[:, t, a] * math.sin(t * freq[b])
            return out

        b_in, c_in = rope(b_in), rope(c_in)
        delta = F.softplus(dt @ sd[p + "dt_proj.weight"].T + sd[p + "dt_proj.bias"])
        a = -torch.exp(sd[p + "A_log"])
        state = torch.zeros(x.shape[0], INNER, N, dtype=x.dtype)
        ys = []
        for t in range(length):
            inp = delta[:, t, :, None] * b_in[:, t, None, :] * u[:, t, :, None]
            state = torch.exp(delta[:, t, :, None] * a) * state + inp
            ys.append((state * c_in[:, t, None, :]).sum(-1))
        y = torch.stack(ys, dim=1)  # (B, L, E)
        groups = y.reshape(*y.shape[:2], INNER // 64, 64)
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
    from defocus_vlm.cli import main

    sd = official_state_dict()
    del sd["patch_embed.proj.weight"]
    torch.save(sd, tmp_path / "x.pth")
    assert main(["convert-official", str(tmp_path / "x.pth"), str(tmp_path / "out")]) == 2
    assert "missing key 'patch_embed.proj.weight'" in capsys.readouterr().err
