"""Remote strings are data: no peer can crash a table or drive the user's terminal with what it sends.

Model names, endpoints and answer text come from other peers. The CLI must show them as text: rich
markup escaped, control characters (ESC, BEL, C1, bidi overrides) removed, answer newlines and tabs
kept. The tracker refusing such names (protocol validation) is a separate layer; these tests build rows
and store rows directly, so the display is safe whatever the validation lets through.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gtorrent_cli import output
from gtorrent_cli.peers import peers_table
from rich.console import Console
from rich.text import Text

from gtorrent.identity import Identity
from gtorrent.node import PeerRow

from .procs import start_tracker

HOSTILE = [
    "[/x]",
    "[bold red]x",
    "\x1b]0;pwned\x07",
    "\x1b[31mred",
    "\x9b31mcsi",
    "\u202eevil\u2066",
    "[link=file:///etc/passwd]click[/link]",
    "[@click=app.quit]x[/]",
    "trailing\\",
    ":pile_of_poo:",
    "two\nlines\r",
    "lone \ud800 surrogate",
]
TERMINAL_CONTROLS = ("\x1b", "\x07", "\x9b", "\x08", "\r", "\u202e", "\u2066", "\ud800")


def assert_no_controls(text: str) -> None:
    for control in TERMINAL_CONTROLS:
        assert control not in text, (control, text)


def row(model_name: str, **fields: Any) -> PeerRow:
    values: dict[str, Any] = {
        "peer_id": "a" * 26,
        "roles": ["seed"],
        "models": [{"model_id": "f" * 64, "name": model_name, "context_length": 1024}],
        "endpoint": "tcp://127.0.0.1:7701",
        "online": False,
        "reputation": None,
        "state": "unverified",
        "reliability": 0.5,
        "asks_ok": 0,
        "asks_failed": 0,
        "median_ttft_s": None,
        "median_tokens_per_s": None,
        "queue": None,
        "last_seen": time.time(),
    }
    values.update(fields)
    return PeerRow(**values)


# ------------------------------------------------------------------ the two sanitizers


@pytest.mark.parametrize("text", HOSTILE)
def test_remote_is_plain_text_under_markup(text: str) -> None:
    shown = Text.from_markup(output.remote(text), emoji=False).plain  # must not raise MarkupError
    assert_no_controls(shown)
    assert "\n" not in shown and "\t" not in shown
    # inside the caller's markup it renders back to exactly the plain text and cannot close the tag
    # (standalone, rich shows a trailing backslash doubled: its escape guards against a following "[")
    wrapped = Text.from_markup(f"[bold]{output.remote(text)}[/] after", emoji=False)  # as our consoles
    assert wrapped.plain == output.plain(text) + " after"
    assert [span.end for span in wrapped.spans] == [len(output.plain(text))]


def test_remote_keeps_ordinary_text() -> None:
    for text in ("gtorrent-demo", "llama-3.1-8b [q4]", "模型 café", "a\tb c"):
        assert output.plain(text) == text.replace("\t", " ")


def test_answer_text_keeps_newlines_and_tabs_only() -> None:
    assert output.answer_text("def f():\n\treturn 1\n") == "def f():\n\treturn 1\n"
    assert output.answer_text("a\x1b[2J\x1b]0;pwned\x07b\rc\x9b1m\u202ed") == "a[2J]0;pwnedbc1md"
    assert output.answer_text("مرحبا \u200f") == "مرحبا \u200f"  # a bidi mark (not an override) is text


def test_write_text_strips_escapes_from_streamed_pieces(capsys: pytest.CaptureFixture[str]) -> None:
    # an escape sequence split across two streamed pieces is defused piece by piece
    for piece in ("line one\n\tindented \x1b", "[31mred\x1b]8;;http://evil\x07link\n", "bell\x07 \ud800end"):
        output.write_text(piece)
    written = capsys.readouterr().out
    assert_no_controls(written)
    assert written == "line one\n\tindented [31mred]8;;http://evillink\nbell \ufffdend"


def test_json_output_round_trips_without_raw_controls(capsys: pytest.CaptureFixture[str]) -> None:
    value = {"text": "".join(HOSTILE), "models": [{"name": name} for name in HOSTILE]}
    output.print_json(value)
    written = capsys.readouterr().out
    assert_no_controls(written)
    assert "\x85" not in written and "\x7f" not in written
    assert json.loads(written) == value  # the data itself is kept exactly


# ------------------------------------------------------------------ peers table and `gtorrent peers`


@pytest.mark.parametrize("name", HOSTILE)
def test_peers_command_shows_hostile_model_names_as_text(cli, monkeypatch: pytest.MonkeyPatch, name: str) -> None:  # type: ignore[no-untyped-def]
    import gtorrent_cli.peers as peers_cmd

    rows = [row(name), row("ok", peer_id="b" * 26, online=True, reputation=0.7, state="trusted", roles=["relay", "seed"])]
    monkeypatch.setattr(peers_cmd, "list_peers", lambda settings, model: (rows, {"tcp://t:1": f"said {name}"}))
    result = cli("peers")
    assert result.code == 0, result
    assert_no_controls(result.out + result.err)
    assert "aaaaaaaa" in result.out and "bbbbbbbb" in result.out
    if name.startswith("["):
        assert name.split("]")[0] in result.out  # the markup shows up literally
    as_json = cli("peers", "--json")
    assert as_json.code == 0 and json.loads(as_json.out)[0]["models"][0]["name"] == name


def test_peers_table_escapes_every_column() -> None:
    hostile = row("[/m]", peer_id="[/p]\x1b[2J", roles=["[/r]"], endpoint="tcp://[/e]\x1b]0;t\x07:1")
    buffer = io.StringIO()
    Console(file=buffer, width=300, emoji=False, highlight=False).print(peers_table([hostile]))
    shown = buffer.getvalue()
    assert_no_controls(shown)
    for literal in ("[/p]", "[/r]", "[/m]", "tcp://[/e]]0;t:1"):
        assert literal in shown


def rendered(renderable: Any) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=300, emoji=False, highlight=False).print(renderable)
    return buffer.getvalue()


def test_peers_table_shows_trust_state_in_words() -> None:
    rows = [
        row("m", peer_id="t" * 26, reputation=0.687, state="trusted", last_epoch=3, last_consensus=0.7,
            verifiers=3, verifiers_agreed=3),
        row("m", peer_id="u" * 26, reputation=0.191, state="untrusted", last_epoch=3, last_consensus=0.2,
            verifiers=3, verifiers_agreed=2),
        row("m", peer_id="n" * 26),
    ]
    lines = {line.split()[0]: line for line in rendered(peers_table(rows)).splitlines() if line.strip()}
    header = lines["PEER"]
    for column in ("REPUTATION", "STATE", "LAST C", "AGREED"):
        assert column in header
    assert "0.69" in lines["tttttttt"] and " trusted " in lines["tttttttt"] and "3/3" in lines["tttttttt"]
    assert "0.19" in lines["uuuuuuuu"] and " untrusted " in lines["uuuuuuuu"] and "2/3" in lines["uuuuuuuu"]
    assert " unverified " in lines["nnnnnnnn"] and "0.50" not in lines["nnnnnnnn"]  # no R shown when none
    assert "1 untrusted" in lines["3"]


def history_home(home: Path, verifiers: int = 3, liar: bool = True) -> tuple[str, list[str]]:
    """A store in `home` holding 3 epochs of verdicts on one seed: honest verifiers give 0.7, a liar 0."""
    from gtorrent.protocol import Verdict
    from gtorrent.store import Store

    seed = Identity.generate().peer_id
    signers = [Identity.generate() for _ in range(verifiers)]
    store = Store.open(home)
    try:
        for epoch in range(3):
            store.add_verdicts([
                Verdict.sign(v, seed=seed, model_id="ab" * 32, epoch=epoch, evidence="cd" * 32, challenges=3,
                             credibility=0.0 if liar and i == 0 else 0.7)
                for i, v in enumerate(signers)
            ])
    finally:
        store.close()
    return seed, [v.peer_id for v in signers]


@pytest.mark.timeout(60)
def test_peers_peer_id_shows_the_verdict_history(cli, gtorrent_home: Path, tracker_url: str) -> None:  # type: ignore[no-untyped-def]
    seed, verifiers = history_home(gtorrent_home)
    result = cli("peers", seed[:8], "--tracker", tracker_url)  # the table's short id is enough
    assert result.code == 0, result
    assert f"{seed}: trusted (R 0.69 after 3 epochs)" in result.out
    assert "verdicts of any verifier count (the trackers admit any)" in result.out  # whose, and why
    lines = [line.split() for line in result.out.splitlines() if line.strip()]
    header = lines[2]
    assert header[0] == "EPOCH" and header[-5:] == ["CONSENSUS", "AGREED", "R", "AFTER", "STATE"]
    for verifier in verifiers:
        assert f"C {verifier[:8]}" in result.out
    body = lines[3:]
    assert [r[0] for r in body] == ["0", "1", "2"]
    # each epoch: the liar's 0.000 among two 0.700s, consensus 0.700 agreed by 2 of 3, R 0.62 0.668 0.687
    assert [r[1:4].count("0.000") for r in body] == [1, 1, 1]
    assert [r[-4:] for r in body] == [["0.700", "2/3", "0.620", "trusted"], ["0.700", "2/3", "0.668", "trusted"],
                                      ["0.700", "2/3", "0.687", "trusted"]]
    as_json = cli("peers", seed, "--json", "--tracker", tracker_url)
    doc = json.loads(as_json.out)
    assert doc["trust"] == {"source": "any", "verifiers": None, "detail": None}
    assert doc["state"] == "trusted" and [e["reputation"] for e in doc["epochs"]] == pytest.approx([0.62, 0.668, 0.6872])
    assert len(doc["verdicts"]) == 9 and all("signature" in v and "verifier_key" in v for v in doc["verdicts"])
    from gtorrent.protocol import Verdict

    assert {Verdict.from_wire(v).verifier for v in doc["verdicts"]} == set(verifiers)  # they re-verify
    assert doc["epochs"][0]["credibilities"][verifiers[0]] == 0.0


@pytest.mark.timeout(90)
def test_peers_peer_id_counts_the_same_verifiers_as_the_list(cli, gtorrent_home: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`gtorrent peers PEER_ID` without --verifier trusted any verifier on HEAD, so verifiers no tracker
    admits (here three fresh identities framing an honest seed) decided the history while the list view
    ignored them. Now it counts what the list counts: --verifier, else the trackers' admitted set, and
    says which; with no tracker to say, none."""
    from gtorrent.protocol import Verdict
    from gtorrent.store import Store

    from .procs import Proc

    seed = Identity.generate().peer_id
    admitted, framers = Identity.generate(), [Identity.generate() for _ in range(3)]
    store = Store.open(gtorrent_home)
    try:
        for epoch in range(3):
            store.add_verdicts([
                Verdict.sign(v, seed=seed, model_id="ab" * 32, epoch=epoch, evidence="cd" * 32, challenges=3,
                             credibility=0.9 if v is admitted else 0.0)
                for v in (admitted, *framers)
            ])
    finally:
        store.close()
    tracker = Proc(["tracker", "--bind", "tcp://127.0.0.1:0", "--verifier", admitted.peer_id], tmp_path / "tracker")
    try:
        url = tracker.wait_for(r"tracker (tcp://\S+)").group(1)
        shown = cli("peers", seed, "--tracker", url)
        assert shown.code == 0, shown
        assert f"{seed}: trusted" in shown.out and "verdicts of 3 verifiers not trusted here are left out" in shown.out
        assert "verdicts of the 1 verifier(s) the trackers admit count" in shown.out
        doc = json.loads(cli("peers", seed, "--tracker", url, "--json").out)
        assert doc["state"] == "trusted" and doc["trust"]["source"] == "trackers"
        assert doc["trust"]["verifiers"] == [admitted.peer_id] and sorted(doc["untrusted_verifiers"]) == sorted(
            f.peer_id for f in framers)
    finally:
        tracker.kill()
    # --verifier names them itself: no tracker is asked
    named = json.loads(cli("peers", seed, "--verifier", framers[0].peer_id, "--tracker", "tcp://127.0.0.1:9", "--json").out)
    assert named["trust"]["source"] == "config" and named["state"] == "untrusted"
    # no tracker answers and none named: no verdict counts (never "any"), and a warning says why
    lost = cli("peers", seed, "--tracker", url)
    assert lost.code == 0 and f"{seed}: unverified" in lost.out and "no verdict counts: no tracker answered" in lost.out
    assert "warning:" in lost.err


