"""The local model registry: which models exist here, where they are, how much disk they use; names to folders.

Three kinds of names:

* ``demo``: the bundled demo model (``models/demo``, or ``$MEDDIFFUSION_DEMO_MODEL``), always there;
* the downloadable models of known.py: converted bundles in ``<models home>/<name>/`` once pulled;
* the user's own models (``models add``), recorded in ``<models home>/registry.yaml``: either a bundle folder
  registered where it is, or files converted into ``<models home>/<name>/``.

The models home is ``$MEDDIFFUSION_MODELS_DIR``, else ``$XDG_CACHE_HOME/meddiffusion/models``, else
``~/.cache/meddiffusion/models``. The authors' original files stay in the Hugging Face cache (``HF_HOME``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from ..errors import InputError
from .known import DEMO_MODEL_NAME, KNOWN_MODELS, known_model, valid_model_name

__all__ = ["MODELS_DIR_ENV", "models_home", "ModelEntry", "list_models", "resolve_model", "model_entry",
           "register_user_model", "unregister_user_model", "user_models", "folder_bytes", "registry_lock",
           "REGISTRY_FILE"]

MODELS_DIR_ENV = "MEDDIFFUSION_MODELS_DIR"
REGISTRY_FILE = "registry.yaml"
_LOCKS = ".locks"


def models_home() -> Path:
    """Where downloaded and converted models live (read from the environment each time).

    Returns:
        $MEDDIFFUSION_MODELS_DIR if set, else $XDG_CACHE_HOME/meddiffusion/models (default ~/.cache/...).
    """
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meddiffusion" / "models"


@contextlib.contextmanager
def registry_lock(what: str, wait_s: float = 0.0) -> Iterator[None]:
    """A cross-process lock for one model (or the registry file); fails fast with a clear message."""
    from filelock import FileLock, Timeout

    folder = models_home() / _LOCKS
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f"{what}.lock"))
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise InputError(f"'{what}' is busy: another meddiffusion process is downloading or changing it; "
                         "wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def folder_bytes(path: Path) -> int:
    """Disk use of a file or folder (symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


@dataclass
class ModelEntry:
    """One model as `models list` shows it."""

    name: str
    kind: str                      # "bundled", "download" or "user"
    description: str
    path: Path | None              # the bundle folder (None: not downloaded yet)
    available: bool                # usable now (folder present with model.yaml)
    disk_bytes: int = 0            # the bundle on disk
    download_bytes: int = 0        # the authors' original files kept in the Hugging Face cache
    expected_bytes: int | None = None   # for a model not yet downloaded: its size once converted
    download_estimate: int | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_paths: bool = True) -> dict[str, Any]:
        """The entry as JSON values (paths left out for clients that must not see them)."""
        d = {"name": self.name, "kind": self.kind, "description": self.description, "available": self.available,
             "disk_bytes": self.disk_bytes, "download_bytes": self.download_bytes,
             "expected_bytes": self.expected_bytes, "download_estimate": self.download_estimate}
        if with_paths:
            d["path"] = str(self.path) if self.path else None
        return d


# ------------------------------------------------------------------------------------------- user models
def _registry_path() -> Path:
    return models_home() / REGISTRY_FILE


