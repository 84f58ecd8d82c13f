"""Where gtorrent keeps its state, and how it writes private files.

All state lives under one home directory: `GTORRENT_HOME` if set, else the platformdirs user data
directory. Directories are created 0700 and private files are created with mode 0600 in the same
system call (`os.open(..., O_CREAT | O_EXCL, 0o600)`), never chmod-ed after the fact, so there is no
window in which a secret is readable by others. Files are replaced atomically (write a temporary file,
fsync, rename) so a crash never leaves a half-written file.

Many commands may run at once on one home (asks share its store), but a home holds one identity, so
two long-running nodes that announce under it would overwrite each other's tracker record. Each such
node takes an exclusive `flock` on a lock file of the home for its whole life: `node.lock` for the
roles that announce a peer record (seed, relay), `tracker.lock` for a tracker and its `tracker.db`.
The kernel drops the lock when the process exits, crash or SIGKILL included, so a stale lock file
never blocks a restart; the file only says who holds it (role and pid), for the error message.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import stat
from pathlib import Path

import platformdirs

from .errors import HomeError, HomeInUseError

HOME_ENV = "GTORRENT_HOME"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
NODE_LOCK = "node"  # seed, relay (and later verifier): one peer record per identity
TRACKER_LOCK = "tracker"  # a tracker, in its own process or inside a seed: one writer of tracker.db


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


class HomeLock:
    """An exclusive lock on one of a home's lock files, held until `release()` or process exit."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor of the open file drops the flock

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock_home(home: Path, lock: str, role: str) -> HomeLock | str:
    """Take `home`'s lock `lock` for `role` without waiting.

    Returns the held lock, or, when another process holds it, a description of that process
    ("relay (pid 1234)") read from the lock file.
    """
    ensure_private_dir(home)
    path = home / f"{lock}.lock"
    try:
        # O_CLOEXEC: a child process (a model runtime helper, say) must not inherit and outlive the lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise HomeError(f"cannot open {path} ({exc.strerror or exc})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        finally:
            os.close(fd)
        if len(holder) == 2 and holder[1].isdigit():
            return f"{holder[0]} (pid {holder[1]})"
        return "gtorrent process"  # it holds the lock but has not written its name yet
    except OSError as exc:
        os.close(fd)
        raise HomeError(f"cannot lock {path} ({exc.strerror or exc})") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{role} {os.getpid()}\n".encode(), 0)
    return HomeLock(path, fd)


def lock_home(home: Path, lock: str, role: str) -> HomeLock:
    """Take `home`'s lock `lock` for `role`, or raise HomeInUseError naming the process that holds it."""
    held = try_lock_home(home, lock, role)
    if isinstance(held, HomeLock):
        return held
    raise HomeInUseError(
        f"the home {home} is in use by a running {held}",
        hint=f"give each long-running node its own home, e.g. GTORRENT_HOME=~/.gtorrent/another-{role} gtorrent {role}",
    )
