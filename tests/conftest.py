"""Shared fixtures: the real default model is loaded once per test run; tiny random models are built locally."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = "smollm2-135m"


def tiny_config(family: str):
    """A small, randomly initialised config of each supported family (no download)."""
    from transformers import (GemmaConfig, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              OlmoConfig, Phi3Config, PhiConfig, Qwen2Config, StableLmConfig, Starcoder2Config)

    vocab = 49152  # shares the default model's tokenizer
    if family == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "mistral":
        return MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=256)
    if family == "gptj":
        return GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=256)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, max_position_embeddings=256)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "gemma":
        return GemmaConfig(**common, num_key_value_heads=2, head_dim=8)
    if family == "phi":
        return PhiConfig(**common, partial_rotary_factor=0.5)
    if family == "phi3":
        return Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)
    if family == "olmo":
        return OlmoConfig(**common, num_key_value_heads=2, pad_token_id=0)
    if family == "stablelm":
        return StableLmConfig(**common, num_key_value_heads=2)
    if family == "starcoder2":
        return Starcoder2Config(**common, num_key_value_heads=2)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gptj", "gpt_neox", "gemma", "phi", "phi3", "olmo", "stablelm",
            "starcoder2"]


@pytest.fixture(scope="session")
def tokenizer():
    from editing.models import load_model, resolve_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"
    return tok


def build_tiny(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    model.eval().requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def smol():
    """The real default model with an Editor, loaded once per run. Tests must detach what they attach."""
    from editing import Editor

    ed = Editor.load(DEFAULT_MODEL)
    _ = ed.templates
    return ed


@pytest.fixture(scope="session")
def cf_valid():
    from editing import load_records
    from editing.data import data_file

    return load_records(data_file("counterfact_valid.json"))
