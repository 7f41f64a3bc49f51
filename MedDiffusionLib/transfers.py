"""Volume transfers to and from the job server in short slices, for a GUI event loop (3D Slicer's main thread).

A 512^3 float volume is 512 MiB. Sending it with one blocking call freezes a GUI for seconds, and a Python thread
does not help inside Slicer (its main thread holds the GIL while Qt idles). So an upload or a download is an
object whose ``step(budget_s)`` moves bytes for at most about ``budget_s`` seconds without ever waiting on the
network (non-blocking socket sends and reads), and returns True when the transfer is complete. The caller (a
QTimer, or a loop in scripts) calls it until then.

The volume travels as NRRD built from the array in memory (no temporary file, no whole-volume copy): the upload
streams the header and then the array's own bytes; the download parses the server's NRRD while it arrives
(gzip is inflated incrementally) straight into the final array. Only the standard library and numpy are used.
"""
from __future__ import annotations

import http.client
import json
import re
import select
import socket
import ssl
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .errors import MedDiffusionError

__all__ = ["VolumeArray", "nrrd_header", "upload_pieces", "NrrdStreamDecoder", "UploadTransfer", "DownloadTransfer",
           "TransferError", "PIECE"]

PIECE = 1 << 20            # bytes moved per socket call
MAX_HEADER = 64 * 1024     # an NRRD header longer than this is refused
_NRRD_TYPES = {"float": "<f4", "double": "<f8", "short": "<i2", "ushort": "<u2", "int": "<i4", "uint": "<u4",
               "signed char": "i1", "uchar": "u1", "int16": "<i2", "uint16": "<u2", "int32": "<i4",
               "uint32": "<u4", "int8": "i1", "uint8": "u1", "float32": "<f4", "float64": "<f8"}
_TYPE_NAMES = {np.dtype("<f4"): "float", np.dtype("<f8"): "double", np.dtype("<i2"): "short",
               np.dtype("<u2"): "ushort", np.dtype("<i4"): "int", np.dtype("<u4"): "uint",
               np.dtype("i1"): "signed char", np.dtype("u1"): "uchar"}


class TransferError(MedDiffusionError):
    """A transfer could not be completed (the server's answer was malformed, or the connection stalled)."""


@dataclass
class VolumeArray:
    """Voxels (K, J, I) = (Z, Y, X) with LPS geometry: what NRRD and SimpleITK store.

    Attributes:
        array: the voxels, shape (Z, Y, X), any scalar dtype.
        spacing: mm along (I, J, K) = (X, Y, Z).
        origin_lps: the centre of voxel (0, 0, 0) in mm, LPS.
        direction_lps: 3x3; its columns are the unit vectors of the I, J, K axes in LPS.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction_lps: np.ndarray  # 3x3, columns are the I, J, K axes

    def to_sitk(self) -> Any:
        """The volume as a SimpleITK image with its geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetOrigin(tuple(float(v) for v in self.origin_lps))
        image.SetDirection(tuple(float(v) for v in np.asarray(self.direction_lps, dtype=float).ravel()))
        return image

    @classmethod
    def from_sitk(cls, image: Any) -> "VolumeArray":
        """The voxels (a view, no copy) and geometry of a SimpleITK image."""
        import SimpleITK as sitk

        return cls(sitk.GetArrayViewFromImage(image), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   np.asarray(image.GetDirection(), dtype=float).reshape(3, 3))


def _vec(values: Any) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def nrrd_header(volume: VolumeArray, encoding: str = "raw") -> bytes:
    """An attached-data NRRD header for ``volume`` (little-endian data follows the blank line)."""
    arr = volume.array
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    if arr.ndim != 3 or dtype not in _TYPE_NAMES:
        raise ValueError(f"cannot send a {arr.ndim}D {arr.dtype} volume (3D, 8-64 bit numbers only)")
    k, j, i = arr.shape
    direction = np.asarray(volume.direction_lps, dtype=float).reshape(3, 3)
    axes = " ".join(_vec(direction[:, a] * float(volume.spacing[a])) for a in range(3))
    lines = ["NRRD0004", f"type: {_TYPE_NAMES[dtype]}", "dimension: 3", "space: left-posterior-superior",
             f"sizes: {i} {j} {k}", f"space directions: {axes}", "kinds: domain domain domain",
             "endian: little", f"encoding: {encoding}", f"space origin: {_vec(volume.origin_lps)}", "", ""]
    return "\n".join(lines).encode("ascii")


