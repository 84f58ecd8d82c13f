"""`gtorrent api`: the OpenAI-compatible endpoint, driven by the real `openai` package and by raw HTTP,
against real swarms on loopback (tests/test_private.py's in-process `Swarm`, and real processes for the
command itself). The pure mapping (stop strings, restarts, finish reasons, request checks) is tested
table-driven without sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from gtorrent_cli.api import request_event, request_line

from gtorrent.api import (
    ApiError,
    ReplayGuard,
    RequestLog,
    StopFilter,
    app_runner,
    chat_request,
    check_bind,
    completion_request,
    cut_at_stop,
    error_for,
    finish_reason,
    make_app,
    parse_bind,
    serve_api,
)
from gtorrent.asker import AskEvents, AskRequest, AskResult, NoSeedError, UnknownModelError
from gtorrent.errors import UsageError
from gtorrent.node import NodeSettings, PrivacyOptions
from gtorrent.protocol import MAX_CHAT_MESSAGES, MAX_PROMPT_CHARS
from gtorrent.runtime import GenerationParams

from .procs import Proc, start_seed, start_tracker
from .test_private import PROMPT, Swarm

pytestmark = pytest.mark.timeout(90)

LOCAL_ONLY = {"min_relay_age_s": 0.0, "distinct_networks": False}  # every relay here is new and on 127.0.0.1


async def serve(swarm: Swarm, home: Path, *, direct: bool = True, api_key: str | None = None
                ) -> tuple[str, asyncio.Event, asyncio.Task[None]]:
    """`serve_api` on 127.0.0.1:0 over `swarm`; returns (base URL, stop, task)."""
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    settings = NodeSettings(home=home, trackers=[swarm.url])
    task = asyncio.create_task(serve_api(settings, "127.0.0.1", 0, PrivacyOptions(direct=direct, **LOCAL_ONLY),
                                         api_key, ready.set_result, stop))
    done, _ = await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert ready in done, f"the api did not start: {task}"
    return ready.result(), stop, task


@pytest.fixture
async def api(swarm: Swarm, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Starts the API over the test's swarm (after `swarm.start`); stopped after the test."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(**options: Any) -> str:
        url, stop, task = await serve(swarm, tmp_path / f"api{len(running)}", **options)
        running.append((stop, task))
        return url

    yield start
    for stop, task in running:
        stop.set()
        await asyncio.wait_for(task, 15)


def client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


# ---------------------------------------------------------------------- through the swarm


async def test_models_lists_the_swarms_models_with_their_seeds(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=0, seeds=2)
    url = await api()
    models = (await client(url).models.list()).data
    assert len(models) == 1
    assert models[0].id == swarm.model.model_id and models[0].owned_by == "gtorrent"
    extra = models[0].model_extra or {}
    assert extra["name"] == swarm.model.name and extra["seeds"] == 2


async def test_chat_completion_is_the_seeds_chat_answer(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=0)
    url = await api()
    reply = await client(url).chat.completions.create(
        model=swarm.model.name, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8,
    )
    local = swarm.model.generate("Say hello", GenerationParams(max_tokens=8), chat=True)
    assert reply.object == "chat.completion" and reply.model == swarm.model.name
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == local.text
    assert reply.choices[0].finish_reason == {"eos": "stop", "length": "length"}[local.finish_reason]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == local.prompt_tokens and reply.usage.completion_tokens == local.tokens
    assert reply.usage.total_tokens == local.prompt_tokens + local.tokens


@pytest.mark.timeout(120)
async def test_private_completion_equals_a_local_run(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=12)
    url = await api(direct=False)  # the default of `gtorrent api`: over onion paths
    reply = await client(url).completions.create(model=swarm.model.model_id, prompt=PROMPT, max_tokens=16)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == swarm.local(16) and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 16
    # every relay carried the ask: it went the private way
    assert sum(1 for frames in swarm.seen.values() if frames) >= 12


async def test_streaming_gives_the_same_text_in_chunks_then_done(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=0)
    url = await api()
    openai_client = client(url)
    chunks = [c async for c in await openai_client.completions.create(
        model=swarm.model.name, prompt=PROMPT, max_tokens=24, stream=True, stream_options={"include_usage": True})]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == swarm.local(24) and len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    chat = [c async for c in await openai_client.chat.completions.create(
        model=swarm.model.name, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, stream=True)]
    assert chat[0].choices[0].delta.role == "assistant"
    local = swarm.model.generate("Say hello", GenerationParams(max_tokens=8), chat=True).text
    assert "".join(c.choices[0].delta.content or "" for c in chat) == local
    # on the wire: server-sent events, the last one `data: [DONE]`
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/completions", json={"model": swarm.model.name, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    ) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in (await response.text()).split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


async def test_stop_strings_cut_the_answer(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=0)
    url = await api()
    full = swarm.local(24)
    stop = full[10:14]
    assert full.find(stop) == 10
    reply = await client(url).completions.create(model=swarm.model.name, prompt=PROMPT, max_tokens=24, stop=[stop])
    assert reply.choices[0].text == full[:10] and reply.choices[0].finish_reason == "stop"
    chunks = [c async for c in await client(url).completions.create(
        model=swarm.model.name, prompt=PROMPT, max_tokens=24, stop=stop, stream=True)]
    assert "".join(c.choices[0].text for c in chunks) == full[:10]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_concurrent_requests_share_the_process(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=0, seeds=2)
    url = await api()
    openai_client = client(url)
    replies = await asyncio.gather(*(
        openai_client.completions.create(model=swarm.model.name, prompt=PROMPT, max_tokens=12) for _ in range(4)))
    assert [r.choices[0].text for r in replies] == [swarm.local(12)] * 4
    assert len({r.id for r in replies}) == 4


async def test_unknown_model_is_404_in_openais_shape(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=0)
    url = await api()
    with pytest.raises(openai.NotFoundError) as caught:
        await client(url).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert caught.value.param == "model" and "no-such-model" in caught.value.message
    with pytest.raises(openai.NotFoundError):  # streamed too: the status goes out before any event
        await client(url).completions.create(model="no-such-model", prompt="hi", stream=True)


async def test_malformed_bodies_are_400_with_an_openai_error(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=0)
    url = await api()
    cases: list[tuple[str, bytes, str | None]] = [
        ("chat/completions", b"{not json", None),
        ("chat/completions", b"[1, 2]", None),
        ("chat/completions", json.dumps({"model": "m"}).encode(), "messages"),
        ("completions", json.dumps({"model": "m", "prompt": 5}).encode(), "prompt"),
        ("completions", json.dumps({"model": "m", "prompt": "x", "temperature": "hot"}).encode(), "temperature"),
        ("completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    ]
    async with aiohttp.ClientSession() as session:
        for path, body, param in cases:
            async with session.post(f"{url}/{path}", data=body, headers={"Content-Type": "application/json"}) as response:
                assert response.status == 400, (path, body)
                error = (await response.json())["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
                assert error["param"] == param and error["message"]
        async with session.get(f"{url}/nowhere") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"


async def test_a_wrong_api_key_is_401(swarm: Swarm, api: Any) -> None:
    await swarm.start(relays=0)
    url = await api(api_key="right-key")
    with pytest.raises(openai.AuthenticationError) as caught:
        await client(url, "wrong-key").models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    async with aiohttp.ClientSession() as session, session.get(f"{url}/models") as response:
        assert response.status == 401  # no key at all
    assert [m.id for m in (await client(url, "right-key").models.list()).data] == [swarm.model.model_id]


async def test_a_client_that_disconnects_cancels_its_ask() -> None:
    """The server wiring alone (an asker that waits for ever): closing the connection mid-stream
    cancels the ask."""
    asked, cancelled = asyncio.Event(), asyncio.Event()

    async def asker(request: AskRequest, events: AskEvents) -> AskResult:
        assert events.on_text is not None
        events.on_text("first ")
        asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    async with FakeApi(asker) as url:
        session = aiohttp.ClientSession()
        response = await session.post(f"{url}/completions", json={"model": "m", "prompt": "p", "stream": True})
        assert response.status == 200
        assert (await response.content.readuntil(b"\n\n")).startswith(b"data: ")
        await asyncio.wait_for(asked.wait(), 10)
        response.close()
        await session.close()
        await asyncio.wait_for(cancelled.wait(), 10)


def restarting_asker(again: str) -> Callable[[AskRequest, AskEvents], Awaitable[AskResult]]:
    """An ask whose first attempt sends "Hello wor" and fails, and whose second sends `again`."""

    async def asker(request: AskRequest, events: AskEvents) -> AskResult:
        assert events.on_text is not None and events.on_restart is not None
        for piece in ("Hello ", "wor"):
            events.on_text(piece)
        events.on_restart(None, "seed went silent", 2)  # type: ignore[arg-type]  # the stream ignores the record
        for piece in again.split("|"):
            events.on_text(piece)
            await asyncio.sleep(0)  # let each piece reach the handler on its own
        return AskResult(again.replace("|", ""), 4, "s" * 64, "m" * 64, "eos", 0.1, 0.2, 2, prompt_tokens=3)

    return asker


@pytest.mark.parametrize(
    "again,expected_text,expected_error",
    [
        ("Hel|lo |world|!", "Hello world!", None),  # the new seed repeats what was sent: only the rest goes out
        ("Hello| there", "Hello wor", "answer_restarted"),  # it does not: the stream ends with an error
    ],
)
async def test_a_restarted_ask_never_streams_text_twice(again: str, expected_text: str, expected_error: str | None) -> None:
    async with FakeApi(restarting_asker(again)) as url, aiohttp.ClientSession() as session, session.post(
        f"{url}/completions", json={"model": "m", "prompt": "p", "stream": True}
    ) as response:
        assert response.status == 200
        events = [e[6:] for e in (await response.text()).split("\n\n") if e]
    assert events[-1] == "[DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    assert "".join(b["choices"][0]["text"] for b in bodies if "choices" in b) == expected_text
    errors = [b["error"]["code"] for b in bodies if "error" in b]
    assert errors == ([expected_error] if expected_error else [])


class FakeApi:
    """`make_app` over a given asker, under `app_runner`, on 127.0.0.1:0."""

    def __init__(self, asker: Callable[[AskRequest, AskEvents], Awaitable[AskResult]],
                 on_request: Callable[[RequestLog], None] | None = None) -> None:
        async def no_models() -> list[dict[str, Any]]:
            return []

        self.runner = app_runner(make_app(no_models, asker, None, on_request))

    async def __aenter__(self) -> str:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


# ---------------------------------------------------------------------- conversations


CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is a list?"},
    {"role": "assistant", "content": "A list holds items in order."},
    {"role": "user", "content": [{"type": "text", "text": "And a "}, {"type": "text", "text": "tuple?"}]},
]
RENDERED = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": "A list holds items in order."},
            {"role": "user", "content": "And a tuple?"}]


async def test_a_multi_turn_chat_is_the_local_generation_of_the_conversation(swarm: Swarm, api: Any) -> None:
    """System, user and assistant turns reach the seed whole: the answer is the local generation of
    the conversation rendered by the model's template, streamed or not, with its prompt tokens."""
    await swarm.start(relays=0)
    url = await api()
    openai_client = client(url)
    reply = await openai_client.chat.completions.create(
        model=swarm.model.name, messages=CONVERSATION, max_tokens=10)  # type: ignore[arg-type]
    ids = swarm.model.encode_messages(RENDERED)
    local = swarm.model.generate(ids, GenerationParams(max_tokens=10))
    assert reply.choices[0].message.content == local.text
    assert reply.usage is not None and reply.usage.prompt_tokens == len(ids) == local.prompt_tokens
    # the system turn is part of what the seed rendered: without it the answer's prompt is shorter
    assert swarm.model.encode_messages(RENDERED[1:]) != ids
    chunks = [c async for c in await openai_client.chat.completions.create(
        model=swarm.model.name, messages=CONVERSATION, max_tokens=10, stream=True)]  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == local.text


