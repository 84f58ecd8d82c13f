"""Typed errors of the library.

Every error carries what failed (`message`, naming the offending value), how to fix it (`hint`, naming
the flag or command that fixes it) and the process exit code the CLI should use. The CLI renders them
in one place as `error: …` / `hint: …`; the library never prints.
"""

from __future__ import annotations


class GtorrentError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code: int = 1
    default_hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(GtorrentError):
    """A value given by the user (a flag, an argument) is out of range or inconsistent."""

    exit_code = 2


class HomeError(GtorrentError):
    """The gtorrent home directory cannot be created, read or written."""

    default_hint = "set GTORRENT_HOME to a directory you can write to"


class HomeInUseError(HomeError):
    """Another long-running process already holds this home's lock for the same kind of node."""


class StoreError(GtorrentError):
    """The local SQLite store cannot be opened, read or written (full disk, read-only, damaged)."""


class IdentityError(GtorrentError):
    """A key file is missing, corrupted or not private."""


class ModelError(GtorrentError):
    """A model cannot be found, loaded or used."""


class ModelNotFoundError(ModelError):
    # no flag named: `run` takes the path with --model, `seed` and `verify` as an argument
    default_hint = "give the path of a model.onnx file or of the folder that holds it (with its tokenizer.json)"


class NotACausalLMError(ModelError):
    default_hint = (
        "export a decoder-only model with `optimum-cli export onnx --task text-generation-with-past "
        "--model MODEL OUTDIR`"
    )


class MissingTokenizerError(ModelError):
    default_hint = "put the model's tokenizer.json in the same folder as model.onnx"


class UnsupportedModelError(ModelError):
    default_hint = (
        "re-export the model with `optimum-cli export onnx --task text-generation-with-past "
        "--model MODEL OUTDIR`"
    )


class ProviderError(ModelError):
    """The requested execution device cannot be used."""

    default_hint = "use --device auto (GPU when usable, else CPU) or --device cpu"
