"""The bundled demo model: it loads by default, it learned something, and it works through every front end."""
from __future__ import annotations

import secrets

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffusionLib.checkpoints.bundle import default_bundle_dir, load_bundle
from MedDiffusionLib.data.phantoms import make_phantom
from MedDiffusionLib.data.transforms import image_to_network, normalize_percentile
from MedDiffusionLib.metrics.features import AutoencoderFeatures
from MedDiffusionLib.models.biflownet import BiFlowNet
from MedDiffusionLib.pipelines.generate import GenerationPipeline

ANATOMIES = ("ct-head-neck", "ct-chest-abdomen", "ct-legs", "mr-t1-brain", "mr-t2-brain", "mr-abdomen", "mr-knee")


@pytest.fixture(scope="module")
def demo():
    return load_bundle(None)


def test_demo_bundle_is_complete_and_small(demo):
    assert demo.name == "demo" and tuple(a.name for a in demo.catalog) == ANATOMIES
    assert set(demo.controlnets) == {"sparse-ct", "mri"}
    size = sum(p.stat().st_size for p in default_bundle_dir().iterdir())
    assert size < 30 * 2**20


def _distance_to_phantoms(vols: list[np.ndarray], ref: np.ndarray, feat: AutoencoderFeatures) -> float:
    return float(np.mean([np.linalg.norm(feat(v) - ref) for v in vols]))


def test_demo_samples_are_closer_to_phantoms_than_an_untrained_denoiser(demo):
    """Trained weights must matter: samples look like the training anatomy, untrained ones do not."""
    feat = AutoencoderFeatures(demo.autoencoder)
    anatomy = demo.catalog.get("ct-chest-abdomen")
    size = anatomy.volume_sizes_xyz(demo.downsample)[0]
    phantoms = [normalize_percentile(image_to_network(make_phantom(anatomy.name, size, anatomy.spacing_xyz,
                                                                    seed=10_000 + i)))[0] for i in range(3)]
    ref = np.mean([feat(p) for p in phantoms], axis=0)

    def sample(denoiser) -> list[np.ndarray]:
        bundle = type(demo)(**{**demo.__dict__, "denoiser": denoiser})
        pipe = GenerationPipeline(bundle, "cpu")
        return [2 * sitk.GetArrayFromImage(pipe(anatomy.name, sampler="dpmpp", steps=10, seed=s).image)
                .transpose(0, 2, 1) - 1 for s in (1, 2)]

    torch.manual_seed(0)
    untrained = BiFlowNet(**demo.denoiser.config)
    trained_d = _distance_to_phantoms(sample(demo.denoiser), ref, feat)
    untrained_d = _distance_to_phantoms(sample(untrained), ref, feat)
    assert trained_d < 0.7 * untrained_d, (trained_d, untrained_d)


def test_demo_model_through_the_real_server(tmp_path):
    from server_fixture import ServerProcess

    srv = ServerProcess(default_bundle_dir(), tmp_path / "store", tmp_path / "server.log",
                        token=secrets.token_urlsafe(24))
    try:
        client = srv.client()
        assert set(client.models()["tasks"]) >= {"sparse-ct", "mri"}
        job = client.generate("mr-knee", sampler="ddim", steps=5, seed=3)
        client.wait(job, timeout=120)
        img = client.result(job)
        knee = load_bundle(None).catalog.get("mr-knee")
        assert np.allclose(img.GetSpacing(), knee.spacing_xyz)
        ct = make_phantom("ct-head-neck", (32, 32, 24), (6.5, 6.5, 9.5), seed=10_001)
        job = client.reconstruct(ct, task="sparse-ct", views=20, steps=5, seed=1)
        client.wait(job, timeout=180)
        recon, degraded = client.result(job), client.degraded(job)
        assert recon.GetSize() == ct.GetSize() == degraded.GetSize()
        assert np.allclose(recon.GetSpacing(), ct.GetSpacing())
    finally:
        srv.stop()
