"""The OpenAI-compatible app: /v1/models, /v1/completions, /v1/chat/completions, over continuous batching.

Each request's choices become `Sequence`s of the `Batcher` of the model it names; their tokens
come back on the event loop, are decoded into text (held back while they might start a stop
sequence) and answered whole or streamed as server-sent events in OpenAI's chunk format.
Every error is OpenAI's error JSON with its status: 400 bad parameters, 401 wrong key, 404
unknown model, 408 a body too slow, 413 a body too large, 429 too much in flight (Retry-After),
503 blocks without servers. What each request and client may take: `swarmtune.api.limits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from swarmtune.api.batching import Batcher, Sampling, Sequence, Token, Variant
from swarmtune.api.limits import Admission, BodyLimit, EndpointLimits
from swarmtune.api.metrics import Metrics
from swarmtune.api.protocol import APIError, ChatRequest, CompletionRequest
from swarmtune.api.text import Detokenizer, StopCutter
from swarmtune.client.routing import NoServersError

logger = logging.getLogger(__name__)


class Engine:
    """The model, its tokenizer, one batcher per variant (made on first use), and what clients may take."""

    def __init__(self, model, tokenizer, base_name: str, adapters: dict[str, Variant], api_key: str | None = None,
                 max_rows: int = 16, max_length: int = 2048, draft=None, limits: EndpointLimits | None = None):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.draft = draft  # speculative decoding's draft model, shared by every variant's batcher
        self.connection = model.connection
        self.variants = {base_name: Variant(base_name), **adapters}
        self.api_key, self.max_rows, self.max_length = api_key, max_rows, max_length
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.batchers: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self.created = int(time.time())
        self.limits = limits or EndpointLimits()
        self.admission = Admission(self.limits.per_client, self.limits.max_sequences)
        self.replies: set[_Reply] = set()  # admitted and not yet answered or gone
        self.metrics = Metrics(self)

    def hosted_adapters(self) -> list[str]:
        return sorted({a for s in self.connection.view.servers.values() for a in s.adapters})

    def batcher(self, name: str) -> Batcher:
        variant = self.variants.get(name)
        if variant is None and name in self.hosted_adapters():
            variant = Variant(name, hosted=name)
        if variant is None:
            known = ", ".join([*self.variants, *self.hosted_adapters()])
            raise APIError(404, f"The model {name!r} does not exist: this server has {known}", param="model",
                           code="model_not_found")
        with self._lock:
            if name not in self.batchers:
                self.batchers[name] = Batcher(self.connection, self.model.parts, variant, self.max_rows,
                                              self.max_length, self.draft)
            return self.batchers[name]

    def check_coverage(self, name: str) -> None:
        """503 before any work when some block has no server (for a hosted adapter: none hosting it)."""
        variant = self.variants.get(name)
        view = self.connection.view.hosting(variant.hosted if variant else name)
        missing = view.uncovered(0, view.num_blocks, self.connection.bans)
        if missing:
            raise APIError(503, str(NoServersError(missing, self.base_name)), type="service_unavailable",
                           code="no_coverage")

    def admit(self, request: Request, name: str, sequences: int) -> Callable[[int], None]:
        """Before any work: the model exists and is covered, the request is within its limits, and its client's
        and the server's sequences in flight leave room for it (else 429). Returns the release of that room."""
        self.batcher(name)
        self.check_coverage(name)
        if sequences > self.limits.max_choices:
            raise APIError(400, f"this request asks for {sequences} sequences (prompts x n): at most "
                                f"{self.limits.max_choices} per request", param="n")
        client = request.client.host if request.client else "unknown"
        return self.admission.take(client, sequences)

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()


