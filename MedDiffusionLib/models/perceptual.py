"""LPIPS-style perceptual distance on VGG-16 features, applied tri-planar to 3D volumes.

The network is defined here (torchvision is not a dependency) with torchvision's module indices, so a local
``vgg16`` weights file with keys ``features.N.weight`` / ``features.N.bias`` (safetensors or a plain
``state_dict`` saved by torch) loads directly. Nothing is downloaded: training configs point at the file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import InputError

__all__ = ["VGG16Features", "LPIPSDistance", "TriplanePerceptualLoss", "sample_triplane_slices",
           "load_vgg16_state_dict", "missing_vgg_message"]

# torchvision vgg16 "D" configuration; "M" is a 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                     512, 512, 512)
# Indices (in ``features``) of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the five LPIPS taps.
_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
_TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# LPIPS input scaling (inputs in [-1, 1] -> ImageNet-like statistics).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def missing_vgg_message(weight: float, key: str = "loss.vgg16_weights") -> str:
    """The error message for a perceptual loss weight without a VGG-16 weights file (names the config key)."""
    return (f"perceptual_weight is {weight} but no VGG-16 weights file is configured ({key}). Either set "
            "`perceptual_weight: 0` to train without the perceptual loss, or set "
            f"`{key}` to a local file (safetensors or torch state_dict) holding torchvision's vgg16 "
            "keys `features.N.weight` / `features.N.bias`.")


class VGG16Features(nn.Module):
    """VGG-16 convolutional trunk up to relu5_3; ``forward`` returns the five LPIPS tap activations."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations at the LPIPS taps (after each block's last ReLU)."""
        outs = []
        h = x
        for i, layer in enumerate(self.features):
            if isinstance(layer, nn.MaxPool2d) and min(h.shape[-2:]) < 2:
                continue  # tiny slices (< 16 px, small test/demo patches): keep 1 px instead of failing
            h = layer(h)
            if i in _TAPS:
                outs.append(h)
            if i >= _TAPS[-1]:
                break
        return outs


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    from ..checkpoints.torch_file import safe_torch_load  # no code, no allocation bombs (not torch.load)

    obj = safe_torch_load(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"VGG-16 weights file '{path}' does not hold a state_dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_vgg16_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a local VGG-16 file -> (``features.*`` tensors, optional LPIPS ``lin{k}`` weights).

    Accepts torchvision names, optionally under a ``net.``/``vgg.``/``module.`` prefix. LPIPS linear-layer
    weights (``lin{k}.model.1.weight``, shape (1, C, 1, 1)) are returned when present.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"VGG-16 weights file '{p}' does not exist")
    try:
        raw = _read_tensors(p)
    except InputError:
        raise
    except Exception as exc:  # unreadable / unsafe pickle: a user-facing message, not a traceback
        raise InputError(f"Could not read VGG-16 weights file '{p}': {exc}") from exc
    feats: dict[str, torch.Tensor] = {}
    lins: dict[str, torch.Tensor] = {}
    for key, val in raw.items():
        k = key
        for prefix in ("module.", "net.", "vgg."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("features."):
            feats[k] = val
        elif k.startswith("lin") and k.endswith(".weight"):
            lins[k.split(".")[0]] = val
    if not feats:
        raise InputError(f"'{p}' has no torchvision vgg16 keys (features.N.weight); found e.g. "
                         f"{sorted(raw)[:3]}")
    return feats, lins


class LPIPSDistance(nn.Module):
    """LPIPS-style distance: unit-normalised VGG features, squared difference, channel weights, spatial mean.

    With no learned weights each channel counts 1 (the LPIPS "baseline" variant); ``lin_weights`` (five
    tensors of size C) replace them. Frozen: parameters never require gradients.
    """

    shift: torch.Tensor  # input normalisation buffers (registered in __init__)
    scale: torch.Tensor

    def __init__(self, vgg_path: str | os.PathLike[str] | None = None,
                 lin_weights: Sequence[torch.Tensor] | None = None, use_file_lin: bool = True) -> None:
        super().__init__()
        if vgg_path is not None:
            # Built without random init (meta tensors), then the file's tensors are assigned: fast.
            with torch.device("meta"):
                self.net = VGG16Features()
        else:
            self.net = VGG16Features()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        weights = [torch.ones(c) for c in _TAP_CHANNELS]
        if vgg_path is not None:
            feats, lins = load_vgg16_state_dict(vgg_path)
            expected = self.net.state_dict()
            missing = [k for k in expected if k not in feats]
            if missing:
                raise InputError(f"VGG-16 weights file '{vgg_path}' lacks {len(missing)} keys, e.g. {missing[:3]}")
            bad = [k for k in expected if tuple(feats[k].shape) != tuple(expected[k].shape)]
            if bad:
                raise InputError(f"VGG-16 weights file '{vgg_path}' has wrong shapes for {bad[:3]}: not a VGG-16")
            self.net.load_state_dict({k: feats[k].float() for k in expected}, strict=True, assign=True)
            if use_file_lin and len(lins) == len(_TAPS):
                weights = [lins[f"lin{i}"].reshape(-1).float() for i in range(len(_TAPS))]
        if lin_weights is not None:
            weights = [torch.as_tensor(w, dtype=torch.float32).reshape(-1) for w in lin_weights]
        for i, (w, c) in enumerate(zip(weights, _TAP_CHANNELS)):
            if w.numel() != c:
                raise InputError(f"LPIPS weight {i} has {w.numel()} entries, expected {c}")
            self.register_buffer(f"lin{i}", w.view(1, c, 1, 1).clone(), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPSDistance":
        """Stay in eval mode whatever is asked: the network is a frozen feature extractor."""
        # Always eval: a frozen feature extractor (no dropout/BN here, but keep it explicit).
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (N,) between (N, 3, H, W) batches in [-1, 1]."""
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = ((a - b) ** 2 * getattr(self, f"lin{i}")).sum(dim=1)
            total = total + d.mean(dim=(1, 2))
        return total


def sample_triplane_slices(x: torch.Tensor, y: torch.Tensor, fraction: float = 0.2,
                           generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pick the same random ``fraction`` of slices (at least one) of ``x`` and ``y`` along each spatial axis.

    Inputs (B, C, D, H, W); returns three pairs of (B * n_axis, C, h, w) 2D batches (axial, coronal, sagittal
    in network order). Sampling uses torch's global RNG (or ``generator``) so resumed runs repeat it.
    """
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"expected two equal (B, C, D, H, W) tensors, got {tuple(x.shape)} and {tuple(y.shape)}")
    out = []
    for axis in (2, 3, 4):
        n = x.shape[axis]
        k = max(1, int(round(n * fraction)))
        idx = torch.randperm(n, generator=generator)[:k].to(x.device)
        xs, ys = x.index_select(axis, idx), y.index_select(axis, idx)
        # Move the sliced axis next to the batch and fold it in: (B, C, ..k.., ...) -> (B*k, C, h, w).
        xs = xs.movedim(axis, 1).reshape(-1, x.shape[1], *[s for a, s in enumerate(x.shape) if a not in (0, 1, axis)])
        ys = ys.movedim(axis, 1).reshape(-1, y.shape[1], *[s for a, s in enumerate(y.shape) if a not in (0, 1, axis)])
        out.append((xs, ys))
    return out


class TriplanePerceptualLoss(nn.Module):
    """Mean LPIPS distance over a random ``fraction`` of slices along each of the three axes."""

    def __init__(self, vgg_path: str | os.PathLike[str] | None, fraction: float = 0.2,
                 lin_weights: Sequence[torch.Tensor] | None = None, chunk: int = 64) -> None:
        super().__init__()
        self.lpips = LPIPSDistance(vgg_path, lin_weights=lin_weights)
        self.fraction = float(fraction)
        self.chunk = int(chunk)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance over the same random axial, coronal and sagittal slices of two volume batches."""
        losses = []
        for xs, ys in sample_triplane_slices(x, y, self.fraction):
            if xs.shape[1] == 1:  # grey-level volumes -> 3 identical channels for VGG
                xs, ys = xs.expand(-1, 3, -1, -1), ys.expand(-1, 3, -1, -1)
            # Chunks bound the activation memory of big whole-volume (stage 2) inputs.
            parts = [self.lpips(xs[i:i + self.chunk], ys[i:i + self.chunk]) for i in range(0, xs.shape[0], self.chunk)]
            losses.append(torch.cat(parts).mean())
        return torch.stack(losses).mean()
