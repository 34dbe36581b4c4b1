"""Random-weight models of every supported family, for tests, benchmarks and the demo swarm.

The checkpoint is written by `save_pretrained` in several shards (so per-block loading is
exercised) with a byte-level BPE tokenizer trained here on a small bundled text.
"""

from __future__ import annotations

import os
from importlib import resources

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from swarmtune.models.registry import supported_model_types

VOCAB_SIZE = 384
# Tensors transformers initialises to zero: random here, so that a loader dropping them fails the tests.
ZERO_INITIALISED = ("e_score_correction_bias", "experts.gate_up_proj_bias", "experts.down_proj_bias")


def tiny_config(family: str, layers: int = 6, hidden: int = 64, vocab_size: int = VOCAB_SIZE) -> PretrainedConfig:
    """A small config of `family` that still exercises its distinctive features."""
    from transformers import (
        BloomConfig,
        DeepseekV3Config,
        Glm4MoeConfig,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

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
    experts = dict(num_experts_per_tok=2, moe_intermediate_size=hidden // 2)
    if family == "qwen3_moe":  # q/k norms; block 1 dense (mlp_only_layers) beside MoE blocks
        return Qwen3MoeConfig(**common, head_dim=hidden // heads, num_experts=4, mlp_only_layers=[1], **experts)
    if family == "glm4_moe":  # as GLM-4.5: a dense first block, then shared + routed experts; half-width
        # rotary, q/k/v bias, q/k norms
        return Glm4MoeConfig(**common, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                             routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=True, **experts)
    if family == "gpt_oss":  # attention sinks, sliding (window 4) and full layers alternating, yarn rotary
        rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 64}
        return GptOssConfig(**{**common, "intermediate_size": hidden // 2}, head_dim=hidden // heads,
                            num_local_experts=4, num_experts_per_tok=2, sliding_window=4, rope_parameters=rope)
    if family == "deepseek_v3":  # MLA with q/kv low-rank, yarn rope, grouped routing, a dense first block
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
        mla = dict(q_lora_rank=hidden // 2, kv_lora_rank=hidden // 4, qk_rope_head_dim=8, qk_nope_head_dim=8,
                   v_head_dim=12)
        moe = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                   moe_intermediate_size=hidden // 2, first_k_dense_replace=1)
        return DeepseekV3Config(**{**common, "num_key_value_heads": heads}, **mla, **moe, rope_parameters=rope)
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
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(ZERO_INITIALISED):
                tensor.normal_(std=0.1)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return out
