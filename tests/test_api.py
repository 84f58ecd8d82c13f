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

from gtorrent.api import (
    ApiError,
    ReplayGuard,
    StopFilter,
    app_runner,
    chat_request,
    check_bind,
    completion_request,
    cut_at_stop,
    finish_reason,
    make_app,
    parse_bind,
    serve_api,
)
from gtorrent.asker import AskEvents, AskRequest, AskResult
from gtorrent.errors import UsageError
from gtorrent.node import NodeSettings, PrivacyOptions
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

    def __init__(self, asker: Callable[[AskRequest, AskEvents], Awaitable[AskResult]]) -> None:
        async def no_models() -> list[dict[str, Any]]:
            return []

        self.runner = app_runner(make_app(no_models, asker, None))

    async def __aenter__(self) -> str:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


# ---------------------------------------------------------------------- the command


@pytest.mark.timeout(120)
def test_gtorrent_api_serves_the_openai_client(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "t")
    seed = api = None
    try:
        seed, _ = start_seed(tmp_path / "s", [url])
        api = Proc(["api", "--bind", "127.0.0.1:0", "--tracker", url, "--direct"], tmp_path / "a")
        base = api.wait_for(r"api on (http://\S+)").group(1)
        sync = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
        [model] = sync.models.list().data
        reply = sync.completions.create(model=model.id, prompt=PROMPT, max_tokens=8)
        assert reply.choices[0].text and reply.usage is not None and reply.usage.completion_tokens == 8
        assert api.terminate() == 0
    finally:
        for proc in (api, seed, tracker):
            if proc is not None:
                proc.kill()


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
        ({"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}, "messages"),
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