def test_peers_peer_id_unknown_or_ambiguous(cli, gtorrent_home: Path) -> None:  # type: ignore[no-untyped-def]
    missing = cli("peers", "zzzzzzzz")
    assert missing.code != 0 and "error: no peer 'zzzzzzzz' is known here" in missing.err and "hint:" in missing.err
    hostile = cli("peers", "[/x]\x1b]0;t\x07")
    assert hostile.code != 0 and "error:" in hostile.err
    assert_no_controls(hostile.out + hostile.err)


@pytest.mark.timeout(60)
def test_peers_json_carries_the_last_epochs_verdicts(gtorrent_home: Path, tracker_url: str) -> None:
    import asyncio

    from gtorrent.node import peer_rows
    from gtorrent.protocol import ModelInfo, PeerRecord
    from gtorrent.store import Store
    from gtorrent.transport import new_context

    seed_identity = Identity.generate()
    history_home(gtorrent_home, liar=False)  # verdicts on a seed with no record: not a row
    record = PeerRecord.sign(seed_identity, endpoint="tcp://127.0.0.1:7701", roles=("seed",),
                             models=(ModelInfo("f" * 64, "m", 1024),), seq=1, expires=time.time() + 600)
    store = Store.open(gtorrent_home)
    store.saw_peers([record])
    from gtorrent.protocol import Verdict

    store.add_verdicts([Verdict.sign(Identity.generate(), seed=record.peer_id, model_id="f" * 64, epoch=5,
                                     credibility=0.1, challenges=3, evidence="cd" * 32)])

    async def rows() -> Any:
        ctx = new_context()
        try:
            return await peer_rows(ctx, [tracker_url], store)
        finally:
            ctx.destroy(linger=0)

    try:
        (only,), failed = asyncio.run(rows())
    finally:
        store.close()
    doc = only.as_json()
    assert failed == {} and doc["peer_id"] == record.peer_id
    assert doc["state"] == "untrusted" and doc["reputation"] == pytest.approx(0.4 * 0.5 + 0.5 * 0.1)  # punished
    assert (doc["last_epoch"], doc["last_consensus"], doc["verifiers"], doc["verifiers_agreed"]) == (5, 0.1, 1, 1)
    (verdict,) = doc["verdicts"]
    assert Verdict.from_wire(verdict).seed == record.peer_id
    json.dumps(doc)  # plain JSON


