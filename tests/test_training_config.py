"""Config parsing (layout, base: inheritance, old keys, declared ranges), schedules, parameter groups,
data checks and the sampler (no training)."""

from __future__ import annotations

import dataclasses
import gzip
import math

import numpy as np
import pytest
import torch
from defocus_vlm.training.config import ConfigError, load_config
from defocus_vlm.training.optim import build_optimizer, param_groups
from defocus_vlm.training.sampler import EpochSampler
from defocus_vlm.training.schedules import drop_path_at, lr_at, scaled_lr

from defocus_vlm.data.classification import (
    ClassificationDataset,
    DataError,
    open_source,
    verify_source,
)

FASHION = "/usr/share/datasets/fashion-mnist"


STAGE_NAMES = ("classification", "clip", "instruct")


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_packaged_configs_load(stage):
    from defocus_vlm.training.config import CONFIG_ROOT

    files = sorted((CONFIG_ROOT / stage).glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_config(f, stage=stage)
        assert cfg.stage == stage


def test_the_registry_defines_every_stage_once():
    """One registry: the name -> the run config (same layout in every stage) and the task."""
    import dataclasses

    from defocus_vlm.training import STAGES, get_stage
    from defocus_vlm.training.config import OptimConfig, TrainConfig, VisionTowerConfig
    from defocus_vlm.training.loop import StageTask

    assert tuple(STAGES) == STAGE_NAMES
    for name, stage in STAGES.items():
        config = stage.config_class()()
        assert config.stage == name and issubclass(stage.task_class(), StageTask)
        assert [f.name for f in dataclasses.fields(config)][:3] == ["stage", "model", "data"]
        assert isinstance(config.model.vision, VisionTowerConfig)
        assert isinstance(config.optim, OptimConfig) and isinstance(config.train, TrainConfig)
    with pytest.raises(ConfigError, match="unknown training stage 'pretrain'"):
        get_stage("pretrain")


def test_fashion_configs_are_the_recipe_plus_their_tower():
    """The side-by-side and ablation files name a base and differ from the recipe only in the tower and
    output_dir; the ablation files only in decay / RoPE from fashion_defocus_mamba."""
    import dataclasses

    from defocus_vlm.training.config import CONFIG_ROOT

    def rest(cfg):
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vision=None),
                                   train=dataclasses.replace(cfg.train, output_dir=""))

    recipe = load_config("fashion_recipe")
    files = sorted((CONFIG_ROOT / "classification").glob("fashion_*.yaml"))
    assert len(files) == 16
    mamba = load_config("fashion_defocus_mamba").model.vision
    assert mamba.source == "defocus_mamba_tiny"
    assert mamba.overrides == {"patch_size": 4, "embed_dim": 64, "depth": 4, "dt_rank": 8, "group_norm_size": 32}
    for f in files:
        cfg = load_config(f)
        assert rest(cfg) == rest(recipe), f.name
        assert cfg.train.output_dir == f"runs/{f.stem}"
        if "_decay-" in f.stem:
            decay, rope = f.stem.split("_decay-")[1].split("_rope-")
            assert cfg.model.vision.overrides == {**mamba.overrides, "decay": decay, "rope": rope}
        if f.stem != "fashion_recipe":
            assert len(f.read_text().splitlines()) <= 10  # a base plus a few keys


def _write(path, text):
    path.write_text(text)
    return path


def test_base_inheritance_merges_deeply(tmp_path):
    """A file extends its base (relative to itself, or a packaged config name): mappings merge key by
    key, other values replace; a base may have a base; overrides apply last."""
    (tmp_path / "bases").mkdir()
    _write(tmp_path / "bases" / "mine.yaml", "base: tiny_cpu\nmodel: {vision: {overrides: {depth: 3}}}\n"
                                              "train: {epochs: 5, output_dir: runs/mine}\n")
    child = _write(tmp_path / "child.yaml", "base: bases/mine.yaml\nmodel: {vision: {overrides: {decay: fixed}}}\n"
                                            "augment: {scale: [0.5, 1.0]}\ntrain: {epochs: 7}\n")
    cfg = load_config(child, ["train.batch_size=16"])
    packaged = load_config("tiny_cpu")
    assert cfg.model.vision.overrides == {**packaged.model.vision.overrides, "depth": 3, "decay": "fixed"}
    assert cfg.model.vision.source == packaged.model.vision.source
    assert cfg.augment.scale == [0.5, 1.0] and cfg.augment.mixup == packaged.augment.mixup
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.output_dir) == (7, 16, "runs/mine")


