"""Atomic file writes: a reader never sees a half-written file.

Everything is first written to a temporary file in the destination folder (same file system, so the final
``os.replace`` is atomic), flushed to disk, and only then renamed over the destination.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError

__all__ = ["atomic_write_path", "atomic_write_bytes", "atomic_write_text", "check_writable", "full_suffix"]

# Multi-part suffixes that writers dispatch on as a whole (".gz" alone would lose the ".nii").
_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz", ".json.gz", ".nrrd.gz")


def full_suffix(path: str | os.PathLike[str]) -> str:
    """The extension a writer sees, e.g. '.nii.gz' for 'a.nii.gz' and '.nrrd' for 'a.b.nrrd' (lower case)."""
    name = Path(path).name.lower()
    for double in _DOUBLE_SUFFIXES:
        if name.endswith(double) and len(name) > len(double):
            return double
    return Path(name).suffix


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early (before any heavy work) if ``path`` cannot be created; returns it as an absolute Path."""
    p = Path(path).expanduser()
    if str(p) == "" or p.name == "":
        raise InputError(f"Output path is empty or a folder: '{path}'")
    p = p.absolute()
    if p.is_dir():
        raise InputError(f"Output path '{p}' is a folder, expected a file name")
    folder = p.parent
    if not folder.is_dir():
        raise InputError(f"Output folder '{folder}' does not exist (for '{p.name}')")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"Output folder '{folder}' is not writable (for '{p.name}')")
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"Output file '{p}' exists and is read-only")
    return p


def _fsync(path: Path, flags: int) -> None:
    # Writers such as SimpleITK close their own handle, so reopen to force data (or, for a folder, the rename)
    # to disk. Best effort: some platforms refuse fsync on some handles; the rename stays atomic regardless.
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    _fsync(path, os.O_RDWR)


def _fsync_dir(folder: Path) -> None:
    _fsync(folder, os.O_RDONLY)


def _default_file_mode() -> int:
    # Some writers (safetensors) create 0600 files; give results the mode a plain open() would.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is deleted.

    The temporary name keeps the real extension at the end (``.name.ab12cd.tmp.nii.gz``) because writers
    such as SimpleITK choose the file format from the suffix. The caller must write the file and close it
    inside the ``with`` block.
    """
    dest = check_writable(path)
    suffix = full_suffix(dest)
    stem = dest.name[: len(dest.name) - len(suffix)] if suffix else dest.name
    tmp = dest.with_name(f".{stem}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"nothing was written to the temporary file for '{dest}'")
        _fsync_file(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        # BaseException: also clean up on KeyboardInterrupt / cancellation.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the final path."""
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the final path."""
    return atomic_write_bytes(path, text.encode(encoding))
