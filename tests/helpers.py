"""What tests share besides fixtures: reference models, recipes, and processes they start.

Tests import these from here (fixtures stay in conftest.py, where pytest finds them).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from swarmtune import launch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom", "qwen3_moe", "glm4_moe", "gpt_oss",
            "deepseek_v3"]
MOE_FAMILIES = ["qwen3_moe", "glm4_moe", "gpt_oss"]
RECIPES = sorted(e.name[:-5] for e in launch.recipes_dir().iterdir() if e.name.endswith(".yaml"))
PEERS = ["/ip4/10.1.2.3/tcp/31337/p2p/Qmb7FeGu3HqZ7rwcsYCd8iBELnmmCu1ahRKvGkwaAX2iEZ",  # well-formed, never dialled
         "/ip4/10.1.2.4/tcp/31337/p2p/QmNYG4mfj1dhLZBYBWEFyhYC2S2QDHZ8Ra5K7XKqtqBLAd"]


def reference_model(path: str):
    """The same checkpoint as a plain local transformers model (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = "eager" if AutoConfig.from_pretrained(path).model_type in ("bloom", "gpt_oss") else "sdpa"
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


def span_logits(path: str, ids: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """The checkpoint's logits computed span by span, as servers holding `spans` and a client would."""
    from swarmtune.models import load_client_parts, load_span

    parts = load_client_parts(path)
    hidden = parts.prepare_hidden(parts.embed_tokens(ids))
    for start, end in spans:
        hidden = load_span(path, start, end)(hidden)
    return parts.logits(hidden)


@contextlib.contextmanager
def hydra_context(groups: tuple[str, ...] | None = None):
    """Hydra's compose API over swarmtune's configs, with the recipes registered (only `groups` of them)."""
    launch.register_recipes(groups)
    with launch.config_context():
        yield


class TrainProcess:
    """`python -m swarmtune.train ARGS`, logging to a file; `stop()` kills it and everything it started."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "swarmtune.train", *args], stdout=f,
                                         stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                         start_new_session=True)

    def wait(self, timeout: float) -> str:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"training did not finish within {timeout:.0f} s:\n{self.output()[-3000:]}")
        assert self.proc.returncode == 0, self.output()[-5000:]
        return self.output()

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        children = []
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(self.proc.pid).children(recursive=True)
        for p in [self.proc, *children]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
        self.proc.wait(10)  # reaped here, not by psutil, so returncode tells how it ended
        psutil.wait_procs(children, timeout=10)


def adapter_path(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Adapter saved to ")]
    assert lines, output[-3000:]
    return lines[-1][len("Adapter saved to "):].strip()


@dataclass
class Outcome:
    returncode: int
    stderr: str
    stdout: str
    started_swarm: bool     # did the command start a server or DHT process of its own?
    seconds: float = 0.0    # from its start to its exit

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run(module: str, *args: str, env: dict | None = None, unset: tuple[str, ...] = (), timeout: float = 120,
        cwd: str | None = None) -> Outcome:
    """`python -m MODULE ARGS`, watching its children for swarm processes; killed (with them) at the end."""
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=err, text=True,
                                env=environment, start_new_session=True, cwd=cwd)
        started, began = False, time.monotonic()
        deadline = began + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(psutil.Error):
                    started |= any(word in " ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(True)
                                   for word in ("swarmtune.server", "swarmtune.dht"))
                time.sleep(0.05)
            assert proc.poll() is not None, f"{module} {' '.join(args)} did not finish within {timeout:.0f} s"
            seconds = time.monotonic() - began
        finally:
            with contextlib.suppress(psutil.Error):
                for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                    p.kill()
            proc.wait(10)
        out.seek(0)
        err.seek(0)
        return Outcome(proc.returncode, err.read(), out.read(), started, seconds)


def wait_until_seen(client, peer_id: str, timeout: float = 30.0) -> None:
    """Until `client`'s view of the swarm holds the server `peer_id` (a server just started may not be found by
    a client's first lookup on busy cores: its sessions would then start elsewhere)."""
    deadline = time.monotonic() + timeout
    while peer_id not in client.connection.view.servers:
        assert time.monotonic() < deadline, f"the client never saw {peer_id} in {timeout:.0f} s"
        time.sleep(0.2)
        client.connection.refresh()


class KillAfter(BaseStreamer):
    """A generate streamer that SIGKILLs `server` once `tokens` pieces were streamed (mid-generation)."""

    def __init__(self, server, tokens: int):
        self.server, self.tokens, self.seen = server, tokens, 0

    def put(self, value):
        self.seen += 1
        if self.seen == self.tokens:
            self.server.kill()

    def end(self):
        pass
