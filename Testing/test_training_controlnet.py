"""ControlNet training stage: only the ControlNet learns, exact resume, export into a bundle, train.py flags."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from _training_helpers import assert_state_close
from MedDiffusionLib.checkpoints.bundle import load_bundle
from MedDiffusionLib.checkpoints.native import load_network
from MedDiffusionLib.pipelines.reconstruct import ReconstructionPipeline
from Training import train as train_cli
from Training.stages import controlnet as stage
from Training.trainer import CheckpointManager, load_checkpoint

from helpers import make_tiny_bundle


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    return make_tiny_bundle(tmp_path / "bundle")


def config(bundle: Path, out: Path, task: str = "sparse-ct", anatomies: list | None = None, **train) -> dict:
    t = {"max_steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "tensorboard": False, "lr": 1e-3}
    t.update(train)
    anatomies = anatomies or (["ct-head-neck", "ct-legs"] if task == "sparse-ct" else ["mr-knee"])
    return {"seed": 3, "device": "cpu", "task": task, "bundle": str(bundle), "out_dir": str(out),
            "data": {"phantoms": {"anatomies": anatomies, "size": [16, 16, 16], "spacing": [12.0, 12.0, 18.0],
                                 "volumes_per_class": 2, "seed": 0}, "flip_prob": 0.5},
            "physics": {"views": [4, 6], "noise_photons": [1e4], "noise_prob": 0.5, "acceleration": [3, 4],
                        "masks": ["gaussian"]},
            "model": {"hidden": [4, 4]}, "train": t}


def _final(out: Path) -> dict:
    return load_checkpoint(CheckpointManager(out / "checkpoints").list()[-1][1])


def test_only_the_controlnet_learns(bundle_dir, tmp_path, monkeypatch):
    seen = []

    class Recording(stage.FrozenParts):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.before = {k: v.clone() for k, v in self.denoiser.state_dict().items()}
            self.before_ae = {k: v.clone() for k, v in self.ae.state_dict().items()}
            seen.append(self)

    monkeypatch.setattr(stage, "FrozenParts", Recording)
    files = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
    result = stage.run(config(bundle_dir, tmp_path / "run"))
    parts = seen[0]
    for k, v in parts.denoiser.state_dict().items():
        assert torch.equal(v, parts.before[k]), k
    for k, v in parts.ae.state_dict().items():
        assert torch.equal(v, parts.before_ae[k]), k
    assert {p.name: p.read_bytes() for p in bundle_dir.iterdir()} == files  # no export_bundle: untouched

    state = _final(tmp_path / "run")
    assert state["step"] == 2 and set(state["models"]) == {"controlnet"} and set(state["optimizers"]) == {"controlnet"}
    cn, meta = load_network(result["controlnet"])
    assert meta["kind"] == "controlnet" and meta["extra"]["task"] == "sparse-ct"
    assert any(bool(c.weight.any()) for c in cn.zero_convs()), "the zero convolutions must have learned"
    # Step 2 already reaches the trainable copy through the (now non-zero) zero convs.
    assert not torch.equal(cn.encoder.init_conv.weight, parts.denoiser.encoder.init_conv.weight)


def test_resume_matches_a_straight_run(bundle_dir, tmp_path):
    stage.run(config(bundle_dir, tmp_path / "straight", max_steps=4))
    stage.run(config(bundle_dir, tmp_path / "resumed", max_steps=2))
    stage.run(config(bundle_dir, tmp_path / "resumed", max_steps=4), resume=True)
    straight, resumed = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    assert straight["step"] == resumed["step"] == 4
    for key in ("models", "optimizers", "data"):
        assert_state_close(straight[key], resumed[key], key)
    assert torch.equal(straight["rng"][0]["torch"], resumed["rng"][0]["torch"])


def test_train_py_mri_with_export_into_the_bundle(bundle_dir, tmp_path):
    cfg_path = tmp_path / "cn.yaml"
    # The config says sparse-ct: --task must win (the phantoms are MR ones already).
    cfg_path.write_text(yaml.safe_dump(config(bundle_dir, tmp_path / "unused", "sparse-ct", ["mr-knee"])))
    rc = train_cli.main(["controlnet", "--config", str(cfg_path), "--task", "mri", "--export-bundle", str(bundle_dir),
                         "--max-steps", "1", "--out", str(tmp_path / "mri"), "data.latent_cache=64"])
    assert rc == 0
    assert (tmp_path / "mri" / "controlnet-mri.safetensors").is_file()
    bundle = load_bundle(bundle_dir)
    assert sorted(bundle.controlnets) == ["mri"]
    manifest = yaml.safe_load((bundle_dir / "model.yaml").read_text())
    assert manifest["controlnets"] == {"mri": "controlnet-mri.safetensors"}
    import SimpleITK as sitk

    from MedDiffusionLib.data.phantoms import make_phantom

    img = make_phantom("mr-knee", (16, 16, 16), (1.0, 1.0, 1.0), 10_001)
    out = ReconstructionPipeline(bundle, "cpu")(img, task="mri", acceleration=4, sampler="ddim", steps=2, seed=0)
    assert out.image.GetSize() == img.GetSize() and isinstance(out.image, sitk.Image)


def test_condition_simulator_mri_masks_differ_per_volume():
    sim = stage.ConditionSimulator("mri", {"acceleration": [4], "masks": ["gaussian"]})
    torch.manual_seed(0)
    x = torch.rand(1, 1, 4, 16, 16).repeat(2, 1, 1, 1, 1) * 2 - 1
    cond = sim(x)
    assert cond.shape == x.shape and float(cond.min()) >= -1 and float(cond.max()) <= 1
    assert not torch.equal(cond[0], cond[1])  # the same volume, two random masks
    with pytest.raises(Exception, match="acceleration"):
        stage.ConditionSimulator("mri", {"acceleration": [1]})


def test_missing_task_or_model_is_an_input_error(bundle_dir, tmp_path):
    from MedDiffusionLib.errors import InputError

    cfg = config(bundle_dir, tmp_path / "x")
    cfg.pop("task")
    with pytest.raises(InputError, match="task"):
        stage.run(cfg)
    cfg = config(bundle_dir, tmp_path / "x")
    cfg.pop("bundle")
    with pytest.raises(InputError, match="bundle"):
        stage.run(cfg)
