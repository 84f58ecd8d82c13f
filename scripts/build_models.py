"""Build the small ONNX models that gtorrent ships and tests with, offline and reproducibly.

Everything is trained or generated locally from text that ships with Python itself (the
reference-manual topics in ``pydoc_data.topics`` plus CPython's ``LICENSE.txt``, both under
the PSF licence); nothing is downloaded. Output folders follow the Hugging Face optimum
export layout (``model.onnx`` [+ ``model.onnx_data``], ``tokenizer.json``, ``config.json``,
``generation_config.json``, ``tokenizer_config.json``).

Subcommands (run from the repository root, in a build venv with torch, transformers,
tokenizers, onnx and numpy; onnxruntime is not needed here):

  demo      --out gtorrent/models/demo [--steps 1400 | --minutes M]
            Byte-level BPE tokenizer (vocab 1024) plus a 3.4M-parameter Llama-style model
            trained from scratch, exported with KV cache (Llama input order), weights in
            model.onnx_data. About 4 minutes on 2 CPU cores; ~15 MB of output.
  gpt2-test --out tests/models/gpt2-tiny [--steps 150 | --seconds S]
            A tiny GPT-2 (n_embd 64, 2 layers) trained ~45 s, exported with KV cache in GPT-2
            input order to OUT, without cache to OUT-nocache, and with KV cache but no
            position_ids input to OUT-nopos. About 1 minute.
  llama-small --out tests/models/llama-small [--steps 1000 | --seconds S]
            A small Llama (hidden 96, 2 layers, FFN 256) with the demo model's architecture,
            tokenizer and context, trained ~1 minute on the same corpus and exported like the
            demo (KV cache, Llama input order), weights inside model.onnx (~1.7 MB). The tests'
            "smaller model under the honest id" cheater (tests/cheaters.py). About 1 minute.
  fixtures  --out tests/models
            Hand-built ONNX graphs for error tests: not-an-lm/ and legacy-merged/. Instant.
  kv-slice  --out gtorrent/runtime
            The runtime's device-side KV slicer: one tiny graph per KV dtype (kv_slice_float32.onnx,
            kv_slice_float16.onnx), Slice along the sequence axis to a runtime `end`, so a prefix
            cache with IOBinding serves a shorter cached prefix without a host round trip. Instant,
            byte-for-byte reproducible with the same onnx version; the output is committed.
  random    --out DIR [--preset 100m|tiny]
            Llama-style model with random weights (no training) for benchmarks; the 100m preset
            (~110M params, ~540 MB) exports in well under a minute. Never commit its output.

The tokenizer is trained deterministically; ``gpt2-test``, ``fixtures`` and ``random`` copy
it from ``--tokenizer-from`` (default gtorrent/models/demo) when that folder has one and
otherwise train the same one again. Seeds are fixed and training runs a fixed number of
steps, so a rebuild with the same torch version and thread count (2) gives the same weights.
``--minutes`` / ``--seconds`` train for a time budget instead: the step count is fixed after
the first steps are timed, printed, and written to the README, so ``--steps`` repeats it.

Example: ``.buildvenv/bin/python scripts/build_models.py demo --out gtorrent/models/demo``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED = 1234
EOT = "<|endoftext|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SPECIAL_TOKENS = [EOT, USER, ASSISTANT, END]  # ids 0..3, in this order
VOCAB_SIZE = 1024
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEMO_DIR = REPO_ROOT / "gtorrent" / "models" / "demo"
EXTERNAL_DATA_NAME = "model.onnx_data"
OPSET = 17
DEMO_STEPS = 1400  # 2 x 256 tokens each: ~0.7M tokens, ~4 min on 2 cores
GPT2_STEPS = 700  # 16 x 128 tokens each: ~45 s on 2 cores
LLAMA_SMALL_STEPS = 1000  # 4 x 256 tokens each: ~1 min on 2 cores

# HF-style chat template. Any role other than "assistant" (user, system, tool) is rendered
# with the user marker so that no content is dropped.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% else %}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


def seed_everything(seed: int = SEED) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- corpus


def license_path() -> Path | None:
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return path if path.is_file() else None


def n_topics() -> int:
    import pydoc_data.topics

    return len(pydoc_data.topics.topics)


def corpus_documents() -> list[str]:
    """The training documents: every pydoc topic (sorted by key) and CPython's LICENSE.txt."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    docs = [topics[key].strip() + "\n" for key in sorted(topics)]
    lic = license_path()
    if lic is not None:
        docs.append(lic.read_text(encoding="utf-8").strip() + "\n")
    else:
        log("warning: CPython LICENSE.txt not found; training on pydoc topics only")
    return docs


