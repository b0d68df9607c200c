"""LLaVA conversation data: assistant-only labels from the chat template (multi-turn, multi-image,
truncated), the over-long policies, record validation, batching, and the easy-VQA export."""

from __future__ import annotations

import json

import pytest
import torch

from defocus_vlm.data.classification import DataError
from defocus_vlm.data.llava import (
    IGNORE_INDEX,
    Conversation,
    ConversationEncoder,
    LlavaCollator,
    read_llava_json,
    resolve_images,
    tokenize_conversation,
)

# ChatML with a default system turn (like SmolLM2's); the second variant marks the assistant turns
# with {% generation %} so the tokenizer's own assistant mask can be compared with prefix rendering.
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IMAGE_TOKENS = 5  # an 8 px image in 4 px patches: 4 patches + the class token


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer with a few merges (so tokens span several characters), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("y", "e"), ("ye", "s"), ("r", "e"), ("re", "d"), ("Ġ", "t")]
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<image>"])
    tok.chat_template = CHATML
    return tok


def encoder_of(tokenizer, **kwargs) -> ConversationEncoder:
    """A ConversationEncoder through the processor of a model whose images become IMAGE_TOKENS tokens."""
    from defocus_vlm import DefocusImageProcessor, DefocusVisionConfig, DefocusVLMConfig, DefocusVLMProcessor

    config = DefocusVLMConfig(vision_config=DefocusVisionConfig(img_size=8, patch_size=4),
                              image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    processor = DefocusVLMProcessor.from_config(config, tokenizer, DefocusImageProcessor(size=8), chat_template=CHATML)
    assert processor.num_image_tokens() == IMAGE_TOKENS
    return ConversationEncoder(processor, **kwargs)


def conversation(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def read_conv(messages: list[dict], images: list[str]) -> Conversation:
    return Conversation("sample", messages, images)


def labelled_text(tokenizer, labels: torch.Tensor | list) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for label in list(labels) + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(int(label))
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_multi_turn_labels_are_exactly_the_assistant_turns(tokenizer):
    messages = conversation("<image>\nis it red?", "yes", "what shape is it?", "a red circle")
    enc = encoder_of(tokenizer).encode(read_conv(messages, images=["a.png"]))
    assert labelled_text(tokenizer, enc.labels) == ["yes<|im_end|>\n", "a red circle<|im_end|>\n"]
    # everything that is not an assistant turn is ignored, and labels equal the ids where trained
    trained = enc.labels != IGNORE_INDEX
    assert (enc.labels[trained] == enc.input_ids[trained]).all()
    prompt_text = tokenizer.decode(enc.input_ids[~trained])
    assert "is it red?" in prompt_text and "what shape is it?" in prompt_text and "yes" not in prompt_text


def test_generation_blocks_and_prefix_rendering_agree(tokenizer):
    messages = conversation("hi <image>", "yes", "and now?", "red", "bye", "ok")
    ids_prefix, mask_prefix = tokenize_conversation(tokenizer, messages, CHATML)
    ids_gen, mask_gen = tokenize_conversation(tokenizer, messages, CHATML_GENERATION)
    assert ids_prefix == ids_gen and mask_prefix == mask_gen and sum(mask_gen) > 0


def test_template_whose_prefixes_change_is_refused(tokenizer):
    # renders the last message differently from the others: prefixes are not prefixes of the whole
    template = ("{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
                "{% if loop.last %}{{ '<END>' }}{% else %}{{ '\n' }}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="not a prefix"):
        tokenize_conversation(tokenizer, conversation("q", "a", "q2", "a2"), template)


def test_multi_image_placeholders_expand_and_are_masked(tokenizer):
    messages = conversation("<image> and <image>: same colour?", "no", "and this one <image>?", "yes")
    encoder = encoder_of(tokenizer)
    enc = encoder.encode(read_conv(messages, images=["a.png", "b.png", "c.png"]))
    image_id = encoder.image_token_id
    assert int((enc.input_ids == image_id).sum()) == 3 * IMAGE_TOKENS
    assert (enc.labels[enc.input_ids == image_id] == IGNORE_INDEX).all()
    # each placeholder became one contiguous run of IMAGE_TOKENS tokens
    positions = (enc.input_ids == image_id).nonzero()[0]
    runs = (positions[1:] != positions[:-1] + 1).sum() + 1
    assert runs == 3
    assert labelled_text(tokenizer, enc.labels) == ["no<|im_end|>\n", "yes<|im_end|>\n"]


def test_truncation_keeps_labels_aligned_and_never_cuts_images(tokenizer):
    messages = conversation("<image>\nq1", "first answer", "q2", "second answer that is long")
    conv = read_conv(messages, images=["a.png"])
    full = encoder_of(tokenizer, max_length=10_000).encode(conv)
    cut_at = int((full.labels != IGNORE_INDEX).nonzero()[0][-1]) - 3  # inside the last answer
    cut = encoder_of(tokenizer, max_length=cut_at).encode(conv)
    assert len(cut.input_ids) == cut_at
    assert (cut.input_ids == full.input_ids[:cut_at]).all() and (cut.labels == full.labels[:cut_at]).all()
    assert labelled_text(tokenizer, cut.labels)[0] == "first answer<|im_end|>\n"

    image_end = int((full.input_ids == tokenizer.convert_tokens_to_ids("<image>")).nonzero()[0][-1])
    encoder = encoder_of(tokenizer, max_length=image_end)  # last image token cut
    assert encoder.encode(conv) is None and encoder.dropped == {"image tokens do not fit": 1}
    # fits the image but no answer token: dropped, never trained on an empty target
    encoder = encoder_of(tokenizer, max_length=image_end + 3)
    assert encoder.encode(conv) is None and encoder.dropped == {"no answer tokens": 1}

    drop = encoder_of(tokenizer, max_length=cut_at, overlong="drop")
    assert drop.encode(conv) is None and drop.dropped == {"too long": 1}
    strict = encoder_of(tokenizer, max_length=cut_at, overlong="error")
    with pytest.raises(DataError, match=f"more than max_length {cut_at}"):
        strict.encode(conv)


def test_prompt_encoding_matches_the_training_prefix(tokenizer):
    messages = conversation("<image>\nwhat colour?", "red")
    encoder = encoder_of(tokenizer)
    enc = encoder.encode(read_conv(messages, images=["a.png"]))
    prompt = encoder.encode_prompt(messages[:1])
    first_label = int((enc.labels != IGNORE_INDEX).nonzero()[0][0])
    assert (prompt == enc.input_ids[:first_label]).all()


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_records_are_validated(tmp_path):
    ok = {"id": "x", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image><image> same?"}, {"from": "gpt", "value": "no"}]}
    [conv] = read_llava_json(write_json(tmp_path / "ok.json", [ok]))
    assert conv.images == ["a.png", "b.png"] and [m["role"] for m in conv.messages] == ["user", "assistant"]
    with pytest.raises(FileNotFoundError, match="b.png"):
        (tmp_path / "a.png").write_bytes(b"")
        resolve_images([conv], tmp_path, "ok.json")
    bad = [
        ({**ok, "image": "a.png"}, "1 image\\(s\\) but 2"),
        ({**ok, "conversations": [{"from": "gpt", "value": "no"}]}, "user turn before"),
        ({**ok, "conversations": [{"from": "robot", "value": "x"}]}, "'from'"),
        ({**ok, "conversations": ok["conversations"] + [{"from": "gpt", "value": "<image>"}]}, "assistant turn"),
    ]
    for record, message in bad:
        with pytest.raises(DataError, match=message):
            read_llava_json(write_json(tmp_path / "bad.json", [record]))
    with pytest.raises(DataError, match="non-empty list"):
        read_llava_json(write_json(tmp_path / "empty.json", []))


def test_collate_pads_and_concatenates_images_in_order():
    a = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]),
         "pixel_values": torch.zeros(2, 3, 4, 4)}
    b = {"input_ids": torch.tensor([4]), "labels": torch.tensor([4]), "pixel_values": torch.ones(1, 3, 4, 4)}
    c = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6]), "pixel_values": None}
    right = LlavaCollator(pad_token_id=0)([a, b, c])
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert right["labels"].tolist() == [[-100, 2, 3], [4, -100, -100], [-100, 6, -100]]
    assert right["pixel_values"][:, 0, 0, 0].tolist() == [0, 0, 1]
    left = LlavaCollator(pad_token_id=0, padding_side="left")([b, c])
    assert left["input_ids"].tolist() == [[0, 4], [5, 6]] and left["pixel_values"].shape[0] == 1


