"""python -m swarmtune.dht: a bootstrap peer that other peers join; prints its multiaddrs and runs until stopped."""

from __future__ import annotations

import argparse
import asyncio
import signal

from swarmtune import errors, shutdown
from swarmtune.p2p import NetworkOptions, start_dht, start_p2p, stop_p2p, visible_maddrs
from swarmtune.security import Membership


async def run(opts: NetworkOptions) -> None:
    p2p = await start_p2p(opts)
    dht = await start_dht(p2p, opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for addr in await visible_maddrs(p2p):
        print(f"MADDR {addr}", flush=True)
    try:
        await stop.wait()
    finally:
        await asyncio.wait_for(dht.shutdown(), 5)
        await stop_p2p(p2p)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m swarmtune.dht", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--identity", default=None, help="private key file, for a stable peer id and address")
    p.add_argument("--initial-peers", nargs="*", default=[])
    p.add_argument("--announce-maddrs", nargs="*", default=[])
    p.add_argument("--public", action="store_true", help="enable NAT traversal (port mapping, AutoNAT, relays)")
    p.add_argument("--swarm-key", default=None, help="private swarm: file with the shared swarm key")
    p.add_argument("--allowed-peers", nargs="*", default=None, help="private swarm: peer ids allowed to take part")
    p.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    args = p.parse_args(argv)
    with errors.reported(args.debug):
        errors.check_multiaddrs(args.initial_peers, "--initial-peers")
        errors.check_multiaddrs(args.announce_maddrs, "--announce-maddrs", peer_id=False)
        if args.swarm_key is not None:
            errors.check_file(args.swarm_key, "--swarm-key")
        membership = Membership.from_options(args.swarm_key, args.allowed_peers)
        asyncio.run(run(NetworkOptions(host=args.host, port=args.port, identity_path=args.identity,
                                       initial_peers=args.initial_peers, announce_maddrs=args.announce_maddrs,
                                       public=args.public, membership=membership)))
    shutdown.exit_at_once()


if __name__ == "__main__":
    main()