async def test_malformed_chat_messages_are_400_naming_messages() -> None:
    """Refused at the API before any ask: roles the swarm cannot render, too many turns, too much
    text, content that is not text."""
    async def never(request: AskRequest, events: AskEvents) -> AskResult:
        raise AssertionError(f"asked {request}")

    user = {"role": "user", "content": "Hi"}
    cases = [
        [{"role": "tool", "content": "x", "tool_call_id": "1"}, user],
        [{"role": "function", "name": "f", "content": "x"}, user],
        [{"role": "wizard", "content": "x"}],
        [{"content": "x"}],
        [user] * (MAX_CHAT_MESSAGES + 1),
        [{"role": "system", "content": "x" * MAX_PROMPT_CHARS}, user],
        [{"role": "user", "content": 5}],
        [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, user],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
        [{"role": "user", "content": [{"type": "text", "text": 5}]}],
        "Hi",
        [],
    ]
    async with FakeApi(never) as url, aiohttp.ClientSession() as session:
        for messages in cases:
            async with session.post(f"{url}/chat/completions", json={"model": "m", "messages": messages}) as response:
                assert response.status == 400, messages
                error = (await response.json())["error"]
                assert error["param"] == "messages" and error["type"] == "invalid_request_error", error
    with pytest.raises(ApiError, match=r'"image_url"'):  # the part type refused is named
        chat_request({"model": "m", "messages": cases[8]})


