"""Client for the MedDiffusion job server, using only the Python standard library (runs in 3D Slicer's Python).

    client = RemoteClient("http://127.0.0.1:8000", token="...")   # e.g. through `ssh -N -L 8000:127.0.0.1:8000`
    job = client.generate("ct-chest-abdomen", steps=50, seed=1)
    client.wait(job, progress=lambda s: print(s.describe()))       # s: a progress.JobStatus
    image = client.result(job)                                     # SimpleITK image with the server's geometry
    result = client.fetch(job)                                     # results.GenerationResult, image included

SimpleITK is imported only by the methods that take or return images. Every failure is a MedDiffusionError
subclass with a message naming the server and the problem.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from . import __version__
from .errors import Cancelled, MedDiffusionError
from .options import GenerateOptions, ReconstructOptions, parse_size
from .progress import CANCELLED, DONE, FAILED, JobStatus
from .results import GenerationResult, ReconstructionResult

# Documented defaults are the library's options (the server fills in the same ones for a missing value).
_G, _R = GenerateOptions, ReconstructOptions

__all__ = ["RemoteClient", "JobWatcher", "ServerUnreachable", "AuthenticationError", "RemoteError", "JobNotFound",
           "QueueFullError", "JobFailed", "JobCancelled", "WaitTimeout"]

TOKEN_ENV = "MEDDIFFUSION_TOKEN"
CHUNK = 1 << 20
UPLOAD_SUFFIXES = (".nrrd", ".nii", ".nii.gz")


class ServerUnreachable(MedDiffusionError):
    """No HTTP answer: wrong address, server not running, tunnel down, TLS failure or timeout."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the MedDiffusion server at {url}: {reason}")
        self.url = url
        self.reason = reason


class AuthenticationError(MedDiffusionError):
    """HTTP 401: the token is missing or wrong."""


class RemoteError(MedDiffusionError):
    """Any other HTTP error; ``status`` is the code and ``detail`` the server's explanation."""

    def __init__(self, status: int, detail: str, url: str = "") -> None:
        super().__init__(f"server error {status}{f' for {url}' if url else ''}: {detail}")
        self.status = status
        self.detail = detail


class JobNotFound(RemoteError):
    """HTTP 404 for a job: unknown id, or its result expired on the server."""


class QueueFullError(RemoteError):
    """HTTP 429: the server's job queue is full; try again later."""


class JobFailed(MedDiffusionError):
    """The server ran the job and it failed; ``message`` is the server's reason."""
    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(f"job {job_id[:8]} failed on the server: {message}")
        self.job_id = job_id
        self.message = message


class JobCancelled(Cancelled):
    """The job was cancelled (by this client or another one)."""
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id[:8]} was cancelled")
        self.job_id = job_id


class WaitTimeout(MedDiffusionError, TimeoutError):
    """wait() gave up; the job keeps running on the server."""