class _Stream:
    """One choice: its tokens turned into text that stops at a stop sequence, in the batching thread (off the
    event loop, a token at a time), handed to the loop as (text, tokens, finish reason or None) pieces."""

    def __init__(self, engine: Engine, index: int, stops: list[str], loop: asyncio.AbstractEventLoop):
        self.engine, self.index, self.loop = engine, index, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.detokenizer = Detokenizer(engine.tokenizer)
        self.cutter = StopCutter(stops)
        self.sequence: Sequence | None = None
        self.tokens: list[Token] = []          # generated (the batching thread's until `finish` is set)
        self.prompt: list[Token] | None = None  # with echo and logprobs: the prompt's tokens, scored
        self.given = 0                         # tokens handed out with text
        self.text = ""                         # the text handed out (the loop's)
        self.finish: str | None = None
        self.started = self.last = time.perf_counter()

    def emit(self, event) -> None:  # the batching thread
        if self.finish is not None:
            return
        try:
            piece = self._piece(event)
        except Exception as e:  # e.g. the tokenizer's: this choice fails, the batch goes on
            self.finish, piece = "error", e
            self.sequence.cancel()
        if piece is not None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)

    def _piece(self, event):
        if isinstance(event, Exception):
            self.finish = "error"
            return event
        if isinstance(event, list):
            self.prompt = event
            return None
        if isinstance(event, str):
            self.finish = event
            return self._take(self.cutter.feed(self.detokenizer.flush(), final=True), event)
        self._timed()
        self.tokens.append(event)
        text = self.cutter.feed(self.detokenizer.add(event.id))
        if self.cutter.stopped:
            self.sequence.cancel()
            self.finish = "stop"
            return self._take(text, "stop")
        return self._take(text, None)

    def _timed(self) -> None:
        now, metrics = time.perf_counter(), self.engine.metrics
        (metrics.itl if self.tokens else metrics.ttft).observe(now - (self.last if self.tokens else self.started))
        metrics.generation_tokens.inc()
        self.last = now

    def _take(self, text: str, finish: str | None) -> tuple[str, list[Token], str | None]:
        tokens, self.given = self.tokens[self.given:], len(self.tokens)
        return text, tokens, finish

    async def next_piece(self) -> tuple[str, list[Token], str | None]:
        """The next text (and the tokens behind it; a finish reason with the last); raises the swarm's error."""
        piece = await self.queue.get()
        if isinstance(piece, Exception):
            raise piece
        self.text += piece[0]
        return piece