def test_chat_request_mapping_of_conversations() -> None:
    """One user message is a chat prompt (any seed renders it as one user turn); anything else goes as
    `messages`, developer messages as system ones; the generate carries them."""
    from gtorrent.asker import generate_body

    one = chat_request({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}).ask
    assert (one.prompt, one.chat, one.messages) == ("Hi", True, ())
    assert "messages" not in generate_body(one, "0" * 64, "r")
    many = chat_request({"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi"}]}).ask
    assert (many.prompt, many.chat, many.messages) == ("", True, (("system", "Be brief."), ("user", "Hi")))
    assert generate_body(many, "0" * 64, "r")["messages"] == [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Hi"}]
    alone = chat_request({"model": "m", "messages": [{"role": "assistant", "content": "Hi"}]}).ask
    assert alone.messages == (("assistant", "Hi"),)  # not a user turn: sent as it is


def test_an_unknown_model_is_told_by_its_type() -> None:
    """UnknownModelError (asker.resolve_model) is 404 whatever its wording; other NoSeedErrors are 503."""
    assert error_for(UnknownModelError("any words")).status == 404
    assert error_for(UnknownModelError("any words")).code == "model_not_found"
    assert error_for(NoSeedError("no seed serves model 'x' (said differently)")).status == 503
    from gtorrent.asker import resolve_model

    with pytest.raises(UnknownModelError):
        resolve_model([record_serving("demo")], "other", lambda _: None)  # type: ignore[arg-type,return-value]


def record_serving(name: str) -> Any:
    import time

    from gtorrent.identity import Identity
    from gtorrent.protocol import ModelInfo, PeerRecord

    return PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:5000", roles=("seed",),
                           models=(ModelInfo("ab" * 32, name, 512),), load={}, seq=1, expires=time.time() + 60)


