"""ControlNet for BiFlowNet: image-conditioned residuals for the denoiser's U-Net (sparse-view CT, MRI).

Structure (Zhang et al. 2023, adapted to the BiFlowNet encoder side):

    hint = zero_conv_in(condition_encoder(image))        # (B, dim, D, H, W): full-resolution image -> latent grid
    feats = encoder_copy(x, cond_copy(t, y, res), hint)  # trainable copy of BiFlowNet.encoder (+ its condition MLP)
    ControlResiduals(down=[zero_conv_i(skip_i)], mid=zero_conv_mid(feats.h)) * conditioning_scale

Every zero conv starts at exactly zero, so at initialisation the controlled denoiser gives bit-for-bit the base
denoiser's output, and the first gradient steps only move the zero convs (the copy keeps the denoiser's
well-trained features instead of being disturbed by random residuals). The base denoiser is never changed: the
pipeline calls ``denoiser(x, t, y, res, control=controlnet(x, t, y, res, image))``.

The copy includes the denoiser's condition embedding (timestep, class, resolution) so that the ControlNet is a
self-contained module: ``ControlNet(**net.config)`` rebuilds it from the JSON config in our safetensors files.
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Union, cast

from torch import Tensor, nn

from ..errors import InputError
from .biflownet import BiFlowNet, ControlResiduals
from .unet_blocks import conv3d

__all__ = ["ControlNet", "ConditionEncoder", "default_hidden"]


def default_hidden(stages: int) -> List[int]:
    """Condition-encoder widths, one per 2x down-sampling stage: 16, 32, 64, ... (capped at 128)."""
    return [min(16 * 2**i, 128) for i in range(stages)]


def _zero_conv(channels_in: int, channels_out: int) -> nn.Conv3d:
    conv = nn.Conv3d(channels_in, channels_out, 1)
    for param in conv.parameters():  # weight and bias
        nn.init.zeros_(param)
    return conv


class ConditionEncoder(nn.Module):
    """(B, C, Z, X, Y) image at full resolution -> (B, hidden[-1], Z/f, X/f, Y/f) features on the latent grid.

    Each stage halves the resolution with a 4^3 stride-2 conv first (so nothing runs at full resolution with
    many channels: a 256^3 condition costs one small conv there) and refines with a 3^3 conv.
    """

    def __init__(self, in_channels: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        c = in_channels
        for h in hidden:
            layers += [nn.Conv3d(c, h, 4, stride=2, padding=1), nn.SiLU(), nn.Conv3d(h, h, 3, padding=1), nn.SiLU()]
            c = h
        self.body = nn.Sequential(*layers)
        self.out_channels = c

    def forward(self, x: Tensor) -> Tensor:
        """The condition image's features on the latent grid."""
        for layer in self.body:
            x = conv3d(x, layer) if isinstance(layer, nn.Conv3d) else layer(x)
        return x


