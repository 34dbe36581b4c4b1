"""`python -m swarmtune.swarm status`: what a swarm serves, block by block, as its DHT records say.

Without --model it lists every model the swarm announces, then the table of each. A table shows
every server with a live record (joining, online, or offline until its record expires) with its
span, speed, free cache and state, then every block with the servers online for it, flagging
blocks nobody serves. Exits with status 1 when some block has no online server, so scripts and
monitors can act on it.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from swarmtune import errors, records
from swarmtune.directory import SwarmView, fetch_model_info, fetch_models, fetch_swarm, format_blocks
from swarmtune.p2p import NetworkOptions, start_dht, start_p2p, stop_p2p
from swarmtune.records import ModelInfo, ServerInfo
from swarmtune.security import Membership


def uncovered(servers: Sequence[ServerInfo], num_blocks: int) -> list[int]:
    """Blocks that no online server holds."""
    view = SwarmView(num_blocks, {s.peer_id: s for s in servers if s.state == "online"})
    return view.uncovered(0, num_blocks)


def format_models(models: dict[str, ModelInfo]) -> str:
    lines = [f"{len(models)} model(s) announced:", f"  {'DHT prefix':28} {'blocks':>6}  {'type':10} model"]
    lines += [f"  {prefix:28} {m.num_blocks:6d}  {m.model_type or '?':10} {m.model_id}" for prefix, m in models.items()]
    return "\n".join(lines)


def format_status(model: ModelInfo, prefix: str, servers: Sequence[ServerInfo]) -> str:
    servers = sorted(servers, key=lambda s: (s.start, s.end, s.peer_id))
    online = [s for s in servers if s.state == "online"]
    lines = [f"{model.model_id} (DHT prefix {prefix!r}, {model.model_type or 'unknown type'}): "
             f"{model.num_blocks} blocks, {len(online)} of {len(servers)} servers online", "",
             f"{'server':54} {'blocks':>7} {'state':8} {'tokens/s/blk':>12} {'steps/s':>8} {'cache tokens':>12} "
             f"{'dtype':9} version"]
    for s in servers:
        state = "loading" if s.target else s.state  # serves start:end of its span, loads the rest
        lines.append(f"{s.peer_id:54} {f'{s.start}:{s.end}':>7} {state:8} {s.throughput:12.1f} "
                     f"{s.inference_rps:8.1f} {s.cache_tokens_left:12d} {s.dtype:9} {s.version}")
    lines += ["", f"{'block':>5} {'online':>6} {'tokens/s':>10}  servers"]
    for block in range(model.num_blocks):
        here = [s for s in servers if s.start <= block < s.end and s.state != "offline"]
        serving = [s for s in here if s.state == "online"]
        names = " ".join(s.peer_id[-8:] + ("" if s.state == "online" else f" ({s.state})") for s in here)
        lines.append(f"{block:5d} {len(serving):6d} {sum(s.throughput for s in serving):10.1f}  "
                     f"{names if serving else 'NO SERVER  ' + names}".rstrip())
    missing = uncovered(servers, model.num_blocks)
    if missing:
        lines += ["", f"No online server holds block(s) {format_blocks(missing)} of {model.model_id}: wait for "
                      f"servers to join, or start one with python -m swarmtune.server --blocks ..."]
    return "\n".join(lines)


def checkpoint_info(model: str) -> ModelInfo | None:
    """The model as its own config describes it, where that is readable here without a download (a local
    directory, or a hub id in the local cache): the truth that the swarm's records are checked against."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        return ModelInfo(int(config.num_hidden_layers), model, config.model_type)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


async def read_status(initial_peers: list[str], prefix: str | None, membership: Membership | None = None,
                      identity_path: str | None = None, checkpoint: ModelInfo | None = None) -> tuple[str, bool]:
    """The status of the model under `prefix` (None: of every model announced; `checkpoint`: what the model's
    config says it is), and whether every block of those models has an online server."""
    opts = NetworkOptions(initial_peers=list(initial_peers), identity_path=identity_path,
                          membership=membership or Membership())
    p2p = await start_p2p(opts)
    dht = None
    try:
        dht = await start_dht(p2p, opts, client_mode=True)
        notes = []
        if prefix is not None:
            model = announced = await fetch_model_info(dht, prefix)
            if announced is None:
                return f"No swarm at {' '.join(initial_peers)} announces a model under the DHT prefix {prefix!r}", False
            if checkpoint is not None and announced.num_blocks != checkpoint.num_blocks:
                notes.append(f"Note: the swarm's records say {announced.num_blocks} blocks, the checkpoint's config "
                             f"{checkpoint.num_blocks}: the table follows the checkpoint.")
            models = {prefix: checkpoint or model}
        else:
            models = await fetch_models(dht)
            if not models:
                return f"No swarm at {' '.join(initial_peers)} announces any model", False
        texts, complete = [format_models(models)] if prefix is None else [], True
        for name, model in models.items():
            servers = await fetch_swarm(dht, name, model.num_blocks)
            texts.append(format_status(model, name, servers))
            complete = complete and not uncovered(servers, model.num_blocks)
        return "\n\n".join(texts + notes), complete
    finally:
        if dht is not None:
            await asyncio.wait_for(dht.shutdown(), 5)
        await stop_p2p(p2p)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m swarmtune.swarm status", description=__doc__.split("\n\n")[0])
    p.add_argument("--initial-peers", nargs="+", default=None,
                   help="multiaddrs of peers in the swarm (default: the swarms `python -m swarmtune.swarm up` runs)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", help="only this model: its local directory or Hugging Face id")
    which.add_argument("--dht-prefix", help="only the model under this swarm namespace, as servers were given it")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    p.add_argument("--swarm-key", default=None, help="private swarm: file with the shared swarm key")
    p.add_argument("--identity", default=None, help="private swarm with an allowlist: this peer's identity file")
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    args = p.parse_args(argv)
    with errors.reported(args.debug):
        if args.initial_peers is not None:
            errors.check_multiaddrs(args.initial_peers, "--initial-peers")
            swarms = [args.initial_peers]
        else:
            from swarmtune.local_swarm import running_swarms

            swarms = [r["initial_peers"] for r in running_swarms()]
            if not swarms:
                raise errors.UserError("give --initial-peers of a swarm (no local swarm is up: start one with "
                                       "python -m swarmtune.swarm up)")
        if args.swarm_key is not None:
            errors.check_file(args.swarm_key, "--swarm-key")
        prefix = args.dht_prefix or (records.dht_prefix(args.model) if args.model else None)
        checkpoint = checkpoint_info(args.model) if args.model else None
        membership = Membership.from_options(args.swarm_key, None)
        texts, complete = [], True
        for peers in swarms:
            try:
                status = read_status(peers, prefix, membership, args.identity, checkpoint)
                text, whole = asyncio.run(asyncio.wait_for(status, args.timeout))
            except asyncio.TimeoutError:
                raise errors.UserError(f"the swarm did not answer within {args.timeout:g} s (--timeout)") from None
            texts.append(text)
            complete = complete and whole
    print("\n\n".join(texts), flush=True)
    raise SystemExit(0 if complete else 1)
