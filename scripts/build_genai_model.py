"""Build tests/models/llama-genai: a tiny Llama in the ONNX Runtime GenAI layout, and its expected output.

The layout is what `python -m onnxruntime_genai.models.builder` writes: `model.onnx` + `model.onnx.data`,
`genai_config.json` (head size, KV heads, context length, EOS), the tokenizer files, and no `config.json`.
The graph uses com.microsoft GroupQueryAttention, declares the KV head size as a symbolic dim
(`kv_cache_dim`) and has no `position_ids` input.

The weights are random (seeded, no training) but drawn wide (initializer_range 0.3), so greedy
decoding has clear margins; the tokenizer and chat template are the demo model's. After building,
the script runs onnxruntime-genai's own greedy generator on PROMPT and writes the token ids to
`expected.json`, which tests/test_genai_layout.py compares gtorrent's greedy output with.

It needs a venv of its own, because onnxruntime-genai depends on the CPU `onnxruntime` (never install it
beside onnxruntime-gpu) and its builder needs torch, transformers 5.x and the undeclared `onnx-ir`:

    python3.11 -m venv /tmp/genai && /tmp/genai/bin/pip install onnxruntime-genai onnx-ir torch transformers
    /tmp/genai/bin/python scripts/build_genai_model.py --out tests/models/llama-genai
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_models as bm  # noqa: E402 - a sibling script, importable once its folder is on the path

PROMPT = 'The "for" statement'
GREEDY_TOKENS = 24


def build(out: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    bm.seed_everything()
    tok, tok_file = bm.load_or_train_tokenizer(bm.DEFAULT_DEMO_DIR)
    eot = bm.special_ids(tok)[bm.EOT]
    config = bm.llama_config(tok, eot, 512, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2)
    config.initializer_range = 0.3
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as scratch:
        hf_dir = Path(scratch) / "hf"
        model.save_pretrained(str(hf_dir))
        bm.write_tokenizer(tok, tok_file, hf_dir)
        bm.write_json(hf_dir / "tokenizer_config.json", bm.tokenizer_config(512, chat=True))
        bm.write_generation_config(hf_dir, eos=eot, bos=eot, max_length=512)
        if out.exists():
            shutil.rmtree(out)
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
             "-p", "fp32", "-e", "cpu", "-c", str(Path(scratch) / "cache")],
            check=True,
        )
    n_params = sum(p.numel() for p in model.parameters())
    expected = reference_greedy(out, tok)
    bm.write_json(out / "expected.json", expected)
    (out / "README.md").write_text(
        "Tiny Llama in the ONNX Runtime GenAI layout (hidden 64, 2 layers, 4 heads / 2 KV heads,\n"
        f"{n_params / 1e6:.2f}M random parameters, the demo model's tokenizer), built by\n"
        f"`scripts/build_genai_model.py --out {out}` with onnxruntime-genai's model builder\n"
        f"(torch {torch.__version__}). expected.json: onnxruntime-genai's greedy tokens for its prompt.\n",
        encoding="utf-8",
    )
    bm.list_dir(out)


def reference_greedy(out: Path, tok: object) -> dict[str, object]:
    import onnxruntime_genai as og

    cfg = og.Config(str(out))
    cfg.clear_providers()
    model = og.Model(cfg)
    prompt_ids = list(tok.encode(PROMPT).ids)  # type: ignore[attr-defined]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + GREEDY_TOKENS, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    tokens: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return {"prompt": PROMPT, "prompt_ids": prompt_ids, "greedy_ids": tokens,
            "onnxruntime_genai": og.__version__ if hasattr(og, "__version__") else "unknown"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(bm.REPO_ROOT / "tests" / "models" / "llama-genai"))
    build(Path(parser.parse_args().out))
    print(json.dumps(json.loads((Path(parser.parse_args().out) / "expected.json").read_text()), indent=1))


if __name__ == "__main__":
    main()
