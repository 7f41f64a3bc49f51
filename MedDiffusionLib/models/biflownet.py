"""BiFlowNet: the 3D MedDiffusion denoiser (intra-patch DiT flow + inter-patch 3D U-Net flow, fused).

Structure (the numbers are the official 8x model, dim 72, 5 levels, F = 2 fusion points):

    cond = embed_condition(t, y, res)                 # (B, 8*dim), shared by every ResNet and DiT block
    feats = encode(x, cond)      # encoder side: patch-embed + input DiT stages, init conv, down path, middle
    eps = decode(feats, cond, control)  # decoder side: middle/output DiT stages, up path, final block

The encoder side lives in `BiFlowNet.encoder` (a `BiFlowEncoder`) so that a ControlNet can be a trainable copy
of exactly that module: `copy.deepcopy(denoiser.encoder)`, called as `encoder(x, cond, hint=h)` where `hint`
(the embedded condition image, same shape as the init-conv output) is added after the init conv (or, the
authors' fork's way, widen the copy's `init_conv`/`patch_embed` input channels and pass `cat(x, condition)`;
the encoder only needs its convs to accept x). `cond` comes from the denoiser's `embed_condition` (or a copy of
`denoiser.condition`). Its
`EncoderFeatures.skips` (U-Net skip tensors in push order, `denoiser.skip_channels` channels) and `.h` (middle
block output, `denoiser.mid_channels` channels) are what the ControlNet turns, through zero convs, into
`ControlResiduals(down=[one per skip, push order], mid=...)`. `forward(..., control=...)` adds `down[i]` to the
i-th skip as it is stored and `mid` to the middle block output; the intra-patch (DiT) flow is not touched.

State-dict names are our own (`condition.*`, `encoder.*`, `decoder.*`); `load_official_state_dict` takes
the authors' names through `official_keys.biflownet_from_official`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from .dit import (DiTBlock, DiTStage, init_dit_weights, sincos_pos_table_3d, tokens_to_volume,
                  volume_to_tokens)
from .official_keys import biflownet_to_official, ours_to_official_key, split_official
from .unet_blocks import (ConditionEmbedding, ResnetBlock, UNetLevel, VolumeAttention, conv3d, downsample,
                          upsample)

Triple = Tuple[int, int, int]


@dataclass
class ControlResiduals:
    """Residuals from a ControlNet: one per U-Net skip tensor (push order) and one for the middle output."""

    down: List[Tensor]
    mid: Tensor


@dataclass
class EncoderFeatures:
    """Everything the encoder side hands to the decoder side."""

    h: Tensor  # middle-block output (deepest U-Net features)
    skips: List[Tensor]  # U-Net skip features, in the order they were pushed
    init: Tensor  # init-conv output, concatenated before the final block
    tokens: Tensor  # intra-patch tokens (B, G*N, dim) after the input DiT stages
    token_skips: List[Tensor]  # tokens after each input DiT stage (long skips to the output stages)
    grid: Triple  # sub-volume grid of the latent


def _triple(v: Union[int, Sequence[int]], name: str) -> Triple:
    vals = [int(v)] * 3 if isinstance(v, int) else [int(a) for a in v]
    if len(vals) != 3 or min(vals) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {v!r}")
    return vals[0], vals[1], vals[2]


def _per_axis(size: Sequence[int], unit: Triple) -> Triple:
    """How many ``unit`` blocks fit along each of the three axes of ``size``."""
    return size[0] // unit[0], size[1] // unit[1], size[2] // unit[2]


# On CPU the whole U-Net runs in channels-last-3d memory: oneDNN convolutions are ~1.5x faster in NDHWC and
# channel norms/linears need no permuting copies. Other devices keep PyTorch's default layout.
CPU_CHANNELS_LAST = True


def _channels_last(x: Tensor) -> bool:
    return CPU_CHANNELS_LAST and x.device.type == "cpu"


class BiFlowEncoder(nn.Module):
    """Encoder side: patch embedding + input DiT stages (fusion features), init conv, down path, middle."""

    def __init__(self, *, dim: int, channels: int, dims: List[int], use_attn: List[int], fusion: int,
                 cond_dim: int, groups: int, dit_heads: int, attn_heads: int, attn_dim_head: int,
                 sub_volume: Triple, patch: int, mlp_ratio: float) -> None:
        super().__init__()
        self.sub_volume, self.patch, self.fusion = sub_volume, patch, fusion
        self.per_sub = _per_axis(sub_volume, (patch, patch, patch))
        self.init_conv = nn.Conv3d(channels, dims[0], 3, padding=1)
        self.patch_embed = nn.Conv3d(channels, dim, patch, stride=patch)
        # A frozen Parameter (as the authors have it) so that it is counted and saved like theirs.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.per_sub[0] * self.per_sub[1] * self.per_sub[2], dim),
                                      requires_grad=False)
        self.intra_in = nn.ModuleList(
            [DiTStage(dim, dit_heads, cond_dim, mlp_ratio, patch, skip=False) for _ in range(fusion)])
        n = len(dims) - 1

        def attn(c: int, level: int) -> Optional[nn.Module]:
            return VolumeAttention(c, attn_heads, attn_dim_head) if use_attn[level] else None

        self.downs = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            # The first fusion-1 levels keep full resolution (they receive DiT features); the last never halves.
            halve = not (i < fusion - 1 or i == n - 1)
            self.downs.append(UNetLevel(ResnetBlock(cin, cout, groups, cond_dim),
                                        ResnetBlock(cout, cout, groups, cond_dim),
                                        attn(cout, i), attn(cout, i), downsample(cout) if halve else None))
        mid = dims[-1]
        self.mid_res1 = ResnetBlock(mid, mid, groups, cond_dim)
        self.mid_attn = VolumeAttention(mid, attn_heads, attn_dim_head)
        self.mid_res2 = ResnetBlock(mid, mid, groups, cond_dim)
        self.n_down = sum(level.resample is not None for level in self.downs)

    def forward(self, x: Tensor, cond: Tensor, hint: Optional[Tensor] = None) -> EncoderFeatures:
        """x: (B, C, D, H, W) latent (shape already validated), cond: (B, cond_dim) from embed_condition."""
        x = x.to(self.init_conv.weight.dtype)  # a bf16/fp16 model takes float32 latents too
        cl = _channels_last(x)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        grid = _per_axis(tuple(x.shape[2:]), self.sub_volume)
        n_tok = self.pos_embed.shape[1]
        # Patch-embedding the whole latent equals embedding each sub-volume (kernel = stride divides it).
        tokens = volume_to_tokens(conv3d(x, self.patch_embed), grid)
        b, length, c = tokens.shape
        tokens = (tokens.view(b, -1, n_tok, c) + self.pos_embed.to(tokens.dtype)).view(b, length, c)
        token_skips, fused = [], []
        for stage in cast("list[DiTStage]", self.intra_in):
            tokens = stage.block(tokens, cond, n_tok)
            token_skips.append(tokens)
            fused.append(tokens_to_volume(stage.head(tokens, cond), grid, self.per_sub, self.patch, cl))

        init = conv3d(x, self.init_conv)
        if hint is not None:
            init = init + hint
        h, skips = init, []
        for i, level in enumerate(cast("list[UNetLevel]", self.downs)):
            if i < len(fused):
                h = h + fused[i]
            h = level.first(h, cond)
            skips.append(h)
            h = level.second(h, cond)
            skips.append(h)
            h = level.apply_resample(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, cond)), cond)
        return EncoderFeatures(h=h, skips=skips, init=init, tokens=tokens, token_skips=token_skips, grid=grid)


class BiFlowDecoder(nn.Module):
    """Decoder side: middle and output DiT stages (long skips), up path with skip concatenation, final block."""

    def __init__(self, *, dim: int, channels: int, dims: List[int], use_attn: List[int], fusion: int,
                 cond_dim: int, groups: int, dit_heads: int, attn_heads: int, attn_dim_head: int,
                 sub_volume: Triple, patch: int, mlp_ratio: float, num_mid_dit: int) -> None:
        super().__init__()
        self.patch = patch
        self.per_sub = _per_axis(sub_volume, (patch, patch, patch))
        self.intra_mid = nn.ModuleList([DiTBlock(dim, dit_heads, cond_dim, mlp_ratio) for _ in range(num_mid_dit)])
        self.intra_out = nn.ModuleList(
            [DiTStage(dim, dit_heads, cond_dim, mlp_ratio, patch, skip=True) for _ in range(fusion)])
        n = len(dims) - 1
        self.ups = nn.ModuleList()
        for i, (cin, cout) in enumerate(reversed(list(zip(dims[:-1], dims[1:])))):
            level = n - 1 - i

            def attn(c: int, level: int = level) -> Optional[nn.Module]:
                return VolumeAttention(c, attn_heads, attn_dim_head) if use_attn[level] else None

            # The last `fusion` levels are at full resolution (they receive the output DiT features).
            double = i < n - fusion
            self.ups.append(UNetLevel(ResnetBlock(2 * cout, cout, groups, cond_dim),
                                      ResnetBlock(2 * cout, cin, groups, cond_dim),
                                      attn(cout), attn(cin), upsample(cin) if double else None))
        self.final_res = ResnetBlock(2 * dim, dim, groups)
        self.out_conv = nn.Conv3d(dim, channels, 1)

    def forward(self, feats: EncoderFeatures, cond: Tensor) -> Tensor:
        """Decoder side: eps for the encoder's features and the condition embedding."""
        n_tok = self.per_sub[0] * self.per_sub[1] * self.per_sub[2]
        tokens = feats.tokens
        for block in cast("list[DiTBlock]", self.intra_mid):
            tokens = block(tokens, cond, n_tok)
        token_skips, fused = list(feats.token_skips), []
        for stage in cast("list[DiTStage]", self.intra_out):
            tokens = stage.block(tokens, cond, n_tok, skip=token_skips.pop())
            fused.append(tokens_to_volume(stage.head(tokens, cond), feats.grid, self.per_sub, self.patch,
                                          _channels_last(feats.h)))

        h, skips = feats.h, list(feats.skips)
        first_fused = len(self.ups) - len(fused)
        for i, level in enumerate(cast("list[UNetLevel]", self.ups)):
            if i >= first_fused:
                h = h + fused[i - first_fused]
            h = level.first(torch.cat((h, skips.pop().to(h.dtype)), dim=1), cond)
            h = level.second(torch.cat((h, skips.pop().to(h.dtype)), dim=1), cond)
            h = level.apply_resample(h)
        h = self.final_res(torch.cat((h, feats.init.to(h.dtype)), dim=1))
        return conv3d(h, self.out_conv)