def _sections(doc: str) -> list[tuple[str, str]]:
    """(heading, first prose paragraphs) for each reST-style section of a topic."""
    lines = doc.splitlines()
    found: list[tuple[str, int]] = []
    for i in range(len(lines) - 1):
        head, under = lines[i].strip(), lines[i + 1].strip()
        if (
            head
            and len(under) >= 3
            and len(set(under)) == 1
            and under[0] in "*=-~^"
            and abs(len(under) - len(head)) <= 2
        ):
            found.append((head, i + 2))
    out = []
    for n, (head, start) in enumerate(found):
        end = found[n + 1][1] - 2 if n + 1 < len(found) else len(lines)
        paragraphs = "\n".join(lines[start:end]).split("\n\n")
        answer = ""
        for para in paragraphs:
            if not para.strip() or para.startswith(" "):  # skip blank and indented code/grammar
                continue
            para = " ".join(para.split())
            if para.endswith(":"):  # it introduces code that the answer leaves out
                if not answer:
                    answer = para[:-1] + "."
                break
            answer = (answer + "\n\n" + para).strip()
            if len(answer) >= 200:
                break
        if len(answer) > 600:  # cut at the last sentence end that fits
            cut = answer.rfind(". ", 0, 600)
            answer = answer[: cut + 1] if cut > 100 else answer[:600]
        if len(answer) >= 40:
            out.append((head, answer))
    return out


