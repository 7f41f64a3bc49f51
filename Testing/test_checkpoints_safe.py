"""safe_torch_load: rebuilds tensors and configuration objects, never runs code stored in a checkpoint."""
from __future__ import annotations

import argparse
import builtins
import collections
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from MedDiffusionLib.checkpoints.safe_pickle import OmegaDictConfig
from MedDiffusionLib.checkpoints.torch_file import safe_torch_load
from MedDiffusionLib.errors import CheckpointError


class _Payload:
    """Unpickling this object calls ``func(*args)``: the classic malicious-checkpoint trick."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    cmd = f"touch {marker}"
    return {
        "os.system": _Payload(os.system, cmd),
        "builtins.eval": _Payload(builtins.eval, f"__import__('os').system('{cmd}')"),
        "builtins.exec": _Payload(builtins.exec, f"import os; os.system('{cmd}')"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
        # getattr is the usual gadget for reaching os.system through an allowed object.
        "builtins.getattr": _Payload(builtins.getattr, str(marker), "upper"),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "builtins.getattr"])
def test_malicious_checkpoint_is_refused(tmp_path: Path, name: str, legacy: bool) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(3), "x": _payloads(marker)[name]}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    msg = str(info.value)
    assert "evil.pt" in msg and "could run code" in msg
    assert name in msg
    assert not marker.exists()


def test_nested_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "nested.ckpt"
    ckpt = {"state_dict": collections.OrderedDict(w=torch.ones(2)),
            "hyper_parameters": {"cfg": [1, {"deep": (2, _payloads(marker)["os.system"])}]}}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="os.system"):
        safe_torch_load(path)
    assert not marker.exists()


def test_plain_objects_round_trip(tmp_path: Path) -> None:
    sd = collections.OrderedDict(a=torch.randn(2, 3), b=torch.arange(4, dtype=torch.int64))
    dd = collections.defaultdict(list, {"k": [1, 2]})
    obj = {"state_dict": sd, "list": [1, 2.5, "s", None, True], "tuple": (1, (2, 3)), "set": {1, 2},
           "bytes": b"\x00\x01", "complex": 1 + 2j, "dd": dd, "param": torch.nn.Parameter(torch.ones(2)),
           "half": torch.ones(2, dtype=torch.float16), "args": argparse.Namespace(lr=1e-4, dims=[1, 2]),
           "np_scalar": np.float32(1.5), "np_array": np.arange(6, dtype=np.int16).reshape(2, 3),
           "size": torch.Size([2, 3]), "dtype": torch.bfloat16}
    for legacy in (False, True):
        path = tmp_path / f"ok_{legacy}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        out = safe_torch_load(path)
        assert isinstance(out["state_dict"], collections.OrderedDict)
        assert torch.equal(out["state_dict"]["a"], sd["a"]) and torch.equal(out["state_dict"]["b"], sd["b"])
        assert out["list"] == obj["list"] and out["tuple"] == obj["tuple"] and out["set"] == {1, 2}
        assert out["bytes"] == b"\x00\x01" and out["complex"] == 1 + 2j
        assert out["dd"] == {"k": [1, 2]} and type(out["dd"]) is dict
        assert out["args"] == {"lr": 1e-4, "dims": [1, 2]}  # argparse.Namespace -> plain dict
        assert out["np_scalar"] == np.float32(1.5)
        np.testing.assert_array_equal(out["np_array"], obj["np_array"])
        assert out["half"].dtype == torch.float16 and out["dtype"] is torch.bfloat16
        assert out["size"] == torch.Size([2, 3]) and torch.equal(out["param"], torch.ones(2))


def test_omegaconf_lightning_fixture(reference_dir: Path) -> None:
    already = "omegaconf" in sys.modules
    path = reference_dir / "fixtures" / "ae_tiny_official_format.ckpt"
    ckpt = safe_torch_load(path)
    cfg = ckpt["hyper_parameters"]["cfg"]
    assert type(cfg) is dict and type(cfg["model"]) is dict
    assert cfg["model"]["n_hiddens"] == 8 and cfg["model"]["downsample"] == [4, 4, 4]
    assert cfg["model"]["num_groups"] == 4 and cfg["dataset"]["image_channels"] == 1
    assert any(k.startswith("volume_discriminator.") for k in ckpt["state_dict"])
    assert isinstance(ckpt["state_dict"]["codebook.embeddings"], torch.Tensor)
    if not already:
        assert "omegaconf" not in sys.modules  # stand-ins only: the library is never imported
    raw = safe_torch_load(path, plain=False)
    assert isinstance(raw["hyper_parameters"]["cfg"], OmegaDictConfig)


def test_argparse_fixture(reference_dir: Path) -> None:
    ckpt = safe_torch_load(reference_dir / "fixtures" / "biflownet_tiny_official_format.pt")
    assert set(ckpt) >= {"model", "ema", "args", "epoch"}
    assert type(ckpt["args"]) is dict and ckpt["args"]["model_dim"] == 6


def test_missing_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        safe_torch_load(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        safe_torch_load(tmp_path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        safe_torch_load(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        safe_torch_load(junk)


def test_truncated_zip_checkpoint(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        safe_torch_load(bad)


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    # torch.load would hand such a zip to torch.jit.load, which runs the archive's code.
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("scripted/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("scripted/constants.pkl", b"\x80\x02).")
        zf.writestr("scripted/code/__torch__.py", "def forward(self): pass\n")
    with pytest.raises(CheckpointError, match="TorchScript"):
        safe_torch_load(path)


def test_protocol_4_payload_is_refused(tmp_path: Path) -> None:
    # Protocol 4 names globals with STACK_GLOBAL instead of GLOBAL: same allow-list.
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil4.pt"
    torch.save([_payloads(marker)["os.system"]], path, pickle_protocol=4)
    with pytest.raises(CheckpointError, match="os.system"):
        safe_torch_load(path)
    assert not marker.exists()


@pytest.mark.parametrize("target", [b"ctorch.storage\nTypedStorage\n", b"ctyping\nAny\n"])
def test_build_on_shared_objects_is_refused(target: bytes) -> None:
    # Protocol-0 pickle: push an allowed class / shared object, then BUILD (None, {'pwned': 1}) on it,
    # which a plain unpickler turns into setattr(target, 'pwned', 1) for the whole process.
    from MedDiffusionLib.checkpoints.safe_pickle import UnsafePickleError, safe_pickle_module

    data = target + b"(N(dS'pwned'\nI1\nstb."
    with pytest.raises(UnsafePickleError, match="modify"):
        safe_pickle_module.loads(data)
    assert not hasattr(torch.storage.TypedStorage, "pwned")