class BiFlowNet(nn.Module):
    """The 3D MedDiffusion denoiser; predicts the noise eps of a (B, channels, D, H, W) latent."""

    def __init__(self, dim: int = 72, channels: int = 8, num_classes: Optional[int] = 7, patch_size: int = 1,
                 dim_mults: Sequence[int] = (1, 1, 2, 4, 8), use_attn: Sequence[int] = (0, 0, 0, 1, 1),
                 resnet_groups: int = 24, dit_num_heads: int = 8, attn_heads: int = 8, attn_dim_head: int = 32,
                 sub_volume_size: Union[int, Sequence[int]] = 8, num_mid_dit: int = 1, vq_size: int = 64,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        sub = _triple(sub_volume_size, "sub_volume_size")
        if any(s % patch_size for s in sub):
            raise ValueError(f"patch_size {patch_size} must divide sub_volume_size {sub}")
        if len(use_attn) != len(dim_mults):
            raise ValueError("use_attn needs one entry per dim_mults level")
        self.config: Dict[str, Any] = dict(
            dim=dim, channels=channels, num_classes=num_classes, patch_size=patch_size,
            dim_mults=[int(m) for m in dim_mults], use_attn=[int(bool(a)) for a in use_attn],
            resnet_groups=resnet_groups, dit_num_heads=dit_num_heads, attn_heads=attn_heads,
            attn_dim_head=attn_dim_head, sub_volume_size=list(sub), num_mid_dit=num_mid_dit,
            vq_size=vq_size, mlp_ratio=float(mlp_ratio))
        self.channels, self.sub_volume, self.num_classes = channels, sub, num_classes
        dims = [dim] + [dim * m for m in dim_mults]
        # One fusion point per level whose width does not change (the authors' count; 2 for (1,1,2,4,8)).
        fusion = sum(a == b for a, b in zip(dims[:-1], dims[1:]))
        self.condition = ConditionEmbedding(dim, num_classes)
        common: dict[str, Any] = dict(dim=dim, channels=channels, dims=dims, use_attn=self.config["use_attn"],
                                      fusion=fusion, cond_dim=self.condition.out_dim, groups=resnet_groups,
                                      dit_heads=dit_num_heads, attn_heads=attn_heads, attn_dim_head=attn_dim_head,
                                      sub_volume=sub, patch=patch_size, mlp_ratio=mlp_ratio)
        self.encoder = BiFlowEncoder(**common)
        self.decoder = BiFlowDecoder(**common, num_mid_dit=num_mid_dit)
        self.skip_channels: List[int] = [c for c in dims[1:] for _ in range(2)]  # channels of each pushed skip
        self.mid_channels: int = dims[-1]
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "BiFlowNet":
        """Build from our config or the authors' argument names (cond_classes, DiT_num_heads, ...)."""
        aliases = {"cond_classes": "num_classes", "DiT_num_heads": "dit_num_heads", "num_mid_DiT": "num_mid_dit",
                   "use_sparse_linear_attn": "use_attn"}
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        kwargs = {aliases.get(k, k): v for k, v in cfg.items()}
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    def reset_parameters(self) -> None:
        """The authors' init: xavier Linear layers, zeroed adaLN/final DiT layers, frozen sin-cos positions."""
        init_dit_weights(self)
        w = self.encoder.patch_embed.weight
        if not w.is_meta:
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            table = sincos_pos_table_3d(self.config["dim"], self.encoder.per_sub)
            with torch.no_grad():
                self.encoder.pos_embed.copy_(table[None].to(self.encoder.pos_embed.device))

    # ---- inputs ---------------------------------------------------------------------------------------------
    @property
    def latent_multiple(self) -> int:
        """Every latent side must be a multiple of this: whole sub-volumes that survive the U-Net's down-sampling
        (what `check_latent` requires)."""
        return math.lcm(*self.sub_volume, 2 ** self.encoder.n_down)

    def check_latent(self, x: Tensor) -> None:
        """Raise InputError unless x is a (B, channels, D, H, W) latent this network can process."""
        if x.dim() != 5 or x.shape[1] != self.channels:
            raise InputError(f"BiFlowNet expects a latent of shape (B, {self.channels}, D, H, W), "
                             f"got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if any(s % v for s, v in zip(size, self.sub_volume)):
            raise InputError(f"latent size {size} (D, H, W) is not divisible by the sub-volume size "
                             f"{self.sub_volume}; use latent sizes that are multiples of it")
        mult = 2 ** self.encoder.n_down
        if any(s % mult for s in size):
            raise InputError(f"latent size {size} (D, H, W) must be a multiple of {mult} for the U-Net")

    def embed_condition(self, t: Union[Tensor, int, float], y: Union[Tensor, int, None],
                        res: Union[Tensor, Sequence[float]], batch: Optional[int] = None) -> Tensor:
        """(B, 8*dim) condition vector from timesteps t (B,), class indices y (B,), res (B, 3) or (3,).

        Scalars and a single res triple are broadcast to `batch` (default: the length of t).
        """
        dev = self.condition.time_fc1.weight.device
        t = torch.as_tensor(t, device=dev)
        b = batch if batch is not None else (t.shape[0] if t.dim() else 1)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(-1)
        if t.shape[0] != b:
            raise InputError(f"got {t.shape[0]} timesteps for a batch of {b}")
        if self.num_classes:
            if y is None:
                raise InputError("this BiFlowNet is class-conditional: a class index y is required")
            y = torch.as_tensor(y, device=dev, dtype=torch.long).reshape(-1)
            y = y.expand(b) if y.numel() == 1 else y
            if y.shape[0] != b or bool(((y < 0) | (y >= self.num_classes)).any()):
                raise InputError(f"class indices must be {b} values in [0, {self.num_classes}), got {y.tolist()}")
        res = torch.as_tensor(res, device=dev, dtype=torch.float32)
        res = res.reshape(1, 3).expand(b, 3) if res.numel() == 3 else res
        if tuple(res.shape) != (b, 3):
            raise InputError(f"res must be 3 numbers (latent size / 64) per sample, got shape {tuple(res.shape)}")
        return self.condition(t, y, res)

    # ---- the two halves ---------------------------------------------------------------------------------------
    def encode(self, x: Tensor, cond: Tensor, hint: Optional[Tensor] = None) -> EncoderFeatures:
        """Validated encoder pass; `hint` (optional) is added to the init-conv output (ControlNet input)."""
        self.check_latent(x)
        return self.encoder(x, cond, hint)

    def apply_control(self, feats: EncoderFeatures, control: ControlResiduals) -> EncoderFeatures:
        """Add ControlNet residuals to the stored skips (push order) and to the middle block output."""
        if len(control.down) != len(feats.skips):
            raise InputError(f"ControlResiduals.down has {len(control.down)} tensors, expected {len(feats.skips)} "
                             "(one per U-Net skip, in push order)")
        for i, (s, r) in enumerate(zip(feats.skips, control.down)):
            if r.shape != s.shape:
                raise InputError(f"control residual {i} has shape {tuple(r.shape)}, skip is {tuple(s.shape)}")
        if control.mid.shape != feats.h.shape:
            raise InputError(f"control mid residual has shape {tuple(control.mid.shape)}, "
                             f"expected {tuple(feats.h.shape)}")
        skips = [s + r.to(s.dtype) for s, r in zip(feats.skips, control.down)]
        return replace(feats, skips=skips, h=feats.h + control.mid.to(feats.h.dtype))

    def decode(self, feats: EncoderFeatures, cond: Tensor, control: Optional[ControlResiduals] = None) -> Tensor:
        """Decoder pass from `encode`'s features, with optional ControlNet residuals; returns eps (NCDHW)."""
        if control is not None:
            feats = self.apply_control(feats, control)
        return self.decoder(feats, cond).contiguous()  # hand back a plain NCDHW tensor

    def forward(self, x: Tensor, t: Union[Tensor, int], y: Union[Tensor, int, None],
                res: Union[Tensor, Sequence[float]], control: Optional[ControlResiduals] = None) -> Tensor:
        """eps prediction for latent x at timesteps t, class y, resolution condition res = latent size / 64."""
        self.check_latent(x)
        cond = self.embed_condition(t, y, res, batch=x.shape[0])
        eps = self.decode(self.encoder(x, cond), cond, control)
        return eps.to(x.dtype)  # under autocast the last conv gives bf16/fp16; samplers work in x's dtype

    # ---- the authors' checkpoints -------------------------------------------------------------------------
    def load_official_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Load weights saved with the authors' key names; CheckpointError lists every mismatch."""
        mapped, unknown = split_official(sd)
        own = self.state_dict()

        def name(k: str) -> str:  # report the authors' name (what the file holds) and ours
            return f"{ours_to_official_key(k)!r} (here {k!r})"

        problems = [f"unexpected key {k!r}" for k in unknown]
        problems += [f"unexpected key {name(k)}" for k in mapped if k not in own]
        problems += [f"missing key {name(k)}" for k in own if k not in mapped]
        problems += [f"shape of {name(k)}: checkpoint {tuple(v.shape)}, network {tuple(own[k].shape)}"
                     for k, v in mapped.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if problems:
            shown = "\n  ".join(problems[:25])
            if len(problems) > 25:
                shown += f"\n  ... and {len(problems) - 25} more"
            raise CheckpointError(f"the BiFlowNet checkpoint does not match this network configuration "
                                  f"{self.config} ({len(problems)} problems):\n  {shown}")
        self.load_state_dict(mapped, strict=True)

    def official_state_dict(self) -> Dict[str, Tensor]:
        """Our weights under the authors' key names."""
        return biflownet_to_official(self.state_dict())
