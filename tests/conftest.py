"""Shared fixtures: tiny random-weight models of every family, and loopback swarms shared per session.

Nothing here touches a network beyond 127.0.0.1, and every process started is stopped in teardown.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tempfile  # noqa: E402

# Servers cache their throughput measurements, and `swarm up` records its swarms: none of it in ~/.cache,
# nor may a swarm a user keeps up stand in for the tests' own.
os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="swarmtune-test-cache-"))
os.environ["SWARMTUNE_CACHE"] = tempfile.mkdtemp(prefix="swarmtune-test-home-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from swarmtune.tiny_model import make_tiny_model  # noqa: E402
from tests.helpers import TrainProcess  # noqa: E402


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


@pytest.fixture(scope="session")
def llama_swarm(tiny_llama):
    """Three servers splitting a 6-block llama unevenly, shared by every test that only reads from it."""
    from swarmtune.local_swarm import LocalSwarm

    # fuzzing sends malformed requests in bursts, each counting for several toward the request rate: here the
    # rate limit stays out of the way (test_limits tests it on a swarm of its own)
    with LocalSwarm(tiny_llama, spans=[(0, 1), (1, 4), (4, 6)], max_requests_per_second=100_000) as swarm:
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
    from swarmtune.local_swarm import LocalSwarm

    path = tiny_models("bloom")
    with LocalSwarm(path, spans=[(0, 3), (3, 4), (4, 6)]) as swarm:
        model = SwarmForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        yield model, path
        model.close()


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
