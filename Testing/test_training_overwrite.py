"""A second run into a folder holding an earlier run's checkpoints is refused unless it resumes that run or
says --overwrite (issue 11, item 4): before the fix it deleted each new checkpoint as it was written (the old,
higher-numbered ones were the 'newest') and overwrote config.yaml and the weights."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from _training_helpers import denoiser_config, single_thread, write_latents  # noqa: F401
from MedDiffusionLib.errors import InputError
from Training.stages import denoiser as dn_stage
from Training.trainer import CheckpointManager


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts}


def test_second_run_without_resume_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    latents = write_latents(tmp_path / "lat", n=3)
    out = tmp_path / "run"
    dn_stage.run(denoiser_config(out, latents, max_steps=4))
    before = _digest(out)
    assert {"checkpoints/step_0000004.pt", "config.yaml", "denoiser.safetensors"} <= set(before)
    with pytest.raises(InputError, match="already holds checkpoints.*--resume.*--overwrite"):
        dn_stage.run(denoiser_config(out, latents, max_steps=2, keep_checkpoints=1))
    assert _digest(out) == before  # no checkpoint deleted, config.yaml and weights untouched


def test_overwrite_replaces_the_earlier_run(tmp_path: Path) -> None:
    latents = write_latents(tmp_path / "lat", n=3)
    out = tmp_path / "run"
    dn_stage.run(denoiser_config(out, latents, max_steps=4))
    cfg = denoiser_config(out, latents, max_steps=2, checkpoint_every=1)
    cfg["overwrite"] = True
    dn_stage.run(cfg)
    assert [step for step, _ in CheckpointManager(out / "checkpoints").list()] == [1, 2]  # the new run's
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and "overwrite" not in saved  # a copied config never re-arms it


def test_train_cli_refuses_early_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from Training.train import main

    latents = write_latents(tmp_path / "lat", n=3)
    out = tmp_path / "run"
    dn_stage.run(denoiser_config(out, latents, max_steps=2))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(denoiser_config(out, latents, max_steps=2)))
    before = _digest(out)
    assert main(["denoiser", "--config", str(config), "--out", str(out)]) == 2
    assert main(["denoiser", "--config", str(config), "--resume", "--overwrite"]) == 2
    assert _digest(out) == before
    assert main(["denoiser", "--config", str(config), "--out", str(out), "--resume", "--max-steps", "3"]) == 0
    assert [s for s, _ in CheckpointManager(out / "checkpoints").list()][-1] == 3
