"""`meddiffusion models pull` against a real HTTP server on loopback that speaks the Hub's API (fake_hub.py).

Covers: a pull with the size shown and consent required, a dropped connection resumed with a Range request, a
corrupted download refused by its hash, offline mode served from the Hugging Face cache, then generating by
name. huggingface_hub's cache (HF_HOME) and the models folder point into tmp dirs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_hub import FakeHub
from official_files import write_official_autoencoder, write_official_biflownet

from MedDiffusionLib.cli import main
from MedDiffusionLib.registry import model_entry, resolve_model

REPO = "MMorss/3D-MedDiffusion"
AE8, DN8, AE4, DN4 = "PatchVolume_8x_s2.ckpt", "BiFlowNet_0453500.pt", "PatchVolume_4x_s2.ckpt", "BiFlowNet_4x.pt"


@pytest.fixture(scope="module")
def official_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("official")
    files = {AE8: write_official_autoencoder(d / AE8, downsample=8, seed=1),
             DN8: write_official_biflownet(d / DN8, patch_size=1, seed=2),
             AE4: write_official_autoencoder(d / AE4, downsample=4, seed=3),
             DN4: write_official_biflownet(d / DN4, patch_size=2, seed=4)}
    return {name: p.read_bytes() for name, p in files.items()}


@pytest.fixture()
def hub(official_bytes: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakeHub()
    fake.add_repo(REPO, {**official_bytes, "README.md": b"# 3D MedDiffusion\n", ".gitattributes": b"*.pt lfs\n"})
    url = fake.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("MEDDIFFUSION_MODELS_DIR", str(tmp_path / "models"))
    yield fake
    fake.stop()


def _gets(hub: FakeHub, name: str) -> list[str | None]:
    return [rng for method, path, rng in hub.requests if method == "GET" and path.endswith("/" + name)]


def test_pull_shows_size_asks_consent_and_converts(hub: FakeHub, official_bytes: dict[str, bytes], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    size = len(official_bytes[AE8]) + len(official_bytes[DN8])
    # No terminal and no --yes: refused before a single byte is downloaded.
    assert main(["models", "pull", "official-8x"]) == 2
    err = capsys.readouterr()
    assert "needs your consent" in err.err and "--yes" in err.err
    assert AE8 in err.out and DN8 in err.out  # the plan was shown, with the file names...
    assert not _gets(hub, AE8) and not _gets(hub, DN8)
    # ...and --dry-run --json gives the size to a GUI, still without downloading.
    assert main(["models", "pull", "official-8x", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["download_bytes"] == size and {f["role"]: f["path"] for f in plan["files"]} == \
        {"autoencoder": AE8, "denoiser": DN8}

    progress = tmp_path / "progress.json"
    assert main(["models", "pull", "official-8x", "--yes", "--quiet", "--progress-file", str(progress)]) == 0
    folder = tmp_path / "models" / "official-8x"
    assert resolve_model("official-8x") == folder
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    assert manifest["name"] == "official-8x" and manifest["hu_range"] == [-1000.0, 1000.0]
    # No pickle in the bundle: only safetensors weights (and model.yaml, source.json).
    assert sorted(p.name for p in folder.iterdir()) == ["autoencoder.safetensors", "denoiser.safetensors",
                                                        "model.yaml", "source.json"]
    source = json.loads((folder / "source.json").read_text())
    assert source["repo_id"] == REPO and source["files"]["denoiser"]["path"] == DN8
    final = json.loads(progress.read_text())
    assert final["state"] == "done" and final["path"] == str(folder)
    entry = model_entry("official-8x")
    assert entry.available and entry.disk_bytes > 0 and entry.download_bytes == size
    # The converted denoiser is the EMA network of the authors' file (the file also holds training weights).
    from MedDiffusionLib.checkpoints.native import load_network
    from MedDiffusionLib.checkpoints.official import load_official_biflownet

    converted, _ = load_network(folder / "denoiser.safetensors")
    ref = load_official_biflownet(Path(source["files"]["denoiser"]["cache_path"]))
    assert all((a == b).all() for a, b in zip(converted.state_dict().values(), ref.state_dict().values()))

    # A second pull does nothing; a fresh run lists it as ready with its disk use.
    assert main(["models", "pull", "official-8x"]) == 0
    assert "already downloaded" in capsys.readouterr().out
    assert main(["models", "list", "--json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert listed["official-8x"]["available"] and not listed["official-4x"]["available"]
    assert listed["official-8x"]["disk_bytes"] == entry.disk_bytes


def test_dropped_connection_resumes_with_range(hub: FakeHub, official_bytes: dict[str, bytes],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # huggingface_hub writes what it received in chunks; small chunks so that the cut falls after written data.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    cut = 1_000_000
    hub.drop_after[DN4] = cut
    assert main(["models", "pull", "official-4x", "--yes", "--quiet"]) == 0
    ranges = _gets(hub, DN4)
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].split("=")[1].split("-")[0])
    assert 0 < resumed_at <= cut  # the second request asked only for the rest
    assert model_entry("official-4x").available


def test_corrupted_download_is_refused_then_recovers(hub: FakeHub, official_bytes: dict[str, bytes],
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = bytearray(official_bytes[AE8])
    bad[len(bad) // 2] ^= 0xFF  # same size, one byte flipped: only a hash can tell
    hub.corrupt[AE8] = bytes(bad)
    assert main(["models", "pull", "official-8x", "--yes", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and AE8 in err and "sha256" in err
    assert not (tmp_path / "models" / "official-8x").exists()
    blobs = list((tmp_path / "hf" / "hub").rglob("blobs/*"))
    assert all(b.read_bytes() != bytes(bad) for b in blobs)  # the bad file left the cache
    del hub.corrupt[AE8]
    assert main(["models", "pull", "official-8x", "--yes", "--quiet"]) == 0
    assert model_entry("official-8x").available


def test_offline_from_cache_then_generate_by_name(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "pull", "official-8x", "--yes", "--quiet"]) == 0
    # Remove the converted model but keep the authors' files in the Hugging Face cache, then go offline.
    assert main(["models", "remove", "official-8x", "--keep-download"]) == 0
    assert not model_entry("official-8x").available
    hub.stop()
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    assert main(["models", "pull", "official-8x", "--quiet"]) == 0  # nothing to download: no consent needed
    out = capsys.readouterr().out
    assert "offline" in out and "in the cache" in out
    assert model_entry("official-8x").available and hub.requests == []
    out_path = tmp_path / "gen.nrrd"
    assert main(["generate", "--model", "official-8x", "--anatomy", "ct-head-neck", "--size", "32x32x32",
                 "--sampler", "ddim", "--steps", "2", "--seed", "1", "--quiet", "--out", str(out_path)]) == 0
    import SimpleITK as sitk

    img = sitk.ReadImage(str(out_path))
    assert img.GetSize() == (32, 32, 32) and img.GetSpacing() == (1.0, 1.0, 1.0)
    # Offline and not cached: a clear error, not a traceback.
    assert main(["models", "pull", "official-4x", "--yes"]) == 2
    assert "offline" in capsys.readouterr().err


def test_remove_deletes_bundle_and_cached_originals(hub: FakeHub, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "pull", "official-8x", "--yes", "--quiet"]) == 0
    cache_blobs = lambda: sorted(p.name for p in (tmp_path / "hf" / "hub").rglob("blobs/*"))  # noqa: E731
    assert len(cache_blobs()) == 2
    capsys.readouterr()
    assert main(["models", "remove", "official-8x"]) == 0
    assert "freed" in capsys.readouterr().out
    assert not (tmp_path / "models" / "official-8x").exists() and cache_blobs() == []
    assert main(["models", "remove", "official-8x"]) == 2
    assert "not downloaded" in capsys.readouterr().err
