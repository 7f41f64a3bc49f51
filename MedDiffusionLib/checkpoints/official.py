"""Load the authors' released checkpoints (3D MedDiffusion) into our networks.

* Autoencoder: a PyTorch Lightning checkpoint; ``hyper_parameters['cfg']`` is the OmegaConf training config
  (``cfg.model.n_hiddens``, ``downsample`` as a per-axis list, ``embedding_dim``, ``n_codes``, ``num_groups``...),
  ``state_dict`` also holds training-only discriminator/LPIPS weights.
* BiFlowNet: a dict ``{model, ema, scaler, opt, args, epoch}``; inference uses the EMA weights, ``args`` is the
  training ``argparse.Namespace`` (``model_dim``, ``volume_channels``, ``dim_mults``, ...).

Files are read with :func:`safe_torch_load` (no pickled code runs). The configuration comes from the saved
training config and is cross-checked against the weight shapes, which win when they disagree: the shapes
describe the weights we are about to load. Values that shapes cannot reveal (GroupNorm groups, DiT heads) come
from the config, the caller's ``overrides``, or the official defaults.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .network_build import build_network
from .torch_file import safe_torch_load

__all__ = [
    "load_official_autoencoder", "load_official_biflownet", "load_official", "detect_official_kind",
    "infer_autoencoder_config", "infer_biflownet_config", "official_kind_of",
]

log = logging.getLogger(__name__)

# Official defaults for what the weight shapes do not show (OFFICIAL.md, "Official configurations").
AE_DEFAULT_GROUPS = 24
BIFLOWNET_DEFAULTS: dict[str, Any] = dict(resnet_groups=24, dit_num_heads=8, attn_heads=8, vq_size=64)

# Names the authors' argparse namespace (or other configs) use for our BiFlowNet arguments.
_BIFLOWNET_ARG_ALIASES: dict[str, str] = {
    "model_dim": "dim", "dim": "dim", "volume_channels": "channels", "channels": "channels",
    "dim_mults": "dim_mults", "use_attn": "use_attn", "use_sparse_linear_attn": "use_attn",
    "patch_size": "patch_size", "num_dit": "num_mid_dit", "num_mid_DiT": "num_mid_dit", "num_mid_dit": "num_mid_dit",
    "num_classes": "num_classes", "cond_classes": "num_classes", "vq_size": "vq_size",
    "resnet_groups": "resnet_groups", "DiT_num_heads": "dit_num_heads", "dit_num_heads": "dit_num_heads",
    "attn_heads": "attn_heads", "attn_dim_head": "attn_dim_head", "sub_volume_size": "sub_volume_size",
    "mlp_ratio": "mlp_ratio",
}


# ------------------------------------------------------------------------------------------------ helpers
def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Drop a prefix that every key carries (DDP's 'module.'); leave other dicts alone."""
    keys = list(sd)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _tensor_dict(obj: Any, what: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"'{path}': {what} is missing or empty")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"'{path}': {what} holds no tensors")
    return _strip_prefix(_strip_prefix(sd, "module."), "_orig_mod.")  # DDP / torch.compile wrappers


def _is_ae_state_dict(sd: Mapping[str, Any]) -> bool:
    return "encoder.conv_first.weight" in sd and any(k.startswith("codebook.") for k in sd)


def _is_biflownet_state_dict(sd: Mapping[str, Any]) -> bool:
    return "init_conv.weight" in sd and any(k.startswith(("downs.", "IntraPatchFlow_")) for k in sd)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_agree(name: str, from_config: Any, from_weights: Any, path: Path) -> None:
    if from_config is not None and from_config != from_weights:
        log.warning("%s: the saved config says %s=%r but the weights have %r; using the weights",
                    path, name, from_config, from_weights)


def official_kind_of(ckpt: Any) -> str | None:
    """'autoencoder' / 'biflownet' for an already loaded checkpoint object, None if unrecognised."""
    if not isinstance(ckpt, Mapping):
        return None
    candidates: list[Any] = [ckpt.get("state_dict"), ckpt.get("ema"), ckpt.get("model"), ckpt]
    for cand in candidates:
        if isinstance(cand, Mapping):
            sd = _strip_prefix(_strip_prefix(cand, "module."), "_orig_mod.")
            if _is_ae_state_dict(sd):
                return "autoencoder"
            if _is_biflownet_state_dict(sd):
                return "biflownet"
    return None