class JobWatcher:
    """Polls one job's status, one short request per ``poll()``: the single polling rule of the client, used by
    ``RemoteClient.wait`` (a loop) and by a GUI timer (3D Slicer), which calls ``poll()`` when ``due()``.

    ``poll()`` returns the JobStatus, or None after a tolerated network miss (up to ``max_misses`` in a row, with
    back-off: a tunnel reconnecting); it raises JobFailed / JobCancelled when the job ended that way.
    """

    def __init__(self, client: "RemoteClient", job_id: str, poll_s: float = 0.5, max_misses: int = 3) -> None:
        self.client = client
        self.job_id = job_id
        self.poll_s = poll_s
        self.max_misses = max_misses
        self.misses = 0
        self.next_poll_s = 0.0  # time.monotonic() at which the next poll is due
        self.last: Optional[JobStatus] = None

    def due(self) -> bool:
        """Whether the next status request is due (requests back off while the server does not answer)."""
        return time.monotonic() >= self.next_poll_s

    def poll(self) -> Optional[JobStatus]:
        """The job's status, or None when the server did not answer (ServerUnreachable after ``max_misses``)."""
        try:
            st = self.client.status(self.job_id)
        except ServerUnreachable:
            self.misses += 1
            if self.misses > self.max_misses:
                raise
            self.next_poll_s = time.monotonic() + min(self.poll_s * 2**self.misses, 5.0)
            return None
        self.misses = 0
        self.last = st
        self.next_poll_s = time.monotonic() + self.poll_s
        if st.state == FAILED:
            raise JobFailed(self.job_id, st.error or "no reason given")
        if st.state == CANCELLED:
            raise JobCancelled(self.job_id)
        return st


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would resend the Authorization header to wherever a redirect points; the API never redirects.
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RemoteClient:
    """Talks to one server. ``token`` defaults to $MEDDIFFUSION_TOKEN; ``timeout`` is per network operation.

    Args:
        url: 'http(s)://host[:port][/prefix]'. A loopback host (an SSH tunnel) bypasses proxies from the
            environment; a token sent over plain http to any other host warns (UserWarning).
        token: the server's access token; None: $MEDDIFFUSION_TOKEN, else none.
        timeout: seconds per connect / read.

    Raises:
        ValueError: a URL without an http(s) scheme or a host.

    Every request method raises `ServerUnreachable` (no HTTP answer), `AuthenticationError` (401),
    `JobNotFound` (404 for a job), `QueueFullError` (429) or `RemoteError` (any other error status; 400 for
    options the server's `GenerateOptions` / `ReconstructOptions` checks refuse); below, only what a method adds.
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 30) -> None:
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"server URL must look like http://host:port or https://host, got {url!r}")
        self.url = url.strip().rstrip("/")
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout = timeout
        loopback = self.loopback = _is_loopback(parsed.hostname)
        self.url_root = f"{parsed.scheme}://{parsed.netloc}"
        self._path_prefix = parsed.path.rstrip("/")
        if self.token and parsed.scheme == "http" and not loopback:
            warnings.warn(f"sending the access token to {parsed.hostname} without TLS; use an SSH tunnel to "
                          "127.0.0.1 or an https:// reverse proxy (docs/SERVER.md)", stacklevel=2)
        # A loopback URL is an SSH tunnel or a local server: never send it through an HTTP proxy from the env.
        handlers: list = [_NoRedirect()]
        if loopback:
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)
        self._limits: Optional[dict] = None

    # ---- plumbing ------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, headers: Optional[dict[str, str]] = None,
                 json_body: Any = None, sink: Optional[Path] = None) -> Any:
        """One HTTP exchange; returns parsed JSON, or writes the body to ``sink`` (then returns None)."""
        url = self.url + path
        hdrs = self._headers()
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        req = urllib.request.Request(url, data=body, headers=hdrs, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                if sink is not None:
                    with open(sink, "wb") as fh:
                        shutil.copyfileobj(resp, fh, CHUNK)
                    return None
                data = resp.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, url) from None
        except urllib.error.URLError as exc:
            raise ServerUnreachable(self.url, _reason(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:  # reset, broken pipe, timeout, truncated answer
            hint = " (the upload may exceed the server's size limit)" if isinstance(body, Iterator) else ""
            raise ServerUnreachable(self.url, _reason(exc) + hint) from None
        try:
            return json.loads(data.decode("utf-8")) if data else None
        except ValueError:
            raise RemoteError(200, "the answer is not JSON: is this URL a MedDiffusion server?", url) from None

    def _http_error(self, exc: urllib.error.HTTPError, url: str) -> MedDiffusionError:
        try:
            raw = exc.read()
        except OSError:
            raw = b""
        return self.error_from_status(exc.code, raw, url, str(exc.reason or ""))

    def error_from_status(self, code: int, raw: bytes, url: str, reason: str = "") -> MedDiffusionError:
        """The client error for an HTTP error answer (status ``code``, body ``raw``).

        Args:
            code: the HTTP status.
            raw: the answer's body (JSON ``{"detail": ...}`` from the server, or anything from a proxy).
            url: the URL requested, for the message.
            reason: the HTTP reason phrase, used when the body is empty.

        Returns:
            `AuthenticationError` (401), `JobNotFound` (404 under /jobs/), `QueueFullError` (429), else
            `RemoteError`; returned, not raised.
        """
        try:
            detail = json.loads(raw.decode("utf-8")).get("detail", "")
            detail = detail if isinstance(detail, str) else json.dumps(detail)
        except (ValueError, AttributeError):
            detail = raw.decode("utf-8", "replace").strip()[:300] or reason
        if code == 401:
            what = "no access token was sent" if not self.token else "the access token was rejected"
            return AuthenticationError(f"the MedDiffusion server at {self.url} refused the request: {what} "
                                       f"(set the token the server was started with; {detail})")
        if code == 404 and "/jobs/" in url:
            return JobNotFound(404, detail, url)
        if code == 429:
            return QueueFullError(429, detail, url)
        return RemoteError(code, str(detail), url)

    def unreachable(self, exc: BaseException) -> ServerUnreachable:
        """A ServerUnreachable naming this server and the reason for ``exc``."""
        return ServerUnreachable(self.url, _reason(exc))

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        hdrs = {"User-Agent": f"meddiffusion-client/{__version__}", "Accept": accept}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        return hdrs

    @staticmethod
    def _job_path(job_id: str, suffix: str = "") -> str:
        return f"/v1/jobs/{urllib.parse.quote(str(job_id), safe='')}{suffix}"

    # ---- API -----------------------------------------------------------------------------------------
    def health(self) -> dict:
        """The server's /health answer: status, version and whether it wants a token."""
        return self._request("GET", "/health")

    def models(self) -> dict:
        """The loaded model and its anatomies (/v1/models)."""
        return self._request("GET", "/v1/models")

    def generate(self, anatomy: str, size_xyz: Union[str, Sequence[int], None] = None, sampler: str = _G.sampler,
                 steps: Optional[int] = None, seed: Optional[int] = None,
                 hu_range: Optional[Sequence[float]] = None) -> str:
        """Queue a generation; returns the job id.

        The arguments are those of `GenerateOptions` (defaults, bounds and meaning); the server checks them
        against its model before queuing.

        Args:
            anatomy: see `GenerateOptions`.
            size_xyz: see `GenerateOptions` ('XxYxZ' or three ints, voxels).
            sampler: see `GenerateOptions`.
            steps: see `GenerateOptions`.
            seed: see `GenerateOptions`.
            hu_range: see `GenerateOptions`.

        Raises:
            InputError: a malformed ``size_xyz`` (checked here, before any request).
        """
        body = {"anatomy": anatomy, "size_xyz": None if size_xyz is None else list(parse_size(size_xyz)), "sampler": sampler, "steps": steps,
                "seed": seed, "hu_range": list(hu_range) if hu_range is not None else None}
        return self._request("POST", "/v1/generate", json_body=body)["id"]

    def reconstruct(self, image: Any, task: str = _R.task, views: int = _R.views,
                    acceleration: float = _R.acceleration, mask: str = _R.mask, simulate: bool = _R.simulate,
                    sampler: str = _R.sampler, steps: Optional[int] = None, seed: Optional[int] = None,
                    data_consistency: bool = _R.data_consistency,
                    anatomy: Optional[str] = None, method: str = _R.method) -> str:
        """Upload a volume (SimpleITK image or a file path) and queue a reconstruction; returns the job id.
        ``anatomy`` picks the prior's anatomy (default: the server chooses from the modality and the field of
        view); ``method`` is one of ``options.METHODS`` (fbp / zero-filled / sart / tv need no model).

        Args:
            image: a SimpleITK image, or a path. A .nrrd / .nii / .nii.gz file is sent as is; anything else
                SimpleITK reads is converted to compressed NRRD first (SimpleITK needed).
            task: see `ReconstructOptions`.
            views: see `ReconstructOptions`.
            acceleration: see `ReconstructOptions`.
            mask: see `ReconstructOptions`.
            simulate: see `ReconstructOptions`.
            sampler: see `ReconstructOptions`.
            steps: see `ReconstructOptions`.
            seed: see `ReconstructOptions`.
            data_consistency: see `ReconstructOptions`.
            anatomy: see `ReconstructOptions`.
            method: see `ReconstructOptions`.

        Raises:
            RemoteError: 413 when the file exceeds the server's advertised upload limit (checked before sending).
        """
        fields = reconstruct_fields(task, views, acceleration, mask, simulate, sampler, steps, seed,
                                    data_consistency, anatomy, method)
        tmpdir = None
        try:
            if isinstance(image, (str, os.PathLike)) and _upload_suffix(Path(image)) and Path(image).is_file():
                path = Path(image)  # already a single-file format the server reads: send as is
            else:
                import SimpleITK as sitk

                if not isinstance(image, sitk.Image):
                    image = sitk.ReadImage(str(image))  # DICOM file, .mha, ...
                tmpdir = tempfile.mkdtemp(prefix="meddiffusion-upload-")
                path = Path(tmpdir) / "volume.nrrd"
                sitk.WriteImage(image, str(path), True)  # compressed: smaller transfer
            body, boundary, length = _multipart(fields, path)
            self._check_upload_size(path.stat().st_size)  # the server's limit is on the file itself
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)}
            return self._request("POST", "/v1/reconstruct", body=body, headers=headers)["id"]
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)

    def _check_upload_size(self, length: int) -> None:
        # The server answers an oversize upload early and closes the connection, which a client that is still
        # sending sees as a reset; checking the advertised limit first gives the clear message instead.
        if self._limits is None:
            self._limits = self.models().get("limits", {})
        limit_mb = self._limits.get("max_upload_mb")
        if limit_mb and length > limit_mb * 2**20:
            raise RemoteError(413, f"the volume is {length / 2**20:.1f} MB to upload, above the server's limit of "
                              f"{limit_mb:g} MB (server option --max-upload-mb)", self.url + "/v1/reconstruct")

    def status(self, job_id: str) -> JobStatus:
        """The job's current status."""
        return JobStatus.from_json(self._request("GET", self._job_path(job_id)))

    def cancel(self, job_id: str) -> JobStatus:
        """Ask the server to stop the job (a running job stops at its next step); returns its status."""
        return JobStatus.from_json(self._request("POST", self._job_path(job_id, "/cancel")))

    def wait(self, job_id: str, poll_s: float = 0.5, timeout: Optional[float] = None,
             progress: Optional[Callable[[JobStatus], None]] = None) -> JobStatus:
        """Poll until the job ends; returns the final status. Raises JobFailed / JobCancelled / WaitTimeout.

        A few network hiccups in a row (a tunnel reconnecting) are tolerated (see JobWatcher).

        Args:
            job_id: from `generate` / `reconstruct`.
            poll_s: seconds between status requests (longer, up to 5 s, while the server does not answer).
            timeout: seconds to wait in all; None: no limit.
            progress: called with every status received.

        Raises:
            JobFailed: the job failed on the server (its reason in the message).
            JobCancelled: the job was cancelled.
            WaitTimeout: ``timeout`` passed; the job keeps running.
            ServerUnreachable: more than 3 status requests in a row got no answer.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        watcher = JobWatcher(self, job_id, poll_s)
        while True:
            st = watcher.poll()
            if st is not None:
                if progress is not None:
                    progress(st)
                if st.state == DONE:
                    return st
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout(f"job {job_id[:8]} is still {st.state} after {timeout:g} s")
            time.sleep(max(watcher.next_poll_s - time.monotonic(), 0.0))

    # ---- transfers in slices (for a GUI event loop: see MedDiffusionLib.transfers) ------------------
    def start_reconstruct_upload(self, volume: Any, compress: Optional[bool] = None, **options: Any) -> Any:
        """An UploadTransfer that sends ``volume`` (a transfers.VolumeArray or SimpleITK image) as NRRD with the
        reconstruction ``options`` (those of ``reconstruct``); call its ``step()`` until True, then the job id is
        ``transfer.result["id"]``. ``compress`` (default: for non-loopback servers) gzips on the fly.

        Raises:
            RemoteError: 413 when the upload's known size exceeds the server's limit (checked before sending).
        """
        from .transfers import UploadTransfer, VolumeArray, nrrd_header, upload_pieces

        if not isinstance(volume, VolumeArray):
            volume = VolumeArray.from_sitk(volume)
        if compress is None:
            compress = not self.loopback
        fields = reconstruct_fields(**options)
        boundary = secrets.token_hex(16)
        head, tail = _multipart_frame(fields, boundary, ".nrrd")
        header = nrrd_header(volume, "gzip" if compress else "raw")
        pieces, length = upload_pieces(head, header, volume.array, tail, compress)
        if length is not None:
            self._check_upload_size(length - len(head) - len(tail))  # the server's limit is on the file itself
        headers = {**self._headers(), "Content-Type": f"multipart/form-data; boundary={boundary}"}
        return UploadTransfer(self.url_root, self._path_prefix + "/v1/reconstruct", pieces, length, headers,
                              self.timeout, self.error_from_status, self.unreachable)

    def start_download(self, job_id: str, which: str = "result", max_voxels: int = 1024**3) -> Any:
        """A DownloadTransfer of the job's NRRD ('result' or 'degraded'), decoded while it arrives; call its
        ``step()`` until True, then ``transfer.volume`` is a transfers.VolumeArray.

        Args:
            job_id: a finished job.
            which: 'result' or 'degraded'.
            max_voxels: refuse a volume whose header declares more voxels (nothing is allocated for it).

        Raises:
            ValueError: ``which`` is neither 'result' nor 'degraded'.
        """
        from .transfers import DownloadTransfer

        if which not in ("result", "degraded"):
            raise ValueError("which must be 'result' or 'degraded'")
        return DownloadTransfer(self.url_root, self._path_prefix + self._job_path(job_id, f"/{which}"), max_voxels,
                                self._headers("application/octet-stream"), self.timeout, self.error_from_status,
                                self.unreachable)

    def download(self, job_id: str, dest: Union[str, os.PathLike], which: str = "result") -> Path:
        """Save the job's NRRD ('result' or 'degraded') to ``dest`` (written to a temp file, then renamed).

        Returns:
            ``dest`` as a Path.

        Raises:
            ValueError: ``which`` is neither 'result' nor 'degraded'.
        """
        if which not in ("result", "degraded"):
            raise ValueError("which must be 'result' or 'degraded'")
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            self._request("GET", self._job_path(job_id, f"/{which}"), sink=tmp,
                          headers={"Accept": "application/octet-stream"})
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest

    def result(self, job_id: str) -> Any:
        """The finished job's volume as a SimpleITK image (spacing, origin and direction included)."""
        return self._fetch_image(job_id, "result")

    def degraded(self, job_id: str) -> Any:
        """A reconstruction job's degraded input (e.g. the sparse-view FBP), as a SimpleITK image."""
        return self._fetch_image(job_id, "degraded")

    def fetch(self, job_id: str) -> Union[GenerationResult, ReconstructionResult]:
        """The finished job's result, the same type the pipeline returned, with its volumes (SimpleITK images).
        RemoteError 409 while the job has not finished; JobFailed / JobCancelled when it ended that way."""
        st = self.status(job_id)
        if st.state == FAILED:
            raise JobFailed(job_id, st.error or "no reason given")
        if st.state == CANCELLED:
            raise JobCancelled(job_id)
        if st.state != DONE:
            raise RemoteError(409, f"the job is {st.state}; results exist only for finished jobs",
                              self.url + self._job_path(job_id))
        result = st.result()
        result.image = self.result(job_id)
        if isinstance(result, ReconstructionResult) and "degraded" in st.outputs:
            result.degraded = self.degraded(job_id)
        return result

    def _fetch_image(self, job_id: str, which: str) -> Any:
        import SimpleITK as sitk

        tmpdir = tempfile.mkdtemp(prefix="meddiffusion-download-")
        try:
            path = self.download(job_id, Path(tmpdir) / f"{which}.nrrd", which)
            return sitk.ReadImage(str(path))
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _upload_suffix(path: Path) -> Optional[str]:
    name = path.name.lower()
    return next((s for s in UPLOAD_SUFFIXES if name.endswith(s)), None)


