"""`lmforge serve`: an OpenAI-compatible HTTP API and a chat page, on FastAPI + uvicorn.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed
as server-sent events with ``"stream": true``), ``GET /health``, the OpenAPI document at
``/openapi.json`` and the chat page at ``/``. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, so OpenAI's own clients report them.

One worker thread owns the model. Requests wait in a queue; the worker takes up to ``max_batch``
waiting answers (each of a request's ``n`` choices is one row) and decodes them as one
``Decoder`` batch, each row with its own sampling settings and its own random generator, so a
seeded request gives the same text whatever shares its batch. Text goes back to each request's
asyncio queue as it is decided; requests that arrive meanwhile make up the next batch. A client
that goes away ends its rows at the next step.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .chat import Assistant, check_messages
from .config import LmforgeError, SampleConfig
from .generate import Decoder, TextStream, Token, prompt_ids, seeded_generator

MAX_BODY = 1 << 20  # bytes of one request body (a long prompt is far less; a runaway client is refused early)
MAX_CHOICES = 16  # n per request
MAX_ROWS = 64  # answers per request (prompts x n): one request cannot fill the queue
MAX_TOP_LOGPROBS = 20
log = logging.getLogger("lmforge.serve")


# ---------------------------------------------------------------- the worker that owns the model

@dataclass
class Piece:
    """What one row of a batch produced since its last piece: text, the tokens behind it (when
    log-probabilities were asked for) and, on its last piece, why it ended."""

    index: int
    text: str
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    probs: dict[str, float] | None = None  # a classifier's label probabilities


@dataclass
class Failed:
    message: str


class Job:
    """One request on its way through the worker, and the way back to its handler's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Piece | Failed] = asyncio.Queue()
        self.cancelled = False  # set by the handler when its client goes away; read by the worker

    def send(self, event: Piece | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop has closed: nobody is waiting any more
            self.cancelled = True


@dataclass
class Row:
    """One answer to generate: a prompt's ids (or a classifier's text), its settings, its job."""

    index: int
    ids: list[int]
    config: SampleConfig
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely
    text: str = ""
    job: Job = None  # type: ignore[assignment]  # set when the request is submitted
    sent: bool = False  # whether a piece of it has gone out (then it cannot be started again)


class Worker:
    """The thread that runs the model: rows in through a queue, pieces out to each row's job."""

    def __init__(self, assistant: Assistant, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise LmforgeError(f"max_batch must be >= 1, got {max_batch}")
        self.assistant, self.max_batch = assistant, max_batch
        self.queue: queue.Queue[Row | None] = queue.Queue()
        self.stats: Counter[str] = Counter()  # batches, rows, largest_batch, and rows ended per reason
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lmforge-model", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self.queue.put(None)
            thread.join(timeout)

    def submit(self, rows: Sequence[Row]) -> None:
        self.start()
        for row in rows:
            self.queue.put(row)

    def _take(self) -> list[Row | None]:
        """The next batch: wait for one row, then take whatever else is waiting, up to max_batch."""
        rows = [self.queue.get()]
        while rows[-1] is not None and len(rows) < self.max_batch:
            try:
                rows.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return rows

    def _loop(self) -> None:
        while True:
            taken = self._take()
            rows = [r for r in taken if r is not None and not r.job.cancelled]
            if rows:
                self.stats.update(batches=1, rows=len(rows))
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
                self._run(rows)
            if taken[-1] is None:
                return

    def _run(self, rows: list[Row]) -> None:
        """Decode (or classify) a batch. If it fails (a bug, out of memory), the rows that had nothing
        sent yet are tried again one at a time, so that one request's fault fails that request alone;
        a row already partly sent fails with its job."""
        try:
            if self.assistant.template == "classify":
                self._classify(rows)
            else:
                self._decode(rows)
        except Exception as e:  # keep serving the others
            log.exception("generation failed")
            started = {id(r.job) for r in rows if r.sent}
            alone = [r for r in rows if id(r.job) not in started and not r.job.cancelled] if len(rows) > 1 else []
            retried = {id(r.job) for r in alone}
            for job in {id(r.job): r.job for r in rows if id(r.job) not in retried}.values():
                job.cancelled = True  # its rows still waiting are skipped
                job.send(Failed(f"generation failed: {type(e).__name__}: {e}"))
            for row in alone:
                if not row.job.cancelled:  # a row of the same job may have failed alone already
                    self.stats["retried_alone"] += 1
                    self._run([row])

    def _classify(self, rows: list[Row]) -> None:
        from .finetune import label_texts

        a = self.assistant
        for row, (label, _, probs) in zip(rows, label_texts(a.model, a.tokenizer, a.labels, [r.text for r in rows])):
            row.sent = True
            row.job.send(Piece(row.index, label, finish_reason="stop", completion_tokens=1, probs=probs))
            self.stats["stop"] += 1

    def _decode(self, rows: list[Row]) -> None:
        a = self.assistant
        device = next(a.model.parameters()).device
        wanted = [r.logprobs for r in rows if r.logprobs is not None]
        decoder = Decoder(a.model, [r.ids for r in rows], [r.config for r in rows], a.stop_ids,
                          [seeded_generator(r.config.seed, device) for r in rows],
                          logprobs=max(wanted) if wanted else None, compile=a.compile)
        texts = [TextStream(a.tokenizer, r.config.stop) for r in rows]
        held: list[list[Token]] = [[] for _ in rows]  # tokens whose text is still held back
        for step in decoder:
            for i, tok in enumerate(step):
                if tok is not None:
                    self._advance(decoder, i, rows[i], tok, texts[i], held[i])

    def _advance(self, decoder: Decoder, i: int, row: Row, tok: Token, text: TextStream, held: list[Token]) -> None:
        """Hand row i's new token on as text, and end the row on a stop string or a lost client."""
        if row.job.cancelled:
            decoder.finish(i, "cancelled")
            self.stats["cancelled"] += 1
            return
        delta = ""
        if not tok.stop:  # the end token is not part of the answer
            delta = text.push(tok.id)
            if row.logprobs is not None:
                held.append(Token(tok.id, tok.logprob, tok.top[:row.logprobs]))
        if text.stopped:
            decoder.finish(i, "stop")
        reason = "stop" if text.stopped else decoder.finish_reason[i]
        if reason is not None:
            delta += text.close()
            self.stats[reason] += 1
        if delta or reason is not None:
            row.sent = True
            row.job.send(Piece(row.index, delta, list(held), reason, decoder.n_new[i]))
            held.clear()


# ---------------------------------------------------------------- requests (OpenAI's fields)

class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool | None = None


StopText = Annotated[str, Field(max_length=256)]  # each is searched for after every token: keep it short
Stop = StopText | Annotated[list[StopText], Field(max_length=4)] | None


class _Sampling(BaseModel):
    """Fields both endpoints share. Strict: a known field of the wrong type is an error (no "2" for 2);
    unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = Field(None, description="the served model's name (see /v1/models); may be left out")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="answers to generate")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description="up to 4 strings that end the answer (not included)")
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1, description="makes sampling reproducible")


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1, description="longest answer in tokens; null: up to the context")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="log-probabilities of the k most "
                                 "likely tokens at each step")


class ChatRequest(_Sampling):
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="longest answer in tokens; default: up to the context")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (OpenAI's newer name)")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---------------------------------------------------------------- from a request to rows

@dataclass
class Plan:
    """A checked request: its rows (without a job yet) and what its response needs."""

    kind: Literal["chat", "text"]
    rows: list[Row]
    prompt_tokens: int
    prompt_chars: list[int]  # per row: where its text starts (completions' text_offset)
    stream: bool
    include_usage: bool
    logprobs: int | None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _stop_strings(stop: str | list[str] | None, extra: Sequence[str] = ()) -> tuple[str, ...]:
    given = [stop] if isinstance(stop, str) else list(stop or [])
    return tuple(dict.fromkeys(s for s in [*given, *extra] if s))


def _budget(assistant: Assistant, n_prompt: int, max_tokens: int | None, what: str) -> int:
    """Tokens the answer may have: max_tokens, or what the context leaves; too many is OpenAI's error."""
    ctx = assistant.context_length
    want = max_tokens if max_tokens is not None else max(1, ctx - n_prompt)
    if n_prompt + want > ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                       f"{n_prompt + want} tokens ({n_prompt} in the {what}, {want} in the completion). Please reduce "
                       f"the length of the {what} or completion.",
                       param="max_tokens" if max_tokens is not None and n_prompt < ctx else what,
                       code="context_length_exceeded")
    return want


def _rows(req: _Sampling, prompts: list[list[int]], max_new: list[int], stop: tuple[str, ...],
          logprobs: int | None, texts: Sequence[str] = ()) -> list[Row]:
    """n rows per prompt, numbered as OpenAI numbers choices (prompt-major), each seeded apart."""
    n = req.n or 1
    if len(prompts) * n > MAX_ROWS:
        raise ApiError(400, f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} answers; at most "
                       f"{MAX_ROWS} per request", param="n")
    rows = []
    for p, ids in enumerate(prompts):
        for j in range(n):
            index = p * n + j
            seed = None if req.seed is None else (req.seed + index) % (1 << 64)
            config = SampleConfig(max_new_tokens=max_new[p], temperature=1.0 if req.temperature is None else req.temperature,
                                  top_k=None, top_p=None if req.top_p in (None, 1) else req.top_p, seed=seed, stop=stop)
            rows.append(Row(index, ids, config, logprobs, texts[p] if texts else ""))
    return rows