def _little_endian_bytes(arr: np.ndarray) -> memoryview:
    """The voxels as bytes without copying when they are already contiguous little-endian."""
    if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return arr.data.cast("B")


class NrrdStreamDecoder:
    """Parses an attached-data NRRD (raw or gzip) fed in pieces, into one preallocated array.

    The declared size is checked against ``max_voxels`` before anything is allocated, and inflation is bounded
    by the bytes still expected, so a hostile answer can neither make it allocate more nor hide extra data.
    """

    def __init__(self, max_voxels: int) -> None:
        self.max_voxels = int(max_voxels)
        self._head = b""
        self.volume: Optional[VolumeArray] = None
        self._flat: Optional[memoryview] = None
        self._filled = 0
        self._inflate: Any = None

    @property
    def complete(self) -> bool:
        """Whether every voxel has arrived."""
        return self._flat is not None and self._filled == len(self._flat)

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the NRRD stream (header first, then voxels, inflated if gzipped)."""
        if self._flat is None:
            self._head += data
            end = self._head.find(b"\n\n")
            if end < 0:
                if len(self._head) > MAX_HEADER:
                    raise TransferError("the server's NRRD header is too long")
                return
            header, data = self._head[:end].decode("ascii", "replace"), self._head[end + 2:]
            self._head = b""
            self._start(header)
        if data:
            self._take(data)

    def _start(self, header: str) -> None:
        lines = header.split("\n")
        if not lines[0].startswith("NRRD"):
            raise TransferError("the server's answer is not an NRRD volume")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            if not line or line.startswith("#") or ":=" in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        try:
            if fields.get("dimension") != "3":
                raise ValueError("not a 3D volume")
            dtype = np.dtype(_NRRD_TYPES[fields["type"].lower()])
            if dtype.itemsize > 1 and fields.get("endian", "little").lower() != "little":
                dtype = dtype.newbyteorder(">")
            sizes = [int(v) for v in fields["sizes"].split()]
            if len(sizes) != 3 or min(sizes) < 1:
                raise ValueError(f"bad sizes {fields['sizes']!r}")
            axes = [[float(x) for x in v.split(",")] for v in re.findall(r"\(([^)]*)\)", fields["space directions"])]
            origin = [float(x) for x in re.findall(r"\(([^)]*)\)", fields.get("space origin", "(0,0,0)"))[0]
                      .split(",")]
            encoding = fields.get("encoding", "raw").lower()
            if fields.get("space", "left-posterior-superior").lower() not in ("left-posterior-superior", "lps"):
                raise ValueError(f"space {fields['space']!r}")
            if "data file" in fields or "datafile" in fields:
                raise ValueError("detached data")
        except (KeyError, ValueError, IndexError) as exc:
            raise TransferError(f"the server's NRRD header cannot be read ({exc})") from None
        if encoding not in ("raw", "gzip", "gz") or len(axes) != 3 or any(len(a) != 3 for a in axes) or \
                len(origin) != 3:
            raise TransferError(f"the server's NRRD volume is not supported (encoding {encoding})")
        if sizes[0] * sizes[1] * sizes[2] > self.max_voxels:
            raise TransferError(f"the server's volume ({'x'.join(map(str, sizes))}) exceeds the expected "
                                f"{self.max_voxels} voxels")
        matrix = np.array(axes, dtype=float).T  # columns: the I, J, K steps
        spacing = np.linalg.norm(matrix, axis=0)
        if np.any(spacing <= 0):
            raise TransferError("the server's volume has a zero spacing")
        array = np.empty((sizes[2], sizes[1], sizes[0]), dtype=dtype)
        self.volume = VolumeArray(array, (float(spacing[0]), float(spacing[1]), float(spacing[2])),
                                  (origin[0], origin[1], origin[2]), matrix / spacing)
        self._flat = array.data.cast("B")
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding != "raw" else None

    def _take(self, data: bytes) -> None:
        assert self._flat is not None
        room = len(self._flat) - self._filled
        if self._inflate is not None:
            data = self._inflate.decompress(data, room + 1)
            if self._inflate.unconsumed_tail:
                raise TransferError("the server's volume holds more data than its header declares")
        if len(data) > room:
            raise TransferError("the server's volume holds more data than its header declares")
        self._flat[self._filled:self._filled + len(data)] = data
        self._filled += len(data)

    def finish(self) -> VolumeArray:
        """The received volume; TransferError if the stream ended early."""
        if not self.complete or self.volume is None:
            raise TransferError("the server's volume is truncated")
        if self.volume.array.dtype.byteorder == ">":
            self.volume.array = self.volume.array.astype(self.volume.array.dtype.newbyteorder("<"))
        return self.volume


def upload_pieces(head: bytes, nrrd_head: bytes, array: np.ndarray, tail: bytes,
                  compress: bool) -> tuple[Iterator[Any], Optional[int]]:
    """The multipart body in pieces of at most PIECE bytes, and its length (None when gzip-compressed on the
    fly: the size is only known at the end, so the body goes out chunked)."""
    data = _little_endian_bytes(array)

    def raw() -> Iterator[Any]:
        yield head + nrrd_head
        for start in range(0, len(data), PIECE):
            yield data[start:start + PIECE]
        yield tail

    def gzipped() -> Iterator[Any]:
        yield head + nrrd_head
        deflate = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # level 1: fast, most of the gain
        for start in range(0, len(data), PIECE):
            out = deflate.compress(data[start:start + PIECE])
            if out:
                yield out
        yield deflate.flush() + tail

    if compress:
        return gzipped(), None
    return raw(), len(head) + len(nrrd_head) + len(data) + len(tail)


# ----------------------------------------------------------------------------------------------- connections
def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise TransferError(f"the server URL {url!r} names no host")
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port or 443, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    conn.connect()
    return conn


def _readable(sock: socket.socket) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], 0)[0])


class _Transfer:
    """Shared by uploads and downloads: one connection, a stall timeout, errors mapped by the client."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float,
                 error_from: Callable[[int, bytes, str], Exception],
                 unreachable: Callable[[BaseException], Exception]) -> None:
        self.base_url = base_url
        self.headers = headers
        self.timeout = timeout          # no progress for this long: the transfer fails
        self._error_from = error_from
        self._unreachable = unreachable
        self.conn: Optional[http.client.HTTPConnection] = None
        self.sock: Optional[socket.socket] = None
        self.done = False
        self.bytes_moved = 0
        self._last_progress = time.monotonic()

    def _check_stall(self) -> None:
        if time.monotonic() - self._last_progress > self.timeout:
            raise self._unreachable(socket.timeout("no data moved for %g s" % self.timeout))

    def _moved(self, n: int) -> None:
        if n:
            self.bytes_moved += n
            self._last_progress = time.monotonic()

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None

    def step(self, budget_s: float = 0.1) -> bool:
        """Move bytes for at most ``budget_s`` without waiting for the network; True once the transfer is
        complete. Network failures raise the client's ServerUnreachable, HTTP errors its error for the status."""
        if self.done:
            return True
        deadline = time.monotonic() + budget_s
        try:
            if self.conn is None:
                self.conn = _connect(self.base_url, self.timeout)
                self._send_request(self.conn)
            if not self._advance(deadline):
                return False
            self.close()
            self._finish()
        except MedDiffusionError:
            self.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise self._unreachable(exc) from None
        self.done = True
        return True

    def _send_request(self, conn: http.client.HTTPConnection) -> None:
        """Send the request line and headers on the new connection."""
        raise NotImplementedError

    def _advance(self, deadline: float) -> bool:
        """Move bytes until ``deadline``; True when everything has been moved."""
        raise NotImplementedError

    def _finish(self) -> None:
        """Turn what arrived into the result (the connection is closed)."""
        raise NotImplementedError

    def _response(self, path: str) -> Optional[http.client.HTTPResponse]:
        """The response once its first bytes are here (never waits for them); raises for HTTP errors."""
        assert self.conn is not None and self.conn.sock is not None
        if not _readable(self.conn.sock):
            self._check_stall()
            return None
        self.sock = self.conn.sock  # http.client forgets it for a response that closes the connection
        self.sock.settimeout(self.timeout)
        resp = self.conn.getresponse()
        self._last_progress = time.monotonic()
        if resp.status >= 300:
            body = resp.read(64 * 1024)
            self.close()
            raise self._error_from(resp.status, body, self.base_url + path)
        return resp


