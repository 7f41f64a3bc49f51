"""`models add` and `models remove`: the user's own models in, any model out."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .convert import convert_to_bundle
from .known import DEMO_MODEL_NAME
from .pull import remove_downloads
from .store import (
    check_new_name,
    model_entry,
    models_home,
    register_user_model,
    registry_lock,
    remove_folder,
    unregister_user_model,
    user_models,
)

__all__ = ["add_model", "remove_model", "RemoveResult"]


def add_model(name: str, paths: Sequence[str | os.PathLike[str]], description: str = "",
              replace: bool = False) -> Path:
    """Register the user's model ``name``; returns its bundle folder.

    One path: a bundle folder (model.yaml), registered where it is after checking that it loads. Two paths: an
    autoencoder and a denoiser file (ours or the authors'), converted once into ``<models home>/<name>/``.

    Args:
        name: the new name; not the demo's or a downloadable model's.
        paths: one bundle folder, or (autoencoder file, denoiser file) in that order.
        description: shown by `meddiffusion models list`.
        replace: replace a user model of that name (else it is refused).

    Raises:
        InputError: an invalid or reserved name, an existing name without ``replace``, or paths that are not
            one folder or two files.
        CheckpointError: the model does not load or convert.
    """
    from ..checkpoints.bundle import load_bundle

    check_new_name(name)
    if name in user_models() and not replace:
        raise InputError(f"a model called '{name}' exists already; remove it first or pass --replace")
    items = [Path(p).expanduser().absolute() for p in paths]
    if len(items) == 1:
        folder = items[0]
        if not folder.is_dir():
            raise InputError(f"'{folder}' is not a model folder; give a folder with model.yaml, or an "
                             "autoencoder file and a denoiser file")
        load_bundle(folder)  # refuse now what would fail at every later use
        if replace:
            _drop(name)
        register_user_model(name, folder, description)
        return folder
    if len(items) != 2:
        raise InputError("give a model folder, or an autoencoder file and a denoiser file (in that order)")
    for p in items:
        if not p.is_file():
            raise InputError(f"'{p}' is not a file")
    with registry_lock(name):
        if replace:
            _drop(name)
        dest = convert_to_bundle(items[0], items[1], models_home() / name, name, description=description,
                                 source={"files": {"autoencoder": {"path": str(items[0])},
                                                   "denoiser": {"path": str(items[1])}}})
        register_user_model(name, dest, description)
    return dest


def _drop(name: str) -> None:
    entry = user_models().get(name)
    if entry is None:
        return
    folder = Path(entry["path"])
    if folder.exists() and folder.resolve().is_relative_to(models_home().resolve()):
        remove_folder(folder)  # converted by us: ours to delete; a registered folder stays where it is
    unregister_user_model(name)


@dataclass
class RemoveResult:
    """What `remove_model` did: bytes freed from the bundle and the download cache, or the folder it only forgot."""
    name: str
    freed_bundle: int
    freed_download: int
    kept_folder: Path | None     # a user's folder registered in place: forgotten, not deleted


def remove_model(name: str, keep_download: bool = False) -> RemoveResult:
    """Delete a downloaded model (and its original files in the Hugging Face cache unless ``keep_download``),
    or forget a user's model (deleting it only if it was converted into the models home).

    Returns:
        The bytes freed in the models home and in the Hugging Face cache, and a user folder left in place
        (registered from elsewhere), if any.

    Raises:
        InputError: the demo model, an unknown name, or a downloadable model that is not downloaded.
    """
    if name == DEMO_MODEL_NAME:
        raise InputError("the bundled demo model cannot be removed")
    entry = model_entry(name)  # InputError for unknown names
    with registry_lock(name):
        if entry.kind == "download":
            if entry.path is None:
                raise InputError(f"model '{name}' is not downloaded")
            freed_dl = 0 if keep_download else remove_downloads(entry.source)
            return RemoveResult(name, remove_folder(entry.path), freed_dl, None)
        folder = Path(user_models()[name]["path"])
        inside = folder.exists() and folder.resolve().is_relative_to(models_home().resolve())
        freed = remove_folder(folder) if inside else 0
        unregister_user_model(name)
        return RemoveResult(name, freed, 0, None if inside else folder)
