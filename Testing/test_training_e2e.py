"""The whole training path on phantoms at toy size, through the command line: every stage, then a bundle
that the generation pipeline loads and samples from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _training_helpers import TINY_AE, TINY_BIFLOW, single_thread  # noqa: F401


def _cli(args: list[str]) -> None:
    from Training.train import main

    assert main(args) == 0


@pytest.mark.slow
def test_all_stages_on_phantoms_then_bundle_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("MedDiffusionLib.data.phantoms")
    monkeypatch.chdir(tmp_path)  # relative run folders, as a user runs from the repository root
    phantoms = {"anatomies": ["ct-head-neck", "mr-knee"], "size": [16, 16, 16], "volumes_per_class": 2,
                "spacing": {"ct-head-neck": [12, 12, 12], "mr-knee": [9, 9, 9]}}
    train = {"batch_size": 2, "checkpoint_every": 2, "log_every": 1, "tensorboard": False}
    loss = {"perceptual_weight": 0, "disc_start": 1, "disc_channels": 4, "disc_layers": 2}
    configs = {
        "ae1": {"seed": 1, "model": TINY_AE, "data": {"phantoms": phantoms, "patch_size": 8}, "loss": loss,
                "train": {**train, "stage": 1, "max_steps": 2}},
        "ae2": {"seed": 1, "init_from": "runs/ae1/autoencoder.safetensors", "encode_patch_size": 8,
                "data": {"phantoms": phantoms, "max_voxels": 4096, "max_crop": 16}, "loss": loss,
                "train": {**train, "stage": 2, "max_steps": 2, "batch_size": 1}},
        "lat": {"autoencoder": "runs/ae2/autoencoder.safetensors", "encode_patch_size": 8,
                "data": {"phantoms": phantoms}},
        "den": {"seed": 2, "autoencoder": "runs/ae2/autoencoder.safetensors", "data": {"latents": "runs/lat"},
                "model": {**TINY_BIFLOW, "num_classes": 7}, "preview": {"every": 2, "steps": 2},
                "ema": {"warmup_steps": 1, "update_every": 1}, "train": {**train, "max_steps": 2}},
        "exp": {"autoencoder": "runs/ae2/autoencoder.safetensors", "denoiser": "runs/den/denoiser.safetensors",
                "latents": "runs/lat", "name": "toy"},
    }
    for name, cfg in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    _cli(["autoencoder", "--config", "ae1.yaml", "--out", "runs/ae1"])
    _cli(["autoencoder", "--config", "ae2.yaml", "--out", "runs/ae2", "--stage", "2"])
    _cli(["latents", "--config", "lat.yaml", "--out", "runs/lat"])
    index = json.loads((tmp_path / "runs/lat/index.json").read_text())
    assert len(index["items"]) == 4 and index["classes"] == {"ct-head-neck": 0, "mr-knee": 6}
    assert index["items"][0]["shape"] == [2, 8, 8, 8]
    _cli(["denoiser", "--config", "den.yaml", "--out", "runs/den"])
    assert list((tmp_path / "runs/den/previews").glob("step_0000002_class*.png"))
    _cli(["denoiser", "--config", "den.yaml", "--out", "runs/den", "--resume", "--max-steps", "3"])
    _cli(["export", "--config", "exp.yaml", "--out", "bundle"])

    from MedDiffusionLib.checkpoints.bundle import load_bundle
    from MedDiffusionLib.pipelines.generate import GenerationPipeline

    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.catalog.names == ["ct-head-neck", "mr-knee"]
    assert bundle.catalog.get("mr-knee").class_index == 6
    assert bundle.catalog.get("mr-knee").spacing_xyz == (9.0, 9.0, 9.0)
    assert bundle.encode_patch_size == 8
    result = GenerationPipeline(bundle, "cpu")("mr-knee", sampler="ddim", steps=2, seed=3)
    assert result.image.GetSize() == (16, 16, 16)
    assert result.image.GetSpacing() == (9.0, 9.0, 9.0)


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from Training.train import main

    (tmp_path / "c.yaml").write_text("data: {}\n")
    assert main(["denoiser", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert main(["latents", "--config", str(tmp_path / "missing.yaml")]) == 2
