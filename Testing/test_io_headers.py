"""Headers of untrusted volume files (MedDiffusionLib.io.headers): every NRRD line-ending convention, every
spelling of a detached data file, declared sizes against the data present, bounded gzip counting."""
from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffusionLib.io.headers import (NRRD_HEADER_CAP, HeaderError, canonical_nrrd, gzip_length, parse_nifti_header,
                                        parse_nrrd_header)

BASE = [b"NRRD0004", b"type: float", b"dimension: 3", b"sizes: 2 2 2", b"endian: little", b"encoding: raw"]


def header(lines: list[bytes], eol: bytes = b"\n") -> bytes:
    return eol.join(lines) + eol + eol


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_parses_and_finds_the_data(eol):
    data = bytes(range(32))
    h = parse_nrrd_header(header(BASE, eol) + data)
    assert h.sizes == (2, 2, 2) and h.data_bytes == 32 and h.encoding == "raw"
    assert (header(BASE, eol) + data)[h.data_offset:] == data
    assert canonical_nrrd(h).endswith(b"encoding: raw\n\n") and b"\r" not in canonical_nrrd(h)


DETACHED = [b"data file: /etc/passwd", b"datafile: /etc/passwd", b"DATA FILE: /etc/passwd", b"Data  File: x",
            b"  data file: x", b"data file:/etc/passwd", b"data\tfile: x", b"data file: LIST",
            b"data file: slice%03d.raw 0 9 1", b"DataFile:= /etc/passwd", b"data file:= x"]


@pytest.mark.parametrize("line", DETACHED)
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_detached_data_is_refused_in_any_spelling(line, eol):
    with pytest.raises(HeaderError, match="detached data file"):
        parse_nrrd_header(header(BASE[:-1] + [line, BASE[-1]], eol))


def test_cr_only_header_that_the_old_check_let_through():
    # The old check split on '\n' only: with CR line ends the whole header was one line starting 'NRRD0004'.
    attack = header(BASE[:-1] + [b"data file: /etc/passwd", BASE[-1]], b"\r")
    assert b"\n" not in attack
    with pytest.raises(HeaderError, match="detached"):
        parse_nrrd_header(attack)


def test_header_longer_than_the_cap_is_refused():
    padding = [b"# " + b"x" * 70] * (NRRD_HEADER_CAP // 72 + 10)
    long_header = header(BASE[:1] + padding + [b"data file: /etc/passwd"] + BASE[1:])
    assert len(long_header) > NRRD_HEADER_CAP
    with pytest.raises(HeaderError, match="blank line within"):
        parse_nrrd_header(long_header)
    with pytest.raises(HeaderError, match="blank line within"):
        parse_nrrd_header(b"\n".join(BASE) + b"\n")  # never terminated


@pytest.mark.parametrize("line, message", [
    (b"encoding: ascii", "encoding"), (b"encoding: bzip2", "encoding"), (b"byte skip: -1", "not supported"),
    (b"line skip: 3", "not supported"), (b"frobnicate: 1", "unknown NRRD header field"),
    (b"sizes: 2 2", "do not match"), (b"type: block", "sample type"), (b"no colon here", "malformed"),
])
def test_other_refusals(line, message):
    key = line.split(b":")[0].replace(b" ", b"")
    lines = [x for x in BASE if x.split(b":")[0].replace(b" ", b"") != key] + [line]
    with pytest.raises(HeaderError, match=message):
        parse_nrrd_header(header(lines))


def test_key_values_comments_and_cosmetic_fields_are_dropped():
    lines = BASE + [b"# a comment", b"ITK_InputFilterName:=NrrdImageIO", b"content: x", b"byte skip: 0",
                    b"space origin: (1,2,3)"]
    h = parse_nrrd_header(header(lines))
    text = canonical_nrrd(h).decode()
    assert "space origin: (1,2,3)" in text and "ITK" not in text and "content" not in text and "#" not in text


def test_voxel_cap_is_checked_from_the_header():
    big = [b"sizes: 512 512 512" if x.startswith(b"sizes") else x for x in BASE]
    with pytest.raises(HeaderError, match="declares 134217728 voxels"):
        parse_nrrd_header(header(big), max_voxels=256**3)


def test_canonical_copy_reads_like_the_original(tmp_path: Path):
    img = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32))
    img.SetSpacing((0.5, 0.7, 2.0))
    img.SetOrigin((10.0, -3.0, 4.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    for compress in (False, True):
        src = tmp_path / f"in{compress}.nrrd"
        sitk.WriteImage(img, str(src), useCompression=compress)
        raw = src.read_bytes()
        h = parse_nrrd_header(raw)
        dest = tmp_path / f"out{compress}.nrrd"
        dest.write_bytes(canonical_nrrd(h) + raw[h.data_offset:])
        out = sitk.ReadImage(str(dest))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img))
        assert out.GetSpacing() == img.GetSpacing() and out.GetOrigin() == img.GetOrigin()
        assert out.GetDirection() == img.GetDirection()


def test_gzip_length_is_bounded_and_exact():
    data = bytes(5 * 2**20) + b"end"
    gz = gzip.compress(data)
    assert gzip_length(io.BytesIO(gz), len(data)) == len(data)
    # A bomb: counting stops just past the limit, never decompressing the rest.
    bomb = gzip.compress(bytes(200 * 2**20), 9)
    assert len(bomb) < 300_000
    assert 1000 < gzip_length(io.BytesIO(bomb), 1000) <= 1000 + 2**20
    two_members = gzip.compress(b"a" * 10) + gzip.compress(b"b" * 7)
    assert gzip_length(io.BytesIO(two_members), 100) == 17
    with pytest.raises(HeaderError, match="truncated"):
        gzip_length(io.BytesIO(gz[: len(gz) // 2]), len(data))
    with pytest.raises(HeaderError, match="corrupt"):
        gzip_length(io.BytesIO(gz[:20] + bytes(200)), len(data))
    with pytest.raises(HeaderError, match="corrupt|truncated"):
        gzip_length(io.BytesIO(zlib.compress(data)), len(data))  # zlib, not gzip


def test_nifti_headers(tmp_path: Path):
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    sitk.WriteImage(img, str(tmp_path / "v.nii"))
    raw = (tmp_path / "v.nii").read_bytes()
    h = parse_nifti_header(raw[:540])
    assert h.dims == (6, 5, 4) and h.bytes_per_voxel == 2 and h.data_offset + h.data_bytes == len(raw)
    pair = bytearray(raw[:348])
    pair[344:348] = b"ni1\x00"
    with pytest.raises(HeaderError, match="two-file NIfTI"):
        parse_nifti_header(bytes(pair))
    huge = bytearray(raw[:540])
    huge[42:48] = np.array([1024, 1024, 1024], "<i2").tobytes()
    with pytest.raises(HeaderError, match="voxels"):
        parse_nifti_header(bytes(huge), max_voxels=512**3)
