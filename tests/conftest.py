"""Shared fixtures: a tiny random-weight Llama for fast exact tests, the real default model for end-to-end ones."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from memlong.default_model import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def embedder():
    from memlong import Embedder

    return Embedder()


@pytest.fixture()
def tiny_hf(tokenizer):
    """A 4-layer Llama with GQA (4 query heads, 2 KV heads) and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def make_tiny(tiny_hf, tokenizer, embedder):
    """Build a MemLong over a copy of the tiny model; returns (memlong, untouched reference HF model)."""
    from transformers import LlamaForCausalLM

    from memlong import MemLong, MemLongConfig

    def make(**config):
        reference = LlamaForCausalLM(tiny_hf.config).eval()
        reference.load_state_dict(tiny_hf.state_dict())
        reference.config._attn_implementation = "eager"
        config.setdefault("memory_dtype", "float32")
        return MemLong(tiny_hf, tokenizer, MemLongConfig(**config), embedder=embedder), reference

    return make


@pytest.fixture(scope="session")
def default_memlong():
    from memlong import MemLong

    return MemLong.from_pretrained("default", top_k=4)