def chat_examples(docs: Sequence[str]) -> list[str]:
    """Question/answer pairs in the chat format, made from section headings and their text.

    They teach the model the chat markers: after <|assistant|> it answers with documentation
    prose, then emits <|end|> and <|endoftext|>.
    """
    questions = ["Tell me about {}.", "What is {}?", "Explain {}."]
    out = []
    n = 0
    for doc in docs:
        for head, answer in _sections(doc):
            subject = "the " + head[4:] if head.startswith("The ") else head
            q = questions[n % len(questions)].format(subject)
            n += 1
            out.append(f"{USER}\n{q}{END}\n{ASSISTANT}\n{answer}{END}\n")
    return out


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer() -> Any:
    """Byte-level BPE, vocab 1024, special tokens first (ids 0..3). Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_documents(), trainer=trainer)
    return tok


def tokenizer_config(model_max_length: int, chat: bool) -> dict[str, Any]:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    cfg: dict[str, Any] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat:
        cfg["chat_template"] = CHAT_TEMPLATE
    return cfg


def load_or_train_tokenizer(src: Path | None) -> tuple[Any, Path | None]:
    """The demo tokenizer: from src/tokenizer.json if present, else trained afresh."""
    from tokenizers import Tokenizer

    if src is not None and (src / "tokenizer.json").is_file():
        log(f"tokenizer: reusing {src / 'tokenizer.json'}")
        return Tokenizer.from_file(str(src / "tokenizer.json")), src / "tokenizer.json"
    log("tokenizer: training byte-level BPE (vocab 1024)")
    return train_tokenizer(), None


def write_tokenizer(tok: Any, copied_from: Path | None, out: Path) -> None:
    if copied_from is not None:
        shutil.copyfile(copied_from, out / "tokenizer.json")
    else:
        tok.save(str(out / "tokenizer.json"), pretty=True)


def special_ids(tok: Any) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert all(v is not None for v in ids.values()), ids
    return ids


def token_stream(tok: Any) -> torch.Tensor:
    """All documents and chat examples, each followed by <|endoftext|>, as one int64 tensor."""
    docs = corpus_documents()
    texts = docs + chat_examples(docs)
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    n_chars = sum(len(t) for t in texts)
    log(
        f"corpus: {len(docs)} documents + {len(texts) - len(docs)} chat examples, {n_chars} chars, {len(ids)} tokens"
    )
    return torch.tensor(ids, dtype=torch.long)


def corpus_sha256() -> str:
    h = hashlib.sha256()
    for d in corpus_documents():
        h.update(d.encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------- training


def train(
    model: torch.nn.Module,
    stream: torch.Tensor,
    *,
    seq_len: int,
    batch_size: int,
    lr: float,
    budget_s: float,
    steps: int | None,
    warmup: int = 30,
    log_every: int = 50,
) -> dict[str, Any]:
    """AdamW + cosine schedule on random windows of the token stream.

    With steps=None the step count is fixed after timing steps 5..30 so that the run fits
    budget_s; the schedule depends only on that count, so --steps N repeats a run exactly.
    """
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    total = steps
    t_start = time.monotonic()
    t_probe = 0.0
    recent: list[float] = []
    history: list[tuple[int, float]] = []
    step = 0
    while total is None or step < total:
        if step == 5:
            t_probe = time.monotonic()
        if total is None and step == 30:
            per_step = (time.monotonic() - t_probe) / 25
            total = max(warmup, int((budget_s - (time.monotonic() - t_start)) / per_step) + step)
            log(f"train: {per_step * 1000:.0f} ms/step -> {total} steps for a {budget_s:.0f} s budget")
        sched_total = total if total is not None else 10**9
        if step < warmup:
            cur_lr = lr * (step + 1) / warmup
        else:
            progress = min(1.0, (step - warmup) / max(1, sched_total - warmup))
            cur_lr = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        step += 1
        if step % log_every == 0 or step == total:
            avg = sum(recent) / len(recent)
            history.append((step, avg))
            log(f"train: step {step}/{total} loss {avg:.3f} lr {cur_lr:.2e}")
            recent = []
    model.eval()
    elapsed = time.monotonic() - t_start
    tokens = step * batch_size * seq_len
    final = history[-1][1] if history else float("nan")
    log(
        f"train: done, {step} steps, {tokens} tokens in {elapsed:.0f} s ({tokens / elapsed:.0f} tok/s), final loss {final:.3f}"
    )
    return {
        "steps": step,
        "seconds": round(elapsed, 1),
        "tokens": tokens,
        "final_loss": round(final, 3),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "first_loss": round(history[0][1], 3) if history else None,
    }


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, tok: Any, prompt: str, n: int) -> str:
    ids = torch.tensor([tok.encode(prompt).ids])
    for _ in range(n):
        logits = model(input_ids=ids).logits[0, -1]
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return tok.decode(ids[0].tolist(), skip_special_tokens=False)


# --------------------------------------------------------------------------- export


def cache_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) for Llama- and GPT-2-style configs."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


def io_names(
    n_layers: int, with_cache: bool, order: str, with_position_ids: bool = True
) -> tuple[list[str], list[str]]:
    """Input and output names in optimum's order for the given architecture style; with
    with_position_ids=False there is no position_ids input (the model derives positions itself)."""
    past = (
        [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        if with_cache
        else []
    )
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")] if with_cache else []
    if order == "llama":
        inputs = ["input_ids", "attention_mask", "position_ids", *past]
    elif order == "gpt2":
        inputs = (
            ["input_ids", *past, "attention_mask", "position_ids"]
            if with_cache
            else ["input_ids", "attention_mask", "position_ids"]
        )
    else:
        raise ValueError(f"unknown input order {order!r}")
    if not with_position_ids:
        inputs.remove("position_ids")
    return inputs, ["logits", *present]


class _FlatDecoder(torch.nn.Module):
    """Takes the flat ONNX inputs by position, wraps the past tensors in a DynamicCache, and
    returns logits followed by the flat present tensors."""

    def __init__(self, model: torch.nn.Module, input_names: list[str], n_layers: int, with_cache: bool):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.n_layers = n_layers
        self.with_cache = with_cache

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        named = dict(zip(self.input_names, flat, strict=False))
        kwargs: dict[str, Any] = {
            "input_ids": named["input_ids"],
            "attention_mask": named["attention_mask"],
        }
        if "position_ids" in named:  # else the model computes them (past length onward)
            kwargs["position_ids"] = named["position_ids"]
        if self.with_cache:
            pairs = [
                (named[f"past_key_values.{i}.key"], named[f"past_key_values.{i}.value"])
                for i in range(self.n_layers)
            ]
            kwargs["past_key_values"] = DynamicCache(pairs)
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        if not self.with_cache:
            return (out.logits,)
        cache = out.past_key_values
        presents: list[torch.Tensor] = []
        for layer in cache.layers:
            presents.extend([layer.keys, layer.values])
        return (out.logits, *presents)


def export_onnx(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    with_cache: bool,
    order: str,
    external_data: bool,
    with_position_ids: bool = True,
) -> tuple[list[str], list[str]]:
    """Export model to out_dir/model.onnx with optimum-compatible names and dynamic axes.

    Uses the TorchScript exporter (dynamo=False): torch 2.13's default dynamo path fails on
    the varargs past tensors. The trace uses a padded attention mask and a non-empty past so
    that no shortcut for "no padding" or "no cache" gets baked into the graph; at run time
    the first step passes past tensors of length 0. With external_data the weights go to
    out_dir/model.onnx_data. With with_position_ids=False the graph has no position_ids input and
    the model's own default (for GPT-2: past length onward, ignoring padding) is traced in.
    """
    import onnx

    model.eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # plain MatMul/Softmax graph, explicit mask
    n_layers, kv_heads, head_dim = cache_geometry(model.config)
    input_names, output_names = io_names(n_layers, with_cache, order, with_position_ids)
    batch, seq, past = 2, 3, 4 if with_cache else 0
    vocab = model.config.vocab_size
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -seq:]
    dummy: dict[str, torch.Tensor] = {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)),
        "attention_mask": mask,
        "position_ids": position_ids,
    }
    dynamic_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {
            0: "batch_size",
            1: "past_sequence_length + sequence_length" if with_cache else "sequence_length",
        },
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    for i in range(n_layers):
        for kv in ("key", "value"):
            dummy[f"past_key_values.{i}.{kv}"] = torch.randn(batch, kv_heads, past, head_dim) * 0.1
            dynamic_axes[f"past_key_values.{i}.{kv}"] = {0: "batch_size", 2: "past_sequence_length"}
            dynamic_axes[f"present.{i}.{kv}"] = {0: "batch_size", 2: "past_sequence_length + sequence_length"}
    dynamic_axes = {k: v for k, v in dynamic_axes.items() if k in input_names or k in output_names}
    args = tuple(dummy[name] for name in input_names)
    wrapper = _FlatDecoder(model, input_names, n_layers, with_cache)

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "model.onnx"
    data_file = out_dir / EXTERNAL_DATA_NAME
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # TracerWarnings about shape-derived Python values; the graph is checked against
            # the torch model at other shapes (and past length 0) by the verification.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                args,
                str(tmp_path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp_path))  # pulls in any external data torch wrote
    # onnx appends to an existing external-data file, so never leave a stale one behind
    for stale in (target, data_file):
        if stale.exists():
            stale.unlink()
    if external_data:
        onnx.save_model(
            proto,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_NAME,
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(target))
    onnx.checker.check_model(str(target))
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != input_names or got_out != output_names:
        raise RuntimeError(f"exported names differ: {got_in} -> {got_out}")
    size = sum(p.stat().st_size for p in (target, data_file) if p.exists())
    log(
        f"export: {target} ({size / 1e6:.1f} MB, {time.monotonic() - t0:.1f} s, cache={with_cache}, order={order}, "
        f"position_ids={with_position_ids})"
    )
    return input_names, output_names


# --------------------------------------------------------------------------- sidecar files


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_config(model: torch.nn.Module, out: Path, architecture: str) -> None:
    cfg = model.config
    cfg.architectures = [architecture]
    cfg.use_cache = True
    cfg.save_pretrained(str(out))


def write_generation_config(out: Path, eos: int, bos: int, max_length: int) -> None:
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
            "do_sample": True,
            "temperature": 0.8,
            "top_k": 40,
            "top_p": 0.95,
            "repetition_penalty": 1.1,
            "max_length": max_length,
        },
    )


def copy_license(out: Path, intro: str) -> None:
    lic = license_path()
    body = lic.read_text(encoding="utf-8") if lic else "See https://docs.python.org/3/license.html\n"
    (out / "LICENSE").write_text(intro.rstrip() + "\n\n" + "=" * 72 + "\n\n" + body, encoding="utf-8")


LICENSE_INTRO = """\
The weights and tokenizer in this folder were trained only on text that ships with CPython:
the reference-manual topics in the standard-library module `pydoc_data.topics` and CPython's
LICENSE.txt. That text is Copyright (c) 2001 Python Software Foundation and is licensed under
the Python Software Foundation License Version 2 (PSF-2.0), reproduced below. This derived
model is distributed under the same terms.
"""


def humanize(n: int) -> str:
    return f"{n / 1e6:.2f}M"


# --------------------------------------------------------------------------- subcommands


def llama_config(tok: Any, eot: int, max_pos: int, *, hidden: int, ffn: int, layers: int, heads: int,
                 kv_heads: int) -> Any:
    """The Llama configuration of the models built here (demo, llama-small): only the size differs."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        initializer_range=0.02,
    )


