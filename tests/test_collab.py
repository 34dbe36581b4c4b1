"""Collaborative training with hivemind.Optimizer, through the training entry point: peers are separate processes
on 127.0.0.1 that meet on a bootstrap DHT of the test's own and train through one loopback swarm.

Slow-marked: hivemind's matchmaking runs on wall-clock windows, and on two busy cores (a parallel test run)
peers were seen to fall into different epochs and average alone; alone on the machine both tests pass."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from swarmtune.adapters.peft_format import ADAPTER_WEIGHTS
from tests.helpers import adapter_path

pytestmark = pytest.mark.slow

COMMON = ["recipe=tiny_local", "collab.run_id=bees", "collab.target_batch_size=64", "collab.matchmaking_time=2.0",
          "collab.averaging_timeout=10", "data.batch_size=4", "trainer.max_steps=2000",
          "trainer.val_check_interval=1000", "generate_every_n_val=0", "logger=csv"]


@pytest.fixture(scope="module")
def bootstrap():
    """A DHT peer that only introduces the collaboration's peers to each other."""
    import hivemind

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False,
                       use_relay=False, use_auto_relay=False)
    yield [str(a) for a in dht.get_visible_maddrs()]
    dht.shutdown()


def peer_args(tiny_llama: str, swarm, bootstrap: list[str], run_dir: Path, epochs: int,
              recipe: str = "tiny_local") -> list[str]:
    peers = ",".join(f"'{p}'" for p in swarm.initial_peers)
    return [f"recipe={recipe}", *COMMON[1:], f"model.path={tiny_llama}", f"swarm.initial_peers=[{peers}]",
            f"collab.epochs={epochs}",
            "collab.initial_peers=[" + ",".join(f"'{p}'" for p in bootstrap) + "]", f"hydra.run.dir={run_dir}"]


def adapter(output: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(adapter_path(output)) / ADAPTER_WEIGHTS))


def rounds(output: str) -> str:
    """A peer's averaging rounds, as hivemind and the progress callback logged them: what a mismatch needs."""
    return "\n".join(line for line in output.splitlines()
                     if re.search(r"optimizer step|[Aa]verag|Transitioning|sync|Collaboration", line))


def assert_same_adapter(outputs: list[str]) -> None:
    a, b = adapter(outputs[0]), adapter(outputs[1])
    assert a.keys() == b.keys()
    for key in a:
        assert float((a[key] - b[key]).abs().max()) <= 1e-6, f"{key}\n{rounds(outputs[0])}\n\n{rounds(outputs[1])}"


def wait_for(process, pattern: str, timeout: float = 180) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, process.output())
        if found:
            return found
        assert process.proc.poll() is None, process.output()[-3000:]
        time.sleep(0.1)
    pytest.fail(f"{pattern!r} did not appear within {timeout:.0f} s:\n{process.output()[-3000:]}")


def test_two_peers_train_one_adapter(tiny_llama, llama_swarm, bootstrap, tmp_path, train_process):
    peers = [train_process(peer_args(tiny_llama, llama_swarm, bootstrap, tmp_path / name, epochs=5),
                           tmp_path / f"{name}.log") for name in ("a", "b")]
    outputs = [p.wait(timeout=300) for p in peers]
    assert all("reached 5 of 5" in out for out in outputs)
    assert any("from 2 peers" in out for out in outputs)  # they reached a target batch together
    assert_same_adapter(outputs)


def test_two_peers_train_one_adapter_with_dpo(tiny_llama, llama_swarm, bootstrap, tmp_path, train_process):
    """DPO's steps (a reference pass with the adapter off, then the policy's) count pairs toward the target batch
    and average as SFT's do."""
    args = [peer_args(tiny_llama, llama_swarm, bootstrap, tmp_path / name, epochs=3, recipe="tiny_dpo")
            + ["collab.run_id=dpo-bees"] for name in ("a", "b")]
    peers = [train_process(a, tmp_path / f"{name}.log") for a, name in zip(args, ("a", "b"))]
    outputs = [p.wait(timeout=300) for p in peers]
    assert all("reached 3 of 3" in out for out in outputs)
    assert any("from 2 peers" in out for out in outputs)
    assert_same_adapter(outputs)


def test_a_newcomer_starts_from_the_current_state_and_a_killed_peer_stops_nobody(
        tiny_llama, llama_swarm, bootstrap, tmp_path, train_process):
    epochs = 9
    a, b = (train_process(peer_args(tiny_llama, llama_swarm, bootstrap, tmp_path / name, epochs),
                          tmp_path / f"{name}.log") for name in ("a", "b"))
    wait_for(a, r"reached 3 of")
    c = train_process(peer_args(tiny_llama, llama_swarm, bootstrap, tmp_path / "c", epochs), tmp_path / "c.log")
    joined = int(wait_for(c, r"joined at (\d+) of").group(1))
    assert joined >= 3  # it downloaded the collaboration's state rather than starting from scratch
    wait_for(c, rf"reached {joined + 1} of")  # and trains with the others
    b.stop()  # SIGKILL, with every process it started: as if its machine died
    outputs = [a.wait(timeout=400), c.wait(timeout=400)]
    assert all(f"reached {epochs} of {epochs}" in out for out in outputs)
