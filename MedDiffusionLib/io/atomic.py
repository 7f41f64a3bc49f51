"""Atomic file writes: a reader never sees a half-written file.

Everything is first written to a temporary file in the destination folder (same file system, so the final
``os.replace`` is atomic), flushed to disk, verified, and only then renamed over the destination. Verification
matters because some writers (SimpleITK's NIfTI writer) do not report short writes on a full disk: without it a
truncated file would replace a good one. Temporary files left by a killed process are swept after a while.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

from ..errors import InputError

__all__ = ["atomic_write_path", "atomic_write_bytes", "atomic_write_text", "atomic_folder", "check_writable",
           "full_suffix", "sweep_stale_temporaries", "WriteVerificationError"]

# Multi-part suffixes that writers dispatch on as a whole (".gz" alone would lose the ".nii").
_DOUBLE_SUFFIXES = (".nii.gz", ".tar.gz", ".json.gz", ".nrrd.gz")
# Our temporary names: '.<stem>.<8 hex>.tmp<suffix>'. Older than this, nobody is writing them any more.
_TMP_RE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp(\.[A-Za-z0-9.]+)?\Z")
STALE_TMP_S = 30 * 60
# fsync errors that mean the data did not reach the disk (others mean "not supported on this handle").
_LOST_DATA_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG}


class WriteVerificationError(InputError):
    """The temporary file is not what was meant to be written (short write, full disk); nothing was replaced."""


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
    # to disk. Some platforms refuse fsync on some handles (ignored); a full disk or an I/O error is not.
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in _LOST_DATA_ERRNOS:
            raise WriteVerificationError(f"writing '{path.name}' failed: {os.strerror(exc.errno)}") from None
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


def sweep_stale_temporaries(folder: Path, older_than_s: float = STALE_TMP_S) -> int:
    """Delete our own temporary files (``_TMP_RE``) older than ``older_than_s`` in ``folder`` (a process killed
    mid-write leaves one behind); returns how many went. Other files are never touched."""
    removed, now = 0, time.time()
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if not (entry.name.startswith(".") and _TMP_RE.match(entry.name)):
                continue
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _verify_known_format(tmp: Path, suffix: str) -> None:
    """Checks any file of these formats must pass, whoever wrote it: the size a safetensors header implies,
    the CRCs of every member of a zip (torch.save)."""
    if suffix == ".safetensors":
        size = tmp.stat().st_size
        with open(tmp, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise WriteVerificationError(f"the written file is truncated ({size} bytes)")
            header = json.loads(fh.read(n))
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
        if size != 8 + n + end:
            raise WriteVerificationError(f"the written file has {size} bytes, its header needs {8 + n + end}")
    elif suffix in (".pt", ".pth", ".ckpt"):
        try:
            with zipfile.ZipFile(tmp) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise WriteVerificationError(f"the written file is not a complete archive ({exc})") from None
        if bad is not None:
            raise WriteVerificationError(f"the written file is corrupt (member '{bad}')")


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike[str],
                      verify: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is deleted.

    The temporary name keeps the real extension at the end (``.name.ab12cd.tmp.nii.gz``) because writers
    such as SimpleITK choose the file format from the suffix. The caller must write the file and close it
    inside the ``with`` block. Before the rename the file is flushed to disk, checked by ``verify`` (which
    raises if the file is not what was meant to be written) and by the checks of its format (safetensors,
    torch zip archives).
    """
    dest = check_writable(path)
    suffix = full_suffix(dest)
    stem = dest.name[: len(dest.name) - len(suffix)] if suffix else dest.name
    tmp = dest.with_name(f".{stem}.{secrets.token_hex(4)}.tmp{suffix}")
    sweep_stale_temporaries(dest.parent)
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"nothing was written to the temporary file for '{dest}'")
        _fsync_file(tmp)
        try:
            _verify_known_format(tmp, suffix)
            if verify is not None:
                verify(tmp)
        except WriteVerificationError as exc:
            raise WriteVerificationError(f"could not write '{dest}': {exc} (is the disk full?); "
                                         "the previous file, if any, is unchanged") from None
        except (ValueError, KeyError, TypeError) as exc:  # a malformed header
            raise WriteVerificationError(f"could not write '{dest}': the written file is malformed ({exc}); "
                                         "the previous file, if any, is unchanged") from None
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
    def same_size(tmp: Path) -> None:
        if tmp.stat().st_size != len(data):
            raise WriteVerificationError(f"{tmp.stat().st_size} of {len(data)} bytes were written")

    with atomic_write_path(path, same_size) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the final path."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path`` (which must not exist yet); on success it is renamed to
    ``path`` (all or nothing: a reader never sees a half-filled folder), on error it is deleted with its content.
    A killed process leaves only a hidden ``.<name>.<hex>.tmp`` folder, never a half model at ``path``."""
    dest = Path(path).expanduser().absolute()
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
