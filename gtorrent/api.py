"""An OpenAI-compatible HTTP endpoint over the swarm (`gtorrent api`).

Two layers. The pure one maps OpenAI request bodies to `AskRequest`s (`chat_request`,
`completion_request`), answers to OpenAI response and chunk bodies, finish reasons, and library errors
to OpenAI's error shape (`{"error": {message, type, param, code}}`) with an HTTP status (`ApiError`,
`error_for`); `StopFilter` and `ReplayGuard` shape a streamed answer. The other is the aiohttp
application (`make_app`) and its runner (`serve_api`).

Invariants:
- Every request is one ask through `ask_direct` or `ask_private`, the functions `gtorrent ask` runs
  (`run_ask`), with their retry and trust rules; the server adds none of its own.
- One process serves many requests at once: one event loop, one ZeroMQ context, one store.
- A client that disconnects cancels its ask: the runner cancels the handler (`handler_cancellation`),
  and the handler cancels the ask's task.
- A streamed answer never shows text twice: when an attempt fails after text went out and the ask
  restarts on another seed, the new attempt's text is held until it has re-produced what was sent
  (then only the rest goes out); if it differs, the stream ends with an error event (`ReplayGuard`).
- Without an API key the server binds only loopback addresses (`check_bind`).
- `stop` strings are applied here, to the text the seed sends (the protocol has no stop field): the
  answer is cut at the first stop string and the ask still runs to its end, so `usage` stays exact.
- A chat of one user message is asked as a prompt (rendered by the seed as one user turn); any other
  conversation goes to the seed whole, as the generate's `messages`, under the answer's signature.
- The library never prints: a server's log is the caller's, one `RequestLog` per request (`on_request`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from .asker import (
    SAMPLING_SEED_LIMIT,
    AskEvents,
    AskRequest,
    AskResult,
    AttemptsFailed,
    NoSeedError,
    UnknownModelError,
)
from .discovery import TrackerUnreachable, discover
from .errors import GtorrentError, UsageError
from .protocol import MAX_CHAT_MESSAGES, MAX_PROMPT_CHARS
from .routing import RelayRules

if TYPE_CHECKING:
    from zmq.asyncio import Context

    from .node import NodeSettings, PrivacyOptions
    from .store import Store

DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 7780
DEFAULT_MAX_TOKENS = 128  # as `gtorrent ask`
MAX_TOKENS_LIMIT = 65536  # as `gtorrent ask --max-tokens`
MAX_TEMPERATURE = 100.0  # as `gtorrent ask --temperature`
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused (413) before it is parsed
OWNED_BY = "gtorrent"


# ---------------------------------------------------------------------- errors


class ApiError(GtorrentError):
    """An error an HTTP client receives in OpenAI's shape: `status` the HTTP status, `kind` the error
    `type`, `param` the request field at fault, `code` a machine-readable code."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict[str, Any]:
        message = self.message if self.hint is None else f"{self.message} ({self.hint})"
        return {"error": {"message": message, "type": self.kind, "param": self.param, "code": self.code}}