def user_models() -> dict[str, dict[str, Any]]:
    """name -> {path, description, added} of the user's own models."""
    p = _registry_path()
    if not p.is_file():
        return {}
    import yaml  # here, not at the top: the Slicer panel lists models before its dependencies are installed

    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read the model registry '{p}': {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        return {}
    return {str(k): dict(v) for k, v in models.items() if isinstance(v, dict) and isinstance(v.get("path"), str)}


def _write_user_models(models: dict[str, dict[str, Any]]) -> None:
    import yaml

    from ..io.atomic import atomic_write_text

    models_home().mkdir(parents=True, exist_ok=True)
    atomic_write_text(_registry_path(), yaml.safe_dump({"version": 1, "models": models}, sort_keys=True))


def register_user_model(name: str, path: Path, description: str = "") -> None:
    """Remember a user's model folder under ``name`` (the folder stays where it is)."""
    with registry_lock("registry", wait_s=10):
        models = user_models()
        models[name] = {"path": str(Path(path).absolute()), "description": description,
                        "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_user_models(models)


def unregister_user_model(name: str) -> None:
    """Forget a user's model name (its folder is not touched)."""
    with registry_lock("registry", wait_s=10):
        models = user_models()
        if models.pop(name, None) is not None:
            _write_user_models(models)


# ---------------------------------------------------------------------------------------------- listing
def _has_manifest(folder: Path | None) -> bool:
    from ..bundle_summary import MANIFEST  # not checkpoints.bundle: listing models must not import torch

    return folder is not None and (folder / MANIFEST).is_file()


def _read_source(folder: Path) -> dict[str, Any]:
    from .convert import SOURCE_FILE

    with contextlib.suppress(OSError, ValueError):
        data = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return {}


def _cached_download_bytes(source: dict[str, Any]) -> int:
    """Bytes the recorded original files still take in the Hugging Face cache."""
    total = 0
    for f in (source.get("files") or {}).values():
        cached = f.get("cache_path") if isinstance(f, dict) else None
        if cached and Path(cached).exists():
            total += Path(cached).resolve().stat().st_size
    return total


def model_entry(name: str) -> ModelEntry:
    """The entry called ``name``; InputError listing the names otherwise."""
    if name == DEMO_MODEL_NAME:
        from ..bundle_summary import demo_bundle_dir

        folder = demo_bundle_dir()
        return ModelEntry(name, "bundled", "the bundled demo model: 32^3 phantom-like volumes, for trying things "
                          "out offline", folder, _has_manifest(folder),
                          disk_bytes=folder_bytes(folder) if folder.is_dir() else 0)
    known = known_model(name)
    if known is not None:
        folder = models_home() / name
        ok = _has_manifest(folder)
        source = _read_source(folder) if ok else {}
        return ModelEntry(name, "download", known.description, folder if ok else None, ok,
                          disk_bytes=folder_bytes(folder) if ok else 0, download_bytes=_cached_download_bytes(source),
                          expected_bytes=known.bundle_bytes, download_estimate=known.download_bytes_estimate,
                          source=source)
    user = user_models().get(name)
    if user is not None:
        folder = Path(user["path"])
        ok = _has_manifest(folder)
        return ModelEntry(name, "user", user.get("description") or "your model", folder, ok,
                          disk_bytes=folder_bytes(folder) if ok else 0, source=_read_source(folder) if ok else {})
    raise InputError(f"unknown model '{name}' (known: {', '.join(all_model_names())})")


def all_model_names() -> list[str]:
    return [DEMO_MODEL_NAME, *(m.name for m in KNOWN_MODELS), *sorted(user_models())]


def list_models() -> list[ModelEntry]:
    """Every model: the demo, the downloadable ones (pulled or not), the user's own."""
    return [model_entry(n) for n in all_model_names()]


# ------------------------------------------------------------------------------------------- resolution
def _looks_like_path(spec: str) -> bool:
    return any(sep in spec for sep in ("/", os.sep)) or spec.startswith((".", "~")) or \
        spec.endswith((".yaml", ".yml"))


def resolve_model(spec: str | os.PathLike[str] | None) -> Path:
    """The bundle folder for ``--model`` (a registered name or a folder); None means the demo model.

    A bare word is a name first (``official-8x``), then a folder; anything with a path separator is a folder.
    A known model that is not downloaded yet is an error that says how to get it (never a silent download).

    Returns:
        The folder; for a path, as given ('~' expanded), not yet checked for a bundle (`load_bundle` does).

    Raises:
        InputError: a known model not downloaded yet, a registered model whose folder is gone, or a word that
            is neither a model name nor an existing folder.
    """
    if spec is None:
        from ..bundle_summary import demo_bundle_dir

        return demo_bundle_dir()  # the demo entry's folder
    text = os.fspath(spec)
    if isinstance(spec, os.PathLike) or _looks_like_path(text):
        return Path(text).expanduser()
    names = all_model_names()
    if text in names:
        entry = model_entry(text)
        if entry.available and entry.path is not None:
            return entry.path
        if entry.kind == "download":
            from .sizes import human_bytes

            raise InputError(f"model '{text}' is not downloaded yet (about {human_bytes(entry.download_estimate)} "
                             f"to download): run `meddiffusion models pull {text}`")
        raise InputError(f"model '{text}' is registered at '{entry.path}', but no model is there any more; "
                         f"`meddiffusion models remove {text}` forgets it")
    if Path(text).expanduser().is_dir():
        return Path(text).expanduser()
    raise InputError(f"'{text}' is neither a model name ({', '.join(names)}) nor a model folder")


def check_new_name(name: str) -> str:
    """A name `models add` may take: valid, and not the demo's or a downloadable model's."""
    valid_model_name(name)
    if name == DEMO_MODEL_NAME or known_model(name) is not None:
        raise InputError(f"'{name}' is reserved for a published model; choose another name")
    return name


def remove_folder(folder: Path) -> int:
    """Delete a model folder inside the models home (never elsewhere); returns the bytes freed."""
    home = models_home().resolve()
    target = folder.resolve()
    if not target.is_relative_to(home) or target == home:
        raise InputError(f"refusing to delete '{folder}': it is not a model folder inside '{home}'")
    freed = folder_bytes(target)
    shutil.rmtree(target)
    return freed