@pytest.fixture(scope="module")
def tracker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_tracker(tmp_path_factory.mktemp("tracker"))
    yield url
    proc.kill()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["[/x]", "\x1b]0;pwned\x07"])
def test_peers_with_hostile_record_in_store_exits_0(cli, gtorrent_home, tracker_url: str, name: str) -> None:  # type: ignore[no-untyped-def]
    # A record that once got into the store must not keep `gtorrent peers` crashing (exit 70 on every
    # run until the store was deleted). Record validation may now drop the row when it is read back;
    # either way the command succeeds and prints no control character.
    from gtorrent.protocol import ModelInfo, PeerRecord
    from gtorrent.store import Store

    record = PeerRecord.sign(
        Identity.generate(),
        endpoint="tcp://127.0.0.1:7701",
        roles=("seed",),
        models=(ModelInfo("f" * 64, name, 1024),),
        seq=1,
        expires=time.time() + 600,
    )
    store = Store.open(gtorrent_home)
    try:
        store.saw_peers([record])
    finally:
        store.close()
    result = cli("peers", "--tracker", tracker_url)
    assert result.code == 0, result
    assert_no_controls(result.out + result.err)


def test_errors_and_warnings_strip_controls(capsys: pytest.CaptureFixture[str]) -> None:
    output.error("seed said [/x] \x1b]0;pwned\x07", hint="\x1b[31mretry")
    output.warning("tracker said [bold]\x9b2J", hint="[/]")
    written = capsys.readouterr().err
    assert_no_controls(written)
    assert "error: seed said [/x] ]0;pwned" in written and "hint: [31mretry" in written
    assert "warning: tracker said [bold]2J" in written and "hint: [/]" in written


@pytest.mark.timeout(120)
def test_demo_prints_a_prompt_with_markup_as_text(cli) -> None:  # type: ignore[no-untyped-def]
    # the real demo swarm on loopback; the prompt is echoed through rich, which `[/x]` used to crash
    result = cli("demo", "[/x] The for statement\x1b[2J", "--max-tokens", "4")
    assert result.code == 0, result
    assert "[/x] The for statement[2J" in result.err and "answered privately" in result.err
    assert_no_controls(result.out + result.err)
    assert "PEER" in result.out and "peers" in result.out