# ---------------------------------------------------------------------- request log


async def test_each_request_is_logged_once_with_its_outcome() -> None:
    """`on_request` hears of every request as it ends: answered (model, tokens, status), refused (the
    error's code), streamed, unknown routes, and a client that went away (499)."""
    logs: list[RequestLog] = []
    asked, five = asyncio.Event(), asyncio.Event()

    def on_request(log: RequestLog) -> None:
        logs.append(log)
        if len(logs) == 5:
            five.set()

    async def asker(request: AskRequest, events: AskEvents) -> AskResult:
        if request.prompt == "wait":
            assert events.on_text is not None
            events.on_text("x")
            asked.set()
            await asyncio.Event().wait()
        if events.on_text is not None:
            events.on_text("Hi")
        return AskResult("Hi", 2, "s" * 64, "m" * 64, "eos", 0.1, 0.2, 1, prompt_tokens=5)

    async with FakeApi(asker, on_request) as url, aiohttp.ClientSession() as session:
        async with session.post(f"{url}/completions", json={"model": "demo\x1b[2J", "prompt": "p"}) as response:
            assert response.status == 200
        async with session.post(f"{url}/completions", json={"model": "demo", "prompt": "p", "stream": True}) as response:
            assert (await response.text()).endswith("data: [DONE]\n\n")
        async with session.post(f"{url}/completions", json={"model": "demo", "prompt": 5}) as response:
            assert response.status == 400
        async with session.get(f"{url}/nowhere") as response:
            assert response.status == 404
        response = await session.post(f"{url}/completions", json={"model": "demo", "prompt": "wait", "stream": True})
        await asyncio.wait_for(asked.wait(), 10)
        response.close()
        await asyncio.wait_for(five.wait(), 10)
    answered, streamed, refused, missing, gone = logs
    assert (answered.method, answered.path, answered.status, answered.model) == ("POST", "/v1/completions", 200,
                                                                                 "demo\x1b[2J")
    assert (answered.prompt_tokens, answered.completion_tokens, answered.model_id) == (5, 2, "m" * 64)
    assert answered.error is None and not answered.stream and answered.seconds >= 0
    assert streamed.stream and streamed.status == 200 and streamed.completion_tokens == 2
    assert (refused.status, refused.error, refused.completion_tokens) == (400, "invalid_value", None)
    assert (missing.status, missing.path, missing.error) == (404, "/v1/nowhere", "not_found")
    assert (gone.status, gone.error) == (499, "client_disconnected")


