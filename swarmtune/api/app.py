"""The OpenAI-compatible app: /v1/models, /v1/completions, /v1/chat/completions, over continuous batching.

Each request's choices become `Sequence`s of the `Batcher` of the model it names; their tokens
come back on the event loop, are decoded into text (held back while they might start a stop
sequence) and answered whole or streamed as server-sent events in OpenAI's chunk format.
Every error is OpenAI's error JSON with its status: 400 bad parameters, 401 wrong key, 404
unknown model, 503 blocks without servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from swarmtune.api.batching import Batcher, Sampling, Sequence, Token, Variant
from swarmtune.api.protocol import APIError, ChatRequest, CompletionRequest
from swarmtune.client.routing import NoServersError

logger = logging.getLogger(__name__)


class Engine:
    """The model, its tokenizer and one batcher per variant (made on first use)."""

    def __init__(self, model, tokenizer, base_name: str, adapters: dict[str, Variant], api_key: str | None = None,
                 max_rows: int = 16, max_length: int = 2048, draft=None):
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

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()


class _Stream:
    """One choice's tokens as they come, turned into text that stops at a stop sequence."""

    def __init__(self, engine: Engine, index: int, stops: list[str], loop: asyncio.AbstractEventLoop):
        self.engine, self.index, self.stops = engine, index, stops
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = loop
        self.tokens: list[Token] = []
        self.text = ""           # what has been given out
        self.given = 0           # tokens given out with it
        self.finish: str | None = None

    def emit(self, event) -> None:  # the batching thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next_text(self, sequence: Sequence) -> tuple[str, list[Token]] | None:
        """New text and the tokens behind it; None when the choice has ended (`finish` says why)."""
        if self.finish is not None:
            return None
        event = await self.queue.get()
        if isinstance(event, Exception):
            raise event
        if isinstance(event, str):
            self.finish = event
            return self._flush()
        self.tokens.append(event)
        full = self._decoded()
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            sequence.cancel()
            self.finish = "stop"
            return self._take(full[:cut])
        return self._take(full[:len(full) - self._held_back(full)])

    def _held_back(self, full: str) -> int:
        """Characters that may yet become a stop sequence or a whole character."""
        partial = len(full) - len(full.rstrip("\ufffd"))
        return max([partial, *(k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k]))])

    def _decoded(self) -> str:
        return self.engine.tokenizer.decode([t.id for t in self.tokens], skip_special_tokens=True)

    def _flush(self) -> tuple[str, list[Token]]:
        return self._take(self._decoded())

    def _take(self, text: str) -> tuple[str, list[Token]]:
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = max(self.text, text, key=len)
        pending, self.given = self.tokens[self.given:], len(self.tokens)
        return delta, pending


def make_app(engine: Engine, extra_routers: tuple = ()) -> FastAPI:
    app = FastAPI(title="swarmtune", docs_url=None, redoc_url=None)
    app.state.engine = engine
    for router in extra_routers:
        app.include_router(router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

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
        if engine.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {engine.api_key}".encode()):
                error = APIError(401, "Incorrect API key provided", type="authentication_error",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        names = [*engine.variants, *[a for a in engine.hosted_adapters() if a not in engine.variants]]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": engine.created,
                                            "owned_by": "swarmtune",
                                            "root": engine.base_name, "parent": None if n == engine.base_name
                                            else engine.base_name} for n in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [_encode(engine, p) for p in body.prompts()]
        logprobs = body.logprobs
        return await _respond(engine, body, prompts, body.max_tokens or 16, logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        prompt = _chat_prompt(engine, body)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        limit = body.limit() or max(1, engine.max_length - len(prompt))
        return await _respond(engine, body, [prompt], limit, logprobs, chat=True)

    return app


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


async def _respond(engine: Engine, body, prompts: list[list[int]], limit: int, logprobs: int | None, chat: bool):
    batcher = engine.batcher(body.model)
    engine.check_coverage(body.model)
    loop = asyncio.get_running_loop()
    streams, sequences = [], []
    for prompt in prompts:
        for i in range(body.n):
            stream = _Stream(engine, len(streams), body.stops(), loop)
            seed = body.seed + i if body.seed is not None else None
            sampling = Sampling(limit, body.temperature, body.top_p, seed, logprobs)
            sequences.append(Sequence(prompt, sampling, engine.eos, stream.emit))
            streams.append(stream)
    try:
        for seq in sequences:
            batcher.submit(seq)
    except ValueError as e:
        for seq in sequences:
            seq.cancel()
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    kind = "chat.completion" if chat else "text_completion"
    reply = _Reply(engine, body.model, kind, prompts, body.n, streams, sequences, logprobs)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(reply.events(usage), media_type="text/event-stream")
    try:
        return await reply.whole()
    finally:
        for seq in sequences:
            seq.cancel()


class _Reply:
    """One request's answer: whole, or as server-sent events."""

    def __init__(self, engine: Engine, model: str, kind: str, prompts: list[list[int]], n: int,
                 streams: list[_Stream], sequences: list[Sequence], logprobs: int | None):
        self.engine, self.model, self.kind, self.prompts, self.n = engine, model, kind, prompts, n
        self.streams, self.sequences, self.logprobs = streams, sequences, logprobs
        self.chat = kind == "chat.completion"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(s.tokens) for s in self.streams)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self) -> dict:
        try:
            await asyncio.gather(*[self._collect(s, q) for s, q in zip(self.streams, self.sequences)])
        except NoServersError as e:
            raise APIError(503, str(e), type="service_unavailable", code="no_coverage") from None
        except RuntimeError as e:
            raise APIError(503, f"the swarm failed this request: {e}", type="service_unavailable") from None
        choices = [self._choice(s, s.text, s.tokens, s.finish) for s in self.streams]
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    async def _collect(self, stream: _Stream, sequence: Sequence) -> None:
        while await stream.next_text(sequence) is not None:
            pass

    async def events(self, usage: bool) -> AsyncIterator[str]:
        """SSE: one chunk per choice per new text, then each choice's finish, then [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(stream: _Stream, sequence: Sequence) -> None:
            try:
                if self.chat:
                    await queue.put(self._chunk(stream, {"role": "assistant", "content": ""}, [], None))
                while (got := await stream.next_text(sequence)) is not None:
                    text, tokens = got
                    if text or (tokens and self.logprobs is not None):
                        await queue.put(self._chunk(stream, text, tokens, None))
                await queue.put(self._chunk(stream, "", [], stream.finish))
            except Exception as e:
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(s, q)) for s, q in zip(self.streams, self.sequences)]
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
        """OpenAI's logprobs object for these tokens: chat's `content` list, or the completions' columns."""
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
        offsets = [sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{decode([i]): lp for i, lp in t.top} for t in tokens] if self.logprobs else None,
                "text_offset": offsets}
