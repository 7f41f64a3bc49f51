"""Talking to the Hugging Face Hub: list a repository's files with their hashes, download one, verify it.

Everything goes through ``huggingface_hub`` so that its cache (``HF_HOME`` / ``HF_HUB_CACHE``), mirrors
(``HF_ENDPOINT``), offline mode (``HF_HUB_OFFLINE``) and token (``HF_TOKEN``) work as Hub users expect. The
listing comes from the model-info API with file metadata: each LFS file's sha256 (its LFS oid), each small
file's git blob id. A downloaded file is hashed and compared with that before anything reads it; a mismatch
removes the file from the cache, so that a retry downloads it again.

Offline, the listing is rebuilt from the cache itself: the snapshot of the revision, each file pointing to a
blob named after its ETag, which the Hub sets to the sha256 for LFS files and to the git blob id otherwise.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, MedDiffusionError

__all__ = ["RemoteFile", "RepoListing", "HubError", "DownloadCorrupted", "is_offline", "hub_cache_dir",
           "list_repo", "download_file", "cached_file", "remove_cached_file", "file_sha256", "git_blob_sha1"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 8 * 1024 * 1024

# Progress callback: (file name, bytes done, bytes total or None).
ByteProgress = Callable[[str, int, "int | None"], None]


class HubError(MedDiffusionError):
    """The Hub (or the cache standing in for it offline) could not give what was asked."""


class DownloadCorrupted(HubError):
    """A downloaded file does not have the hash the Hub listing announced."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub repository, as the listing describes it."""

    path: str                 # inside the repository, '/'-separated
    size: int | None
    sha256: str | None        # LFS files: the sha256 of the content (the LFS oid)
    git_oid: str | None       # the git blob id (sha1 of "blob <size>\\0" + content); the only hash of small files

    @property
    def name(self) -> str:
        """The file name without its folders."""
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class RepoListing:
    """The files of a Hub repository at one commit (what a pull plans from)."""
    repo_id: str
    revision: str             # what was asked for (a branch, tag or commit)
    commit: str | None        # the commit it resolved to (all downloads use it, so files come from one commit)
    files: tuple[RemoteFile, ...]
    from_cache: bool = False  # True when built offline from the local cache


