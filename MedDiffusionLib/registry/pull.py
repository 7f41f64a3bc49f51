"""`models pull`: plan (what, from where, how big), then download, verify and convert, reporting progress.

The plan is made before any byte is downloaded, so the caller can show the size and ask for consent. The
result is ``<models home>/<name>/``, a bundle of safetensors files that later runs load without pickles.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle_summary import HU_RANGE_KEY, OFFICIAL_HU_RANGE
from ..errors import InputError
from .convert import ExpectedConfig, convert_to_bundle
from .hub import HubError, RemoteFile, RepoListing, cached_file, download_file, hub_cache_dir, list_repo, \
    remove_cached_file
from .known import KnownModel, known_model
from .roles import match_roles
from .sizes import human_bytes
from .store import models_home, registry_lock

__all__ = ["PlannedFile", "PullPlan", "PullEvent", "plan_pull", "execute_pull", "remove_downloads"]


@dataclass(frozen=True)
class PlannedFile:
    """One file of a pull: its role, the remote file, and the cached copy if there already is one."""
    role: str                 # "autoencoder" or "denoiser"
    remote: RemoteFile
    cached: Path | None       # already in the Hugging Face cache: nothing to download


@dataclass(frozen=True)
class PullPlan:
    """What a pull will do: which model, from which commit, which files, where to, and how much to download."""
    model: KnownModel
    listing: RepoListing
    files: tuple[PlannedFile, ...]
    dest: Path

    @property
    def download_bytes(self) -> int:
        """What still has to come over the network."""
        return sum(f.remote.size or 0 for f in self.files if f.cached is None)

    @property
    def total_bytes(self) -> int:
        """Bytes of all the files of the plan (downloaded or already cached)."""
        return sum(f.remote.size or 0 for f in self.files)

    def describe(self) -> list[str]:
        """Lines for a consent prompt: the source, each file with its size, what happens after."""
        where = f"{self.listing.repo_id}@{(self.listing.commit or self.listing.revision)[:12]}"
        lines = [f"{self.model.name}: {self.model.description}", f"  from {where}"
                 + (" (offline: from the Hugging Face cache)" if self.listing.from_cache else "")]
        for f in self.files:
            state = "in the cache" if f.cached is not None else "to download"
            lines.append(f"  {f.role:<11} {f.remote.path}  {human_bytes(f.remote.size)} ({state})")
        lines.append(f"  download {human_bytes(self.download_bytes)} into {hub_cache_dir()}, then convert once to "
                     f"safetensors in {self.dest}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON values (for GUIs and `--json`)."""
        return {"model": self.model.name, "repo_id": self.listing.repo_id, "commit": self.listing.commit,
                "download_bytes": self.download_bytes, "total_bytes": self.total_bytes, "dest": str(self.dest),
                "files": [{"role": f.role, "path": f.remote.path, "size": f.remote.size,
                           "cached": f.cached is not None} for f in self.files]}


@dataclass
class PullEvent:
    """One progress report: ``done_bytes`` / ``total_bytes`` cover the whole download of the plan."""

    stage: str                # "download", "convert" or "done"
    file: str | None = None
    done_bytes: int = 0
    total_bytes: int = 0
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _known(name: str) -> KnownModel:
    model = known_model(name)
    if model is None:
        from .known import KNOWN_MODELS

        raise InputError(f"'{name}' is not a downloadable model (those are: "
                         f"{', '.join(m.name for m in KNOWN_MODELS)}); your own models are added with "
                         "`meddiffusion models add`")
    return model


def plan_pull(name: str, revision: str | None = None, autoencoder_file: str | None = None,
              denoiser_file: str | None = None) -> PullPlan:
    """List the repository (or the cache, offline), pick the two files, note which are cached already.

    Args:
        name: a downloadable model (`KNOWN_MODELS`).
        revision: branch, tag or commit; None: the model's pinned revision.
        autoencoder_file: the repository path of the autoencoder when the roles cannot be told apart.
        denoiser_file: likewise for the denoiser.

    Returns:
        The plan: files, their sizes and hashes, which are cached, and the destination folder.

    Raises:
        InputError: an unknown model name.
        HubError: the repository cannot be listed or does not hold the two files.
    """
    model = _known(name)
    listing = list_repo(model.repo_id, revision or model.revision)
    try:
        match = match_roles(listing.files, model, autoencoder_file, denoiser_file)
    except HubError as exc:
        if not listing.from_cache:
            raise
        raise HubError(f"{exc} (offline: HF_HUB_OFFLINE is set, so only the Hugging Face cache was searched; "
                       "unset it to download)") from None
    files = tuple(PlannedFile(role, remote, cached_file(listing, remote)) for role, remote in match.items())
    return PullPlan(model, listing, files, models_home() / model.name)


