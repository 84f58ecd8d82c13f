"""A decoder-only causal language model on ONNX Runtime: load, generate (streaming), score.

Invariants:
- Inputs are bound by name, never by position: Llama-style exports order them `input_ids,
  attention_mask, position_ids, past…` and GPT-2-style `input_ids, past…, attention_mask, position_ids`.
- The cache shape comes from the graph where its dims are numbers, else from config.json, or from
  genai_config.json in the ONNX Runtime GenAI layout (`config_from_genai`), whose graph declares the KV
  head size symbolically; its GroupQueryAttention is fed a growing past like any other export (not the
  fixed-size shared buffer onnxruntime-genai uses), and gives the same greedy tokens as its generator.
- With a KV-cache export (`past_key_values.{i}.key/value` -> `present.{i}.key/value`) the prompt is
  prefilled once and each new token costs one single-token step; on a GPU the cache stays in device
  memory (IOBinding) and never crosses to the host. Without a cache the whole sequence is re-run each
  step. Both paths give the same greedy tokens.
- Greedy decoding (temperature 0) is deterministic; sampling draws from a generator seeded per request.
- The session is shared by concurrent generations (ORT sessions are thread-safe); all per-request state
  lives in the generation call.
- With a `prefix_cache` (off by default), a prompt whose leading whole chunks were prefilled before is
  prefilled from the cached KV state: only the rest runs, and always at least one token (the logits of
  the prompt's last position come from a run). Each prefill stores its state at the prompt's last chunk
  boundary, as a copy: a stored state never shares memory with a tensor a later step writes.
  With numpy feeds the state is numpy arrays (a shorter prefix is a view of them). With IOBinding it
  is OrtValues on the session's device and never crosses to the host: the copy on insert and a
  shorter-prefix hit are device copies made by a tiny Slice graph per KV dtype (kv_slice_<dtype>.onnx
  next to this file, built by scripts/build_models.py kv-slice) run through IOBinding on the same
  device; a hit of exactly the stored length binds the stored values as they are (inputs are only
  read). A KV dtype without a slice graph (float64) runs without the prefix cache under IOBinding.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from ..errors import ModelError, NotACausalLMError, UnsupportedModelError, UsageError
from .chat import find_chat_template, render_chat
from .detok import IncrementalDetokenizer
from .files import GENAI_CONFIG_NAME, ModelFiles, bundled_model_path, locate_model, model_id
from .prefix_cache import CHUNK_TOKENS, PrefixCache, chunk_hashes
from .providers import CUDA, Device, providers_for
from .sampling import SamplingParams, log_softmax, sample_token

_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_KNOWN_INPUTS = {"input_ids", "attention_mask", "position_ids"}
_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
DEFAULT_CONTEXT_LENGTH = 2048
_SLICE_DTYPES = frozenset({"float32", "float16"})  # KV dtypes with a committed kv_slice_<dtype>.onnx


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 128  # new tokens at most
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # sampling seed; None draws one from the OS
    stop_at_eos: bool = True
    use_cache: bool = True  # False re-runs the whole sequence every step (a check, not a mode to serve)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UsageError(f"max-tokens must be >= 1, got {self.max_tokens}", hint="e.g. --max-tokens 128")


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "length" | "context" | "cancelled"
    ttft_s: float  # from the call to the first new token
    total_s: float  # from the call to the last new token
    cached_tokens: int = 0  # prompt tokens whose KV state came from the prefix cache (not prefilled)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one: the steady decode rate."""
        decode_s = self.total_s - self.ttft_s
        return (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else 0.0


@dataclass(frozen=True)
class _Layout:
    """How the ONNX graph's inputs and outputs map onto a decoder's step."""

    input_names: frozenset[str]
    past_names: tuple[str, ...]  # past_key_values.{i}.{key,value}, ordered by layer
    present_names: tuple[str, ...]  # matching present.{i}.{key,value}
    past_shape: tuple[int, int]  # (kv heads, head dim)
    past_dtype: Any

    @property
    def has_cache(self) -> bool:
        return bool(self.past_names)


def _int_from(config: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _inspect(session: ort.InferenceSession, config: dict[str, Any], onnx_path: Path) -> _Layout:
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = {arg.name for arg in session.get_outputs()}
    if "input_ids" not in inputs or "logits" not in outputs:
        raise NotACausalLMError(
            f"{onnx_path} is not a causal language model: it needs an `input_ids` input and a `logits` "
            f"output, it has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    if "use_cache_branch" in inputs:
        raise UnsupportedModelError(
            f"{onnx_path} is a legacy merged decoder (it has a `use_cache_branch` input), which gtorrent "
            "does not run"
        )
    past: dict[tuple[int, str], str] = {}
    for name in inputs:
        match = _PAST_RE.match(name)
        if match:
            past[(int(match.group(1)), match.group(2))] = name
        elif name not in _KNOWN_INPUTS:
            raise UnsupportedModelError(f"{onnx_path} has an input gtorrent does not know how to fill: `{name}`")
    ordered = sorted(past)
    present = tuple(f"present.{layer}.{kind}" for layer, kind in ordered)
    missing = [name for name in present if name not in outputs]
    if missing:
        raise UnsupportedModelError(f"{onnx_path} takes a KV cache but does not return {missing[0]}")
    heads, head_dim, dtype = 0, 0, np.float32
    if ordered:
        first = inputs[past[ordered[0]]]
        shape = first.shape
        heads = shape[1] if isinstance(shape[1], int) else 0
        head_dim = shape[3] if isinstance(shape[3], int) else 0
        attention_heads = _int_from(config, "num_attention_heads", "n_head")
        heads = heads or _int_from(config, "num_key_value_heads") or attention_heads or 0
        hidden = _int_from(config, "hidden_size", "n_embd")
        head_dim = head_dim or _int_from(config, "head_dim") or (
            hidden // attention_heads if hidden and attention_heads else 0
        )
        if not heads or not head_dim:
            raise UnsupportedModelError(
                f"cannot tell the KV-cache shape of {onnx_path} from the graph, config.json or genai_config.json"
            )
        if first.type not in _ORT_DTYPES:
            raise UnsupportedModelError(f"{onnx_path} has a KV cache of unsupported type {first.type}")
        dtype = _ORT_DTYPES[first.type]
    return _Layout(
        input_names=frozenset(inputs),
        past_names=tuple(past[key] for key in ordered),
        present_names=present,
        past_shape=(heads, head_dim),
        past_dtype=dtype,
    )


def config_from_genai(genai: dict[str, Any]) -> dict[str, Any]:
    """The config.json keys gtorrent reads, from an ONNX Runtime GenAI genai_config.json.

    Its schema (onnxruntime_genai.models.builder, `make_genai_config`): `model.{bos,eos,pad}_token_id`
    (eos an int or a list), `model.context_length`, `model.vocab_size`, `model.type` ("llama", ...) and
    `model.decoder.{filename, head_size, hidden_size, num_attention_heads, num_hidden_layers,
    num_key_value_heads, inputs, outputs}`; `search` holds sampling defaults. The graph declares the KV
    head size as a symbolic dim (`kv_cache_dim`), so head_size is where the cache shape comes from.
    Absent or malformed fields are left out ({} for a document that is not GenAI's)."""
    model = genai.get("model")
    if not isinstance(model, dict):
        return {}
    decoder = model.get("decoder")
    decoder = decoder if isinstance(decoder, dict) else {}
    mapping = {
        "head_dim": decoder.get("head_size"),
        "hidden_size": decoder.get("hidden_size"),
        "num_attention_heads": decoder.get("num_attention_heads"),
        "num_key_value_heads": decoder.get("num_key_value_heads"),
        "num_hidden_layers": decoder.get("num_hidden_layers"),
        # the graph's rotary tables are built for this many positions: the context is no longer
        "max_position_embeddings": model.get("context_length"),
        "vocab_size": model.get("vocab_size"),
        "eos_token_id": model.get("eos_token_id"),
        "bos_token_id": model.get("bos_token_id"),
    }
    return {key: value for key, value in mapping.items() if value is not None}


def _eos_ids(*configs: dict[str, Any]) -> frozenset[int]:
    for config in configs:
        value = config.get("eos_token_id")
        if isinstance(value, int):
            return frozenset({value})
        if isinstance(value, list) and value:
            return frozenset(v for v in value if isinstance(v, int))
    return frozenset()


class LanguageModel:
    """One loaded model. Create it with `LanguageModel.load`."""

    def __init__(
        self,
        files: ModelFiles,
        session: ort.InferenceSession,
        tokenizer: Tokenizer,
        *,
        model_id: str,
        load_s: float,
        prefix_cache: PrefixCache | None = None,
        io_binding: bool | None = None,
    ) -> None:
        """`io_binding` is internal: None binds the KV cache on the device on a CUDA session only; True
        forces IOBinding on any session (tests run the device path on CPU with "cpu" OrtValues)."""
        self.files = files
        self.session = session
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.load_s = load_s
        # a GenAI folder has genai_config.json, usually instead of config.json; where both exist the
        # GenAI values win, since they describe the very graph (its context length, its KV head size)
        self.config = {**files.read_json("config.json"), **config_from_genai(files.read_json(GENAI_CONFIG_NAME))}
        self.generation_config = files.read_json("generation_config.json")
        self.tokenizer_config = files.read_json("tokenizer_config.json")
        self.layout = _inspect(session, self.config, files.onnx_path)
        self.provider = session.get_providers()[0]
        # ONNX Runtime's intra-op threads as set at load; 0: its default (one per physical core)
        self.threads = session.get_session_options().intra_op_num_threads
        self._ort_device = "cuda" if self.provider == CUDA else "cpu"
        self._device_id = int(session.get_provider_options().get(self.provider, {}).get("device_id", 0))
        # keep the KV cache on the device between steps (IOBinding); by default only on a GPU
        self._bind_on_device = self.provider == CUDA if io_binding is None else io_binding
        self._slicer: ort.InferenceSession | None = None  # the device KV slicer, made on first use
        self._slicer_lock = threading.Lock()
        self.eos_ids = _eos_ids(self.generation_config, self.config)
        self.context_length = (
            _int_from(self.config, "max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
            or DEFAULT_CONTEXT_LENGTH
        )
        self.chat_template = find_chat_template(files.folder, self.tokenizer_config)
        self._output_names = ["logits", *self.layout.present_names]
        # read-only views of these are sliced per step instead of allocating new arrays
        self._ones = np.ones((1, self.context_length), dtype=np.int64)
        self._positions = np.arange(self.context_length, dtype=np.int64)[None, :]
        self._ones.flags.writeable = self._positions.flags.writeable = False
        # shared by every generation on this model; states are numpy or device OrtValues (module doc)
        self.prefix_cache = prefix_cache
        self._prefix_cache_usable = self.layout.has_cache and (
            not self._bind_on_device or np.dtype(self.layout.past_dtype).name in _SLICE_DTYPES
        )

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        device: Device = "auto",
        cache_dir: Path | None = None,
        intra_op_threads: int = 0,
        prefix_cache: PrefixCache | None = None,
        io_binding: bool | None = None,
    ) -> LanguageModel:
        """Load MODEL (an .onnx file or its folder; None = the bundled demo model)."""
        started = time.perf_counter()
        files = locate_model(model)
        try:
            tokenizer = Tokenizer.from_file(str(files.tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelError(
                f"cannot read {files.tokenizer_path} as a tokenizers tokenizer ({exc})",
                hint="use the tokenizer.json written by the model's export",
            ) from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: keep ORT's provider-probe chatter off the terminal
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads

        providers = providers_for(device)  # a ProviderError (no GPU) is not a bad model: raise it as is
        try:
            session = ort.InferenceSession(str(files.onnx_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own (non-exported) exception types
            raise NotACausalLMError(f"cannot load {files.onnx_path} as an ONNX model ({_first_line(exc)})") from exc
        identifier = model_id(files, cache_dir)
        return cls(files, session, tokenizer, model_id=identifier, load_s=time.perf_counter() - started,
                   prefix_cache=prefix_cache, io_binding=io_binding)

    @property
    def name(self) -> str:
        if self.files.folder.resolve() == bundled_model_path().resolve():
            return "gtorrent-demo"
        return self.files.folder.name

    @property
    def has_cache(self) -> bool:
        return self.layout.has_cache

    # ----------------------------------------------------------------- text

    def encode(self, prompt: str, *, chat: bool = False) -> list[int]:
        """Token ids of `prompt`; with `chat`, formatted as one user turn by the model's template."""
        _check_text(prompt, "the prompt")
        if chat:
            text = render_chat(self._template(), [{"role": "user", "content": prompt}], self.tokenizer_config)
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(prompt, add_special_tokens=True).ids)

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation ({role, content} turns) rendered by the model's chat template,
        ending with the assistant's turn opened; one user turn gives `encode(content, chat=True)`'s ids."""
        turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        for index, turn in enumerate(turns):
            _check_text(turn["content"], f"message {index}")
        try:
            text = render_chat(self._template(), turns, self.tokenizer_config)
        except UnsupportedModelError as exc:
            # templates refuse conversations they were not made for (roles out of order, a system turn):
            # the conversation is what to change, so it is the request's fault, not the seed's
            raise UsageError(
                f"model {self.name}'s chat template cannot render this conversation ({exc.__cause__ or exc.message})",
                hint="many templates want user and assistant turns to alternate, and some take no system turn",
            ) from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _template(self) -> str:
        if self.chat_template is None:
            raise UsageError(
                f"model {self.name} has no chat template (no chat_template.jinja, and no chat_template in "
                "tokenizer_config.json)",
                hint="run without --chat",
            )
        return self.chat_template

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # ----------------------------------------------------------------- inference

    def _empty_past(self) -> list[Any]:
        heads, head_dim = self.layout.past_shape
        zeros = np.zeros((1, heads, 0, head_dim), dtype=self.layout.past_dtype)
        if self._bind_on_device:
            zeros = ort.OrtValue.ortvalue_from_numpy(zeros, self._ort_device, self._device_id)
        return [zeros] * len(self.layout.past_names)

    def _feeds(self, new_ids: list[int], past_len: int) -> dict[str, npt.NDArray[np.int64]]:
        seq = len(new_ids)
        feeds = {"input_ids": np.asarray([new_ids], dtype=np.int64)}
        names = self.layout.input_names
        if "attention_mask" in names:
            feeds["attention_mask"] = self._ones[:, : past_len + seq]
        if "position_ids" in names:
            feeds["position_ids"] = self._positions[:, past_len : past_len + seq]
        return feeds

    def _step(self, new_ids: list[int], past_len: int, past: list[Any] | None) -> tuple[npt.NDArray[np.float32], list[Any]]:
        """Run the graph on `new_ids` after `past_len` cached positions; return (logits[seq, vocab], present).

        On CPU the cache travels as numpy arrays through `session.run` (the fastest path there); on a GPU
        it stays on the device as OrtValues through IOBinding, and only the logits come to the host.
        """
        feeds = self._feeds(new_ids, past_len)
        values = (past if past is not None else self._empty_past()) if self.layout.has_cache else []
        if not self._bind_on_device:
            feeds.update(zip(self.layout.past_names, values, strict=True))
            outputs = self.session.run(self._output_names, feeds)
            return outputs[0][0], outputs[1:]
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.layout.past_names, values, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self._output_names:
            binding.bind_output(name, self._ort_device, self._device_id)
        self.session.run_with_iobinding(binding)
        bound = binding.get_outputs()
        return bound[0].numpy()[0], list(bound[1:])

    def forward(self, token_ids: list[int]) -> npt.NDArray[np.float32]:
        """Logits [len(token_ids), vocab] of one full pass with no cache."""
        logits, _ = self._step(token_ids, 0, None)
        return logits

    def _prefill(
        self, prompt_ids: list[int], cache: PrefixCache | None
    ) -> tuple[npt.NDArray[np.float32], list[Any], int]:
        """Run the prompt through the graph, from the prefix cache's deepest state when it has one;
        return (logits[rest, vocab], present, the prompt tokens that came from the cache)."""
        if cache is None:
            logits, past = self._step(prompt_ids, 0, None)
            return logits, past, 0
        digests = chunk_hashes(prompt_ids)
        usable = (len(prompt_ids) - 1) // CHUNK_TOKENS  # at least one token must run, for its logits
        lease = cache.acquire(digests[:usable], prompt_tokens=len(prompt_ids))
        cached = 0
        try:
            if lease is None:
                logits, past = self._step(prompt_ids, 0, None)
            else:
                cached = lease.depth * CHUNK_TOKENS
                logits, past = self._step(prompt_ids[cached:], cached, self._kv_prefix(lease.value, cached))
        finally:
            if lease is not None:
                cache.release(lease)
        if digests and not cache.covers(digests):
            state, nbytes = self._kv_copy(past, len(digests) * CHUNK_TOKENS)
            cache.insert(digests, state, nbytes)
        return logits, past, cached

    def _kv_prefix(self, state: list[Any], length: int) -> list[Any]:
        """The first `length` positions of a cached state, to feed as past (read only by the step)."""
        if not self._bind_on_device:
            return [value[:, :, :length, :] for value in state]
        if state[0].shape()[2] == length:
            return list(state)
        return self._slice_on_device(state, length)

    def _kv_copy(self, past: list[Any], length: int) -> tuple[list[Any], int]:
        """A copy of the first `length` positions of `past` to store in the prefix cache, and its bytes."""
        if self._bind_on_device:
            state = self._slice_on_device(past, length)
        else:
            # a copy of exactly the whole chunks: a view would keep the whole array alive, uncounted
            state = [np.array(value[:, :, :length, :], order="C", copy=True) for value in past]
            for array in state:
                array.flags.writeable = False
        heads, head_dim = self.layout.past_shape
        per_tensor = heads * length * head_dim * np.dtype(self.layout.past_dtype).itemsize
        return state, per_tensor * len(state)

    def _kv_slicer(self) -> ort.InferenceSession:
        with self._slicer_lock:
            if self._slicer is None:
                name = np.dtype(self.layout.past_dtype).name
                graph = Path(__file__).with_name(f"kv_slice_{name}.onnx").read_bytes()
                options = ort.SessionOptions()
                options.log_severity_level = 3
                options.intra_op_num_threads = 1  # a copy: no thread pool worth its start-up
                providers = self.session.get_providers()
                provider_options = [{"device_id": str(self._device_id)} if p == CUDA else {} for p in providers]
                self._slicer = ort.InferenceSession(
                    graph, options, providers=providers, provider_options=provider_options
                )
            return self._slicer

    def _slice_on_device(self, values: list[Any], length: int) -> list[Any]:
        """value[:, :, :length, :] of each OrtValue as a new OrtValue on the same device: no host copy.
        ORT synchronizes the device at the end of each run, so the model session may use the result."""
        slicer = self._kv_slicer()
        end = np.array([length], dtype=np.int64)
        sliced: list[Any] = []
        for value in values:
            binding = slicer.io_binding()
            binding.bind_ortvalue_input("data", value)
            binding.bind_cpu_input("end", end)
            binding.bind_output("sliced", self._ort_device, self._device_id)
            slicer.run_with_iobinding(binding)
            sliced.append(binding.get_outputs()[0])
        return sliced

    def iter_tokens(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        *,
        on_prefill: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, str]]:
        """Yield (token id, reason) for each new token; reason is "" until the last one says why it ended.
        `on_prefill` gets the number of prompt tokens taken from the prefix cache, once, after the prefill."""
        if not prompt_ids:
            raise UsageError("the prompt is empty", hint='give a prompt, e.g. gtorrent run "Hello"')
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise UsageError(
                f"the prompt is {len(prompt_ids)} tokens; model {self.name} holds {self.context_length}",
                hint="shorten the prompt",
            )
        budget = min(params.max_tokens, room)
        rng = np.random.default_rng(params.seed)
        cached = self.layout.has_cache and params.use_cache
        ids = list(prompt_ids)
        past: list[Any] | None = None
        past_len = 0
        pending = ids
        # not without a KV cache, nor with IOBinding for a KV dtype that has no slice graph (module doc)
        prefix_cache = self.prefix_cache if cached and self._prefix_cache_usable else None
        for produced in range(1, budget + 1):
            if cached and produced == 1:
                logits, past, from_cache = self._prefill(pending, prefix_cache)
                past_len = len(pending)
                if on_prefill is not None:
                    on_prefill(from_cache)
            elif cached:
                logits, past = self._step(pending, past_len, past)
                past_len += len(pending)
            else:
                logits, _ = self._step(ids, 0, None)
            token = sample_token(logits[-1], params.sampling, rng)
            ids.append(token)
            pending = [token]
            if params.stop_at_eos and token in self.eos_ids:
                yield token, "eos"
                return
            if produced == budget:
                yield token, "length" if budget == params.max_tokens else "context"
                return
            yield token, ""

    def generate(
        self,
        prompt: str | list[int],
        params: GenerationParams | None = None,
        *,
        chat: bool = False,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        """Generate a continuation of `prompt` (text or token ids), calling `on_text` with each new piece.

        `should_stop` is polled once per token; when it returns True generation ends with finish reason
        "cancelled" (a seed whose asker went away). `on_token` gets each answer token id just before the
        text it completes (if any) goes to `on_text`, so the ids since the last piece are that piece's."""
        params = params or GenerationParams()
        started = time.perf_counter()
        prompt_ids = prompt if isinstance(prompt, list) else self.encode(prompt, chat=chat)
        detok = IncrementalDetokenizer(self.tokenizer)
        produced: list[int] = []
        ttft_s: float | None = None
        reason = "length"
        from_cache: list[int] = [0]

        def on_prefill(count: int) -> None:
            from_cache[0] = count

        for token, reason in self.iter_tokens(prompt_ids, params, on_prefill=on_prefill):
            if ttft_s is None:
                ttft_s = time.perf_counter() - started
            if reason == "eos":
                break  # the end-of-sequence token is not part of the answer
            if should_stop is not None and should_stop():
                reason = "cancelled"
                break
            produced.append(token)
            if on_token is not None:
                on_token(token)
            piece = detok.push(token)
            if piece and on_text is not None:
                on_text(piece)
        tail = detok.flush()
        if tail and on_text is not None:
            on_text(tail)
        total_s = time.perf_counter() - started
        return GenerationResult(
            text=detok.text,
            token_ids=produced,
            prompt_tokens=len(prompt_ids),
            finish_reason=reason,
            ttft_s=ttft_s if ttft_s is not None else total_s,
            total_s=total_s,
            cached_tokens=from_cache[0],
        )

    def score_ids(self, prompt_ids: list[int], continuation_ids: list[int]) -> npt.NDArray[np.float64]:
        """Per-token log-probabilities of `continuation_ids` given `prompt_ids`, in one forward pass."""
        if not prompt_ids:
            raise UsageError("scoring needs a non-empty prompt")
        if not continuation_ids:
            return np.zeros(0, dtype=np.float64)
        total = len(prompt_ids) + len(continuation_ids)
        if total > self.context_length:
            raise UsageError(f"prompt + continuation is {total} tokens; model {self.name} holds {self.context_length}")
        logits = self.forward(prompt_ids + continuation_ids)
        start = len(prompt_ids) - 1
        predicted = log_softmax(logits[start : start + len(continuation_ids)])
        result: npt.NDArray[np.float64] = predicted[np.arange(len(continuation_ids)), continuation_ids]
        return result

    def score(self, prompt: str, continuation: str) -> npt.NDArray[np.float64]:
        """Per-token log-probabilities of `continuation` (tokenized on its own) after `prompt`."""
        prompt_ids = self.encode(prompt)
        continuation_ids = list(self.tokenizer.encode(continuation, add_special_tokens=False).ids)
        return self.score_ids(prompt_ids, continuation_ids)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # a lone surrogate (undecodable bytes in argv, or a "\ud800" escape in a request's JSON)
        # has no UTF-8 form and no tokens: the request is wrong, not the model
        raise UsageError(
            f"{what} is not valid text: character {exc.start} is a lone surrogate",
            hint=f"remove that character from {what}, or pass the text as UTF-8",
        ) from None