def test_easy_vqa_export(tmp_path):
    from defocus_vlm.cli import main

    pytest.importorskip("easy_vqa", reason="easy-vqa is not installed (pip install 'defocus-vlm[train]')")
    assert main(["data", "easy-vqa", "--out", str(tmp_path / "flat"), "--limit", "25"]) == 0
    train = read_llava_json(tmp_path / "flat" / "train.json")
    test = read_llava_json(tmp_path / "flat" / "test.json")
    answers = (tmp_path / "flat" / "answers.txt").read_text().split()
    assert len(train) == len(test) == 25 and len(answers) == 13
    for conv in train + test:
        user, assistant = conv.messages
        assert user["content"].startswith("<image>\n") and user["content"].endswith("single word or phrase.")
        assert assistant["content"] in answers and len(conv.images) == 1
    resolve_images(train + test, tmp_path / "flat" / "images", "export")

    assert main(["data", "easy-vqa", "--out", str(tmp_path / "grouped"), "--limit", "25", "--group-by-image",
                 "--instruction", ""]) == 0
    grouped = read_llava_json(tmp_path / "grouped" / "train.json")
    assert len(grouped) < 25 and sum(len(c.messages) for c in grouped) == 2 * 25
    first = grouped[0].messages
    assert first[0]["content"].startswith("<image>\n") and "<image>" not in first[2]["content"]
    assert first[0]["content"] == "<image>\n" + "what is the blue shape?"


