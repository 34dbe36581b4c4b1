"""python -m swarmtune.server --model PATH_OR_ID --initial-peers MADDR ... (--blocks A:B | --num-blocks N|auto)

Defaults are those of ServerConfig, HandlerConfig and Limits: the flags only expose them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from swarmtune import errors, shutdown
from swarmtune.p2p import NetworkOptions
from swarmtune.security import Membership
from swarmtune.server.faults import Faults
from swarmtune.server.handler_config import HandlerConfig
from swarmtune.server.hosted_adapters import parse_spec
from swarmtune.server.quantize import QUANT_TYPES
from swarmtune.server.requests import Limits
from swarmtune.server.server import Server, ServerConfig

MiB = 2**20


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def parse_num_blocks(text: str) -> int | str:
    """A positive count, or "auto" (as many as fit in free memory)."""
    if text == "auto":
        return text  # not None: argparse would take that for a missing option
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--num-blocks must be a positive integer or 'auto', got {text!r}")
    return int(text)


def parse_mib(text: str) -> float | str:
    """A size in MiB, or "auto" (what free memory allows)."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number of MiB or 'auto', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swarmtune.server", description="Serve a span of frozen blocks.")
    p.add_argument("--model", required=True, help="local checkpoint directory or Hugging Face model id")
    span = p.add_mutually_exclusive_group(required=True)
    span.add_argument("--blocks", type=parse_blocks, help="the span to serve, START:END")
    span.add_argument("--num-blocks", type=parse_num_blocks,
                      help="serve this many blocks ('auto': as many as fit in free memory) where the swarm needs "
                           "them most, and move when another layout would serve it markedly better; where blocks "
                           "differ in size (DeepSeek-V3's dense first ones), the memory of this many of the largest, "
                           "so that more of the smaller ones fit")
    p.add_argument("--balance-period", type=float, default=ServerConfig.balance_period,
                   help="with --num-blocks: mean seconds between checks whether to move (randomised +-50%%)")
    p.add_argument("--poll-period", type=float, default=ServerConfig.poll_period,
                   help="with --num-blocks, in a swarm of up to 64 servers: seconds between reads of the swarm's "
                        "records, checking whether to move as soon as they change (up to 16 servers, and pings of "
                        "each, so that a crash is found within one)")
    p.add_argument("--throughput-cache", default=None,
                   help="directory caching the measured throughput per hardware and model shape "
                        "(default: ~/.cache/swarmtune)")
    p.add_argument("--initial-peers", nargs="*", default=[], help="multiaddrs of peers already in the swarm")
    p.add_argument("--new-swarm", action="store_true", help="start a new swarm, this server being its bootstrap")
    p.add_argument("--dtype", default=ServerConfig.dtype, choices=["fp32", "bf16", "fp16"],
                   help="compute dtype of the blocks")
    p.add_argument("--quant", default=ServerConfig.quant, choices=list(QUANT_TYPES),
                   help="store linear weights in 8 bits (int8) or 4 bits (nf4) with bitsandbytes")
    p.add_argument("--device", default=ServerConfig.device)
    p.add_argument("--host", default=NetworkOptions.host, help="address to listen on (0.0.0.0 for a public server)")
    p.add_argument("--port", type=int, default=NetworkOptions.port)
    p.add_argument("--announce-maddrs", nargs="*", default=[], help="public multiaddrs to announce")
    p.add_argument("--public", action="store_true",
                   help="enable NAT traversal (port mapping, AutoNAT, relays) for servers behind NAT")
    p.add_argument("--identity", default=None, help="private key file: a stable peer id across restarts")
    p.add_argument("--swarm-key", default=None, help="private swarm: file with the shared swarm key")
    p.add_argument("--allowed-peers", nargs="*", default=None, help="private swarm: peer ids allowed to take part")
    p.add_argument("--dht-prefix", default=None, help="swarm namespace of the model (default: its name)")
    p.add_argument("--adapters", nargs="*", default=[], metavar="[NAME=]PATH_OR_ID",
                   help="PEFT LoRA adapters to host for every client that names them (active_adapter=NAME)")
    p.add_argument("--revision", default=None)
    p.add_argument("--attn-implementation", default=ServerConfig.attn_implementation, choices=["sdpa", "eager"])
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache-mb", type=parse_mib, default=ServerConfig.cache_bytes / MiB,
                   help="KV cache budget in MiB ('auto': most of the memory left free by the blocks; with "
                        "--num-blocks auto, the blocks then leave room for a cache of a few thousand tokens each)")
    p.add_argument("--update-period", type=float, default=ServerConfig.update_period,
                   help="seconds between DHT announcements")
    p.add_argument("--expiration", type=float, default=ServerConfig.expiration,
                   help="lifetime of an announcement in seconds")
    p.add_argument("--throughput", type=float, default=None, help="announced tokens/s per block (default: measure)")
    p.add_argument("--activation-cache-mb", type=float, default=HandlerConfig.graph_bytes / MiB,
                   help="memory for forward graphs kept until their backward (0: always recompute the forward)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=HandlerConfig.cuda_graphs,
                   help="replay plain single-token inference steps from CUDA graphs (CUDA devices only; "
                        "never with --quant int8; --no-cuda-graphs runs every step normally)")
    p.add_argument("--working-memory-mb", type=parse_mib, default="auto",
                   help="activations of the requests computing at once; a request needing more than its share "
                        "is refused, naming the longest that fits ('auto': the part of the device's free memory, "
                        "measured at start, that blocks and KV cache leave: 20%% of it)")
    p.add_argument("--activation-cache-ttl", type=float, default=HandlerConfig.graph_ttl,
                   help="seconds a kept forward graph waits for its backward before it is dropped")
    p.add_argument("--session-timeout", type=float, default=HandlerConfig.session_timeout,
                   help="close inference sessions idle this long")
    p.add_argument("--evict-idle-after", type=float, default=HandlerConfig.evict_idle_after,
                   help="while a peer waits for KV memory, evict sessions of peers over their fair share that "
                        "have been idle this long")
    p.add_argument("--max-batch", type=int, default=Limits.max_batch)
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help="batch x length per request")
    p.add_argument("--max-length", type=int, default=Limits.max_length, help="tokens per inference session")
    p.add_argument("--max-message-mb", type=float, default=Limits.max_message_bytes / MiB,
                   help="one request; also what one peer's requests may hold here at once")
    p.add_argument("--max-receiving-mb", type=float, default=Limits.max_receiving_bytes / MiB,
                   help="requests being received or served, all peers together")
    p.add_argument("--max-sessions-per-peer", type=int, default=Limits.max_sessions_per_peer)
    p.add_argument("--max-streams-per-peer", type=int, default=Limits.max_streams_per_peer,
                   help="open streams of every kind from one peer")
    p.add_argument("--max-tokens-in-flight", type=int, default=Limits.max_tokens_in_flight_per_peer,
                   help="tokens one peer may have queued or computing at once")
    p.add_argument("--max-requests-per-second", type=float, default=Limits.requests_per_second_per_peer,
                   help="requests (and inference steps) per second from one peer")
    p.add_argument("--refusal-delay", type=float, default=Limits.refusal_delay,
                   help="seconds to hold a refusal for a peer's own excess (rate, streams, sessions, bytes) "
                        "before sending it, which slows floods; 0: at once")
    p.add_argument("--fault", default=None, help="testing only: misbehave on purpose (delay=S,nan,shape,perturb=X)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The server's config, with every mistake the flags can hold found before anything slow starts."""
    if not args.initial_peers and not args.new_swarm:
        raise errors.UserError("give --initial-peers of an existing swarm, or --new-swarm to start one")
    errors.check_multiaddrs(args.initial_peers, "--initial-peers")
    errors.check_multiaddrs(args.announce_maddrs, "--announce-maddrs", peer_id=False)
    errors.check_source(args.model, "--model")
    if args.swarm_key is not None:
        errors.check_file(args.swarm_key, "--swarm-key")
    for spec in args.adapters:
        errors.check_source(parse_spec(spec)[1], "--adapters")
    if args.max_receiving_mb < args.max_message_mb:
        raise errors.UserError(f"--max-receiving-mb ({args.max_receiving_mb:g}) must be at least --max-message-mb "
                               f"({args.max_message_mb:g}): a whole message must fit")
    try:
        faults = Faults.parse(args.fault)
    except ValueError as e:
        raise errors.UserError(f"--fault: {e}") from None
    network = NetworkOptions(host=args.host, port=args.port, initial_peers=list(args.initial_peers),
                             announce_maddrs=list(args.announce_maddrs), identity_path=args.identity,
                             public=args.public,
                             membership=Membership.from_options(args.swarm_key, args.allowed_peers))
    limits = Limits(max_batch=args.max_batch, max_tokens=args.max_tokens, max_length=args.max_length,
                    max_message_bytes=int(args.max_message_mb * MiB),
                    max_receiving_bytes=int(args.max_receiving_mb * MiB),
                    max_sessions_per_peer=args.max_sessions_per_peer, max_streams_per_peer=args.max_streams_per_peer,
                    max_tokens_in_flight_per_peer=args.max_tokens_in_flight,
                    requests_per_second_per_peer=args.max_requests_per_second, refusal_delay=args.refusal_delay)
    handler = HandlerConfig(limits=limits, session_timeout=args.session_timeout, faults=faults,
                            graph_bytes=int(args.activation_cache_mb * MiB), graph_ttl=args.activation_cache_ttl,
                            evict_idle_after=args.evict_idle_after, cuda_graphs=args.cuda_graphs,
                            working_bytes=None if args.working_memory_mb == "auto"
                            else int(args.working_memory_mb * MiB))
    return ServerConfig(
        model=args.model, blocks=args.blocks, num_blocks=None if args.num_blocks == "auto" else args.num_blocks,
        balance_period=args.balance_period, poll_period=args.poll_period, throughput_cache=args.throughput_cache,
        network=network, dtype=args.dtype, quant=args.quant, device=args.device, adapters=list(args.adapters),
        dht_prefix=args.dht_prefix, attn_implementation=args.attn_implementation, revision=args.revision,
        num_threads=args.num_threads, update_period=args.update_period, expiration=args.expiration,
        cache_bytes=None if args.cache_mb == "auto" else int(args.cache_mb * MiB),
        throughput=args.throughput, handler=handler,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with errors.reported(args.debug):
        asyncio.run(Server(config_from_args(args)).run())
    shutdown.exit_at_once()


if __name__ == "__main__":
    main()
