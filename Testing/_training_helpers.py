"""Shared pieces of the training tests: tiny configs, small volume files, tensor comparisons."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # Training/ is not an installed package
    sys.path.insert(0, str(REPO))

@pytest.fixture(autouse=True)
def single_thread():
    """Tiny networks run 5-20x faster on one thread on a busy machine (no OpenMP hand-offs); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_AE = {"n_hiddens": 4, "downsample": 2, "embedding_dim": 2, "n_codes": 16, "num_groups": 2}
TINY_BIFLOW = {"dim": 6, "num_classes": 2, "dim_mults": [1, 1, 2], "use_attn": [0, 0, 1], "resnet_groups": 3,
               "dit_num_heads": 2, "attn_heads": 2, "attn_dim_head": 4, "sub_volume_size": 4}


def write_volumes(folder: Path, n: int = 4, shape_zyx: tuple[int, int, int] = (12, 10, 14), seed: int = 0) -> list[Path]:
    """``n`` small random volumes with a bright cube, alternating NIfTI and NRRD."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        a = (rng.random(shape_zyx) * 100).astype(np.float32)
        a[2:8, 2:8, 3:9] += 400 + 50 * i
        img = sitk.GetImageFromArray(a)
        img.SetSpacing((1.0, 1.0, 1.0))
        p = folder / (f"v{i}.nii.gz" if i % 2 == 0 else f"v{i}.nrrd")
        sitk.WriteImage(img, str(p))
        paths.append(p)
    return paths


def write_manifest(path: Path, classes: dict[str, list[str]]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"classes": classes}, sort_keys=False))
    return path


def ae_config(tmp: Path, manifest: Path, **train: Any) -> dict[str, Any]:
    t = {"stage": 1, "max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "tensorboard": False}
    t.update(train)
    return {"seed": 5, "out_dir": str(tmp), "model": dict(TINY_AE),
            "data": {"manifest": str(manifest), "patch_size": 8, "flip_prob": 0.5},
            "loss": {"perceptual_weight": 0, "disc_start": 1, "disc_channels": 4, "disc_layers": 2},
            "ema": {"enabled": True, "decay": 0.9, "update_every": 1, "warmup_steps": 2}, "train": t}


def write_latents(folder: Path, n: int = 6, shape: tuple[int, ...] = (2, 4, 4, 4), classes: int = 2) -> Path:
    """A latent cache as the latents stage writes it (index.json + safetensors)."""
    from safetensors.torch import save_file

    (folder / "latents").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):
        z = torch.rand(shape, generator=g) * 2 - 1
        name = f"latents/{i:05d}_x.safetensors"
        save_file({"latent": z}, str(folder / name))
        items.append({"file": name, "class_index": i % classes, "class_name": f"c{i % classes}",
                      "shape": list(shape), "source": f"x{i}"})
    index = {"format": "meddiffusion-latents", "version": 1, "codebook_range": [-1.5, 2.0],
             "classes": {f"c{k}": k for k in range(classes)}, "items": items, "encode_patch_size": 8}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def denoiser_config(tmp: Path, latents: Path, **train: Any) -> dict[str, Any]:
    t = {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "tensorboard": False}
    t.update(train)
    return {"seed": 7, "out_dir": str(tmp), "model": dict(TINY_BIFLOW), "data": {"latents": str(latents)},
            "ema": {"decay": 0.9, "update_every": 1, "warmup_steps": 2}, "preview": {"every": 0}, "train": t}


def assert_state_close(a: Any, b: Any, path: str = "", atol: float = 1e-6) -> None:
    """Recursive comparison of nested state dicts (tensors to tolerance, the rest exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=atol, rtol=1e-5), f"{path}: max diff {(a - b).abs().max()}"
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_state_close(a[k], b[k], f"{path}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_close(x, y, f"{path}[{i}]", atol)
    else:
        assert a == b, f"{path}: {a} != {b}"
