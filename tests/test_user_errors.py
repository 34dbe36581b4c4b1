"""A user's mistake gets one or two lines naming the problem and the fix, a non-zero exit, and no slow work
first: each command below must fail before it starts any swarm process, and show a traceback only when
asked (--debug, HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import json
import socket

import pytest
from hydra import compose

from swarmtune import eval as eval_entry
from swarmtune import generate, train
from swarmtune.client.connection import SwarmConnection
from swarmtune.errors import UserError
from swarmtune.swarm import LocalSwarm
from tests.helpers import PEERS, Outcome, hydra_context, run

BAD_ADDR = "notamultiaddr"


def assert_told(outcome: Outcome, *words: str) -> None:
    """Exit status 2, at most two lines on stderr naming each of `words`, no traceback, nothing started."""
    assert outcome.returncode == 2, outcome
    assert 1 <= len(outcome.error_lines) <= 2, outcome.stderr
    assert outcome.error_lines[0].startswith("error: "), outcome.stderr
    assert "Traceback" not in outcome.stderr
    for word in words:
        assert word in outcome.stderr, (word, outcome.stderr)
    assert not outcome.started_swarm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("module,args,words", [
    ("swarmtune.generate", ["adapter=/nonexistent/adapter"], ["/nonexistent/adapter", "no such directory"]),
    ("swarmtune.eval", ["adapter=/nonexistent/adapter"], ["/nonexistent/adapter", "no such directory"]),
    ("swarmtune.train", ["trainer.max_steps=-5"], ["trainer", "max_steps"]),
    ("swarmtune.train", ["recipe=lora_llama70b"], ["SWARMTUNE_INITIAL_PEERS"]),
    ("swarmtune.server", ["--model", "/nonexistent/model", "--new-swarm", "--blocks", "0:1"],
     ["--model /nonexistent/model", "no such directory"]),
    ("swarmtune.server", ["--model", "meta-llama/Llama-2-70b-hf", "--initial-peers", BAD_ADDR, "--blocks", "0:1"],
     ["--initial-peers", BAD_ADDR]),
    ("swarmtune.server", ["--model", "org/model", "--blocks", "0:1"], ["--new-swarm"]),
    ("swarmtune.dht", ["--initial-peers", BAD_ADDR], ["--initial-peers", BAD_ADDR]),
    ("swarmtune.swarm", ["status", "--initial-peers", BAD_ADDR], ["--initial-peers", BAD_ADDR]),
    ("swarmtune.swarm", ["status"], ["--initial-peers", "swarm up"]),
    ("swarmtune.swarm", ["up", "model.path=/nonexistent/model"], ["model.path /nonexistent/model"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v.split(".")[-1] if isinstance(v, str) else None)
def test_every_command_tells_a_mistake_in_a_line(module, args, words, tmp_path):
    if module.endswith(("train", "eval", "generate")):  # Hydra apps: keep their run folders out of the checkout
        args = [*args, f"hydra.run.dir={tmp_path}"]
    assert_told(run(module, *args, unset=("SWARMTUNE_INITIAL_PEERS",)), *words)


@pytest.fixture
def no_swarm(monkeypatch):
    """Entry points run in this process, where starting a swarm (or connecting to one) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a swarm was started or joined before the mistake was found")

    monkeypatch.setattr(LocalSwarm, "__init__", refuse)
    monkeypatch.setattr(SwarmConnection, "__init__", refuse)
    monkeypatch.setattr(train, "_run_names", lambda cfg: {})  # what Hydra's job would name the run
    monkeypatch.delenv("SWARMTUNE_INITIAL_PEERS", raising=False)