class UploadTransfer(_Transfer):
    """POST a multipart body whose pieces come from ``body`` (an iterator of bytes-like objects).

    ``length`` gives a Content-Length; None sends it chunked (used when the pieces are compressed on the fly).
    ``step`` sends for at most ``budget_s`` without blocking; ``result`` is the parsed JSON answer.
    """

    def __init__(self, base_url: str, path: str, body: Iterator[Any], length: Optional[int],
                 headers: dict[str, str], timeout: float, error_from: Callable[[int, bytes, str], Exception],
                 unreachable: Callable[[BaseException], Exception]) -> None:
        super().__init__(base_url, headers, timeout, error_from, unreachable)
        self.path = path
        self.length = length
        self._body = body
        self._pending = memoryview(b"")
        self._body_done = False
        self._answer = b""
        self.result: Any = None

    def _next_piece(self) -> bool:
        try:
            piece = next(self._body)
        except StopIteration:
            if self.length is None:
                self._pending = memoryview(b"0\r\n\r\n")
            self._body_done = True
            return bool(len(self._pending))
        piece = memoryview(piece).cast("B") if not isinstance(piece, bytes) else memoryview(piece)
        if self.length is None:  # chunked transfer coding
            piece = memoryview(b"%x\r\n" % len(piece) + bytes(piece) + b"\r\n")
        self._pending = piece
        return True

    def _send_request(self, conn: http.client.HTTPConnection) -> None:
        conn.putrequest("POST", self.path, skip_accept_encoding=True)
        for key, value in self.headers.items():
            conn.putheader(key, value)
        if self.length is None:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(self.length))
        conn.endheaders()
        assert conn.sock is not None
        conn.sock.setblocking(False)

    def _advance(self, deadline: float) -> bool:
        assert self.conn is not None and self.conn.sock is not None
        sock = self.conn.sock
        while time.monotonic() < deadline and not (self._body_done and not len(self._pending)):
            if not len(self._pending) and not self._next_piece():
                break
            try:
                sent = sock.send(self._pending[:PIECE])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if not _writable(sock):
                    self._check_stall()
                    return False
                continue
            self._pending = self._pending[sent:]
            self._moved(sent)
        if not (self._body_done and not len(self._pending)):
            self._check_stall()
            return False
        resp = self._response(self.path)
        if resp is None:
            return False
        self._answer = resp.read()
        return True

    def _finish(self) -> None:
        try:
            self.result = json.loads(self._answer.decode("utf-8")) if self._answer else None
        except ValueError:
            raise TransferError("the server's answer to the upload is not JSON") from None


