"""Patch-Volume autoencoder: equality with the authors' network (fixtures), official key layout, patching."""
from __future__ import annotations

import json

import pytest
import torch

from MedDiffusionLib.errors import CheckpointError, InputError
from MedDiffusionLib.models.autoencoder import IGNORED_OFFICIAL_PREFIXES, PatchVolumeAutoencoder

RTOL, ATOL = 1e-4, 1e-5


def small_ae(downsample: int = 4) -> PatchVolumeAutoencoder:
    return PatchVolumeAutoencoder(n_hiddens=8, downsample=downsample, embedding_dim=4, n_codes=16,
                                  num_groups=4).eval()


@pytest.fixture(scope="module")
def ae_fixture(reference_dir):
    data = torch.load(reference_dir / "fixtures" / "ae_tiny.pt", weights_only=True)
    n_hiddens, downsample, embedding_dim, n_codes, num_groups, patch = data["tensors"]["config"].tolist()
    model = PatchVolumeAutoencoder(n_hiddens=n_hiddens, downsample=downsample, embedding_dim=embedding_dim,
                                   n_codes=n_codes, num_groups=num_groups).eval()
    model.load_official_state_dict(data["state_dict"])
    return model, data["tensors"], patch, data["state_dict"]


# ----------------------------------------------------------------------------- the authors' fixture
def test_encode_matches_official(ae_fixture):
    model, t, patch, _ = ae_fixture
    with torch.no_grad():
        z = model.encode(t["input"], patch_size=patch)
    torch.testing.assert_close(z, t["latent_continuous"], rtol=RTOL, atol=ATOL)


def test_quantize_matches_official(ae_fixture):
    model, t, patch, _ = ae_fixture
    z_q, idx = model.quantize(t["latent_continuous"])
    assert torch.equal(idx, t["code_indices"])
    torch.testing.assert_close(z_q, t["latent_quantized"], rtol=RTOL, atol=ATOL)
    with torch.no_grad():  # the whole chain from the image gives the same codes
        _, idx2 = model.quantize(model.encode(t["input"], patch_size=patch))
    assert torch.equal(idx2, t["code_indices"])


