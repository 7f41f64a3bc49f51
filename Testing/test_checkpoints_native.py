"""Our safetensors network format and model bundles (model.yaml): round trips and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_AE_CONFIG, make_tiny_bundle, tiny_bundle, tiny_catalog
from safetensors.torch import save_file

from MedDiffusionLib.catalog import official_catalog
from MedDiffusionLib.checkpoints.bundle import ModelBundle, bundle_from_official, load_bundle, save_bundle
from MedDiffusionLib.checkpoints.any_format import load_any_autoencoder, load_any_denoiser
from MedDiffusionLib.checkpoints.native import (
    is_safetensors_file,
    load_network,
    read_network_metadata,
    save_network,
)
from MedDiffusionLib.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def tiny() -> ModelBundle:
    return tiny_bundle(seed=1)


def _denoise(net: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 4, 8, 8, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([5, 900]), torch.tensor([0, 6]), torch.tensor([4.0, 8.0, 8.0]) / 64)


def _volume() -> torch.Tensor:
    return torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1


def test_autoencoder_round_trip(tmp_path: Path, tiny: ModelBundle) -> None:
    path = save_network(tiny.autoencoder, tmp_path / "ae.safetensors", "autoencoder", extra={"note": "x"})
    assert is_safetensors_file(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ae.safetensors"]  # no temp file left behind
    meta = read_network_metadata(path)
    assert meta["format"] == "meddiffusion" and meta["format_version"] == "1" and meta["kind"] == "autoencoder"
    assert meta["config"] == TINY_AE_CONFIG and meta["extra"] == {"note": "x"}
    ae, meta2 = load_network(path)
    assert meta2 == meta and not ae.training and ae.config == tiny.autoencoder.config
    v = _volume()
    with torch.no_grad():
        z0, z1 = tiny.autoencoder.encode(v, patch_size=16), ae.encode(v, patch_size=16)
        assert torch.equal(z0, z1)
        assert torch.equal(tiny.autoencoder.decode(z0), ae.decode(z1))
    assert ae.codebook_range() == tiny.autoencoder.codebook_range()


def test_biflownet_round_trip(tmp_path: Path, tiny: ModelBundle) -> None:
    path = save_network(tiny.denoiser, tmp_path / "dn.safetensors", "biflownet")
    dn, meta = load_network(path, map_location=torch.device("cpu"))
    assert meta["kind"] == "biflownet" and dn.config == tiny.denoiser.config
    assert torch.equal(_denoise(dn), _denoise(tiny.denoiser))
    assert load_any_denoiser(path).config == dn.config


def test_native_errors(tmp_path: Path, tiny: ModelBundle) -> None:
    with pytest.raises(CheckpointError, match="unknown network kind"):
        save_network(tiny.autoencoder, tmp_path / "a.safetensors", "vae")
    with pytest.raises(CheckpointError, match="no .config"):
        save_network(torch.nn.Linear(2, 2), tmp_path / "a.safetensors", "autoencoder")
    ae_path = save_network(tiny.autoencoder, tmp_path / "ae.safetensors", "autoencoder")
    with pytest.raises(CheckpointError, match="expected a biflownet"):
        load_any_denoiser(ae_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_network(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a MedDiffusion network"):
        load_network(foreign)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ae_path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_network(truncated)
    # A config that does not match the weights is reported, not a raw torch error.
    bad_cfg = tmp_path / "bad.safetensors"
    sd = {k: v.contiguous() for k, v in tiny.autoencoder.state_dict().items()}
    cfg = dict(TINY_AE_CONFIG, n_hiddens=16)
    save_file(sd, str(bad_cfg), metadata={"format": "meddiffusion", "format_version": "1", "kind": "autoencoder",
                                          "config": json.dumps(cfg)})
    with pytest.raises(CheckpointError, match="do not match"):
        load_network(bad_cfg)
    future = tmp_path / "future.safetensors"
    save_file(sd, str(future), metadata={"format": "meddiffusion", "format_version": "9", "kind": "autoencoder",
                                         "config": json.dumps(TINY_AE_CONFIG)})
    with pytest.raises(CheckpointError, match="version"):
        load_network(future)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 32)
    assert not is_safetensors_file(junk)
    with pytest.raises(CheckpointError):
        load_any_autoencoder(junk)


# ----------------------------------------------------------------------------------------------- bundles
def test_bundle_round_trip(tmp_path: Path, tiny: ModelBundle) -> None:
    folder = make_tiny_bundle(tmp_path / "tiny", seed=1)
    assert sorted(p.name for p in folder.iterdir()) == ["autoencoder.safetensors", "denoiser.safetensors",
                                                        "model.yaml"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # the temporary folder was renamed into place
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    assert manifest["format"] == "meddiffusion-bundle" and manifest["version"] == 1
    assert manifest["diffusion"] == {"timesteps": 1000, "schedule": "cosine"}
    b = load_bundle(folder)
    assert b.name == "tiny" and b.source == folder and b.downsample == 4 and b.encode_patch_size == 16
    assert b.catalog == tiny_catalog() and b.timesteps == 1000 and b.schedule == "cosine"
    assert b.latent_range == pytest.approx(tiny.autoencoder.codebook_range())
    assert b.controlnets == {}
    assert torch.equal(_denoise(b.denoiser), _denoise(tiny.denoiser))
    with torch.no_grad():
        assert torch.equal(b.autoencoder.encode(_volume(), 16), tiny.autoencoder.encode(_volume(), 16))
    assert b.to("cpu") is b and b.device.type == "cpu"
    info = b.info()
    assert info["anatomies"][0]["volume_sizes_xyz"] == [[16, 16, 16], [32, 32, 16]]
    assert load_bundle(folder / "model.yaml").name == "tiny"  # the manifest path works too
    with pytest.raises(InputError, match="no ControlNet"):
        b.controlnet("mri")


def test_save_bundle_into_existing_folder_and_from_parts(tmp_path: Path, tiny: ModelBundle) -> None:
    parts = {"autoencoder": tiny.autoencoder, "denoiser": tiny.denoiser, "catalog": tiny_catalog(),
             "encode_patch_size": 16, "name": "parts"}
    tmp_path.joinpath("existing").mkdir()
    folder = save_bundle(parts, tmp_path / "existing")
    b = load_bundle(folder)
    assert b.name == "parts" and b.downsample == TINY_AE_CONFIG["downsample"]
    assert b.latent_range == pytest.approx(tiny.autoencoder.codebook_range())
    with pytest.raises(InputError):
        save_bundle({"autoencoder": tiny.autoencoder}, tmp_path / "x")


def test_demo_bundle_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_tiny_bundle(tmp_path / "demo")
    monkeypatch.setenv("MEDDIFFUSION_DEMO_MODEL", str(folder))
    assert load_bundle(None).name == "tiny"
    monkeypatch.setenv("MEDDIFFUSION_DEMO_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="demo model was not found"):
        load_bundle()


def test_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_bundle(tmp_path / "missing")
    folder = make_tiny_bundle(tmp_path / "b")
    manifest = folder / "model.yaml"
    good = yaml.safe_load(manifest.read_text())

    def write(data) -> None:
        manifest.write_text(data if isinstance(data, str) else yaml.safe_dump(data))

    write("format: [unclosed")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_bundle(folder)
    write({**good, "format": "something-else"})
    with pytest.raises(CheckpointError, match="not a MedDiffusion model bundle"):
        load_bundle(folder)
    write({**good, "version": 2})
    with pytest.raises(CheckpointError, match="version"):
        load_bundle(folder)
    write({**good, "denoiser": "gone.safetensors"})
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        load_bundle(folder)
    write({k: v for k, v in good.items() if k != "autoencoder"})
    with pytest.raises(CheckpointError, match="autoencoder"):
        load_bundle(folder)
    bad_anat = [dict(good["anatomies"][0], class_index=9)]
    write({**good, "anatomies": bad_anat})
    with pytest.raises(CheckpointError, match="class indices"):
        load_bundle(folder)
    write({**good, "anatomies": [{"name": "x"}]})
    with pytest.raises(CheckpointError, match="invalid anatomies"):
        load_bundle(folder)
    write({**good, "latent_range": [1, 0]})
    with pytest.raises(CheckpointError, match="latent_range"):
        load_bundle(folder)
    # Without anatomies the official table (here for the 4x autoencoder) is used.
    write({k: v for k, v in good.items() if k != "anatomies"})
    assert load_bundle(folder).catalog == official_catalog(4)


def test_bundle_from_official_files(reference_dir: Path, tmp_path: Path) -> None:
    fx = reference_dir / "fixtures"
    b = bundle_from_official(fx / "ae_tiny_official_format.ckpt", fx / "biflownet_tiny_official_format.pt",
                             denoiser_overrides={"resnet_groups": 3, "dit_num_heads": 2})
    assert b.downsample == 4 and b.catalog == official_catalog(4)
    assert b.catalog.get("ct-head-neck").latent_sizes[0] == (64, 64, 64)
    assert b.latent_range == b.autoencoder.codebook_range()
    # A bundle may also point at the authors' files directly, with overrides in model.yaml.
    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "model.yaml").write_text(yaml.safe_dump({
        "format": "meddiffusion-bundle", "version": 1, "name": "official-tiny",
        "autoencoder": str(fx / "ae_tiny_official_format.ckpt"),
        "denoiser": str(fx / "biflownet_tiny_official_format.pt"),
        "denoiser_options": {"resnet_groups": 3, "dit_num_heads": 2}}))
    b2 = load_bundle(folder)
    assert b2.name == "official-tiny" and b2.denoiser.config == b.denoiser.config


def test_bundle_with_controlnets(tmp_path: Path) -> None:
    pytest.importorskip("MedDiffusionLib.models.controlnet")
    src = tiny_bundle(seed=2, controlnets=True)
    folder = make_tiny_bundle(tmp_path / "cn", seed=2, controlnets=True)
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    assert manifest["controlnets"] == {"mri": "controlnet-mri.safetensors",
                                       "sparse-ct": "controlnet-sparse-ct.safetensors"}
    b = load_bundle(folder)
    assert sorted(b.controlnets) == ["mri", "sparse-ct"] and b.info()["tasks"] == ["mri", "sparse-ct"]
    for task, net in src.controlnets.items():
        loaded = b.controlnet(task)
        assert loaded.config == net.config and not loaded.training
        ref = net.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