def test_base_cycles_missing_bases_and_other_stages_are_refused(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\ntrain: {epochs: 2}\n")
    _write(tmp_path / "b.yaml", "base: c\n")
    _write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"inherit in a cycle: .*a.yaml -> .*b.yaml -> .*c.yaml -> .*a.yaml"):
        load_config(a)
    itself = _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(itself)
    missing = _write(tmp_path / "missing.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base 'nowhere.yaml' not found"):
        load_config(missing)
    clip = _write(tmp_path / "clip.yaml", "stage: clip\n")
    with pytest.raises(ConfigError, match="is for stage 'clip', not 'classification'"):
        load_config(_write(tmp_path / "y.yaml", f"base: {clip}\n"))
    with pytest.raises(ConfigError, match="base must name one file"):
        load_config(_write(tmp_path / "z.yaml", "base: [a.yaml, b.yaml]\n"))


@pytest.mark.parametrize("stage, old, new", [
    ("classification", "model.preset=vit_tiny", "'model.vision.source'"),
    ("classification", "model.init_from=runs/x/model", "'model.vision.source'"),
    ("classification", "model.patch_size=4", "'model.vision.overrides.patch_size'"),
    ("classification", "model.overrides.depth=3", "'model.vision.overrides.depth'"),
    ("clip", "vision.preset=vit_tiny", "'model.vision.source'"),
    ("clip", "vision.init_from=runs/x/model", "'model.vision.source'"),
    ("clip", "vision.lock=true", "'model.vision.freeze'"),
    ("clip", "vision.patch_size=8", "'model.vision.overrides.patch_size'"),
    ("clip", "vision.overrides.depth=2", "'model.vision.overrides.depth'"),
    ("clip", "vision.gradient_checkpointing=true", "'model.gradient_checkpointing'"),
    ("clip", "text.lock=true", "'model.text.freeze'"),
    ("clip", "text.max_length=8", "'model.text.max_length'"),
    ("clip", "text.gradient_checkpointing=true", "'model.gradient_checkpointing'"),
    ("instruct", "model.vision.img_size=64", "'model.vision.overrides.img_size'"),
    ("instruct", "model.vision.patch_size=8", "'model.vision.overrides.patch_size'"),
    ("classification", "optim.no_decay_names=[A_log]", "no_weight_decay()"),
    ("clip", "optim.no_decay_names=[A_log]", "no_weight_decay()"),
    ("instruct", "optim.no_decay_names=[A_log]", "no_weight_decay()"),
])
def test_an_old_key_names_its_new_key(stage, old, new):
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", [old], stage=stage)
    message = str(err.value)
    assert old.split("=")[0] in message and new in message and "\n" not in message


def test_an_old_layout_file_is_refused_at_its_first_old_key(tmp_path):
    old = _write(tmp_path / "old_clip.yaml", "stage: clip\nvision:\n  preset: defocus_vit_tiny\n  patch_size: 7\n"
                                             "text: {config: {model_type: llama}, tokenizer: byte}\n")
    with pytest.raises(ConfigError, match="'vision.preset' is now 'model.vision.source'"):
        load_config(old, stage="clip")


