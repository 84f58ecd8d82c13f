"""The tracker's two ports are both chosen by its operator: the bootstrap port (`--bind`) and the CurveZMQ
port (`--curve-port`, default the bootstrap port + 1), so a firewall can admit them before it starts.

Real sockets on 127.0.0.1: a client that knows only the bootstrap URL reaches the tracker's CurveZMQ
socket at the port chosen, as the tracker's signed record advertises it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from gtorrent.discovery import TrackerClient
from gtorrent.errors import UsageError
from gtorrent.identity import Identity
from gtorrent.protocol import MAX_RECORD_TTL_S, PeerRecord
from gtorrent.tracker import TrackerService, curve_port_for


@contextmanager
def held_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port some other program listens on (for the clash tests), free again afterwards."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        sock.listen()
        yield sock.getsockname()[1]


@contextmanager
def held_port_above_a_free_one() -> Iterator[int]:
    """A port P held by another program, with P - 1 free (the bootstrap port whose default CurveZMQ port
    is taken)."""
    for _ in range(200):
        with held_port() as busy, socket.socket() as below:
            try:
                below.bind(("127.0.0.1", busy - 1))
            except OSError:
                continue
            below.close()
            yield busy
            return
    raise RuntimeError("no free port below a held one")


def free_port() -> int:
    with held_port() as port:
        return port


def free_pair() -> int:
    """A port P such that P and P + 1 are free on 127.0.0.1 (P + 1: the default CurveZMQ port)."""
    for _ in range(200):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


@asynccontextmanager
async def tracker(bind: str, advertise: str | None = None, curve_port: int | None = None) -> AsyncIterator[TrackerService]:
    service = TrackerService(Identity.generate(), None)
    try:
        service.bind(bind, advertise, curve_port)
        serving = asyncio.create_task(service.serve())
        try:
            yield service
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    finally:
        service.close()


async def reaches(ctx: Any, url: str) -> str:
    """Announce a peer through the bootstrap URL alone and list it back; the CurveZMQ endpoint used."""
    client = TrackerClient(ctx, url, timeout_s=5.0)
    peer = Identity.generate()
    record = PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:9", roles=("relay",), seq=1,
                             expires=time.time() + MAX_RECORD_TTL_S / 2)
    await client.announce(record)
    listing = await client.listing(role="relay")
    assert peer.peer_id in listing.records
    assert client.record is not None
    return client.record.endpoint


async def test_curve_port_is_the_one_given_and_a_client_reaches_it(ctx: Any) -> None:
    port = free_port()
    async with tracker("tcp://127.0.0.1:0", curve_port=port) as service:
        assert service.server.endpoint == service.own_record().endpoint == f"tcp://127.0.0.1:{port}"
        assert await reaches(ctx, service.url) == f"tcp://127.0.0.1:{port}"


async def test_curve_port_defaults_to_the_bind_port_plus_one_advertised(ctx: Any) -> None:
    port = free_pair()
    # bound on every interface, advertised at the address clients use: both ports keep their numbers
    async with tracker(f"tcp://0.0.0.0:{port}", advertise="127.0.0.1") as service:
        assert service.url == f"tcp://127.0.0.1:{port}"
        assert service.own_record().endpoint == f"tcp://127.0.0.1:{port + 1}"
        assert await reaches(ctx, service.url) == f"tcp://127.0.0.1:{port + 1}"


async def test_port_zero_still_takes_any_free_ports(ctx: Any) -> None:
    async with tracker("tcp://127.0.0.1:0") as service:
        bootstrap = int(service.url.rsplit(":", 1)[1])
        curve = int(service.own_record().endpoint.rsplit(":", 1)[1])
        assert bootstrap != curve and 0 not in (bootstrap, curve)
        assert await reaches(ctx, service.url) == service.own_record().endpoint


@pytest.mark.parametrize(("bootstrap", "given", "chosen"), [
    (7700, None, 7701),  # the default: next to the bootstrap port
    (0, None, 0),  # an unnamed bootstrap port: any free one for both
    (7700, 9000, 9000),
    (7700, 0, 0),  # asked for any free port
    (0, 7700, 7700),
])
def test_curve_port_table(bootstrap: int, given: int | None, chosen: int) -> None:
    assert curve_port_for(bootstrap, given) == chosen


@pytest.mark.parametrize(("bootstrap", "given", "says"), [
    (7700, 7700, "is the bootstrap port too"),
    (65535, None, "65535 has none"),
    (7700, 70000, "invalid CurveZMQ port"),
])
def test_curve_port_refusals_have_hints(bootstrap: int, given: int | None, says: str) -> None:
    with pytest.raises(UsageError) as info:
        curve_port_for(bootstrap, given)
    assert says in info.value.message and "--curve-port" in (info.value.hint or "")


def test_cli_curve_port_clash_says_which_port_and_how_to_fix(cli) -> None:  # type: ignore[no-untyped-def]
    with held_port() as busy:
        done = cli("tracker", "--bind", "tcp://127.0.0.1:0", "--curve-port", str(busy))
    assert done.code == 2, done
    assert f"error: cannot bind tcp://127.0.0.1:{busy}" in done.err and "CurveZMQ port" in done.err
    assert "hint: pass --curve-port PORT with another free port" in done.err


def test_cli_default_curve_port_clash_names_the_flag(cli) -> None:  # type: ignore[no-untyped-def]
    with held_port_above_a_free_one() as busy:  # the port after the bootstrap port is someone else's
        done = cli("tracker", "--bind", f"tcp://127.0.0.1:{busy - 1}")
    assert done.code == 2, done
    assert f"error: cannot bind tcp://127.0.0.1:{busy}" in done.err and "CurveZMQ port" in done.err
    assert "hint: pass --curve-port PORT" in done.err


def test_cli_curve_port_equal_to_bind_port_is_refused(cli) -> None:  # type: ignore[no-untyped-def]
    done = cli("tracker", "--bind", "tcp://127.0.0.1:7799", "--curve-port", "7799")
    assert done.code == 2 and "error: --curve-port 7799 is the bootstrap port too" in done.err
    assert "hint:" in done.err


def test_the_verifier_listens_where_bind_says(cli) -> None:  # type: ignore[no-untyped-def]
    """Every port a node listens on is settable, the verifier's too: `verify --bind` is the socket it
    binds (a held port fails there, before any tracker is asked)."""
    with held_port() as busy:
        done = cli("verify", "--bind", f"tcp://127.0.0.1:{busy}", "--tracker", f"tcp://127.0.0.1:{free_port()}",
                   "--epochs", "1")
    assert done.code != 0, done
    assert f"cannot bind tcp://127.0.0.1:{busy}" in done.err and "hint:" in done.err
    assert "Traceback" not in done.err