def error_for(exc: GtorrentError) -> ApiError:
    """The HTTP error of a library error an ask raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModelError):  # a name or id nobody serves (asker.resolve_model)
        return ApiError(exc.message, 404, "invalid_request_error", "model", "model_not_found", exc.hint)
    if isinstance(exc, NoSeedError):
        return ApiError(exc.message, 503, "service_unavailable", None, "no_seed", exc.hint)
    if isinstance(exc, TrackerUnreachable):
        return ApiError(exc.message, 503, "service_unavailable", None, "tracker_unreachable", exc.hint)
    if isinstance(exc, AttemptsFailed):
        return ApiError(exc.message, 503, "service_unavailable", None, "seeds_failed", exc.hint)
    if isinstance(exc, UsageError):  # RequestRefused too: the request, not a seed, is at fault
        return ApiError(exc.message, 400, "invalid_request_error", None, "invalid_request", exc.hint)
    return ApiError(exc.message, 502, "server_error", None, "ask_failed", exc.hint)


# ---------------------------------------------------------------------- request mapping


@dataclass(frozen=True)
class ApiRequest:
    """One OpenAI request, mapped: the ask, and how to shape its answer."""

    ask: AskRequest
    model: str  # as the client named it, echoed in the response
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with `usage`
    stop: tuple[str, ...] = ()


def _bad(message: str, param: str | None) -> ApiError:
    return ApiError(message, 400, "invalid_request_error", param, "invalid_value" if param else "invalid_request")


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, *,
            open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"'{name}' must be a number", name)
    if value < low or value > high or (open_low and value == low):
        raise _bad(f"'{name}' must be in {'(' if open_low else '['}{low:g}, {high:g}], got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer", name)
    if not low <= value <= high:
        raise _bad(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(stops)


def _common(body: Any, prompt: str, chat: bool, max_tokens_names: tuple[str, ...],
            messages: tuple[tuple[str, str], ...] = ()) -> ApiRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: a model name or id from GET /v1/models", "model")
    for name, wanted in (("n", 1), ("best_of", 1)):
        if body.get(name) not in (None, wanted):
            raise _bad(f"'{name}' must be 1: the swarm gives one answer per request", name)
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, False, [], "", "none"):
            raise _bad(f"'{name}' is not supported", name)
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if body.get(name) not in (None, neutral):
            raise _bad(f"'{name}' is not supported (seeds sample without penalties)", name)
    if body.get("logit_bias") not in (None, {}):
        raise _bad("'logit_bias' is not supported", "logit_bias")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = bool((options or {}).get("include_usage", False))
    max_tokens: int | None = None
    for name in max_tokens_names:
        max_tokens = _integer(body, name, 1, MAX_TOKENS_LIMIT)
        if max_tokens is not None:
            break
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    top_k = _integer(body, "top_k", 0, 1 << 20)  # not OpenAI's; vLLM and llama.cpp take it too
    request = AskRequest(
        prompt=prompt,
        model=model,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=_number(body, "temperature", 0.0, 0.0, MAX_TEMPERATURE),  # OpenAI's default is 1; ask's is 0
        top_k=top_k or 0,
        top_p=top_p,
        seed=_integer(body, "seed", 0, SAMPLING_SEED_LIMIT - 1),
        chat=chat,
        messages=messages,
    )
    return ApiRequest(request, model, stream, include_usage, _stop(body))


def _content(message: dict[str, Any], index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                shown = f" (got {json.dumps(kind)})" if isinstance(kind, str) else ""
                raise _bad(f"messages[{index}]: only text content parts are supported{shown}", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{index}].content must be a string or a list of text parts", "messages")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # OpenAI's -> ours


def _turns(messages: Any) -> tuple[tuple[str, str], ...]:
    """OpenAI's `messages` as (role, content) turns; system, developer (as system), user and assistant
    messages of text only, within the protocol's bounds (protocol.MAX_CHAT_MESSAGES, MAX_PROMPT_CHARS)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise _bad(f"'messages' holds {len(messages)} messages; a request carries at most {MAX_CHAT_MESSAGES}",
                   "messages")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{index}] must be an object with a 'role'", "messages")
        role = ROLES.get(message["role"])
        if role is None:
            raise _bad(f"messages[{index}]: role {json.dumps(message['role'])} is not supported (system, user "
                       "and assistant messages are; the swarm runs no tools)", "messages")
        if message.get("tool_calls") or message.get("function_call"):
            raise _bad(f"messages[{index}]: tool calls are not supported", "messages")
        turns.append((role, _content(message, index)))
    size = sum(len(content) for _, content in turns)
    if size > MAX_PROMPT_CHARS:
        raise _bad(f"the messages' contents are {size} characters; a request carries at most {MAX_PROMPT_CHARS}",
                   "messages")
    return tuple(turns)


def chat_request(body: Any) -> ApiRequest:
    """A `POST /v1/chat/completions` body as an ask with the model's chat template (`chat=True`).

    One user message goes as the prompt, which the seed renders as one user turn (any seed reads that);
    any other conversation goes whole as the generate's `messages`, rendered by the seed with the
    model's template and covered by the answer's signature like the prompt."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    turns = _turns(body.get("messages"))
    if len(turns) == 1 and turns[0][0] == "user":
        return _common(body, turns[0][1], True, ("max_completion_tokens", "max_tokens"))
    return _common(body, "", True, ("max_completion_tokens", "max_tokens"), turns)


def completion_request(body: Any) -> ApiRequest:
    """A `POST /v1/completions` body as a plain-text ask (`prompt`: a string, or a list of one)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string (or a list of one string)", "prompt")
    return _common(body, prompt, False, ("max_tokens",))


