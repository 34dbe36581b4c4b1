"""Shared fixtures: tiny random-weight models of every family, and loopback swarms shared per session.

Nothing here touches a network beyond 127.0.0.1, and every process started is stopped in teardown.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "XDG_CACHE_HOME" not in os.environ:  # servers cache their throughput measurements: keep them out of ~/.cache
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="swarmtune-test-cache-")

import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from swarmtune.tiny_model import make_tiny_model  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models(family, layers=6) -> path of a cached tiny checkpoint of that family."""
    root = tmp_path_factory.mktemp("tiny-models")
    made: dict[tuple, str] = {}

    def get(family: str, layers: int = 6, hidden: int = 64) -> str:
        key = (family, layers, hidden)
        if key not in made:
            made[key] = make_tiny_model(family, str(root / f"{family}-{layers}-{hidden}"), layers=layers,
                                        hidden=hidden)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models("llama")


def reference_model(path: str):
    """The same checkpoint as a plain local transformers model (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = "eager" if AutoConfig.from_pretrained(path).model_type == "bloom" else "sdpa"
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llama_swarm(tiny_llama):
    """Three servers splitting a 6-block llama unevenly, shared by every test that only reads from it."""
    from swarmtune.swarm import LocalSwarm

    with LocalSwarm(tiny_llama, spans=[(0, 1), (1, 4), (4, 6)]) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def llama_client(llama_swarm, tiny_llama):
    from swarmtune.client.model import SwarmForCausalLM

    model = SwarmForCausalLM.from_pretrained(tiny_llama, initial_peers=llama_swarm.initial_peers)
    yield model
    model.close()


@pytest.fixture(scope="session")
def bloom_client(tiny_models):
    """A swarm of the paper's family (ALiBi positions) with its client: (model, checkpoint path)."""
    from swarmtune.client.model import SwarmForCausalLM
    from swarmtune.swarm import LocalSwarm

    path = tiny_models("bloom")
    with LocalSwarm(path, spans=[(0, 3), (3, 4), (4, 6)]) as swarm:
        model = SwarmForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        yield model, path
        model.close()


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


@pytest.fixture
def train_process():
    """Start `python -m swarmtune.train ARGS` processes; all are killed at teardown."""
    started: list[TrainProcess] = []

    def start(args: list[str], log: Path, env: dict | None = None) -> TrainProcess:
        started.append(TrainProcess(args, log, env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def adapter_path(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Adapter saved to ")]
    assert lines, output[-3000:]
    return lines[-1][len("Adapter saved to "):].strip()


@pytest.fixture(scope="session")
def tiny_local_run(tmp_path_factory, tiny_llama) -> tuple[Path, str]:
    """One run of the default recipe (30 steps, its own embedded swarm, CSV logs): (run dir, its output)."""
    tmp = tmp_path_factory.mktemp("tiny-local")
    run_dir = tmp / "run"
    process = TrainProcess(["recipe=tiny_local", "trainer.max_steps=30", f"model.path={tiny_llama}", "logger=csv",
                            f"hydra.run.dir={run_dir}"], tmp / "train.log")
    try:
        return run_dir, process.wait(timeout=300)
    finally:
        process.stop()
