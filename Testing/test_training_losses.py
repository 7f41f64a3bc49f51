"""Autoencoder training losses: hinge GAN, feature matching, LPIPS-style perceptual distance, VGG file handling."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _training_helpers import ae_config, single_thread, write_manifest, write_volumes  # noqa: F401
from MedDiffusionLib.errors import InputError
from MedDiffusionLib.models.discriminator import (PatchDiscriminator3D, feature_matching_loss, hinge_d_loss,
                                                  hinge_g_loss)
from MedDiffusionLib.models.perceptual import (LPIPSDistance, TriplanePerceptualLoss, VGG16Features,
                                               load_vgg16_state_dict, sample_triplane_slices)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init VGG-16 trunk saved with torchvision's key names (safetensors)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = VGG16Features()
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def test_hinge_d_loss_values() -> None:
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0)=1 -> 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    # Confident, correct discriminator: zero loss.
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0
    assert hinge_g_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_discriminator_shapes_and_feature_matching() -> None:
    d = PatchDiscriminator3D(1, channels=4, n_layers=3).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    logits, feats = d(x)
    assert logits.shape[:2] == (2, 1) and len(feats) == 4  # 3 strided blocks + 1 stride-1 block
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in d.modules()) == 3
    assert feature_matching_loss(feats, feats).item() == 0.0
    _, feats2 = d(x + 0.5)
    assert feature_matching_loss(feats2, feats).item() > 0


def test_vgg_keys_match_torchvision_names() -> None:
    keys = set(VGG16Features().state_dict())
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert keys == {f"features.{i}.{w}" for i in convs for w in ("weight", "bias")}


def test_perceptual_zero_for_identical_positive_otherwise(vgg_file: Path) -> None:
    lp = LPIPSDistance(vgg_file)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lp(a, a), torch.zeros(2), atol=1e-7)
    d = lp(a, a.flip(-1))
    assert (d > 0).all()
    assert not any(p.requires_grad for p in lp.parameters())

    tri = TriplanePerceptualLoss(vgg_file, fraction=0.2)
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    assert tri(x, x).item() == pytest.approx(0.0, abs=1e-7)
    y = x.clone().requires_grad_(True)
    loss = tri(x, (y + 0.3 * torch.randn_like(y)).clamp(-1, 1))
    assert loss.item() > 0
    loss.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_perceptual_loads_torch_state_dict_and_lin_weights(tmp_path: Path, vgg_file: Path) -> None:
    from safetensors.torch import load_file

    sd = {f"net.{k}": v for k, v in load_file(str(vgg_file)).items()}  # LPIPS-style prefix
    sd.update({f"lin{i}.model.1.weight": torch.zeros(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))})
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    path = tmp_path / "vgg.pth"
    torch.save(sd, path)
    feats, lins = load_vgg16_state_dict(path)
    assert len(feats) == 26 and len(lins) == 5
    lp = LPIPSDistance(path)  # zero linear weights from the file: every distance is 0
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert lp(a, b).item() == 0.0


def test_triplane_slices_fraction() -> None:
    x = torch.randn(2, 1, 10, 20, 5)
    pairs = sample_triplane_slices(x, x.clone(), fraction=0.2)
    assert [p[0].shape for p in pairs] == [(4, 1, 20, 5), (8, 1, 10, 5), (2, 1, 10, 20)]
    for a, b in pairs:
        assert torch.equal(a, b)


def test_vgg_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        LPIPSDistance(tmp_path / "missing.safetensors")
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(InputError, match="features.N.weight"):
        LPIPSDistance(bad)


def test_missing_vgg_file_fails_at_start(tmp_path: Path) -> None:
    from Training.stages import autoencoder as ae_stage

    vols = write_volumes(tmp_path / "v", n=1)
    cfg = ae_config(tmp_path / "run", write_manifest(tmp_path / "m.yaml", {"a": [str(vols[0])]}))
    cfg["loss"]["perceptual_weight"] = 2.0
    with pytest.raises(InputError) as info:
        ae_stage.run(cfg)
    msg = str(info.value)
    assert "perceptual_weight: 0" in msg and "vgg16_weights" in msg and "features.N.weight" in msg
    assert not (tmp_path / "run").exists(), "nothing should be written before the check"


def test_autoencoder_stage_with_perceptual_loss(tmp_path: Path, vgg_file: Path) -> None:
    from Training.stages import autoencoder as ae_stage
    from Training.trainer import CheckpointManager

    vols = write_volumes(tmp_path / "v", n=2)
    cfg = ae_config(tmp_path / "run", write_manifest(tmp_path / "m.yaml", {"a": [str(v) for v in vols]}),
                    max_steps=2)
    cfg["loss"].update(perceptual_weight=2.0, vgg16_weights=str(vgg_file))
    ae_stage.run(cfg)
    assert CheckpointManager(tmp_path / "run" / "checkpoints").list()[-1][0] == 2
    csv = (tmp_path / "run" / "logs" / "scalars.csv").read_text()
    assert ",perceptual," in csv and ",d_loss," in csv and ",feature_matching," in csv
