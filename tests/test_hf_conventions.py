"""The vision models and the CLIP model behave as transformers' own (ViT, CLIP) under transformers' standard
entry points: activation checkpointing (kwargs, every_n_layers, offload, config flag, Trainer), PEFT's input
grads, standard config names, problem types, attention probabilities and backends, torch.export, the same
init whichever way a model is built, and CLIP's attention implementation and feature getters."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import images, tiny_config, tiny_encoder_config
from defocus_vlm.encoders import DefocusEncoder
from defocus_vlm.kernels.dispatch import BY_ARGUMENT, BY_RULE, record_choices
from transformers.modeling_layers import GradientCheckpointingLayer

from defocus_vlm import (
    DefocusCLIPConfig,
    DefocusCLIPModel,
    DefocusVisionConfig,
    DefocusVisionForImageClassification,
    DefocusVisionModel,
)
from defocus_vlm.compat import (
    activation_checkpointing_active,
    checkpointing_training_arguments,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
)

torch.set_num_threads(1)
MIXERS = ("vit", "retnet", "mamba")


def classifier(mixer: str = "mamba", **overrides) -> DefocusVisionForImageClassification:
    overrides.setdefault("num_labels", 5)
    return DefocusVisionForImageClassification(tiny_config(f"defocus_{mixer}_small", **overrides))


def grads_of(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x, labels=labels, drop_path_rate=0.0).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def mixer_calls(model: torch.nn.Module) -> list[int]:
    """Per block, how often its mixer runs: twice in a training step where the block is checkpointed
    (forward, then the recompute in backward)."""
    counts = [0] * len(model.defocus.encoder.blocks)
    for i, block in enumerate(model.defocus.encoder.blocks):
        block.mixer.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


# ----------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_kwargs_are_honoured_and_grads_equal_plain(mixer, reentrant):
    model = classifier(mixer, aux_loss="none").train()
    x, labels = images(), torch.tensor([1, 3])
    plain = grads_of(model, x, labels)
    assert all(isinstance(b, GradientCheckpointingLayer) for b in model.defocus.encoder.blocks)
    enable_activation_checkpointing(model, {"use_reentrant": reentrant})
    assert activation_checkpointing_active(model)
    with warnings.catch_warnings():  # the old name is deprecated on 5.24, and still answers there
        warnings.simplefilter("ignore", FutureWarning)
        assert model.is_gradient_checkpointing
    for block in model.defocus.encoder.blocks:
        assert block.gradient_checkpointing and block._gradient_checkpointing_func.keywords == {
            "use_reentrant": reentrant}
    calls = mixer_calls(model)
    checkpointed = grads_of(model, x, labels)
    assert calls == [2, 2]
    assert checkpointed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
    disable_activation_checkpointing(model)
    assert not activation_checkpointing_active(model)


def test_every_n_layers_and_offload_reach_the_blocks():
    model = classifier("retnet", depth=4, aux_loss="none").train()
    x, labels = images(), torch.tensor([0, 4])
    plain = grads_of(model, x, labels)
    enable_activation_checkpointing(model, every_n_layers=2, offload=True)
    assert [b.gradient_checkpointing for b in model.defocus.encoder.blocks] == [True, False, True, False]
    calls = mixer_calls(model)
    checkpointed = grads_of(model, x, labels)
    assert calls == [2, 1, 2, 1]
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_config_gradient_checkpointing_flag_turns_it_on():
    config = tiny_config("defocus_vit_small", num_labels=5)
    config.gradient_checkpointing = True
    model = DefocusVisionForImageClassification(config)
    assert all(b.gradient_checkpointing for b in model.defocus.encoder.blocks)
    assert "gradient_checkpointing" not in model.config.to_dict()  # consumed, as transformers does


def test_trainer_activation_checkpointing_arguments(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = classifier("mamba", depth=4)
    data = [{"pixel_values": images(batch=1)[0], "labels": torch.tensor(i % 5)} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True,
                             **checkpointing_training_arguments({"every_n_layers": 2, "use_reentrant": False}))
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert [b.gradient_checkpointing for b in model.defocus.encoder.blocks] == [True, False, True, False]
    assert model.defocus.encoder.blocks[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert math.isfinite(result.training_loss)


def test_streaming_with_checkpointing_in_a_training_step_is_refused():
    model = DefocusVisionModel(tiny_config("defocus_mamba_small")).train()
    enable_activation_checkpointing(model)
    x = images()
    with pytest.raises(ValueError, match="streaming cache twice"):
        list(model.stream(x, 5))
    with torch.no_grad():  # no backward, no recompute: streaming stays exact
        streamed = torch.cat(list(model.stream(x, 5)), dim=1)
        torch.testing.assert_close(streamed, model(x).last_hidden_state, rtol=0, atol=1e-5)


def test_enable_input_require_grads_lets_adapters_train_behind_a_frozen_embedding():
    # PEFT freezes the base; with reentrant checkpointing nothing entering the blocks requires grad, so the
    # trainable parameters inside them get none unless the embedding output is made to require grad.
    model = classifier("vit", aux_loss="none").train()
    assert model.get_input_embeddings() is model.defocus.encoder.patch_embed.proj
    trainable = model.defocus.encoder.blocks[1].mlp.fc1.weight
    x, labels = images(), torch.tensor([2, 0])
    reference = torch.autograd.grad(model(x, labels=labels, drop_path_rate=0.0).loss, trainable)[0]
    model.requires_grad_(False)
    trainable.requires_grad_(True)
    enable_activation_checkpointing(model, {"use_reentrant": True})
    with warnings.catch_warnings():  # torch warns that no input requires grad: that is the point
        warnings.simplefilter("ignore", UserWarning)
        assert not model(x, labels=labels, drop_path_rate=0.0).loss.requires_grad  # the adapter is unreachable
    model.enable_input_require_grads()
    model(x, labels=labels, drop_path_rate=0.0).loss.backward()
    torch.testing.assert_close(trainable.grad, reference)


def test_peft_lora_trains_behind_reentrant_checkpointing():
    from peft import LoraConfig, get_peft_model

    model = classifier("vit", aux_loss="none").train()
    enable_activation_checkpointing(model, {"use_reentrant": True})
    lora = get_peft_model(model, LoraConfig(target_modules=["fc1"], r=4))  # hooks get_input_embeddings()
    lora(pixel_values=images(), labels=torch.tensor([0, 1]), drop_path_rate=0.0).loss.backward()
    adapters = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert len(adapters) == 4 and all(g is not None for g in adapters.values())  # A and B of both blocks
    assert all(g.abs().sum() > 0 for n, g in adapters.items() if "lora_B" in n)  # (B starts at 0: A's grads are 0)


# ----------------------------------------------------------------------------- config names
def test_config_answers_to_transformers_standard_names():
    config = DefocusVisionConfig.from_preset("defocus_vit_small", hidden_size=64, num_attention_heads=4,
                                             num_hidden_layers=3, image_size=32, num_channels=1)
    assert (config.embed_dim, config.num_heads, config.depth, config.img_size, config.in_chans) == (64, 4, 3, 32, 1)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 4, 3)
    config.hidden_size = 96
    assert config.embed_dim == 96
    saved = config.to_dict()
    assert "hidden_size" not in saved and saved["embed_dim"] == 96  # saved under the encoder's own names
    assert DefocusVisionConfig.from_dict(saved).encoder_config() == config.encoder_config()
    with pytest.raises(ValueError, match="name the same setting"):
        DefocusVisionConfig(hidden_size=64, embed_dim=32)
    with pytest.raises(ValueError, match="num_heads"):  # the standard names are validated like the own ones
        DefocusVisionConfig.from_preset("defocus_vit_small", num_attention_heads=5)


# ----------------------------------------------------------------------------- problem types
def test_problem_types_choose_the_loss_as_in_vit():
    x = images(batch=3)
    regression = classifier(aux_loss="none", num_labels=1).eval()
    targets = torch.tensor([0.5, -1.0, 2.0])
    out = regression(x, labels=targets)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), targets))  # one output: inferred

    model = classifier(aux_loss="none").eval()
    soft = torch.softmax(torch.randn(3, 5), -1)
    with torch.no_grad():
        logits = model(x).logits
        model.config.problem_type = "regression"
        torch.testing.assert_close(model(x, labels=soft).loss, F.mse_loss(logits, soft))
        model.config.problem_type = "multi_label_classification"
        multi_hot = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 0, 0, 0]])
        torch.testing.assert_close(model(x, labels=multi_hot).loss,
                                   F.binary_cross_entropy_with_logits(logits, multi_hot))
        model.config.problem_type = "single_label_classification"
        index = torch.tensor([4, 0, 2])
        torch.testing.assert_close(model(x, labels=index).loss, F.cross_entropy(logits, index))
        model.config.problem_type = None  # float targets alone: soft cross-entropy (mixup)
        torch.testing.assert_close(model(x, labels=soft).loss, -(soft * logits.log_softmax(-1)).sum(-1).mean())


def test_problem_type_also_sets_the_auxiliary_loss():
    model = classifier(aux_loss="token", problem_type="multi_label_classification").eval()
    x, multi_hot = images(), torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])
    with torch.no_grad():
        out = model(x, labels=multi_hot)
    tokens = out.aux_logits.shape[1]
    aux = F.binary_cross_entropy_with_logits(out.aux_logits, multi_hot[:, None].expand(-1, tokens, -1))
    torch.testing.assert_close(out.loss, (F.binary_cross_entropy_with_logits(out.logits, multi_hot) + aux) / 2)


# ----------------------------------------------------------------------------- attentions
def test_output_attentions_returns_the_vit_probabilities():
    model = DefocusVisionModel(tiny_config("defocus_vit_small")).eval()
    x = images()
    with torch.no_grad():
        fused = model(x, output_hidden_states=True)
        out = model(x, output_attentions=True, output_hidden_states=True)
        as_tuple = model(x, output_attentions=True, return_dict=False)
    assert fused.attentions is None
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 2, 17))
    assert torch.equal(out.attentions[0].triu(1), torch.zeros_like(out.attentions[0]))  # causal
    torch.testing.assert_close(out.last_hidden_state, fused.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(as_tuple) == 3 and torch.equal(as_tuple[2][1], out.attentions[1])
    # by hand, block 0: softmax(q k^T / sqrt(d) + lambda_h |t - s|) on the causal half
    block = model.encoder.blocks[0]
    q, k, _ = block.mixer.qkv(block.norm1(out.hidden_states[0])).view(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k = block.mixer.filter.rotate(q, 0), block.mixer.filter.rotate(k, 0)
    distance = (torch.arange(17)[:, None] - torch.arange(17)[None]).float()
    scores = q @ k.transpose(-1, -2) / 4 + block.mixer.filter.log_decay()[:, None, None] * distance
    expected = scores.masked_fill(distance < 0, float("-inf")).softmax(-1)
    torch.testing.assert_close(out.attentions[0], expected, rtol=1e-5, atol=1e-6)
    classifier_out = DefocusVisionForImageClassification(tiny_config("defocus_vit_small", num_labels=3)).eval()(
        x, output_attentions=True)
    assert len(classifier_out.attentions) == 2


@pytest.mark.parametrize("mixer", ["retnet", "mamba"])
def test_output_attentions_is_refused_where_there_are_none(mixer):
    model = DefocusVisionModel(tiny_config(f"defocus_{mixer}_small")).eval()
    with pytest.raises(ValueError, match=f"the '{mixer}' mixer has no attention probabilities"):
        model(images(), output_attentions=True)


def test_attn_implementation_selects_the_attention_kernel(tmp_path):
    model = DefocusVisionModel(tiny_config("defocus_vit_small")).eval()
    x = images()
    with torch.no_grad(), record_choices() as choices:
        default = model(x).last_hidden_state
        assert choices["attention"][1] == BY_RULE
        for implementation, kernel in (("eager", "reference"), ("flex_attention", "flex"), ("sdpa", None)):
            model.set_attn_implementation(implementation)
            torch.testing.assert_close(model(x).last_hidden_state, default, rtol=1e-5, atol=1e-5)
            assert choices["attention"][0] == kernel if kernel else choices["attention"][1] == BY_RULE
    model.save_pretrained(tmp_path)
    eager = DefocusVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad(), record_choices() as choices:
        assert eager(x, return_dict=True).last_hidden_state.shape == default.shape
    assert choices["attention"] == ("reference", BY_ARGUMENT)
    with pytest.raises(ValueError, match="Flash Attention"):  # cannot add the distance decay
        DefocusVisionModel.from_pretrained(tmp_path, attn_implementation="flash_attention_2")


# ----------------------------------------------------------------------------- torch.export
@pytest.mark.parametrize("mixer", MIXERS)
def test_torch_export_static_and_dynamic_batch_equal_eager(mixer):
    model = classifier(mixer).eval()
    x, other = images(batch=2), images(batch=3)
    with torch.no_grad():
        expected, expected_other = model(x).logits, model(other).logits
    static = torch.export.export(model, (x,))
    torch.testing.assert_close(static.module()(x)[0], expected, rtol=1e-5, atol=1e-5)
    batch = torch.export.Dim("batch", min=1, max=16)
    dynamic = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(dynamic.module()(other)[0], expected_other, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):  # the data check stays, in eager calls
        model(torch.full_like(x, float("nan")))


# ----------------------------------------------------------------------------- one init, every door
def _drawn(name: str, value: torch.Tensor) -> bool:
    """Whether a parameter's init draws at random: weight matrices and convolutions, class token, position embedding.
    Everything else (biases of Linear layers, norms, Mamba's dt bias / A / D / frequencies, the band-pass filter)
    is set to fixed values."""
    return (name.endswith("weight") and value.dim() > 1) or "conv" in name or "patch_embed" in name \
        or name.endswith(("cls_token", "pos_embed"))


@pytest.mark.parametrize("preset", ["defocus_mamba_small", "causal_mamba_small", "defocus_retnet_small"])
def test_same_init_whichever_door_builds_the_model(preset):
    import timm

    cfg = tiny_encoder_config(preset)
    doors = {
        "standalone": DefocusEncoder(cfg).state_dict(),
        "timm": timm.create_model(preset, num_classes=5, **cfg.to_dict()).encoder.state_dict(),
        "hf": DefocusVisionModel(DefocusVisionConfig(**cfg.to_dict())).encoder.state_dict(),
    }
    assert doors["standalone"].keys() == doors["timm"].keys() == doors["hf"].keys()
    reference = doors["hf"]
    for door, state in doors.items():
        for name, value in state.items():
            if not _drawn(name, value):
                torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=f"{door}: {name}")
        for name, value in state.items():  # truncated normal(0.02) for every Linear weight
            if name.endswith("weight") and value.dim() == 2 and "dt_proj" not in name:
                assert 0.012 < value.std().item() < 0.028, f"{door}: {name} std {value.std().item():.4f}"
    if preset.endswith("mamba_small"):
        for door, state in doors.items():
            delta = F.softplus(state["blocks.0.mixer.dt_proj.bias"])
            assert 0.9e-3 <= delta.min().item() and delta.max().item() <= 0.11, door  # not softplus(0) = 0.69


def test_timm_head_is_initialised_like_the_hf_head():
    import timm

    head = timm.create_model("defocus_vit_small", num_classes=100, **tiny_encoder_config("defocus_vit_small")
                             .to_dict()).head
    hf_head = classifier("vit", num_labels=100).head
    assert torch.equal(head.bias, torch.zeros(100)) and torch.equal(hf_head.bias, torch.zeros(100))
    assert abs(head.weight.std().item() - hf_head.weight.std().item()) < 0.004


# ----------------------------------------------------------------------------- CLIP
def tiny_clip(mixer: str = "vit", **kwargs) -> DefocusCLIPModel:
    text = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 32, "tie_word_embeddings": False}
    config = DefocusCLIPConfig(vision_config=tiny_config(f"defocus_{mixer}_small"), text_config=text,
                               projection_dim=16, **kwargs)
    return DefocusCLIPModel(config).eval()


def test_clip_attn_implementation_reaches_both_towers(tmp_path):
    model = tiny_clip()
    model.save_pretrained(tmp_path)
    loaded = DefocusCLIPModel.from_pretrained(tmp_path, attn_implementation="eager")
    towers = (loaded.vision_model.config, loaded.text_model.config)
    assert [c._attn_implementation for c in towers] == ["eager", "eager"]
    loaded.set_attn_implementation("sdpa")
    assert [c._attn_implementation for c in towers] == ["sdpa", "sdpa"]
    loaded.set_attn_implementation({"text_config": "eager"})
    assert [c._attn_implementation for c in towers] == ["sdpa", "eager"]
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad(), record_choices() as choices:
        loaded.set_attn_implementation({"vision_config": "eager"})
        loaded(input_ids=ids, pixel_values=images())
    assert choices["attention"] == ("reference", BY_ARGUMENT)  # the image tower took it too
    with pytest.raises(ValueError, match="Flash Attention"):
        loaded.set_attn_implementation({"vision_config": "flash_attention_2"})


def test_clip_feature_getters_honour_return_dict():
    model = tiny_clip("mamba")
    ids, x = torch.randint(0, 64, (2, 5)), images()
    with torch.no_grad():
        image, text = model.get_image_features(x), model.get_text_features(ids)
        assert image.pooler_output.shape == text.pooler_output.shape == (2, 16)
        image_tuple = model.get_image_features(x, return_dict=False)
        text_tuple = model.get_text_features(ids, return_dict=False, output_hidden_states=True)
        assert isinstance(image_tuple, tuple) and torch.equal(image_tuple[1], image.pooler_output)
        assert isinstance(text_tuple, tuple) and torch.equal(text_tuple[1], text.pooler_output)
        assert len(text_tuple[2]) == 3  # embeddings + 2 layers
        assert len(model.get_image_features(x, output_hidden_states=True).hidden_states) == 3
        model.config.return_dict = False
        assert isinstance(model.get_image_features(x), tuple) and isinstance(model.get_text_features(ids), tuple)
        assert isinstance(model(input_ids=ids, pixel_values=x), tuple)


def test_clip_checkpointing_reaches_both_towers_and_keeps_the_grads():
    model = tiny_clip("retnet").train()
    ids, x = torch.randint(0, 64, (2, 5)), images()

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, pixel_values=x, return_loss=True, drop_path_rate=0.0).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    enable_activation_checkpointing(model, {"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 4 and all(m.gradient_checkpointing for m in layers)  # 2 image blocks + 2 text layers
    assert all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False} for m in layers)
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
