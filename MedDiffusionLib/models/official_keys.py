"""The one place that maps the authors' BiFlowNet state-dict names to ours and back.

A key is <module prefix>.<sub-path>.<param>: the prefix table says where a module lives (and what kind of
module it is), the per-kind table renames the sub-path inside it. Both directions use the same tables, so
the mapping is a bijection by construction (tested on the full official manifest).
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Pattern, Tuple

from torch import Tensor

from ..errors import CheckpointError

# (official prefix, our prefix, kind); "{i}" is an integer index kept as is.
_PREFIXES: List[Tuple[str, str, str]] = [
    ("pos_embed", "encoder.pos_embed", "param"),
    ("time_mlp.1", "condition.time_fc1", "plain"),
    ("time_mlp.3", "condition.time_fc2", "plain"),
    ("cond_emb", "condition.class_emb", "plain"),
    ("res_mlp.0", "condition.res_fc1", "plain"),
    ("res_mlp.2", "condition.res_fc2", "plain"),
    ("init_conv", "encoder.init_conv", "plain"),
    ("x_embedder.proj", "encoder.patch_embed", "plain"),
    ("IntraPatchFlow_input.{i}.0", "encoder.intra_in.{i}.block", "dit"),
    ("IntraPatchFlow_input.{i}.1", "encoder.intra_in.{i}.head", "final"),
    ("downs.{i}.0", "encoder.downs.{i}.res1", "resnet"),
    ("downs.{i}.1", "encoder.downs.{i}.attn1", "attn"),
    ("downs.{i}.2", "encoder.downs.{i}.res2", "resnet"),
    ("downs.{i}.3", "encoder.downs.{i}.attn2", "attn"),
    ("downs.{i}.4", "encoder.downs.{i}.resample", "plain"),
    ("mid_block1", "encoder.mid_res1", "resnet"),
    ("mid_spatial_attn", "encoder.mid_attn", "attn"),
    ("mid_block2", "encoder.mid_res2", "resnet"),
    ("IntraPatchFlow_mid.{i}", "decoder.intra_mid.{i}", "dit"),
    ("IntraPatchFlow_output.{i}.0", "decoder.intra_out.{i}.block", "dit"),
    ("IntraPatchFlow_output.{i}.1", "decoder.intra_out.{i}.head", "final"),
    ("ups.{i}.0", "decoder.ups.{i}.res1", "resnet"),
    ("ups.{i}.1", "decoder.ups.{i}.attn1", "attn"),
    ("ups.{i}.2", "decoder.ups.{i}.res2", "resnet"),
    ("ups.{i}.3", "decoder.ups.{i}.attn2", "attn"),
    ("ups.{i}.4", "decoder.ups.{i}.resample", "plain"),
    ("final_conv.0", "decoder.final_res", "resnet"),
    ("final_conv.1", "decoder.out_conv", "plain"),
]

# Sub-paths inside each kind of module: official -> ours ("" = the parameters sit on the module itself).
_SUBPATHS: Dict[str, Dict[str, str]] = {
    "plain": {"": ""},
    "resnet": {"mlp.1": "cond_proj", "block1.proj": "conv1", "block1.norm": "norm1", "block2.proj": "conv2",
               "block2.norm": "norm2", "res_conv": "skip_conv"},
    "attn": {"fn.norm": "norm", "fn.fn.to_qkv": "to_qkv", "fn.fn.to_out": "to_out"},
    "dit": {"attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
            "adaLN_modulation.1": "modulation", "skip_linear": "skip_proj"},
    "final": {"linear": "proj", "adaLN_modulation.1": "modulation"},
}


def _compile(prefix: str) -> Pattern[str]:
    return re.compile("^" + re.escape(prefix).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?:\.(?P<rest>.+))?$")


_FORWARD = [(_compile(o), u, kind) for o, u, kind in _PREFIXES]
_BACKWARD = [(_compile(u), o, kind) for o, u, kind in _PREFIXES]


def _translate(key: str, table: List[Tuple[Pattern[str], str, str]], to_ours: bool) -> Optional[str]:
    for pattern, target, kind in table:
        m = pattern.match(key)
        if m is None:
            continue
        head = target.replace("{i}", m.groupdict().get("i") or "")
        rest = m.group("rest")
        if kind == "param":
            return head if rest is None else None
        if rest is None:
            return None
        sub, _, param = rest.rpartition(".")
        subs = _SUBPATHS[kind] if to_ours else {v: k for k, v in _SUBPATHS[kind].items()}
        if sub not in subs:
            return None
        return ".".join(p for p in (head, subs[sub], param) if p)
    return None


def official_to_ours_key(key: str) -> Optional[str]:
    """Our name for an official BiFlowNet key, or None if the key is not part of the network."""
    return _translate(key, _FORWARD, to_ours=True)


def ours_to_official_key(key: str) -> Optional[str]:
    """The authors' name for one of our BiFlowNet keys, or None if unknown."""
    return _translate(key, _BACKWARD, to_ours=False)


def _strip_ddp_prefix(sd: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    # Weights saved from a DistributedDataParallel wrapper carry "module." on every key.
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def split_official(sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """(our-named state dict, official keys that are not BiFlowNet weights)."""
    mapped: Dict[str, Tensor] = {}
    unknown: List[str] = []
    for k, v in _strip_ddp_prefix(sd).items():
        ours = official_to_ours_key(k)
        if ours is None:
            unknown.append(k)
        else:
            mapped[ours] = v
    return mapped, unknown


def biflownet_from_official(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Rename an official BiFlowNet state dict to our names; CheckpointError names any unknown keys."""
    mapped, unknown = split_official(sd)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not BiFlowNet weights: {unknown[:20]}")
    return mapped


def biflownet_to_official(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Rename our BiFlowNet state dict to the authors' names (e.g. to compare with their checkpoints)."""
    out: Dict[str, Tensor] = {}
    unknown: List[str] = []
    for k, v in sd.items():
        official = ours_to_official_key(k)
        if official is None:
            unknown.append(k)
        else:
            out[official] = v
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys are not BiFlowNet weights: {unknown[:20]}")
    return out
