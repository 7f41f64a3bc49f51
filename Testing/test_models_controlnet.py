"""ControlNet: exact zero-init equivalence, weight copy, learning, config round trip, bundle registration."""
from __future__ import annotations

import json

import pytest
import torch

from MedDiffusionLib.checkpoints.bundle import add_controlnet_to_bundle, load_bundle
from MedDiffusionLib.checkpoints.native import load_network, save_network
from MedDiffusionLib.errors import InputError
from MedDiffusionLib.models.biflownet import BiFlowNet, ControlResiduals
from MedDiffusionLib.models.controlnet import ControlNet

from helpers import TINY_AE_CONFIG, TINY_DENOISER_CONFIG, make_tiny_bundle

F = TINY_AE_CONFIG["downsample"]
LATENT = (4, 8, 4)  # (D, H, W): a non-cubic latent catches axis mix-ups


@pytest.fixture()
def nets():
    torch.manual_seed(3)
    dn = BiFlowNet(**TINY_DENOISER_CONFIG).eval()
    cn = ControlNet.from_denoiser(dn, condition_channels=1, image_downsample=F, hidden=[6, 8]).eval()
    return dn, cn


def _inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, TINY_DENOISER_CONFIG["channels"]) + LATENT, generator=g)
    cond = torch.rand((batch, 1) + tuple(s * F for s in LATENT), generator=g) * 2 - 1
    t = torch.tensor([10, 700][:batch])
    y = torch.tensor([0, 5][:batch])
    res = torch.tensor([LATENT] * batch, dtype=torch.float32) / 64
    return x, t, y, res, cond


def test_zero_init_controlled_output_equals_base_exactly(nets):
    dn, cn = nets
    x, t, y, res, cond = _inputs()
    with torch.no_grad():
        base = dn(x, t, y, res)
        control = cn(x, t, y, res, condition=cond)
        controlled = dn(x, t, y, res, control=control)
    assert isinstance(control, ControlResiduals)
    assert len(control.down) == len(dn.skip_channels)
    assert all(float(r.abs().max()) == 0.0 for r in control.down) and float(control.mid.abs().max()) == 0.0
    assert torch.equal(base, controlled)


def test_copy_starts_as_the_denoiser_weights(nets):
    dn, cn = nets
    for name, module in (("encoder", cn.encoder), ("condition", cn.condition)):
        theirs = getattr(dn, name).state_dict()
        mine = module.state_dict()
        assert mine.keys() == theirs.keys()
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), f"{name}.{k}"
            assert mine[k].data_ptr() != theirs[k].data_ptr(), "the copy must not share storage with the denoiser"
    for conv in cn.zero_convs():
        assert not conv.weight.detach().any() and not conv.bias.detach().any()


def test_training_step_changes_output_and_leaves_denoiser_frozen(nets):
    dn, cn = nets
    dn.requires_grad_(False)
    before = {k: v.clone() for k, v in dn.state_dict().items()}
    cn.train()
    opt = torch.optim.Adam(cn.parameters(), lr=1e-2)
    x, t, y, res, cond = _inputs()
    with torch.no_grad():
        base = dn(x, t, y, res)
    for _ in range(2):  # step 1 moves the zero convs only; step 2 reaches the copy and the condition encoder
        loss = (dn(x, t, y, res, control=cn(x, t, y, res, condition=cond)) - torch.ones_like(base)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in dn.parameters())
    for k, v in dn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(bool(c.weight.detach().any()) for c in cn.zero_convs())
    assert not torch.equal(cn.encoder.init_conv.weight, dn.encoder.init_conv.weight)
    with torch.no_grad():
        controlled = dn(x, t, y, res, control=cn.eval()(x, t, y, res, condition=cond))
    assert not torch.equal(base, controlled)


def test_precomputed_hint_and_scale(nets):
    dn, cn = nets
    torch.manual_seed(1)
    for conv in cn.zero_convs():  # non-zero residuals to compare
        torch.nn.init.normal_(conv.weight, std=0.1)
    x, t, y, res, cond = _inputs(batch=1)
    with torch.no_grad():
        a = cn(x, t, y, res, condition=cond)
        b = cn(x, t, y, res, hint=cn.encode_condition(cond, x.shape))
        cn.conditioning_scale = 0.0
        zero = cn(x, t, y, res, condition=cond)
    torch.testing.assert_close(a.mid, b.mid)
    for ra, rb in zip(a.down, b.down):
        torch.testing.assert_close(ra, rb)
    assert float(a.mid.abs().max()) > 0 and float(zero.mid.abs().max()) == 0.0


def test_bad_condition_is_an_input_error(nets):
    _, cn = nets
    x, t, y, res, cond = _inputs(batch=1)
    with pytest.raises(InputError, match="condition image size"):
        cn(x, t, y, res, condition=cond[..., :-4])
    with pytest.raises(InputError, match="condition image"):
        cn(x, t, y, res)
    with pytest.raises(ValueError, match="hidden"):
        ControlNet(TINY_DENOISER_CONFIG, image_downsample=4, hidden=[8])


def test_config_is_json_and_native_round_trip(nets, tmp_path):
    _, cn = nets
    json.dumps(cn.config)
    rebuilt = ControlNet(**json.loads(json.dumps(cn.config)))
    assert rebuilt.config == cn.config
    path = save_network(cn, tmp_path / "cn.safetensors", "controlnet")
    loaded, meta = load_network(path)
    assert meta["kind"] == "controlnet" and isinstance(loaded, ControlNet)
    x, t, y, res, cond = _inputs(batch=1)
    with torch.no_grad():
        a, b = cn(x, t, y, res, condition=cond), loaded(x, t, y, res, condition=cond)
    assert torch.equal(a.mid, b.mid)


def test_add_controlnet_to_bundle(tmp_path):
    folder = make_tiny_bundle(tmp_path / "bundle")
    bundle = load_bundle(folder)
    cn = ControlNet.from_denoiser(bundle.denoiser, image_downsample=bundle.downsample)
    path = add_controlnet_to_bundle(folder, "sparse-ct", cn)
    assert path.name == "controlnet-sparse-ct.safetensors"
    again = load_bundle(folder)
    assert sorted(again.controlnets) == ["sparse-ct"] and again.catalog == bundle.catalog
    assert again.info()["tasks"] == ["sparse-ct"]
    other = BiFlowNet(**{**TINY_DENOISER_CONFIG, "dim": 24})
    with pytest.raises(InputError, match="another denoiser"):
        add_controlnet_to_bundle(folder, "mri", ControlNet.from_denoiser(other, image_downsample=F))
