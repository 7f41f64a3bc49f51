"""The authors' file formats load into our networks and compute exactly the reference outputs."""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

import pytest
import torch

from MedDiffusionLib.checkpoints.any_format import convert_official, load_any_autoencoder, load_any_denoiser
from MedDiffusionLib.checkpoints.native import load_network
from MedDiffusionLib.checkpoints.official import (
    detect_official_kind,
    infer_autoencoder_config,
    load_official,
    load_official_autoencoder,
    load_official_biflownet,
)
from MedDiffusionLib.errors import CheckpointError

TOL = dict(rtol=1e-4, atol=1e-5)
# What the authors' BiFlowNet file does not record: the tiny fixture was built with these (OFFICIAL.md).
TINY_DENOISER_OVERRIDES = {"resnet_groups": 3, "dit_num_heads": 2}


@pytest.fixture(scope="module")
def fixtures(reference_dir: Path) -> Path:
    return reference_dir / "fixtures"


@pytest.fixture(scope="module")
def ae_ref(fixtures: Path) -> dict:
    return torch.load(fixtures / "ae_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def dn_ref(fixtures: Path) -> dict:
    return torch.load(fixtures / "biflownet_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def official_ae(fixtures: Path) -> torch.nn.Module:
    return load_official_autoencoder(fixtures / "ae_tiny_official_format.ckpt")


@pytest.fixture(scope="module")
def official_dn(fixtures: Path) -> torch.nn.Module:
    return load_official_biflownet(fixtures / "biflownet_tiny_official_format.pt", overrides=TINY_DENOISER_OVERRIDES)


def _check_autoencoder(ae: torch.nn.Module, ref: dict) -> None:
    t = ref["tensors"]
    patch = int(t["config"][5])
    with torch.no_grad():
        z = ae.encode(t["input"], patch_size=patch)
        torch.testing.assert_close(z, t["latent_continuous"], **TOL)
        z_q, idx = ae.quantize(z)
        torch.testing.assert_close(z_q, t["latent_quantized"], **TOL)
        assert torch.equal(idx.reshape(t["code_indices"].shape).to(t["code_indices"].dtype), t["code_indices"])
        torch.testing.assert_close(ae.decode(t["latent_quantized"]), t["reconstruction"], **TOL)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Cheaper than a forward pass: identical config and tensors mean identical outputs."""
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _same_as_official(model: torch.nn.Module, official_sd: dict) -> None:
    mine = model.official_state_dict()
    assert mine.keys() == official_sd.keys()
    for k, v in official_sd.items():
        assert torch.equal(mine[k], v), k


def _eps(model: torch.nn.Module, ref: dict) -> torch.Tensor:
    t = ref["tensors"]
    with torch.no_grad():
        return model(t["x"], t["t"], t["y"], t["res"])


def test_official_autoencoder_reproduces_reference(official_ae: torch.nn.Module, ae_ref: dict) -> None:
    ae = official_ae
    assert not ae.training
    n_hiddens, downsample, e, k, groups, _ = (int(v) for v in ae_ref["tensors"]["config"])
    assert ae.config == dict(n_hiddens=n_hiddens, downsample=downsample, embedding_dim=e, n_codes=k,
                             num_groups=groups, image_channels=1)
    _check_autoencoder(ae, ae_ref)


def test_official_biflownet_uses_ema_and_reproduces_reference(fixtures: Path, official_dn: torch.nn.Module,
                                                               dn_ref: dict) -> None:
    path = fixtures / "biflownet_tiny_official_format.pt"
    model = official_dn
    assert not model.training
    cfg = dn_ref["config"]
    for key in ("dim", "channels", "patch_size", "dim_mults", "use_attn", "num_classes", "num_mid_dit",
                "resnet_groups", "dit_num_heads", "attn_heads", "vq_size"):
        assert model.config[key] == cfg[key], key
    assert list(model.config["sub_volume_size"]) == list(cfg["sub_volume_size"])
    torch.testing.assert_close(_eps(model, dn_ref), dn_ref["tensors"]["eps"], **TOL)
    # 'model' holds different (training) weights: the EMA ones are the reference.
    trained = load_official_biflownet(path, overrides=TINY_DENOISER_OVERRIDES, use_ema=False)
    ema_sd, trained_sd = model.state_dict(), trained.state_dict()
    assert any(not torch.equal(ema_sd[k], trained_sd[k]) for k in ema_sd)


def test_biflownet_unrecorded_settings_give_clear_error(fixtures: Path) -> None:
    with pytest.raises(CheckpointError, match="resnet_groups"):
        load_official_biflownet(fixtures / "biflownet_tiny_official_format.pt")
    with pytest.raises(CheckpointError, match="dit_num_heads"):
        load_official_biflownet(fixtures / "biflownet_tiny_official_format.pt", overrides={"resnet_groups": 3})


def test_plain_state_dict_files_and_config_records(fixtures: Path, dn_ref: dict) -> None:
    # biflownet_tiny.pt keeps its config beside the weights: nothing needs overriding.
    model = load_official_biflownet(fixtures / "biflownet_tiny.pt")
    assert model.config["resnet_groups"] == 3 and model.config["dit_num_heads"] == 2
    _same_as_official(model, dn_ref["state_dict"])


def test_ddp_prefix_and_namespace_args(tmp_path: Path, dn_ref: dict) -> None:
    sd = collections.OrderedDict((f"module.{k}", v) for k, v in dn_ref["state_dict"].items())
    args = argparse.Namespace(model_dim=6, volume_channels=4, dim_mults=[1, 1, 2, 4, 8], use_attn=[0, 0, 0, 1, 1],
                              patch_size=1, num_dit=1, num_classes=7, vq_size=64, resnet_groups=3,
                              DiT_num_heads=2)
    path = tmp_path / "ddp.pt"
    torch.save({"model": sd, "ema": sd, "args": args, "epoch": 3}, path)
    assert detect_official_kind(path) == "biflownet"
    model = load_official_biflownet(path)
    assert model.config["resnet_groups"] == 3 and model.config["dit_num_heads"] == 2
    _same_as_official(model, dn_ref["state_dict"])


def test_autoencoder_config_from_shapes(tmp_path: Path, ae_ref: dict) -> None:
    sd = ae_ref["state_dict"]
    conf = infer_autoencoder_config(sd, {"num_groups": 4})
    assert conf == dict(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=64, num_groups=4, image_channels=1)
    # Without a training config the official 24 groups cannot divide 8 channels: a clear error, not a crash.
    path = tmp_path / "ae_plain.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="num_groups"):
        load_official_autoencoder(path)
    ae = load_official_autoencoder(path, overrides={"num_groups": 4})
    assert ae.config["num_groups"] == 4
    assert all(torch.equal(ae.state_dict()[k], v) for k, v in sd.items())


def test_detect_kind_and_wrong_kind(fixtures: Path, tmp_path: Path) -> None:
    assert detect_official_kind(fixtures / "ae_tiny_official_format.ckpt") == "autoencoder"
    assert detect_official_kind(fixtures / "biflownet_tiny_official_format.pt") == "biflownet"
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(CheckpointError, match="neither"):
        detect_official_kind(other)
    with pytest.raises(CheckpointError, match="not a BiFlowNet"):
        load_official_biflownet(fixtures / "ae_tiny_official_format.ckpt")
    with pytest.raises(CheckpointError, match="not a Patch-Volume"):
        load_official_autoencoder(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_autoencoder(tmp_path / "missing.ckpt")


def test_shape_mismatch_is_a_checkpoint_error(tmp_path: Path, ae_ref: dict) -> None:
    sd = dict(ae_ref["state_dict"])
    sd["post_vq_conv.weight"] = torch.zeros(4, 4, 3, 3, 3)
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match="post_vq_conv"):
        load_official_autoencoder(path, overrides={"num_groups": 4})


def test_convert_official_to_native(fixtures: Path, tmp_path: Path, official_ae: torch.nn.Module,
                                    official_dn: torch.nn.Module) -> None:
    # Same config and tensors as the reference-checked models = same outputs (forward passes cost seconds).
    ae_out = tmp_path / "ae.safetensors"
    assert convert_official(fixtures / "ae_tiny_official_format.ckpt", ae_out) == "autoencoder"
    ae, meta = load_network(ae_out)
    assert meta["kind"] == "autoencoder" and meta["extra"]["converted_from"] == "ae_tiny_official_format.ckpt"
    _same_weights(ae, official_ae)
    dn_out = tmp_path / "dn.safetensors"
    assert convert_official(fixtures / "biflownet_tiny_official_format.pt", dn_out,
                            overrides=TINY_DENOISER_OVERRIDES) == "biflownet"
    dn, meta = load_network(dn_out)
    assert meta["kind"] == "biflownet"
    _same_weights(dn, official_dn)
    # load_any_* accept both formats.
    _same_weights(load_any_autoencoder(ae_out), ae)
    _same_weights(load_any_autoencoder(fixtures / "ae_tiny_official_format.ckpt"), ae)
    _same_weights(load_any_denoiser(dn_out), dn)
    _same_weights(load_any_denoiser(fixtures / "biflownet_tiny_official_format.pt",
                                    overrides=TINY_DENOISER_OVERRIDES), dn)
    kind, _ = load_official(fixtures / "biflownet_tiny.pt")
    assert kind == "biflownet"


@pytest.mark.parametrize("name", ["ae4x", "ae8x", "biflownet4x", "biflownet8x"])
def test_full_size_official_configs_are_inferred(reference_dir: Path, name: str) -> None:
    """The published models' key/shape manifest gives the published configurations (no weights needed)."""
    import json

    from MedDiffusionLib.checkpoints.official import infer_biflownet_config

    manifest = json.loads((reference_dir / "official_state_dict_manifest.json").read_text())
    sd = {k: torch.empty(shape, device="meta") for k, shape in manifest[name].items()}
    if name.startswith("ae"):
        conf = infer_autoencoder_config(sd)
        assert conf == dict(n_hiddens=48, downsample=int(name[2]), embedding_dim=8, n_codes=8192, num_groups=24,
                            image_channels=1)
        return
    conf = infer_biflownet_config(sd)
    assert conf["dim"] == 72 and conf["channels"] == 8 and conf["patch_size"] == (2 if "4x" in name else 1)
    assert conf["dim_mults"] == [1, 1, 2, 4, 8] and conf["use_attn"] == [0, 0, 0, 1, 1]
    assert (conf["resnet_groups"], conf["dit_num_heads"], conf["attn_heads"], conf["attn_dim_head"]) == (24, 8, 8, 32)
    assert conf["num_classes"] == 7 and conf["num_mid_dit"] == 1 and conf["sub_volume_size"] == 8
    from MedDiffusionLib.models.biflownet import BiFlowNet

    with torch.device("meta"):
        net = BiFlowNet(**conf)
    assert sum(p.numel() for p in net.parameters()) == manifest[f"{name}_param_count"]