# ---------------------------------------------------------------------- answer mapping


FINISH_REASON = {"eos": "stop", "length": "length", "context": "length"}  # runtime's -> OpenAI's


def finish_reason(reason: str, stopped: bool) -> str:
    """OpenAI's finish_reason: a stop string or the model's end is "stop"; running out of tokens or
    context is "length"."""
    return "stop" if stopped else FINISH_REASON.get(reason, "stop")


def usage(result: AskResult) -> dict[str, int]:
    prompt = result.prompt_tokens or 0  # None: the seed did not say
    return {"prompt_tokens": prompt, "completion_tokens": result.tokens, "total_tokens": prompt + result.tokens}


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopFilter:
    """Streams text up to the first stop string: holds back a tail that could begin one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text, stopped = cut_at_stop(self.held + piece, self.stops)
        if stopped:
            self.stopped, self.held = True, ""
            return text
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return "" if self.stopped else out


class ReplayGuard:
    """Text of a restarted ask, after what was already sent: the new attempt's text is held until it
    covers what the client has, and must begin with it."""

    def __init__(self) -> None:
        self.sent = ""
        self.replay: str | None = None  # what the new attempt must re-produce before anything goes out
        self.again = ""

    def restart(self) -> None:
        if self.sent:
            self.replay, self.again = self.sent, ""

    def feed(self, piece: str) -> str:
        if self.replay is None:
            self.sent += piece
            return piece
        self.again += piece
        if not (self.again.startswith(self.replay) or self.replay.startswith(self.again)):
            raise ApiError("a seed failed mid-answer and the seed that took over answered differently; "
                           "the streamed text cannot be corrected", 502, "server_error", None, "answer_restarted",
                           hint="retry the request, or pass temperature 0 (or a seed) for answers that repeat")
        if len(self.again) < len(self.replay):
            return ""
        rest = self.again[len(self.replay):]
        self.replay, self.again = None, ""
        self.sent += rest
        return rest


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def response_body(api: ApiRequest, result: AskResult, ident: str, created: int) -> dict[str, Any]:
    text, stopped = cut_at_stop(result.text, api.stop)
    reason = finish_reason(result.finish_reason, stopped)
    if api.ask.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {
        "id": ident, "object": "chat.completion" if api.ask.chat else "text_completion", "created": created,
        "model": api.model, "choices": [choice], "usage": usage(result),
        "system_fingerprint": result.model_id[:16],  # which model id the name resolved to
    }


def chunk_body(api: ApiRequest, ident: str, created: int, text: str | None, reason: str | None,
               *, first: bool = False) -> dict[str, Any]:
    if api.ask.chat:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
    return {"id": ident, "object": "chat.completion.chunk" if api.ask.chat else "text_completion",
            "created": created, "model": api.model, "choices": [choice]}


# ---------------------------------------------------------------------- asking


Asker = Callable[[AskRequest, AskEvents], Awaitable[AskResult]]


def run_ask(ctx: Context, trackers: list[str], store: Store, privacy: PrivacyOptions) -> Asker:
    """An ask exactly as `gtorrent ask` makes it (node.ask), on a shared context and store."""
    from .asker import ask_direct
    from .private import ask_private

    async def one(request: AskRequest, events: AskEvents) -> AskResult:
        if privacy.direct:
            return await ask_direct(ctx, trackers, request, store, events)
        return await ask_private(
            ctx, trackers, request, store, events,
            paths=privacy.paths, hops=privacy.hops, strict=privacy.strict, allow_one_hop=privacy.allow_one_hop,
            rules=RelayRules(privacy.min_relay_age_s, privacy.distinct_networks),
        )

    return one


async def list_models(ctx: Context, trackers: list[str]) -> list[dict[str, Any]]:
    """The models the trackers list seeds for: id (the model id), name (the name most of its seeds give),
    seeds (how many seeds list it)."""
    found = await discover(ctx, trackers, role="seed")
    names: dict[str, dict[str, int]] = {}
    seeds: dict[str, set[str]] = {}
    for record in found.records.values():
        for info in record.models:
            names.setdefault(info.model_id, {}).setdefault(info.name, 0)
            names[info.model_id][info.name] += 1
            seeds.setdefault(info.model_id, set()).add(record.peer_id)
    return [
        {"id": mid, "object": "model", "created": 0, "owned_by": OWNED_BY,
         "name": max(sorted(names[mid]), key=lambda n: names[mid][n]), "seeds": len(seeds[mid])}
        for mid in sorted(seeds)
    ]


# ---------------------------------------------------------------------- the application


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


@dataclass(frozen=True)
class RequestLog:
    """What one HTTP request did, for a server's log line (`make_app`'s `on_request`). The strings
    `path` and `model` come from the client as sent: show them as data."""

    method: str
    path: str
    status: int  # the HTTP status sent; 499: the client went away first
    seconds: float
    model: str | None = None  # as the client named it
    model_id: str | None = None  # the model id the ask went to
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None  # the error's code (also for an error sent inside a stream, after a 200)


# what the request being handled will say in its RequestLog (set by the logging middleware in the
# request's own task; a context variable rather than request storage, whose typed keys need aiohttp 3.12)
_LOG: ContextVar[dict[str, Any] | None] = ContextVar("gtorrent_api_log", default=None)


def _log_info(request: web.Request) -> dict[str, Any]:
    info = _LOG.get()
    return info if info is not None else {}


def _error_response(request: web.Request, error: ApiError) -> web.Response:
    _log_info(request)["error"] = error.code or error.kind
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _error_response(request, exc)
    except GtorrentError as exc:
        return _error_response(request, error_for(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        return _error_response(request, ApiError(exc.reason, exc.status, "invalid_request_error", None, code))


def _logging(on_request: Callable[[RequestLog], None]) -> Middleware:
    """The outermost middleware: one RequestLog per request, when its response is sent or the client
    went away."""

    @web.middleware
    async def log(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        started = time.perf_counter()
        info: dict[str, Any] = {}
        token = _LOG.set(info)
        status = 499
        try:
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            info.setdefault("error", "client_disconnected")
            raise
        except Exception:  # aiohttp answers 500 for what no handler caught
            status = 500
            info.setdefault("error", "internal")
            raise
        finally:
            _LOG.reset(token)
            on_request(RequestLog(request.method, request.path, status, time.perf_counter() - started, **info))

    return log


def make_app(models: Callable[[], Awaitable[list[dict[str, Any]]]], asker: Asker, api_key: str | None,
             on_request: Callable[[RequestLog], None] | None = None) -> web.Application:
    """The aiohttp application: `models()` lists the swarm's models, `asker` runs one ask, `on_request`
    hears of each request as it ends (RequestLog)."""

    @web.middleware
    async def _auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if api_key is not None:
            given = request.headers.get("Authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                raise ApiError("invalid API key: pass it as `Authorization: Bearer KEY`", 401,
                               "invalid_request_error", None, "invalid_api_key")
        return await handler(request)

    async def get_models(request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": await models()})

    async def body_of(request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"the request body is not valid JSON ({exc})", None) from None

    async def chat(request: web.Request) -> web.StreamResponse:
        return await answer(request, chat_request(await body_of(request)))

    async def completions(request: web.Request) -> web.StreamResponse:
        return await answer(request, completion_request(await body_of(request)))

    async def answer(request: web.Request, api: ApiRequest) -> web.StreamResponse:
        ident, created = completion_id(api.ask.chat), int(time.time())
        _log_info(request).update(model=api.model, stream=api.stream)
        if not api.stream:
            result = await asker(api.ask, AskEvents())
            _answered(request, result)
            return web.json_response(response_body(api, result, ident, created))
        return await stream(request, api, ident, created)

    def _answered(request: web.Request, result: AskResult) -> None:
        _log_info(request).update(model_id=result.model_id, prompt_tokens=result.prompt_tokens,
                                  completion_tokens=result.tokens)

    async def stream(request: web.Request, api: ApiRequest, ident: str, created: int) -> web.StreamResponse:
        restarted = object()
        pieces: asyncio.Queue[str | object | None] = asyncio.Queue()
        events = AskEvents(on_text=pieces.put_nowait, on_restart=lambda *_: pieces.put_nowait(restarted))
        task = asyncio.ensure_future(asker(api.ask, events))
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        guard, stops = ReplayGuard(), StopFilter(api.stop)
        started = False

        async def send(text: str | None, reason: str | None = None) -> None:
            nonlocal started
            if not started:  # headers go out with the first text, so errors before it get their status
                await response.prepare(request)
                if api.ask.chat:  # OpenAI's first chat chunk carries the role
                    await response.write(_sse(chunk_body(api, ident, created, "", None, first=True)))
                started = True
            if text or reason:
                await response.write(_sse(chunk_body(api, ident, created, text, reason)))

        try:
            while (item := await pieces.get()) is not None:
                if item is restarted:
                    guard.restart()
                    continue
                assert isinstance(item, str)
                text = stops.feed(guard.feed(item))
                if text:
                    await send(text)
            result = task.result()  # raises the ask's error
            _answered(request, result)
            await send(stops.flush() or None)
            await send(None, finish_reason(result.finish_reason, stops.stopped))
            if api.include_usage:
                await response.write(_sse({"id": ident, "object": "chat.completion.chunk" if api.ask.chat
                                           else "text_completion", "created": created, "model": api.model,
                                           "choices": [], "usage": usage(result)}))
        except GtorrentError as exc:
            if not started:
                raise
            error = error_for(exc)
            _log_info(request)["error"] = error.code or error.kind
            await response.write(_sse(error.body()))  # the status went out with the headers
        finally:
            if not task.done():  # the client went away, or the answer could not be streamed
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, GtorrentError):
                    await task
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response

    middlewares: list[Middleware] = [_errors, _auth]
    if on_request is not None:
        middlewares.insert(0, _logging(on_request))  # outermost: it sees the status the others settle on
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/v1/models", get_models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    return app


# ---------------------------------------------------------------------- serving


def parse_bind(bind: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT) -> (host, port)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid --bind {bind!r}", hint=f"use HOST:PORT, e.g. {DEFAULT_API_HOST}:{DEFAULT_API_PORT}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to serve the swarm beyond this machine without a key: anyone who reaches the port could
    ask through this node's identity and reputation."""
    if api_key is None and not is_loopback(host):
        raise UsageError(
            f"refusing to serve the API on {host} without an API key: anyone who can reach it could use it",
            hint="pass --api-key KEY (clients send `Authorization: Bearer KEY`), or bind 127.0.0.1",
        )