# ------------------------------------------------------------------------------------------- autoencoder
def _ae_model_cfg(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The 'model' section of the Lightning hyper-parameters (or {} if absent)."""
    hp = ckpt.get("hyper_parameters") or {}
    cfg = hp.get("cfg", hp) if isinstance(hp, Mapping) else {}
    if not isinstance(cfg, Mapping):
        return {}
    model = cfg.get("model")
    merged: dict[str, Any] = dict(model) if isinstance(model, Mapping) else dict(cfg)
    dataset = cfg.get("dataset")
    if isinstance(dataset, Mapping) and "image_channels" in dataset:
        merged.setdefault("image_channels", dataset["image_channels"])
    return merged


def _downsample_factor(value: Any, path: Path) -> int | None:
    """The authors store downsample per axis ([8, 8, 8]); only isotropic factors are supported."""
    if isinstance(value, (list, tuple)):
        factors = {_int_or_none(v) for v in value}
        if len(factors) != 1 or None in factors:
            raise CheckpointError(f"'{path}': anisotropic downsample {list(value)} is not supported")
        return factors.pop()
    return _int_or_none(value)


def infer_autoencoder_config(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any] | None = None,
                             path: str | os.PathLike[str] = "<state dict>") -> dict[str, int]:
    """``PatchVolumeAutoencoder`` kwargs from the authors' weights (+ their training config if given)."""
    p = Path(path)
    cfg = cfg or {}
    try:
        conv_first = sd["encoder.conv_first.weight"]
        codebook = sd["codebook.embeddings"]
    except KeyError as exc:
        raise CheckpointError(f"'{p}' is not a Patch-Volume autoencoder checkpoint (no {exc.args[0]})") from None
    n_down = len({m.group(1) for k in sd if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.down\.", k))})
    if n_down == 0:
        raise CheckpointError(f"'{p}': cannot find the encoder down-sampling convolutions")
    conf = dict(n_hiddens=int(conv_first.shape[0]), downsample=2 ** n_down, embedding_dim=int(codebook.shape[1]),
                n_codes=int(codebook.shape[0]), image_channels=int(conv_first.shape[1]))
    _check_agree("n_hiddens", _int_or_none(cfg.get("n_hiddens")), conf["n_hiddens"], p)
    _check_agree("downsample", _downsample_factor(cfg.get("downsample"), p), conf["downsample"], p)
    _check_agree("embedding_dim", _int_or_none(cfg.get("embedding_dim")), conf["embedding_dim"], p)
    _check_agree("n_codes", _int_or_none(cfg.get("n_codes")), conf["n_codes"], p)
    groups = _int_or_none(cfg.get("num_groups")) or AE_DEFAULT_GROUPS
    if conf["n_hiddens"] % groups:
        raise CheckpointError(
            f"'{p}': GroupNorm groups {groups} do not divide the {conf['n_hiddens']} encoder channels; the file "
            "does not say how many groups were used (pass num_groups as an override)")
    conf["num_groups"] = groups
    return conf


def _build_autoencoder(ckpt: Mapping[str, Any], path: Path, map_location: Any,
                       overrides: Mapping[str, Any] | None) -> nn.Module:
    raw = ckpt.get("state_dict", ckpt)
    sd = _tensor_dict(raw, "the autoencoder state_dict", path)
    conf = infer_autoencoder_config(sd, {**_ae_model_cfg(ckpt), **(overrides or {})}, path)
    conf.update({k: v for k, v in (overrides or {}).items() if k in conf})
    return _build_and_load("autoencoder", conf, sd, path, map_location)


def _build_and_load(kind: str, conf: dict[str, Any], sd: Mapping[str, Any], path: Any,
                    map_location: Any) -> nn.Module:
    """Construct the network from its inferred config and load the authors' weights; errors name the file.

    The config is validated and checked on the meta device against the weights the file holds before the
    real network is allocated (:func:`.network_build.build_network`).
    """
    numel = sum(v.numel() for v in sd.values() if isinstance(v, torch.Tensor))
    model = build_network(kind, conf, f"'{path}'", file_numel=numel)
    from ..models.autoencoder import PatchVolumeAutoencoder  # lazy, as in network_build
    from ..models.biflownet import BiFlowNet
    if not isinstance(model, (PatchVolumeAutoencoder, BiFlowNet)):
        raise CheckpointError(f"'{path}': the authors' key names are known only for the autoencoder and BiFlowNet")
    try:
        model.load_official_state_dict(sd)
    except CheckpointError as exc:  # name the file: the network's message does not know it
        raise CheckpointError(f"'{path}': {exc}") from None
    return model.to(map_location).eval()


# --------------------------------------------------------------------------------------------- BiFlowNet
def _levels(sd: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"downs\.(\d+)\.0\.block1\.proj\.weight$", k))})


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def infer_biflownet_config(sd: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None,
                           path: str | os.PathLike[str] = "<state dict>") -> dict[str, Any]:
    """``BiFlowNet`` kwargs from the authors' weights (+ their ``args`` / a config dict, + defaults)."""
    p = Path(path)
    given = {_BIFLOWNET_ARG_ALIASES[k]: v for k, v in (args or {}).items() if k in _BIFLOWNET_ARG_ALIASES}
    try:
        init = sd["init_conv.weight"]
        embed = sd["x_embedder.proj.weight"]
        pos = sd["pos_embed"]
    except KeyError as exc:
        raise CheckpointError(f"'{p}' is not a BiFlowNet checkpoint (no {exc.args[0]})") from None
    dim, channels, patch = int(init.shape[0]), int(init.shape[1]), int(embed.shape[-1])
    levels = _levels(sd)
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"'{p}': cannot find the U-Net levels (downs.N.0.block1) in the weights")
    dim_mults = [int(sd[f"downs.{i}.0.block1.proj.weight"].shape[0]) // dim for i in levels]
    use_attn = [int(f"downs.{i}.1.fn.fn.to_qkv.weight" in sd) for i in levels]
    conf: dict[str, Any] = dict(dim=dim, channels=channels, patch_size=patch, dim_mults=dim_mults, use_attn=use_attn)
    for name in ("dim", "channels", "patch_size"):
        _check_agree(name, _int_or_none(given.get(name)), conf[name], p)
    for name in ("dim_mults", "use_attn"):
        if given.get(name) is not None:
            _check_agree(name, [int(v) for v in given[name]], conf[name], p)
    conf["num_classes"] = int(sd["cond_emb.weight"].shape[0]) if "cond_emb.weight" in sd else None
    _check_agree("num_classes", _int_or_none(given.get("num_classes")), conf["num_classes"], p)
    conf["num_mid_dit"] = _count(sd, r"IntraPatchFlow_mid\.(\d+)\.attn\.qkv\.weight")
    _check_agree("num_mid_dit", _int_or_none(given.get("num_mid_dit")), conf["num_mid_dit"], p)
    fc1 = sd.get("IntraPatchFlow_input.0.0.mlp.fc1.weight")
    conf["mlp_ratio"] = float(fc1.shape[0]) / dim if fc1 is not None else float(given.get("mlp_ratio", 4.0))

    # Sub-volume: the position table has (sub/patch)^3 rows for a cubic sub-volume.
    tokens = int(pos.shape[1])
    side = round(tokens ** (1.0 / 3.0))
    if side ** 3 == tokens:
        conf["sub_volume_size"] = side * patch
    elif given.get("sub_volume_size") is not None:
        conf["sub_volume_size"] = given["sub_volume_size"]
    else:
        raise CheckpointError(f"'{p}': the position table has {tokens} entries, not a cube; pass sub_volume_size")

    # Attention width: heads * dim_head is in the weights, the split is not (official 8 x 32).
    qkv = next((v for k, v in sd.items() if k.endswith("fn.fn.to_qkv.weight")), None)
    heads = _int_or_none(given.get("attn_heads")) or BIFLOWNET_DEFAULTS["attn_heads"]
    if qkv is not None:
        inner = int(qkv.shape[0]) // 3
        if inner % heads:
            raise CheckpointError(f"'{p}': attention width {inner} is not divisible by {heads} heads; "
                                  "pass attn_heads as an override")
        conf["attn_heads"], conf["attn_dim_head"] = heads, inner // heads
    else:
        conf["attn_heads"] = heads
        conf["attn_dim_head"] = _int_or_none(given.get("attn_dim_head")) or 32

    # Not visible in the weights: config / override, else the official values; validated so that a wrong
    # guess fails here with a clear message instead of as a shape error deep inside the network.
    conf["resnet_groups"] = _int_or_none(given.get("resnet_groups")) or BIFLOWNET_DEFAULTS["resnet_groups"]
    conf["dit_num_heads"] = _int_or_none(given.get("dit_num_heads")) or BIFLOWNET_DEFAULTS["dit_num_heads"]
    conf["vq_size"] = _int_or_none(given.get("vq_size")) or BIFLOWNET_DEFAULTS["vq_size"]
    widths = {int(v.shape[0]) for k, v in sd.items() if k.endswith("norm.weight") and v.dim() == 1
              and k.startswith(("downs.", "ups.", "mid_block", "final_conv."))}
    bad = sorted(w for w in widths if w % conf["resnet_groups"])
    if bad:
        raise CheckpointError(
            f"'{p}': {conf['resnet_groups']} GroupNorm groups do not divide the channel widths {bad}; this "
            "file does not record the group count, pass resnet_groups as an override (e.g. in the bundle's "
            "denoiser options)")
    if dim % conf["dit_num_heads"]:
        raise CheckpointError(
            f"'{p}': {conf['dit_num_heads']} DiT heads do not divide dim {dim}; this file does not record the "
            "head count, pass dit_num_heads as an override")
    return conf


def _biflownet_weights(ckpt: Mapping[str, Any], path: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    if "ema" in ckpt or "model" in ckpt:
        key = "ema" if use_ema and ckpt.get("ema") else "model"
        if use_ema and key != "ema":
            log.warning("%s has no EMA weights; using the training weights ('model')", path)
        return _tensor_dict(ckpt[key], f"the '{key}' weights", path)
    return _tensor_dict(ckpt.get("state_dict", ckpt), "the BiFlowNet state_dict", path)


def _biflownet_args(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for key in ("config", "args"):  # our plain fixtures keep a 'config' dict, the authors an argparse Namespace
        if isinstance(ckpt.get(key), Mapping):
            args.update(ckpt[key])
    return args


def _build_biflownet(ckpt: Mapping[str, Any], path: Path, map_location: Any, overrides: Mapping[str, Any] | None,
                     use_ema: bool) -> nn.Module:
    sd = _biflownet_weights(ckpt, path, use_ema)
    conf = infer_biflownet_config(sd, {**_biflownet_args(ckpt), **(overrides or {})}, path)
    return _build_and_load("biflownet", conf, sd, path, map_location)


# ------------------------------------------------------------------------------------------------ public
def _load(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    p = Path(path).expanduser()
    return p, safe_torch_load(p, map_location="cpu")


def detect_official_kind(path: str | os.PathLike[str]) -> str:
    """'autoencoder' or 'biflownet' for an authors' checkpoint file; CheckpointError otherwise."""
    p, ckpt = _load(path)
    kind = official_kind_of(ckpt)
    if kind is None:
        raise CheckpointError(f"'{p}' is neither a 3D MedDiffusion autoencoder nor a BiFlowNet checkpoint")
    return kind


def load_official(path: str | os.PathLike[str], map_location: Any = "cpu",
                  overrides: Mapping[str, Any] | None = None, use_ema: bool = True) -> tuple[str, nn.Module]:
    """Read the file once, detect its kind, and build the network: (kind, model in eval mode).

    Args:
        path: an authors' autoencoder or BiFlowNet checkpoint.
        map_location: device the weights are loaded to ('cpu', 'cuda', a torch.device).
        overrides: config values the file does not record.
        use_ema: BiFlowNet only: the EMA weights (False: the training weights).

    Returns:
        ('autoencoder' or 'biflownet', the network in eval mode).

    Raises:
        CheckpointError: a file that is missing, unreadable, unsafe, or neither kind.
    """
    p, ckpt = _load(path)
    kind = official_kind_of(ckpt)
    if kind == "autoencoder":
        return kind, _build_autoencoder(ckpt, p, map_location, overrides)
    if kind == "biflownet":
        return kind, _build_biflownet(ckpt, p, map_location, overrides, use_ema)
    raise CheckpointError(f"'{p}' is neither a 3D MedDiffusion autoencoder nor a BiFlowNet checkpoint")


def load_official_autoencoder(path: str | os.PathLike[str], map_location: Any = "cpu",
                              overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """The authors' Patch-Volume autoencoder (Lightning ``.ckpt``) as a ``PatchVolumeAutoencoder``.

    Args:
        path: the checkpoint (read by the allow-listing unpickler; nothing in it is executed).
        map_location: device the weights are loaded to ('cpu', 'cuda', a torch.device).
        overrides: config values the file does not record (e.g. num_groups).

    Raises:
        CheckpointError: a file that is missing, unreadable, unsafe, or not an autoencoder checkpoint.
    """
    p, ckpt = _load(path)
    if official_kind_of(ckpt) != "autoencoder":
        raise CheckpointError(f"'{p}' is not a Patch-Volume autoencoder checkpoint")
    return _build_autoencoder(ckpt, p, map_location, overrides)


def load_official_biflownet(path: str | os.PathLike[str], map_location: Any = "cpu",
                            overrides: Mapping[str, Any] | None = None, use_ema: bool = True) -> nn.Module:
    """The authors' BiFlowNet file as a ``BiFlowNet`` with the EMA weights (``use_ema=False``: training weights).

    ``overrides`` sets what the file may not record (``resnet_groups``, ``dit_num_heads``, ``attn_heads``).

    Raises:
        CheckpointError: a file that is missing, unreadable, unsafe, or not a BiFlowNet checkpoint.
    """
    p, ckpt = _load(path)
    if official_kind_of(ckpt) != "biflownet":
        raise CheckpointError(f"'{p}' is not a BiFlowNet checkpoint")
    return _build_biflownet(ckpt, p, map_location, overrides, use_ema)