def test_the_request_line_shows_client_strings_as_data() -> None:
    """The human line (rich markup) escapes markup and drops terminal controls from what the client sent;
    the JSON event keeps the strings exactly, as ASCII."""
    hostile = RequestLog("POST", "/v1/[bold]x\x1b[2J", 200, 0.25, model="[red]m\x1b]0;t\x07", stream=True,
                         prompt_tokens=5, completion_tokens=2)
    line = request_line(hostile)
    from rich.console import Console

    console = Console(record=True, width=200, color_system=None)
    console.print(line)
    shown = console.export_text()
    assert "[bold]x" in shown and "[red]m" in shown and "\x1b" not in shown and "\x07" not in shown
    assert "200 POST" in shown and "5 prompt + 2 answer tokens" in shown and "(stream)" in shown
    event = request_event(hostile)
    assert event["model"] == hostile.model and event["path"] == hostile.path and event["status"] == 200
    refused = request_line(RequestLog("POST", "/v1/chat/completions", 404, 0.01, model="nope", error="model_not_found"))
    assert "404 POST /v1/chat/completions" in refused and "model_not_found" in refused


# ---------------------------------------------------------------------- the command


@pytest.mark.timeout(120)
def test_gtorrent_api_serves_the_openai_client(tmp_path: Path) -> None:
    """The command, with its request log: a line per request on stderr, `--json` one JSON event per line
    on stdout, `-q` none."""
    tracker, url = start_tracker(tmp_path / "t")
    seed = api = json_api = quiet = None
    try:
        seed, _ = start_seed(tmp_path / "s", [url])
        api = Proc(["api", "--bind", "127.0.0.1:0", "--tracker", url, "--direct"], tmp_path / "a")
        base = api.wait_for(r"api on (http://\S+)").group(1)
        sync = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
        [model] = sync.models.list().data
        api.wait_for(r"^\d\d:\d\d:\d\d 200 GET /v1/models · ")  # NodeLog's activity lines: local time first
        reply = sync.completions.create(model=model.id, prompt=PROMPT, max_tokens=8)
        assert reply.choices[0].text and reply.usage is not None and reply.usage.completion_tokens == 8
        line = api.wait_for(r"^\d\d:\d\d:\d\d 200 POST /v1/completions · model (\w+) · (\d+) prompt \+ 8 answer tokens · ")
        assert line.group(1) == model.id and int(line.group(2)) == reply.usage.prompt_tokens
        assert api.terminate() == 0

        json_api = Proc(["api", "--bind", "127.0.0.1:0", "--tracker", url, "--direct", "--json"], tmp_path / "j")
        base = json_api.wait_for(r"api on (http://\S+)").group(1)
        sync = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.NotFoundError):
            sync.chat.completions.create(model="nope\u202e", messages=[{"role": "user", "content": "hi"}])
        sync.completions.create(model=model.id, prompt=PROMPT, max_tokens=4)
        assert json_api.terminate() == 0
        assert json_api.popen.stdout is not None
        raw = json_api.popen.stdout.read()
        assert raw.isascii()
        ready, refused, answered, stopped = [json.loads(line) for line in raw.splitlines()]
        assert (ready["event"], ready["url"], ready["mode"], stopped["event"]) == ("ready", base, "direct", "stopped")
        assert refused["event"] == "request" and refused["status"] == 404 and refused["model"] == "nope\u202e"
        assert refused["error"] == "model_not_found" and refused["path"] == "/v1/chat/completions"
        assert answered["status"] == 200 and answered["completion_tokens"] == 4 and answered["model_id"] == model.id
        assert answered["method"] == "POST" and answered["error"] is None and answered["seconds"] > 0

        quiet = Proc(["api", "--bind", "127.0.0.1:0", "--tracker", url, "--direct", "-q"], tmp_path / "q")
        base = quiet.wait_for(r"api on (http://\S+)").group(1)
        openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60).models.list()
        assert quiet.terminate() == 0
        assert quiet.popen.stderr is not None and quiet.popen.stdout is not None
        rest = list(iter(quiet.lines.get, None))  # to the end of its stderr
        assert not [line for line in rest if "/v1/" in line] and quiet.popen.stdout.read() == ""
        assert any("api stopped" in line for line in rest)
    finally:
        for proc in (api, json_api, quiet, seed, tracker):
            if proc is not None:
                proc.kill()