def _plan_completion(a: Assistant, req: CompletionRequest) -> Plan:
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if a.template == "classify":
        return _plan_classify(a, req, prompts, "text", "prompt")
    ids = [prompt_ids(a.tokenizer, p) for p in prompts]
    budget = [_budget(a, len(x), req.max_tokens, "prompt") for x in ids]
    rows = _rows(req, ids, budget, _stop_strings(req.stop), req.logprobs)
    return Plan("text", rows, sum(map(len, ids)), [len(prompts[r.index // (req.n or 1)]) for r in rows],
                bool(req.stream), _include_usage(req), req.logprobs)


def _plan_chat(a: Assistant, req: ChatRequest) -> Plan:
    messages = _messages(req.messages)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if a.template == "classify":
        return _plan_classify(a, req, [messages[-1]["content"]], "chat", "messages")
    try:
        ids = a.prompt_ids(messages)
    except LmforgeError as e:
        raise ApiError(400, str(e), param="messages") from None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    budget = _budget(a, len(ids), max_tokens, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    rows = _rows(req, [ids], [budget], _stop_strings(req.stop, a.stop), logprobs)
    return Plan("chat", rows, len(ids), [0] * len(rows), bool(req.stream), _include_usage(req), logprobs)


def _plan_classify(a: Assistant, req: _Sampling, texts: list[str], kind: Literal["chat", "text"], param: str) -> Plan:
    """A classification run answers with its label: one row per text and choice, no decoding."""
    from . import tasks

    if any(not t.strip() for t in texts):
        raise ApiError(400, "an empty text cannot be classified; give some text", param=param)
    ids = [tasks.plain_ids(a.tokenizer, t)[:a.context_length] for t in texts]
    rows = _rows(req, ids, [1] * len(ids), (), None, texts)
    return Plan(kind, rows, sum(map(len, ids)), [len(texts[r.index // (req.n or 1)]) for r in rows],
                bool(req.stream), _include_usage(req), None)


def _include_usage(req: _Sampling) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _messages(raw: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI's message forms as plain {role, content}: content parts joined, "developer" read as
    "system" (its newer name); anything else malformed is a 400 that names the message."""
    out = []
    for m in raw:
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, "messages: only text content parts ({\"type\": \"text\", \"text\": ...}) are "
                               "supported", param="messages")
            content = "".join(p["text"] for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({**m, "role": role, "content": content})
    try:
        return check_messages(out)
    except LmforgeError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None


# ---------------------------------------------------------------- from pieces to OpenAI's responses

def _token_entry(tokenizer, i: int, logprob: float) -> dict:
    raw = tokenizer.decode_bytes([i])
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def _chat_logprobs(tokenizer, tokens: list[Token]) -> dict:
    return {"content": [{**_token_entry(tokenizer, t.id, t.logprob),
                         "top_logprobs": [_token_entry(tokenizer, j, lp) for j, lp in t.top]} for t in tokens],
            "refusal": None}


def _text_logprobs(tokenizer, tokens: list[Token], offset: int) -> tuple[dict, int]:
    """The completions API's logprobs object, and the offset where the next token's text starts."""
    strings = [tokenizer.decode_bytes([t.id]).decode("utf-8", "replace") for t in tokens]
    offsets = []
    for s in strings:
        offsets.append(offset)
        offset += len(s)
    tops = [{tokenizer.decode_bytes([j]).decode("utf-8", "replace"): lp for j, lp in t.top} for t in tokens]
    return {"tokens": strings, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
            "text_offset": offsets}, offset


class Answers:
    """Turns a plan's pieces into OpenAI's response objects, whole or as stream chunks."""

    def __init__(self, plan: Plan, model: str, tokenizer) -> None:
        self.plan, self.model, self.tokenizer = plan, model, tokenizer
        self.offsets = list(plan.prompt_chars)
        self.completion_tokens = 0

    def _head(self, obj: str) -> dict:
        prefix = "chatcmpl-" if self.plan.kind == "chat" else "cmpl-"
        return {"id": prefix + self.plan.id, "object": obj, "created": self.plan.created, "model": self.model}

    def usage(self) -> dict:
        p = self.plan.prompt_tokens
        return {"prompt_tokens": p, "completion_tokens": self.completion_tokens, "total_tokens": p + self.completion_tokens}

    def _logprobs(self, index: int, tokens: list[Token]) -> dict | None:
        if self.plan.logprobs is None:
            return None
        if self.plan.kind == "chat":
            return _chat_logprobs(self.tokenizer, tokens)
        out, self.offsets[index] = _text_logprobs(self.tokenizer, tokens, self.offsets[index])
        return out

    def whole(self, pieces: list[list[Piece]]) -> dict:
        """The non-streamed response: every row's pieces joined."""
        choices = []
        for index, ps in enumerate(pieces):
            text, last = "".join(p.text for p in ps), ps[-1]
            self.completion_tokens += last.completion_tokens
            logprobs = self._logprobs(index, [t for p in ps for t in p.tokens])
            if self.plan.kind == "chat":
                choice = {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                          "logprobs": logprobs, "finish_reason": last.finish_reason}
            else:
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": last.finish_reason}
            if last.probs is not None:
                choice["label_probabilities"] = last.probs
            choices.append(choice)
        obj = "chat.completion" if self.plan.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": self.usage()}

    def _chunk(self, choice: dict) -> dict:
        obj = "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion"
        chunk = {**self._head(obj), "choices": [choice]}
        if self.plan.include_usage:
            chunk["usage"] = None  # OpenAI's chunks carry usage: null until the last one
        return chunk

    def opening(self) -> list[dict]:
        """Chat streams start each choice with the assistant's role and no text, as OpenAI's do."""
        if self.plan.kind != "chat":
            return []
        return [self._chunk({"index": r.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for r in self.plan.rows]

    def chunks(self, p: Piece) -> list[dict]:
        out = []
        if p.text or p.tokens:
            logprobs = self._logprobs(p.index, p.tokens)
            if self.plan.kind == "chat":
                out.append(self._chunk({"index": p.index, "delta": {"content": p.text}, "logprobs": logprobs,
                                        "finish_reason": None}))
            else:
                out.append(self._chunk({"index": p.index, "text": p.text, "logprobs": logprobs, "finish_reason": None}))
        if p.finish_reason is not None:
            self.completion_tokens += p.completion_tokens
            end = {"index": p.index, "logprobs": None, "finish_reason": p.finish_reason}
            out.append(self._chunk({**end, "delta": {}} if self.plan.kind == "chat" else {**end, "text": ""}))
        return out

    def closing(self) -> list[dict]:
        if not self.plan.include_usage:
            return []
        obj = "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion"
        return [{**self._head(obj), "choices": [], "usage": self.usage()}]


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _pieces(job: Job, count: int, request: Request | None = None) -> AsyncIterator[Piece]:
    """A job's pieces as they come, until all ``count`` rows have ended. With ``request``, a client
    that has gone away stops the wait (and, through job.cancelled, its rows)."""
    left, checked = count, time.monotonic()
    while left:
        try:
            event = await asyncio.wait_for(job.events.get(), timeout=0.5 if request is not None else None)
        except asyncio.TimeoutError:
            event = None
        # Twice a second, whether pieces keep coming or not: has the client hung up?
        if request is not None and time.monotonic() - checked >= 0.5:
            checked = time.monotonic()
            if await request.is_disconnected():
                job.cancelled = True
                return
        if event is None:
            continue
        if isinstance(event, Failed):
            raise ApiError(500, event.message, kind="server_error")
        if event.finish_reason is not None:
            left -= 1
        yield event


async def _respond(worker: Worker, plan: Plan, request: Request) -> JSONResponse | StreamingResponse:
    job = Job(asyncio.get_running_loop())
    for row in plan.rows:
        row.job = job
    answers = Answers(plan, worker.assistant.name, worker.assistant.tokenizer)
    worker.submit(plan.rows)
    if plan.stream:
        return _JobStream(job, _stream(job, answers), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pieces: list[list[Piece]] = [[] for _ in plan.rows]
    try:
        async for p in _pieces(job, len(plan.rows), request):
            pieces[p.index].append(p)
    finally:
        job.cancelled = True  # harmless once every row has ended; frees the rows of a request that did not
    if any(not ps for ps in pieces):  # the client went away: nobody reads this
        return JSONResponse({}, status_code=499)
    return JSONResponse(answers.whole(pieces))


class _JobStream(StreamingResponse):
    """A stream that frees its job's rows however it ends: also when the client leaves before the
    first chunk, when the generator below never starts and so never reaches its finally."""

    def __init__(self, job: Job, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True


async def _stream(job: Job, answers: Answers) -> AsyncIterator[str]:
    """Server-sent events; when the client goes away Starlette cancels this generator, and the
    finally clause frees the rows it was still generating."""
    try:
        for chunk in answers.opening():
            yield _sse(chunk)
        async for piece in _pieces(job, len(answers.plan.rows)):
            for chunk in answers.chunks(piece):
                yield _sse(chunk)
        for chunk in answers.closing():
            yield _sse(chunk)
        yield _sse("[DONE]")
    except ApiError as e:  # the headers are gone: the error travels as an event, as OpenAI's does
        yield _sse(e.body())
    finally:
        job.cancelled = True


# ---------------------------------------------------------------- the app

class BodyLimit:
    """ASGI middleware: refuses a body over ``max_body`` bytes (413) before anything parses it, by its
    Content-Length and by counting what actually arrives; refuses one that is not UTF-8 (400); and
    reads every POST body as JSON whatever its Content-Type (curl -d sends a form type)."""

    def __init__(self, app, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await _send_error(send, ApiError(400, "Content-Length must be a number of bytes"))
        if int(length) > self.max_body:
            return await _send_error(send, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _send_error(send, self._too_large())
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await _send_error(send, ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}); "
                                                    "send JSON encoded as UTF-8"))
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                 + [(b"content-type", b"application/json")]}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.max_body:,} bytes; send a shorter prompt",
                        code="request_too_large")


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _validation_error(errors: Sequence[dict]) -> ApiError:
    """FastAPI's 422 as OpenAI's 400: which field is wrong and why, one clause per field."""
    first = errors[0]
    loc = [p for p in first["loc"] if p != "body"]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')} "
                        f"at character {loc[0] if loc else 0}); send one JSON object")
    if not loc:
        return ApiError(400, "the request body must be a JSON object of the request's fields (see /openapi.json)")
    clauses: dict[str, str] = {}
    # A field of several types (stop: a string or a list) gets one error per type; the one that is not
    # a type mismatch says what is wrong with the value sent (a list of 50 stops: too many, not "not a string").
    for e in sorted(errors, key=lambda e: e["type"].endswith("_type")):
        where = [p for p in e["loc"] if p != "body"]
        name = str(where[0]) if where else "body"
        if name not in clauses:
            got = "" if e["type"] == "missing" else f" (got {json.dumps(e.get('input'), default=str)[:60]})"
            clauses[name] = f"{name} is required" if e["type"] == "missing" else f"{name}: {e['msg']}{got}"
    return ApiError(400, "; ".join(clauses.values()), param=str(loc[0]))


def _chat_page() -> str:
    from importlib import resources

    return resources.files("lmforge").joinpath("static/chat.html").read_text(encoding="utf-8")


# The page runs its own inline script and talks to this server only: nothing from elsewhere loads.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data:", "Cache-Control": "no-cache"}


def make_app(assistant: Assistant, api_key: str | None = None, max_batch: int = 8, max_body: int = MAX_BODY) -> FastAPI:
    """The HTTP app serving ``assistant``: the OpenAI-compatible API under /v1 and the chat page at /."""
    from . import __version__

    worker = Worker(assistant, max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="lmforge", version=__version__, lifespan=lifespan,
                  description=f"An OpenAI-compatible API serving {assistant.name}, and a chat page at /.")
    app.state.worker = worker
    app.add_middleware(BodyLimit, max_body=max_body)
    _add_error_handlers(app)
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth(api_key))])
    page = _chat_page()
    started = int(time.time())
    card = {"id": assistant.name, "object": "model", "created": started, "owned_by": "lmforge"}

    def check_model(name: str | None) -> None:
        if name is not None and name != assistant.name:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{assistant.name}' "
                           "(see /v1/models)", param="model", code="model_not_found")

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @router.get("/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        return card

    @router.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        return await _respond(worker, await asyncio.to_thread(_plan_completion, assistant, req), request)

    @router.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        return await _respond(worker, await asyncio.to_thread(_plan_chat, assistant, req), request)

    app.include_router(router)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": assistant.name, "api_key_required": api_key is not None,
                "waiting": worker.queue.qsize(), "max_batch": worker.max_batch}

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    return app


_BEARER = HTTPBearer(auto_error=False, description="the key given to `lmforge serve --api_key`")


def _auth(api_key: str | None):
    async def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):  # in constant time: no guessing by timing
            raise ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>' with "
                           "the key given to lmforge serve --api_key", code="invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see /openapi.json)"
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return ApiError(e.status_code, message, kind=kind).response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()


# ---------------------------------------------------------------- `lmforge serve`

def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or an error that says what to change."""
    if not 0 <= port <= 65535:
        raise LmforgeError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LmforgeError(f"cannot listen on host {host!r} ({e.strerror}); give an address such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        fix = "pick another --port"
        if e.errno == errno.EADDRNOTAVAIL:
            fix = "give an address of this machine as --host, such as 127.0.0.1 or 0.0.0.0"
        elif e.errno == errno.EACCES and 0 < port < 1024:
            fix = "ports below 1024 need privileges: pick a --port above 1023"
        raise LmforgeError(f"cannot listen on {host}:{port} ({e.strerror}); {fix}") from None
    sock.listen(128)
    return sock


def _deadline_protocol(seconds: float) -> type:
    """uvicorn's HTTP/1.1 protocol with a deadline on reading each request. uvicorn times out only
    idle keep-alive connections: a client that connects and sends nothing, or sends its headers or
    body a byte at a time, would hold a connection (a file descriptor, and a request the app waits
    on) for ever, and enough of them lock everyone out. Here a client has ``seconds`` from connecting,
    or from the end of the last response, to send one whole request, headers and body together
    (a deadline for the whole request, where nginx times each read); then the connection is closed.
    Requests here are small (at most ``MAX_BODY``, 1 MB: 17 kB/s is enough).

    Sending the answer has no deadline: a long streamed answer is not cut. But a client that stops
    reading it would hold the connection, and the answer queued for it, for ever (the send waits for
    room that never comes). So once the socket's buffers are full, the client has ``seconds`` to take
    some of the answer (as nginx's send_timeout); then the connection is dropped (aborted: closing
    would wait to send what is queued), and the app sees the client gone."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _stall: asyncio.TimerHandle | None = None  # armed while the answer waits for the client to read

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                log.warning("closed a connection whose request took over %g s to arrive", seconds)
                self.transport.close()  # the app, if it was reading the body, sees the client gone

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.SEND_BODY and self.conn.their_state is not h11.IDLE:
                self._disarm()  # the whole request is in (DONE), or the connection is over

        def on_response_complete(self) -> None:
            self._arm()  # before the next request is read: the base class may read a pipelined one at once
            super().on_response_complete()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stall is None:
                self._watch(self._queued())

        def resume_writing(self) -> None:
            self._unstall()
            super().resume_writing()

        def _queued(self) -> tuple[int, int]:
            """Bytes of the answer not yet taken: in the transport's buffer, and in the kernel's send
            queue (Linux; -1 elsewhere). The kernel's buffers may hold megabytes: a client that reads,
            however slowly, empties them a little at a time long before the transport's buffer moves."""
            queued = -1
            sock = self.transport.get_extra_info("socket")
            try:
                import fcntl
                import struct
                import termios

                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            except (ImportError, AttributeError, OSError, ValueError):
                pass
            return self.transport.get_write_buffer_size(), queued

        def _watch(self, before: tuple[int, int]) -> None:
            self._stall = self.loop.call_later(seconds, self._stalled, before)

        def _unstall(self) -> None:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def _stalled(self, before: tuple[int, int]) -> None:
            self._stall = None
            now = self._queued()
            if any(n < b for n, b in zip(now, before)):  # the client took some: it reads, slowly
                self._watch(now)
            elif now[0] or not self.transport.is_closing():
                log.warning("dropped a connection that took none of its answer for %g s", seconds)
                self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            self._unstall()
            super().connection_lost(exc)

    return DeadlineH11Protocol


REQUEST_TIMEOUT = 60.0  # seconds to send one whole request, or to read some of a stalled answer (nginx: 60 s)


def server_config(app: FastAPI, request_timeout: float = REQUEST_TIMEOUT):
    """uvicorn's settings for lmforge's server (``serve`` and the tests run the same)."""
    import uvicorn

    return uvicorn.Config(app, http=_deadline_protocol(request_timeout), log_level="warning", access_log=False,
                          timeout_graceful_shutdown=3)


def serve(spec: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 8,
          template: str | None = None, device: str | None = None, dtype: str = "float32", compile: bool = False,
          quantize: str | None = None, request_timeout: float = REQUEST_TIMEOUT) -> None:
    """Load ``spec`` (a run directory, a known name, an HF folder, a GGUF file) and serve it until
    interrupted. Binds 127.0.0.1 unless ``host`` says otherwise. ``dtype`` and ``compile``: as for
    `lmforge chat` (see ``Assistant.load``). A client has ``request_timeout`` seconds to send each
    whole request."""
    import uvicorn

    from .precision import default_device

    if max_batch < 1:
        raise LmforgeError(f"--max_batch must be >= 1, got {max_batch}")
    if not 0 < request_timeout <= 86400:  # (NaN too; the event loop's timer overflows near 1e300 s)
        raise LmforgeError(f"--request_timeout must be between 0 and 86400 seconds, got {request_timeout}")
    if api_key is not None and not (api_key and all(33 <= ord(ch) <= 126 for ch in api_key)):
        # HTTP headers carry bytes that clients and servers read as ASCII or Latin-1: any other key
        # (or one with spaces) could never be matched by what a client sends.
        raise LmforgeError("--api_key must be printable ASCII with no spaces (letters, digits, punctuation); "
                           "e.g. generate one with: python -c 'import secrets; print(secrets.token_urlsafe())'")
    sock = bind(host, port)
    assistant = Assistant.load(spec, device or default_device(), template, dtype, compile, quantize)
    app = make_app(assistant, api_key=api_key, max_batch=max_batch)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {assistant.name} ({assistant.template}) at http://{shown}:{sock.getsockname()[1]}/ "
          "(chat page at /, OpenAI API under /v1); Ctrl+C stops", flush=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {host} without --api_key: anyone who reaches this port can use the model", flush=True)
    uvicorn.Server(server_config(app, request_timeout)).run(sockets=[sock])
