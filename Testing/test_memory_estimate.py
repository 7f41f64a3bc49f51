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


def test_probing_a_few_slabs_per_pass_gives_the_full_decode_peak(estimator):
    """The estimator runs only the first slabs of each decode pass (`probe_slabs`); every slab of a pass has the
    same working set, so the peak must equal that of running them all."""
    budget = 0.3  # small enough for many slabs per pass, statistics-only passes and in-place writes
    probed = estimator.estimate(8, (8, 8, 16), controlnet=False, budget_gb=budget)
    with mock.patch.object(estimator, "PROBE_SLABS", None):
        full = estimator.estimate(8, (8, 8, 16), controlnet=False, budget_gb=budget)
    assert probed["decode_gb"] == pytest.approx(full["decode_gb"], rel=1e-6)
    assert 0.01 < full["decode_gb"] <= budget
