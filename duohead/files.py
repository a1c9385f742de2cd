"""Writing files so that a reader never sees half of one and nothing a user made is replaced unasked.

Every file duohead writes (patterns, logs, checkpoints, reports, plots, converted models) goes through here:
the content is written to a temporary name in the same folder, then renamed over the target in one step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_FILE = ".duohead.lock"  # in a run folder while a run writes there: the owner's PID
MiB = 1 << 20


def refuse_overwrite(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise FileExistsError if `path` exists and `overwrite` is False."""
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (or --force) to replace it")


def check_regular_file(path: str | os.PathLike, what: str, limit: int) -> None:
    """Raise unless `path` is a regular file of at most `limit` bytes: a FIFO, a device such as /dev/zero or a folder
    is refused before it is opened, so nothing blocks or reads without end. `what` names the file in errors."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except NotADirectoryError:
        raise FileNotFoundError(f"{what} {path} does not exist (a part of the path is a file)") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{what} {path} is a folder; pass a file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} {path} is not a regular file (a pipe or a device); pass a file")
    if info.st_size > limit:
        raise ValueError(f"{what} {path} is {info.st_size / MiB:,.1f} MiB; duohead reads at most {limit / MiB:,.0f} MiB here")


def read_regular_text(path: str | os.PathLike, what: str, limit: int) -> str:
    """The UTF-8 text of `path`, read only if `check_regular_file` accepts it, and never more than `limit` bytes."""
    check_regular_file(path, what, limit)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {path} grew past {limit / MiB:,.0f} MiB while it was read; duohead reads at most that")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, option: str) -> None:
    """Raise ValueError unless files can be created in `folder` (or, if it does not exist yet, in the nearest existing
    folder above it, where it would be made). Probes by creating and removing an empty file."""
    existing = _nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise ValueError(f"{option} {folder}: {existing} is a file, not a folder; name a path under a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"{option} {folder}: cannot write in {existing} ({e.strerror}); choose a writable place") from None


def check_output_file(path: str | os.PathLike, option: str, force: bool) -> None:
    """Before any slow work: raise unless `path` can be written as a new file (or replaced, with `force`). `option`
    names the command-line option in errors (e.g. "--report-json")."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; name a file")
    if path.exists() and not force:
        raise FileExistsError(f"{option} {path} already exists; pass --force to replace it (or name another file)")
    _check_writable_folder(path.parent, option)


def check_output_folder(path: str | os.PathLike, option: str) -> None:
    """Before any slow work: raise unless `path` is (or can be made) a folder that files can be written in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; name a folder")
    _check_writable_folder(path, option)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Hold `folder`'s lock file (`LOCK_FILE`, holding this process's PID) inside the `with` block; raise FileExistsError
    naming the owner's PID if another process holds it. The lock is an OS file lock (flock), so a run that crashed or
    was killed holds nothing: its leftover file is taken over. The file is removed on exit. Yields the lock path."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(
                f"{option} {folder} is in use by another duohead run (PID {owner}, lock {path}); wait for it to end or "
                "choose another folder"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:  # else the previous owner removed the file between our open and flock: take a fresh one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it to `path` atomically.

    The file gets the permissions `open()` would give it. On any error the temporary file is removed and
    `path` is untouched. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary folder beside `path` inside the `with` block; on success it is renamed to `path`.

    On an error the temporary folder is removed and `path` is untouched. `path` must not exist.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
