"""Tiled decoding through the decoder's staged API: plans, in-place buffers, the halo fallback, the probe hook.

(`test_pipelines_generate.py` checks the default tiled decode against the whole-volume decode; here every path of
the planner is forced on the tiny fixture autoencoder and compared with `autoencoder.decode`.)
"""
from __future__ import annotations

import pytest
import torch

from MedDiffusionLib.models.autoencoder import PatchVolumeAutoencoder
from MedDiffusionLib.pipelines import decode, decode_conv, decode_plan
from MedDiffusionLib.pipelines.decode import DecodeReport, decode_latent, plan_decode, plan_tail

OFFICIAL_8X = dict(n_hiddens=48, downsample=8, embedding_dim=8, n_codes=8192, num_groups=24)


@pytest.fixture(scope="module")
def tiny_ae(reference_dir):
    sd = torch.load(reference_dir / "fixtures" / "ae_tiny.pt", weights_only=True)
    ae = PatchVolumeAutoencoder(n_hiddens=8, downsample=4, embedding_dim=4, n_codes=64, num_groups=4).eval()
    ae.load_official_state_dict(sd["state_dict"])
    return ae


@pytest.fixture(scope="module")
def official_meta():
    with torch.device("meta"):
        return PatchVolumeAutoencoder(**OFFICIAL_8X)


def _latent(ae, shape, seed):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3
    return ae.quantize(z)[0]


def test_tail_layers_run_in_order_are_the_decoder(tiny_ae):
    """The public staged API (head + tail layers) is the decoder's forward, bit for bit."""
    with torch.no_grad():
        z_q = _latent(tiny_ae, (1, 4, 5, 6, 4), 0)
        x = tiny_ae.post_vq_conv(z_q)
        tensors = [tiny_ae.decoder.head(x)]
        for layer in tiny_ae.decoder.tail():
            residual = tensors[layer.residual] if layer.residual is not None else None
            tensors.append(layer(tensors[-1], residual))
        assert torch.equal(tensors[-1], tiny_ae.decoder(x))


CASES = {  # path -> (latent shape, budget GB) that forces it on the tiny decoder (16 channels at the latent)
    "slabs, in place with carried rows, batch of two": ((2, 4, 7, 9, 5), 0.008),
    "statistics-only tensors recomputed by their consumers": ((1, 4, 12, 8, 8), 0.0045),
    "statistics-only tensors recomputed by their consumers, batch of two": ((2, 4, 12, 8, 8), 0.01),
    "3-D halo tiles after the last kept tensor": ((1, 4, 10, 12, 12), 0.008),
    "a ResBlock adds its up-sampled input through a skip folded into the up-sampling": ((2, 4, 7, 9, 5), 0.006),
}


@pytest.mark.parametrize("layout", ["CPU", "GPU"])
@pytest.mark.parametrize("path", list(CASES))
def test_every_plan_equals_the_whole_decode(tiny_ae, path, layout, monkeypatch):
    """Each path of the planner gives the whole-volume decode to float rounding, slab and tile borders included,
    in the CPU's way (channels-last, up-samplings as parity convolutions) and the GPU's (contiguous, the native
    transposed convolution), the latter played on the CPU."""
    if layout == "GPU":
        monkeypatch.setattr(decode, "_memory_format", lambda device: torch.contiguous_format)
        monkeypatch.setattr(decode_conv, "parity_decomposable", lambda conv: False)
    shape, budget_gb = CASES[path]
    with torch.no_grad():
        z_q = _latent(tiny_ae, shape, 3)
        full = tiny_ae.decode(z_q)
        tail = tiny_ae.decoder.tail()
        layers, plan = plan_tail(tail, (shape[0], 16) + shape[2:], budget_gb * 2**30)
        report, steps = DecodeReport(), []
        tiled = decode_latent(tiny_ae, z_q, budget_gb=budget_gb, progress=steps.append, report=report)
    assert report.plan == plan
    assert steps[-1].step == steps[-1].total == plan.steps
    assert max(p.slabs for p in plan.passes) > 1 or (plan.halo is not None and plan.halo.tiles > 1)
    if layout == "GPU" and path.startswith("a ResBlock"):  # folding needs the parity decomposition
        torch.testing.assert_close(tiled, full, rtol=1e-4, atol=2e-5)
        return
    if path.startswith("slabs"):
        assert any(t.inplace_of is not None for t in plan.tensors) and plan.halo is None
    elif path.startswith("statistics"):
        recomputed = [k for k, t in enumerate(plan.tensors) if not t.materialized]
        assert recomputed and plan.halo is None
        assert all(report.rows_computed[k] > plan.tensors[k].spatial[0] for k in recomputed)  # one per consumer
    elif path.startswith("3-D"):
        assert plan.halo is not None and plan.halo.tiles > 1
    else:  # the up-sampled tensor is not kept and the ResBlock's skip reads the up-sampling's input instead
        folded = [i for i, (a, b) in enumerate(zip(tail, layers)) if a.residual != b.residual]
        assert folded and all(not plan.tensors[tail[i].residual].materialized for i in folded)
        assert all(isinstance(layers[i].skip, torch.nn.ConvTranspose3d) for i in folded)
    torch.testing.assert_close(tiled, full, rtol=1e-4, atol=2e-5)