def _writable(sock: socket.socket) -> bool:
    return bool(select.select([], [sock], [], 0.02)[1])


class DownloadTransfer(_Transfer):
    """GET an NRRD volume and decode it while it arrives; ``volume`` holds it when ``step`` returned True."""

    def __init__(self, base_url: str, path: str, max_voxels: int, headers: dict[str, str], timeout: float,
                 error_from: Callable[[int, bytes, str], Exception],
                 unreachable: Callable[[BaseException], Exception]) -> None:
        super().__init__(base_url, headers, timeout, error_from, unreachable)
        self.path = path
        self.decoder = NrrdStreamDecoder(max_voxels)
        self._resp: Optional[http.client.HTTPResponse] = None
        self._left: Optional[int] = None
        self.volume: Optional[VolumeArray] = None

    def _send_request(self, conn: http.client.HTTPConnection) -> None:
        conn.request("GET", self.path, headers=self.headers)

    def _advance(self, deadline: float) -> bool:
        if self._resp is None:
            self._resp = self._response(self.path)
            if self._resp is None:
                return False
            self._left = self._resp.length  # None: chunked coding, read with (bounded) blocking reads
            if self._left is not None:
                assert self.sock is not None
                self.sock.setblocking(False)
        while time.monotonic() < deadline:
            if self._left is None:
                data = self._resp.read(PIECE)  # blocking, bounded by the socket timeout
                if not data:
                    break
            else:
                if self._left == 0:
                    break
                # Non-blocking socket: read1 returns what is buffered or readable now, b"" when nothing is.
                data = self._resp.fp.read1(min(PIECE, self._left)) or b""
                if not data:
                    self._check_stall()
                    return False
                self._left -= len(data)
            self._moved(len(data))
            self.decoder.feed(data)
        return (self._left == 0) if self._left is not None else self._resp.isclosed() or self.decoder.complete

    def _finish(self) -> None:
        self.volume = self.decoder.finish()