def _form_value(v: Any) -> str:
    if v is None:
        return ""  # the server reads an empty field as "use the default"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def reconstruct_fields(task: str = _R.task, views: int = _R.views, acceleration: float = _R.acceleration,
                       mask: str = _R.mask, simulate: bool = _R.simulate, sampler: str = _R.sampler,
                       steps: Optional[int] = None, seed: Optional[int] = None,
                       data_consistency: bool = _R.data_consistency,
                       anatomy: Optional[str] = None, method: str = _R.method) -> dict[str, Any]:
    """The form fields of a reconstruction request (one list for the file upload and the sliced one)."""
    return {"task": task, "views": views, "acceleration": acceleration, "mask": mask, "simulate": simulate,
            "sampler": sampler, "steps": steps, "seed": seed, "data_consistency": data_consistency,
            "anatomy": anatomy, "method": method}


def _multipart_frame(fields: dict[str, Any], boundary: str, suffix: str) -> tuple[bytes, bytes]:
    """The bytes before the file part's content and after it."""
    head = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{_form_value(v)}\r\n'
                    .encode("utf-8") for k, v in fields.items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="volume{suffix}"'
             f'\r\nContent-Type: application/octet-stream\r\n\r\n').encode("utf-8")
    tail = f"\r\n--{boundary}--\r\n".encode("utf-8")
    return head, tail


def _multipart(fields: dict[str, Any], path: Path) -> tuple[Iterator[bytes], str, int]:
    """A streamed multipart/form-data body (fields, then the file) and its exact length."""
    boundary = secrets.token_hex(16)
    head, tail = _multipart_frame(fields, boundary, _upload_suffix(path) or "")
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        yield head
        with open(path, "rb") as fh:
            while True:
                block = fh.read(CHUNK)
                if not block:
                    break
                yield block
        yield tail

    return chunks(), boundary, len(head) + size + len(tail)


def _reason(reason: Any) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running, and the SSH tunnel open?)"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return f"unknown host name ({reason.strerror or reason})"
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return text
