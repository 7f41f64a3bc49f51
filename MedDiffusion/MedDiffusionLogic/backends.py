"""Where a job runs: the local job server (a child process, local_server.py) or a remote MedDiffusion server.

Both are reached with the same `MedDiffusionLib.client.RemoteClient`, so there is one job path (jobs.py). A
backend only answers: is the server ready (`prepare`, one short call), which client talks to it, what does the
selected model offer (`model_summary`), and how to word a client error for the panel. Nothing here imports
torch: the panel's lists come from the bundle's model.yaml (local) or from the server's /v1/models (remote).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

from .local_server import LocalServer, ServerSpec
from .parameters import MedDiffusionParameters

if TYPE_CHECKING:  # the library is imported lazily: the panel starts before its dependencies are installed
    from MedDiffusionLib.catalog import Catalog

__all__ = ["AnatomyChoice", "ModelSummary", "LocalBackend", "RemoteBackend", "anatomy_choices",
           "model_args", "user_message"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnatomyChoice:
    """One entry of the Generate panel: an anatomy, its modality and the volume sizes it can produce."""

    name: str
    modality: str
    sizes_xyz: tuple[tuple[int, int, int], ...] = ()
    spacing_xyz: Optional[tuple[float, float, float]] = None


@dataclass(frozen=True)
class ModelSummary:
    """What the selected model offers: the panel's lists and the CT intensity range of generated volumes."""

    anatomies: tuple[AnatomyChoice, ...]
    hu_range: Optional[tuple[float, float]] = None
    tasks: tuple[str, ...] = ()
    name: str = ""

    def anatomy(self, name: str) -> Optional[AnatomyChoice]:
        return next((a for a in self.anatomies if a.name.lower() == (name or "").lower()), None)


def anatomy_choices(catalog: Catalog, downsample: int = 8) -> tuple[AnatomyChoice, ...]:
    """Catalog -> AnatomyChoice list (sizes from `anatomy.volume_sizes_xyz(downsample)`)."""
    choices = []
    for anatomy in catalog:
        sizes = tuple(tuple(int(v) for v in s) for s in anatomy.volume_sizes_xyz(downsample))
        choices.append(AnatomyChoice(anatomy.name, anatomy.modality, sizes, anatomy.spacing_xyz))
    return tuple(choices)


def model_args(params: MedDiffusionParameters) -> tuple[str, ...]:
    """`meddiffusion serve` model options for the panel's model selection."""
    from MedDiffusionLib.errors import InputError

    if params.use_demo_model:
        return ()
    if params.model_name:
        return ("--model", params.model_name)  # the server child resolves it through the same registry
    if params.bundle_dir:
        return ("--model", params.bundle_dir)
    if params.autoencoder_path and params.denoiser_path:
        return ("--autoencoder", params.autoencoder_path, "--denoiser", params.denoiser_path)
    raise InputError("no model selected: choose one in the Models section, or a bundle folder, or both an "
                     "autoencoder and a denoiser checkpoint")


def user_message(exc: Exception, url: str = "", job_id: str = "", token_sent: bool = True) -> Optional[str]:
    """The panel's wording for a client error; None keeps the client's own message (ServerUnreachable,
    JobFailed... already name the server and the problem)."""
    from MedDiffusionLib.client import AuthenticationError, JobNotFound, QueueFullError, RemoteError

    if isinstance(exc, AuthenticationError):
        what = "rejected the access token" if token_sent else "needs an access token, and none was given"
        return (f"the MedDiffusion server at {url} {what}: enter the token the server was started with (its "
                "--token-file or $MEDDIFFUSION_TOKEN) in the remote server settings")
    if isinstance(exc, QueueFullError):
        return f"the MedDiffusion server is busy: {exc.detail}"
    if isinstance(exc, JobNotFound):
        job = f"job {job_id[:8]}" if job_id else "the job"
        return (f"the MedDiffusion server no longer has {job} ({exc.detail}); it may have been restarted with "
                "another store, or the result expired")
    if isinstance(exc, RemoteError):
        if exc.status == 400:
            return f"the MedDiffusion server refused the job: {exc.detail}"
        if exc.status == 413:
            return f"the MedDiffusion server refused the upload: {exc.detail}"
        if exc.status == 501:
            return f"the MedDiffusion server cannot run this job: {exc.detail}"
        return f"the MedDiffusion server at {url} answered with error {exc.status}: {exc.detail}"
    return None


