"""The OpenAI-compatible server, with the official `openai` client, over a real loopback swarm.

The app is built by `swarmtune.serve.build` from the Hydra config, as the command builds it, and
served by uvicorn in a thread on 127.0.0.1. Tokens are compared with `SwarmForCausalLM.generate`
on the same swarm. The last test SIGKILLs a server: it runs after the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from swarmtune import launch, serve
from swarmtune.adapters import peft_format
from swarmtune.api.limits import uvicorn_config
from swarmtune.api.protocol import APIError
from swarmtune.api.text import StopCutter
from swarmtune.client.config import ClientConfig
from swarmtune.client.model import SwarmForCausalLM
from swarmtune.local_swarm import LocalSwarm, ManagedProcess
from swarmtune.models import load_config
from tests.helpers import reference_model
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


@contextlib.contextmanager
def serving(overrides: list[str]):
    """(base url, engine) of the app `python -m swarmtune.serve` would run with these overrides, under uvicorn
    configured as the command configures it (its limits and timeouts), in a thread."""
    with contextlib.ExitStack() as stack:
        with launch.composed("serve", overrides) as cfg:  # left at once: another app may be composed meanwhile
            app, engine = serve.build(stack, cfg)
        sock = socket.create_server(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn_config(app, engine.limits))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
        finally:
            server.should_exit = True
            thread.join(15)
            sock.close()


@pytest.fixture(scope="module")
def served(swarm, adapters, tiny_llama):
    """(base url, engine) of the app `python -m swarmtune.serve` would run for this swarm."""
    overrides = [f"model.path={tiny_llama}", f"swarm.initial_peers=[{','.join(swarm.initial_peers)}]",
                 f"adapters={{bees: {adapters['bees']}}}", "batching.max_rows=4"]  # 8 requests reuse rows
    with serving(overrides) as (url, engine):
        _wait_for_adapter(engine, "hosted")
        yield url, engine


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


# ---- in the open: attackers beside a legitimate client, through the real HTTP stack ----------------------

LIMITS = ["limits.per_client=2", "limits.max_sequences=4", "limits.max_choices=2", "limits.max_request_tokens=600",
          "limits.max_body_kb=64", "limits.header_timeout_s=1", "limits.body_timeout_s=2", "limits.keep_alive_s=1"]


@pytest.fixture(scope="module")
def guarded(swarm, tiny_llama):
    """(url, engine) of a server with small limits, whose model never ends a sequence early (no EOS)."""
    overrides = [f"model.path={tiny_llama}", f"swarm.initial_peers=[{','.join(swarm.initial_peers)}]",
                 "batching.max_rows=4", *LIMITS]
    with serving(overrides) as (url, engine):
        engine.eos = set()
        yield url, engine


def legit(url: str, name: str) -> httpx.Response:
    """A legitimate request, from another address (127.0.0.2) than the attackers'."""
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60) as c:
        began = time.monotonic()
        r = c.post(f"{url}/v1/completions", json={"model": name, "prompt": "Bees", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None, r.text
        assert time.monotonic() - began < 30
        return r


def idle(engine, timeout: float = 5.0) -> None:
    """Every row free, nothing admitted: what a hung-up client held is let go."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [s for b in engine.batchers.values() for s in b.rows if s is not None]
        if not rows and engine.admission.in_flight == 0 and not engine.replies:
            return
        time.sleep(0.05)
    raise AssertionError(f"still held after {timeout} s: {len(rows)} rows, {engine.admission.in_flight} admitted")


def test_hung_up_requests_leave_the_batch_and_clients_are_bounded(guarded):
    """Long requests (streaming or not) whose client hangs up free their rows at the next step; a client's third
    sequence in flight is a 429 with Retry-After, another client still gets through."""
    url, engine = guarded
    name = engine.base_name
    body = {"model": name, "prompt": "Honey", "max_tokens": 500, "temperature": 1, "seed": 1}
    with httpx.Client(timeout=60) as c:
        long_stream = c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True})
        lines = long_stream.__enter__().iter_lines()  # kept: a dropped iterator would hang up at once
        assert next(lines)  # generating
        with ThreadPoolExecutor(1) as pool:
            # gives up after 2 s: 500 tokens take longer even on quiet cores (3 s was not always)
            whole = pool.submit(lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=2))
            deadline = time.monotonic() + 10
            while engine.admission.in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            third = c.post(f"{url}/v1/completions", json=body)
            assert third.status_code == 429 and third.headers["retry-after"].isdigit(), third.text
            assert "at most 2" in third.json()["error"]["message"]
            legit(url, name)
            with pytest.raises(httpx.TimeoutException):  # the client gives up and hangs up
                whole.result()
        long_stream.__exit__(None, None, None)  # hangs up mid-stream
    idle(engine)
    # two sequences hung up on (per_client): this client waits for them to age out, the other does not
    again = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert again.status_code == 429 and "hung up on 2 sequences" in again.json()["error"]["message"], again.text
    legit(url, name)
    engine.admission.hangups.clear()  # rather than wait 10 s
    too_many = httpx.post(f"{url}/v1/completions", json={**body, "n": 3}, timeout=30)
    assert too_many.status_code == 400 and "at most 2" in too_many.json()["error"]["message"]
    too_long = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 400, "n": 2}, timeout=30)
    assert too_long.status_code == 400 and "600" in too_long.json()["error"]["message"]


def test_admission_counts_hang_ups_for_a_while(monkeypatch):
    """A client's sequences hung up on count against it for HANGUP_WINDOW_S; those it finished never do."""
    from swarmtune.api import limits

    now = [100.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: now[0])
    admission = limits.Admission(per_client=3, total=8)
    admission.take("a", 3)(0)  # finished: no charge
    admission.take("a", 2)(2)
    admission.take("a", 3)(1)  # three hung up on: the next is refused, another client's is not
    with pytest.raises(APIError) as refused:
        admission.take("a", 1)
    assert refused.value.status == 429 and "hung up on 3" in refused.value.message
    admission.take("b", 3)(0)
    now[0] += limits.HANGUP_WINDOW_S + 0.1
    admission.take("a", 3)(0)
    assert admission.in_flight == 0 and not admission.by_client and not admission.hangups


def test_stop_bombs_are_refused_and_stop_matching_holds_back_little(guarded):
    url, engine = guarded
    name = engine.base_name
    for stop, status in ((["x" * 120_000] * 4, 413), (["x" * 20_000], 400), (["a", "b", "c", "d", "e"], 400)):
        began = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "Bees", "stop": stop}, timeout=30)
        assert r.status_code == status and ("stop" in r.json()["error"]["message"] or status == 413), r.text
        assert time.monotonic() - began < 5
    stops = ["ab" * 128, "b" * 256, "q" * 256, "z" * 255 + "y"]  # each as long as allowed
    cutter = StopCutter(stops)
    given = "".join(cutter.feed(piece) for piece in ["ab", "b", "zzz", "bb"] * 5_000)
    assert len(cutter.held) < 256 and not cutter.stopped and len(given) + len(cutter.held) == 5_000 * 8
    r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "Bees", "stop": stops, "max_tokens": 30},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30
    legit(url, name)


