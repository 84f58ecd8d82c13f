"""Bad input to the entry points issues 8 and 11 added: a clear `error:`/`hint:` (or the flag parser's
message) and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "args",
    [
        ("ask", "hi", "--min-relay-age", "-1"),
        ("ask", "hi", "--min-relay-age", "soon"),
        ("verify", "--challenges", "0"),
        ("verify", "--probation", "0"),
        ("verify", "--probation", "11"),
        ("verify", "--epoch", "0.1"),
        ("tracker", "--pow-bits", "29"),
        ("guards", "--tracker", "not-a-url"),
    ],
)
def test_bad_flags_are_refused_clearly(cli, args: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    done = cli(*args)
    assert done.code == 2 and "Traceback" not in done.err and done.err.strip(), done


def test_recheck_of_a_missing_or_foreign_file_says_what_is_wrong(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    missing = cli("verify", "--recheck", str(tmp_path / "nope.json"))
    assert missing.code != 0 and "error:" in missing.err and "cannot read" in missing.err, missing
    junk = tmp_path / "junk.json"
    junk.write_text('{"not": "evidence"}')
    foreign = cli("verify", "--recheck", str(junk))
    assert foreign.code != 0 and "not a gtorrent evidence file" in foreign.err and "Traceback" not in foreign.err
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "not a gtorrent evidence file" in cli("verify", "--recheck", str(binary)).err
