"""Nothing half-written: every file and folder the package writes appears at its final path complete, or not at all.

``atomic_path(final)`` gives a temporary name beside ``final`` (same folder, so the rename cannot cross file
systems; hidden; the same suffix, so writers that pick a format from it still do), and renames it onto ``final``
with ``os.replace`` once the body has finished. ``atomic_folder(final)`` does the same for a whole folder (a
checkpoint). When the body raises anything, ``KeyboardInterrupt`` and a SIGTERM turned into an exception
included, the temporary file or folder is removed and ``final`` is left as it was; the exception records the
discarded path (:func:`discarded_writes`), so that a caller can say what was not written.

SIGINT and SIGTERM are held back (handled once the step is done) while the temporary name is created, while it is
renamed into place and while it is removed, so that an interrupt cannot split those steps. A signal whose handler is
the default (SIGTERM without a handler kills the process at once) can still stop the body itself: then the hidden
temporary is left behind, never a partial file at ``final``.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TEMPORARY_MARK = ".partial-"
# Random names tried before giving up (a clash needs another writer with the same 8 hex digits).
RESERVE_ATTEMPTS = 100
# Where an exception keeps the final paths whose writing it interrupted (see discarded_writes).
_DISCARDED_ATTRIBUTE = "_kandinsky5_discarded_writes"


@contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Write a file under the temporary path this yields; it is renamed onto ``final_path`` when the body ends
    normally and removed when the body raises.

    The temporary name is ``.<name>.partial-<8 hex digits><suffix>`` in ``final_path``'s folder (which must exist);
    it exists, empty, when the body starts. It is created with mode 0o666 less the umask, like a plain ``open``. A
    symbolic link at ``final_path`` is written through (its target is replaced).
    """
    final = _target(final_path)

    def create(path: Path) -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))

    with _atomic(final_path, final, create, final.suffix, _replace_file, _remove_file) as temporary:
        yield temporary


@contextmanager
def atomic_folder(final_path: str | os.PathLike) -> Iterator[Path]:
    """Write a folder's contents under the temporary folder this yields; it is renamed onto ``final_path`` when the
    body ends normally and removed, with everything in it, when the body raises.

    ``final_path``'s parent folders are created if needed. When ``final_path`` is absent or an empty folder, the
    whole folder appears in one rename. When it is a folder that already holds files, the new files are moved into
    it one by one, each replacing the file of the same name (each rename atomic, and no interrupt handled until all
    are in); files of the folder that the new contents do not name are kept.
    """
    final = _target(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _atomic(final_path, final, os.mkdir, "", _replace_folder, _remove_folder) as temporary:
        yield temporary


def discarded_writes(error: BaseException) -> tuple[Path, ...]:
    """The final paths whose writing ``error`` interrupted and whose temporary files were removed, innermost
    first (e.g. a checkpoint's component folder, then the checkpoint folder)."""
    return getattr(error, _DISCARDED_ATTRIBUTE, ())


def temporary_paths(folder: str | os.PathLike) -> list[Path]:
    """The temporary files and folders of writes in progress (or of writes a killed process left) in ``folder``."""
    return sorted(p for p in Path(folder).iterdir() if p.name.startswith(".") and TEMPORARY_MARK in p.name)


# ---------------------------------------------------------------------------------------------- the mechanism


@contextmanager
def _atomic(
    given: str | os.PathLike,
    final: Path,
    create: Callable[[Path], None],
    suffix: str,
    commit: Callable[[Path, Path], None],
    remove: Callable[[Path], None],
) -> Iterator[Path]:
    temporary: Path | None = None
    committed = False
    try:
        with signals_held():
            temporary = _reserve(final, create, suffix)
        yield temporary
        with signals_held():
            commit(temporary, final)
            committed = True
    except BaseException as error:
        if committed:  # a signal held back during the rename, handled after it
            raise
        try:
            if temporary is not None:
                with signals_held():
                    remove(temporary)
        except BaseException as late:  # a signal held back during the removal, handled after it
            _record_discarded(late, given)
            raise
        _record_discarded(error, given)
        raise


def _record_discarded(error: BaseException, given: str | os.PathLike) -> None:
    setattr(error, _DISCARDED_ATTRIBUTE, (*discarded_writes(error), Path(given)))


def _target(path: str | os.PathLike) -> Path:
    """The absolute path to write, symbolic links followed."""
    return Path(os.path.realpath(os.fspath(path)))


def _reserve(final: Path, create: Callable[[Path], None], suffix: str) -> Path:
    for _ in range(RESERVE_ATTEMPTS):
        candidate = final.with_name(f".{final.name}{TEMPORARY_MARK}{secrets.token_hex(4)}{suffix}")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary name beside the output", str(final))


def _replace_file(temporary: Path, final: Path) -> None:
    os.replace(temporary, final)


def _remove_file(temporary: Path) -> None:
    temporary.unlink(missing_ok=True)


def _replace_folder(temporary: Path, final: Path) -> None:
    try:
        os.replace(temporary, final)  # final absent or an empty folder
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
            raise
        _merge(temporary, final)
        temporary.rmdir()


def _merge(source: Path, destination: Path) -> None:
    """Move ``source``'s entries into the existing folder ``destination``, folder by folder."""
    for entry in sorted(source.iterdir()):
        target = destination / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            try:
                os.replace(entry, target)  # an empty folder there
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                _merge(entry, target)
                entry.rmdir()
        else:
            os.replace(entry, target)


def _remove_folder(temporary: Path) -> None:
    shutil.rmtree(temporary, ignore_errors=True)


@contextmanager
def signals_held(signals: tuple[signal.Signals, ...] = HELD_SIGNALS) -> Iterator[None]:
    """Hold back ``signals`` during the body: one that arrives is handled (by the handler it had) when the body is
    done. Only the main thread handles signals; elsewhere, and for ignored signals or handlers not set from
    Python, this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    try:
        for signum in signals:
            handler = signal.getsignal(signum)
            if handler is None or handler == signal.SIG_IGN:
                continue
            previous[signum] = handler
            signal.signal(signum, lambda number, frame: received.append(number))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])


def check_writable_file(path: str | os.PathLike, example_name: str) -> Path:
    """Check, before any work, that a file can be written at ``path`` (its suffix checked by the caller); return it
    as an absolute path. Raises IsADirectoryError, FileNotFoundError (its folder does not exist), NotADirectoryError
    (its parent is a file) or PermissionError (not writable), each one line naming the path; ``example_name`` (say
    "a file name ending in .mp4") completes the message for a directory."""
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise IsADirectoryError(f"Output path {os.fspath(path)!r} is a directory; give {example_name}")
    parent = target.parent
    if not parent.exists():
        raise FileNotFoundError(f"Output directory {str(parent)!r} (for {os.fspath(path)!r}) does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"Output path {os.fspath(path)!r}: {str(parent)!r} is not a directory")
    if target.exists() and not os.access(target, os.W_OK):
        raise PermissionError(f"Output file {os.fspath(path)!r} exists and is not writable")
    # A real probe file, because os.access says yes to root and knows nothing of read-only file systems.
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".kandinsky5-write-check-"):
            pass
    except OSError as error:
        raise PermissionError(
            f"Output directory {str(parent)!r} (for {os.fspath(path)!r}) is not writable: {error.strerror}"
        ) from error
    return target
