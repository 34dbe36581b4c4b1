"""Hostile clients: one server under each class of attack, beside a legitimate generation and training client.

Every attacker is its own process and libp2p peer on 127.0.0.1 (`benchmarks/attackers.py`, run at
nice 10, daemon included, so that what it measures is the server rather than the cores the attackers
share with it).
Each class gets a fresh one-server swarm (blocks 0:6 of the tiny llama, explicit smallish budgets),
so that its peak RSS is its own. The legitimate clients are two other peers: one opens generation
sessions (prompt 16, then single-token `InferenceSession.step`s), the other runs forward+backward
steps (gradient w.r.t. the input embeddings, 2x32) through the swarm, both for the whole window.
Baseline: the same run with no attacker, at the start and again at the end of the section.

Targets, per class (reported, not asserted): the legitimate clients' p99 step latency within 3x
of the no-attack p99, and no errors; the server's peak RSS (VmHWM) within model bytes + KV, graph,
message and working-memory budgets + 300 MiB; the free KV budget and kept-graph bytes back to where they were once
the attackers are gone; the server alive throughout.

The HTTP endpoint (`python -m swarmtune.serve`) has classes of its own (`HTTP_ATTACKS`, below): the
legitimate client's request p99 within 3x of no attack, the endpoint's peak RSS within its no-attack
peak + 200 MiB, and no row in use once the attackers are gone.

    python -m benchmarks.hostile [--quick | --smoke] [--out DIR] [--only KEY,...]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil
import torch
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import (
    Bench,
    Figure,
    connect,
    fmt,
    markdown_table,
    run_section,
    seed_everything,
    spread,
    token_ids,
)
from benchmarks.serving import forward_backward_step, freeze
from swarmtune import transport, wire
from swarmtune.local_swarm import LocalSwarm, ManagedProcess, ServerProcess

SECTION = "hostile"
MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LATENCY_FACTOR = 3.0        # legit p99 under attack within this many times its no-attack p99
RSS_ALLOWANCE = 300 * MiB   # the runtime's own memory, on top of model bytes and the configured budgets
PROMPT, NEW_TOKENS = 16, 16   # each legitimate generation session
TRAIN_SHAPE = (2, 32)
ATTACKER_NICE = 10           # attackers and their daemons: the server's cores, not the attackers', are measured
READY_TIMEOUT = 60.0        # an attacker boots, connects and reports READY within this
JOIN_SLACK = 60.0           # a legitimate step started before the window closed ends within this

# What every server of this section is given; small enough that the memory check means something.
SERVER = {"cache_mb": 32, "activation_cache_mb": 32, "activation_cache_ttl": 20, "max_message_mb": 16,
          "max_receiving_mb": 32, "working_memory_mb": 64, "max_tokens": 2048, "max_length": 2048, "max_batch": 64,
          "session_timeout": 30, "throughput": 1.0}
# Legitimate clients wait at most this long for a server (the default, 60 s, would outlast the window).
CLIENT = {"retry_budget": 20.0, "request_timeout": 30.0}


@dataclass(frozen=True)
class Attack:
    """One class of attack: `attackers` lists (kind in benchmarks.attackers, workers) per attacker process;
    `server`, options of its server that differ from SERVER."""

    key: str
    title: str
    attackers: tuple[tuple[str, int], ...]
    server: tuple[tuple[str, object], ...] = ()


ATTACKS = (
    Attack("flood", "pre-admission flood", (("flood", 2),) * 3),            # 6 streams of 1 MiB frames, 3 peers
    Attack("slow", "slow and idle streams", (("idle", 100), ("trickle", 100))),
    Attack("kv_hog", "KV hog", (("kv_hog", 1),)),
    Attack("long_seq", "long-sequence flood", (("long_seq", 2),)),
    Attack("headers", "header bombs", (("headers", 2),) * 2),
    Attack("push", "forged chain pushes", (("push", 16),) * 2),
    Attack("rejected_opens", "rejected opens", (("rejected_open", 8),) * 2),
    Attack("inject", "pushes through the upstream server", (("inject", 4),)),
    Attack("kv_hog_active", "KV hog, active", (("kv_hog_active", 1),)),
    Attack("unary", "large unary calls", (("unary_flood", 64),) * 3),
    Attack("open_churn", "open churn", (("open_churn", 8),) * 2),
    Attack("short_lane", "short-lane flood", (("short_lane", 8),)),
    Attack("info", "info flood", (("info_flood", 32),) * 2),
    Attack("working_memory", "long forwards and backwards", (("working_memory", 4),) * 2,
           server=(("max_tokens", 16384),)),  # the default: one forward at it held 1.4 GB of activations
)
NO_ATTACK = "no attack"


@dataclass
class Outcome:
    """What one run (one class, or no attack) measured."""

    gen_steps: list[float] = field(default_factory=list)    # single-token steps, seconds
    gen_opens: list[float] = field(default_factory=list)    # open + prefill of each session
    train_steps: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)          # what the legitimate clients saw
    peak_rss: int = 0                                         # the server process's VmHWM, bytes
    peak_daemon_rss: int = 0                                  # its libp2p daemon's, sampled
    rss_after: int = 0                                        # the server's RSS once the attackers are gone
    before: dict = field(default_factory=dict)                # info RPC before the attack
    after: dict = field(default_factory=dict)                 # and once the attackers are gone
    settle_s: float | None = None                             # how long the budget took to come back (None: never)
    alive: bool = True
    attackers: list[dict] = field(default_factory=list)      # each attacker's last STATS line
    server_stats: dict = field(default_factory=dict)


# ---- the server ---------------------------------------------------------------------------------


def rss_bound(quiet_peak: int, options: dict) -> int:
    """The server as it peaks with no attacker (its runtime and model), plus the KV, graph and receive budgets,
    plus the allowance: what it may hold under attack. (The runtime alone, torch, transformers and hivemind,
    takes about 400 MiB before any model, so "model bytes + budgets + 300 MiB" cannot be met by anyone.)"""
    budgets = (options["cache_mb"] + options["activation_cache_mb"] + options["max_receiving_mb"]
               + options["working_memory_mb"])
    return int(quiet_peak + budgets * MiB + RSS_ALLOWANCE)


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a live process, bytes (0 if it is gone)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class DaemonSampler:
    """The peak RSS of a process's children (the server's libp2p daemon), which VmHWM of the server does not
    cover, sampled at 10 Hz until stopped."""

    def __init__(self, pid: int, period: float = 0.1):
        self.pid, self.period, self.peak = pid, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(self.pid).children(recursive=True)
                self.peak = max(self.peak, sum(c.memory_info().rss for c in children))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


def rss(pid: int) -> int:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).memory_info().rss
    return 0


def info(conn, peer_id: str) -> dict:
    meta, _ = conn.run(transport.call(conn.p2p, peer_id, "info", wire.pack({}), 10, token=conn.token), timeout=15)
    return meta


def budgets(meta: dict) -> dict:
    return {"cache_bytes_free": meta["cache_bytes_free"], "graph_bytes_kept": meta["graph_bytes_kept"],
            "active_sessions": meta["active_sessions"]}


def wait_settled(conn, peer_id: str, target: dict | None, timeout: float) -> tuple[dict, float | None]:
    """Poll info until no session is open and (with `target`) the budgets equal it; (last reading, seconds or None)."""
    began = time.monotonic()
    for _ in range(int(timeout / 0.2) + 1):
        now = budgets(info(conn, peer_id))
        if now["active_sessions"] == 0 and (target is None or now == target):
            return now, time.monotonic() - began
        if time.monotonic() - began > timeout:
            break
        time.sleep(0.2)
    return now, None


# ---- the attackers ------------------------------------------------------------------------------


def start_attackers(attack: Attack, options: dict, span: tuple[int, int], hidden: int, go_file: str,
                    duration: float, log_dir: str) -> list[ManagedProcess]:
    """One process per attacker; each boots while the server starts, then waits for `go_file` (the server's address)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    procs: list[ManagedProcess] = []
    try:
        for i, (kind, workers) in enumerate(attack.attackers):
            args = ["nice", "-n", str(ATTACKER_NICE), sys.executable, "-m", "benchmarks.attackers", kind,
                    "--go-file", go_file, "--duration", f"{duration:g}", "--workers", str(workers),
                    "--hidden", str(hidden), "--start", str(span[0]), "--end", str(span[1]),
                    "--tokens", str(options["max_tokens"]), "--max-length", str(options["max_length"]),
                    "--max-batch", str(options["max_batch"])]
            procs.append(ManagedProcess(args, os.path.join(log_dir, f"attacker-{i}-{kind}.log"), env))
    except BaseException:
        stop_attackers(procs)
        raise
    return procs


def signal_go(go_file: str, server: ServerProcess) -> None:
    """Tell the attackers where the server is, which also tells them to start."""
    maddr = next(m for m in server.maddrs if m.startswith("/ip4/127.0.0.1/"))
    with open(go_file + ".tmp", "w") as f:
        f.write(maddr)
    os.replace(go_file + ".tmp", go_file)


def stop_attackers(procs: list[ManagedProcess]) -> list[dict]:
    """SIGKILL each attacker and its daemon, by PID (again harmlessly); returns each one's last STATS."""
    stats = []
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()
        lines = proc.markers.get("STATS") or ["{}"]
        with contextlib.suppress(ValueError):
            stats.append(json.loads(lines[-1]))
    return stats


def wait_ready(procs: list[ManagedProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait_marker("READY", max(1.0, deadline - time.monotonic()), f"attacker {proc.proc.args[6]}")


# ---- the legitimate clients ---------------------------------------------------------------------


def generation_loop(model, deadline: float, out: Outcome, new_tokens: int = NEW_TOKENS) -> None:
    """Generation sessions back to back until `deadline`; a failed step counts its wall time, and an error."""
    hidden = model.config.hidden_size
    for _ in range(100_000):
        if time.monotonic() >= deadline:
            return
        session, opened = model.open_session(PROMPT + new_tokens), False
        began = time.perf_counter()
        try:
            session.step(torch.randn(1, PROMPT, hidden))
            out.gen_opens.append(time.perf_counter() - began)
            opened = True
            for _ in range(new_tokens - 1):
                if time.monotonic() >= deadline:
                    break
                began = time.perf_counter()
                session.step(torch.randn(1, 1, hidden))
                out.gen_steps.append(time.perf_counter() - began)
        except Exception as e:
            (out.gen_steps if opened else out.gen_opens).append(time.perf_counter() - began)
            out.errors.append(f"generation: {type(e).__name__}: {e}"[:300])
        finally:
            session.close()


def training_loop(model, deadline: float, out: Outcome) -> None:
    """Forward+backward steps back to back until `deadline`; a failed step counts its wall time, and an error."""
    step = forward_backward_step(model, token_ids(model.config.vocab_size, *TRAIN_SHAPE))
    for _ in range(100_000):
        if time.monotonic() >= deadline:
            return
        began = time.perf_counter()
        try:
            step()
        except Exception as e:
            out.errors.append(f"training: {type(e).__name__}: {e}"[:300])
        out.train_steps.append(time.perf_counter() - began)


def run_legit(gen, train, window: float, out: Outcome) -> None:
    """Both clients at once, each in its own thread, for `window` seconds."""
    deadline = time.monotonic() + window
    threads = [threading.Thread(target=generation_loop, args=(gen, deadline, out), name="generation", daemon=True),
               threading.Thread(target=training_loop, args=(train, deadline, out), name="training", daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + JOIN_SLACK)
        if t.is_alive():
            out.errors.append(f"{t.name}: a step was still blocked {JOIN_SLACK:.0f} s after the window")


def warm_up(gen, train) -> None:
    """One short session and one training step, so that the window times steady state (raises on failure)."""
    with contextlib.closing(gen.open_session(PROMPT + 2)) as session:
        session.step(torch.randn(1, PROMPT, gen.config.hidden_size))
        session.step(torch.randn(1, 1, gen.config.hidden_size))
    forward_backward_step(train, token_ids(train.config.vocab_size, *TRAIN_SHAPE))()


# ---- one run ------------------------------------------------------------------------------------


def run_once(bench: Bench, path: str, attack: Attack | None, options: dict, window: float,
             label: str = "no-attack") -> Outcome:
    """A fresh one-server swarm, the legitimate clients, and (unless `attack` is None) the attackers."""
    log_dir = os.path.join(bench.out, "logs", SECTION, attack.key if attack else label)
    os.makedirs(log_dir, exist_ok=True)
    go_file = os.path.join(log_dir, "go")
    with contextlib.suppress(FileNotFoundError):
        os.remove(go_file)
    span = (0, bench.plan.layers)
    procs = start_attackers(attack, options, span, _hidden(path), go_file, window + READY_TIMEOUT + 60, log_dir) \
        if attack else []
    try:
        with LocalSwarm(path, spans=[span], log_dir=log_dir, **options) as swarm:
            return attacked_server(swarm, path, procs, go_file, options, window)
    finally:
        stop_attackers(procs)


def attacked_server(swarm: LocalSwarm, path: str, procs: list[ManagedProcess], go_file: str, options: dict,
                    window: float) -> Outcome:
    """The legitimate clients' window with the attackers under way; then the server once they are gone."""
    server, out, clients = swarm.servers[0], Outcome(), []
    sampler = DaemonSampler(server.pid)
    try:
        for _ in range(2):
            clients.append(connect(path, swarm.initial_peers, **CLIENT))
        gen, train = clients
        freeze(train)
        warm_up(gen, train)
        out.before, _ = wait_settled(gen.connection, server.peer_id, None, 10.0)
        if procs:
            signal_go(go_file, server)
            wait_ready(procs, READY_TIMEOUT)
        run_legit(gen, train, window, out)
    finally:
        out.attackers = stop_attackers(procs)
        try:
            if clients:
                measure_after(out, clients[0].connection, server, options["session_timeout"] + 10.0)
        finally:
            out.peak_daemon_rss = sampler.stop()
            for client in clients:
                client.close()
    return out


def measure_after(out: Outcome, conn, server: ServerProcess, timeout: float) -> None:
    """Once the attackers are gone: the budgets (back to `out.before`?), the server's counters, its peak memory."""
    try:
        out.after, out.settle_s = wait_settled(conn, server.peer_id, out.before, timeout)
        out.server_stats = info(conn, server.peer_id).get("stats", {})
    except Exception as e:  # a dead or mute server: the figures say so
        out.errors.append(f"server: no answer after the attack: {type(e).__name__}: {e}"[:300])
    out.alive = server.proc.poll() is None
    out.peak_rss, out.rss_after = vm_hwm(server.pid), rss(server.pid)


def attacked(bench: Bench, path: str, attack: Attack, options: dict, window: float) -> Outcome:
    """`run_once` under `attack`; a class the benchmark itself could not run is reported, not fatal to the rest."""
    try:
        return run_once(bench, path, attack, options, window)
    except Exception as e:
        return Outcome(errors=[f"benchmark: {type(e).__name__}: {e}"[:500]])


def _hidden(path: str) -> int:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["hidden_size"]


# ---- figures ------------------------------------------------------------------------------------


def p99(xs: list[float]) -> float:
    """Nearest-rank 99th percentile; nan for no samples."""
    if not xs:
        return math.nan
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def p50(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else math.nan


LATENCIES = (("gen_steps", "generation step"), ("gen_opens", "session open + prefill"),
             ("train_steps", "training step"))


def checks(out: Outcome, base: Outcome, bound: int) -> dict[str, bool]:
    """Each target: met (True) or missed."""
    latency = all(p99(getattr(out, k)) <= LATENCY_FACTOR * p99(getattr(base, k)) for k, _ in LATENCIES)
    back = out.settle_s is not None and out.after.get("cache_bytes_free") == out.before.get("cache_bytes_free") \
        and out.after.get("graph_bytes_kept") == out.before.get("graph_bytes_kept")
    return {"latency": latency, "no errors": not out.errors, "rss": 0 < out.peak_rss <= bound, "budget back": back,
            "alive": out.alive}


def class_figures(key: str, title: str, out: Outcome, base: Outcome, base_name: str, bound: int,
                  window: float, quiet_rss: int) -> list[Figure]:
    """Latencies against `base`, peak RSS against the bound (and the no-attack run's, `quiet_rss`), the free KV
    budget after against before."""
    met = checks(out, base, bound)
    if key == NO_ATTACK:  # its latencies are compared with the end of the run: drift, not a target
        del met["latency"]
    common = {"class": key, "title": title, "checks": met, "errors": out.errors[:5], "error_count": len(out.errors),
              "window_s": window}
    figures = []
    for attr, what in LATENCIES:
        xs, bs = getattr(out, attr), getattr(base, attr)
        figures.append(Figure(
            SECTION, f"{title}: {what} p99", "ms", 1e3 * _finite(p99(xs), window), 1e3 * _finite(p99(bs), window),
            base_name, spread(xs, bs), f"p50 {fmt(1e3 * p50(xs))} vs {fmt(1e3 * p50(bs))} ms; {len(xs)} samples",
            details={**common, "measure": attr, "p50_ms": 1e3 * p50(xs), "base_p50_ms": 1e3 * p50(bs),
                     "samples": len(xs), "base_samples": len(bs)}))
    figures.append(Figure(
        SECTION, f"{title}: server peak RSS", "MiB", out.peak_rss / MiB, bound / MiB, "bound",
        note=f"{(out.peak_rss - quiet_rss) / MiB:+.0f} MiB over the no-attack peak, {out.rss_after / MiB:.0f} MiB "
             f"after; libp2p daemon peak {out.peak_daemon_rss / MiB:.0f} MiB; server alive: "
             f"{'yes' if out.alive else 'NO'}",
        details={**common, "measure": "rss", "daemon_peak_mib": out.peak_daemon_rss / MiB, "alive": out.alive,
                 "over_no_attack_mib": (out.peak_rss - quiet_rss) / MiB, "after_mib": out.rss_after / MiB}))
    before, after = out.before.get("cache_bytes_free", 0), out.after.get("cache_bytes_free", 0)
    figures.append(Figure(
        SECTION, f"{title}: free KV budget after the attack", "MiB", after / MiB, before / MiB or None, "before",
        note=f"graphs kept {out.after.get('graph_bytes_kept', '?')} B (before {out.before.get('graph_bytes_kept')}); "
             + (f"back after {out.settle_s:.1f} s" if out.settle_s is not None else "NOT back"),
        details={**common, "measure": "budget", "before": out.before, "after": out.after, "settle_s": out.settle_s,
                 "attackers": out.attackers, "server_stats": out.server_stats}))
    return figures


def _finite(x: float, fallback: float) -> float:
    """A percentile of no samples: the client got nothing done in the whole window."""
    return fallback if math.isnan(x) else x


def pooled(*outcomes: Outcome) -> Outcome:
    both = Outcome()
    for o in outcomes:
        both.gen_steps += o.gen_steps
        both.gen_opens += o.gen_opens
        both.train_steps += o.train_steps
    return both


ONLY: tuple[str, ...] = ()  # `--only KEY,...`: these classes alone (swarm or HTTP), else the plan's


def run(bench: Bench) -> list[Figure]:
    seed_everything()
    keys = ONLY or bench.plan.hostile_classes
    figures = run_swarm(bench, keys) if not keys or any(a.key in keys for a in ATTACKS) else []
    return figures + run_http(bench, keys)


def run_swarm(bench: Bench, keys: tuple[str, ...]) -> list[Figure]:
    plan = bench.plan
    path = bench.model(plan.latency_hidden)
    options = dict(SERVER)
    window = plan.hostile_window
    attacks = [a for a in ATTACKS if not keys or a.key in keys]
    start = run_once(bench, path, None, options, window, "no-attack-start")
    bound = rss_bound(start.peak_rss, options)
    outcomes = [(attack, attacked(bench, path, attack, {**options, **dict(attack.server)}, window))
                for attack in attacks]
    end = run_once(bench, path, None, options, window, "no-attack-end") if plan.hostile_rebaseline else None
    base = pooled(start, end) if end else start
    quiet = start.peak_rss
    figures = class_figures(NO_ATTACK, f"{NO_ATTACK}, start" + (" vs end of run" if end else ""), start, end or start,
                            "end of run" if end else "itself", bound, window, quiet)
    for f in figures:
        f.details["server_options"] = options
    for attack, out in outcomes:
        for f in class_figures(attack.key, attack.title, out, base, "no attack", bound, window, quiet):
            f.details["server_options"] = {**options, **dict(attack.server)}
            figures.append(f)
    return figures


# ---- the table and the plot ---------------------------------------------------------------------


def hostile_table(figures: list[Figure]) -> str:
    """The swarm's classes, then the HTTP endpoint's."""
    swarm = [f for f in figures if not f.details.get("http")]
    http = [f for f in figures if f.details.get("http")]
    return "\n\n".join(t for t in (swarm_table(swarm) if swarm else "", http_table(http) if http else "") if t)


def swarm_table(figures: list[Figure]) -> str:
    """One row per class: legit latencies against no attack, peak RSS against its bound, the budget after."""
    by_class: dict[str, dict[str, Figure]] = {}
    for f in figures:
        by_class.setdefault(f.details["class"], {})[f.details["measure"]] = f
    rows = []
    for measures in by_class.values():
        gen, opens, train = measures["gen_steps"], measures["gen_opens"], measures["train_steps"]
        rss, kv = measures["rss"], measures["budget"]
        met = gen.details["checks"]
        rows.append([
            gen.details["title"], attack_summary(kv.details["attackers"]), _pair(gen), _pair(opens), _pair(train),
            f"{rss.swarm:.0f} / {rss.baseline:.0f} ({rss.details['over_no_attack_mib']:+.0f})",
            f"{kv.swarm:.1f} / {fmt(kv.baseline)}; graphs {kv.details['after'].get('graph_bytes_kept', '?')} B",
            str(gen.details["error_count"]),
            "yes" if all(met.values()) else "no: " + ", ".join(k for k, ok in met.items() if not ok)])
    first = figures[0].details if figures else {}
    legend = (f"\n\nOne fresh server per class, {first.get('window_s', 0):g} s per class, attackers at nice "
              f"{ATTACKER_NICE}; server options: {first.get('server_options', {})}.")
    return markdown_table(
        ["class", "attackers sent", "generation step p50 / p99 ms (no attack)", "open + prefill p99 ms (no attack)",
         "training step p50 / p99 ms (no attack)", "server peak RSS / bound MiB (vs no attack)",
         "free KV after / before MiB", "legit errors", "targets met"], rows) + legend


def attack_summary(attackers: list[dict]) -> str:
    """What the attackers got through, all together: requests, opens, streams, frames."""
    totals = {k: sum(a.get(k, 0) for a in attackers) for k in ("sent", "opens", "streams", "frames")}
    words = {"sent": "requests", "opens": "opens", "streams": "streams", "frames": "frames"}
    return ", ".join(f"{fmt(v)} {words[k]}" for k, v in totals.items() if v) or "-"


def _pair(f: Figure) -> str:
    return f"{fmt(f.details['p50_ms'])} / {fmt(f.swarm)} ({fmt(f.details['base_p50_ms'])} / {fmt(f.baseline)})"


def panels(figures: list[Figure]) -> list[tuple[str, list[str], list[float], list[float], str]]:
    """Run.py's plot: generation and training p99 against no attack, peak RSS against the bound, per class."""
    result = []
    for measure, label, base_name in (("gen_steps", "generation step p99 (ms)", "no attack"),
                                      ("train_steps", "training step p99 (ms)", "no attack"),
                                      ("rss", "server peak RSS (MiB)", "bound")):
        chosen = [f for f in figures if f.details["measure"] == measure and f.details["class"] != NO_ATTACK
                  and not f.details.get("http")]
        if chosen:
            result.append((label, [f.details["class"].replace("_", "\n") for f in chosen],
                           [f.baseline for f in chosen], [f.swarm for f in chosen], base_name))
    return result


def main(argv: list[str] | None = None) -> None:
    global ONLY
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--only" in argv:
        at = argv.index("--only")
        ONLY = tuple(argv[at + 1].split(","))
        del argv[at:at + 2]
    run_section(run, hostile_table, __doc__, SECTION, argv)



# ---- the HTTP endpoint's classes ----------------------------------------------------------------
# `python -m swarmtune.serve` as its own process over a one-server swarm (fresh per class, so that its peak
# RSS is its own), beside a legitimate client that sends small completions back to back from another address
# (127.0.0.2: clients are told apart by address). Attackers: benchmarks/http_attackers.py, at nice 10.

HTTP_ATTACKS = (
    Attack("http_flood", "HTTP queue flood with hang-ups", (("queue_flood", 4),)),
    Attack("http_stops", "HTTP stop bomb", (("stop_bomb", 4),)),
    Attack("http_body", "HTTP body bomb", (("body_bomb", 2),)),
    Attack("http_headers", "HTTP slow headers", (("slow_headers", 500),)),
    Attack("http_streams", "HTTP disconnecting streams", (("streams", 16),)),
)
HTTP_RSS_ALLOWANCE = 200 * MiB  # over the endpoint's no-attack peak: what its limits let attackers hold at once
LEGIT_BODY = {"prompt": "Bees make honey from", "max_tokens": 8, "temperature": 0}
SETTLE_TIMEOUT = 30.0
SERVE_TIMEOUT = 180.0  # serve starts (torch, the model, its connection) within this, however loaded the machine


@dataclass
class HttpOutcome:
    latencies: list[float] = field(default_factory=list)   # the legitimate client's requests, seconds
    errors: list[str] = field(default_factory=list)
    peak_rss: int = 0
    rss_after: int = 0
    settle_s: float | None = None                           # until no row is in use and nothing is admitted
    attackers: list[dict] = field(default_factory=list)


def start_endpoint(swarm: LocalSwarm, path: str, log_dir: str) -> tuple[ManagedProcess, str]:
    """`python -m swarmtune.serve` for the swarm, on a free port; (its process, its base URL)."""
    args = [sys.executable, "-m", "swarmtune.serve", f"model.path={path}", "port=0",
            f"swarm.initial_peers=[{','.join(swarm.initial_peers)}]", f"hydra.run.dir={log_dir}/serve"]
    proc = ManagedProcess(args, os.path.join(log_dir, "serve.log"), dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + SERVE_TIMEOUT
    while time.monotonic() < deadline:
        line = next((x for x in list(proc.lines) if x.startswith("Serving ")), None)
        if line:
            return proc, line.split(" at ", 1)[1].split("/v1", 1)[0]
        if proc.proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"serve did not start:\n{proc.tail()}")


def legit_loop(url: str, model: str, deadline: float, out: HttpOutcome) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60) as client:
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                r = client.post(f"{url}/v1/completions", json={"model": model, **LEGIT_BODY})
                if r.status_code != 200:
                    out.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                out.errors.append(f"{type(e).__name__}: {e}"[:300])
            out.latencies.append(time.perf_counter() - began)


def endpoint_idle(url: str, timeout: float) -> float | None:
    """Seconds until /metrics shows no row in use and no request admitted (None: not within `timeout`)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
            if not values["swarmtune_rows_in_use"] and not values["swarmtune_requests_running"] \
                    and not values["swarmtune_requests_waiting"]:
                return time.monotonic() - began
        time.sleep(0.2)
    return None


def http_run(swarm: LocalSwarm, path: str, attack: Attack | None, window: float, log_root: str) -> HttpOutcome:
    log_dir = os.path.join(log_root, attack.key if attack else "http-no-attack")
    os.makedirs(log_dir, exist_ok=True)
    go_file = os.path.join(log_dir, "go")
    with contextlib.suppress(FileNotFoundError):
        os.remove(go_file)
    out, procs = HttpOutcome(), []
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    endpoint, url = start_endpoint(swarm, path, log_dir)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        httpx.post(f"{url}/v1/completions", json={"model": model, **LEGIT_BODY}, timeout=60)  # warm
        for i, (kind, workers) in enumerate(attack.attackers if attack else ()):
            procs.append(ManagedProcess(
                ["nice", "-n", str(ATTACKER_NICE), sys.executable, "-m", "benchmarks.http_attackers", kind,
                 "--go-file", go_file, "--duration", f"{window + READY_TIMEOUT:g}", "--workers", str(workers)],
                os.path.join(log_dir, f"attacker-{i}-{kind}.log"), env))
        if procs:
            with open(go_file + ".tmp", "w") as f:
                f.write(url)
            os.replace(go_file + ".tmp", go_file)
            for proc in procs:
                proc.wait_marker("READY", READY_TIMEOUT, f"attacker {kind}")
        legit_loop(url, model, time.monotonic() + window, out)
        out.attackers = stop_attackers(procs)
        out.settle_s = endpoint_idle(url, SETTLE_TIMEOUT)
        out.peak_rss, out.rss_after = vm_hwm(endpoint.pid), rss(endpoint.pid)
    finally:
        stop_attackers(procs)
        endpoint.kill()
    return out


def run_http(bench: Bench, keys: tuple[str, ...]) -> list[Figure]:
    """The HTTP classes (those in `keys`; all for ()), each against the no-attack run at the start."""
    attacks = [a for a in HTTP_ATTACKS if not keys or a.key in keys]
    if keys and not attacks:
        return []
    path = bench.model(bench.plan.latency_hidden)
    window = bench.plan.hostile_window
    log_root = os.path.join(bench.out, "logs", SECTION)
    with LocalSwarm(path, spans=[(0, bench.plan.layers)], log_dir=log_root) as swarm:
        base = http_run(swarm, path, None, window, log_root)
        outcomes = []
        for attack in attacks:
            try:
                outcomes.append((attack, http_run(swarm, path, attack, window, log_root)))
            except Exception as e:  # the benchmark could not run this class: reported, not fatal to the rest
                outcomes.append((attack, HttpOutcome(errors=[f"benchmark: {type(e).__name__}: {e}"[:500]])))
    bound = base.peak_rss + HTTP_RSS_ALLOWANCE
    figures = []
    for key, title, out in [(NO_ATTACK, "HTTP, no attack", base), *((a.key, a.title, o) for a, o in outcomes)]:
        met = {"latency": p99(out.latencies) <= LATENCY_FACTOR * p99(base.latencies), "no errors": not out.errors,
               "rss": 0 < out.peak_rss <= bound, "rows freed": out.settle_s is not None}
        details = {"class": key, "title": title, "http": True, "checks": met, "errors": out.errors[:5],
                   "error_count": len(out.errors), "window_s": window, "attackers": out.attackers,
                   "p50_ms": 1e3 * p50(out.latencies), "base_p50_ms": 1e3 * p50(base.latencies),
                   "samples": len(out.latencies), "settle_s": out.settle_s, "after_mib": out.rss_after / MiB,
                   "over_no_attack_mib": (out.peak_rss - base.peak_rss) / MiB}
        figures.append(Figure(SECTION, f"{title}: legitimate request p99", "ms",
                              1e3 * _finite(p99(out.latencies), window), 1e3 * p99(base.latencies), "no attack",
                              details={**details, "measure": "http_request"}))
        figures.append(Figure(SECTION, f"{title}: endpoint peak RSS", "MiB", out.peak_rss / MiB, bound / MiB,
                              "bound", details={**details, "measure": "http_rss"}))
    return figures


def http_table(figures: list[Figure]) -> str:
    by_class: dict[str, dict[str, Figure]] = {}
    for f in figures:
        by_class.setdefault(f.details["class"], {})[f.details["measure"]] = f
    rows = []
    for measures in by_class.values():
        req, mem = measures["http_request"], measures["http_rss"]
        d = req.details
        met = dict(d["checks"])
        if d["class"] == NO_ATTACK:
            del met["latency"]
        sent = Counter()
        for a in d["attackers"]:
            sent.update({k: v for k, v in a.items() if isinstance(v, int)})
        rows.append([d["title"], ", ".join(f"{v} {k}" for k, v in sent.most_common(4)) or "-",
                     f"{fmt(d['p50_ms'])} / {fmt(req.swarm)} ({fmt(d['base_p50_ms'])} / {fmt(req.baseline)})",
                     f"{fmt(req.swarm / req.baseline) if req.baseline else '-'}x",
                     f"{mem.swarm:.0f} / {mem.baseline:.0f} ({d['over_no_attack_mib']:+.0f})",
                     "-" if d["settle_s"] is None else f"{d['settle_s']:.1f} s", str(d["error_count"]),
                     "yes" if all(met.values()) else "no: " + ", ".join(k for k, ok in met.items() if not ok)])
    return markdown_table(["class", "attackers got", "legit request p50 / p99 ms (no attack)", "p99 ratio",
                           "endpoint peak RSS / bound MiB (vs no attack)", "rows free after", "legit errors",
                           "targets met"], rows)


if __name__ == "__main__":
    main()