@pytest.mark.parametrize("stage", STAGE_NAMES)
@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-5", "train.max_steps must be >= 0, got -5"),
    ("optim.warmup_lr=-1", "optim.warmup_lr must be >= 0, got -1.0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0, got -1"),
    ("train.precision=fp16", "train.precision must be one of auto / bf16 / fp32, got 'fp16'"),
    ("optim.betas=[0.9, 1.5]", r"optim.betas must be in \[0, 1\), got \[0.9, 1.5\]"),
])
def test_values_outside_the_declared_range_are_refused(stage, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", [override], stage=stage)


def _declared_fields(section, prefix=""):
    import dataclasses

    from defocus_vlm.training.fields import declared

    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _declared_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value, declared(f)


# numbers whose every value means something (a layer index counts from the end when negative; the logit
# inits are logs)
UNBOUNDED = {"model.vision_feature_layer", "model.logit_scale_init", "model.logit_bias_init"}


def _outside(valid):
    """A value just outside a declared Range or Choice."""
    from defocus_vlm.training.fields import Choice

    if isinstance(valid, Choice):
        return "not_an_option" if isinstance(valid.options[0], str) else max(valid.options) + 1
    if valid.lo is not None:
        return valid.lo if valid.lo_open else valid.lo - 1
    return valid.hi if valid.hi_open else valid.hi + 1


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_number_declares_its_range_and_the_check_is_generated_from_it(stage):
    """Every numeric field declares a range; for each declaration, a value just outside it is refused
    with the key, and a closed lower bound itself is accepted."""
    from defocus_vlm.training import get_stage

    checked = 0
    for key, f, value, valid in _declared_fields(get_stage(stage).config_class()()):
        numeric = any(name in f.type for name in ("int", "float"))
        assert valid is not None or not numeric or key in UNBOUNDED, f"{stage}: {key} declares no range"
        if valid is None:
            continue
        listed = isinstance(value, list) or f.type.startswith("list")
        bad = _outside(valid)
        with pytest.raises(ConfigError, match=f"^{key} must be "):
            load_config("tiny_cpu", [f"{key}={[bad, bad] if listed else bad}"], stage=stage)
        if getattr(valid, "lo", None) is not None and not valid.lo_open and not listed:
            try:  # the bound passes its range check (a stage rule may still refuse it, e.g. clip's batch >= 2)
                load_config("tiny_cpu", [f"{key}={valid.lo}"], stage=stage)
            except ConfigError as err:
                assert not str(err).startswith(f"{key} must be {valid.describe()}"), err
        checked += 1
    assert checked >= 30


def test_cross_field_rules_stay_in_the_sections():
    with pytest.raises(ConfigError, match="drop_path_min <= train.drop_path_max"):
        load_config("tiny_cpu", ["train.drop_path_min=0.5", "train.drop_path_max=0.2"])
    with pytest.raises(ConfigError, match="data.templates: every template needs exactly one"):
        load_config("tiny_cpu", ["data.templates=[a photo]"], stage="clip")
    with pytest.raises(ConfigError, match="train.batch_size must be at least 2"):
        load_config("tiny_cpu", ["train.batch_size=1"], stage="clip")


def test_the_configuration_reference_shows_ranges_and_choices():
    from defocus_vlm.config_reference import render

    text = render()
    assert "| `train.max_steps` | `0` | `>= 0` |" in text
    assert "| `train.ema_decay` | `0.9999` | `[0, 1)` |" in text
    assert "| `model.loss` | `'clip'` | `clip / siglip` |" in text
    assert "| `model.vision.source` | `'defocus_vit_tiny'` |" in text  # the stage's own default


def test_overrides_and_types():
    cfg = load_config(
        "tiny_cpu",
        [
            "train.epochs=5",
            "optim.lr=1e-3",
            "model.vision.overrides.depth=3",
            "augment.rand_augment=null",
            "train.deepspeed=zero2",
        ],
    )
    assert cfg.train.epochs == 5 and cfg.optim.lr == 1e-3 and cfg.model.vision.overrides["depth"] == 3
    assert cfg.augment.rand_augment is None
    assert load_config("tiny_cpu", ["optim.lr=1"]).optim.lr == 1.0  # int accepted for float


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.epoch=3"], "did you mean train.epochs"),
        (["trian.epochs=3"], "unknown config key 'trian'"),
        (["train.epochs=three"], "train.epochs: expected int"),
        (["train.epochs"], "dotted.key=value"),
        (["data.on_corrupt=ignore"], "on_corrupt"),
        (["train.drop_path_max=1.5"], "drop_path"),
    ],
)
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", override)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config("/nonexistent.yaml")