@pytest.mark.parametrize("entry,overrides,match", [
    (train, ["trainer.max_steps=-5"], "trainer: .*max_steps"),
    (train, ["trainer.precision=bogus"], "trainer: .*Precision 'bogus'"),
    (train, ["optim.name=adamx"], "optim: unknown optimizer 'adamx': use one of adamw"),
    (train, ["optim.scheduler=sawtooth"], "optim: unknown scheduler 'sawtooth'.*cosine"),
    (train, ["optim.lr=-1"], "optim: lr must be a positive number"),
    (train, ["data.batch_size=0"], "data: batch_size must be a positive number"),
    (train, ["data.val_fraction=1.5"], "data: val_fraction"),
    (train, ["data.path=/nonexistent/data.jsonl"], "data.path /nonexistent/data.jsonl: no such directory"),
    (train, ["tuning.lora.rank=0"], "tuning.lora: rank must be a positive number"),
    (train, ["tuning.lora.enabled=false"], "tuning: nothing to train"),
    (train, ["+tuning.lora.rnak=4"], "tuning.lora.rnak is not a setting: use one of enabled, rank"),
    (train, [f"swarm.initial_peers=[{BAD_ADDR}]"], f"swarm.initial_peers: '{BAD_ADDR}' is not a multiaddr"),
    (train, [f"swarm.initial_peers=[{PEERS[0].rsplit('/p2p/')[0]}]"], "lacks the peer id"),
    (train, ["swarm.client.request_timeout=0"], "swarm.client: request_timeout must be a positive number"),
    (train, ["+swarm.client.timeout=3"], "swarm.client.timeout is not a setting"),
    (train, ["eval.batch_size=0"], "eval: batch_size"),
    (train, ["generate_every_n_val=-1"], "generate_every_n_val must be >= 0"),
    (train, ["logger=none", "trainer.ckpt_path=/nonexistent.ckpt"], "trainer.ckpt_path /nonexistent.ckpt"),
    (train, ["model.path=/nonexistent/model"], "model.path /nonexistent/model: no such directory"),
    (train, ["model.dtype=fp8"], "model.dtype: Unknown dtype 'fp8'"),
    (train, ["collab.run_id=bees", "collab.target_batch_size=0"], "collab: target_batch_size must be a positive"),
    (train, ["collab.run_id=bees", "trainer.devices=2", "trainer.strategy=ddp"], "collab.run_id trains one process"),
    (train, ["+collab.peers=[]"], "collab.peers is not a setting: use one of run_id"),
    (train, ["tuning.objective=dpo"], "tuning.objective=dpo with data.format=instruction"),
    (train, ["recipe=tiny_dpo", "tuning.objective=sft"], "tuning.objective=sft with data.format=preference"),
    (train, ["recipe=tiny_dpo", "tuning.train_lm_head=true"], "tuning: objective=dpo .*train_lm_head=false"),
    (train, ["tuning.objective=ppo"], "tuning: objective 'ppo' is unknown: use one of sft, dpo"),
    (train, ["recipe=tiny_dpo", "tuning.beta=0"], "tuning: beta must be a positive number"),
    (train, ["data.format=chat"], "data: format 'chat' is unknown: use one of instruction, messages"),
    (train, ["recipe=tiny_dpo", "+data.packing=true"], "data: packing joins rows.*packing=false"),
    (train, ["recipe=tiny_chat", "data.chat_template=/nonexistent.jinja"],
     "data.chat_template /nonexistent.jinja: no such file"),
    (generate, ["adapter=/nonexistent/adapter"], "adapter /nonexistent/adapter: no such directory"),
    (generate, ["generation.temperature=0"], "generation.temperature must be a positive number"),
    (generate, ["+generation.max_new_token=5"], "generation.max_new_token is not an argument"),
    (eval_entry, ["adapter=/nonexistent/adapter"], "adapter /nonexistent/adapter: no such directory"),
    (eval_entry, ["beta=0"], "beta must be a positive number"),
], ids=lambda v: v.__name__.split(".")[-1] if hasattr(v, "__name__") else " ".join(v) if isinstance(v, list) else "")
def test_mistakes_are_found_before_any_swarm(entry, overrides, match, tmp_path, no_swarm):
    config, groups = {train: ("config", None), generate: ("generate", None),
                      eval_entry: ("eval", eval_entry.GROUPS)}[entry]
    if entry is not generate:
        overrides = [*overrides, f"output_dir={tmp_path}"]
    if entry is train and not any(o.startswith("logger") for o in overrides):
        overrides = [*overrides, "logger=none"]
    with hydra_context(groups):
        cfg = compose(config, overrides=overrides)
    with pytest.raises(UserError, match=match):
        entry.run(cfg)


@pytest.mark.parametrize("entry,recipe,row,match", [
    (train, "tiny_chat", {"messages": [{"role": "user", "content": "hi"}, {"content": "hello"}]},
     r"data: row 1 of split 'train': messages\[1\] has no 'role' \(data.format=messages\)"),
    (train, "tiny_dpo", {"prompt": "hi", "chosen": "hello"}, "data: row 1 of split 'train': no 'rejected'"),
    (eval_entry, "tiny_dpo", {"prompt": "hi", "chosen": "hello"}, "row 1 of split 'train': no 'rejected'"),
], ids=["messages", "preference", "eval"])
def test_malformed_rows_are_found_before_any_swarm(entry, recipe, row, match, tmp_path, no_swarm):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]} \
        if recipe == "tiny_chat" else {"prompt": "hi", "chosen": "hello", "rejected": "bye"}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    config, groups = ("config", None) if entry is train else ("eval", eval_entry.GROUPS)
    overrides = [f"recipe={recipe}", f"data.path={data}", f"output_dir={tmp_path}"]
    with hydra_context(groups):
        cfg = compose(config, overrides=overrides + (["logger=none"] if entry is train else []))
    with pytest.raises(UserError, match=match):
        entry.run(cfg)


def test_a_malformed_row_is_told_in_a_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    outcome = run("swarmtune.train", "recipe=tiny_dpo", f"data.path={data}", f"hydra.run.dir={tmp_path}")
    told = [line for line in outcome.error_lines if "examples/s" not in line]  # datasets' progress of the load
    assert outcome.returncode == 2 and "Traceback" not in outcome.stderr and not outcome.started_swarm, outcome
    assert told == ["error: data: row 0 of split 'train': no 'rejected' (data.format=preference)"], outcome.stderr


def test_a_swarm_nobody_answers_for(tmp_path):
    """Where nobody listens: one line saying so, within the daemon's startup time, not a traceback."""
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{PEERS[0].rsplit('/', 1)[-1]}"
    assert_told(run("swarmtune.swarm", "status", "--initial-peers", addr, "--timeout", "60"),
                "none of the initial peers answered", addr)


def test_tracebacks_on_request(tmp_path):
    debug = run("swarmtune.swarm", "status", "--initial-peers", BAD_ADDR, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and BAD_ADDR in debug.stderr
    full = run("swarmtune.train", "trainer.max_steps=-5", f"hydra.run.dir={tmp_path}", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "max_steps" in full.stderr
    assert not full.started_swarm
