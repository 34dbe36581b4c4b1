"""A user's mistake gets one or two lines naming the problem and the fix, a non-zero exit, and no slow work
first: each command below must fail before it starts any swarm process, and show a traceback only when
asked (--debug, HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import contextlib
import json
import socket

import pytest
from hydra import compose

from swarmtune import eval as eval_entry
from swarmtune import generate, launch, swarm, train
from swarmtune.client.connection import SwarmConnection
from swarmtune.errors import UserError
from swarmtune.local_swarm import LocalSwarm
from swarmtune.server.server import ServerConfig, check_span
from swarmtune.tuning import loggers
from tests.helpers import PEERS, Outcome, hydra_context, run

BAD_ADDR = "notamultiaddr"


# Seconds until the error: imports alone take 3-5 s on 2 quiet cores (up to a minute when they are shared with
# other jobs); a swarm's start takes minutes there. What proves "before anything slow" is that nothing started.
SECONDS = 120


def assert_told(outcome: Outcome, *words: str) -> None:
    """Exit status 2, at most two lines on stderr, the first naming words[0], naming each of `words`, no traceback,
    nothing started, and soon."""
    assert outcome.returncode == 2, outcome
    assert 1 <= len(outcome.error_lines) <= 2, outcome.stderr
    assert outcome.error_lines[0].startswith("error: "), outcome.stderr
    assert not words or words[0] in outcome.error_lines[0], outcome.stderr
    assert "Traceback" not in outcome.stderr
    for word in words:
        assert word in outcome.stderr, (word, outcome.stderr)
    assert not outcome.started_swarm
    assert outcome.seconds < SECONDS, outcome


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("module,args,words", [
    ("swarmtune.generate", ["adapter=/nonexistent/adapter"], ["/nonexistent/adapter", "no such directory"]),
    ("swarmtune.eval", ["adapter=/nonexistent/adapter"], ["/nonexistent/adapter", "no such directory"]),
    ("swarmtune.train", ["trainer.max_steps=-5"], ["trainer", "max_steps"]),
    ("swarmtune.train", ["recipe=lora_llama70b"], ["export SWARMTUNE_INITIAL_PEERS=", "swarm.initial_peers="]),
    ("swarmtune.train", ["trainer.max_epoch=1"], ["did you mean trainer.max_epochs=1?"]),
    ("swarmtune.generate", ["prompt=Question:", "what", "do", "bees", "make?"],
     ["quote", 'prompt="Question: what do bees make?"']),
    ("swarmtune.serve", ["adapters=/some/adapter"], ["'adapters={bees: /some/adapter}'"]),
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
    if module.endswith(("train", "eval", "generate", "serve")):  # Hydra apps: their run folders out of the checkout
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


@pytest.mark.parametrize("recipe", ["lora_llama70b", "lora_llama70b_collab"])
def test_peers_from_an_unset_variable_are_told_first(recipe, tmp_path, no_swarm, monkeypatch):
    """The public swarm's peers come from $SWARMTUNE_INITIAL_PEERS: unset, training says how to set it before it
    builds a logger or a trainer (it used to be after 15 s of start-up, in OmegaConf's words)."""
    import lightning

    def too_late(*args, **kwargs):
        raise AssertionError("the logger or trainer was built before the missing variable was found")

    monkeypatch.setattr(loggers, "build_logger", too_late)
    monkeypatch.setattr(lightning.Trainer, "__init__", too_late)
    with hydra_context():
        cfg = compose("config", overrides=[f"recipe={recipe}", f"output_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"^swarm.initial_peers come from the environment variable "
                                        r"SWARMTUNE_INITIAL_PEERS, which is not set: export SWARMTUNE_INITIAL_PEERS="):
        train.run(cfg)


@pytest.mark.parametrize("overrides,match", [
    (["trainer.max_epoch=1"], r"^trainer.max_epoch is not in the config: did you mean trainer.max_epochs=1\?$"),
    (["trainr.max_steps=5"], "did you mean trainer.max_steps=5"),
    (["optim.lr=1e-3", "trainer.max_epoch=1", "trainer.bogus=2"], "did you mean trainer.max_epochs=1"),
    (["trainer.zzz=1"], r"trainer has max_steps, .*: check the name, or add a key the config lacks with \+trainer"),
    (["seed.x=1"], "seed is a value, not a group of settings"),
    (["prompt=Question:", "what", "do", "bees", "make?", "seed=1"],
     r"^'what' is not key=value: quote a value that has spaces, e.g. prompt=\"Question: what do bees make\?\"$"),
])
def test_hydra_mistakes_in_words_that_say_what_to_do(overrides, match):
    config = "generate" if overrides[0].startswith("prompt") else "config"
    launch.register_recipes()
    with pytest.raises(UserError, match=match):
        launch.check_overrides(config, overrides)


def test_what_hydra_accepts_passes_the_check():
    launch.register_recipes()
    launch.check_overrides("config", ["+trainer.deterministic=true", "trainer.max_epochs=1", "recipe=tiny_local"])
    launch.check_command_line("config", ["-m", "optim.lr=1e-3,3e-4"])  # a sweep, checked by Hydra itself
    launch.check_command_line("config", ["--help"])
    with pytest.raises(UserError, match="trainer.max_epochs"):
        launch.check_command_line("config", ["-m", "optim.lr=1e-3,3e-4", "trainer.max_epoch=1"])


@pytest.mark.parametrize("blocks,num_blocks,match", [
    ((0, 999), None, r"^--blocks 0:999: M has 6 blocks \(0:6\): give a span within them$"),
    ((4, 8), None, "--blocks 4:8: M has 6 blocks"),
    (None, 99, r"^--num-blocks 99: M has 6 blocks: give at most 6, or --num-blocks auto$"),
])
def test_server_span_beyond_the_model(blocks, num_blocks, match):
    with pytest.raises(UserError, match=match):
        check_span(ServerConfig(model="M", blocks=blocks, num_blocks=num_blocks), 6)
    check_span(ServerConfig(model="M", blocks=(4, 6)), 6)
    check_span(ServerConfig(model="M", num_blocks=6), 6)


def test_server_blocks_beyond_the_model_before_announcing(tiny_llama):
    outcome = run("swarmtune.server", "--model", tiny_llama, "--new-swarm", "--blocks", "4:8")
    assert_told(outcome, "--blocks 4:8", "has 6 blocks (0:6)")
    assert "MADDR" not in outcome.stdout  # it never joined, let alone announced


@pytest.mark.parametrize("spans,match", [
    ([[4, 8]], r"^swarm.local_spans: \[4, 8\] is not a span of the model's 6 blocks"),
    ([[0, 3], [3, 0]], r"\[3, 0\] is not a span"),
    ([[0, 3]], r"^swarm.local_spans leave block\(s\) 3, 4, 5 of the model's 6 without a server"),
    ([5], "5 is not a span"),
])
def test_local_spans_outside_the_model(spans, match):
    with pytest.raises(UserError, match=match):
        launch.local_spans(spans, 6)


@pytest.mark.parametrize("blocks,expected", [(6, [(0, 2), (2, 4), (4, 6)]), (4, [(0, 1), (1, 3), (3, 4)]),
                                             (2, [(0, 1), (1, 2)]), (80, [(0, 27), (27, 53), (53, 80)])])
def test_no_local_spans_split_the_model(blocks, expected):
    assert launch.local_spans(None, blocks) == expected


def test_swarm_up_and_serve_refuse_spans_outside_the_model(tiny_llama, no_swarm, tmp_path):
    with pytest.raises(UserError, match=r"swarm.local_spans: \[4, 8\] is not a span of the model's 6 blocks"):
        swarm.up([f"model.path={tiny_llama}", "swarm.local_spans=[[4,8]]"])
    with hydra_context():
        cfg = compose("serve", overrides=[f"model.path={tiny_llama}", "swarm.local_spans=[[0,3],[4,8]]"])
    with pytest.raises(UserError, match=r"\[4, 8\] is not a span"), contextlib.ExitStack() as stack:
        launch.open_model(stack, cfg, log_dir=str(tmp_path))


@pytest.mark.parametrize("recipe,format", [("tiny_chat", "messages"), ("tiny_dpo", "preference")])
def test_a_missing_chat_template_is_told_before_any_swarm(recipe, format, tmp_path):
    """Conversations need a chat template: a tokenizer without one is told in a line, before any swarm starts."""
    from swarmtune.tiny_model import train_tokenizer

    tokenizer = train_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert_told(run("swarmtune.train", f"recipe={recipe}", f"model.tokenizer={tmp_path / 'tokenizer'}",
                    f"hydra.run.dir={tmp_path}", unset=("SWARMTUNE_INITIAL_PEERS",)),
                f"data.format={format}", "has no chat template", "data.chat_template=FILE")