class ControlNet(nn.Module):
    """Trainable copy of a BiFlowNet's encoder side plus a condition-image encoder and zero convolutions.

    Args:
        denoiser_config: the controlled BiFlowNet's ``.config`` (the copy is built with the same architecture).
        condition_channels: channels of the condition image (1: an FBP or zero-filled volume).
        image_downsample: the autoencoder's factor f: the condition image is f times the latent size.
        hidden: condition-encoder widths, one per 2x stage (log2 f stages; default 16, 32, 64, ...).
        conditioning_scale: multiplies every residual (0 switches the control off; > 1 strengthens it).
    """

    def __init__(self, denoiser_config: Mapping[str, Any], condition_channels: int = 1, image_downsample: int = 8,
                 hidden: Optional[Sequence[int]] = None, conditioning_scale: float = 1.0) -> None:
        super().__init__()
        f = int(image_downsample)
        if f < 1 or f & (f - 1):
            raise ValueError(f"image_downsample must be a power of two >= 1, got {image_downsample}")
        stages = int(math.log2(f))
        hidden_list = default_hidden(stages) if hidden is None else [int(h) for h in hidden]
        if len(hidden_list) != stages or any(h < 1 for h in hidden_list):
            raise ValueError(f"hidden needs {stages} positive widths (one per 2x stage of image_downsample={f}), "
                             f"got {hidden!r}")
        if int(condition_channels) < 1:
            raise ValueError(f"condition_channels must be >= 1, got {condition_channels}")
        # Building the full BiFlowNet and keeping its encoder side reuses its exact layout (no duplicated
        # architecture code); the decoder half is dropped right away.
        base = BiFlowNet.from_config(denoiser_config)
        self.config: dict[str, Any] = dict(
            denoiser_config=dict(base.config), condition_channels=int(condition_channels), image_downsample=f,
            hidden=hidden_list, conditioning_scale=float(conditioning_scale))
        self.condition = base.condition
        self.encoder = base.encoder
        # Attributes BiFlowNet.check_latent / embed_condition read (they are called on self, duck-typed).
        self.channels, self.sub_volume, self.num_classes = base.channels, base.sub_volume, base.num_classes
        self.skip_channels: List[int] = list(base.skip_channels)
        self.mid_channels: int = base.mid_channels
        self.image_downsample = f
        self.conditioning_scale = float(conditioning_scale)
        del base

        self.cond_encoder = ConditionEncoder(int(condition_channels), hidden_list) if stages else None
        enc_out = hidden_list[-1] if stages else int(condition_channels)
        init_channels = self.encoder.init_conv.out_channels
        self.hint_conv = _zero_conv(enc_out, init_channels)
        self.down_convs = nn.ModuleList([_zero_conv(c, c) for c in self.skip_channels])
        self.mid_conv = _zero_conv(self.mid_channels, self.mid_channels)

    @classmethod
    def from_denoiser(cls, denoiser: BiFlowNet, condition_channels: int = 1, image_downsample: int = 8,
                      hidden: Optional[Sequence[int]] = None, conditioning_scale: float = 1.0) -> "ControlNet":
        """A ControlNet whose encoder copy (and condition embedding) start as the denoiser's exact weights."""
        net = cls(denoiser.config, condition_channels, image_downsample, hidden, conditioning_scale)
        net.encoder.load_state_dict(denoiser.encoder.state_dict())
        net.condition.load_state_dict(denoiser.condition.state_dict())
        param = next(denoiser.parameters())
        return net.to(device=param.device, dtype=param.dtype)

    def zero_convs(self) -> List[nn.Conv3d]:
        """The zero-initialised output convolutions (hint, one per skip, middle)."""
        return [self.hint_conv, *self.down_convs, self.mid_conv]

    # ---- condition image ------------------------------------------------------------------------------------
    def encode_condition(self, condition: Tensor, latent_shape: Optional[Sequence[int]] = None) -> Tensor:
        """The hint added to the encoder copy's init-conv output; compute once per image and pass as ``hint``.

        ``condition``: (B, C, Z, X, Y) or (Z, X, Y); spatial size = latent size x image_downsample.
        """
        if condition.dim() == 3:
            condition = condition[None, None]
        c_in = self.config["condition_channels"]
        if condition.dim() != 5 or condition.shape[1] != c_in:
            raise InputError(f"the ControlNet condition must be a (B, {c_in}, Z, X, Y) image, "
                             f"got {tuple(condition.shape)}")
        f = self.image_downsample
        if latent_shape is not None:
            want = tuple(int(s) * f for s in latent_shape[-3:])
            if tuple(condition.shape[2:]) != want:
                raise InputError(f"condition image size {tuple(condition.shape[2:])} (Z, X, Y) must be the latent "
                                 f"size {tuple(latent_shape[-3:])} x {f} = {want}")
        elif any(s % f for s in condition.shape[2:]):
            raise InputError(f"condition image size {tuple(condition.shape[2:])} must be a multiple of {f}")
        w = self.hint_conv.weight
        h = condition.to(device=w.device, dtype=w.dtype)
        if self.cond_encoder is not None:
            h = self.cond_encoder(h)
        return conv3d(h, self.hint_conv)

    # ---- residuals ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Union[Tensor, int], y: Union[Tensor, int, None],
                res: Union[Tensor, Sequence[float]], condition: Optional[Tensor] = None,
                hint: Optional[Tensor] = None) -> ControlResiduals:
        """Residuals for ``denoiser(x, t, y, res, control=...)``; give the condition image or a precomputed hint."""
        # BiFlowNet's methods on self: a ControlNet has the attributes they read (see __init__), duck-typed.
        BiFlowNet.check_latent(self, x)  # type: ignore[arg-type]
        if hint is None:
            if condition is None:
                raise InputError("ControlNet needs the condition image (or its precomputed hint)")
            hint = self.encode_condition(condition, x.shape)
        if hint.shape[0] != x.shape[0]:
            if hint.shape[0] != 1:
                raise InputError(f"condition batch {hint.shape[0]} does not match the latent batch {x.shape[0]}")
            hint = hint.expand(x.shape[0], *hint.shape[1:])
        if tuple(hint.shape[2:]) != tuple(x.shape[2:]):
            raise InputError(f"hint size {tuple(hint.shape[2:])} does not match the latent {tuple(x.shape[2:])}")
        cond = BiFlowNet.embed_condition(self, t, y, res, batch=x.shape[0])  # type: ignore[arg-type]
        feats = self.encoder(x, cond, hint)
        scale = self.conditioning_scale
        down = [conv3d(s, conv) for s, conv in zip(feats.skips, cast("list[nn.Conv3d]", self.down_convs))]
        mid = conv3d(feats.h, self.mid_conv)
        if scale != 1.0:
            down, mid = [d * scale for d in down], mid * scale
        return ControlResiduals(down=down, mid=mid)
