"""Hostile checkpoint archives: TorchScript, zip polyglots and inconsistent directories never run code.

The archives here carry a live TorchScript payload: ``__setstate__`` writes a marker file when torch.jit.load
(or torch.load, which dispatches to it) reads the archive. Each test first shows that torch's own reader sees
the payload, then that every project entry point refuses the file and the marker never appears.
"""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Tuple

import pytest
import torch
import yaml
from helpers import make_tiny_bundle

from MedDiffusionLib.checkpoints import load_bundle, safe_torch_load
from MedDiffusionLib.cli import main
from MedDiffusionLib.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, still loads


class _Payload(torch.nn.Module):
    """Scripted module whose __setstate__ (run by torch.jit.load) writes 8 bytes to ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.path = path
        self.sink = torch.zeros(8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.w.data, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        sink = torch.from_file(state[1], shared=True, size=8, dtype=torch.uint8)
        sink.fill_(65)  # 'AAAAAAAA' written through the shared mapping
        self.sink = sink
        self.path = state[1]
        self.w = state[0]
        self.training = state[2]


@pytest.fixture(scope="module")
def script_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    """A real torch.jit.save archive and the marker path its code writes."""
    folder = tmp_path_factory.mktemp("ts")
    marker = folder / "MARKER"
    path = folder / "payload.pt"
    torch.jit.save(torch.jit.script(_Payload(str(marker))), str(path))
    return path.read_bytes(), marker


def _eocd(data: bytes) -> tuple:
    return struct.unpack("<4sHHHHIIH", data[-22:])


def _checkpoint_bytes(obj: object = None, prefix: str = "ts") -> bytes:
    """A plain torch.save archive whose records sit under ``prefix/`` (same folder as the script archive)."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)} if obj is None else obj, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            zf.writestr(f"{prefix}/" + info.filename.split("/", 1)[1], src.read(info))
    return out.getvalue()


