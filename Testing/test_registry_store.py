"""The model registry without a network: matching Hub files to roles, names to folders, `models add/remove`,
the check of a file's configuration against its role, and the server's model listing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_tiny_bundle
from official_files import write_official_autoencoder, write_official_biflownet

from MedDiffusionLib.cli import main
from MedDiffusionLib.errors import CheckpointError, InputError
from MedDiffusionLib.registry import known_model, list_models, model_entry, resolve_model
from MedDiffusionLib.registry.convert import ExpectedConfig, convert_to_bundle
from MedDiffusionLib.registry.hub import HubError, RemoteFile
from MedDiffusionLib.registry.roles import match_roles


@pytest.fixture(autouse=True)
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDDIFFUSION_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


def _files(*paths: str) -> list[RemoteFile]:
    return [RemoteFile(p, 100, "0" * 64, None) for p in paths]


# ------------------------------------------------------------------------------------------------ roles
def test_roles_from_the_authors_names() -> None:
    listing = _files("README.md", "PatchVolume_8x_s2.ckpt", "BiFlowNet_0453500.pt", "PatchVolume_4x_s2.ckpt",
                     "BiFlowNet_4x.pt", "PatchVolume_8x_s1.ckpt")
    m8 = match_roles(listing, known_model("official-8x"))
    assert (m8.autoencoder.path, m8.denoiser.path) == ("PatchVolume_8x_s2.ckpt", "BiFlowNet_0453500.pt")
    m4 = match_roles(listing, known_model("official-4x"))
    assert (m4.autoencoder.path, m4.denoiser.path) == ("PatchVolume_4x_s2.ckpt", "BiFlowNet_4x.pt")


def test_roles_by_pattern_when_names_differ() -> None:
    # Renamed and moved files: matched by role words, factor marks and stage, never across factors.
    listing = _files("checkpoints/autoencoder-8x-stage1.ckpt", "checkpoints/autoencoder-8x-stage2.ckpt",
                     "checkpoints/ae_4x.ckpt", "diffusion/biflownet_x8_ema.pt", "diffusion/biflownet_x4_ema.pt",
                     "config.json")
    m8 = match_roles(listing, known_model("official-8x"))
    assert (m8.autoencoder.path, m8.denoiser.path) == ("checkpoints/autoencoder-8x-stage2.ckpt",
                                                       "diffusion/biflownet_x8_ema.pt")
    m4 = match_roles(listing, known_model("official-4x"))
    assert (m4.autoencoder.path, m4.denoiser.path) == ("checkpoints/ae_4x.ckpt", "diffusion/biflownet_x4_ema.pt")


def test_ambiguous_roles_are_refused_naming_candidates() -> None:
    listing = _files("PatchVolume_8x_s2.ckpt", "BiFlowNet_0400000.pt", "BiFlowNet_0453500_8x.pt",
                     "BiFlowNet_0500000_8x.pt")
    model = known_model("official-8x")
    # The README's name is gone; two 8x-marked BiFlowNets remain.
    listing = [f for f in listing if f.path != "BiFlowNet_0453500.pt"]
    with pytest.raises(HubError, match="ambiguous") as err:
        match_roles(listing, model)
    assert "BiFlowNet_0453500_8x.pt" in str(err.value) and "BiFlowNet_0500000_8x.pt" in str(err.value)
    assert "--denoiser-file" in str(err.value)
    chosen = match_roles(listing, model, denoiser_file="BiFlowNet_0500000_8x.pt")
    assert chosen.denoiser.path == "BiFlowNet_0500000_8x.pt"
    with pytest.raises(HubError, match="no file .* looks like one"):
        match_roles(_files("BiFlowNet_0453500.pt", "README.md"), model)
    with pytest.raises(HubError, match="has no file"):
        match_roles(listing, model, autoencoder_file="missing.ckpt")


# ---------------------------------------------------------------------------------------------- names
def test_resolve_names_and_folders(tmp_path: Path) -> None:
    demo = resolve_model("demo")
    assert (demo / "model.yaml").is_file()
    with pytest.raises(InputError, match="not downloaded yet.*models pull official-8x"):
        resolve_model("official-8x")
    with pytest.raises(InputError, match="neither a model name .*demo, official-8x, official-4x"):
        resolve_model("no-such-model")
    folder = make_tiny_bundle(tmp_path / "mine")
    assert resolve_model(str(folder)) == folder  # a folder is used as it is, registered or not
    assert {e.name for e in list_models()} == {"demo", "official-8x", "official-4x"}


def test_add_folder_use_by_name_and_forget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_tiny_bundle(tmp_path / "trained")
    assert main(["models", "add", "my-ct", str(folder), "--description", "fine-tuned on our CT"]) == 0
    assert resolve_model("my-ct") == folder
    entry = model_entry("my-ct")
    assert entry.kind == "user" and entry.available and entry.description == "fine-tuned on our CT"
    out = tmp_path / "g.nrrd"
    assert main(["generate", "--model", "my-ct", "--anatomy", "ct-head-neck", "--sampler", "ddim", "--steps", "2",
                 "--seed", "3", "--quiet", "--out", str(out)]) == 0 and out.is_file()
    # Reserved and taken names are refused; a broken folder is refused before it is registered.
    assert main(["models", "add", "official-8x", str(folder)]) == 2
    assert main(["models", "add", "my-ct", str(folder)]) == 2
    assert main(["models", "add", "Bad Name", str(folder)]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["models", "add", "empty", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "reserved" in err and "exists already" in err and "invalid model name" in err and "model.yaml" in err
    # Removing a registered folder forgets it and leaves the user's files alone.
    assert main(["models", "remove", "my-ct"]) == 0
    assert (folder / "model.yaml").is_file()
    with pytest.raises(InputError, match="neither a model name"):
        resolve_model("my-ct")


def test_add_authors_files_converts_once(tmp_path: Path, models_dir: Path) -> None:
    ae = write_official_autoencoder(tmp_path / "my_ae.ckpt", downsample=4)
    dn = write_official_biflownet(tmp_path / "my_dn.pt", patch_size=1)
    assert main(["models", "add", "retrained", str(ae), str(dn)]) == 0
    folder = resolve_model("retrained")
    assert folder == models_dir / "retrained"
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".safetensors", ".safetensors", ".yaml"]
    ae.unlink()
    dn.unlink()  # the pickles are not needed any more
    from MedDiffusionLib.checkpoints.bundle import load_bundle

    assert load_bundle(folder).downsample == 4
    assert main(["models", "remove", "retrained"]) == 0
    assert not folder.exists()  # converted by us, so deleted with the entry


def test_file_configuration_must_match_its_role(tmp_path: Path) -> None:
    # The name said 8x, the file holds a 4x autoencoder: refused after download, nothing published.
    ae4 = write_official_autoencoder(tmp_path / "PatchVolume_8x_s2.ckpt", downsample=4)
    dn = write_official_biflownet(tmp_path / "BiFlowNet.pt", patch_size=1)
    expect = ExpectedConfig(downsample=8, denoiser_patch_size=1)
    with pytest.raises(CheckpointError, match="holds a 4x autoencoder, but this model needs a 8x"):
        convert_to_bundle(ae4, dn, tmp_path / "out", "x", expect, labels=("PatchVolume_8x_s2.ckpt", "BiFlowNet.pt"))
    with pytest.raises(CheckpointError, match="patch size 1, but this model's has 2"):
        convert_to_bundle(ae4, dn, tmp_path / "out", "x", ExpectedConfig(4, 2))
    with pytest.raises(CheckpointError, match="not a usable BiFlowNet"):
        convert_to_bundle(ae4, ae4, tmp_path / "out", "x")  # the autoencoder in the denoiser's place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BiFlowNet.pt", "PatchVolume_8x_s2.ckpt"]  # no leftovers


def test_server_lists_registry_models(tmp_path: Path, models_dir: Path) -> None:
    import urllib.request

    from server_fixture import ServerProcess

    folder = make_tiny_bundle(tmp_path / "served")
    assert main(["models", "add", "served", str(folder)]) == 0
    srv = ServerProcess("served", tmp_path / "store", tmp_path / "server.log", token=None, token_mode="none")
    try:
        with urllib.request.urlopen(srv.url + "/v1/models/available", timeout=30) as r:
            data = json.loads(r.read())
        with urllib.request.urlopen(srv.url + "/v1/models", timeout=30) as r:
            assert json.loads(r.read())["model"] == "tiny"  # the bundle's own name
    finally:
        srv.stop()
    models = {m["name"]: m for m in data["models"]}
    assert set(models) == {"demo", "official-8x", "official-4x", "served"}
    assert models["served"]["loaded"] and models["served"]["available"]
    assert not models["official-8x"]["available"] and not models["demo"]["loaded"]
    assert "path" not in models["served"]  # the server's folders are not the client's business


def test_cache_cleanup_never_deletes_outside_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from MedDiffusionLib.registry.hub import remove_cached_file
    from MedDiffusionLib.registry.pull import remove_downloads

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    snap = tmp_path / "hf" / "hub" / "models--a--b" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    link = snap / "evil.pt"
    link.symlink_to(precious)  # a crafted cache entry pointing out of the cache
    assert remove_cached_file(link) == 0 and precious.read_text() == "keep me" and not link.exists()
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        remove_cached_file(precious)
    # A tampered source.json naming a file outside the cache is skipped, not deleted.
    assert remove_downloads({"files": {"autoencoder": {"cache_path": str(precious)}}}) == 0
    assert precious.read_text() == "keep me"
