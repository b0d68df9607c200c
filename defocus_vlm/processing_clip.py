"""The CLIP processor (image processor + text tokenizer) and the built-in byte-level tokenizer used by
text towers trained from scratch."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import BatchEncoding

BYTE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def byte_level_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A tokenizer that needs no vocabulary file: one token per UTF-8 byte (256) plus pad / bos / eos /
    unk, with eos appended (a causal text tower pooled at the last token then reads a fixed end
    marker). Any text encodes; it saves and reloads as a standard ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*BYTE_SPECIAL_TOKENS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        model_max_length=model_max_length, padding_side="right",
    )


class DefocusCLIPProcessor(ProcessorMixin):
    """``processor(text=[...], images=[...])`` -> ``input_ids``, ``attention_mask`` (padded to the
    longest text, truncated at the tokenizer's ``model_max_length``) and ``pixel_values``."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, text=None, images=None, return_tensors: str = "pt", **kwargs) -> BatchEncoding:
        if text is None and images is None:
            raise ValueError("give text, images or both")
        data = {}
        if text is not None:
            if isinstance(text, str):
                text = [text]
            if len(text) == 0 or not all(isinstance(t, str) for t in text):
                raise ValueError("text must be a string or a non-empty list of strings")
            data.update(self.tokenizer(list(text), padding=kwargs.pop("padding", True),
                                       truncation=kwargs.pop("truncation", True), return_tensors=return_tensors))
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchEncoding(data=data, tensor_type=None)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
