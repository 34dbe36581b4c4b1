"""Turning decoded wire messages into validated requests, or clear errors.

Every field a client sends is checked here against the served span and the server's limits
before any computation sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarmtune.server.lora import LoraSet

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)


class RequestError(ValueError):
    """The request is malformed or over a limit; the message goes back to the client."""

    retry = False  # would the same request succeed on another server, or later?


class ServerBusy(RequestError):
    """The request is fine but this server has no capacity for it right now."""

    retry = True


class PeerOverLimit(ServerBusy):
    """The peer is over a limit of its own (rate, streams, sessions, bytes or tokens held here): its refusal may
    be held back a while (rate_limit.Tarpit), so that a flooder waiting for its answers slows down."""


class RateLimited(PeerOverLimit):
    """The peer is over its request rate: a request of `cost` would fit once its bucket has refilled. Its refusal
    tells the client how long that is, so that an honest client waits and asks again instead of taking this
    server for a faulty one."""

    def __init__(self, message: str, cost: float = 1.0):
        super().__init__(message)
        self.cost = cost


@dataclass
class Limits:
    max_batch: int = 64
    max_tokens: int = 16384          # batch x new tokens in one request
    max_length: int = 8192           # tokens in one inference session
    max_message_bytes: int = 256 << 20   # one message; also what one peer's requests may hold at once
    max_receiving_bytes: int = 1 << 30   # requests being received or served, all peers together
    max_lora_rank: int = 256
    max_sessions_per_peer: int = 32
    max_streams_per_peer: int = 48      # open streams of every kind (sessions, channels, large requests)
    max_tokens_in_flight_per_peer: int = 1 << 17
    requests_per_second_per_peer: float = 1000.0
    refusal_delay: float = 1.0          # seconds a refusal for a peer's own excess is held before it goes out


@dataclass
class SpanRequest:
    start: int
    end: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    deep_prompts: torch.Tensor | None
    lora_meta: dict | None
    lora_tensors: list[torch.Tensor] | None
    grad_output: torch.Tensor | None = None
    keep: str | None = None  # forward: keep the graph under this id; backward: use the graph kept under it


def need(cond: bool, message: str) -> None:
    if not cond:
        raise RequestError(message)


def get_int(meta: dict, key: str, lo: int, hi: int) -> int:
    value = meta.get(key)
    need(isinstance(value, int) and not isinstance(value, bool), f"'{key}' must be an integer")
    need(lo <= value <= hi, f"'{key}'={value} is outside [{lo}, {hi}]")
    return value


def requested_blocks(meta: dict, span: tuple[int, int], num_blocks: int) -> tuple[int, int]:
    """The request's [start, end): blocks of the model's `num_blocks`, which must lie within the served `span`.

    Blocks of the model that are not served here are no client error: a client that read the
    swarm's records before this server moved or grew asks for them, and another server has them.
    """
    start = get_int(meta, "start", 0, num_blocks - 1)
    end = get_int(meta, "end", start + 1, num_blocks)
    if not span[0] <= start < end <= span[1]:
        raise ServerBusy(f"blocks {start}:{end} are not served here (this server serves {span[0]}:{span[1]} now): "
                         f"ask another server")
    return start, end


def check_hidden(t: torch.Tensor | None, name: str, hidden_size: int, limits: Limits) -> torch.Tensor:
    need(t is not None, f"missing tensor '{name}'")
    need(t.dtype in FLOAT_DTYPES, f"'{name}' must be float32, bfloat16 or float16, not {t.dtype}")
    need(t.dim() == 3 and t.shape[2] == hidden_size,
         f"'{name}' must have shape [batch, length, {hidden_size}], got {list(t.shape)}")
    batch, length = t.shape[:2]
    need(1 <= batch <= limits.max_batch, f"batch size {batch} is outside [1, {limits.max_batch}]")
    need(length >= 1 and batch * length <= limits.max_tokens,
         f"{batch}x{length} tokens exceed the limit of {limits.max_tokens} per request")
    need(bool(torch.isfinite(t).all()), f"'{name}' contains NaN or infinite values")
    return t


def check_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    if mask is None:
        return None
    need(mask.dtype in (*INDEX_DTYPES, torch.bool), f"'attention_mask' must be integer or bool, not {mask.dtype}")
    need(list(mask.shape) == [batch, length], f"'attention_mask' must have shape {[batch, length]}, "
                                              f"got {list(mask.shape)}")
    mask = mask.long()
    need(bool(((mask == 0) | (mask == 1)).all()), "'attention_mask' must hold only 0 and 1")
    return mask


def check_positions(pos: torch.Tensor | None, batch: int, length: int, max_position: int) -> torch.Tensor | None:
    if pos is None:
        return None
    need(pos.dtype in INDEX_DTYPES, f"'position_ids' must be an integer tensor, not {pos.dtype}")
    need(list(pos.shape) == [batch, length], f"'position_ids' must have shape {[batch, length]}, "
                                             f"got {list(pos.shape)}")
    need(bool(((pos >= 0) & (pos < max_position)).all()), f"'position_ids' must lie in [0, {max_position})")
    return pos.long()


def check_deep_prompts(deep_prompts: torch.Tensor | None, num_blocks: int, batch: int, hidden_size: int,
                  max_prefix: int) -> torch.Tensor | None:
    if deep_prompts is None:
        return None
    need(deep_prompts.dtype in FLOAT_DTYPES, "'deep_prompts' must be a float tensor")
    need(deep_prompts.dim() == 4 and deep_prompts.shape[0] == num_blocks and deep_prompts.shape[1] in (1, batch)
         and deep_prompts.shape[3] == hidden_size and 1 <= deep_prompts.shape[2] <= max_prefix,
         f"'deep_prompts' must have shape [{num_blocks}, batch or 1, prefix <= {max_prefix}, {hidden_size}], "
         f"got {list(deep_prompts.shape)}")
    need(bool(torch.isfinite(deep_prompts).all()), "'deep_prompts' contains NaN or infinite values")
    return deep_prompts  # batch 1 broadcasts in the blocks, so its gradient keeps the shape the client sent


def parse_span_request(meta: dict, tensors: dict[str, torch.Tensor], span: tuple[int, int], num_blocks: int,
                       hidden_size: int, max_position: int, limits: Limits, backward: bool = False) -> SpanRequest:
    start, end = requested_blocks(meta, span, num_blocks)
    hidden = check_hidden(tensors.get("hidden"), "hidden", hidden_size, limits)
    batch, length = hidden.shape[:2]
    grad_output = None
    if backward:
        grad_output = check_hidden(tensors.get("grad_output"), "grad_output", hidden_size, limits)
        need(grad_output.shape == hidden.shape, "'grad_output' must have the same shape as 'hidden'")
    lora_meta, lora_tensors = parse_lora(meta, tensors)
    keep = meta.get("keep")
    need(keep is None or (isinstance(keep, str) and len(keep) <= 64), "'keep' must be a short string")
    return SpanRequest(
        start=start, end=end, hidden=hidden,
        attention_mask=check_mask(tensors.get("attention_mask"), batch, length),
        position_ids=check_positions(tensors.get("position_ids"), batch, length, max_position),
        deep_prompts=check_deep_prompts(tensors.get("deep_prompts"), end - start, batch, hidden_size, length),
        lora_meta=lora_meta, lora_tensors=lora_tensors, grad_output=grad_output, keep=keep,
    )


def parse_lora(meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict | None, list[torch.Tensor] | None]:
    """The 'lora' header ({keys, scale, dropout, seed, digest}) and its tensors A0, B0, A1, ... if sent."""
    lora = meta.get("lora")
    if lora is None:
        return None, None
    need(isinstance(lora, dict), "'lora' must be a map")
    if "adapter" in lora:  # an adapter this server hosts, by name
        need(isinstance(lora["adapter"], str) and len(lora["adapter"]) <= 256, "'lora.adapter' must be a name")
        return lora, None
    keys = lora.get("keys")
    need(isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(set(keys)) == len(keys),
         "'lora.keys' must be a list of distinct strings")
    scale, dropout = lora.get("scale"), lora.get("dropout", 0.0)
    need(isinstance(scale, (int, float)) and abs(scale) < 1e6, "'lora.scale' must be a number")
    need(isinstance(dropout, (int, float)) and 0 <= dropout < 1, "'lora.dropout' must be in [0, 1)")
    need(isinstance(lora.get("seed", 0), int), "'lora.seed' must be an integer")
    digest = lora.get("digest")
    need(digest is None or (isinstance(digest, str) and len(digest) <= 128), "'lora.digest' must be a short string")
    names = [f"lora.{ab}.{i}" for i in range(len(keys)) for ab in "AB"]
    present = [n in tensors for n in names]
    if not any(present):
        need(digest is not None, "'lora' without tensors needs a 'digest' the server already holds")
        return lora, None
    need(all(present), "'lora' tensors must include lora.A.i and lora.B.i for every key")
    return lora, [tensors[n] for n in names]


def build_lora(lora_meta: dict, tensors: list[torch.Tensor], slots: dict[str, tuple[int, int]],
               span: tuple[int, int], limits: Limits, dtype: torch.dtype, device) -> LoraSet:
    """Check LoRA tensors against the served layers' shapes and make a LoraSet on the compute device."""
    weights = {}
    for i, key in enumerate(lora_meta["keys"]):
        need(key in slots, f"LoRA key {key!r} names no target layer served here")
        block = int(key.split(".", 1)[0])
        need(span[0] <= block < span[1], f"LoRA key {key!r} is outside the requested blocks {span[0]}:{span[1]}")
        a, b = tensors[2 * i], tensors[2 * i + 1]
        in_features, out_features = slots[key]
        need(a.dtype in FLOAT_DTYPES and b.dtype in FLOAT_DTYPES, f"LoRA tensors of {key!r} must be float")
        need(a.dim() == 2 and b.dim() == 2 and a.shape[1] == in_features and b.shape[0] == out_features
             and a.shape[0] == b.shape[1] and 1 <= a.shape[0] <= limits.max_lora_rank,
             f"LoRA tensors of {key!r} must be A [r, {in_features}] and B [{out_features}, r], r <= "
             f"{limits.max_lora_rank}; got {list(a.shape)} and {list(b.shape)}")
        need(bool(torch.isfinite(a).all() and torch.isfinite(b).all()), f"LoRA tensors of {key!r} are not finite")
        weights[key] = (a.to(device, dtype), b.to(device, dtype))
    return LoraSet(weights, float(lora_meta["scale"]), float(lora_meta.get("dropout", 0.0)))