def test_lr_schedule_matches_formula():
    peak, wl, ml, total, warm = 1e-3, 1e-6, 1e-5, 100, 10
    assert scaled_lr(5e-4, 1024) == pytest.approx(1e-3)
    assert scaled_lr(5e-4, 128) == pytest.approx(1.25e-4)
    for s in range(total + 1):
        got = lr_at(s, total, warm, peak, wl, ml)
        if s < warm:
            want = wl + (peak - wl) * s / warm
        else:
            want = ml + 0.5 * (peak - ml) * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert got == pytest.approx(want, rel=1e-12)
    assert lr_at(warm, total, warm, peak, wl, ml) == pytest.approx(peak)
    assert lr_at(total, total, warm, peak, wl, ml) == pytest.approx(ml)


def test_drop_path_schedule_matches_formula():
    E, lo, hi = 300, 0.1, 0.7
    for e in (0, 1, 150, 299):
        assert drop_path_at(e, E, lo, hi) == pytest.approx(lo + e / (E - 1) * (hi - lo))
    assert drop_path_at(0, E, lo, hi) == pytest.approx(0.1)
    assert drop_path_at(E - 1, E, lo, hi) == pytest.approx(0.7)
    assert drop_path_at(5, E, lo, hi, "constant") == 0.7
    assert drop_path_at(0, 1, lo, hi) == 0.7


def test_scheduled_drop_path_reaches_layers():
    """Layer i uses linspace(0, p(e), depth)[i]: p=0 is deterministic, p>0 is not (in training)."""
    from defocus_vlm import DefocusVisionConfig, DefocusVisionForImageClassification

    cfg = DefocusVisionConfig.from_preset(
        "defocus_vit_tiny",
        num_labels=3,
        img_size=8,
        patch_size=4,
        in_chans=1,
        embed_dim=16,
        depth=2,
        num_heads=2,
    )
    model = DefocusVisionForImageClassification(cfg).train()
    x = torch.randn(8, 1, 8, 8)
    a, b = model(x, drop_path_rate=0.0).logits, model(x, drop_path_rate=0.0).logits
    assert torch.equal(a, b)
    c, d = model(x, drop_path_rate=0.9).logits, model(x, drop_path_rate=0.9).logits
    assert not torch.equal(c, d)


# The rule the optimiser groups followed before modules declared no_weight_decay(): parameter-name
# substrings from the config. Kept here as the reference the declarations must reproduce.
OLD_NO_DECAY = ("A_log", "freq", "decay_log", "rope_freq", "cls_token", "pos_embed")


def _old_groups(model) -> tuple[set, set]:
    decay, no_decay = set(), set()
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name.endswith(".bias") or any(key in name for key in OLD_NO_DECAY)
        (no_decay if skip else decay).add(name)
    return decay, no_decay


