"""`gtorrent run`: generate locally with a model, no network (check a model; the baseline for overheads)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from gtorrent.paths import home_dir

from . import output
from .common import (
    FileOption,
    PromptArgument,
    ThreadsOption,
    TopPOption,
    check_top_p,
    compute_text,
    load_model,
    read_prompt,
)

Device = Literal["auto", "cpu", "cuda"]

MODEL_HELP = "Path of a model.onnx file or of its folder (default: the bundled demo model)."


def run_command(
    prompt: PromptArgument = None,
    file: FileOption = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="New tokens at most.")] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature; 0 is greedy.")
    ] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the K likeliest tokens (0: all).")] = 0,
    top_p: TopPOption = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Seed for reproducible sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Format the prompt with the model's chat template.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto (GPU when usable), cpu or cuda.")] = "auto",
    threads: ThreadsOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print timing and provider after the answer.")] = False,
) -> None:
    """Generate a continuation of PROMPT (or of --file, or stdin) locally, streaming it to the terminal."""
    from gtorrent.errors import UsageError
    from gtorrent.runtime import GenerationParams, SamplingParams

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}", hint="use --device auto, cpu or cuda")
    check_top_p(top_p)
    text = read_prompt(prompt, file, "run")
    params = GenerationParams(
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
        seed=seed,
    )
    lm = load_model(model, home_dir() / "cache", device, spinner=not json_output, threads=threads)
    result = lm.generate(text, params, chat=chat, on_text=None if json_output else output.write_text)
    if json_output:
        output.print_json(
            {
                "text": result.text,
                "tokens": result.tokens,
                "prompt_tokens": result.prompt_tokens,
                "finish_reason": result.finish_reason,
                "ttft_s": round(result.ttft_s, 6),
                "total_s": round(result.total_s, 6),
                "tokens_per_s": round(result.tokens_per_s, 3),
                "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
                "load_s": round(lm.load_s, 6),
                "provider": lm.provider,
                "threads": lm.threads or None,
                "model": lm.name,
                "model_id": lm.model_id,
            }
        )
        return
    output.write_text("\n")
    if verbose:
        output.info(
            f"[dim]model {lm.name} ({lm.model_id[:12]}) · load {output.human_seconds(lm.load_s)} · "
            f"first token {output.human_seconds(result.ttft_s)} · {result.tokens} tokens "
            f"({result.finish_reason}) in {output.human_seconds(result.total_s)} · "
            f"{result.decode_tokens_per_s:.1f} tokens/s · {compute_text(lm)}[/]"
        )