def test_folded_skip_decodes_under_inference_mode(tiny_ae):
    """Under torch.inference_mode (as the benchmark and callers run it) the folded up-sampling's weights are
    inference tensors without a version counter: the decode still runs and equals the whole-volume decode."""
    shape, budget_gb = CASES["a ResBlock adds its up-sampled input through a skip folded into the up-sampling"]
    with torch.inference_mode():
        z_q = _latent(tiny_ae, shape, 3)
        full = tiny_ae.decode(z_q)
        tiled = decode_latent(tiny_ae, z_q, budget_gb=budget_gb)
    torch.testing.assert_close(tiled, full, rtol=1e-4, atol=2e-5)


def test_official_256_plan_recomputes_only_the_upsampled_tensor_within_the_cpu_budget(official_meta):
    """256^3 with the official 8x decoder in the default CPU budget: the 96-channel up-sampled tensor (6 GB) is
    recomputed, every 48-channel full-resolution tensor is kept (two buffers, the ResBlock outputs in place), and
    the estimate stays in budget."""
    budget = decode.default_budget_gb(torch.device("cpu")) * 2**30
    plan = plan_decode(official_meta.decoder.tail(), (1, 192, 32, 32, 32), budget)
    assert plan.halo is None and plan.peak_bytes <= budget
    full_res = [t for t in plan.tensors[:-1] if t.spatial == (256, 256, 256)]
    assert not full_res[0].materialized                       # 96 channels at 256^3: statistics pass only
    assert all(t.materialized for t in full_res[1:])
    assert sum(t.inplace_of is None for t in full_res[1:]) == 2
    # every pass but the statistics-only one produces a kept tensor: far fewer passes than norms x tiles
    assert len(plan.passes) == len(plan.tensors) - 1
    # the decode adds that tensor to the next ResBlock through a skip folded into its up-sampling: it is then
    # recomputed once (for the 96 -> 48 ResBlock's first half), not twice
    layers, folded = plan_tail(official_meta.decoder.tail(), (1, 192, 32, 32, 32), budget)
    assert layers[16].residual == 14 and isinstance(layers[16].skip, torch.nn.ConvTranspose3d)
    tail = official_meta.decoder.tail()
    assert decode_plan._flops(layers, folded) < decode_plan._flops(tail, plan) - 1e12
    assert folded.halo is None and folded.peak_bytes <= budget


@pytest.mark.parametrize("budget_gb", [7.25, 7.75])
def test_a_larger_budget_never_gives_a_costlier_plan(official_meta, budget_gb):
    """Regression: greedily keeping the 96-channel 256^3 tensor once it fits made the next pass overflow (7.25 GB:
    3-D halo tiles) or forced the four 48-channel tensors after it to be recomputed (7.75 GB: 30 TFLOP more)."""
    layers = official_meta.decoder.tail()
    smaller = plan_decode(layers, (1, 192, 32, 32, 32), 7 * 2**30)
    larger = plan_decode(layers, (1, 192, 32, 32, 32), budget_gb * 2**30)
    assert larger.halo is None and larger.peak_bytes <= budget_gb * 2**30
    assert decode_plan._flops(layers, larger) <= decode_plan._flops(layers, smaller)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
@pytest.mark.parametrize("k,s,p,size", [(4, 2, 1, (5, 6, 3)), (4, 2, 1, (1, 2, 2)), (2, 2, 0, (3, 4, 5)),
                                        (6, 3, 1, (3, 2, 4)), (6, 2, 2, (4, 4, 5))])
