"""Bad input is refused at the boundary with one clear ValueError; odd but valid images
(grey, RGBA, palette, CMYK, 16-bit, NumPy) are converted correctly by the image processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import images, tiny_config, tiny_encoder
from defocus_vlm.encoders import EncoderConfig, get_preset
from PIL import Image

from defocus_vlm import DefocusImageProcessor, DefocusVisionConfig, DefocusVisionForImageClassification
from defocus_vlm.image_io import ImageError, to_pil

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ----------------------------------------------------------------------------- pixel tensors
@pytest.fixture(scope="module")
def model():
    return DefocusVisionForImageClassification(tiny_config("defocus_vit_small", num_labels=3)).eval()


@pytest.mark.parametrize(
    "pixels, words",
    [
        (torch.randn(2, 1, 16, 16), ["expected 3 image channels", "got 1"]),
        (torch.randn(2, 4, 16, 16), ["expected 3 image channels", "got 4"]),
        (torch.randn(2, 3, 18, 16), ["18x16", "not a multiple of the patch size 4"]),
        (torch.randn(2, 3, 16, 13), ["16x13", "patch size"]),
        (torch.randn(3, 16, 16), ["(batch, channels, height, width)", "(3, 16, 16)"]),
        (torch.randn(1, 1, 3, 16, 16), ["(batch, channels, height, width)", "(1, 1, 3, 16, 16)"]),
        (np.zeros((1, 3, 16, 16), np.float32), ["(batch, channels, height, width)", "ndarray"]),
    ],
    ids=["grey", "rgba", "height", "width", "3d", "5d", "numpy"],
)
def test_malformed_pixels(model, pixels, words):
    with pytest.raises(ValueError) as err:
        model(pixels)
    for word in words:
        assert word in str(err.value), f"{word!r} not in {err.value}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels(model, bad):
    x = images()
    x[1, 2, 5, 7] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        list(tiny_encoder("defocus_mamba_tiny").stream(x, 4))


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(mixer="transformer"), ["mixer must be one of", "'vit'", "'transformer'"]),
        (dict(decay="learned"), ["decay must be one of", "learnable", "'learned'"]),
        (dict(rope="yes"), ["rope must be one of", "'yes'"]),
        (dict(cls_position="middle"), ["cls_position must be one of", "'middle'"]),
        (dict(pos_embed="sincos"), ["pos_embed must be one of", "'sincos'"]),
        (dict(img_size=30), ["img_size 30", "patch_size 4"]),
        (dict(embed_dim=33), ["embed_dim 33", "num_heads 2"]),
        (dict(embed_dim=0), ["embed_dim must be positive"]),
        (dict(num_heads=4, embed_dim=36), ["RoPE", "even head dimension", "= 9"]),
    ],
)
def test_bad_encoder_config(overrides, words):
    for build in (lambda: tiny_config("defocus_vit_tiny", **overrides),
                  lambda: EncoderConfig(**{**dict(mixer="vit", img_size=16, patch_size=4, embed_dim=32,
                                                  num_heads=2), **overrides})):
        with pytest.raises(ValueError) as err:
            build()
        for word in words:
            assert word in str(err.value), f"{word!r} not in {err.value}"


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(mixer="mamba", causal=False), ["causal=False needs mixer='vit'"]),
        (dict(mixer="retnet", causal=False), ["'retnet'", "causal"]),
        (dict(mixer="mamba", d_state=7), ["even d_state", "7"]),
        (dict(mixer="mamba", group_norm_size=48), ["d_inner 64", "group_norm_size 48"]),
        (dict(mixer="mamba", delta_scale_factor=0.0), ["delta_scale_factor"]),
    ],
)
def test_bad_mamba_and_causality_config(overrides, words):
    with pytest.raises(ValueError) as err:
        tiny_encoder_config_like(**overrides)
    for word in words:
        assert word in str(err.value), f"{word!r} not in {err.value}"


def tiny_encoder_config_like(**overrides) -> EncoderConfig:
    values = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, d_state=8, dt_rank=8,
                  group_norm_size=16)
    values.update(overrides)
    return EncoderConfig(**values)


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match=r"unknown encoder config fields: \['embed_dimm'\]"):
        EncoderConfig.from_dict({"embed_dimm": 32})


@pytest.mark.parametrize(
    "name, suggestion",
    [("defocus_mamba_smal", "defocus_mamba_small"), ("defocus-vit-base", "defocus_vit_base"),
     ("mamba_small", "defocus_mamba_small")],
)
def test_unknown_preset_suggests_close_names(name, suggestion):
    for build in (lambda: get_preset(name), lambda: DefocusVisionConfig.from_preset(name)):
        with pytest.raises(ValueError) as err:
            build()
        msg = str(err.value)
        assert f"unknown preset {name!r}" in msg and "did you mean" in msg and suggestion in msg
        assert "Known presets" in msg


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(head_type="conv"), ["head_type must be one of", "'linear'", "'mlp'", "'conv'"]),
        (dict(aux_loss="both"), ["aux_loss must be one of", "'pooled'", "'token'", "'none'", "'both'"]),
    ],
)
def test_bad_head_config(overrides, words):
    with pytest.raises(ValueError) as err:
        tiny_config("defocus_mamba_small", **overrides)
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------- image processor
def expected_rgb(rgb) -> np.ndarray:
    """Normalised value of a constant (r, g, b) 8-bit colour, one per channel."""
    return (np.asarray(rgb, np.float32) / 255.0 - MEAN) / STD


def assert_constant(pixels: torch.Tensor, rgb, atol=1e-5):
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == torch.float32
    want = torch.from_numpy(expected_rgb(rgb))[None, :, None, None].expand_as(pixels)
    torch.testing.assert_close(pixels, want, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def processor():
    return DefocusImageProcessor(size=16, crop_pct=1.0)


def test_processor_grey_image_and_array(processor):
    assert_constant(processor(Image.new("L", (20, 24), 128))["pixel_values"], (128, 128, 128))
    assert_constant(processor(np.full((24, 20), 128, np.uint8))["pixel_values"], (128, 128, 128))
    assert_constant(processor(np.full((24, 20, 1), 128, np.uint8))["pixel_values"], (128, 128, 128))


def test_processor_rgb_arrays(processor):
    arr = np.empty((24, 30, 3), np.uint8)
    arr[...] = (10, 100, 200)
    assert_constant(processor(arr)["pixel_values"], (10, 100, 200))
    chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
    assert_constant(processor(chw)["pixel_values"], (10, 100, 200))
    assert_constant(processor(np.full((24, 30, 3), 0.5))["pixel_values"], (128, 128, 128))  # float in [0, 1]
    assert_constant(processor(torch.full((3, 24, 30), 0.5))["pixel_values"], (128, 128, 128))


def test_processor_rgba_is_composited_on_white(processor):
    transparent = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert_constant(processor(transparent)["pixel_values"], (255, 255, 255))
    opaque = Image.new("RGBA", (20, 20), (10, 100, 200, 255))
    assert_constant(processor(opaque)["pixel_values"], (10, 100, 200))
    assert_constant(processor(Image.new("LA", (20, 20), (0, 0)))["pixel_values"], (255, 255, 255))


def test_processor_palette_image(processor):
    img = Image.new("P", (20, 20), 1)
    img.putpalette([0, 0, 0, 200, 30, 60] + [0] * (3 * 254))
    assert_constant(processor(img)["pixel_values"], (200, 30, 60))


def test_processor_cmyk_image(processor):
    assert_constant(processor(Image.new("CMYK", (20, 20), (0, 0, 0, 0)))["pixel_values"], (255, 255, 255))
    assert_constant(processor(Image.new("CMYK", (20, 20), (0, 255, 255, 0)))["pixel_values"], (255, 0, 0))


def test_processor_16_bit_image(processor):
    white = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    assert white.mode == "I;16"
    assert_constant(processor(white)["pixel_values"], (255, 255, 255))
    half = Image.fromarray(np.full((20, 20), 32768, np.uint16))
    assert_constant(processor(half)["pixel_values"], (128, 128, 128))  # scaled from 16 bits, not clipped
    assert to_pil(half).mode == "RGB"


def test_processor_grey_output_and_batches():
    grey = DefocusImageProcessor(size=16, crop_pct=1.0, num_channels=1)
    out = grey([Image.new("RGB", (20, 20), (255, 255, 255)), np.zeros((18, 18), np.uint8)])["pixel_values"]
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out[0], torch.full((1, 16, 16), 1.0))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(out[1], torch.full((1, 16, 16), -1.0))


def test_processor_resize_and_centre_crop():
    proc = DefocusImageProcessor(size=16, crop_pct=0.5)  # shorter side -> 32, then the centre 16 x 16
    img = np.zeros((40, 40, 3), np.uint8)
    img[10:30, 10:30] = 255  # a centred white square covering exactly the crop
    out = proc(img)["pixel_values"][0]
    white = torch.from_numpy(expected_rgb((255, 255, 255)))[:, None, None].expand(3, 12, 12)
    torch.testing.assert_close(out[:, 2:-2, 2:-2], white, rtol=0, atol=1e-5)


def test_processor_refuses_unreadable_files(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    with pytest.raises(ImageError, match=r"cannot read image .*broken\.png"):
        processor(str(broken))
    with pytest.raises(ImageError, match="image not found"):
        processor(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="image not found"):
        processor(str(tmp_path))  # a directory
    assert issubclass(ImageError, ValueError)
    good = tmp_path / "ok.png"
    Image.new("RGB", (20, 20), (10, 100, 200)).save(good)
    assert_constant(processor(str(good))["pixel_values"], (10, 100, 200))


@pytest.mark.parametrize(
    "image, words",
    [
        (np.zeros((20, 20, 5), np.uint8), ["HxW", "(20, 20, 5)"]),
        (np.zeros((2, 20, 20, 3), np.uint8), ["HxW", "(2, 20, 20, 3)"]),
        (np.full((20, 20), np.nan), ["NaN or infinite"]),
        (42, ["expected a PIL image", "int"]),
    ],
)
def test_processor_refuses_bad_arrays(processor, image, words):
    with pytest.raises(ImageError) as err:
        processor(image)
    for word in words:
        assert word in str(err.value)


def test_processor_bad_settings():
    with pytest.raises(ValueError, match="num_channels must be 1 or 3"):
        DefocusImageProcessor(num_channels=2)
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]"):
        DefocusImageProcessor(crop_pct=0.0)
    with pytest.raises(ValueError, match="no images"):
        DefocusImageProcessor()([])