def _two_directories(script: bytes) -> bytes:
    """The polyglot of issue 11: the script archive, then a harmless one whose end record points (by absolute
    offset) at the script's directory. zipfile reads the harmless directory, torch's miniz the script's."""
    _, _, _, n_total, _, _, script_cd_off, _ = _eocd(script)
    harmless = zipfile.ZipFile(io.BytesIO(_checkpoint_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in harmless.infolist():
            zf.writestr(info.filename, harmless.read(info))
        pad = 0
        while len(zf.infolist()) < n_total:  # same entry count as the script's directory
            zf.writestr(f"ts/pad{pad}", b"")
            pad += 1
        zf.infolist()[0].comment = b"x" * 256  # directory at least as long as the script's
    h = out.getvalue()
    sig, _, _, n, n2, cd_size, _, _ = _eocd(h)
    return script + h[:-22] + struct.pack("<4sHHHHIIH", sig, 0, 0, n, n2, cd_size, script_cd_off, 0)


def _refused(path: Path, marker: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    assert not marker.exists(), "code from the archive ran"
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg
    return msg


def test_real_torchscript_archive_is_refused(tmp_path: Path, script_bytes: tuple[bytes, Path]) -> None:
    data, marker = script_bytes
    path = tmp_path / "scripted.pt"
    path.write_bytes(data)
    assert "TorchScript" in _refused(path, marker)
    # The payload is live: torch's own loader runs it (this is what the checks prevent).
    torch.jit.load(str(path))
    assert marker.read_bytes() == b"A" * 8
    marker.unlink()


def test_two_central_directories(tmp_path: Path, script_bytes: tuple[bytes, Path]) -> None:
    data, marker = script_bytes
    path = tmp_path / "polyglot.pt"
    path.write_bytes(_two_directories(data))
    # The readers disagree: Python sees a plain checkpoint, torch (miniz) sees the TorchScript records.
    assert not any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())
    assert "constants.pkl" in torch._C.PyTorchFileReader(str(path)).get_all_records()
    assert "directory" in _refused(path, marker)


@pytest.mark.parametrize("layout", ["script+plain", "plain+script", "plain+junk", "junk+plain"])
def test_appended_or_prepended_archives(tmp_path: Path, script_bytes: tuple[bytes, Path], layout: str) -> None:
    data, marker = script_bytes
    plain = _checkpoint_bytes()
    parts = {"script+plain": data + plain, "plain+script": plain + data,
             "plain+junk": plain + b"\0" * 100, "junk+plain": b"PK\x03\x04" + b"\0" * 60 + plain}
    path = tmp_path / "appended.pt"
    path.write_bytes(parts[layout])
    _refused(path, marker)


def test_zip_after_a_legacy_pickle(tmp_path: Path, script_bytes: tuple[bytes, Path]) -> None:
    # A pickle-format checkpoint with an archive behind it: zip readers that search from the end find it.
    data, marker = script_bytes
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    path = tmp_path / "legacy_plus_zip.pt"
    path.write_bytes(legacy.getvalue() + data)
    assert zipfile.is_zipfile(path)
    assert "appended" in _refused(path, marker)


def _mutations() -> dict[str, object]:
    def dup(d: bytes) -> bytes:  # two records with the same name
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zf:
            src = zipfile.ZipFile(io.BytesIO(d))
            for info in src.infolist():
                zf.writestr(info.filename, src.read(info))
            with pytest.warns(UserWarning):
                zf.writestr(src.infolist()[0].filename, b"\x80\x02}q\x00.")
        return out.getvalue()

    def flip_crc(d: bytes) -> bytes:
        i = d.index(b"PK\x01\x02")
        return d[:i + 16] + bytes([d[i + 16] ^ 1]) + d[i + 17:]

    def rename_local(d: bytes) -> bytes:  # local header names another file than the directory
        return d[:30] + b"X" + d[31:]

    def comment(d: bytes) -> bytes:  # a comment can hide a second end record
        return d[:-2] + struct.pack("<H", 22) + _eocd_bytes(d)

    def gap(d: bytes) -> bytes:  # hidden bytes between the last record and the directory
        sig, a, b, n, n2, size, off, c = _eocd(d)
        return d[:off] + b"hidden" + d[off:-22] + struct.pack("<4sHHHHIIH", sig, a, b, n, n2, size, off + 6, c)

    def deflated(d: bytes) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            src = zipfile.ZipFile(io.BytesIO(d))
            for info in src.infolist():
                zf.writestr(info.filename, src.read(info))
        return out.getvalue()

    return {"duplicate": dup, "crc": flip_crc, "local-name": rename_local, "comment": comment, "gap": gap,
            "compressed": deflated}


def _eocd_bytes(d: bytes) -> bytes:
    return d[-22:]


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_inconsistent_directories(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.pt"
    path.write_bytes(_mutations()[name](_checkpoint_bytes()))
    _refused(path, tmp_path / "no-marker")


def test_python_and_torch_written_archives_load(tmp_path: Path) -> None:
    torch_written = tmp_path / "torch.pt"
    torch.save({"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}, torch_written)
    python_written = tmp_path / "python.pt"  # no data descriptors, sizes in the local headers
    python_written.write_bytes(_checkpoint_bytes({"a": torch.arange(6.0).view(2, 3)}))
    zip64 = tmp_path / "zip64.pt"  # zip64 extra fields in the local headers (as for records over 4 GiB)
    src = zipfile.ZipFile(python_written)
    with zipfile.ZipFile(zip64, "w") as zf:
        for info in src.infolist():
            with zf.open(info.filename, "w", force_zip64=True) as fh:
                fh.write(src.read(info))
    assert b"\x01\x00\x10\x00" in zip64.read_bytes()  # the zip64 extra block is there
    for path in (torch_written, python_written, zip64):
        out = safe_torch_load(path)
        assert torch.equal(out["a"], torch.arange(6.0).view(2, 3))


def test_torch_never_opens_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_dir: Path) -> None:
    # What is validated is what is used: the file is read once and torch's loaders are never involved.
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch opened the checkpoint itself")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch._C, "PyTorchFileReader", forbidden)
    ckpt = safe_torch_load(reference_dir / "fixtures" / "biflownet_tiny_official_format.pt")
    assert isinstance(ckpt["ema"], dict) and ckpt["args"]["model_dim"] == 6


def test_cli_entry_points_refuse_the_polyglot(tmp_path: Path, script_bytes: tuple[bytes, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data, marker = script_bytes
    evil = tmp_path / "evil.pt"
    evil.write_bytes(_two_directories(data))
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(evil), str(out)]) != 0
    assert not out.exists()
    folder = make_tiny_bundle(tmp_path / "bundle")
    manifest = yaml.safe_load((folder / "model.yaml").read_text())
    gen = ["generate", "--anatomy", "ct-legs", "--out", str(tmp_path / "out.nrrd"), "--quiet"]
    runs = [gen + ["--autoencoder", str(evil), "--denoiser", str(evil)]]
    for key in ("autoencoder", "denoiser"):
        bad = tmp_path / f"bad-{key}"
        bad.mkdir()
        for f in folder.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        (bad / "evil.pt").write_bytes(evil.read_bytes())
        (bad / "model.yaml").write_text(yaml.safe_dump({**manifest, key: "evil.pt"}))
        runs.append(gen + ["--model", str(bad)])
        with pytest.raises(CheckpointError):
            load_bundle(bad)
    for argv in runs:
        capsys.readouterr()
        assert main(argv) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "evil.pt" in err
    assert not marker.exists() and not (tmp_path / "out.nrrd").exists()