def test_transposed_convolution_as_one_ordinary_convolution(k, s, p, size, layout):
    """The decoder's up-samplings run as a single conv3d over parity classes: the transposed convolution's output
    to float rounding, for the official shape (4, 2, 1) and others, at sizes down to one voxel. A channels-last
    input (the CPU decode's layout) gives a dense channels-last output, cropped without a copy of its own."""
    torch.manual_seed(k * 10 + p)
    conv = torch.nn.ConvTranspose3d(5, 3, k, s, p).double()
    x = torch.randn(2, 5, *size, dtype=torch.float64).contiguous(memory_format=layout)
    assert decode_conv.parity_decomposable(conv)
    with torch.no_grad():
        y = decode_conv.conv_transpose_as_conv(conv, x)
        torch.testing.assert_close(y, conv(x), rtol=1e-12, atol=1e-12)
    if layout == torch.channels_last_3d:
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert not decode_conv.parity_decomposable(torch.nn.ConvTranspose3d(5, 3, 3, 2, 1))
    assert not decode_conv.parity_decomposable(torch.nn.Conv3d(5, 3, 3))


@pytest.mark.parametrize("k,s,p", [(4, 2, 1), (6, 3, 1), (2, 2, 0)])
def test_transposed_convolution_rows_of_a_slab(k, s, p):
    """A slab's up-sampled rows from exactly the input rows they read (no depth padding inside the volume, zeros
    at its borders), channels-last, written into a given buffer or a new one: the rows of the full transposed
    convolution. Rows that are not the slab's inputs are refused."""
    torch.manual_seed(k + s)
    conv = torch.nn.ConvTranspose3d(4, 3, k, s, p).double()
    full = torch.randn(1, 4, 7, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = conv(full)
        n_out = expected.shape[2]
        for a, b in [(0, 3), (3, 8), (5, 6), (8, n_out), (0, n_out)]:
            lo, hi = decode_plan._input_rows(decode_plan.TailLayer(conv), a, b, 7)
            got = decode_conv.conv_transpose_rows(conv, full[:, :, lo:hi], lo, hi, 7, a, b)
            torch.testing.assert_close(got, expected[:, :, a:b], rtol=1e-12, atol=1e-12)
            assert got.is_contiguous(memory_format=torch.channels_last_3d)
            buffer = torch.zeros_like(expected).contiguous(memory_format=torch.channels_last_3d)
            decode_conv.conv_transpose_rows(conv, full[:, :, lo:hi], lo, hi, 7, a, b, out=buffer[:, :, a:b])
            torch.testing.assert_close(buffer[:, :, a:b], expected[:, :, a:b], rtol=1e-12, atol=1e-12)
            assert not buffer[:, :, :a].any() and not buffer[:, :, b:].any()
        with pytest.raises(ValueError, match="not the input rows"):
            decode_conv.conv_transpose_rows(conv, full[:, :, 1:5], 1, 5, 7, 0, 6)


def test_probe_runs_two_slabs_per_pass_and_keeps_the_shape(tiny_ae):
    with torch.no_grad():
        z_q = _latent(tiny_ae, (1, 4, 8, 12, 8), 0)
        steps = []
        probed = decode_latent(tiny_ae, z_q, budget_gb=0.005, probe_slabs=2, progress=steps.append)
        _, plan = plan_tail(tiny_ae.decoder.tail(), (1, 16, 8, 12, 8), 0.005 * 2**30)
    expected = sum(min(p.slabs, 2) for p in plan.passes) + (min(plan.halo.tiles, 2) * plan.halo.passes
                                                             if plan.halo else 0)
    assert steps[-1].total == expected < plan.steps
    assert probed.shape == (1, 1, 32, 48, 32)


def test_overwritten_rows_are_refused_not_silently_reused():
    buf = decode._Buffer(torch.arange(10.0).view(1, 1, 10, 1, 1).clone())
    buf.overwrite(0, torch.full((1, 1, 4, 1, 1), -1.0), keep_from=3)
    assert buf.read(3, 6).flatten().tolist() == [3.0, 4.0, 5.0]   # row 3 from the carry, 4-5 untouched
    with pytest.raises(RuntimeError, match="overwritten"):
        buf.read(2, 5)


@pytest.mark.parametrize("shape,budget_gb", [((1, 4, 6, 6, 6), 0.02), CASES["statistics-only tensors recomputed by "
                                                                            "their consumers"]])
def test_bf16_mode_is_close_but_not_the_default(tiny_ae, shape, budget_gb):
    """The optional non-exact mode: bfloat16 convolutions stay near the exact volume (kept whole, or in slabs with
    recomputed tensors); fp32 is the default."""
    with torch.no_grad():
        z_q = _latent(tiny_ae, shape, 1)
        exact = decode_latent(tiny_ae, z_q, budget_gb=budget_gb)
        approx = decode_latent(tiny_ae, z_q, budget_gb=budget_gb, precision="bf16")
        full = tiny_ae.decode(z_q)
    torch.testing.assert_close(exact, full, rtol=1e-4, atol=2e-5)
    assert approx.dtype == torch.float32 and not torch.equal(approx, exact)
    assert (approx - exact).abs().max() < 0.05 * (exact.max() - exact.min())
    assert (approx - exact).pow(2).mean().sqrt() < 0.005 * (exact.max() - exact.min())
    with pytest.raises(ValueError, match="precision"):
        decode_latent(tiny_ae, z_q, budget_gb=0.02, precision="fp8")


def test_slab_statistics_of_a_channels_last_slab_are_float64_exact():
    """The CPU decode's slabs are channels-last, where one batch_norm_update_stats call accumulates in float32
    (relative variance error ~1e-4 on a large slab); the statistics are taken row by row and merged in float64,
    so they match float64 statistics of the whole tensor to ~1e-6 across slabs of any size, batch included."""
    gen = torch.Generator().manual_seed(5)
    y = (torch.randn(2, 24, 24, 96, 96, generator=gen) * 3 + 1.5).contiguous(memory_format=torch.channels_last_3d)
    stats = decode._Statistics()
    for a, b in [(0, 7), (7, 8), (8, 24)]:
        stats.add(y[:, :, a:b])
    var, mean = torch.var_mean(y.double(), dim=(2, 3, 4), correction=0)
    assert stats.count == 24 * 96 * 96
    assert stats.mean is not None and stats.m2 is not None
    torch.testing.assert_close(stats.mean, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.m2 / stats.count, var, rtol=2e-6, atol=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread sums the most values in float32 (the worst case of the single pass)
    try:
        one_call = torch.batch_norm_update_stats(y[:1], None, None, 1.0)[1].double()
    finally:
        torch.set_num_threads(threads)
    # (the float32 single pass this replaces would not pass the bound above)
    assert ((one_call - var[0]).abs() / var[0]).max() > 2e-6


def test_official_decoder_tiled_channels_last_equals_the_whole_decode():
    """The official 8x decoder (random weights) at a 32^3 volume, in slabs large enough for oneDNN's
    channels-last convolutions, with a recomputed up-sampled tensor: equal to the whole-volume decode."""
    torch.manual_seed(0)
    ae = PatchVolumeAutoencoder(**OFFICIAL_8X).eval()
    with torch.no_grad():
        z_q = _latent(ae, (1, 8, 4, 4, 4), 2)
        full = ae.decode(z_q)
        report = DecodeReport()
        tiled = decode_latent(ae, z_q, budget_gb=0.02, report=report)
    assert report.plan is not None and not all(t.materialized for t in report.plan.tensors)
    assert max(p.slabs for p in report.plan.passes) > 1
    torch.testing.assert_close(tiled, full, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("k,s,p", [(4, 2, 3), (3, 2, 1), (4, 2, 1)])
def test_native_transposed_convolution_rows_of_a_slab(k, s, p, monkeypatch):
    """The native transposed convolution's path (GPUs; kernels the parity decomposition does not cover) gives a
    slab's rows, also when the padding is larger than k - s (its own depth padding would crop needed rows)."""
    monkeypatch.setattr(decode_conv, "parity_decomposable", lambda conv: False)
    torch.manual_seed(k + p)
    layer = decode_plan.TailLayer(torch.nn.ConvTranspose3d(3, 2, k, s, p).double())
    full = torch.randn(1, 3, 6, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = layer.conv(full)
        for a, b in [(0, 2), (2, 7), (5, expected.shape[2])]:
            lo, hi = decode_plan._input_rows(layer, a, b, 6)
            got = decode_conv.conv_rows(layer, full[:, :, lo:hi], lo, hi, 6, a, b)
            torch.testing.assert_close(got, expected[:, :, a:b], rtol=1e-12, atol=1e-12)
