"""The GPU memory estimator (benchmarks/estimate_memory.py): its live-bytes accounting and one official row."""
from __future__ import annotations

import importlib.util
from unittest import mock
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "estimate_memory.py"


@pytest.fixture(scope="module")
def estimator():
    spec = importlib.util.spec_from_file_location("estimate_memory", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_live_bytes_counts_storages_once_frees_them_and_ignores_the_host(estimator):
    mib = 2**20
    with estimator._fake_gpu():
        tracker = estimator.LiveTensorBytes(estimator.GPU)
        with tracker:
            a = torch.empty(1024, 1024, device=estimator.GPU)    # 4 MiB
            b = a * 2                                             # 4 MiB
            view = b.view(-1)                                     # same storage as b
            host = b.cpu()                                        # host memory: not the GPU's
            assert (tracker.current, tracker.peak) == (8 * mib, 8 * mib)
            del a, b
            assert tracker.current == 4 * mib                     # b lives on through its view
            del view
            c = torch.empty(512, 1024, device=estimator.GPU)      # 2 MiB
            assert (tracker.current, tracker.peak) == (2 * mib, 8 * mib)
            del c, host


def test_attention_is_modelled_without_the_n_by_n_matrix(estimator):
    with estimator._fake_gpu():
        tracker = estimator.LiveTensorBytes(estimator.GPU)
        with tracker:
            q = torch.empty(1, 4, 32768, 32, device=estimator.GPU)   # 16 MiB
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape
    # q + out + the fp32 log-sum-exp row; the full matrix would be 16 GiB
    assert tracker.peak == 2 * q.numel() * 4 + 4 * 32768 * 4


def test_official_8x_knee_estimate_is_bounded_by_the_gpu_decode_budget(estimator):
    r = estimator.estimate(8, (8, 40, 40), controlnet=False)
    assert 0.6 < r["weights_gb"] < 0.8          # 157.7 M + 20 M fp32 parameters and the codebook
    assert 0.0 < r["step_gb"] < 1.0
    budget = estimator.default_budget_gb(torch.device("cuda"))
    # Tiles are sized to the budget; the head (whole latent) and the stage in flight come on top of it.
    assert 1.0 < r["decode_gb"] <= budget + 0.5
    assert r["total_gb"] == pytest.approx(r["weights_gb"] + max(r["step_gb"], r["decode_gb"]))


def test_memory_only_decode_runs_each_tile_shape_once_and_restores_the_decoder(estimator, reference_dir):
    from _decode_shortcuts import memory_only, one_tile_per_shape  # on sys.path through the estimator module

    from MedDiffusionLib.models.autoencoder import PatchVolumeAutoencoder
    from MedDiffusionLib.pipelines import decode

    sd = torch.load(reference_dir / "fixtures" / "ae_tiny.pt", weights_only=True)
    ae = PatchVolumeAutoencoder(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=64, num_groups=4).eval()
    ae.load_official_state_dict(sd["state_dict"])
    z = torch.randn(1, 4, 8, 12, 8, generator=torch.Generator().manual_seed(0))
    original = (decode._tiles, decode._run, decode._GlobalGroupNorms.__init__,
                decode._GlobalGroupNorms.finish_measure)
    tilings, calls = [], []
    all_tiles = decode._tiles

    def spy_tiles(spatial, core, halo):
        tilings.append((spatial, core, halo))
        return all_tiles(spatial, core, halo)

    # The last streamed stage sees each tile once per pass that reaches it: the final pass, plus the statistics
    # pass of its own GroupNorm(s) in a full decode.
    last_stage = decode._decoder_stages(ae.decoder)[-1].module
    hook = last_stage.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            with mock.patch.object(decode, "_tiles", spy_tiles):
                full = decode.decode_latent(ae, z, budget_gb=0.004)
            n_full = len(calls)
            calls.clear()
            with memory_only():
                short = decode.decode_latent(ae, z, budget_gb=0.004)
    finally:
        hook.remove()
    (spatial, core, halo), = tilings
    tiles = all_tiles(spatial, core, halo)
    distinct = one_tile_per_shape(spatial, core, halo)
    assert len(distinct) < len(tiles)
    assert len({tuple(w.stop - w.start for w in window) for window, _ in tiles}) == len(distinct)
    assert n_full > len(tiles)                    # statistics pass(es) plus the final pass
    assert len(calls) == len(distinct)            # memory-only: the final pass over one tile per shape, no statistics
    assert short.shape == full.shape
    assert (decode._tiles, decode._run, decode._GlobalGroupNorms.__init__,
            decode._GlobalGroupNorms.finish_measure) == original