@contextmanager
def reworded_errors(url: str = "", job_id: str = "", token_sent: bool = True) -> Iterator[None]:
    from MedDiffusionLib.errors import MedDiffusionError

    try:
        yield
    except MedDiffusionError as exc:
        message = user_message(exc, url, job_id, token_sent)
        if message is None:
            raise
        raise MedDiffusionError(message) from exc


class LocalBackend:
    """The job server on this computer: started on demand with the selected model and device, kept running
    (the model stays loaded between jobs), replaced when the model or device changes or when it went stale."""

    name = "local"

    def __init__(self, server: Optional[LocalServer] = None) -> None:
        self.server = server or LocalServer()
        self._summaries: dict[tuple, ModelSummary] = {}

    @property
    def url(self) -> str:
        return self.server.url

    def spec(self, params: MedDiffusionParameters) -> ServerSpec:
        return ServerSpec(model_args(params), params.device)

    def prepare(self, params: MedDiffusionParameters) -> bool:
        """Start (or replace) the server if needed; True once it answers. One short call: poll it."""
        spec = self.spec(params)
        if self.server.state == "ready" and self.server.spec == spec and not self.server.check_alive():
            _log.warning("MedDiffusion local server stopped answering; starting a new one")
        self.server.ensure(spec)
        return self.server.poll_ready()

    @property
    def status(self) -> str:
        return self.server.message

    @property
    def token(self) -> str:
        return self.server.token

    def client(self, timeout: float = 2.0) -> Any:
        return self.server.client(timeout)

    def model_summary(self, params: MedDiffusionParameters, token: str = "") -> ModelSummary:
        """From the bundle's model.yaml (torch is not imported; nothing is loaded)."""
        from MedDiffusionLib.bundle_summary import demo_bundle_dir, summarize_bundle, summarize_official

        args = model_args(params)
        if args not in self._summaries:
            if not args:
                summary = summarize_bundle(demo_bundle_dir())
            elif args[0] == "--model":
                from .model_downloads import model_folder

                summary = summarize_bundle(model_folder(args[1]))
            else:
                summary = summarize_official()
            self._summaries = {args: ModelSummary(anatomy_choices(summary.catalog, summary.downsample),
                                                  summary.hu_range, summary.tasks, summary.name)}
        return self._summaries[args]

    def stop(self) -> None:
        self.server.stop()


class RemoteBackend:
    """A MedDiffusion server elsewhere (`meddiffusion serve`, docs/SERVER.md), usually through an SSH tunnel.
    An empty `token` sends none (the token store in tokens.py gives the one entered for this server's origin)."""

    name = "remote"

    def __init__(self, url: str, token: str = "", timeout_s: float = 2.0) -> None:
        self.url = (url or "").strip()
        self.token = token
        self.timeout_s = timeout_s  # every call from the panel is short; transfers have their own stall limit
        self.status = ""

    def prepare(self, params: MedDiffusionParameters) -> bool:
        return True

    def client(self, timeout: Optional[float] = None) -> Any:
        from MedDiffusionLib.client import RemoteClient
        from MedDiffusionLib.errors import InputError

        from .tokens import check_transport

        if not self.url:
            raise InputError("the remote backend needs a server URL (e.g. http://127.0.0.1:8000 through an SSH "
                             "tunnel)")
        check_transport(self.url, self.token)
        try:
            return RemoteClient(self.url, token=self.token or "", timeout=timeout or self.timeout_s)
        except ValueError as exc:  # a malformed URL
            raise InputError(str(exc)) from None

    def models(self) -> dict[str, Any]:
        """The server's GET /v1/models answer (model, device, anatomies, samplers, tasks, limits...)."""
        client = self.client()
        with reworded_errors(self.url, token_sent=bool(self.token)):
            return client.models()

    def model_summary(self, params: MedDiffusionParameters, token: str = "") -> ModelSummary:
        info = self.models()
        anatomies = tuple(
            AnatomyChoice(str(e["name"]), str(e.get("modality") or "CT"),
                          tuple(tuple(int(v) for v in s) for s in e.get("sizes_xyz") or ()),
                          tuple(float(v) for v in e["spacing_xyz"]) if e.get("spacing_xyz") else None)
            for e in info.get("anatomies", []))
        hu = info.get("hu_range")
        return ModelSummary(anatomies, (float(hu[0]), float(hu[1])) if hu else None, tuple(info.get("tasks") or ()),
                            str(info.get("model") or ""))
