"""The OpenAI-compatible server, with the official `openai` client, over a real loopback swarm.

The app is built by `swarmtune.serve.build` from the Hydra config, as the command builds it, and
served by uvicorn in a thread on 127.0.0.1. Tokens are compared with `SwarmForCausalLM.generate`
on the same swarm. The last test SIGKILLs a server: it runs after the others.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from swarmtune import launch, serve
from swarmtune.adapters import peft_format
from swarmtune.client.config import ClientConfig
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.models import load_config
from swarmtune.swarm import LocalSwarm, ManagedProcess
from tests.test_export import random_lora

PROMPTS = ["Question: what do bees make? Answer:", "A cat", "The quick brown fox jumps over the lazy dog, then it",
           "Honey", "Bees make honey from the nectar of many flowers", "Q:", "Why", "Flowers and bees and"]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    config = load_config(tiny_llama)
    made = {}
    for name, seed in (("bees", 1), ("hosted", 2)):
        made[name] = peft_format.save_adapter(str(root / name), config, tiny_llama,
                                              lora=random_lora(config, seed=seed))
    return made


@pytest.fixture(scope="module")
def swarm(tiny_llama, adapters):
    """Two servers splitting the model, one holding all of it and hosting `hosted`, one hosting `partial` on 0:3."""
    per_server = [{}, {}, {"adapters": f"hosted={adapters['hosted']}"},
                  {"adapters": f"partial={adapters['hosted']}"}]
    with LocalSwarm(tiny_llama, spans=[(0, 3), (3, 6), (0, 6), (0, 3)], per_server=per_server) as s:
        yield s


@pytest.fixture(scope="module")
def served(swarm, adapters, tiny_llama):
    """(base url, engine) of the app `python -m swarmtune.serve` would run for this swarm."""
    overrides = [f"model.path={tiny_llama}", f"swarm.initial_peers=[{','.join(swarm.initial_peers)}]",
                 f"adapters={{bees: {adapters['bees']}}}", "batching.max_rows=4"]  # 8 requests reuse rows
    with launch.composed("serve", overrides) as cfg, contextlib.ExitStack() as stack:
        app, engine = serve.build(stack, cfg)
        sock = socket.create_server(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        _wait_for_adapter(engine, "hosted")
        try:
            yield url, engine
        finally:
            server.should_exit = True
            thread.join(15)
            sock.close()


def _wait_for_adapter(engine, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while name not in engine.hosted_adapters() and time.monotonic() < deadline:
        engine.connection.refresh()
        time.sleep(0.5)
    assert name in engine.hosted_adapters()


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(served, tiny_llama, adapters):
    """generate(prompt, n, adapter=None|"bees"|"hosted") -> the completion SwarmForCausalLM.generate gives."""
    engine = served[1]
    tokenizer = engine.tokenizer
    models = {}

    def generate(prompt: str, max_tokens: int, adapter: str | None = None) -> str:
        if adapter not in models:
            config = ClientConfig(initial_peers=engine.connection.config.initial_peers)
            model = SwarmForCausalLM.from_pretrained(tiny_llama, client_config=config,
                                                     adapter=adapters["bees"] if adapter == "bees" else None,
                                                     active_adapter="hosted" if adapter == "hosted" else None)
            models[adapter] = model
        inputs = tokenizer([prompt], return_tensors="pt")
        out = models[adapter].generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    yield generate
    for model in models.values():
        model.close()


def test_models_lists_base_and_adapters(client, served):
    names = [m.id for m in client.models.list().data]
    assert names[0] == served[1].base_name
    assert {"bees", "hosted", "partial"} <= set(names)


def test_greedy_completion_equals_generate(client, served, reference):
    name = served[1].base_name
    for prompt in PROMPTS[:3]:
        reply = client.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0)
        assert reply.choices[0].text == reference(prompt, 10)
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert reply.usage.prompt_tokens == len(served[1].tokenizer(prompt)["input_ids"])
    ids = served[1].tokenizer(PROMPTS[0])["input_ids"]  # token ids as the prompt
    assert client.completions.create(model=name, prompt=ids, max_tokens=10, temperature=0).choices[0].text \
        == reference(PROMPTS[0], 10)


def test_streamed_chat_equals_whole(client, served):
    name = served[1].base_name
    for question in ("What do bees make?", "hi", "Tell me about flowers.", "Why?"):  # one the random model answers
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
        whole = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        if whole.choices[0].message.content:
            break
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with httpx.stream("POST", f"{served[0]}/v1/completions", timeout=60,
                      json={"model": name, "prompt": "Bees", "max_tokens": 4, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_adapters_give_their_own_tokens(client, reference):
    prompt = PROMPTS[0]
    for adapter in ("bees", "hosted"):
        text = client.completions.create(model=adapter, prompt=prompt, max_tokens=10, temperature=0).choices[0].text
        assert text == reference(prompt, 10, adapter)
    assert reference(prompt, 10, "bees") != reference(prompt, 10)


def test_sampling_seed_stop_n_and_logprobs(client, served, reference):
    name = served[1].base_name
    kwargs = dict(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0.9, top_p=0.9, n=2)
    first = client.completions.create(seed=3, **kwargs)
    again = client.completions.create(seed=3, **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices] and len(first.choices) == 2
    greedy = reference(PROMPTS[0], 10)
    stop = greedy[3:6]
    cut = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.find(stop)] and cut.choices[0].finish_reason == "stop"
    scored = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=2)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(len(top) == 2 for top in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and lp.token_logprobs[0] == max(lp.top_logprobs[0].values())
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0, logprobs=True, top_logprobs=3)
    assert len(chat.choices[0].logprobs.content) == 2 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 3


def test_errors_in_openai_format(client, served):
    name, engine = served[1].base_name, served[1]
    cases = [(openai.NotFoundError, dict(model="nope", prompt="x"), "model_not_found"),
             (openai.BadRequestError, dict(model=name, prompt="x", temperature=5), None),
             (openai.BadRequestError, dict(model=name, prompt="x", extra_body={"best_of": 3}), None),
             (openai.BadRequestError, dict(model=name, prompt="x", max_tokens=10**6), "context_length_exceeded"),
             (openai.BadRequestError, dict(model=name, prompt=[10**9]), None)]
    for error, kwargs, code in cases:
        with pytest.raises(error) as e:
            client.completions.create(**kwargs)
        body = e.value.body
        assert body["message"] and "Traceback" not in body["message"], body
        assert code is None or body["code"] == code
    with pytest.raises(openai.APIStatusError) as e:  # blocks 3:6 host no `partial`
        client.completions.create(model="partial", prompt="x", max_tokens=2)
    assert e.value.status_code == 503 and "block" in e.value.body["message"], e.value.body
    template, engine.tokenizer.chat_template = engine.tokenizer.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    finally:
        engine.tokenizer.chat_template = template
    r = httpx.post(f"{served[0]}/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_api_key_is_enforced(served):
    url, engine = served
    engine.api_key = "sekret"
    try:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert right.models.list().data
    finally:
        engine.api_key = None


def test_concurrent_requests_share_steps_and_equal_lone_results(client, served):
    name, engine = served[1].base_name, served[1]
    lengths = [6, 9, 12, 7, 10, 8, 11, 5]
    lone = [client.completions.create(model=name, prompt=p, max_tokens=n, temperature=0).choices[0].text
            for p, n in zip(PROMPTS, lengths)]
    batcher = engine.batchers[name]
    steps = batcher.steps
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.completions.create, model=name, prompt=p, max_tokens=n, temperature=0)
                   for p, n in zip(PROMPTS, lengths)]
        together = [f.result().choices[0].text for f in futures]
    assert together == lone  # rows handed from finished requests to waiting ones hide what they saw
    assert batcher.steps - steps < sum(lengths) / 2  # one batched step serves many requests


def test_stream_survives_a_killed_server(client, served, swarm, reference):
    """SIGKILL the server under a stream: the session moves to the others and the text is the same."""
    name, engine = served[1].base_name, served[1]
    expected = reference(PROMPTS[2], 40)
    stream = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=40, temperature=0, stream=True)
    text, killed = "", None
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        if killed is None and len(text) > 3:
            session = engine.batchers[name].session
            peer = session.spans[0].hop.peer_id
            killed = next(s for s in swarm.servers if s.peer_id == peer)
            killed.kill()
    assert killed is not None and killed.proc.wait(10) is not None
    assert text == expected
    assert engine.batchers[name].session is None or engine.batchers[name].session.recoveries


def test_entry_point_serves_and_reports_mistakes(swarm, tmp_path):
    args = [sys.executable, "-m", "swarmtune.serve", f"swarm.initial_peers=[{','.join(swarm.initial_peers)}]",
            f"model.path={swarm.model}", "port=0", f"hydra.run.dir={tmp_path}/run"]
    process = ManagedProcess(args, str(tmp_path / "serve.log"))
    try:
        deadline = time.monotonic() + 90
        while not any(line.startswith("Serving ") for line in process.lines) and time.monotonic() < deadline:
            assert process.proc.poll() is None, process.tail()
            time.sleep(0.2)
        line = next(line for line in process.lines if line.startswith("Serving "))
        url = line.split(" at ", 1)[1].split("/v1", 1)[0]
        assert httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
        assert "<html" in httpx.get(url, timeout=30).text.lower()
        busy = url.rsplit(":", 1)[1]
        taken = ManagedProcess([*args[:-2], f"port={busy}", f"hydra.run.dir={tmp_path}/run2"],
                               str(tmp_path / "busy.log"))
        try:
            assert taken.proc.wait(60) != 0
            taken._reader.join(10)
        finally:
            taken.stop()
        lines = [x for x in taken.lines if x.strip()]
        assert len(lines) <= 2 and "port" in lines[-1] and "Traceback" not in "\n".join(lines), lines
    finally:
        process.stop()
