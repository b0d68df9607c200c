"""Over-focus diagnostics (``defocus_vlm.eval.focus`` and ``defocus-vlm analyze``).

The maps are checked in float64 against a brute-force autograd loop that shares nothing with the
implementation (blocks run by hand, one backward per output row and per image, the block input
captured by a hook for the gradient map); the metrics against hand-worked cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_config
from defocus_vlm.eval import focus
from PIL import Image

from defocus_vlm.cli import main

torch.set_num_threads(1)
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _tiny_classifier(family: str, dtype=torch.float64, **overrides):
    from defocus_vlm import DefocusVisionForImageClassification

    config = tiny_config(f"{family}_tiny", num_labels=3, **overrides)
    return DefocusVisionForImageClassification(config).to(dtype).eval()


def _brute_force(model, pixels, labels, layer):
    """A, r and g for one block, one backward per (image, output row)."""
    encoder = model.defocus.encoder
    x = encoder.embed(pixels)
    for block in encoder.blocks[:layer]:
        x = block(x)
    x = x.detach().requires_grad_(True)
    y = encoder.blocks[layer](x)
    batch, length = y.shape[:2]
    attention = torch.zeros(batch, length, length, dtype=y.dtype)
    receptive = torch.zeros(batch, length, dtype=y.dtype)
    for b in range(batch):
        for i in range(length):
            attention[b, i] = torch.autograd.grad(y[b, i].norm(), x, retain_graph=True)[0][b].norm(dim=-1)
        receptive[b] = torch.autograd.grad(encoder.pooled(y)[b].norm(), x, retain_graph=True)[0][b].norm(dim=-1)
    attention.diagonal(dim1=-2, dim2=-1).zero_()

    inputs = []  # the block's input on each forward, kept with its gradient

    def keep_input(module, args):
        args[0].retain_grad()
        inputs.append(args[0])

    handle = encoder.blocks[layer].register_forward_pre_hook(keep_input)
    try:
        for b in range(batch):  # one image per forward: its own loss
            model(pixel_values=pixels[b:b + 1], labels=labels[b:b + 1]).loss.backward()
    finally:
        handle.remove()
    gradient = torch.cat([x.grad.norm(dim=-1) for x in inputs])
    return attention, receptive, gradient


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_match_brute_force(family):
    model = _tiny_classifier(family)
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    expected = {layer: _brute_force(model, pixels, labels, layer) for layer in (0, 1)}
    for rows_per_pass in (1, 5):  # one row per backward, and vectorised rows (18 = 3 * 5 + 3)
        maps = focus.layer_maps(model, pixels, labels, [0, 1], rows_per_pass=rows_per_pass)
        for layer, (attention, receptive, gradient) in expected.items():
            torch.testing.assert_close(maps[layer].attention, attention, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(maps[layer].receptive_field, receptive, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(maps[layer].gradient, gradient, rtol=1e-9, atol=1e-12)
            assert attention.abs().sum() > 0 and gradient.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_attention_is_lower_triangular(family):
    model = _tiny_classifier(family, dtype=torch.float32)
    maps = focus.layer_maps(model, torch.randn(2, 3, 16, 16), torch.tensor([1, 0]), [1])[1]
    upper = torch.ones(17, 17, dtype=torch.bool).triu(diagonal=1)
    above, below = maps.attention[:, upper], maps.attention[:, upper.T]
    assert torch.all(maps.attention.diagonal(dim1=-2, dim2=-1) == 0)
    assert below.gt(0).float().mean() > 0.9
    if model.config.causal:
        assert torch.all(above == 0)  # exactly: no output sees a later input
    else:
        assert above.gt(0).float().mean() > 0.9


def test_metrics_hand_worked():
    length = 41
    uniform = torch.ones(length, length).fill_diagonal_(0)
    one_hot = torch.zeros(length, length)
    one_hot[1:, 0], one_hot[0, 1] = 1.0, 1.0  # every row on one key (not itself)
    causal_uniform = torch.tril(torch.ones(length, length), diagonal=-1)
    assert focus.attention_entropy(uniform, causal=False).item() == pytest.approx(1.0)
    assert focus.attention_entropy(causal_uniform, causal=True).item() == pytest.approx(1.0)
    assert focus.attention_entropy(one_hot, causal=False).item() == pytest.approx(0.0, abs=1e-6)
    # 40 keys -> the top 2 (ceil of 5 %) hold 2/40 of a uniform row and all of a one-hot row
    assert focus.attention_top_share(uniform, causal=False).item() == pytest.approx(0.05)
    assert focus.attention_top_share(one_hot, causal=False).item() == pytest.approx(1.0)
    # causal rows i = 2..40 see i keys: the top ceil(0.05 i) of them, out of i
    expected = np.mean([math.ceil(0.05 * i) / i for i in range(2, length)])
    assert focus.attention_top_share(causal_uniform, causal=True).item() == pytest.approx(expected)

    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0], [1.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(focus.gini(values), torch.tensor([0.0, 0.75, 0.5]))
    torch.testing.assert_close(focus.effective_size(values), torch.tensor([4.0, 1.0, 2.0]))


def test_layer_choice():
    assert focus.default_layers(12) == [3, 6, 9, 11]  # the paper's ViT layers
    assert focus.default_layers(24) == [6, 12, 18, 22]  # and its Mamba layers
    assert focus.default_layers(2) == [1]
    assert focus.resolve_layers([-1, 0, 3], 4, "m") == [0, 3]
    with pytest.raises(ValueError, match="layer 4 is out of range for m, which has 4 blocks"):
        focus.resolve_layers([4], 4, "m")


def test_focus_summaries_table(tmp_path):
    models = {"causal": _tiny_classifier("defocus_vit", torch.float32),
              "non-causal": _tiny_classifier("vit", torch.float32)}
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(image)
    table = focus.focus_summaries(models, [image, image], layers=[-1], batch_size=1)
    assert list(table) == ["causal", "non-causal"]
    for per_layer in table.values():
        assert list(per_layer) == ["1"] and set(per_layer["1"]) == set(focus.METRICS)
        values = per_layer["1"]
        assert 0 < values["attention_entropy"] <= 1 and 0 < values["attention_top5pct_share"] <= 1
        assert 0 <= values["gradient_gini"] < 1 and 1 <= values["erf_size"] <= 16


@pytest.fixture()
def model_dir(tmp_path):
    from defocus_vlm import DefocusImageProcessor, DefocusVisionForImageClassification

    config = tiny_config("defocus_mamba_tiny", num_labels=10, in_chans=1)
    path = tmp_path / "run_a" / "model"  # the training export layout: named after the run
    DefocusVisionForImageClassification(config).save_pretrained(path)
    DefocusImageProcessor(size=16, num_channels=1, crop_pct=1.0).save_pretrained(path)
    return path


def test_analyze_cli(model_dir, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(photo)
    images = [str(photo)] + (["fashion-mnist:7"] if FASHION_TEST.is_file() else [])
    preset = "vit_tiny:img_size=16,patch_size=4,embed_dim=32,depth=3,num_heads=2"
    out = tmp_path / "out"
    argv = ["analyze", "--model", str(model_dir), "--model", preset, "--layers", "0", "-1", "--out", str(out)]
    assert main(argv + [arg for image in images for arg in ("--image", image)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["models"]) == ["run_a", preset]
    assert metrics["models"]["run_a"]["causal"] and not metrics["models"][preset]["causal"]
    assert list(metrics["models"]["run_a"]["layers"]) == ["0", "1"]  # -1 = the last of 2 blocks
    assert list(metrics["models"][preset]["layers"]) == ["0", "2"]
    first = metrics["models"]["run_a"]["layers"]["0"]
    assert len(first["per_image"]["gradient_gini"]) == len(images)
    labels = [img["label_source"] for img in metrics["models"]["run_a"]["images"]]
    assert labels == ["predicted", "dataset"][: len(images)]  # the Fashion-MNIST image keeps its label
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 3 * len(images) + 1 and "00_photo_attention.png" in pngs and "summary.png" in pngs
    assert all(Image.open(out / name).size[0] > 100 for name in pngs)
    assert "done in" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "defocus_vit_tiyn"], "not a directory, and unknown preset 'defocus_vit_tiyn'; did you mean "
                                          "defocus_vit_tiny"),
        (["--model", "no/such/dir"], "no model at no/such/dir: config.json missing"),
        (["--model", "vit_tiny:embed_dimm=8"], "cannot override 'embed_dimm'"),
        (["--model", "vit_tiny", "--layers", "12"], "layer 12 is out of range for vit_tiny, which has 12 blocks"),
        (["--model", "vit_tiny", "--image", "fashion-mnist:x"], "expected fashion-mnist:N with N in 0..9999"),
        (["--model", "vit_tiny", "--image", "missing.png"], "missing.png not found, expected an image file"),
    ],
)
def test_analyze_cli_errors(args, message, tmp_path, capsys):
    if "fashion-mnist:x" in args and not FASHION_TEST.is_file():
        pytest.skip("Fashion-MNIST is not installed")
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    image = [] if "--image" in args else ["--image", str(photo)]
    assert main(["analyze", *args, *image, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_layer_maps_refuses_training_mode():
    model = _tiny_classifier("defocus_vit", torch.float32).train()
    with pytest.raises(ValueError, match="eval mode"):
        focus.layer_maps(model, torch.randn(1, 3, 16, 16), torch.tensor([0]), [0])