def _models_of_every_preset():
    """(label, model) for every preset x decay x RoPE setting at test size, a CLIP model and a VLM."""
    from conftest import ALL_PRESETS, tiny_config
    from vlm_helpers import tiny_vlm

    from defocus_vlm import DefocusCLIPConfig, DefocusCLIPModel, DefocusVisionForImageClassification

    for preset in ALL_PRESETS:
        for decay in ("none", "fixed", "learnable"):
            for rope in ("none", "fixed", "learnable"):
                config = tiny_config(preset, num_labels=4, decay=decay, rope=rope)
                yield f"{preset} decay={decay} rope={rope}", DefocusVisionForImageClassification(config)
    llama = dict(model_type="llama", vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    for loss in ("clip", "siglip"):
        vision = tiny_config("defocus_mamba_small", num_labels=0)
        yield f"clip {loss}", DefocusCLIPModel(DefocusCLIPConfig(vision_config=vision, text_config=llama,
                                                                 projection_dim=8, loss_type=loss))
    for preset in ("defocus_mamba_small", "defocus_vit_small", "causal_vit_small"):
        yield f"vlm {preset}", tiny_vlm("llama", preset)[0]


def test_declared_no_weight_decay_gives_the_old_groups_for_every_preset():
    """Modules' no_weight_decay() + (1-D tensors, biases) split the parameters exactly as the old
    name-substring rule did, for every encoder preset and decay/RoPE setting, CLIP and the VLM."""
    checked = set()
    for label, model in _models_of_every_preset():
        decay, no_decay = param_groups(model, 0.05)
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
        assert (set(decay["names"]), set(no_decay["names"])) == _old_groups(model), label
        checked |= {n.rsplit(".", 1)[-1] for n in no_decay["names"] if dict(model.named_parameters())[n].ndim > 1}
    # the declarations matter: each of these is a >1-D tensor only the declaration keeps out of decay
    assert {"A_log", "rope_freq", "cls_token", "pos_embed"} <= checked


def test_frozen_parameters_are_left_out_and_empty_groups_dropped():
    from conftest import tiny_config

    from defocus_vlm import DefocusVisionForImageClassification

    model = DefocusVisionForImageClassification(tiny_config("defocus_mamba_small", num_labels=4))
    model.defocus.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert all(n.startswith(("head.", "aux_head.")) for n in decay["names"] + no_decay["names"])
    optim = load_config("tiny_cpu").optim
    assert [g["weight_decay"] for g in build_optimizer(model, optim, lr=1e-3).param_groups] == [0.05, 0.0]
    model.requires_grad_(False)
    model.head.bias.requires_grad_(True)
    assert [g["weight_decay"] for g in build_optimizer(model, optim, lr=1e-3).param_groups] == [0.0]


# ------------------------------------------------------------------------------------------ data
def _write_idx(root, n=6, images_magic=2051, truncate=False):
    root.mkdir(parents=True, exist_ok=True)
    for split in (("train", n), ("t10k", n)):
        prefix, count = split
        imgs = np.arange(count * 28 * 28, dtype=np.uint8).tobytes()
        header = images_magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (count, 28, 28))
        data = header + (imgs[:-10] if truncate else imgs)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(data))
        labels = (2049).to_bytes(4, "big") + count.to_bytes(4, "big") + bytes(i % 10 for i in range(count))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def test_fashion_mnist_reader():
    src = open_source("auto", FASHION, "train")
    assert len(src) == 60000 and len(src.classes) == 10
    img, label = src.load(0)
    raw = np.frombuffer(gzip.open(f"{FASHION}/train-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    assert np.array_equal(np.asarray(img), raw[: 28 * 28].reshape(28, 28))
    lab = np.frombuffer(gzip.open(f"{FASHION}/train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    assert label == lab[0]
    assert len(open_source("fashion_mnist", FASHION, "val")) == 10000


def test_data_errors_name_path_and_reason(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_source("auto", tmp_path / "nope", "train")
    with pytest.raises(DataError, match="empty"):
        open_source("imagefolder", tmp_path, "train")
    _write_idx(tmp_path / "bad_magic", images_magic=1234)
    with pytest.raises(DataError, match="bad magic"):
        open_source("fashion_mnist", tmp_path / "bad_magic", "train")
    _write_idx(tmp_path / "trunc", truncate=True)
    with pytest.raises(DataError, match="truncated"):
        open_source("fashion_mnist", tmp_path / "trunc", "train")
    (tmp_path / "missing").mkdir()
    with pytest.raises(DataError, match="file missing.*train-images"):
        open_source("fashion_mnist", tmp_path / "missing", "train")


def _image_folder(root, corrupt=True):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_imagefolder_corrupt_skip_or_fail(tmp_path):
    root = _image_folder(tmp_path / "folder")
    src = open_source("auto", root, "train")
    assert src.classes == ["cat", "dog"] and len(src) == 7
    broken = next(i for i in range(len(src)) if src.where(i).endswith("broken.png"))
    with pytest.warns(UserWarning, match="1 of all 7 images are unreadable and will be skipped"):
        verify_source(src, -1, "train")
    with pytest.raises(DataError, match=r"train split: 1 of all 7 images cannot be read \(first: .*broken.png"):
        verify_source(src, 64, "train", on_corrupt="fail")  # a small set is checked whole
    verify_source(src, 7, "train", on_corrupt="fail", limit=broken)  # the broken one is beyond the limit
    tf = lambda img: torch.from_numpy(np.asarray(img.convert("L").resize((8, 8)), dtype=np.float32))  # noqa: E731
    skip = ClassificationDataset(src, tf, on_corrupt="skip")
    x, label, skipped = skip[broken]
    assert skipped == 1 and x.shape == (8, 8)
    fail = ClassificationDataset(src, tf, on_corrupt="fail")
    with pytest.raises(DataError, match="broken.png"):
        fail[broken]
    assert len(open_source("imagefolder", root, "val")) == 6


def test_on_corrupt_fail_stops_every_stage_at_start_up(tmp_path):
    """data.on_corrupt=fail: the stage refuses its data while building it (before any model or engine)."""
    from defocus_vlm.training.classification import ClassificationTask

    root = _image_folder(tmp_path / "folder")
    cfg = load_config("tiny_cpu", [f"data.path={root}", "data.source=imagefolder", "data.on_corrupt=fail",
                                   "data.limit_train=0", "data.verify=64", "data.in_chans=3"])
    with pytest.raises(DataError, match="broken.png.*data.on_corrupt=skip"):
        ClassificationTask(cfg).build_data()
    with pytest.warns(UserWarning, match="broken.png"):
        ClassificationTask(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, on_corrupt="skip"))).build_data()


def test_hf_dataset_columns(tmp_path):
    import datasets
    from PIL import Image

    imgs = [Image.fromarray(np.full((10, 10), i * 20, np.uint8)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"img": imgs, "y": [0, 1, 2, 1]}).cast_column("img", datasets.Image())
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "hf"))
    src = open_source("auto", tmp_path / "hf", "val", image_column="img", label_column="y")
    assert len(src) == 4 and src.classes == ["0", "1", "2"]
    assert src.load(2)[1] == 2
    with pytest.raises(DataError, match="no column 'image'"):
        open_source("hf", tmp_path / "hf", "train")


def test_sampler_shards_make_the_same_global_batches():
    n, batch = 50, 8
    one = EpochSampler(n, 1, 0, seed=3)
    one.set_epoch(2)
    full = list(one)
    shards = []
    for r in range(2):
        s = EpochSampler(n, 2, r, seed=3)
        s.set_epoch(2)
        shards.append(list(s))
    for b in range(n // batch):
        g = sorted(full[b * batch : (b + 1) * batch])
        parts = sorted(
            shards[0][b * batch // 2 : (b + 1) * batch // 2]
            + shards[1][b * batch // 2 : (b + 1) * batch // 2]
        )
        assert g == parts  # same (index, per-sample seed) pairs
    resumed = EpochSampler(n, 1, 0, seed=3)
    resumed.set_epoch(2, start=16)
    assert list(resumed) == full[16:]
    ra = EpochSampler(48, 2, 0, seed=0, repeats=3)
    ra.set_epoch(0)
    assert len(list(ra)) == 24


def test_a_partial_section_keeps_the_stage_defaults(tmp_path):
    """A stage whose optim/train defaults differ from the shared classes (instruct: lr 2e-5, no EMA) keeps
    them for every key its YAML does not set."""
    from defocus_vlm.training.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("stage: instruct\nmodel: {llm: {config: {model_type: llama}, tokenizer: char}}\n"
                    "data: {train_json: x.json}\noptim: {weight_decay: 0.1}\ntrain: {epochs: 2}\n")
    cfg = load_config(path, stage="instruct")
    assert cfg.optim.weight_decay == 0.1 and cfg.train.epochs == 2
    assert cfg.optim.lr == 2e-5 and cfg.train.ema_decay == 0.0  # the stage's defaults, not OptimConfig's
