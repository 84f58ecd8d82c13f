"""Where gtorrent keeps its state, and how it writes private files.

All state lives under one home directory: `GTORRENT_HOME` if set, else the platformdirs user data
directory. Directories are created 0700 and private files are created with mode 0600 in the same
system call (`os.open(..., O_CREAT | O_EXCL, 0o600)`), never chmod-ed after the fact, so there is no
window in which a secret is readable by others. Files are replaced atomically (write a temporary file,
fsync, rename) so a crash never leaves a half-written file.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import platformdirs

from .errors import HomeError

HOME_ENV = "GTORRENT_HOME"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def home_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The home directory path (not created)."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("gtorrent", appauthor=False))


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700 if missing; check that it is a writable directory."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise HomeError(f"cannot create directory {path} ({exc.strerror or exc})") from exc
    if not path.is_dir():
        raise HomeError(f"{path} exists but is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise HomeError(f"directory {path} is not writable")
    return path


def write_private_file(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write `data` to `path` with mode 0600, atomically.

    With `replace=False` an existing file is never overwritten (FileExistsError), which is what key
    files want: two processes creating an identity at once must not end up with two identities.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise HomeError(f"cannot write {path} ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError instead of clobbering
    finally:
        tmp.unlink(missing_ok=True)


def loose_permissions(path: Path) -> int:
    """The permission bits of `path` that give group or others any access (0 for a private file)."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077


def create_private(path: Path) -> None:
    """Create `path` empty with mode 0600 unless it exists (for files other libraries then open)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    except FileExistsError:
        pass
    except OSError as exc:
        raise HomeError(f"cannot create {path} ({exc.strerror or exc})") from exc