# ----------------------------------------------------------------------------------------- environment
def is_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once at import; tests and Slicer set it later)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The huggingface_hub cache folder: HF_HUB_CACHE, else HF_HOME/hub, else its default (read now)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _endpoint() -> str | None:
    ep = os.environ.get("HF_ENDPOINT")
    return ep.rstrip("/") if ep else None


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None  # None: huggingface_hub falls back to the saved login


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# --------------------------------------------------------------------------------------------- listing
def list_repo(repo_id: str, revision: str = "main") -> RepoListing:
    """The files of ``repo_id`` at ``revision`` with sizes and hashes; offline, those in the local cache."""
    if is_offline():
        return _list_from_cache(repo_id, revision)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=_endpoint(), token=_token()).model_info(repo_id, revision=revision,
                                                                      files_metadata=True)
    except RepositoryNotFoundError:
        raise HubError(f"the Hub has no model repository '{repo_id}' (or it needs a token: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"'{repo_id}' has no revision '{revision}'") from None
    except HfHubHTTPError as exc:
        raise HubError(f"the Hub refused the file listing of '{repo_id}': {_describe(exc)}") from None
    except OSError as exc:  # httpx transport errors derive from neither; connection refused etc. do
        raise HubError(f"cannot reach the Hub for '{repo_id}' ({_describe(exc)}); check the network, "
                       "HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache") from None
    except Exception as exc:  # httpx.ConnectError / TimeoutException are not OSErrors
        if type(exc).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise HubError(f"cannot reach the Hub for '{repo_id}' ({_describe(exc)}); check the network, "
                           "HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache") from None
        raise
    files = []
    for s in info.siblings or ():
        lfs = s.lfs
        sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        size = s.size if s.size is not None else (lfs.get("size") if isinstance(lfs, dict) else None)
        files.append(RemoteFile(path=s.rfilename, size=size, sha256=sha.lower() if sha else None,
                                git_oid=s.blob_id.lower() if s.blob_id else None))
    return RepoListing(repo_id=repo_id, revision=revision, commit=info.sha, files=tuple(files))


def _repo_cache_folder(repo_id: str) -> Path:
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _list_from_cache(repo_id: str, revision: str) -> RepoListing:
    folder = _repo_cache_folder(repo_id)
    commit = revision if _SHA1.match(revision) else None
    ref = folder / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    if commit is None and (folder / "snapshots").is_dir():
        # Files fetched by commit (as pulls do, so that they come from one commit) leave no ref: take the
        # newest snapshot, the one the last pull used.
        snaps = sorted((p for p in (folder / "snapshots").iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        commit = snaps[-1].name if snaps else None
    snap = folder / "snapshots" / commit if commit else None
    if snap is None or not snap.is_dir():
        raise HubError(f"offline (HF_HUB_OFFLINE is set) and '{repo_id}' revision '{revision}' is not in the "
                       f"Hugging Face cache at '{hub_cache_dir()}'; unset HF_HUB_OFFLINE to download it")
    files = []
    for p in sorted(snap.rglob("*")):
        if not p.is_file():
            continue
        blob = p.resolve().name if p.is_symlink() else ""
        files.append(RemoteFile(path=p.relative_to(snap).as_posix(), size=p.stat().st_size,
                                sha256=blob if _SHA256.match(blob) else None,
                                git_oid=blob if _SHA1.match(blob) else None))
    return RepoListing(repo_id=repo_id, revision=revision, commit=commit, files=tuple(files), from_cache=True)


# ------------------------------------------------------------------------------------------ downloading
def _progress_class(file: RemoteFile, progress: ByteProgress | None, show_bar: bool) -> type:
    """A huggingface_hub tqdm subclass that also reports its byte count to ``progress``.

    Only the first bar of a download reports: over Xet, huggingface_hub opens a second one (network bytes beside
    bytes written), and two counters would make the reported progress jump back and forth.
    """
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    reporting: list[object] = []

    class _Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if not show_bar:
                kwargs["disable"] = True
            kwargs.setdefault("desc", file.name)
            super().__init__(*args, **kwargs)
            self._bytes = int(kwargs.get("initial") or 0)
            if not reporting:
                reporting.append(self)
            self._report()

        def _report(self) -> None:
            if progress is not None and reporting and reporting[0] is self:
                progress(file.name, self._bytes, file.size)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            self._bytes += int(n or 0)
            self._report()
            return out

    return _Bar


def _supports_tqdm_class() -> bool:
    from huggingface_hub import hf_hub_download

    return "tqdm_class" in inspect.signature(hf_hub_download).parameters


def cached_file(listing: RepoListing, file: RemoteFile) -> Path | None:
    """The file's path in the cache if it is there (no network), else None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(listing.repo_id, file.path, cache_dir=str(hub_cache_dir()),
                                   revision=listing.commit or listing.revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def download_file(listing: RepoListing, file: RemoteFile, progress: ByteProgress | None = None,
                  show_bar: bool = True) -> Path:
    """Fetch one file into the Hugging Face cache (resuming a dropped transfer), verify its hash; its path."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    offline = is_offline() or listing.from_cache
    kwargs: dict[str, Any] = dict(repo_id=listing.repo_id, filename=file.path, revision=listing.commit or
                                  listing.revision, cache_dir=str(hub_cache_dir()), token=_token())
    if _endpoint():
        kwargs["endpoint"] = _endpoint()
    if offline:
        kwargs["local_files_only"] = True
    if _supports_tqdm_class():
        kwargs["tqdm_class"] = _progress_class(file, progress, show_bar)
    try:
        path = Path(hf_hub_download(**kwargs))
    except LocalEntryNotFoundError:
        raise HubError(f"'{file.path}' of '{listing.repo_id}' is not in the Hugging Face cache and the Hub "
                       "cannot be reached (offline)") from None
    except EntryNotFoundError:
        raise HubError(f"'{listing.repo_id}' has no file '{file.path}' at {listing.commit or listing.revision}") \
            from None
    except HfHubHTTPError as exc:
        raise HubError(f"downloading '{file.path}' failed: {_describe(exc)}") from None
    except OSError as exc:  # disk full, consistency check (size) failures, connection errors
        raise HubError(f"downloading '{file.path}' failed ({_describe(exc)}); run the same command again "
                       "to retry") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise HubError(f"downloading '{file.path}' failed ({_describe(exc)}); run the same command again "
                           "to retry") from None
        raise
    if progress is not None:
        progress(file.name, path.stat().st_size, file.size)
    verify_file(path, file)
    return path


# --------------------------------------------------------------------------------------------- hashing
def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    return _digest(hashlib.sha256(), path)


def git_blob_sha1(path: str | os.PathLike[str]) -> str:
    """The id git gives the file's content (what the Hub lists for files not stored in LFS)."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {os.path.getsize(path)}\0".encode())
    return _digest(h, path)


def _digest(h: "hashlib._Hash", path: str | os.PathLike[str]) -> str:
    """``h`` fed with the file's bytes, read in chunks; its hex digest."""
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, file: RemoteFile) -> None:
    """Compare the file's hash with the listing's; on mismatch remove it from the cache and raise."""
    if file.sha256:
        expected, actual, kind = file.sha256, file_sha256(path), "sha256"
    elif file.git_oid:
        expected, actual, kind = file.git_oid, git_blob_sha1(path), "git blob id"
    else:
        raise HubError(f"the listing gives no hash for '{file.path}', so its download cannot be verified")
    if actual != expected:
        remove_cached_file(path)
        raise DownloadCorrupted(f"'{file.path}' is corrupt: its {kind} is {actual[:16]}..., the Hub lists "
                                f"{expected[:16]}...; the file was removed from the cache, run the same command "
                                "again to download it anew")


def remove_cached_file(path: str | os.PathLike[str]) -> int:
    """Remove one file of the Hugging Face cache: its snapshot entry, and its blob once nothing points to it.

    Returns the bytes freed. Only files inside the cache folder are touched.
    """
    p = Path(path)
    cache = hub_cache_dir().resolve()
    if not p.absolute().is_relative_to(cache) and not p.resolve().is_relative_to(cache):
        raise InputError(f"'{p}' is not in the Hugging Face cache '{cache}'")
    freed = 0
    if p.is_symlink():
        blob = p.resolve()
        p.unlink()
        if not blob.is_relative_to(cache) or blob.parent.name != "blobs":
            return 0  # a link out of the cache: never follow it to delete what it points to
        repo = blob.parent.parent  # models--owner--name/blobs/<etag>
        still_used = any(q.is_symlink() and q.resolve() == blob for q in (repo / "snapshots").rglob("*"))
        if not still_used and blob.is_file():
            freed = blob.stat().st_size
            blob.unlink()
    elif p.is_file():  # caches without symlinks (Windows) hold copies
        freed = p.stat().st_size
        p.unlink()
    return freed
