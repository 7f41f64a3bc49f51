"""Generation pipeline, exact tiled decoding and the `generate` / `anatomies` commands on a tiny bundle."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffusionLib.cli import main as cli_main
from MedDiffusionLib.errors import Cancelled, InputError
from MedDiffusionLib.models.autoencoder import PatchVolumeAutoencoder
from MedDiffusionLib.pipelines.decode import _query_chunk, decode_latent
from MedDiffusionLib.pipelines.generate import GENERATED_DIRECTION, GenerationPipeline

from helpers import make_tiny_bundle, tiny_bundle


@pytest.fixture(scope="module")
def pipe():
    return GenerationPipeline(tiny_bundle(), device="cpu")


def test_tiled_decode_matches_whole_volume_decode(reference_dir):
    """GroupNorm statistics and attention are global in the joint decoder; tiles must not change the result."""
    sd = torch.load(reference_dir / "fixtures" / "ae_tiny.pt", weights_only=True)
    ae = PatchVolumeAutoencoder(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=64, num_groups=4).eval()
    ae.load_official_state_dict(sd["state_dict"])
    with torch.no_grad():
        z_q, _ = ae.quantize(torch.randn(1, 4, 8, 12, 8, generator=torch.Generator().manual_seed(0)))
        full = ae.decode(z_q)
        steps = []
        # A budget this small streams the last stages in many tiles (the progress total counts tile passes).
        tiled = decode_latent(ae, z_q, budget_gb=0.008, progress=steps.append)
    assert steps[-1].stage == "decoding" and steps[-1].total > 8, "the budget must force several tiles"
    assert tiled.shape == full.shape
    torch.testing.assert_close(tiled, full, rtol=1e-4, atol=2e-5)


def test_tiled_decode_batch_of_two_non_cubic_matches_whole_decode(reference_dir):
    """Statistics are per sample and group; a batch must not mix them, whatever the tile grid."""
    sd = torch.load(reference_dir / "fixtures" / "ae_tiny.pt", weights_only=True)
    ae = PatchVolumeAutoencoder(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=64, num_groups=4).eval()
    ae.load_official_state_dict(sd["state_dict"])
    with torch.no_grad():
        z_q, _ = ae.quantize(torch.randn(2, 4, 7, 10, 5, generator=torch.Generator().manual_seed(3)) * 2 + 0.5)
        full = ae.decode(z_q)
        steps = []
        tiled = decode_latent(ae, z_q, budget_gb=0.008, progress=steps.append)
    assert steps[-1].total > 8, "the budget must force several tiles"
    torch.testing.assert_close(tiled, full, rtol=1e-4, atol=2e-5)


def test_chunked_decoder_attention_matches_one_pass(reference_dir):
    """Large volumes attend with queries in chunks (no N x 3*inner qkv tensor); the result must not change."""
    sd = torch.load(reference_dir / "fixtures" / "ae_tiny.pt", weights_only=True)
    ae = PatchVolumeAutoencoder(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=64, num_groups=4).eval()
    ae.load_official_state_dict(sd["state_dict"])
    attn = ae.decoder.mid_block.attn
    x = torch.randn(2, attn.norm.num_channels, 6, 10, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, query_chunk=97), attn(x), rtol=1e-5, atol=1e-5)
        permuted = x.permute(0, 1, 4, 3, 2)  # dense but not contiguous: the output must still be written
        torch.testing.assert_close(attn(permuted, query_chunk=50), attn(permuted), rtol=1e-5, atol=1e-5)
    budget = 2**30
    assert _query_chunk(attn, 16, 8**3, 1, budget) is None                # small volumes: one pass, as before
    chunk = _query_chunk(attn, 192, 128**3, 1, budget)                    # 4x model, 512^3: 2M tokens
    assert chunk is not None and 64 <= chunk < 128**3


def test_generation_geometry_and_range(pipe):
    result = pipe("ct-head-neck", sampler="ddim", steps=3, seed=5)
    img = result.image
    entry = pipe.bundle.catalog.get("ct-head-neck")
    d, h, w = entry.latent_sizes[0]
    f = pipe.bundle.downsample
    assert img.GetSize() == (h * f, w * f, d * f)
    assert np.allclose(img.GetSpacing(), entry.spacing_xyz)
    assert np.allclose(img.GetDirection(), GENERATED_DIRECTION)
    arr = sitk.GetArrayFromImage(img)
    assert arr.min() >= 0.0 and arr.max() <= 1.0 and np.isfinite(arr).all()
    assert result.seed == 5 and result.steps == 3


def test_same_seed_same_volume_and_hu_range(pipe):
    a = sitk.GetArrayFromImage(pipe("ct-legs", sampler="dpmpp", steps=3, seed=11).image)
    b = sitk.GetArrayFromImage(pipe("ct-legs", sampler="dpmpp", steps=3, seed=11).image)
    c = sitk.GetArrayFromImage(pipe("ct-legs", sampler="dpmpp", steps=3, seed=12).image)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    hu = sitk.GetArrayFromImage(pipe("ct-legs", sampler="dpmpp", steps=3, seed=11, hu_range=(-1000, 2000)).image)
    np.testing.assert_allclose(hu, a * 3000 - 1000, atol=1e-3)


def test_progress_and_cancel(pipe):
    seen = []
    pipe("mr-knee", sampler="ddim", steps=4, seed=1, progress=seen.append)
    sampling = [p for p in seen if p.stage == "sampling"]
    assert [p.step for p in sampling] == [0, 1, 2, 3, 4] and sampling[-1].eta_s == 0
    cancel = threading.Event()

    def stop_after_two(info):
        if info.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        pipe("mr-knee", sampler="ddim", steps=10, seed=1, progress=stop_after_two, cancel=cancel)


def test_clear_errors(pipe):
    with pytest.raises(InputError, match="ct-chest-abdomen"):
        pipe("ct-lungs", steps=2)
    with pytest.raises(InputError, match="steps"):
        pipe("ct-legs", sampler="ddim", steps=0)
    with pytest.raises(InputError, match="grid"):
        pipe("ct-legs", size_xyz="30x30x30", steps=1)
    with pytest.raises(InputError, match="only applies to CT"):
        pipe("mr-knee", steps=1, hu_range=(0, 1))
    with pytest.raises(InputError, match="sampler"):
        pipe("ct-legs", sampler="euler", steps=1)


def test_other_size_warns(pipe):
    with pytest.warns(UserWarning, match="trained at"):
        img = pipe("ct-legs", size_xyz=(32, 16, 16), sampler="ddim", steps=1, seed=0).image
    assert img.GetSize() == (32, 16, 16)


def test_cli_generate_and_anatomies(tmp_path, capsys):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    out, png = tmp_path / "ct.nrrd", tmp_path / "ct.png"
    rc = cli_main(["generate", "--anatomy", "ct-chest-abdomen", "--sampler", "ddim", "--steps", "2", "--seed", "3",
                   "--out", str(out), "--preview", str(png), "--model", str(bundle), "--device", "cpu", "--quiet"])
    assert rc == 0 and "seed 3" in capsys.readouterr().out
    img = sitk.ReadImage(str(out))
    assert img.GetDimension() == 3 and np.allclose(img.GetDirection(), GENERATED_DIRECTION)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["anatomies", "--model", str(bundle)]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("ct-head-neck", "mr-t2-brain", "mr-knee"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    rc = cli_main(["generate", "--anatomy", "ct-nose", "--out", str(tmp_path / "x.nrrd"), "--model", str(bundle)])
    assert rc == 2 and "ct-nose" in capsys.readouterr().err
    rc = cli_main(["generate", "--anatomy", "ct-legs", "--out", str(tmp_path / "missing" / "x.nrrd"),
                   "--model", str(bundle)])
    assert rc == 2 and "missing" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    rc = cli_main(["generate", "--anatomy", "ct-legs", "--out", str(tmp_path / "x.nrrd"),
                   "--autoencoder", str(tmp_path / "bad.pt"), "--denoiser", str(tmp_path / "bad.pt")])
    assert rc == 2 and "bad.pt" in capsys.readouterr().err


def test_pipeline_follows_the_bundles_schedule():
    """model.yaml's `diffusion:` is honoured: a linear or shorter schedule is sampled as declared, an unknown one
    is refused instead of silently sampled as cosine."""
    bundle = tiny_bundle()
    bundle.diffusion = {"timesteps": 100, "schedule": "linear"}
    pipe = GenerationPipeline(bundle, device="cpu")
    assert (pipe.diffusion.schedule, pipe.diffusion.num_timesteps) == ("linear", 100)
    with pytest.raises(InputError, match="steps must be between 1 and 100"):
        pipe("ct-legs", sampler="ddim", steps=101)
    bundle.diffusion = {"timesteps": 1000, "schedule": "sigmoid"}
    with pytest.raises(InputError, match="sigmoid"):
        GenerationPipeline(bundle, device="cpu")


def test_each_trained_size_gets_its_own_spacing():
    # The official chest/abdomen CT is 1.25 mm at one latent size and 0.7 x 0.7 x 1 mm at the other: the volume and
    # the dataset manifest must carry the spacing of the size actually sampled, not the anatomy's default.
    from MedDiffusionLib.catalog import Anatomy, Catalog
    from MedDiffusionLib.pipelines.batch import DatasetSpec, PlannedVolume, manifest_row

    bundle = tiny_bundle()
    spacings = ((1.25, 1.25, 1.25), (0.7, 0.7, 1.0))
    bundle.catalog = Catalog(
        Anatomy(a.name, a.class_index, a.modality, a.latent_sizes, a.spacing_xyz, a.description,
                spacings if a.name == "ct-chest-abdomen" else ())
        for a in bundle.catalog)
    p = GenerationPipeline(bundle, device="cpu")
    entry = bundle.catalog.get("ct-chest-abdomen")
    f = bundle.downsample
    for (d, h, w), spacing in zip(entry.latent_sizes, spacings):
        img = p("ct-chest-abdomen", size_xyz=(h * f, w * f, d * f), sampler="ddim", steps=1, seed=1).image
        assert img.GetSize() == (h * f, w * f, d * f)
        assert np.allclose(img.GetSpacing(), spacing)
    d, h, w = entry.latent_sizes[1]
    item = PlannedVolume(0, "ct-chest-abdomen", (h * f, w * f, d * f), (d, h, w), 1, "v.nrrd")
    spec = DatasetSpec((("ct-chest-abdomen", "1"),), (), 1, 0, "ddim", 1, 1, None, ".nrrd", "test")
    assert manifest_row(item, spec, p)["spacing_xyz"] == "0.7x0.7x1"
