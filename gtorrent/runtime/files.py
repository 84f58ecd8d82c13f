"""Finding a model's files on disk and computing its model id (its "infohash").

A model is one folder in either of two layouts, MODEL naming the `.onnx` file or its folder:
- Hugging Face optimum's export: `model.onnx` (plus external weights, usually `model.onnx_data`) with
  `tokenizer.json`, `config.json` and optionally `generation_config.json`, `tokenizer_config.json`,
  `special_tokens_map.json` and `chat_template.jinja` (where transformers 4.57 and 5.x save the template).
- ONNX Runtime GenAI's (`onnxruntime_genai.models.builder`): `genai_config.json` instead of
  `config.json`, weights in `model.onnx.data`; the graph file is the one `genai_config.json` names
  (`model.decoder.filename`), so a folder of several `.onnx` files still resolves.

The model id is SHA-256 over a canonical manifest of those files (name, size, SHA-256 of the bytes),
so two peers with byte-identical files get the same id, like a torrent's infohash. Hashing a 500 MB
model takes about a second, so per-file digests are cached in the home directory, keyed by path, size
and modification time: the id is computed once per file set. The first hashing of a large model reports
its bytes through `model_id`'s `progress` callback (the CLI draws a bar from it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import MissingTokenizerError, ModelNotFoundError
from ..paths import ensure_private_dir, write_private_file

MODEL_ID_LABEL = "gtorrent/model-id/v1"
SIDECAR_NAMES = (
    "tokenizer.json",
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "genai_config.json",
)
GENAI_CONFIG_NAME = "genai_config.json"
HASH_CACHE_NAME = "model-hashes.json"
_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class ModelFiles:
    """The files that make up one model, all in one folder."""

    folder: Path
    onnx_path: Path
    external_data: tuple[Path, ...]
    tokenizer_path: Path

    @property
    def all_files(self) -> list[Path]:
        files = [self.onnx_path, *self.external_data]
        files += [self.folder / name for name in SIDECAR_NAMES if (self.folder / name).is_file()]
        return files

    def read_json(self, name: str) -> dict[str, Any]:
        """A sidecar JSON file as a dict ({} when absent)."""
        path = self.folder / name
        if not path.is_file():
            return {}
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelNotFoundError(
                f"{path} is not valid JSON ({exc})", hint=f"restore {name} from the model's export"
            ) from exc
        return doc if isinstance(doc, dict) else {}


def bundled_model_path() -> Path:
    """The folder of the demo model that ships inside the package."""
    return Path(str(resources.files("gtorrent") / "models" / "demo"))


def locate_model(model: str | os.PathLike[str] | None) -> ModelFiles:
    """Resolve MODEL (an .onnx file, its folder, or None for the bundled demo model) to its files."""
    path = bundled_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model not found: {path}")
    if path.is_dir():
        folder = path
        candidates = sorted(folder.glob("*.onnx"))
        preferred = _genai_graph(folder) or folder / "model.onnx"
        if preferred.is_file():
            onnx_path = preferred
        elif len(candidates) == 1:
            onnx_path = candidates[0]
        elif not candidates:
            raise ModelNotFoundError(f"no .onnx file in folder {folder}")
        else:
            names = ", ".join(c.name for c in candidates)
            raise ModelNotFoundError(
                f"folder {folder} holds several .onnx files ({names})",
                hint="give the .onnx file to use instead of its folder, e.g. " + str(candidates[0]),  # seed: no --model
            )
    else:
        onnx_path, folder = path, path.parent
        if path.suffix != ".onnx":
            raise ModelNotFoundError(f"{path} is not an .onnx file")
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise MissingTokenizerError(f"no tokenizer.json beside {onnx_path.name} in {folder}")
    external = tuple(
        p
        for p in (folder / (onnx_path.name + "_data"), folder / (onnx_path.name + ".data"))
        if p.is_file()
    )
    return ModelFiles(folder=folder, onnx_path=onnx_path, external_data=external, tokenizer_path=tokenizer_path)


def _genai_graph(folder: Path) -> Path | None:
    """The graph file a GenAI folder's genai_config.json names (`model.decoder.filename`), if any.
    Only a plain file name in the folder counts: the config comes with the model and is not trusted to
    point elsewhere."""
    path = folder / GENAI_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # reported when the model is loaded (ModelFiles.read_json)
    model = doc.get("model") if isinstance(doc, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    name = decoder.get("filename") if isinstance(decoder, dict) else None
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".onnx"):
        return None
    return folder / name


def _file_sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


class HashCache:
    """Per-file SHA-256 digests keyed by (absolute path, size, mtime_ns), stored as JSON in the home."""

    def __init__(self, cache_dir: Path | None) -> None:
        self._path = cache_dir / HASH_CACHE_NAME if cache_dir is not None else None
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if self._path is not None and self._path.is_file():
            try:
                loaded = json.loads(self._path.read_text(encoding="utf-8"))
                if isinstance(loaded, dict):
                    self._entries = loaded
            except (OSError, ValueError):
                self._entries = {}  # a damaged cache only costs a re-hash

    def cached(self, path: Path) -> bool:
        """Whether `path`'s digest is held for its current size and modification time."""
        stat = path.stat()
        entry = self._entries.get(str(path.resolve()))
        return entry is not None and bool(entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns)

    def digest(self, path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
        """`path`'s SHA-256 (hex), from the cache or hashed now (`on_bytes(n)` after each chunk read)."""
        stat = path.stat()
        key = str(path.resolve())
        entry = self._entries.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return str(entry["sha256"])
        value = _file_sha256(path, on_bytes)
        self._entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": value}
        self._dirty = True
        return value

    def save(self) -> None:
        if self._path is None or not self._dirty:
            return
        try:
            ensure_private_dir(self._path.parent)
            data = json.dumps(self._entries, indent=1, sort_keys=True).encode("utf-8")
            write_private_file(self._path, data, replace=True)
        except Exception:  # noqa: BLE001 - the cache is an optimisation; failing to write it is harmless
            pass
        self._dirty = False


def model_id(files: ModelFiles, cache_dir: Path | None = None, progress: Callable[[int, int], None] | None = None) -> str:
    """SHA-256 (hex) over the manifest of the model's files; file digests cached under `cache_dir`.

    `progress(bytes done, total)` follows the hashing of the files whose digest is not cached (`total`:
    their sizes): called with 0 first, then after each chunk read, the last time with done == total.
    Never called when every digest is cached."""
    cache = HashCache(cache_dir)
    paths = sorted(files.all_files, key=lambda p: p.name)
    on_bytes: Callable[[int], None] | None = None
    if progress is not None and (total := sum(p.stat().st_size for p in paths if not cache.cached(p))):
        report, done = progress, [0]

        def count(size: int) -> None:
            done[0] += size
            report(done[0], total)

        on_bytes = count
        progress(0, total)
    lines = [MODEL_ID_LABEL]
    for path in paths:
        lines.append(f"{path.name}\t{path.stat().st_size}\t{cache.digest(path, on_bytes)}")
    cache.save()
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