def test_body_bombs_are_413_before_reading(guarded):
    """Above limits.max_body_kb: a declared length is refused unread; a chunked body as soon as it passes the
    limit; a body that does not arrive in time is a 408. Nothing of them is kept."""
    url, engine = guarded
    process = psutil.Process()
    before = process.memory_info().rss
    prompt = "bee " * 2_000_000  # 8 MB
    payload = json.dumps({"model": engine.base_name, "prompt": prompt}).encode()
    for _ in range(3):
        began = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", content=payload, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and "64 KiB" in r.json()["error"]["message"], r.text
        assert time.monotonic() - began < 5
        with contextlib.suppress(httpx.TransportError):  # the server may close before the sender is done
            r = httpx.post(f"{url}/v1/completions", content=_chunks(payload), timeout=30,
                           headers={"content-type": "application/json"})
            assert r.status_code == 413, r.text
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\":")
        s.settimeout(10)
        assert b" 408 " in s.recv(4096).split(b"\r\n", 1)[0]
    legit(url, engine.base_name)
    del payload, prompt
    assert process.memory_info().rss - before < 64 * 2**20


def _chunks(data: bytes, size: int = 1 << 16):
    """A body without Content-Length (chunked)."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_slow_headers_are_cut_off(guarded):
    """Connections that trickle their headers are closed after limits.header_timeout_s (1 s here)."""
    url, engine = guarded
    port = int(url.rsplit(":", 1)[1])
    conns = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        conns.append(s)
    began, closed = time.monotonic(), set()
    try:
        while len(closed) < len(conns) and time.monotonic() - began < 6:
            for i, s in enumerate(conns):
                if i in closed:
                    continue
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                    s.setblocking(False)
                    if s.recv(1) == b"":
                        closed.add(i)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    closed.add(i)
                finally:
                    s.setblocking(True)
            time.sleep(0.2)
        legit(url, engine.base_name)
        assert len(closed) == len(conns), f"{len(conns) - len(closed)} slow-header connections still open after 6 s"
    finally:
        for s in conns:
            s.close()


def test_api_key_guards_every_route_and_nothing_names_a_local_path(guarded, tiny_llama):
    url, engine = guarded
    engine.api_key = "sekret"
    try:
        for path in ("/", "/api/swarm", "/metrics", "/v1/models", "/openapi.json"):
            r = httpx.get(url + path, timeout=30)
            assert r.status_code == 401, (path, r.status_code)
            assert tiny_llama not in r.text and "peer" not in r.text.lower()
        assert "API key" in httpx.get(url + "/", timeout=30).text  # the page asks for it
        auth = {"Authorization": "Bearer sekret"}
        page = httpx.get(url + "/?key=sekret", timeout=30)
        assert page.status_code == 200 and 'class="block"' in page.text and "loading" not in page.text
        assert httpx.get(url + "/?key=guess", timeout=30).status_code == 401
        state = httpx.get(url + "/api/swarm", headers=auth, timeout=30)
        metrics = httpx.get(url + "/metrics", headers=auth, timeout=30)
        models = httpx.get(url + "/v1/models", headers=auth, timeout=30)
        assert state.status_code == metrics.status_code == models.status_code == 200
        for r in (page, state, models):
            assert os.path.dirname(tiny_llama) not in r.text, r.text[:500]
        assert models.json()["data"][0]["id"] == os.path.basename(tiny_llama)
    finally:
        engine.api_key = None


def test_seed_beyond_int64_is_a_400(guarded):
    url, engine = guarded
    for seed in (2**63, -(2**63) - 1, 10**30):
        r = httpx.post(f"{url}/v1/completions", json={"model": engine.base_name, "prompt": "x", "seed": seed},
                       timeout=30)
        assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/completions", timeout=30,
                   json={"model": engine.base_name, "prompt": "x", "seed": 2**63 - 1, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_echo_logprobs_equal_the_local_model(served, tiny_llama):
    """echo + logprobs: the prompt's tokens with their logprobs (the first null), as a local fp32 model gives
    them, with max_tokens 0 (the prompt alone) and 1 (lm-eval's loglikelihood request)."""
    url, engine = served
    tokenizer = engine.tokenizer
    ref = reference_model(tiny_llama)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    for max_tokens in (0, 1):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": engine.base_name, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0})
        assert r.status_code == 200, r.text
        for choice, ids in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), prompts):
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(ids) + max_tokens
            assert choice["text"].startswith(tokenizer.decode(ids, skip_special_tokens=True))
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            with torch.no_grad():
                local = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
            expected = [float(local[i - 1, ids[i]]) for i in range(1, len(ids))]
            assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:len(ids)], expected)) < 1e-4
            for i in range(1, len(ids)):  # the top alternative is the local argmax's logprob
                assert abs(max(lp["top_logprobs"][i].values()) - float(local[i - 1].max())) < 1e-4
    r = httpx.post(f"{url}/v1/completions", timeout=30, json={"model": engine.base_name, "prompt": "x",
                                                               "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]


def test_streamed_echo_sends_the_prompt_first(served):
    """stream + echo: each choice's first chunk is its prompt (with its logprobs, if asked), then the generated
    text; joined, the chunks are the whole answer's text and logprobs."""
    url, engine = served
    body = {"model": engine.base_name, "prompt": PROMPTS[:2], "echo": True, "temperature": 0, "n": 1}
    for extra in ({"max_tokens": 5}, {"max_tokens": 5, "logprobs": 1}, {"max_tokens": 0, "logprobs": 1}):
        whole = httpx.post(f"{url}/v1/completions", timeout=60, json={**body, **extra})
        assert whole.status_code == 200, whole.text
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={**body, **extra, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            events = [line[6:] for line in r.iter_lines() if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        for choice in whole.json()["choices"]:
            mine = [c for c in chunks if c["index"] == choice["index"]]
            prompt = PROMPTS[choice["index"]]
            assert mine[0]["text"] == engine.tokenizer.decode(engine.tokenizer(prompt)["input_ids"],
                                                              skip_special_tokens=True) and mine[0]["text"]
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert mine[-1]["finish_reason"] == choice["finish_reason"]
            if "logprobs" in extra:
                streamed = [x for c in mine if c["logprobs"] for x in c["logprobs"]["token_logprobs"]]
                assert streamed == choice["logprobs"]["token_logprobs"]
                assert mine[0]["logprobs"]["token_logprobs"][0] is None
                assert len(mine[0]["logprobs"]["tokens"]) == len(engine.tokenizer(prompt)["input_ids"])
            else:
                assert all(c["logprobs"] is None for c in mine)


def test_metrics_in_prometheus_format(served):
    url, engine = served
    httpx.post(f"{url}/v1/completions", timeout=60, json={"model": engine.base_name, "prompt": "Bees",
                                                          "max_tokens": 3, "temperature": 0})
    text = httpx.get(f"{url}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {s.name: s.value for f in families.values() for s in f.samples}
    assert value["swarmtune_prompt_tokens_total"] > 0 and value["swarmtune_generation_tokens_total"] >= 3
    assert value["swarmtune_time_to_first_token_seconds_count"] >= 1
    assert value["swarmtune_inter_token_latency_seconds_count"] >= 2
    assert value["swarmtune_swarm_blocks"] == 6 and value["swarmtune_swarm_blocks_covered"] == 6
    for gauge in ("swarmtune_requests_running", "swarmtune_requests_waiting", "swarmtune_rows_in_use"):
        assert families[gauge].type == "gauge" and value[gauge] == 0


MC_TASK = """task: swarmtune_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: swarmtune_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_runs_multiple_choice_and_generate_until(served, tiny_llama, tmp_path):
    """lm-evaluation-harness's local-completions against the endpoint: its loglikelihoods equal the local fp32
    model's, its generations the swarm's greedy ones."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    url, engine = served
    questions = [{"question": "Bees make", "choices": [" honey", " wax", " noise"], "answer": 0},
                 {"question": "The quick brown fox", "choices": [" jumps", " sleeps"], "answer": 1}]
    for name, task, rows in (("mc", MC_TASK, questions), ("gen", GEN_TASK, [{"question": "A cat", "answer": "x"}])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.yaml").write_text(task.format(data=tmp_path / f"{name}.jsonl"))
    args = {"model": engine.base_name, "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": tiny_llama, "max_retries": 1, "num_concurrent": 1}
    results = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                      tasks=["swarmtune_mc", "swarmtune_gen"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    tokenizer, ref = engine.tokenizer, reference_model(tiny_llama)

    def loglikelihood(context: str, continuation: str) -> float:  # as lm-eval encodes the pair
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(ref(torch.tensor([whole])).logits[0].float(), -1)
        return sum(float(logprobs[i - 1, whole[i]]) for i in range(start, len(whole)))

    samples = results["samples"]["swarmtune_mc"]
    assert len(samples) == 2 and sum(len(s["arguments"]) for s in samples) == 5
    for sample in samples:
        for (context, continuation), (got, _) in zip(sample["arguments"], sample["filtered_resps"]):
            assert abs(got - loglikelihood(context, continuation)) < 1e-4, (context, continuation)
    generated = results["samples"]["swarmtune_gen"][0]["resps"][0][0]
    direct = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": engine.base_name, "prompt": tokenizer("A cat", add_special_tokens=False)["input_ids"],
        "max_tokens": 8, "temperature": 0, "stop": ["\n"]}).json()["choices"][0]["text"]
    assert generated == direct


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
