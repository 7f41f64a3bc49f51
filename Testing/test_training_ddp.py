"""Two-process DDP (torchrun, gloo on CPU): every rank ends with bit-identical weights, EMA and buffers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _training_helpers import (REPO, ae_config, denoiser_config, single_thread, write_latents,  # noqa: F401
                               write_manifest, write_volumes)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun + gloo on CPU: Linux/macOS")


def _torchrun(tmp: Path, stage: str, cfg: dict) -> dict[int, dict[str, str]]:
    cfg_path = tmp / f"{stage}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    dump = tmp / "dump"
    env = dict(os.environ, MEDDIFFUSION_TRAIN_DUMP=str(dump), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "Training" / "train.py"), stage, "--config", str(cfg_path)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    prefix = f"autoencoder{cfg['train']['stage']}" if stage == "autoencoder" else stage
    return {r: json.loads((dump / f"{prefix}_rank{r}.json").read_text()) for r in (0, 1)}


def test_ddp_autoencoder_and_denoiser_ranks_agree(tmp_path: Path) -> None:
    vols = write_volumes(tmp_path / "vols", n=3)
    manifest = write_manifest(tmp_path / "m.yaml", {"a": [str(v) for v in vols[:2]], "b": [str(vols[2])]})
    # GAN from step 1 (two DDP-wrapped networks, no_sync accumulation), EMA, codebook all-reduce.
    ae_cfg = ae_config(tmp_path / "ae", manifest, max_steps=3, checkpoint_every=2)
    hashes = _torchrun(tmp_path, "autoencoder", ae_cfg)
    assert set(hashes[0]) == {"autoencoder", "discriminator", "ema.autoencoder"}
    assert hashes[0] == hashes[1]
    ckpts = sorted(p.name for p in (tmp_path / "ae" / "checkpoints").iterdir())
    assert ckpts == ["step_0000002.pt", "step_0000003.pt"]  # rank 0 only, no temp files left

    # Stage 2: frozen encoder/codebook inside the DDP-wrapped module, trained discriminator carried over.
    ae2_cfg = ae_config(tmp_path / "ae2", manifest, stage=2, max_steps=2, batch_size=1)
    ae2_cfg.update(init_from=str(tmp_path / "ae" / "checkpoints" / "step_0000003.pt"), encode_patch_size=8)
    ae2_cfg["data"].update(max_voxels=512, max_crop=8)
    hashes = _torchrun(tmp_path, "autoencoder", ae2_cfg)
    assert hashes[0] == hashes[1]

    latents = write_latents(tmp_path / "lat", n=6)
    dn_cfg = denoiser_config(tmp_path / "dn", latents, max_steps=3, checkpoint_every=3)
    hashes = _torchrun(tmp_path, "denoiser", dn_cfg)
    assert set(hashes[0]) == {"denoiser", "ema.denoiser"}
    assert hashes[0] == hashes[1]
    assert (tmp_path / "dn" / "denoiser.safetensors").is_file()

    # The two ranks really trained on different data and the logged loss is their mean.
    import torch

    state = torch.load(tmp_path / "dn" / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
