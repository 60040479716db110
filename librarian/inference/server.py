"""`librarian serve`: an OpenAI-compatible HTTP API and a chat page, on FastAPI and uvicorn.

    GET  /                     the chat page (librarian/inference/web/chat.html: one static file, no network)
    GET  /health               {"status": "ok", "model": ..., "active": ..., "slots": ...}
    GET  /v1/models            the one model served
    POST /v1/chat/completions  messages rendered as `librarian chat` renders them (chat.fit_prompt)
    POST /v1/completions       a raw continuation, as `librarian generate`

Every request's sequences decode in one shared Engine (librarian/inference/batching.py): requests that arrive
while others decode join the running batch. Errors come back in OpenAI's JSON shape
({"error": {"message", "type", "param", "code"}}) with 400, 401, 403, 404, 415, 421 or 422; a bug gives a 500
with the exception's name, never a traceback. `logprobs` and `top_logprobs` are answered
(librarian/inference/logprobs.py). A field that asks for what this model cannot do (tools, a JSON
response_format, echo, an image) is refused with a 400 naming it; one that only tunes what other
models do (frequency_penalty, user...) is ignored, as other OpenAI-compatible servers do. Requests
from other web pages are refused before any of this (librarian/inference/guard.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import cached_property
from importlib import resources
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from librarian.core.errors import LibrarianError
from librarian.data.chat_template import NEUTRAL_REQUEST, Turn, render_prompt
from librarian.inference.batching import FINISH_ERROR, Engine, Job, log
from librarian.inference.chat import (STOP_STRINGS, ReplyTrim, fit_prompt, negative_prompt, one_line, prompt_budget,
                                      strip_controls)
from librarian.inference.generate import (
    FINISH_LENGTH,
    FINISH_STOP,
    MAX_GUIDANCE,
    MAX_SEED,
    GenerationOptions,
    Generator,
    TextStream,
    nth_seed,
)
from librarian.inference.guard import Access
from librarian.inference.logprobs import Entry, TokenLog, TokenTexts

MAX_CHOICES = 16
MAX_STOPS = 4
MAX_TOP_LOGPROBS = {"chat": 20, "completions": 5}  # OpenAI's limits


@dataclass(frozen=True)
class ServeSettings:
    model_id: str
    max_tokens_limit: int = 1024  # the most tokens one reply may ask for (--max-tokens-limit)
    max_request_bytes: int = 262_144  # a request body beyond this is refused before it is parsed
    api_key: str | None = None
    allow_hosts: tuple[str, ...] = ()  # Host names accepted beyond this server's own (--allow-host)
    allow_origins: tuple[str, ...] = ()  # web pages that may use the API (--allow-origin)
    # Sampling when a request leaves a field out: `librarian generate`'s defaults, which suit a small
    # model better than OpenAI's temperature 1 with no top-k.
    defaults: GenerationOptions = GenerationOptions(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=200)


class APIError(Exception):
    """An error in OpenAI's shape: status, message, type, param and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# --- request schemas ---------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        parts = self.content if isinstance(self.content, list) else [self.content or ""]
        return " ".join(p.text if isinstance(p, TextPart) else p for p in parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not OpenAI's; llama.cpp and vLLM take it too
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    stop: str | list[str] | None = Field(default=None, validate_default=True)  # a list, once validated
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    # Not OpenAI's (docs/serving.md, "Guidance"): checked by guidance_of, for a one-line 400.
    guidance_scale: object = None
    negative_prompt: object = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        return stops


class ChatRequest(Sampling):
    messages: list[Message]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS["chat"])] | None = None

    @field_validator("messages")
    @classmethod
    def _some(cls, messages):
        if not messages:
            raise ValueError("messages is empty; send at least one message from the user")
        return messages

    def logprob_count(self) -> int | None:
        """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true as well; send both", "top_logprobs",
                           "logprobs_required")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS["completions"])] | None = None  # legacy: the count

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError(f"send one prompt per request (got {len(prompt)}); n asks for several completions")
            prompt = prompt[0]
        if not strip_controls(prompt).strip():
            raise ValueError("the prompt is empty; give some text to continue")
        return prompt


def unsupported(field: str, why: str, code: str = "unsupported_parameter") -> APIError:
    return APIError(400, f"{field}: {why}", field, code)


def check_supported(body: dict) -> None:
    """Refuse what asks for something this model cannot do, rather than answer as if it had been done.

    Values that ask for nothing (tools: [], tool_choice: "none", response_format text, echo: false)
    pass: clients send them as defaults.
    """
    for field in ("tools", "functions"):
        if body.get(field):
            raise unsupported(field, f"this model cannot call tools or functions; leave {field} out")
    for field in ("tool_choice", "function_call"):
        if body.get(field) not in (None, "none"):
            raise unsupported(field, f"this model cannot call tools or functions; leave {field} out")
    form = body.get("response_format")
    if form is not None and not (isinstance(form, dict) and form.get("type") == "text"):
        raise unsupported("response_format", 'this model writes free text only, not JSON; leave response_format out '
                                             'or send {"type": "text"}')
    if body.get("echo") not in (None, False):
        raise unsupported("echo", "the prompt is not echoed; leave echo out (you have the prompt already)")
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise unsupported(f"messages.{i}.content.{j}", f"this model reads text only, not {str(kind)[:40]} "
                                  'parts; send the message as a string or as {"type": "text", "text": ...} parts',
                                  "unsupported_content")


# --- from request to sequences -----------------------------------------------------------------


def options_of(request: Sampling, settings: ServeSettings) -> GenerationOptions:
    asked = request.max_completion_tokens or request.max_tokens
    if asked is not None and asked > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens is {asked}, but this server gives at most {settings.max_tokens_limit} "
                            "tokens a reply (librarian serve --max-tokens-limit)", "max_tokens", "max_tokens_too_large")
    d = settings.defaults
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return GenerationOptions(temperature=pick(request.temperature, d.temperature), top_k=pick(request.top_k, d.top_k),
                             top_p=pick(request.top_p, d.top_p), max_new_tokens=pick(asked, d.max_new_tokens),
                             seed=request.seed if request.seed is not None else secrets.randbits(62))


def conversation(messages: list[Message]) -> tuple[list[Turn], str]:
    """(history, the user's last message) from OpenAI messages.

    System and developer messages are left out: the model never saw one in training, and as text in
    the dialogue it would be taken for a turn of the user's. Consecutive messages of one role are
    joined with a space; the last message must be the user's.
    """
    said: list[tuple[str, str]] = []
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        text = one_line(m.text)
        if said and said[-1][0] == m.role:
            said[-1] = (m.role, f"{said[-1][1]} {text}".strip())
        else:
            said.append((m.role, text))
    if not said or said[-1][0] != "user" or not said[-1][1]:
        raise APIError(400, "the last message must be a non-empty one from the user: the model replies to it",
                       "messages", "no_user_message")
    history, pending = [], None
    for role, text in said[:-1]:
        if role == "user":
            pending = text
        else:
            history.append(Turn(pending or "", text))
            pending = None
    return history, said[-1][1]


def guidance_of(request: Sampling) -> float:
    """The request's guidance_scale (an extension of the OpenAI API; 1, or absent: off), checked."""
    scale = request.guidance_scale
    if scale is None:
        if request.negative_prompt is not None:
            raise APIError(400, "negative_prompt needs guidance_scale (e.g. 2) as well; send both", "negative_prompt")
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_GUIDANCE:
        raise APIError(400, f"guidance_scale must be a number above 0 and at most {MAX_GUIDANCE:g} (1 = off), "
                            f"got {json.dumps(scale)[:40]}", "guidance_scale")
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise APIError(400, "negative_prompt must be a string", "negative_prompt")
    return float(scale)


class Server:
    """What the routes share: the generator, the engine and the settings."""

    def __init__(self, generator: Generator, engine: Engine, settings: ServeSettings):
        self.generator, self.engine, self.settings = generator, engine, settings
        self.context_length = generator.model.config.context_length
        self.mailbox: Mailbox | None = None  # made on the event loop, by the first request

    def chat_prompt(self, request: ChatRequest, options: GenerationOptions) -> tuple[str, GenerationOptions]:
        """The prompt, and the options with guidance's negative prompt: the same conversation, the last
        request replaced by negative_prompt (default: a neutral one), as `librarian chat` does."""
        history, message = conversation(request.messages)
        budget = prompt_budget(self.context_length, options.max_new_tokens)
        encode, decode = self.generator.encode, self.generator.decode
        prompt, kept, _ = fit_prompt(history, message, budget, encode, decode)
        if options.guided:
            request_text = NEUTRAL_REQUEST if request.negative_prompt is None else one_line(request.negative_prompt)
            self.check_negative(render_prompt([], request_text))
            negative = negative_prompt(history[len(history) - kept :], budget, encode, decode, request_text)
            options = replace(options, negative=tuple(encode(negative)))
        return prompt, options

    def completion_options(self, request: CompletionRequest, options: GenerationOptions) -> GenerationOptions:
        """Guidance's negative prompt of a completion: negative_prompt's text (default: none, the
        prompt's last token alone)."""
        if not options.guided or request.negative_prompt is None:
            return options
        return replace(options, negative=tuple(self.check_negative(strip_controls(request.negative_prompt))))

    def check_negative(self, text: str) -> list[int]:
        ids = self.generator.encode(text)
        if len(ids) > self.context_length:
            raise APIError(400, f"negative_prompt is {len(ids)} tokens, more than the model's context of "
                                f"{self.context_length}; shorten it", "negative_prompt")
        return ids

    @cached_property
    def texts(self) -> TokenTexts:  # made by the first request that asks for logprobs
        return TokenTexts(self.generator.tokenizer)

    def start(self, prompt: str, options: GenerationOptions, stop_strings: tuple[str, ...], n: int,
              logprobs: int | None = None) -> list["Choice"]:
        ids = self.generator.encode(prompt)
        if not ids:
            raise APIError(400, "the prompt has no tokens; give some text", "prompt")
        if self.mailbox is None:
            self.mailbox = Mailbox(asyncio.get_running_loop())
        choices = []
        for i in range(n):
            choice = Choice(self, i, len(ids[-self.context_length :]), stop_strings, self.mailbox)
            try:
                choice.job = self.engine.submit(ids, replace(options, seed=nth_seed(options.seed, i)), (self.generator.eot,),
                                                choice.emit, logprobs)
            except RuntimeError:
                for c in choices:
                    c.cancel()
                raise APIError(503, "the server is shutting down; retry on another one", code="shutting_down",
                               kind="server_error") from None
            if logprobs is not None:
                choice.log = TokenLog(choice.job.scores, self.texts)
            choices.append(choice)
        return choices


class Mailbox:
    """Hands the engine's tokens to the event loop, waking it once per batch of them, not once per token.

    The engine emits a token for every sequence of a step in a burst; waking the loop for each
    (call_soon_threadsafe writes to its self-pipe) costs as much as the token's own handling.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list[tuple[asyncio.Queue, int | None]] = []

    def post(self, queue: asyncio.Queue, item: int | None) -> None:  # on the engine's thread
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:
                return  # a delivery is already on its way
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, item in items:
            queue.put_nowait(item)


Piece = tuple[str, list[Entry]]  # a piece of text, and the scored tokens that made it (with logprobs)


class Choice:
    """One sequence of a request: the engine's tokens, turned into text pieces on the event loop."""

    def __init__(self, server: Server, index: int, prompt_tokens: int, stop_strings: tuple[str, ...],
                 mailbox: Mailbox):
        self.server, self.index, self.prompt_tokens = server, index, prompt_tokens
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.mailbox = mailbox
        self.text = TextStream(server.generator.decode, stop_strings)
        self.job: Job | None = None
        self.log: TokenLog | None = None  # the tokens' log-probabilities, when the request asked for them
        self.finish_reason: str | None = None

    def emit(self, token: int | None) -> None:  # on the engine's thread
        self.mailbox.post(self.queue, token)

    def cancel(self) -> None:
        if self.job is not None and self.job.finish_reason is None:
            self.server.engine.cancel(self.job)

    @property
    def completion_tokens(self) -> int:
        return self.job.tokens if self.job else 0

    async def batches(self, chat: bool) -> AsyncIterator[list[Piece]]:
        """The text pieces of every token that has arrived, a list at a time (a stream writes each list
        at once); chat replies are trimmed as `librarian chat` shows them. self.finish_reason is set at
        the end. A caller that stops early (a client gone) frees the engine's row.

        With logprobs, a piece carries the tokens whose text it releases (text held back, as a possible
        stop string or half a character, takes its tokens along when it comes out); at a stop string,
        tokens that begin inside it are left out, as their text is; tokens whose text the chat trim
        drops (spaces at the end) come in a last piece of no text."""
        trim = ReplyTrim() if chat else None
        shown = (lambda piece: trim.push(piece)) if chat else (lambda piece: piece)  # noqa: E731
        scored: list[Entry] = []  # tokens released, waiting for a piece of text to go with

        def piece(text: str, upto: int | None, last: bool = False) -> Piece | None:
            """`text` with the tokens that start before character `upto` of the raw text (None: all)."""
            nonlocal scored
            if self.log is not None:
                scored += self.log.take(upto)
            if not text and not (last and scored):
                return None
            out, scored = (text, scored), []
            return out

        try:
            ended = False
            while not ended:
                tokens = [await self.queue.get()]
                while not self.queue.empty():
                    tokens.append(self.queue.get_nowait())
                pieces = []
                for token in tokens:
                    if token is None:
                        ended = True
                        break
                    if self.log is not None:
                        self.log.push(token)
                    text = shown(self.text.push(token))
                    if self.text.stopped:
                        self.finish_reason = FINISH_STOP
                        pieces.append(piece(text, self.text.released, last=True))
                        yield [p for p in pieces if p]
                        return
                    pieces.append(piece(text, self.text.released))
                if ended:
                    pieces.append(piece(shown(self.text.finish()), None, last=True))
                pieces = [p for p in pieces if p]
                if pieces:
                    yield pieces
            if self.job.finish_reason == FINISH_ERROR:
                raise APIError(500, f"decoding failed ({self.job.error}); see the server's log", code="decoding_failed",
                               kind="server_error")
            # The engine's other reasons: a stop token, the length limit, or the server shutting down
            # (reported as "length": the reply was cut short).
            self.finish_reason = FINISH_STOP if self.job.finish_reason == FINISH_STOP else FINISH_LENGTH
        finally:
            self.cancel()


# --- responses -------------------------------------------------------------------------------------


def usage(choices: list[Choice]) -> dict:
    prompt = choices[0].prompt_tokens
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def collect(choice: Choice, chat: bool) -> Piece:
    """The whole text of a choice, and its scored tokens (with logprobs)."""
    pieces = [piece async for batch in choice.batches(chat) for piece in batch]
    return "".join(text for text, _ in pieces), [entry for _, entries in pieces for entry in entries]


def logprobs_of(choice: Choice, entries: list[Entry], chat: bool) -> dict | None:
    """The `logprobs` of a choice (or of a chunk of it) in the endpoint's shape; None when not asked for."""
    if choice.log is None:
        return None
    return choice.log.chat(entries) if chat else choice.log.completion(entries)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def merged(choices: list[Choice], chat: bool) -> AsyncIterator[tuple[Choice, list[Piece] | None]]:
    """(choice, pieces) as the choices produce them, then (choice, None) when each one ends."""
    if len(choices) == 1:  # the usual case, without a task and a queue in between
        async for batch in choices[0].batches(chat):
            yield choices[0], batch
        yield choices[0], None
        return
    out: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice):
        try:
            async for batch in choice.batches(chat):
                await out.put((choice, batch))
            await out.put((choice, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await out.put((choice, exc))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                choice, batch = await out.get()
                if isinstance(batch, BaseException):
                    raise batch
                yield choice, batch
                if batch is None:
                    break
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.cancel()


class Guard:
    """The Host, Origin and Content-Type checks (librarian/inference/guard.py), before anything else runs.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would relay every chunk of every stream
    through a memory channel of its own.
    """

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.access.refusal(scope["method"], Headers(scope=scope))
            if refusal is not None:
                await APIError(refusal.status, refusal.message, code=refusal.code).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(generator: Generator, engine: Engine, settings: ServeSettings, listen: str = "127.0.0.1") -> FastAPI:
    """The app of a server listening on the address `listen` (whose names the Host check accepts)."""
    app = FastAPI(title="Librarian", docs_url=None, redoc_url=None, openapi_url=None)
    if settings.allow_origins:  # the pages allowed can read the replies: the browser needs CORS headers to let them
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(Guard, access=Access.of(listen, settings.allow_hosts, settings.allow_origins))  # outermost
    server = Server(generator, engine, settings)
    app.state.server = server
    page = resources.files("librarian.inference").joinpath("web/chat.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return APIError(404, f"no such endpoint: {request.method} {request.url.path}; see GET /v1/models, "
                                 "POST /v1/chat/completions and POST /v1/completions", code="not_found").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)  # the traceback: in the log only
        return APIError(500, f"internal error ({type(exc).__name__}); see the server's log", kind="server_error",
                        code="internal_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, "active": engine.active, "slots": engine.slots,
                "steps": engine.steps, "peak_batch": engine.peak_rows, "cancelled": engine.cancelled,
                "context_length": server.context_length, "max_tokens_limit": settings.max_tokens_limit,
                "auth": settings.api_key is not None}

    # A plain dependency, not a middleware: Starlette's BaseHTTPMiddleware would relay every chunk of
    # every stream through a memory channel of its own.
    def authorize(request: Request) -> None:
        check_key(request, settings)

    authorized = [Depends(authorize)]

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [model_card(settings)]}

    @app.get("/v1/models/{model_id}", dependencies=authorized)
    async def model(model_id: str):
        check_model(model_id, settings)
        return model_card(settings)

    async def complete(request: Request, chat: bool):
        """Both endpoints: parse, check, build the prompt (chat's rendering, or the raw text), decode, respond."""
        req = parse(ChatRequest if chat else CompletionRequest, await read_body(request, settings))
        check_model(req.model, settings)
        options = replace(options_of(req, settings), guidance=guidance_of(req))
        if chat:
            (prompt, options), stops = server.chat_prompt(req, options), STOP_STRINGS + tuple(req.stop)
        else:
            prompt, stops = strip_controls(req.prompt), tuple(req.stop)
            options = server.completion_options(req, options)
        choices = server.start(prompt, options, stops, req.n, req.logprob_count())
        return await respond(choices, req, chat=chat, model_id=settings.model_id)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


