"""BiFlowNet: exact match with the authors' network, official key layout, shapes, control residuals, dtypes."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from MedDiffusionLib.errors import CheckpointError, InputError
from MedDiffusionLib.models import biflownet, dit, unet_blocks
from MedDiffusionLib.models.biflownet import BiFlowNet, ControlResiduals
from MedDiffusionLib.models.dit import sincos_pos_table_3d, tokens_to_volume, volume_to_tokens
from MedDiffusionLib.models.official_keys import (biflownet_from_official, biflownet_to_official,
                                                  official_to_ours_key, ours_to_official_key)

RTOL, ATOL = 1e-4, 1e-5
TINY = dict(dim=6, channels=4, num_classes=7, patch_size=1, dim_mults=(1, 1, 2, 4, 8), use_attn=(0, 0, 0, 1, 1),
            resnet_groups=3, dit_num_heads=2, attn_heads=2, attn_dim_head=8, sub_volume_size=8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machines are shared: OpenMP threads waiting on a busy core make tiny ops 100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fixture(reference_dir):
    return torch.load(reference_dir / "fixtures" / "biflownet_tiny.pt", weights_only=True)


@pytest.fixture(scope="module")
def official_tiny(fixture) -> BiFlowNet:
    model = BiFlowNet(**fixture["config"]).eval()
    model.load_official_state_dict(fixture["state_dict"])
    return model


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "official_state_dict_manifest.json").read_text())


def _randomize(model: BiFlowNet, seed: int = 0) -> BiFlowNet:
    """Random weights everywhere (the authors' init zeroes the DiT modulation, hiding the intra-patch flow).

    Unit norm gains and small biases: large per-channel biases would dominate the GroupNorm statistics and
    make the deep levels' contribution vanish.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "gamma")):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.eval()


def _inputs(batch: int, size=(16, 16, 16), channels: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 7, (batch,), generator=g)
    res = torch.tensor([s / 64 for s in size]).expand(batch, 3)
    return x, t, y, res


# ---- exactness against the authors' classes -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fast", "chunked", "plain"])
def test_reproduces_official_fixture(fixture, official_tiny, monkeypatch, mode):
    if mode == "chunked":  # DiT blocks run one sub-volume (512 tokens) at a time
        monkeypatch.setattr(dit, "CPU_TOKEN_CHUNK", 1)
    if mode == "plain":  # the layout/kernels other devices use: NCDHW, PyTorch's conv choice, no padding or chunking
        monkeypatch.setattr(biflownet, "CPU_CHANNELS_LAST", False)
        monkeypatch.setattr(unet_blocks, "ONEDNN_DIRECT", False)
        monkeypatch.setattr(dit, "CPU_TOKEN_CHUNK", 0)
        monkeypatch.setattr(dit.DiTAttention, "pad_heads_to", 1)
    ts = fixture["tensors"]
    with torch.no_grad():
        eps = official_tiny(ts["x"], ts["t"], ts["y"], ts["res"])
    torch.testing.assert_close(eps, ts["eps"], rtol=RTOL, atol=ATOL)


def test_from_config_accepts_official_argument_names(fixture):
    cfg = dict(fixture["config"])
    cfg["cond_classes"] = cfg.pop("num_classes")
    cfg["DiT_num_heads"] = cfg.pop("dit_num_heads")
    cfg["learn_sigma"] = False  # an authors' argument we do not use
    model = BiFlowNet.from_config(cfg)
    assert model.config["num_classes"] == 7 and model.config["dit_num_heads"] == 2
    assert model.config["attn_dim_head"] == 32  # inferred default: to_qkv (768, c) = 3 * 8 heads * 32
    model.load_official_state_dict(fixture["state_dict"])


def test_sincos_table_matches_official(fixture):
    torch.testing.assert_close(sincos_pos_table_3d(6, (8, 8, 8))[None], fixture["state_dict"]["pos_embed"])
    fresh = BiFlowNet(**fixture["config"])
    torch.testing.assert_close(fresh.encoder.pos_embed, fixture["state_dict"]["pos_embed"])


@pytest.mark.parametrize("name,patch", [("biflownet8x", 1), ("biflownet4x", 2)])
def test_full_size_official_layout(manifest, name, patch):
    with torch.device("meta"):
        model = BiFlowNet(patch_size=patch)
    shapes = {k: list(v.shape) for k, v in model.official_state_dict().items()}
    assert shapes == manifest[name]
    assert sum(p.numel() for p in model.parameters()) == manifest[f"{name}_param_count"]
    for key in manifest[name]:  # the name mapping is a bijection
        assert ours_to_official_key(official_to_ours_key(key)) == key
    assert json.loads(json.dumps(model.config)) == model.config


def test_load_official_reports_every_problem(fixture):
    sd = dict(fixture["state_dict"])
    sd.pop("init_conv.bias")
    sd["downs.0.0.block1.proj.weight"] = torch.zeros(6, 6, 1, 1, 1)
    sd["volume_discriminator.weight"] = torch.zeros(1)
    model = BiFlowNet(**fixture["config"])
    with pytest.raises(CheckpointError) as err:
        model.load_official_state_dict(sd)
    msg = str(err.value)
    assert "missing key 'init_conv.bias'" in msg and "unexpected key 'volume_discriminator.weight'" in msg
    assert "shape of 'downs.0.0.block1.proj.weight'" in msg and "encoder.downs.0.res1.conv1.weight" in msg
    with pytest.raises(CheckpointError):
        biflownet_from_official({"not.a.key": torch.zeros(1)})
    # DDP-wrapped checkpoints load too, and our names convert back.
    model.load_official_state_dict({"module." + k: v for k, v in fixture["state_dict"].items()})
    assert set(biflownet_to_official(model.state_dict())) == set(fixture["state_dict"])


# ---- behaviour ------------------------------------------------------------------------------------------------
def test_batch_matches_per_sample(fixture, official_tiny):
    ts = fixture["tensors"]
    with torch.no_grad():
        full = official_tiny(ts["x"], ts["t"], ts["y"], ts["res"])
        for i in range(ts["x"].shape[0]):
            one = official_tiny(ts["x"][i:i + 1], ts["t"][i:i + 1], ts["y"][i:i + 1], ts["res"][i])
            torch.testing.assert_close(one[0], full[i], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("patch", [1, 2])
def test_non_cubic_latent(patch):
    model = _randomize(BiFlowNet(**{**TINY, "patch_size": patch}))
    x, t, y, res = _inputs(1, size=(16, 32, 16))
    with torch.no_grad():
        eps = model(x, t, y, res)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    # Each sub-volume is processed on its own: changing one 8^3 block of the input leaves the intra-patch
    # tokens of every other block unchanged.
    cond = model.embed_condition(t, y, res)
    x2 = x.clone()
    x2[:, :, 8:16, 24:32, 0:8] += 1.0
    with torch.no_grad():
        a, b = model.encoder(x, cond).tokens, model.encoder(x2, cond).tokens
    n = model.encoder.pos_embed.shape[1]
    changed = (a - b).abs().amax(dim=-1).view(-1, n).amax(dim=-1) > 0
    expected = torch.zeros(2, 4, 2, dtype=torch.bool)
    expected[1, 3, 0] = True
    assert torch.equal(changed, expected.flatten())


@pytest.mark.parametrize("patch", [1, 2])
def test_token_layout_round_trip(patch):
    grid, sub = (2, 3, 1), 8
    n = sub // patch
    vol = torch.randn(2, 5, grid[0] * sub, grid[1] * sub, grid[2] * sub)
    # Patchify by hand: sub-volumes row-major, patches row-major inside, features (p, p, p, C) per patch.
    rows = []
    for b in range(2):
        for g in torch.cartesian_prod(*[torch.arange(a) for a in grid]).tolist():
            block = vol[b, :, g[0] * sub:(g[0] + 1) * sub, g[1] * sub:(g[1] + 1) * sub, g[2] * sub:(g[2] + 1) * sub]
            blocks = block.reshape(5, n, patch, n, patch, n, patch).permute(1, 3, 5, 2, 4, 6, 0)
            rows.append(blocks.reshape(n ** 3, patch ** 3 * 5))
    tokens = torch.stack(rows).view(2, -1, patch ** 3 * 5)
    torch.testing.assert_close(tokens_to_volume(tokens, grid, (n, n, n), patch), vol)
    if patch == 1:
        torch.testing.assert_close(volume_to_tokens(vol, grid), tokens)


def test_control_residuals():
    # Random weights with unit norm gains: the fixture's small gains attenuate the deep levels ~10x per level.
    model = _randomize(BiFlowNet(**TINY))
    x, t, y, res = _inputs(1)
    cond = model.embed_condition(t, y, res)
    with torch.no_grad():
        feats = model.encode(x, cond)
        base = model(x, t, y, res)
        torch.testing.assert_close(model.decode(feats, cond), base, rtol=0, atol=0)
        assert [s.shape[1] for s in feats.skips] == model.skip_channels
        assert feats.h.shape[1] == model.mid_channels
        zeros = ControlResiduals(down=[torch.zeros_like(s) for s in feats.skips], mid=torch.zeros_like(feats.h))
        torch.testing.assert_close(model(x, t, y, res, control=zeros), base, rtol=0, atol=0)
        for i in (0, 5, len(feats.skips) - 1):  # first, a middle and the deepest skip
            down = [torch.zeros_like(s) for s in feats.skips]
            down[i] = torch.randn_like(down[i])
            out = model.decode(feats, cond, ControlResiduals(down=down, mid=torch.zeros_like(feats.h)))
            assert (out - base).abs().max() > 1e-3, f"residual {i} has no effect"
        out = model.decode(feats, cond, ControlResiduals(down=zeros.down, mid=torch.randn_like(feats.h)))
        assert (out - base).abs().max() > 1e-3
        with pytest.raises(InputError, match="one per U-Net skip"):
            model(x, t, y, res, control=ControlResiduals(down=zeros.down[:-1], mid=zeros.mid))
        # A ControlNet is a trainable copy of the encoder side; a hint is added after the init conv.
        encoder = copy.deepcopy(model.encoder)
        hinted = encoder(x, cond, hint=torch.ones_like(feats.init))
        assert len(hinted.skips) == len(feats.skips) and not torch.equal(hinted.h, feats.h)


def test_bf16_autocast_cpu(fixture, official_tiny):
    ts = fixture["tensors"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eps = official_tiny(ts["x"], ts["t"], ts["y"], ts["res"])
    assert torch.isfinite(eps).all()
    assert eps.dtype == torch.float32  # returned in the latent's dtype
    err = (eps - ts["eps"]).norm() / ts["eps"].norm()
    assert err < 0.01, f"bf16 autocast relative error {err:.4f}"
    # A model converted to bf16 (no autocast) takes float32 inputs too.
    model = copy.deepcopy(official_tiny).to(torch.bfloat16)
    with torch.no_grad():
        eps = model(ts["x"], ts["t"], ts["y"], ts["res"])
    assert torch.isfinite(eps).all() and (eps - ts["eps"]).norm() / ts["eps"].norm() < 0.02


def test_bad_inputs_are_named():
    model = BiFlowNet(**TINY)
    x, t, y, res = _inputs(1, size=(12, 16, 16))
    with pytest.raises(InputError, match="not divisible by the sub-volume size"):
        model(x, t, y, res)
    x, t, y, res = _inputs(1)
    with pytest.raises(InputError, match=r"\(B, 4, D, H, W\)"):
        model(x[:, :3], t, y, res)
    with pytest.raises(InputError, match="class indices"):
        model(x, t, torch.tensor([7]), res)
    with pytest.raises(InputError, match="res must be"):
        model(x, t, y, torch.ones(1, 2))


def test_training_step_has_gradients():
    model = _randomize(BiFlowNet(**TINY)).train()
    x, t, y, res = _inputs(1)
    model(x, t, y, res).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert not model.encoder.pos_embed.requires_grad
