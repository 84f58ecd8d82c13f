"""`gtorrent verify`: challenge the seeds of a model and sign verdicts; `--recheck` re-scores evidence.

Thin over the library: node.run_verifier runs the verifier (gtorrent/verifier.py), verifier.recheck
re-scores an evidence file. Text goes to stderr as progress and one line per verdict; with --json,
one JSON event per line on stdout ({"event": "epoch" | "challenge" | "verdict" | "failed" | "recheck", ...}).

Challenges must look like users' asks, so the private-path flags (--paths, --hops, --allow-one-hop) are
`gtorrent ask`'s, with its names, bounds and defaults; a verifier that changes them makes its challenges
stand out among the asks a seed sees, and is told so in the help. Impossible shapes (fewer paths than the
S-IDA threshold, one-hop paths not allowed) are refused before the model loads, with ask's messages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gtorrent.errors import UsageError
from gtorrent.identity import short_id
from gtorrent.private import DEFAULT_HOPS, DEFAULT_PATHS
from gtorrent.routing import DEFAULT_MIN_HOPS, ONE_HOP_HINT

from . import output
from .common import (
    PATHS_HELP,
    AdvertiseOption,
    JsonOption,
    PathsOption,
    ThreadsOption,
    TrackerOption,
    check_path_count,
    load_model,
    settings,
)
from .run import MODEL_HELP

if TYPE_CHECKING:
    from gtorrent.verifier import VerifierSettings

_AS_USERS = " Challenges should look like users' asks: keep users' default unless the swarm is too small for it."


def check_paths(paths: int, hops: int, allow_one_hop: bool) -> None:
    """Refuse a path shape no private ask can take, as `gtorrent ask` does (private.ask_private's checks)."""
    check_path_count(paths)
    if hops < (1 if allow_one_hop else DEFAULT_MIN_HOPS):
        raise UsageError(f"--hops {hops}: with one relay per path, that relay sees both you and the seed",
                         hint=f"use --hops {DEFAULT_MIN_HOPS} or more, or {ONE_HOP_HINT}")


def _event(value: dict[str, Any]) -> None:
    """One JSON event on one line; ASCII only (remote text escaped, DEL too), nothing a terminal obeys."""
    sys.stdout.write(json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("\x7f", "\\u007f") + "\n")
    sys.stdout.flush()


def verify_command(
    model: Annotated[Path | None, typer.Argument(help=MODEL_HELP, show_default=False)] = None,
    tracker: TrackerOption = None,
    epoch: Annotated[float, typer.Option("--epoch", min=0.5, help="Epoch length in seconds (one verdict per seed each).")] = 60.0,
    challenges: Annotated[int, typer.Option("--challenges", min=1, max=1000, help="Challenges per seed and epoch.")] = 3,
    probation: Annotated[
        int | None, typer.Option("--probation", min=1, max=10, show_default=False,
                                 help="A seed not judged yet gets this many times --challenges in its first epoch "
                                      "[default: 3].")
    ] = None,  # None: gtorrent.challenges.PROBATION_FACTOR (imported late: it loads the model runtime)
    json_out: JsonOption = False,
    recheck_file: Annotated[
        Path | None, typer.Option("--recheck", help="Re-score an evidence file with MODEL and say whether you agree.")
    ] = None,
    max_epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Stop after this many epochs.")] = None,
    paths: Annotated[int, PathsOption(f"{PATHS_HELP}{_AS_USERS}")] = DEFAULT_PATHS,
    hops: Annotated[int, typer.Option("--hops", min=1, max=8, help=f"Relays per path (at most 8).{_AS_USERS}")] = DEFAULT_HOPS,
    allow_one_hop: Annotated[
        bool, typer.Option("--allow-one-hop", help="Let a private ask use one-hop paths (that relay sees you and the seed)."
                           f"{_AS_USERS}")
    ] = False,
    bind: Annotated[
        str, typer.Option("--bind", metavar="URL", help="Where the verifier listens: its record names this socket; "
                          "no peer contacts it today (tcp://HOST:PORT; port 0: any free port).")
    ] = "tcp://127.0.0.1:0",
    advertise: AdvertiseOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Verify the seeds that serve MODEL (without MODEL: the bundled demo model): hidden challenges over
    private paths, scored against MODEL, one signed verdict per seed and epoch."""
    from gtorrent.challenges import PROBATION_FACTOR
    from gtorrent.verifier import VerifierSettings

    # before the model loads: a shape no challenge could take is refused at once
    check_paths(paths, hops, allow_one_hop)
    shape = VerifierSettings(epoch_s=epoch, challenges=challenges, probation=probation or PROBATION_FACTOR,
                             paths=paths, hops=hops, allow_one_hop=allow_one_hop)
    node = settings(tracker, advertise)
    lm = load_model(model, node.home / "cache", threads=threads)
    if recheck_file is not None:
        _recheck(recheck_file, lm, json_out)
        return
    _verify(node, lm, shape, json_out, max_epochs, bind)


def _recheck(path: Path, lm: Any, json_out: bool) -> None:
    from gtorrent.verifier import recheck

    checked = recheck(path, lm)
    verdict = checked.verdict
    if json_out:
        _event({"event": "recheck", "agrees": checked.agrees, "verdict": verdict.to_wire(),
                           "credibility": checked.credibility, "scores": checked.scores, "problems": checked.problems})
    else:
        said = f"seed {verdict.seed} epoch {verdict.epoch}: verifier {short_id(verdict.verifier)} says C = {verdict.credibility:.3f}"
        if checked.agrees:
            output.write_text(f"agree: {said}; re-scored here C = {checked.credibility:.3f}\n")
        else:
            output.write_text(f"disagree: {said}; {'; '.join(checked.problems)}\n")
    if not checked.agrees:
        raise typer.Exit(1)


def _verify(node: Any, lm: Any, shape: VerifierSettings, json_out: bool, max_epochs: int | None, bind: str) -> None:
    from gtorrent.node import run_verifier
    from gtorrent.verifier import ChallengeResult, VerdictResult, VerifierEvents

    def on_epoch(epoch: int, seeds: list[Any]) -> None:
        if json_out:
            _event({"event": "epoch", "epoch": epoch, "seeds": [s.peer_id for s in seeds]})
        else:
            output.info(f"epoch {epoch}: {len(seeds)} seed(s) of {lm.model_id[:12]} to challenge")

    def on_challenge(result: ChallengeResult) -> None:
        sampling = result.challenge.sampling
        if json_out:
            # "signer": the seed that generated a forwarded answer, whose sample it counts in (verifier.py)
            _event({"event": "challenge", "epoch": result.epoch, "seed": result.seed, "signer": result.signer,
                               "greedy": sampling.greedy, "temperature": sampling.temperature,
                               "max_tokens": result.challenge.max_tokens, "calibrated": result.calibrated,
                               "paper": None if result.score is None else result.score.paper,
                               "tokens": None if result.answer is None else result.answer.tokens, "error": result.error,
                               "seed_failed": result.seed_failed})
        elif result.error is not None:
            output.warning(f"challenge to {short_id(result.seed)} failed: {result.error}")
        else:
            kind = "greedy" if sampling.greedy else f"T={sampling.temperature:g}"
            by = f", answered by {short_id(result.signer)}" if result.signer is not None else ""
            output.info(f"  challenge to {short_id(result.seed)} ({kind}{by}): score {result.calibrated:.3f}")

    def on_verdict(result: VerdictResult) -> None:
        verdict = result.verdict
        submitted = result.submitted
        if json_out:
            _event({"event": "verdict", "verdict": verdict.to_wire(),
                               "evidence_file": None if result.evidence_path is None else str(result.evidence_path),
                               "submitted": submitted})
            return
        where = f"taken by {len(node.trackers) - len(submitted)} of {len(node.trackers)} tracker(s)"
        line = (f"verdict: seed {verdict.seed} epoch {verdict.epoch} C = {verdict.credibility:.3f} "
                f"over {verdict.challenges} challenge(s), {where}")
        if result.evidence_path is not None:
            line += f"; evidence {result.evidence_path}"
        output.write_text(line + "\n")
        for url, message in submitted.items():
            output.warning(f"verdict not taken by {url}: {message}")

    def announced(errors: dict[str, str]) -> None:
        for url, message in errors.items():
            output.warning(f"announce to {url} failed: {message}")

    def failed(epoch: int, message: str) -> None:
        if json_out:
            _event({"event": "failed", "epoch": epoch, "error": message})
        else:
            output.warning(f"epoch {epoch} skipped: {message}")

    if not json_out:
        output.info(f"verifying seeds of [bold]{lm.name}[/] ({lm.model_id[:12]}) every {shape.epoch_s:g} s, "
                    f"{shape.challenges} challenge(s) each over {shape.paths} path(s) of {shape.hops} hop(s) · Ctrl-C to stop")
    summary = run_verifier(
        node, lm, shape,
        VerifierEvents(epoch=on_epoch, challenge=on_challenge, verdict=on_verdict, announced=announced, failed=failed),
        bind=bind, max_epochs=max_epochs,
    )
    if not json_out:
        output.info(f"verifier stopped ({summary['verdicts']} verdict(s) over {summary['epochs']} epoch(s))")