def test_decode_matches_official(ae_fixture):
    model, t, _, _ = ae_fixture
    with torch.no_grad():
        recon = model.decode(t["latent_quantized"])
        from_idx = model.decode_indices(t["code_indices"])
    torch.testing.assert_close(recon, t["reconstruction"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(from_idx, t["reconstruction"], rtol=RTOL, atol=ATOL)


def test_codebook_range_and_initialised(ae_fixture):
    model, _, _, sd = ae_fixture
    lo, hi = model.codebook_range()
    assert isinstance(lo, float) and isinstance(hi, float)
    assert lo == pytest.approx(sd["codebook.embeddings"].min().item())
    assert hi == pytest.approx(sd["codebook.embeddings"].max().item())
    assert not model.codebook.need_init  # loaded weights must never be overwritten by data init


# ----------------------------------------------------------------------------- official layout
@pytest.mark.parametrize("name,downsample", [("ae8x", 8), ("ae4x", 4)])
def test_full_size_keys_and_shapes_match_manifest(reference_dir, name, downsample):
    full = json.loads((reference_dir / "official_state_dict_manifest.json").read_text())[name]
    # The manifest also lists the training-only discriminator, which inference does not build.
    manifest = {k: v for k, v in full.items() if not k.startswith(IGNORED_OFFICIAL_PREFIXES)}
    assert len(manifest) > 100
    with torch.device("meta"):  # no memory, no init cost
        model = PatchVolumeAutoencoder(n_hiddens=48, downsample=downsample, embedding_dim=8, n_codes=8192,
                                       num_groups=24)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(manifest)
    assert ours == {k: list(v) for k, v in manifest.items()}


def test_config_roundtrip():
    model = PatchVolumeAutoencoder()
    assert model.config == dict(n_hiddens=48, downsample=8, embedding_dim=8, n_codes=8192, num_groups=24,
                                image_channels=1)
    json.dumps(model.config)
    small = small_ae()
    again = PatchVolumeAutoencoder(**small.config)
    assert again.state_dict().keys() == small.state_dict().keys()


def test_bad_downsample():
    with pytest.raises(InputError):
        PatchVolumeAutoencoder(downsample=6)


# ----------------------------------------------------------------------------- patching
def _manual_patchwise(model: PatchVolumeAutoencoder, x: torch.Tensor, p: tuple[int, int, int]) -> torch.Tensor:
    f = model.downsample
    b, _, d, h, w = x.shape
    out = torch.empty(b, model.embedding_dim, d // f, h // f, w // f)
    for i in range(0, d, p[0]):
        for j in range(0, h, p[1]):
            for k in range(0, w, p[2]):
                z = model.pre_vq_conv(model.encoder(x[:, :, i:i + p[0], j:j + p[1], k:k + p[2]]))
                out[:, :, i // f:(i + p[0]) // f, j // f:(j + p[1]) // f, k // f:(k + p[2]) // f] = z
    return out


@torch.no_grad()
def test_non_cubic_volume_patchwise():
    model = small_ae()
    x = torch.randn(1, 1, 32, 64, 32)
    z = model.encode(x, patch_size=32, patches_per_batch=3)
    assert z.shape == (1, 4, 8, 16, 8)
    torch.testing.assert_close(z, _manual_patchwise(model, x, (32, 32, 32)), rtol=RTOL, atol=ATOL)
    assert model.decode(model.quantize(z)[0]).shape == x.shape


@torch.no_grad()
def test_dim_smaller_than_patch_uses_full_dim():
    model = small_ae()
    x = torch.randn(1, 1, 8, 32, 16)
    z = model.encode(x, patch_size=16)
    torch.testing.assert_close(z, _manual_patchwise(model, x, (8, 16, 16)), rtol=RTOL, atol=ATOL)


@torch.no_grad()
def test_batch_equals_per_sample_and_chunking_invariant():
    model = small_ae()
    x = torch.randn(3, 1, 16, 16, 32)
    z = model.encode(x, patch_size=16, patches_per_batch=4)
    for i in range(3):
        torch.testing.assert_close(z[i:i + 1], model.encode(x[i:i + 1], patch_size=16, patches_per_batch=1),
                                   rtol=RTOL, atol=ATOL)
    z_q, idx = model.quantize(z)
    recon = model.decode(z_q)
    for i in range(3):
        zq_i, idx_i = model.quantize(z[i:i + 1])
        assert torch.equal(idx[i:i + 1], idx_i)
        torch.testing.assert_close(recon[i:i + 1], model.decode(zq_i), rtol=RTOL, atol=ATOL)


@torch.no_grad()
def test_downsample8_shapes():
    model = small_ae(downsample=8)
    x = torch.randn(1, 1, 16, 32, 16)
    z = model.encode(x, patch_size=16)
    assert z.shape == (1, 4, 2, 4, 2)
    assert model.decode(z).shape == x.shape


@pytest.mark.parametrize("shape,patch", [((1, 1, 20, 32, 32), 16),  # 20 neither a multiple of 16 nor < 16
                                         ((1, 1, 48, 32, 32), 32),  # 48 > 32 but not a multiple of 32
                                         ((1, 1, 6, 16, 16), 16),  # smaller than the patch but not a multiple of 4
                                         ((1, 2, 16, 16, 16), 16),  # wrong channel count
                                         ((1, 16, 16, 16), 16),  # no batch axis
                                         ((0, 1, 16, 16, 16), 16),  # empty batch
                                         ((1, 1, 16, 16, 16), 10)])  # patch not a multiple of the downsample
def test_bad_volume_sizes_raise_input_error(shape, patch):
    model = small_ae()
    with pytest.raises(InputError):
        model.encode(torch.zeros(shape), patch_size=patch)


def test_bad_latent_raises_input_error():
    model = small_ae()
    with pytest.raises(InputError):
        model.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(InputError):
        model.quantize(torch.zeros(1, 4, 2, 2))


# ----------------------------------------------------------------------------- training forward
def test_forward_training_outputs_and_gradients():
    model = small_ae().train()
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    out = model(x)
    assert out["reconstruction"].shape == x.shape
    assert out["encodings"].shape == (2, 4, 4, 4) and out["encodings"].dtype == torch.long
    assert out["latent"].shape == out["latent_quantized"].shape == (2, 4, 4, 4, 4)
    assert out["commitment_loss"].ndim == 0 and out["perplexity"].ndim == 0
    assert not model.codebook.need_init
    loss = (out["reconstruction"] - x).abs().mean() + out["commitment_loss"]
    loss.backward()
    # Straight-through: the reconstruction loss reaches the encoder's first conv.
    assert model.encoder.conv_first.weight.grad is not None
    assert model.encoder.conv_first.weight.grad.abs().sum() > 0
    assert model.post_vq_conv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- loading
def test_load_ignores_training_only_keys(ae_fixture):
    _, _, _, sd = ae_fixture
    extra = dict(sd)
    extra["volume_discriminator.conv1.weight"] = torch.zeros(3, 3)
    extra["perceptual_loss.net.slice1.0.weight"] = torch.zeros(2)
    model = PatchVolumeAutoencoder(**ae_fixture[0].config)
    model.load_official_state_dict(extra)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_reports_bad_keys_clearly(ae_fixture):
    _, _, _, sd = ae_fixture
    model = PatchVolumeAutoencoder(**ae_fixture[0].config)
    bad = dict(sd)
    del bad["encoder.conv_first.weight"]
    bad["encoder.bogus.weight"] = torch.zeros(1)
    bad["decoder.final_block.2.bias"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        model.load_official_state_dict(bad)
    msg = str(err.value)
    assert "missing keys (1): encoder.conv_first.weight" in msg
    assert "unexpected keys (1): encoder.bogus.weight" in msg
    assert "decoder.final_block.2.bias: checkpoint (2,) vs model (1,)" in msg


def test_load_wrong_config_raises(ae_fixture):
    _, _, _, sd = ae_fixture
    with pytest.raises(CheckpointError, match="shape mismatches"):
        small_ae(downsample=4).load_official_state_dict(sd)  # 16 codes instead of 64


def test_load_full_manifest_layout_on_meta(reference_dir):
    # The real 8x key set (discriminator included) loads; shapes come from the manifest, values stay on meta.
    full = json.loads((reference_dir / "official_state_dict_manifest.json").read_text())["ae8x"]
    with torch.device("meta"):
        model = PatchVolumeAutoencoder()
        sd = {k: torch.empty(v) for k, v in full.items()}
    model.load_official_state_dict(sd)