def app_runner(app: web.Application) -> web.AppRunner:
    """The runner every server of `make_app` runs under: a client's disconnect cancels its handler,
    and so its ask (aiohttp leaves handlers running by default)."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None)


async def serve_api(settings: NodeSettings, host: str, port: int, privacy: PrivacyOptions, api_key: str | None,
                    on_ready: Callable[[str], None], stop: asyncio.Event | None = None,
                    on_request: Callable[[RequestLog], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or `stop`); `on_ready` gets the base URL (`http://HOST:PORT/v1`),
    `on_request` each request as it ends."""
    from .store import Store
    from .transport import new_context

    check_bind(host, api_key)
    store = Store.open(settings.home, None if settings.verifiers is None else set(settings.verifiers))
    ctx = new_context()
    app = make_app(lambda: list_models(ctx, settings.trackers), run_ask(ctx, settings.trackers, store, privacy), api_key,
                   on_request)
    runner = app_runner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror})",
                             hint="choose another port with --bind HOST:PORT") from None
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        on_ready(f"http://{shown}:{bound_port}/v1")
        if stop is None:  # a caller with its own `stop` (a test, an embedding program) keeps its signals
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        ctx.destroy(linger=0)
        store.close()


def run_api(settings: NodeSettings, bind: str, privacy: PrivacyOptions, api_key: str | None,
            on_ready: Callable[[str], None], on_request: Callable[[RequestLog], None] | None = None) -> None:
    host, port = parse_bind(bind)
    check_bind(host, api_key)
    asyncio.run(serve_api(settings, host, port, privacy, api_key, on_ready, on_request=on_request))


