"""Random-weight models of every supported family, for tests, benchmarks and the demo swarm.

The checkpoint is written by `save_pretrained` in several shards (so per-block loading is
exercised) with a byte-level BPE tokenizer trained here on a small bundled text.
"""

from __future__ import annotations

import os
from importlib import resources

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from swarmtune.models.family import supported_model_types

VOCAB_SIZE = 384


def tiny_config(family: str, layers: int = 6, hidden: int = 64, vocab_size: int = VOCAB_SIZE) -> PretrainedConfig:
    """A small config of `family` that still exercises its distinctive features."""
    from transformers import BloomConfig, LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config, Qwen3Config

    heads = 4
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "llama":  # Llama 3.1 style rope scaling and GQA
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**common, rope_parameters=rope)
    if family == "mistral":  # a short sliding window, so prompts cross it
        return MistralConfig(**common, sliding_window=8)
    if family == "qwen2":  # biased q/k/v projections, tied embeddings
        return Qwen2Config(**{**common, "tie_word_embeddings": True})
    if family == "qwen3":  # q/k norms, explicit head_dim
        return Qwen3Config(**common, head_dim=hidden // heads)
    if family == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if family == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=hidden, n_layer=layers, n_head=heads,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise ValueError(f"Unsupported family {family!r}: use one of {', '.join(supported_model_types())}")


# A plain chat format, so that chat endpoints and chat fine-tuning work on the demo model too. Each assistant
# turn ends with the end-of-sequence token (so generation stops there) and is marked as `{% generation %}`,
# which transformers' assistant-token masks read. The generation prompt is the assistant's header.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
                 "Assistant:{% generation %} {{ m['content'] }}{{ eos_token }}{% endgeneration %}"
                 "{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the bundled text (ids 0-2 are pad, bos, eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = resources.files("swarmtune.assets").joinpath("tiny_corpus.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(family: str, out: str, layers: int = 6, hidden: int = 64, seed: int = 0,
                    max_shard_size: str = "100KB") -> str:
    """Write a random-weight `family` checkpoint and its tokenizer to `out`; returns `out`."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    config = tiny_config(family, layers, hidden, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out
