"""Bad input is refused at the boundary with one clear ValueError; odd but valid images
(grey, RGBA, palette, CMYK, 16-bit, NumPy) are converted correctly by the image processor."""

from __future__ import annotations

import json
import re
import shutil

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
    with pytest.raises(ImageError, match="missing.jpg not found, expected an image file"):
        processor(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match=f"^{tmp_path} is a directory, expected an image file$"):
        processor(str(tmp_path))  # exists, but is not an image
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


# ----------------------------------------------------------------------------- 16-bit and integer images
def grey_level(image) -> int:
    """The 8-bit grey level to_pil gives a constant image."""
    out = np.asarray(to_pil(image, channels=1))
    assert (out == out.flat[0]).all()
    return int(out.flat[0])


def test_16_bit_images_are_read_against_65535_not_their_own_peak(tmp_path):
    dark = np.full((6, 6), 200, np.uint16)  # 0.3% of the 16-bit range: near black, whatever its peak
    mask = np.tile(np.array([0, 1], np.uint16), (6, 3))
    assert grey_level(Image.fromarray(dark)) == 1 and grey_level(dark) == 1  # the peak rule gave 200
    assert np.asarray(to_pil(Image.fromarray(mask), 1)).max() == 0  # the peak rule gave a 0/255 mask
    assert grey_level(np.full((6, 6), 32768, np.uint16).astype(">u2")) == 128  # big-endian data too
    Image.fromarray(dark).save(tmp_path / "dark16.png")  # through a file, as `classify` reads it
    assert grey_level(str(tmp_path / "dark16.png")) == 1
    as_int32 = Image.fromarray(np.full((6, 6), 65535, np.int32), "I")  # Pillow's 32-bit mode holding 16-bit data
    assert grey_level(as_int32) == 255
    assert grey_level(np.full((6, 6), True)) == 255 and grey_level(np.full((6, 6), 200, np.int64)) == 200


@pytest.mark.parametrize(
    "array, words",
    [
        (np.full((6, 6), 200.0), ["float image values must lie in [0, 1], got 200..200", "divide 8-bit data by 255"]),
        (np.full((6, 6), -0.5, np.float32), ["[0, 1], got -0.5..-0.5"]),
        (np.full((6, 6), 300, np.int32), ["int32 image values must lie in 0..255, got 300..300", "uint16"]),
        (np.full((6, 6), -1, np.int16), ["int16 image values must lie in 0..255, got -1..-1"]),
    ],
    ids=["float-0-255", "normalised", "int32-over-255", "negative"],
)
def test_out_of_range_arrays_are_refused(array, words):
    with pytest.raises(ImageError) as err:
        to_pil(array)  # each was scaled by a guess before (by its peak, or clipped)
    for word in words:
        assert word in str(err.value), f"{word!r} not in {err.value}"


# ----------------------------------------------------------------------------- CSV captions
def test_csv_captions_with_unquoted_commas_are_refused_naming_the_line(tmp_path):
    from defocus_vlm.data.classification import DataError
    from defocus_vlm.data.pairs import TablePairs

    good = tmp_path / "good.csv"
    good.write_text('image,caption\na.png,"a cat, sitting"\n\nb.png,"two\nlines"\n')
    assert [caption for _, caption in TablePairs(good).items] == ["a cat, sitting", "two\nlines"]
    bad = tmp_path / "bad.csv"
    bad.write_text('image,caption\na.png,"a cat, sitting"\nb.png,a dog, running\n')
    with pytest.raises(DataError) as err:  # was read as the caption "a dog"
        TablePairs(bad)
    assert str(err.value) == (f"{bad} line 3: 3 fields, but the header has 2 (['image', 'caption']); "
                              'put a caption that contains commas in double quotes: "a cat, sitting"')
    short = tmp_path / "short.csv"
    short.write_text("image,caption\na.png\n")
    with pytest.raises(DataError, match=re.escape(f"{short} line 2: 1 fields, but the header has 2")):
        TablePairs(short)


# ----------------------------------------------------------------------------- the CLI: one line per bad input
def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with exactly one error line and no traceback. Returns that line."""
    from defocus_vlm.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("defocus-vlm ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier")
    DefocusVisionForImageClassification(tiny_config("defocus_vit_tiny", num_labels=3)).save_pretrained(path)
    DefocusImageProcessor(size=16).save_pretrained(path)
    return path


def broken_copy(source, target, change) -> str:
    shutil.copytree(source, target)
    change(target)
    return str(target)


def _edit_config(**values):
    def change(model_dir):
        config = json.loads((model_dir / "config.json").read_text())
        config.update(values)
        (model_dir / "config.json").write_text(json.dumps(config))

    return change


def _truncate(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: (d / "model.safetensors").unlink(),
         "{dir} has config.json but no weights: expected model.safetensors"),
        (_truncate, "{dir}/model.safetensors is not a complete safetensors file ("),
        (_edit_config(embed_dim="32"), "{dir}/config.json: embed_dim must be an integer, got '32' (str)"),
        (_edit_config(id2label=["a", "b", "c"]),
         "{dir}/config.json: id2label must be a mapping like {{\"0\": \"cat\"}}, got a list"),
        (_edit_config(model_type="defocus_clip"),
         "{dir}/config.json: this is a CLIP model (model_type 'defocus_clip'), expected a vision encoder or image "
         "classifier (model_type 'defocus_vision')"),
        (lambda d: (d / "config.json").write_bytes(b"{\"model_type\": \"defocus_vision\",\n  \"x\": 1,,}"),
         "{dir}/config.json is not valid JSON (Expecting property name"),
    ],
    ids=["no-weights", "truncated", "embed-dim-string", "id2label-list", "wrong-model-type", "bad-json"],
)
def test_classify_reports_a_broken_model_directory_in_one_line(classifier_dir, tmp_path, capsys, change, message):
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(image)
    model = broken_copy(classifier_dir, tmp_path / "model", change)
    line = cli_error(["classify", "--model", model, str(image)], capsys)
    assert line.startswith("defocus-vlm classify: error: " + message.format(dir=model)), line


def test_chat_refuses_a_classifier_and_a_directory_as_image(classifier_dir, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(image)
    line = cli_error(["chat", "--model", str(classifier_dir), "--image", str(image), "hi"], capsys)
    assert line == (f"defocus-vlm chat: error: {classifier_dir}/config.json: this is a vision encoder or image "
                    f"classifier (model_type 'defocus_vision'), expected a vision-language model "
                    f"(model_type 'defocus_vlm')")
    line = cli_error(["chat", "--model", str(classifier_dir), "--image", str(tmp_path), "hi"], capsys)
    assert line == f"defocus-vlm chat: error: {tmp_path} is a directory, expected an image file"


def test_latin1_csv_is_named_in_one_line(tmp_path, capsys):
    from test_clip_model import _clip, _processor

    _clip().save_pretrained(tmp_path / "clip")
    _processor().save_pretrained(tmp_path / "clip")
    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes("image,caption\na.png,un caf\xe9 noir\n".encode("latin-1"))
    line = cli_error(["eval", "retrieval", "--model", str(tmp_path / "clip"), "--data", str(pairs)], capsys)
    assert line == (f"defocus-vlm eval: error: {pairs} is not UTF-8 text (byte 0xe9 on line 2): expected a CSV "
                    f"file with a header row in UTF-8; re-save it as UTF-8")