def _check_disk(plan: PullPlan) -> None:
    needs = [(hub_cache_dir(), plan.download_bytes, "the download"),
             (models_home(), min(plan.model.bundle_bytes, plan.total_bytes), "the converted model")]
    for folder, need, what in needs:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if need > free:
            raise InputError(f"not enough disk space for {what}: {human_bytes(need)} needed in '{folder}', "
                             f"{human_bytes(free)} free")


def execute_pull(plan: PullPlan, progress: Callable[[PullEvent], None] | None = None, show_bar: bool = True,
                 keep_download: bool = True) -> Path:
    """Download, verify, convert; returns the bundle folder. Safe to run again after a failure or a kill.

    Args:
        plan: from `plan_pull`.
        progress: called with a `PullEvent` per download chunk and conversion stage.
        show_bar: draw a terminal progress bar for each file that is downloaded (not for cached ones).
        keep_download: keep the original files in the Hugging Face cache (False deletes them after
            converting).

    Raises:
        InputError: the destination folder exists already, or the disk has too little space.
        HubError: a download or hash verification fails.
        CheckpointError: the downloaded files do not convert into the expected networks.
    """
    report = progress or (lambda event: None)
    with registry_lock(plan.model.name):
        if plan.dest.exists():
            raise InputError(f"'{plan.dest}' already exists; `meddiffusion models remove {plan.model.name}` "
                             "first to download it again")
        _check_disk(plan)
        total = plan.download_bytes
        done_before = 0
        paths: dict[str, Path] = {}
        for f in plan.files:
            counted = f.cached is None  # cached files do not count towards the download bar

            def on_bytes(file_name: str, done: int, _size: int | None, _base: int = done_before,
                         _counted: bool = counted) -> None:
                report(PullEvent("download", file_name, _base + (done if _counted else 0), total))

            report(PullEvent("download", f.remote.name, done_before, total, f"{f.role}: {f.remote.path}"))
            paths[f.role] = download_file(plan.listing, f.remote, on_bytes, show_bar=show_bar and counted)
            if counted:
                done_before += f.remote.size or 0
        source = {
            "repo_id": plan.listing.repo_id, "revision": plan.listing.revision, "commit": plan.listing.commit,
            "files": {f.role: {"path": f.remote.path, "size": f.remote.size, "sha256": f.remote.sha256,
                               "git_oid": f.remote.git_oid,
                               "cache_path": str(paths[f.role]) if keep_download else None} for f in plan.files},
        }
        ae, dn = (next(f for f in plan.files if f.role == r) for r in ("autoencoder", "denoiser"))
        report(PullEvent("convert", None, total, total, "converting to safetensors"))
        dest = convert_to_bundle(
            paths["autoencoder"], paths["denoiser"], plan.dest, plan.model.name,
            expect=ExpectedConfig(plan.model.downsample, plan.model.denoiser_patch_size), source=source,
            description=plan.model.description, labels=(ae.remote.path, dn.remote.path),
            manifest_extra={HU_RANGE_KEY: list(OFFICIAL_HU_RANGE)},  # CT in HU as the authors normalised it
            on_stage=lambda what: report(PullEvent("convert", None, total, total, f"converting: {what}")))
        if not keep_download:
            for p in paths.values():
                remove_cached_file(p)
        report(PullEvent("done", None, total, total, f"{plan.model.name} ready in {dest}"))
        return dest


def remove_downloads(source: dict[str, Any]) -> int:
    """Delete the original files a bundle was converted from from the Hugging Face cache; bytes freed."""
    freed = 0
    for f in (source.get("files") or {}).values():
        cached = f.get("cache_path") if isinstance(f, dict) else None
        if cached and Path(cached).exists():
            try:
                freed += remove_cached_file(cached)
            except InputError:
                continue  # recorded outside the current cache (HF_HOME changed): leave it alone
    return freed