def test_easy_vqa_export_has_a_classification_layout(tmp_path):
    """classes/{train,val}/<colour>_<shape>/: the images whose colour and shape their questions pin
    down, each in the folder its own questions agree with."""
    from defocus_vlm.cli import main

    pytest.importorskip("easy_vqa", reason="easy-vqa is not installed (pip install 'defocus-vlm[train]')")
    assert main(["data", "easy-vqa", "--output-dir", str(tmp_path), "--limit", "200"]) == 0
    for split, json_name in (("train", "train.json"), ("val", "test.json")):
        folders = sorted(p for p in (tmp_path / "classes" / split).iterdir())
        assert folders and all(len(p.name.split("_")) == 2 for p in folders)
        labels = {f"{split if split == 'train' else 'test'}/{png.name}": p.name for p in folders for png in p.iterdir()}
        assert len(labels) >= 10
        checked = 0
        for conv in read_llava_json(tmp_path / json_name):
            label = labels.get(conv.images[0])
            question, answer = conv.messages[0]["content"].split("\n")[1], conv.messages[1]["content"]
            if label and question in ("what color is the shape?", "what shape is in the image?"):
                assert answer in label.split("_"), (conv.images[0], question, answer, label)
                checked += 1
        assert checked >= 5


def test_balance_answers_evens_out_each_question():
    from collections import Counter

    from defocus_vlm.data.easy_vqa import balance_answers

    def record(i: int, question: str, answer: str) -> dict:
        return {"id": str(i), "image": f"{i}.png", "conversations": [{"from": "human", "value": question},
                                                                     {"from": "gpt", "value": answer}]}

    records = [record(i, "is there a red shape?", "yes" if i < 2 else "no") for i in range(14)]
    records += [record(20 + i, "what color?", c) for i, c in enumerate(["red", "red", "blue"])]
    records.append({"id": "multi", "conversations": records[0]["conversations"] * 2})
    out = balance_answers(records)
    answers = Counter((r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in out
                      if len(r["conversations"]) == 2)
    assert answers[("is there a red shape?", "yes")] == answers[("is there a red shape?", "no")] == 12
    assert answers[("what color?", "red")] == answers[("what color?", "blue")] == 2
    assert sum(r["id"] == "multi" for r in out) == 1 and {r["id"] for r in out} == {r["id"] for r in records}
