"""Hugging Face integration: save/load, Auto* classes, trust_remote_code in a fresh process,
pipelines, timm, the classification losses and a light ``import defocus_vlm``."""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import images, tiny_config
from safetensors.torch import load_file, save_file

from defocus_vlm import (
    DefocusImageProcessor,
    DefocusVisionConfig,
    DefocusVisionForImageClassification,
    DefocusVisionModel,
    list_presets,
)
from defocus_vlm.compat import enable_activation_checkpointing

LABELS = {i: name for i, name in enumerate(["cat", "dog", "fox", "owl", "elk"])}


def tiny_classifier(preset="defocus_mamba_small", **overrides) -> DefocusVisionForImageClassification:
    kw = dict(num_labels=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    kw.update(overrides)
    return DefocusVisionForImageClassification(tiny_config(preset, **kw)).eval()


def fresh_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("DEFOCUS_KERNELS", "PYTHONPATH")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    return env


def run_python(code: str, tmp_path, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path,
                          env=fresh_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\nSTDOUT\n{proc.stdout}\nSTDERR\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny De-focus Mamba classifier (32 px, 8 px patches) and its processor, saved once."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("saved") / "model"
    model = tiny_classifier(img_size=32, patch_size=8)
    with torch.no_grad():  # non-trivial heads so that logits differ between classes
        model.head.bias.copy_(torch.linspace(-1, 1, 5))
    model.save_pretrained(path)
    DefocusImageProcessor(size=32).save_pretrained(path)
    return path, model


# ----------------------------------------------------------------------------- save / load
def test_save_pretrained_round_trip(saved):
    path, model = saved
    files = set(os.listdir(path))
    assert "model.safetensors" in files
    assert not any(f.endswith(".bin") or f.endswith(".pt") for f in files), files
    assert {"config.json", "preprocessor_config.json", "defocus_remote.py"} <= files
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "defocus_remote.DefocusVisionForImageClassification"

    loaded = DefocusVisionForImageClassification.from_pretrained(path).eval()
    assert loaded.config.encoder_config() == model.config.encoder_config()
    assert loaded.config.id2label == LABELS
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    x = images(size=32)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_auto_classes_load_the_directory(saved):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    path, model = saved
    config = AutoConfig.from_pretrained(path)
    assert isinstance(config, DefocusVisionConfig) and config.mixer == "mamba" and config.img_size == 32
    base = AutoModel.from_pretrained(path).eval()
    assert isinstance(base, DefocusVisionModel)
    clf = AutoModelForImageClassification.from_pretrained(path).eval()
    assert isinstance(clf, DefocusVisionForImageClassification)
    proc = AutoImageProcessor.from_pretrained(path)
    assert isinstance(proc, DefocusImageProcessor) and proc.size == 32
    x = images(size=32)
    with torch.no_grad():
        out = base(x)
        ref = model.defocus(x)
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
        assert torch.equal(out.pooler_output, out.last_hidden_state[:, -1])  # class token last
        torch.testing.assert_close(clf(x).logits, model(x).logits, rtol=0, atol=0)


def test_trust_remote_code_in_a_process_that_never_imports_defocus_vlm(saved, tmp_path):
    path, model = saved
    x = images(size=32)
    save_file({"x": x}, tmp_path / "x.safetensors")
    run_python(f"""
        import sys
        import torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        assert "defocus_vlm" not in sys.modules
        model = AutoModelForImageClassification.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "DefocusVisionForImageClassification", type(model)
        proc = AutoImageProcessor.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(proc).__name__ == "DefocusImageProcessor", type(proc)
        with torch.no_grad():
            logits = model(load_file("x.safetensors")["x"]).logits
        save_file({{"logits": logits.contiguous()}}, "logits.safetensors")
        """, tmp_path)
    with torch.no_grad():
        expected = model(x).logits
    got = load_file(tmp_path / "logits.safetensors")["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_from_pretrained_in_bf16_runs_close_to_fp32(saved):
    path, model = saved
    low = DefocusVisionForImageClassification.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert next(low.parameters()).dtype == torch.bfloat16
    x = images(size=32)
    with torch.no_grad():
        logits = low(x).logits
        ref = model(x).logits
    assert torch.isfinite(logits.float()).all()
    torch.testing.assert_close(logits.float(), ref, rtol=0, atol=0.1)


# ----------------------------------------------------------------------------- pipeline
def test_image_classification_pipeline_never_prompts(saved, monkeypatch):
    from skimage.data import chelsea
    from transformers import pipeline

    path, model = saved
    prompts = []

    def no_prompt(*args, **kwargs):
        prompts.append(args)
        raise AssertionError(f"pipeline prompted: {args}")

    monkeypatch.setattr(builtins, "input", no_prompt)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # closed: nothing to read
    classify = pipeline("image-classification", model=str(path))
    image = chelsea()
    top3 = classify(image, top_k=3)
    assert prompts == []
    assert len(top3) == 3 and all(set(d) == {"label", "score"} for d in top3)
    assert all(d["label"] in LABELS.values() for d in top3)
    scores = [d["score"] for d in top3]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    everything = classify(image, top_k=5)
    assert sum(d["score"] for d in everything) == pytest.approx(1.0, abs=1e-5)
    # the pipeline's answer is the model's answer on the processor's tensor
    pixels = DefocusImageProcessor.from_pretrained(path)(image)["pixel_values"]
    with torch.no_grad():
        probs = model(pixels).logits.softmax(-1)[0]
    assert top3[0]["label"] == LABELS[int(probs.argmax())]
    assert top3[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


# ----------------------------------------------------------------------------- timm
def test_timm_create_model():
    import timm

    registered = set(timm.list_models("*"))
    assert set(list_presets()) <= registered
    model = timm.create_model("defocus_mamba_small", num_classes=10, img_size=32, patch_size=8).eval()
    assert model.encoder.cfg.patch_size == 8 and model.encoder.cfg.img_size == 32
    assert model.encoder.cfg.embed_dim == 384 and len(model.encoder.blocks) == 24
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert features.shape == (2, 17, 384)
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features[:, -1])
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("defocus_mamba_small", pretrained=True)


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("aux", ["pooled", "token", "none"])
def test_loss_index_labels_equal_one_hot_targets(aux):
    model = tiny_classifier("defocus_vit_small", aux_loss=aux)
    x, labels = images(batch=3), torch.tensor([0, 3, 4])
    with torch.no_grad():
        out = model(x, labels=labels)
        soft = model(x, labels=F.one_hot(labels, 5).float())
    torch.testing.assert_close(soft.loss, out.loss)
    # by hand: (CE(class token) + CE(aux)) / 2, the aux CE averaged over tokens for "token"
    cls_ce = F.cross_entropy(out.logits, labels)
    if aux == "none":
        assert out.aux_logits is None
        torch.testing.assert_close(out.loss, cls_ce)
    else:
        flat = out.aux_logits if aux == "pooled" else out.aux_logits.flatten(0, 1)
        target = labels if aux == "pooled" else labels.repeat_interleave(out.aux_logits.shape[1])
        torch.testing.assert_close(out.loss, (cls_ce + F.cross_entropy(flat, target)) / 2)


def test_soft_targets_are_linear_like_mixup():
    model = tiny_classifier("defocus_retnet_small", aux_loss="token")
    x = images(batch=2)
    a, b = torch.tensor([1, 2]), torch.tensor([4, 0])
    mixed = 0.7 * F.one_hot(a, 5).float() + 0.3 * F.one_hot(b, 5).float()
    with torch.no_grad():
        la, lb, lm = (model(x, labels=t).loss for t in (a, b, mixed))
    torch.testing.assert_close(lm, 0.7 * la + 0.3 * lb)


def test_aux_logits_shapes_and_when_they_appear():
    x = images(batch=2)
    token = tiny_classifier(aux_loss="token")
    pooled = tiny_classifier(aux_loss="pooled")
    with torch.no_grad():
        assert token(x).aux_logits is None  # eval without labels: class token only
        assert token(x, labels=torch.tensor([0, 1])).aux_logits.shape == (2, 16, 5)  # one per patch
        assert pooled(x, labels=torch.tensor([0, 1])).aux_logits.shape == (2, 5)
        pooled.train()
        out = pooled(x, drop_path_rate=0.0)
    assert out.aux_logits.shape == (2, 5) and out.loss is None
    assert out.logits.shape == (2, 5)


def test_mlp_head_and_gradient_checkpointing():
    model = tiny_classifier("defocus_mamba_large")  # the official IN-22k MLP heads
    assert isinstance(model.head, torch.nn.Sequential) and model.head[0].out_features == 3 * 32
    model.train()
    enable_activation_checkpointing(model)
    assert all(block.gradient_checkpointing for block in model.defocus.encoder.blocks)
    out = model(images(), labels=torch.tensor([1, 2]), drop_path_rate=0.0)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- vision model API
def test_vision_model_outputs_and_stream():
    model = DefocusVisionModel(tiny_config("defocus_retnet_small")).eval()
    x = images()
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        tup = model(x, return_dict=False)
        streamed = torch.cat(list(model.stream(x, 5)), dim=1)
    assert out.last_hidden_state.shape == (2, 17, 32)
    assert len(out.hidden_states) == 3  # embeddings + one per block
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, -1])
    assert torch.equal(tup[0], out.last_hidden_state)
    torch.testing.assert_close(streamed, out.last_hidden_state, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["defocus_mamba_small", "defocus_retnet_small", "defocus_vit_small"])
def test_stream_of_every_layer_equals_one_shot_and_is_prefix_invariant(preset):
    """stream(layer=k) gives hidden_states[k] (k != -1) or last_hidden_state (-1) chunk by chunk, for every layer;
    a chunk depends only on the patches up to it: changing the last row of the image leaves the earlier chunks."""
    model = DefocusVisionModel(tiny_config(preset)).eval()
    x = images()
    changed = x.clone()
    changed[..., -4:, :] = torch.randn_like(changed[..., -4:, :])  # the last row of 4 px patches: tokens 12..15
    depth = model.config.depth
    assert model.num_tokens() == model.num_tokens(16, 16) == 17 and model.num_tokens(32, 16) == 33
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        for layer in range(-(depth + 1), depth + 1):
            expected = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            for chunk in (1, 5, 17):
                parts = list(model.stream(x, chunk, layer=layer))
                assert [p.shape[1] for p in parts] == [min(chunk, 17 - i) for i in range(0, 17, chunk)]
                torch.testing.assert_close(torch.cat(parts, 1), expected, rtol=0, atol=1e-5)
            before = torch.cat(list(model.stream(x, 4, layer=layer))[:3], 1)
            after = torch.cat(list(model.stream(changed, 4, layer=layer))[:3], 1)
            assert torch.equal(before, after), layer  # tokens 0..11: the first three rows
            if layer != 0:  # the patch embeddings of the changed row differ, and so does what follows them
                assert not torch.equal(list(model.stream(x, 4, layer=layer))[3],
                                       list(model.stream(changed, 4, layer=layer))[3])
    with pytest.raises(ValueError, match=rf"layer must be an integer in \[{-(depth + 1)}, {depth}\]"):
        model.stream(x, 4, layer=depth + 1)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.check_pixels(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="expected 3 image channels"):
        model.stream(torch.zeros(1, 1, 16, 16), 4)


def test_config_from_preset_and_overrides():
    cfg = DefocusVisionConfig.from_preset("defocus_vit_base", num_labels=10, img_size=32, drop_path_rate=0.3)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) == (768, 12, 12, 32)
    assert cfg.num_labels == 10 and cfg.drop_path_rate == 0.3 and cfg.preset == "defocus_vit_base"
    again = DefocusVisionConfig.from_dict(cfg.to_dict())
    assert again.encoder_config() == cfg.encoder_config()
    assert DefocusVisionConfig.from_preset("defocus_mamba_large").head_type == "mlp"
    assert DefocusVisionConfig.from_preset("defocus_mamba_large", head_type="linear").head_type == "linear"


# ----------------------------------------------------------------------------- light import
def test_import_does_not_pull_heavy_optional_packages(tmp_path):
    heavy = ["deepspeed", "datasets", "mamba_ssm", "causal_conv1d", "flash_attn", "fla", "lmms_eval"]
    proc = run_python(f"""
        import sys
        import defocus_vlm
        heavy = {heavy!r}
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
        """, tmp_path)
    assert proc.stdout.strip() == "[]", proc.stdout
