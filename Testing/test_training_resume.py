"""Resuming continues exactly where a run stopped; an interrupted checkpoint write never loses the last one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _training_helpers import (REPO, ae_config, assert_state_close, denoiser_config, single_thread,  # noqa: F401
                               write_latents, write_manifest, write_volumes)
from Training.stages import autoencoder as ae_stage
from Training.stages import denoiser as dn_stage
from Training.trainer import CheckpointManager, load_checkpoint


def _final(out: Path) -> dict:
    ckpts = CheckpointManager(out / "checkpoints").list()
    return load_checkpoint(ckpts[-1][1])


def _compare_runs(straight: dict, resumed: dict) -> None:
    assert straight["step"] == resumed["step"]
    for key in ("models", "ema", "optimizers", "data"):
        assert_state_close(straight[key], resumed[key], key)
    # The random streams continue identically too.
    assert torch.equal(straight["rng"][0]["torch"], resumed["rng"][0]["torch"])


@pytest.fixture()
def manifest(tmp_path: Path) -> Path:
    vols = write_volumes(tmp_path / "vols", n=3)
    return write_manifest(tmp_path / "manifest.yaml", {"a": [str(v) for v in vols[:2]], "b": [str(vols[2])]})


def test_autoencoder_resume_matches_straight_run(tmp_path: Path, manifest: Path) -> None:
    # GAN losses start at step 1, EMA warmup ends at step 2: the resumed half exercises all of them.
    ae_stage.run(ae_config(tmp_path / "straight", manifest, max_steps=4))
    ae_stage.run(ae_config(tmp_path / "resumed", manifest, max_steps=2))
    ae_stage.run(ae_config(tmp_path / "resumed", manifest, max_steps=4), resume=True)
    straight, resumed = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    assert set(straight["optimizers"]) == {"autoencoder", "discriminator"}
    _compare_runs(straight, resumed)
    assert (tmp_path / "straight" / "autoencoder.safetensors").is_file()


def test_denoiser_resume_matches_straight_run(tmp_path: Path) -> None:
    latents = write_latents(tmp_path / "lat", n=3)
    dn_stage.run(denoiser_config(tmp_path / "straight", latents, max_steps=4))
    dn_stage.run(denoiser_config(tmp_path / "resumed", latents, max_steps=2))
    dn_stage.run(denoiser_config(tmp_path / "resumed", latents, max_steps=4), resume=True)
    straight, resumed = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    _compare_runs(straight, resumed)
    # 3 latents, batch 2: one batch per epoch (the odd sample dropped), so the resumed half starts new epochs.
    assert straight["data"] == {"epoch": 3, "consumed": 2}


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save({"step": 1, "w": torch.ones(3)}, 1)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes part of the file, then the "process dies"
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        mgr.save({"step": 2, "w": torch.zeros(3)}, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in mgr.list()] == [1]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "temporary file left behind"
    state, path = mgr.load_latest()
    assert state["step"] == 1 and path.name == "step_0000001.pt"


def test_corrupt_newest_checkpoint_falls_back(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save({"step": 1}, 1)
    (tmp_path / "step_0000002.pt").write_bytes(b"truncated")  # e.g. copied by hand and cut short
    state, path = mgr.load_latest()
    assert state["step"] == 1


def test_killed_during_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    # A real process killed (SIGKILL) in the middle of writing its second checkpoint.
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        from Training.trainer import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        mgr.save({{"step": 1, "w": torch.ones(4)}}, 1)
        def slow_save(obj, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"partial")
                fh.flush()
                print("WRITING", flush=True)
                time.sleep(60)
        torch.save = slow_save
        mgr.save({{"step": 2}}, 2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "WRITING" in line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    mgr = CheckpointManager(tmp_path)
    assert [s for s, _ in mgr.list()] == [1]
    state, _ = mgr.load_latest()
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(4))


def test_checkpoint_is_weights_only_loadable(tmp_path: Path, manifest: Path) -> None:
    ae_stage.run(ae_config(tmp_path / "run", manifest, max_steps=2))
    path = CheckpointManager(tmp_path / "run" / "checkpoints").list()[-1][1]
    state = torch.load(path, weights_only=True)  # would raise on any pickled class
    assert state["step"] == 2 and state["stage"] == "autoencoder1"
    assert {"torch", "numpy", "python"} <= set(state["rng"][0])
    assert "scaler" in state and "config" in state


def test_keyboard_interrupt_saves_checkpoint(tmp_path: Path) -> None:
    latents = write_latents(tmp_path / "lat", n=4)
    cfg = denoiser_config(tmp_path / "run", latents, max_steps=50, checkpoint_every=100)
    calls = {"n": 0}
    real = dn_stage.Trainer.optimize

    def interrupting(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    dn_stage.Trainer.optimize = interrupting  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            dn_stage.run(cfg)
    finally:
        dn_stage.Trainer.optimize = real  # type: ignore[method-assign]
    steps = [s for s, _ in CheckpointManager(tmp_path / "run" / "checkpoints").list()]
    assert steps == [2]
