"""EMA vector quantizer: chunked search, EMA math, data init, dead-code restart, gradients, DDP sync."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from MedDiffusionLib.models.quantizer import VectorQuantizer

REPO = Path(__file__).resolve().parents[1]


def set_codebook(q: VectorQuantizer, emb: torch.Tensor, n: torch.Tensor | None = None) -> None:
    q.load_state_dict({"embeddings": emb.clone(), "N": (torch.ones(len(emb)) if n is None else n.clone()),
                       "z_avg": emb.clone() * (1.0 if n is None else n.unsqueeze(1))})


def test_chunked_search_equals_bruteforce():
    q = VectorQuantizer(64, 8)
    flat = torch.randn(1000, 8)
    brute = torch.cdist(flat.double(), q.embeddings.double()).argmin(1)
    assert torch.equal(q.nearest(flat, chunk_size=7), brute)
    assert torch.equal(q.nearest(flat), brute)


def test_distance_block_is_memory_bounded():
    q = VectorQuantizer(8192, 8)
    # One block of distances: rows x K floats, far below 1 GiB whatever the latent size.
    assert q._block_rows(torch.device("cpu")) * q.n_codes * 4 <= 8 * 2 ** 20
    assert q._block_rows(torch.device("cuda")) * q.n_codes * 4 <= 128 * 2 ** 20


def test_lookup_shapes_and_no_state_change():
    q = VectorQuantizer(16, 4).train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = torch.randn(2, 4, 3, 5, 6)
    z_q, idx = q.lookup(z)
    assert idx.shape == (2, 3, 5, 6) and z_q.shape == z.shape
    assert torch.equal(z_q, q.embeddings[idx].movedim(-1, 1))
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k])
    assert q.need_init  # lookup never initialises


def test_eval_forward_does_not_update():
    q = VectorQuantizer(16, 4).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(1, 4, 4, 4, 4))
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k])


def test_ema_update_hand_checked():
    # K=2 codes in 1-D at 0 and 10; inputs 1, 2 -> code 0 and 9 -> code 1.
    q = VectorQuantizer(2, 1, decay=0.99, eps=1e-5, restart_threshold=0.0).train()
    set_codebook(q, torch.tensor([[0.0], [10.0]]))
    out = q(torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 3, 1, 1))
    assert out.indices.flatten().tolist() == [0, 0, 1]
    n = torch.tensor([0.99 * 1 + 0.01 * 2, 0.99 * 1 + 0.01 * 1])
    z_avg = torch.tensor([0.99 * 0 + 0.01 * 3, 0.99 * 10 + 0.01 * 9])
    total = n.sum()
    smoothed = (n + 1e-5) / (total + 2 * 1e-5) * total
    torch.testing.assert_close(q.N, n)
    torch.testing.assert_close(q.z_avg.flatten(), z_avg)
    torch.testing.assert_close(q.embeddings.flatten(), z_avg / smoothed)
    # The codes returned are those before the update.
    assert out.z_q.flatten().tolist() == [0.0, 0.0, 10.0]


def test_data_init_from_first_batch():
    q = VectorQuantizer(8, 3).train()
    flat = torch.randn(50, 3)
    q._data_init(flat)
    assert not q.need_init
    for e in q.embeddings:  # every code is one of the encoder outputs
        assert (flat - e).abs().sum(1).min() < 1e-6
    assert len({tuple(e.tolist()) for e in q.embeddings}) == 8
    torch.testing.assert_close(q.z_avg, q.embeddings)
    torch.testing.assert_close(q.N, torch.ones(8))


def test_data_init_tiles_when_fewer_vectors_than_codes():
    q = VectorQuantizer(10, 2).train()
    flat = torch.tensor([[1.0, 1.0], [-1.0, 2.0], [3.0, 0.0]])
    q._data_init(flat)
    dist = torch.cdist(q.embeddings, flat).min(1).values
    assert (dist < 0.1).all()  # copies of the inputs with a small jitter
    assert len({tuple(e.tolist()) for e in q.embeddings}) == 10  # the jitter makes them distinct


def test_first_training_forward_initialises_once():
    q = VectorQuantizer(4, 2).train()
    z = torch.randn(1, 2, 4, 4, 4)
    q(z)
    assert not q.need_init
    # After data init + one EMA step every code is close to some encoder output (restarts too).
    flat = z.movedim(1, -1).reshape(-1, 2)
    assert torch.cdist(q.embeddings, flat).min(1).values.max() < 2.0
    q.eval()
    fresh = VectorQuantizer(4, 2).eval()
    fresh(z)
    assert fresh.need_init  # eval mode never initialises


def test_dead_code_restart_replaces_unused_codes():
    torch.manual_seed(1)
    q = VectorQuantizer(4, 2, restart_threshold=1.0).train()
    emb = torch.tensor([[0.0, 0.0], [100.0, 100.0], [5.0, 5.0], [-100.0, 100.0]])
    set_codebook(q, emb, n=torch.tensor([50.0, 0.5, 50.0, 0.5]))
    z = torch.cat([torch.randn(40, 2) * 0.1, torch.randn(40, 2) * 0.1 + 5.0]).t().reshape(1, 2, 80, 1, 1)
    q(z)
    flat = z.movedim(1, -1).reshape(-1, 2)
    for dead in (1, 3):  # replaced by (exact) encoder outputs: 80 vectors >= 4 codes, so no jitter
        assert (flat - q.embeddings[dead]).abs().sum(1).min() < 1e-6
        # ...and the restart survives the next normalisation when nothing selects the code.
        torch.testing.assert_close(q.z_avg[dead] / q.smoothed_counts()[dead], q.embeddings[dead])
    for live in (0, 2):  # live codes keep their EMA update
        assert (q.embeddings[live] - emb[live]).abs().max() < 0.5


def test_straight_through_gradient_and_commitment_loss():
    q = VectorQuantizer(16, 4).eval()
    z = torch.randn(2, 4, 3, 3, 3, requires_grad=True)
    out = q(z)
    z_q, _ = q.lookup(z.detach())
    torch.testing.assert_close(out.z_q, z_q)
    torch.testing.assert_close(out.commitment_loss, 0.25 * F.mse_loss(z.detach(), z_q))
    (out.z_q * 3.0).sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, 3.0))  # identity gradient
    z.grad = None
    out = q(z)
    out.commitment_loss.backward()  # commits the encoder output towards its (fixed) code
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - z_q) / z.numel())


def test_perplexity():
    q = VectorQuantizer(4, 1, restart_threshold=0.0).eval()
    set_codebook(q, torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    assert q(torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 4, 1, 1)).perplexity.item() == pytest.approx(4.0)
    assert q(torch.zeros(1, 1, 4, 1, 1)).perplexity.item() == pytest.approx(1.0)


def test_state_dict_keys_are_official_and_loading_clears_init():
    q = VectorQuantizer(8, 2)
    assert list(q.state_dict()) == ["embeddings", "N", "z_avg"]
    assert q.need_init
    q.load_state_dict(VectorQuantizer(8, 2).state_dict())
    assert not q.need_init


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from MedDiffusionLib.models.quantizer import VectorQuantizer

    def work(rank, init_file, out_dir):
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
        torch.manual_seed(rank)  # different data and different local random choices per rank
        q = VectorQuantizer(8, 2).train()
        for _ in range(3):
            q(torch.randn(1, 2, 2, 2, 1) + rank)  # 4 vectors < 8 codes: tiling, init and restarts
        torch.save({k: v for k, v in q.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.set_num_threads(1)
        mp.spawn(work, args=(sys.argv[1], sys.argv[2]), nprocs=2)
""")


def test_ddp_ranks_stay_identical(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    script = tmp_path / "ddp_vq.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, str(script), str(tmp_path / "init"), str(tmp_path)], check=True, env=env,
                   timeout=120)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert math.isclose(float(r0["N"].sum()), 8.0, rel_tol=1e-5)  # EMA keeps the total count: 8 vectors/step