async def respond(choices: list[Choice], req: Sampling, chat: bool, model_id: str):
    kind = "chat.completion" if chat else "text_completion"
    ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    head = {"id": ident, "created": created, "model": model_id}
    if not req.stream:
        collected = await asyncio.gather(*(collect(c, chat) for c in choices))
        items = []
        for choice, (text, entries) in zip(choices, collected):
            item = {"index": choice.index, "finish_reason": choice.finish_reason,
                    "logprobs": logprobs_of(choice, entries, chat)}
            item.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            items.append(item)
        return JSONResponse({**head, "object": kind, "choices": items, "usage": usage(choices)})

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choice: Choice, delta: dict | None, text: str | None, finish: str | None,
              logprobs: dict | None = None) -> str:
        item = {"index": choice.index, "finish_reason": finish, "logprobs": logprobs}
        item.update({"delta": delta} if chat else {"text": text})
        body = {**head, "object": chunk_kind, "choices": [item]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    async def events() -> AsyncIterator[str]:
        if chat:
            for c in choices:
                yield chunk(c, {"role": "assistant", "content": ""}, None, None)
        try:
            async for choice, batch in merged(choices, chat):
                if batch is None:
                    yield chunk(choice, {}, "", choice.finish_reason)
                else:  # an event per piece, written together: one send for all that arrived at once
                    yield "".join(chunk(choice, {"content": text}, text, None, logprobs_of(choice, entries, chat))
                                  for text, entries in batch)
        except APIError as exc:  # headers are sent: the error goes in the stream, as OpenAI does
            yield sse({"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}})
            return
        if include_usage:
            yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(choices)})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- checks --------------------------------------------------------------------------------------


def model_card(settings: ServeSettings) -> dict:
    return {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "librarian"}


def check_model(name: str, settings: ServeSettings) -> None:
    if name != settings.model_id:
        raise APIError(404, f"the model {name!r} does not exist here; this server serves {settings.model_id!r} "
                            "(GET /v1/models)", "model", "model_not_found")


def check_key(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.strip().partition(" ")
    if not given:
        raise APIError(401, "no API key: this server needs one, sent as the header `Authorization: Bearer <key>`",
                       code="missing_api_key")
    if scheme.lower() != "bearer":  # a bare key, or another scheme: say how to send it, not that it is wrong
        raise APIError(401, "the Authorization header does not start with `Bearer `; send the key as "
                            "`Authorization: Bearer <key>`", code="invalid_api_key")
    if not secrets.compare_digest(key.strip().encode(), settings.api_key.encode()):
        raise APIError(401, "the API key is wrong; send the server's key (its LIBRARIAN_API_KEY, or --api-key)",
                       code="invalid_api_key")


def too_large(size: int, settings: ServeSettings) -> APIError:
    return APIError(400, f"the request is {size:,} bytes, more than the {settings.max_request_bytes:,} this server "
                         "reads (librarian serve --max-request-bytes); the model sees only its last "
                         "context of tokens anyway, so send the end of the text", code="request_too_large")


async def read_body(request: Request, settings: ServeSettings) -> object:
    """The JSON body, read at most max_request_bytes far; one clear error for each way it can be wrong."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > settings.max_request_bytes:
        raise too_large(int(length), settings)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > settings.max_request_bytes:
            raise too_large(len(body), settings)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not UTF-8 (byte {exc.start}); send JSON encoded as UTF-8",
                       code="invalid_utf8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                       code="invalid_json") from None


def parse(schema: type[BaseModel], body: object):
    from pydantic import ValidationError

    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    check_supported(body)
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except LibrarianError as exc:
        raise APIError(422, str(exc)) from None


def validation_error(exc) -> APIError:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "is required"
    return APIError(422, f"{field}: {message}" if field else message, field, "invalid_value")


# --- running it -------------------------------------------------------------------------------------


def bind(host: str, port: int):
    """The listening socket, made here so a port in use is one clear error (uvicorn would log and exit)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise LibrarianError(f"--host {host} is not an address of this machine ({exc.strerror}); "
                             "use 127.0.0.1, or 0.0.0.0 for every interface") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise LibrarianError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another port with --port, "
                             "or --port 0 for any free one") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(generator: Generator, settings: ServeSettings, host: str, port: int, slots: int) -> None:
    """Serve until SIGINT or SIGTERM; then in-flight replies end at once (finish_reason "length", the
    stream closed with [DONE]) and the signal is raised again for the caller to report."""
    import uvicorn

    sock = bind(host, port)
    engine = Engine(generator.model, slots=slots)
    app = create_app(generator, engine, settings, listen=host)

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop()  # every reply ends now, cleanly: the connections can then close
            super().handle_exit(sig, frame)

    # uvloop and httptools (the serve extra) are uvicorn's fast event loop and HTTP parser.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", loop="auto", http="auto",
                            timeout_graceful_shutdown=5, ws="none")
    server = Uvicorn(config)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serve: http://{shown}:{bound_port}/ (chat page), API at http://{shown}:{bound_port}/v1 "
          f"for the model {settings.model_id!r}; Ctrl-C stops", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