def cmd_demo(a: argparse.Namespace) -> None:
    from transformers import LlamaForCausalLM

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything()
    t_total = time.monotonic()
    log("tokenizer: training byte-level BPE (vocab 1024)")
    tok = train_tokenizer()
    ids = special_ids(tok)
    eot = ids[EOT]
    stream = token_stream(tok)

    seed_everything()
    max_pos = 512
    config = llama_config(tok, eot, max_pos, hidden=256, ffn=768, layers=4, heads=8, kv_heads=4)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: Llama hidden 256, 4 layers, 8 heads / 4 kv heads, FFN 768, {humanize(n_params)} params")
    steps = None if a.minutes is not None else a.steps
    stats = train(
        model,
        stream,
        seq_len=256,
        batch_size=2,
        lr=2e-3,
        budget_s=(a.minutes or 0) * 60,
        steps=steps,
        log_every=100,
    )
    for prompt in ['The "for" statement', f'{USER}\nWhat is the "while" statement?{END}\n{ASSISTANT}\n']:
        log("sample (torch, greedy): " + repr(torch_greedy(model, tok, prompt, 40)))

    save_checkpoint(model, a.save_checkpoint)
    inputs, _ = export_onnx(model, out, with_cache=True, order="llama", external_data=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json", tokenizer_config(max_pos, chat=True))
    write_hf_config(model, out, "LlamaForCausalLM")
    write_generation_config(out, eos=eot, bos=eot, max_length=max_pos)
    copy_license(out, LICENSE_INTRO)
    (out / "README.md").write_text(demo_readme(n_params, stats, inputs, len(stream), ids), encoding="utf-8")
    log(f"demo: done in {time.monotonic() - t_total:.0f} s -> {out}")
    list_dir(out)


def demo_readme(
    n_params: int, stats: dict[str, Any], inputs: list[str], n_tokens: int, ids: dict[str, int]
) -> str:
    import platform

    import tokenizers
    import transformers

    return f"""# gtorrent demo model

A tiny Llama-style language model that ships with gtorrent so that a fresh install can run,
seed and verify a model without any download. It writes text that looks like the Python
reference manual; it is not a useful assistant.

## Files

| file | what |
|---|---|
| `model.onnx` + `model.onnx_data` | ONNX graph (opset {OPSET}) with KV cache; weights as external data |
| `tokenizer.json` | byte-level BPE, vocab {VOCAB_SIZE}, for the `tokenizers` library |
| `tokenizer_config.json` | special tokens and the chat template |
| `config.json`, `generation_config.json` | Hugging Face model config and sampling defaults |
| `LICENSE` | PSF licence of the training text (and so of this model) |

## Model

- `LlamaForCausalLM`: hidden 256, 4 layers, 8 attention heads / 4 KV heads (head dim 32), FFN 768,
  tied embeddings, RoPE, {humanize(n_params)} parameters, max_position_embeddings 512 (trained on 256-token windows).
- Special tokens: `<|endoftext|>` = {ids[EOT]} (bos, eos and pad), `<|user|>` = {ids[USER]},
  `<|assistant|>` = {ids[ASSISTANT]}, `<|end|>` = {ids[END]}.
- Chat format: `<|user|>\\n{{content}}<|end|>\\n<|assistant|>\\n{{content}}<|end|>\\n`; with
  `add_generation_prompt` the template appends `<|assistant|>\\n`. Roles other than `assistant`
  are rendered with the user marker. In training, answers end with `<|end|>\\n<|endoftext|>`.

ONNX inputs (optimum Llama order, bind by name): {", ".join(f"`{n}`" for n in inputs[:3])},
then `past_key_values.{{i}}.key` / `.value` for i = 0..3, float32 `[batch, 4, past, 32]`.
The first step passes past tensors of length 0. Outputs: `logits` `[batch, seq, {VOCAB_SIZE}]`,
then `present.{{i}}.key` / `.value`.

## Training data and licence

The corpus is text that ships with CPython {platform.python_version()}: all {n_topics()} topics in
`pydoc_data.topics` (the language reference as used by `help()`), CPython's `LICENSE.txt`, and
question/answer pairs made from the section headings and first paragraphs of those same topics.
Corpus SHA-256 (documents only): `{corpus_sha256()}`.
The text is © Python Software Foundation under the PSF License Version 2; see `LICENSE`.

## How it was built

```
python3 -m venv .buildvenv
.buildvenv/bin/pip install torch==2.13.0 transformers tokenizers onnx numpy
.buildvenv/bin/python scripts/build_models.py demo --out gtorrent/models/demo --steps {stats["steps"]}
```

Built with torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__},
2 CPU threads, seed {SEED}: {stats["steps"]} steps of {stats["batch_size"]} x {stats["seq_len"]} tokens ({stats["tokens"]} tokens) in
{stats["seconds"]:.0f} s, AdamW lr {stats["lr"]:g} with warmup and cosine decay; training loss {stats["first_loss"]} -> {stats["final_loss"]}.
About {stats["tokens"] / n_tokens:.1f} passes over the {n_tokens}-token corpus: the text has the vocabulary and layout
of the Python docs but its statements are mostly wrong. Exported with `torch.onnx.export(dynamo=False)`.
"""


def save_checkpoint(model: torch.nn.Module, path: str | None) -> None:
    """Optionally keep the trained torch weights (outside the model folder), e.g. to compare
    ONNX Runtime's logits with torch's or to continue training."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "architecture": type(model).__name__,
                "config": model.config.to_dict(),
                "state_dict": model.state_dict(),
            },
            path,
        )
        log(f"checkpoint: {path}")


def list_dir(out: Path) -> None:
    for p in sorted(out.iterdir()):
        if p.is_file():
            log(f"  {p.stat().st_size:>12,d}  {p}")


def tokenizer_source(a: argparse.Namespace) -> Path | None:
    return Path(a.tokenizer_from) if a.tokenizer_from else None


def cmd_gpt2_test(a: argparse.Namespace) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(a.out)
    out_nc = Path(str(out).rstrip("/") + "-nocache")
    out_np = Path(str(out).rstrip("/") + "-nopos")
    seed_everything()
    tok, tok_file = load_or_train_tokenizer(tokenizer_source(a))
    eot = special_ids(tok)[EOT]
    stream = token_stream(tok)
    seed_everything()
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        n_inner=256,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    log(
        f"model: GPT-2 n_embd 64, 2 layers, 4 heads, {humanize(sum(p.numel() for p in model.parameters()))} params"
    )
    steps = None if a.seconds is not None else a.steps
    stats = train(
        model,
        stream,
        seq_len=128,
        batch_size=16,
        lr=3e-3,
        budget_s=a.seconds or 0,
        steps=steps,
        log_every=100,
    )
    log("sample (torch, greedy): " + repr(torch_greedy(model, tok, 'The "for" statement', 30)))
    save_checkpoint(model, a.save_checkpoint)
    variants = (
        (out, True, True, "with KV cache", ""),
        (out_nc, False, True, "without KV cache", ""),
        (
            out_np,
            True,
            False,
            "with KV cache, no position_ids input",
            (
                f"Same weights as {out.name}; the graph derives positions from the past length, so it is\n"
                "only right without left padding (attention_mask all ones).\n"
            ),
        ),
    )
    for target, with_cache, with_pos, what, note in variants:
        export_onnx(
            model,
            target,
            with_cache=with_cache,
            order="gpt2",
            external_data=False,
            with_position_ids=with_pos,
        )
        write_tokenizer(tok, tok_file, target)
        write_hf_config(model, target, "GPT2LMHeadModel")
        write_generation_config(target, eos=eot, bos=eot, max_length=256)
        (target / "README.md").write_text(
            f"Tiny GPT-2 test model ({what}), built by\n"
            f"`scripts/build_models.py gpt2-test --out {out} --steps {stats['steps']}` "
            f"(final training loss {stats['final_loss']}).\nTrained on CPython's pydoc topics and LICENSE.txt (PSF License).\n"
            + note,
            encoding="utf-8",
        )
        list_dir(target)


def cmd_llama_small(a: argparse.Namespace) -> None:
    """The demo model's architecture (LlamaForCausalLM, RoPE, GQA, tied embeddings), tokenizer and
    context length at a fraction of its size: what a seed passing a cheaper model off as the demo
    would serve."""
    from transformers import LlamaForCausalLM

    out = Path(a.out)
    seed_everything()
    tok, tok_file = load_or_train_tokenizer(tokenizer_source(a))
    eot = special_ids(tok)[EOT]
    stream = token_stream(tok)
    seed_everything()
    max_pos = 512  # the demo's, so the same prompts and answer lengths fit
    config = llama_config(tok, eot, max_pos, hidden=96, ffn=256, layers=2, heads=4, kv_heads=2)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: Llama hidden 96, 2 layers, 4 heads / 2 kv heads, FFN 256, {humanize(n_params)} params")
    steps = None if a.seconds is not None else a.steps
    stats = train(
        model, stream, seq_len=256, batch_size=4, lr=3e-3, budget_s=a.seconds or 0, steps=steps, log_every=100
    )
    log("sample (torch, greedy): " + repr(torch_greedy(model, tok, 'The "for" statement', 30)))
    save_checkpoint(model, a.save_checkpoint)
    export_onnx(model, out, with_cache=True, order="llama", external_data=False)
    write_tokenizer(tok, tok_file, out)
    source = tokenizer_source(a)
    if source is not None and (source / "tokenizer_config.json").is_file():  # the same chat template
        shutil.copyfile(source / "tokenizer_config.json", out / "tokenizer_config.json")
    else:
        write_json(out / "tokenizer_config.json", tokenizer_config(max_pos, chat=True))
    write_hf_config(model, out, "LlamaForCausalLM")
    write_generation_config(out, eos=eot, bos=eot, max_length=max_pos)
    (out / "README.md").write_text(
        "Small Llama test model (the demo model's architecture, tokenizer and context; hidden 96,\n"
        f"2 layers, {humanize(n_params)} parameters, with KV cache), built by\n"
        f"`scripts/build_models.py llama-small --out {out} --steps {stats['steps']}` "
        f"(final training loss {stats['final_loss']}).\n"
        "Trained on CPython's pydoc topics and LICENSE.txt (PSF License).\n",
        encoding="utf-8",
    )
    list_dir(out)


def _fixture_config(**extra: Any) -> dict[str, Any]:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "use_cache": True,
    }
    cfg.update(extra)
    return cfg


def cmd_fixtures(a: argparse.Namespace) -> None:
    from onnx import TensorProto, helper

    root = Path(a.out)
    tok, tok_file = load_or_train_tokenizer(tokenizer_source(a))

    # not-an-lm: a valid graph and a valid sidecar set, but no input_ids -> logits.
    d = root / "not-an-lm"
    d.mkdir(parents=True, exist_ok=True)
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "not_an_lm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        initializer=[one],
    )
    save_fixture(
        helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="build_models.py"
        ),
        d,
    )
    write_tokenizer(tok, tok_file, d)
    write_json(d / "config.json", _fixture_config())

    # legacy-merged: old optimum decoder_model_merged.onnx interface with use_cache_branch.
    # logits are all 0 (or 1 when use_cache_branch), present = past ++ zeros for the new tokens.
    d = root / "legacy-merged"
    d.mkdir(parents=True, exist_ok=True)
    heads, head_dim = 2, 4

    def i64(name: str, vals: list[int]) -> Any:
        return helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals)

    def kv(name: str, length: str) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch_size", heads, length, head_dim])

    nodes = [
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Concat", ["ids_shape", "vocab"], ["logits_shape"], axis=0),
        helper.make_node("Cast", ["use_cache_branch"], ["branch_f"], to=TensorProto.FLOAT),
        helper.make_node("Expand", ["branch_f", "logits_shape"], ["logits"]),
        helper.make_node("Slice", ["ids_shape", "zero", "one_i"], ["batch"]),
        helper.make_node("Slice", ["ids_shape", "one_i", "two"], ["seq"]),
        helper.make_node("Concat", ["batch", "heads", "seq", "head_dim"], ["new_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape",
            ["new_shape"],
            ["new_kv"],
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]),
        ),
        helper.make_node("Concat", ["past_key_values.0.key", "new_kv"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "new_kv"], ["present.0.value"], axis=2),
    ]
    inits = [
        i64("vocab", [VOCAB_SIZE]),
        i64("zero", [0]),
        i64("one_i", [1]),
        i64("two", [2]),
        i64("heads", [heads]),
        i64("head_dim", [head_dim]),
    ]
    graph = helper.make_graph(
        nodes,
        "legacy_merged",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + sequence_length"]
            ),
            kv("past_key_values.0.key", "past_sequence_length"),
            kv("past_key_values.0.value", "past_sequence_length"),
            helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]),
        ],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB_SIZE]
            ),
            kv("present.0.key", "past_sequence_length + sequence_length"),
            kv("present.0.value", "past_sequence_length + sequence_length"),
        ],
        initializer=inits,
    )
    save_fixture(
        helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="build_models.py"
        ),
        d,
    )
    write_tokenizer(tok, tok_file, d)
    write_json(
        d / "config.json",
        _fixture_config(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=heads),
    )
    for sub in ("not-an-lm", "legacy-merged"):
        list_dir(root / sub)


def save_fixture(model: Any, d: Path) -> None:
    import onnx

    model.ir_version = 8  # loadable by any onnxruntime >= 1.10
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(d / "model.onnx"))


KV_SLICE_DTYPES = {"float32": "FLOAT", "float16": "FLOAT16"}  # the KV dtypes a GPU export uses


def kv_slice_model(dtype: str) -> Any:
    """sliced = data[:, :, :end[0], :] for a KV tensor [batch, heads, sequence, head_dim]: a new buffer
    on the session's device (gtorrent/runtime/model.py binds input and output there)."""
    from onnx import TensorProto, helper

    elem = getattr(TensorProto, KV_SLICE_DTYPES[dtype])
    graph = helper.make_graph(
        [helper.make_node("Slice", ["data", "starts", "end", "axes"], ["sliced"])],
        f"kv_slice_{dtype}",
        [
            helper.make_tensor_value_info("data", elem, ["batch", "heads", "sequence", "head_dim"]),
            helper.make_tensor_value_info("end", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("sliced", elem, ["batch", "heads", "end_0", "head_dim"])],
        initializer=[
            helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [2]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="build_models.py"
    )
    model.ir_version = 8  # loadable by any onnxruntime >= 1.10
    return model


def cmd_kv_slice(a: argparse.Namespace) -> None:
    import onnx

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for dtype in KV_SLICE_DTYPES:
        model = kv_slice_model(dtype)
        onnx.checker.check_model(model, full_check=True)
        path = out / f"kv_slice_{dtype}.onnx"
        path.write_bytes(model.SerializeToString(deterministic=True))
        log(f"{path}: {path.stat().st_size} bytes, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}")


PRESETS: dict[str, dict[str, Any]] = {
    # ~110M params; intermediate 2048 matches the benchmark model in research/dependencies.md
    "100m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "intermediate_size": 2048,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 512,
    },
}


def pad_tokenizer(path: Path, vocab_size: int) -> None:
    """Grow a BPE tokenizer.json to vocab_size with placeholder tokens <|extra_N|>.

    They have no merges, so encoding never produces them, but every id a random-weight model
    can emit decodes to something and the tokenizer's vocab size equals the model's.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    n = len(used)
    for i in range(max(used) + 1, vocab_size):
        vocab[f"<|extra_{i}|>"] = i
    if n < vocab_size:
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        log(f"tokenizer: padded from {n} to {vocab_size} ids with <|extra_N|> placeholders")


def cmd_random(a: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, tok_file = load_or_train_tokenizer(tokenizer_source(a))
    eot = special_ids(tok)[EOT]
    preset = PRESETS[a.preset]
    seed_everything()
    config = LlamaConfig(
        **preset,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        initializer_range=0.02,
    )
    t0 = time.monotonic()
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: random Llama preset {a.preset}, {humanize(n_params)} params, built in {time.monotonic() - t0:.1f} s"
    )
    save_checkpoint(model, a.save_checkpoint)
    export_onnx(model, out, with_cache=True, order="llama", external_data=True)
    write_tokenizer(tok, tok_file, out)
    pad_tokenizer(out / "tokenizer.json", preset["vocab_size"])
    write_json(out / "tokenizer_config.json", tokenizer_config(preset["max_position_embeddings"], chat=True))
    write_hf_config(model, out, "LlamaForCausalLM")
    write_generation_config(out, eos=eot, bos=eot, max_length=preset["max_position_embeddings"])
    (out / "README.md").write_text(
        f"Random-weight Llama ({a.preset}, {humanize(n_params)} params) for benchmarks, built by\n"
        f"`scripts/build_models.py random --preset {a.preset}`. Not trained: its output is noise.\n",
        encoding="utf-8",
    )
    list_dir(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for details.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    tok_help = "folder whose tokenizer.json to reuse (default: %(default)s; trained afresh if missing)"

    p = sub.add_parser("demo", help="train and export the bundled demo model (~4-5 min)")
    p.add_argument("--out", default="gtorrent/models/demo")
    p.add_argument(
        "--steps",
        type=int,
        default=DEMO_STEPS,
        help="training steps of 2 x 256 tokens (default: %(default)s, about 4 min on 2 cores)",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="train for this time budget instead of a fixed --steps (not bit-reproducible)",
    )
    p.add_argument(
        "--save-checkpoint", metavar="PATH", help="also save the torch weights here (not committed)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "gpt2-test", help="tiny GPT-2 test model: with KV cache, without, and without position_ids (~1 min)"
    )
    p.add_argument(
        "--out",
        default="tests/models/gpt2-tiny",
        help="cache variant; the others go to OUT-nocache and OUT-nopos",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=GPT2_STEPS,
        help="training steps of 16 x 128 tokens (default: %(default)s, ~45 s)",
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="train for this time budget instead of a fixed --steps"
    )
    p.add_argument("--tokenizer-from", default=str(DEFAULT_DEMO_DIR), help=tok_help)
    p.add_argument(
        "--save-checkpoint", metavar="PATH", help="also save the torch weights here (not committed)"
    )
    p.set_defaults(func=cmd_gpt2_test)

    p = sub.add_parser("llama-small", help="small Llama with the demo's architecture and tokenizer (~1 min)")
    p.add_argument("--out", default="tests/models/llama-small")
    p.add_argument(
        "--steps",
        type=int,
        default=LLAMA_SMALL_STEPS,
        help="training steps of 4 x 256 tokens (default: %(default)s, ~1 min)",
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="train for this time budget instead of a fixed --steps"
    )
    p.add_argument("--tokenizer-from", default=str(DEFAULT_DEMO_DIR), help=tok_help)
    p.add_argument(
        "--save-checkpoint", metavar="PATH", help="also save the torch weights here (not committed)"
    )
    p.set_defaults(func=cmd_llama_small)

    p = sub.add_parser("fixtures", help="hand-built broken/legacy ONNX graphs for error tests")
    p.add_argument("--out", default="tests/models")
    p.add_argument("--tokenizer-from", default=str(DEFAULT_DEMO_DIR), help=tok_help)
    p.set_defaults(func=cmd_fixtures)

    p = sub.add_parser("kv-slice", help="the runtime's device-side KV slice graphs (committed; instant)")
    p.add_argument("--out", default="gtorrent/runtime")
    p.set_defaults(func=cmd_kv_slice)

    p = sub.add_parser("random", help="random-weight Llama for benchmarks (never commit the output)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="100m")
    p.add_argument("--tokenizer-from", default=str(DEFAULT_DEMO_DIR), help=tok_help)
    p.add_argument("--save-checkpoint", metavar="PATH", help="also save the torch weights here")
    p.set_defaults(func=cmd_random)

    a = parser.parse_args(argv)
    torch.set_num_threads(2)
    import transformers

    transformers.logging.set_verbosity_error()  # padding/loss-type advice that does not apply here
    a.func(a)


if __name__ == "__main__":
    main()
