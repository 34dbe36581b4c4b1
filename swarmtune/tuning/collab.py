"""Collaborative training over the Internet with hivemind.Optimizer: independent peers, one adapter.

Every peer runs `python -m swarmtune.train ... collab.run_id=NAME`: it trains on its own data
through the swarm and reports the samples it processed; when the peers together reach
`target_batch_size`, they average their gradients and all take the same optimizer step (a
collaboration epoch), then average parameters and optimizer state. Peers join and leave at any
time; a newcomer first downloads the current state from the others. The peers meet on a DHT of
their own (the swarm's DHT accepts only records signed the servers' way): the first peer prints
its address, the others join with `collab.initial_peers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L

from swarmtune.errors import check_positive


@dataclass
class CollabConfig:
    run_id: str | None = field(default=None, metadata={
        "help": "the collaboration's name: peers with the same run_id train one adapter; null: train alone"})
    target_batch_size: int = field(default=256, metadata={
        "help": "samples the peers together accumulate per optimizer step (a collaboration epoch)"})
    epochs: int = field(default=100, metadata={
        "help": "collaboration epochs to train for: every peer stops there (the LR schedule spans them)"})
    initial_peers: list[str] | None = field(default=None, metadata={
        "help": "multiaddrs of peers of the collaboration; null: start it, and print this peer's address"})
    host: str = field(default="127.0.0.1", metadata={"help": "where this peer listens; 0.0.0.0 for others to reach"})
    port: int = 0
    announce_maddrs: list[str] | None = field(default=None, metadata={"help": "public addresses behind NAT"})
    matchmaking_time: float = field(default=5.0, metadata={"help": "seconds to gather peers for each averaging"})
    averaging_timeout: float = field(default=60.0, metadata={"help": "seconds before an averaging round gives up"})

    def __post_init__(self):
        if self.run_id is not None and (not isinstance(self.run_id, str) or not self.run_id.strip()):
            raise ValueError("collab.run_id must be a non-empty name (or null to train alone)")
        for name in ("target_batch_size", "epochs", "matchmaking_time", "averaging_timeout"):
            check_positive(self, name)
        if not 0 <= self.port < 65536:
            raise ValueError(f"collab.port must lie in [0, 65535], got {self.port}")

    @property
    def enabled(self) -> bool:
        return self.run_id is not None


@dataclass(frozen=True)
class Collaboration:
    """What a SwarmLM needs to train with the others: the settings, the DHT peer, samples per optimizer step."""

    config: CollabConfig
    dht: object  # hivemind.DHT
    samples_per_step: int


def start_dht(cfg: CollabConfig, swarm_key: str | None = None):
    """The collaboration's DHT peer (hivemind.DHT, a process of its own); members of a private swarm use its key.

    Listens on `cfg.host` and probes nothing unless announce addresses say where it is reachable.
    """
    import hivemind

    from swarmtune.p2p import NetworkOptions
    from swarmtune.security import Membership

    dht = hivemind.DHT(initial_peers=cfg.initial_peers or None, start=True,
                       host_maddrs=NetworkOptions(host=cfg.host, port=cfg.port).host_maddrs(),
                       announce_maddrs=cfg.announce_maddrs,
                       authorizer=Membership.from_options(swarm_key, None).authorizer(),
                       nat_port_map=False, auto_nat=False, use_relay=False, use_auto_relay=False)
    addresses = " ".join(str(a) for a in dht.get_visible_maddrs())
    print(f"Collaboration {cfg.run_id!r}: this peer is at {addresses}", flush=True)
    return dht


def wrap_optimizer(cfg: CollabConfig, dht, param_groups: list[dict], make_optimizer, make_scheduler,
                   samples_per_step: int, statistics: tuple[str, ...]):
    """hivemind.Optimizer around the optimizer `make_optimizer(groups)` would build, its schedule per epoch.

    `statistics` (e.g. Adam's exp_avg) are averaged with the parameters, so that a peer that missed a
    round, and stepped alone, is fully back in step after the next one."""
    import hivemind

    class CollabOptimizer(hivemind.Optimizer):
        def __del__(self):
            """Lightning wraps an optimizer in objects that share its state, and a wrapper going away would shut
            the averagers down mid-run: `shutdown()` is called when training ends instead."""

    optimizer = CollabOptimizer(
        dht=dht, run_id=cfg.run_id, target_batch_size=cfg.target_batch_size, batch_size_per_step=samples_per_step,
        params=param_groups, optimizer=make_optimizer, scheduler=make_scheduler,
        matchmaking_time=cfg.matchmaking_time, averaging_timeout=cfg.averaging_timeout,
        delay_state_averaging=False,  # a peer that stops holds the averaged state, not one about to change
        average_opt_statistics=statistics,
        # hivemind refreshes its view of the others' progress as seldom as every 10 s: a peer that looked while
        # the others had not yet reported stepped alone and stayed an epoch apart from them to the end. At
        # least once per matchmaking window, the view is fresh enough to gather with them
        tracker_opts=dict(max_refresh_period=min(cfg.matchmaking_time, 10.0)),
        verbose=True)
    optimizer.defaults = optimizer.opt.defaults  # what Lightning checks an optimizer for; hivemind leaves it unset
    return optimizer


def average_final_state(optimizer, timeout: float) -> int:
    """One more round of state averaging among the peers that reached the last epoch; returns the group's size.

    A round of the last epoch can fail for one peer (an overloaded machine, a slow link) and nothing after it
    brings that peer back: this round makes the peers that finish together hold one adapter."""
    averager = optimizer.state_averager
    control = averager.schedule_step(gather=optimizer.local_epoch, timeout=timeout)
    averager.step(averaging_round=True, averaging_control=control, averaging_opts=dict(timeout=timeout))
    return len(control.result()) if control.done() and not control.cancelled() and not control.exception() else 1


class CollabProgress(L.Callback):
    """Logs the collaboration epoch, says when it changes, and stops this peer at `epochs`, once the peers
    that got there with it hold one state."""

    def __init__(self, epochs: int, averaging_timeout: float):
        self.epochs = epochs
        self.averaging_timeout = averaging_timeout
        self.seen: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        epoch = optimizer.local_epoch
        module.log("collab/epoch", float(epoch))
        if epoch != self.seen:
            peers = optimizer.tracker.global_progress.num_peers
            start = "joined at" if self.seen is None else "reached"
            print(f"Collaboration epoch: {start} {epoch} of {self.epochs} ({peers} peers)", flush=True)
            self.seen = epoch
        if epoch >= self.epochs:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        if optimizer.local_epoch < self.epochs or optimizer.tracker.global_progress.num_peers <= 1:
            return  # stopped early (or alone): nothing to agree on
        peers = average_final_state(optimizer, self.averaging_timeout)
        print(f"Collaboration: final state averaged with {peers} peers", flush=True)