def make_app(engine: Engine, extra_routers: tuple = ()) -> FastAPI:
    app = FastAPI(title="swarmtune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    for router in extra_routers:
        app.include_router(router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        if e.status in (413, 429):
            engine.metrics.rejected.labels(str(e.status)).inc()
        if e.status == 429:
            await engine.admission.hold()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # 404 and 405: unknown routes and methods
        error = APIError(e.status_code, str(e.detail))
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = "this parameter is not supported"
        param = ".".join(where) or None
        return JSONResponse(APIError(400, f"{param}: {message}" if param else message, param=param).body(),
                            status_code=400)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        logger.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        """With an api_key, every route needs it: the header, or (the page alone) `?key=`, which it then keeps."""
        if engine.api_key and not _has_key(request, engine.api_key):
            if request.url.path == "/" and request.method == "GET":
                return HTMLResponse(KEY_PAGE, status_code=401)
            error = APIError(401, "Incorrect API key provided", type="authentication_error", code="invalid_api_key")
            return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    app.add_middleware(BodyLimit, max_bytes=engine.limits.max_body_kb * 1024, timeout_s=engine.limits.body_timeout_s,
                       refused=lambda status: engine.metrics.rejected.labels(str(status)).inc())

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        names = [*engine.variants, *[a for a in engine.hosted_adapters() if a not in engine.variants]]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": engine.created,
                                            "owned_by": "swarmtune",
                                            "root": engine.base_name, "parent": None if n == engine.base_name
                                            else engine.base_name} for n in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        texts = body.prompts()

        def prepare() -> tuple[list[list[int]], int, int | None]:
            limit = 16 if body.max_tokens is None else body.max_tokens
            return [_encode(engine, p) for p in texts], limit, body.logprobs

        return await _answer(engine, request, body, len(texts) * body.n, prepare, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        def prepare() -> tuple[list[list[int]], int, int | None]:
            prompt = _chat_prompt(engine, body)
            limit = body.limit() or max(1, engine.max_length - len(prompt))
            return [prompt], limit, (body.top_logprobs or 0) if body.logprobs else None

        return await _answer(engine, request, body, body.n, prepare, chat=True)

    return app


async def _answer(engine: Engine, request: Request, body: CompletionRequest | ChatRequest, rows: int,
                  prepare: Callable[[], tuple[list[list[int]], int, int | None]], chat: bool):
    """Admit the request (its rows count toward the client's and the server's limits), then tokenize its prompts
    off the event loop (`prepare`: prompts, token limit, logprobs) and answer. The room is released when the
    answer is whole, or on any error; a stream's, when the stream ends."""
    release = engine.admit(request, body.model, rows)
    try:
        prompts, limit, logprobs = await asyncio.to_thread(prepare)
        return await _respond(engine, request, release, body, prompts, limit, logprobs, chat=chat)
    except BaseException:
        release()
        raise
    finally:
        if not body.stream:
            release()


def _has_key(request: Request, key: str) -> bool:
    expected = f"Bearer {key}".encode()
    given = request.headers.get("authorization", "").encode()
    if secrets.compare_digest(given, expected):
        return True
    query = request.query_params.get("key") if request.url.path == "/" else None
    return query is not None and secrets.compare_digest(f"Bearer {query}".encode(), expected)


# What `/` answers without the key: a form that asks for it once and keeps it for the session (sessionStorage).
KEY_PAGE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>swarmtune: key</title></head>
<body style="font: 14px system-ui, sans-serif; margin: 1.5em">
<form id="form"><label>This server needs its API key: <input id="key" type="password" autofocus></label>
<button>open</button> <span id="why"></span></form>
<script>
"use strict";
const stored = sessionStorage.getItem("swarmtune-key");
if (new URL(location.href).searchParams.has("key")) {
  sessionStorage.removeItem("swarmtune-key");
  document.getElementById("why").textContent = "that key is not right";
} else if (stored) {
  location.replace("?key=" + encodeURIComponent(stored));
}
document.getElementById("form").onsubmit = (e) => {
  e.preventDefault();
  location.replace("?key=" + encodeURIComponent(document.getElementById("key").value));
};
</script></body></html>"""


def _encode(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = engine.tokenizer(prompt)["input_ids"]
    else:
        ids = list(prompt)
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
    if not ids:
        raise APIError(400, "prompt: empty after tokenization", param="prompt")
    return ids


def _chat_prompt(engine: Engine, body: ChatRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"{engine.base_name} has no chat template: use /v1/completions, or start serve "
                            f"with chat_template=FILE", param="messages")
    try:
        text = tokenizer.apply_chat_template(body.template_messages(), add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own complaint (e.g. roles out of order)
        raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None
    return _encode(engine, tokenizer(text, add_special_tokens=False)["input_ids"])


async def _respond(engine: Engine, request: Request, release: Callable[[int], None], body, prompts: list[list[int]],
                   limit: int, logprobs: int | None, chat: bool):
    """Submit the request's sequences; its answer whole (the client gone: its rows freed) or as events."""
    tokens = sum(len(p) + limit for p in prompts) * body.n
    if tokens > engine.limits.max_request_tokens:
        raise APIError(400, f"this request needs {tokens} tokens ((prompt + max_tokens) x n, over its prompts), "
                            f"more than the {engine.limits.max_request_tokens} a request may have: ask for fewer",
                       param="max_tokens", code="context_length_exceeded")
    batcher = engine.batcher(body.model)
    loop = asyncio.get_running_loop()
    echo = getattr(body, "echo", False)
    streams, sequences = [], []
    for prompt in prompts:
        for i in range(body.n):
            stream = _Stream(engine, len(streams), body.stops(), loop)
            seed = body.seed + i if body.seed is not None else None
            sampling = Sampling(limit, body.temperature, body.top_p, seed, logprobs,
                                echo=echo and logprobs is not None)
            stream.sequence = Sequence(prompt, sampling, engine.eos, stream.emit)
            sequences.append(stream.sequence)
            streams.append(stream)
    kind = "chat.completion" if chat else "text_completion"
    reply = _Reply(engine, body.model, kind, prompts, body.n, streams, sequences, logprobs, echo)
    engine.replies.add(reply)

    def cleanup() -> None:
        for seq in sequences:
            seq.cancel()
        engine.replies.discard(reply)
        release(sum(s.finish is None for s in streams) if reply.hung_up else 0)

    try:
        for seq in sequences:
            batcher.submit(seq)
    except ValueError as e:
        cleanup()
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    engine.metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * body.n)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _EventStream(reply.events(usage), cleanup)
    try:
        return await reply.whole(request)
    finally:
        cleanup()


class _EventStream(StreamingResponse):
    """Server-sent events whose `cleanup` runs however the response ends: done, failed, or its client gone
    (even before the first event, when the events' generator never started)."""

    def __init__(self, events: AsyncIterator[str], cleanup: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream")
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cleanup()


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (its body is read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Reply:
    """One request's answer: whole, or as server-sent events."""

    def __init__(self, engine: Engine, model: str, kind: str, prompts: list[list[int]], n: int,
                 streams: list[_Stream], sequences: list[Sequence], logprobs: int | None, echo: bool = False):
        self.engine, self.model, self.kind, self.prompts, self.n = engine, model, kind, prompts, n
        self.streams, self.sequences, self.logprobs, self.echo = streams, sequences, logprobs, echo
        self.chat = kind == "chat.completion"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.hung_up = False  # its client went away before the answer was whole

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts) * self.n
        completion = sum(len(s.tokens) for s in self.streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self, request: Request) -> Response:
        """Every choice's text; if the client hangs up first, the sequences are cancelled (by the caller)."""
        work = asyncio.ensure_future(asyncio.gather(*[self._collect(s) for s in self.streams]))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                self.hung_up = True
                return Response(status_code=499)  # nobody reads it
            work.result()
        except NoServersError as e:
            raise APIError(503, str(e), type="service_unavailable", code="no_coverage") from None
        except RuntimeError as e:
            raise APIError(503, f"the swarm failed this request: {e}", type="service_unavailable") from None
        finally:
            for task in (work, gone):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(work, gone, return_exceptions=True)
        return JSONResponse(await asyncio.to_thread(self._whole_body))  # decoding logprobs' tokens: off the loop

    def _whole_body(self) -> dict:
        choices = []
        for s in self.streams:
            text, tokens = self._echoed(s) if self.echo else ("", [])
            choices.append(self._choice(s, text + s.text, [*tokens, *s.tokens], s.finish))
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def _echoed(self, stream: _Stream) -> tuple[str, list[Token]]:
        """The prompt a choice echoes: its text, and its tokens scored (with logprobs: they come, from the
        batching thread, before any generated token)."""
        prompt = self.prompts[stream.index // self.n]
        return self.engine.tokenizer.decode(prompt, skip_special_tokens=True), stream.prompt or []

    async def _collect(self, stream: _Stream) -> None:
        while (await stream.next_piece())[2] is None:
            pass

    async def events(self, usage: bool) -> AsyncIterator[str]:
        """SSE: one chunk per choice per new text (with echo, the prompt's first, once the first piece of the
        choice came: its tokens are scored by then), then each choice's finish, then [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(stream: _Stream) -> None:
            try:
                if self.chat:
                    await queue.put(self._chunk(stream, {"role": "assistant", "content": ""}, [], None))
                echoed = not self.echo
                while True:
                    text, tokens, finish = await stream.next_piece()
                    if not echoed:  # decoding a long prompt: off the loop
                        await queue.put(await asyncio.to_thread(lambda: self._chunk(stream, *self._echoed(stream),
                                                                                    None)))
                        echoed = True
                    if text or (tokens and self.logprobs is not None):
                        await queue.put(self._chunk(stream, text, tokens, None))
                    if finish is not None:
                        break
                await queue.put(self._chunk(stream, "", [], finish))
            except Exception as e:
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(s)) for s in self.streams]
        self.hung_up = True  # until the last event is out: the client may go at any of them
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    status = 503 if isinstance(item, (NoServersError, RuntimeError)) else 500
                    error = APIError(status, f"the swarm failed this request: {item}", type="service_unavailable")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                else:
                    yield f"data: {json.dumps(item)}\n\n"
            if usage:
                yield f"data: {json.dumps(self._envelope([], usage=self.usage()))}\n\n"
            yield "data: [DONE]\n\n"
            self.hung_up = False
        finally:  # the client went away, or we are done: free the rows
            for seq in self.sequences:
                seq.cancel()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    def _envelope(self, choices: list[dict], **extra) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _chunk(self, stream: _Stream, text: str | dict, tokens: list[Token], finish: str | None) -> dict:
        if self.chat:
            delta = text if isinstance(text, dict) else ({"content": text} if text else {})
            choice = {"index": stream.index, "delta": delta, "logprobs": self._logprobs(tokens),
                      "finish_reason": finish}
        else:
            choice = {"index": stream.index, "text": text, "logprobs": self._logprobs(tokens), "finish_reason": finish}
        return self._envelope([choice])

    def _choice(self, stream: _Stream, text: str, tokens: list[Token], finish: str | None) -> dict:
        if self.chat:
            return {"index": stream.index, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(tokens), "finish_reason": finish}
        return {"index": stream.index, "text": text, "logprobs": self._logprobs(tokens), "finish_reason": finish}

    def _logprobs(self, tokens: list[Token]) -> dict | None:
        """OpenAI's logprobs object for these tokens: chat's `content` list, or the completions' columns
        (an echoed prompt's first token has none: null, as OpenAI's)."""
        if self.logprobs is None:
            return None
        decode = self.engine.tokenizer.decode
        if self.chat:
            def entry(token_id: int, logprob: float) -> dict:
                text = decode([token_id])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                                for t in tokens]}
        texts = [decode([t.id]) for t in tokens]
        offsets = list(itertools.accumulate((len(x) for x in texts[:-1]), initial=0)) if texts else []
        top = [None if t.top is None else {decode([i]): lp for i, lp in t.top} for t in tokens]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": top if self.logprobs else None, "text_offset": offsets}
