"""SwarmForCausalLM: a causal LM whose blocks run on the swarm, used like a transformers model.

Embeddings, final norm and LM head are local; the blocks are a `RemoteSequential` for forward
and backward, and an `InferenceSession` during generation. `generate()` is transformers' own:
the session is exposed to it as a `Cache`, so greedy, sampling, beam search, stopping criteria
and streamers all behave exactly as on a local model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

import torch
from torch import nn
from transformers import Cache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from swarmtune import records
from swarmtune.adapters import peft_format
from swarmtune.adapters.lora import ClientLora
from swarmtune.adapters.prompts import SoftPrompts
from swarmtune.client.config import ClientConfig
from swarmtune.client.connection import SwarmConnection
from swarmtune.client.inference import InferenceSession
from swarmtune.client.sequential import RemoteSequential
from swarmtune.client.speculative import DraftLength, SwarmDraft
from swarmtune.errors import check_multiaddrs
from swarmtune.models import ClientParts, load_client_parts, load_config, parse_dtype

logger = logging.getLogger(__name__)


class RemoteCache(Cache):
    """An inference session seen by transformers' generation loop as a KV cache."""

    is_compileable = False

    def __init__(self, session: InferenceSession, prefix: int = 0):
        super().__init__(layers=[])
        self.session = session
        self.prefix = prefix  # soft-prompt positions in the session, which transformers must not count

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(0, self.session.length - self.prefix)

    def get_max_length(self) -> int:
        return self.session.max_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.session.reorder(beam_idx)

    @property
    def is_croppable(self) -> bool:
        return True

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest `-tokens_to_remove` tokens (assisted generation's rejected drafts) on every server."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number: how many of the newest tokens to remove")
        if tokens_to_remove < 0:
            self.session.rollback(self.session.length + tokens_to_remove)

    def __len__(self) -> int:
        return 1


class SwarmForCausalLM(PreTrainedModel, GenerationMixin):
    base_model_prefix = "swarm"
    _supports_cache_class = True
    _is_stateful = False
    _supports_sdpa = True  # attention runs on servers; this only satisfies transformers' config checks

    def __init__(self, config: PretrainedConfig, parts: ClientParts, connection: SwarmConnection,
                 model_name: str = ""):
        config = copy.deepcopy(config)
        config._experts_implementation = "eager"  # experts (MoE) run on servers: skip transformers' kernel checks
        super().__init__(config)
        self.parts = parts
        self.connection = connection
        self.model_name = model_name
        self.remote = RemoteSequential(connection)
        self.lora: ClientLora | None = None          # client LoRA applied in every remote call
        self.soft_prompts: SoftPrompts | None = None  # a trained prefix (and deep prompts) before every input
        self.active_adapter: str | None = None  # a server-hosted adapter (by name) instead of client LoRA
        self._session: InferenceSession | None = None
        self.draft_length: DraftLength | None = None  # speculative decoding's draft length, learned across calls

    @property
    def deep_prompts(self) -> torch.Tensor | None:
        """Deep prompts [num_blocks, 1, prefix, hidden] that servers add before every block."""
        return self.soft_prompts.deep_prompts() if self.soft_prompts is not None else None

    @classmethod
    def from_pretrained(cls, model: str, initial_peers: list[str] | None = None, dtype: str | torch.dtype = "fp32",
                        client_config: ClientConfig | None = None, dht_prefix: str | None = None,
                        revision: str | None = None, attn_implementation: str = "sdpa", adapter: str | None = None,
                        active_adapter: str | None = None, tuning_mode: str | None = None,
                        pre_seq_len: int = 0) -> SwarmForCausalLM:
        """Local parts of `model` (a checkpoint directory or hub id) plus a connection to the swarm serving it.

        `adapter` (a directory or hub id in PEFT format, e.g. exported by swarmtune.train) brings
        its LoRA, soft prompts and LM head to every forward pass and generation; its LoRA travels
        to each server once. `active_adapter` names an adapter that servers host themselves:
        requests go only to those servers and carry no adapter weights. `tuning_mode` and
        `pre_seq_len` are Petals' spelling of `train_prompts(pre_seq_len, deep=tuning_mode == "deep_ptune")`.
        """
        if tuning_mode not in (None, "ptune", "deep_ptune"):
            raise ValueError(f"tuning_mode must be 'ptune', 'deep_ptune' or None, not {tuning_mode!r}")
        if (tuning_mode is None) != (pre_seq_len == 0):
            raise ValueError("give tuning_mode and pre_seq_len (the number of prompt positions, >= 1) together")
        client_config = client_config or ClientConfig()
        if initial_peers is not None:
            client_config = dataclasses.replace(client_config, initial_peers=list(initial_peers))
        check_multiaddrs(client_config.initial_peers, "initial_peers")
        config = load_config(model, attn_implementation, revision)
        loaded = peft_format.load_adapter(adapter, config, revision) if adapter is not None else None
        prefix = dht_prefix or client_config.dht_prefix or records.dht_prefix(model)
        parts = load_client_parts(model, parse_dtype(dtype), revision=revision, config=config)
        connection = SwarmConnection(client_config, prefix, config.num_hidden_layers)
        swarm_model = cls(config, parts, connection, model_name=model)
        if loaded is not None:
            swarm_model.attach_adapter(loaded)
        if tuning_mode is not None:
            swarm_model.train_prompts(pre_seq_len, deep=tuning_mode == "deep_ptune")
        swarm_model.active_adapter = active_adapter
        return swarm_model

    def load_adapter(self, adapter: str, revision: str | None = None) -> None:
        """Apply a PEFT-format adapter (LoRA, soft prompts, LM head) from a directory or hub id."""
        self.attach_adapter(peft_format.load_adapter(adapter, self.config, revision))

    def attach_adapter(self, adapter: peft_format.Adapter) -> None:
        """Apply an adapter already read from disk (in eval mode: no dropout until someone trains it further)."""
        self.lora = adapter.lora.eval() if adapter.lora is not None else None
        self.soft_prompts = adapter.soft_prompts.eval() if adapter.soft_prompts is not None else None
        if adapter.lm_head is not None:
            weight = adapter.lm_head.to(self.parts.lm_head.weight.dtype)
            self.parts.lm_head.weight = nn.Parameter(weight, requires_grad=False)

    def train_prompts(self, length: int, deep: bool = False, seed: int = 0) -> SoftPrompts:
        """Prompt tuning on this model, as Petals' ptune modes: `length` trainable prompt positions before
        every input (with `deep`, also a trainable prefix before every block); everything else is frozen,
        so the parameters that require grad are the ones to optimize."""
        if self.soft_prompts is not None:
            raise ValueError("this model has soft prompts already (from its adapter)")
        self.requires_grad_(False)
        self.soft_prompts = SoftPrompts(length, self.config.hidden_size, self.config.num_hidden_layers, shallow=True,
                                        deep=deep, init_embeddings=self.parts.embed_tokens.weight, seed=seed)
        return self.soft_prompts

    # ---- transformers plumbing ---------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.parts.embed_tokens

    def get_output_embeddings(self):
        return self.parts.lm_head

    @property
    def device(self) -> torch.device:
        return self.parts.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts.embed_tokens.weight.dtype

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length) -> None:
        if model_kwargs.get("cache") is not None:
            return
        prefix = self.soft_prompts.length if self.soft_prompts is not None else 0
        if self._session is not None:  # inside `inference_session()`: continue it
            model_kwargs["cache"] = RemoteCache(self._session, prefix)
            return
        beams = max(generation_config.num_beams, generation_config.num_return_sequences)
        session = self.open_session(max_cache_length + prefix, batch_size * beams)
        model_kwargs["cache"] = RemoteCache(session, prefix)
        self._generate_sessions.append(session)

    def generate(self, *args, **kwargs):
        """transformers' generate over the swarm. With `assistant_model` (a small local causal LM sharing the
        tokenizer), it decodes speculatively: the draft length follows the measured acceptance rate and
        swarm step time (`self.draft_length`, kept across calls)."""
        self._generate_sessions: list[InferenceSession] = []
        try:
            return super().generate(*args, **kwargs)
        finally:
            for session in self._generate_sessions:
                session.close()

    def _get_candidate_generator(self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs,
                                 assistant_model=None, target_tokenizer=None, assistant_tokenizer=None):
        plain_draft = (assistant_model is not None and target_tokenizer is None and assistant_tokenizer is None
                       and generation_config.assistant_early_exit is None
                       and generation_config.prompt_lookup_num_tokens is None)
        if not plain_draft:
            return super()._get_candidate_generator(generation_config, input_ids, inputs_tensor, logits_processor,
                                                    model_kwargs, assistant_model, target_tokenizer,
                                                    assistant_tokenizer)
        if self.draft_length is None:
            self.draft_length = DraftLength()
        return SwarmDraft(assistant_model, generation_config, logits_processor, self.draft_length)

    # ---- sessions --------------------------------------------------------------------------------

    def open_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        return InferenceSession(self.connection, max_length, batch_size, lora=self.lora,
                                deep_prompts=self.deep_prompts, active_adapter=self.active_adapter)

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1):
        """Keep one session across `generate()` calls: later calls continue after the cached prefix."""
        if self._session is not None:
            raise RuntimeError("an inference session is already open on this model")
        session = self.open_session(max_length, batch_size)
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            session.close()

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, return_dict: bool = True, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.parts.embed_tokens(input_ids)
        starting = not isinstance(cache, RemoteCache) or cache.session.length == 0
        prefix = self.soft_prompts.length if self.soft_prompts is not None else 0
        if prefix:
            inputs_embeds, attention_mask, labels, position_ids = self._with_prefix(
                inputs_embeds, attention_mask, labels, position_ids, starting)
        hidden = self.parts.prepare_hidden(inputs_embeds)
        if isinstance(cache, RemoteCache):
            new = hidden.shape[1]
            mask = attention_mask[:, -new:] if attention_mask is not None else None
            hidden = cache.session.step(hidden, mask, position_ids)
        else:
            hidden = self.remote(hidden, attention_mask, position_ids, self.deep_prompts, self.lora,
                                 self.active_adapter)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.parts.logits(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if prefix and starting and not logits_to_keep:
            logits = logits[:, prefix:]  # callers see logits for their own tokens only
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _with_prefix(self, embeds, attention_mask, labels, position_ids, starting: bool):
        """Put the soft prompt in front of a new sequence, and shift positions past it."""
        prefix = self.soft_prompts.length
        if starting:
            embeds, attention_mask, labels = self.soft_prompts.extend(embeds, attention_mask, labels)
        if position_ids is not None:
            position_ids = position_ids + prefix
            if starting:
                head = torch.arange(prefix, device=position_ids.device).expand(position_ids.shape[0], prefix)
                position_ids = torch.cat([head, position_ids], dim=1)
        return embeds, attention_mask, labels, position_ids

    def close(self) -> None:
        self.connection.close()