def test_api_privacy_flags_are_checked_as_asks_check_them(cli: Any) -> None:
    """`api` shares `ask`'s private-ask options, --paths' S-IDA minimum included, refused before it binds."""
    result = cli("api", "--paths", "2")
    assert result.code == 2
    assert "error: --paths must be at least 3 (the S-IDA threshold)" in result.err and "hint:" in result.err


def test_a_non_loopback_bind_needs_an_api_key(cli: Any) -> None:
    result = cli("api", "--bind", "0.0.0.0:0")
    assert result.code == 2
    assert "error: refusing to serve the API on 0.0.0.0 without an API key" in result.err
    assert "hint: pass --api-key KEY" in result.err
    for host in ("192.168.1.20", "::", "example.org"):
        with pytest.raises(UsageError):
            check_bind(host, None)
    for host in ("127.0.0.1", "127.5.5.5", "::1", "localhost"):
        check_bind(host, None)
    check_bind("0.0.0.0", "a-key")
    assert parse_bind("[::1]:8080") == ("::1", 8080)
    with pytest.raises(UsageError):
        parse_bind("7780")


# ---------------------------------------------------------------------- pure mapping


@pytest.mark.parametrize(
    "stops,pieces,expected",
    [
        ((), ["ab", "cd"], "abcd"),
        (("cd",), ["ab", "c", "d", "ef"], "ab"),
        (("cd",), ["abc", "e"], "abce"),  # a held "c" that does not go on to "cd" goes out
        (("xyz", "b"), ["a", "bxyz"], "a"),  # the earliest stop wins
        (("END",), ["E", "N", "D!"], ""),
    ],
)
def test_stop_filter_streams_up_to_the_first_stop(stops: tuple[str, ...], pieces: list[str], expected: str) -> None:
    stop = StopFilter(stops)
    out = "".join(stop.feed(p) for p in pieces) + stop.flush()
    assert out == expected
    assert cut_at_stop("".join(pieces), stops) == (expected, stop.stopped)  # the same cut as a whole answer


def test_replay_guard_sends_only_what_a_restarted_ask_adds() -> None:
    guard = ReplayGuard()
    assert guard.feed("Hello ") + guard.feed("wor") == "Hello wor"
    guard.restart()
    assert [guard.feed(p) for p in ("Hel", "lo ", "world", "!")] == ["", "", "ld", "!"]
    guard.restart()
    assert guard.feed("Hello") == ""
    with pytest.raises(ApiError) as caught:
        guard.feed(" there")
    assert caught.value.status == 502 and caught.value.code == "answer_restarted"
    fresh = ReplayGuard()
    fresh.restart()  # nothing was sent yet: nothing to hold
    assert fresh.feed("x") == "x"


def test_finish_reasons_map_to_openais() -> None:
    assert [finish_reason(r, False) for r in ("eos", "length", "context")] == ["stop", "length", "length"]
    assert finish_reason("length", True) == "stop"


def test_request_mapping() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "temperature": 0.7, "top_p": 0.9, "max_completion_tokens": 9, "seed": 5, "stop": "x", "top_k": 3}
    mapped = chat_request(body)
    assert mapped.ask == AskRequest("hi", "m", 9, 0.7, 3, 0.9, 5, True) and mapped.stop == ("x",)
    assert completion_request({"model": "m", "prompt": ["p"]}).ask == AskRequest("p", "m", chat=False)
    defaults = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "n": 1, "logprobs": False}
    assert completion_request({"model": "m", "prompt": "p", **defaults}).ask == AskRequest("p", "m")
    for bad, param in [
        ({"model": "m", "messages": [{"role": "tool", "content": "s"}, {"role": "user", "content": "u"}]}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "u"}], "n": 2}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "u"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "u"}], "seed": True}, "seed"),
        ({"model": "m", "messages": [{"role": "user", "content": "u"}], "stop": ["a"] * 5}, "stop"),
        ({"messages": [{"role": "user", "content": "u"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "u"}], "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": "m", "messages": [{"role": "user", "content": "u"}], "logit_bias": {"1": 5}}, "logit_bias"),
    ]:
        with pytest.raises(ApiError) as caught:
            chat_request(bad)
        assert caught.value.status == 400 and caught.value.param == param
