"""The FastAPI application: HTTP endpoints over one model, one job queue and one result store.

The model is loaded and the pipelines are built once, in ``create_app``: one set per device (``devices``), each
used by that device's worker thread for every job. Request handlers only validate, queue and report: nothing heavy runs on the event loop.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import threading
import time
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Optional, Sequence

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..checkpoints.bundle import ModelBundle
from ..errors import InputError, MedDiffusionError
from ..options import SAMPLERS, GenerateOptions, ReconstructOptions, default_steps, parse_size
from ..pipelines.generate import GenerationPipeline
from .guard import BODY_IDLE_S, RequestGuard
from .jobs import JobManager, QueueFull, RunOutput, Worker
from ..progress import QUEUED, JobStatus, ProgressCallback
from .schemas import (AnatomyInfo, AvailableModelsResponse, GenerateRequest, HealthResponse, Limits, ModelsResponse,
                      ReconstructParams, RegistryModelInfo)
from .security import TokenVerifier, check_startup_security
from .store import JobRecord, JobStore
from .uploads import MAX_CONCURRENT_UPLOADS, UploadError, read_stored_volume, receive_multipart, store_upload

log = logging.getLogger("meddiffusion.server")


@dataclass
class ServerConfig:
    """The server's settings: store folder, model, device, workers and the limits on queue, uploads and sizes."""
    store_dir: Path
    bundle: Optional[ModelBundle] = None  # a loaded ModelBundle; else loaded from model_dir (None = demo model)
    model_dir: Optional[str] = None
    device: str = "auto"
    devices: Optional[list[str]] = None  # one worker per entry, e.g. ["cuda:0", "cuda:1"]; None: [device]
    host: str = "127.0.0.1"              # only used for the security check: insecure mode is loopback-only
    token: Optional[str] = None
    insecure: bool = False
    max_queue: int = 8
    max_upload_mb: float = 512.0
    result_ttl_hours: float = 24.0
    max_voxels: int = 512**3
    purge_interval_s: Optional[float] = None  # default: a quarter of the TTL, between 0.5 s and 10 min
    body_idle_s: float = BODY_IDLE_S     # a request body that stalls this long is refused (408)


class Services:
    """Everything the endpoints share; built once per app."""

    def __init__(self, config: ServerConfig) -> None:
        from ..checkpoints.bundle import load_bundle

        self.config = config
        self.bundle = config.bundle if config.bundle is not None else load_bundle(config.model_dir)
        devices = list(config.devices or [config.device])
        # Each worker gets its own copy of the networks (copied before any moves to a device): pipelines patch
        # modules while decoding, so two threads must never share one.
        bundles = [self.bundle] + [copy.deepcopy(self.bundle) for _ in devices[1:]]
        self.generators = [GenerationPipeline(b, d) for b, d in zip(bundles, devices)]
        self.device = ",".join(str(g.device) for g in self.generators)
        built = [self._build_reconstructor(g) for g in self.generators]
        self.reconstructors = [r for r, _ in built]
        self.recon_reason = built[0][1]
        self.tasks = sorted(self.bundle.controlnets) if self.reconstructor is not None else []
        self.hu_range = _declared_hu_range(self.bundle)
        self.verifier = TokenVerifier(config.token)
        ttl_s = float(config.result_ttl_hours) * 3600.0
        self.store = JobStore(config.store_dir, ttl_s)
        counts = self.store.recover()
        if counts["loaded"]:
            log.info("store: %(loaded)d earlier job(s), %(failed_on_restart)d interrupted by the restart", counts)
        workers = [Worker({"generate": functools.partial(self.run_generate, worker=i),
                           "reconstruct": functools.partial(self.run_reconstruct, worker=i)},
                          after_job=functools.partial(self._after_job, g.device), name=str(g.device))
                   for i, g in enumerate(self.generators)]
        self.manager = JobManager(self.store, workers, config.max_queue)
        self.purge_interval = config.purge_interval_s or min(max(ttl_s / 4, 0.5), 600.0)
        self._stop_purge = threading.Event()
        self.max_upload_bytes = int(config.max_upload_mb * 2**20)
        self.uploads_in_flight = 0  # changed on the event loop only

    # The first worker's pipelines: what the endpoints validate against (every worker has the same model).
    @property
    def generator(self) -> GenerationPipeline:
        """The first worker's generation pipeline."""
        return self.generators[0]

    @property
    def reconstructor(self) -> Any:
        """The first worker's reconstruction pipeline."""
        return self.reconstructors[0]

    @reconstructor.setter
    def reconstructor(self, pipeline: Any) -> None:  # tests swap in a stub: every worker then uses it
        self.reconstructors = [pipeline] * len(self.generators)

    def _build_reconstructor(self, generator: GenerationPipeline) -> tuple[Any, str]:
        # Generation keeps working when the model's ControlNets do not fit its denoiser (a CheckpointError);
        # any other error is a bug and must not be hidden behind "not available".
        from ..pipelines.reconstruct import ReconstructionPipeline

        try:
            return ReconstructionPipeline(generator.bundle, generator.device), ""
        except MedDiffusionError as exc:
            log.warning("reconstruction disabled: %s", exc)
            return None, f"reconstruction is not available with this model: {exc}"

    @staticmethod
    def _after_job(device: Any) -> None:
        if device.type == "cuda":
            import torch

            with torch.cuda.device(device):
                torch.cuda.empty_cache()  # give the memory of a large job back before the next one

    # ---- runners (worker thread) ---------------------------------------------------------------------
    def run_generate(self, rec: JobRecord, _input: Optional[Path], progress: ProgressCallback,
                     cancel: threading.Event, worker: int = 0) -> RunOutput:
        """Run a generation job on worker ``worker``'s pipeline (called on that worker's thread)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # rec.params: the GenerateOptions validated at the request; the pipeline checks them again itself
            r = self.generators[worker](**rec.params, progress=progress, cancel=cancel)
        r.warnings = tuple(str(w.message) for w in caught)
        return RunOutput({"result": r.image}, r.info())

    def run_reconstruct(self, rec: JobRecord, input_path: Optional[Path], progress: ProgressCallback,
                        cancel: threading.Event, worker: int = 0) -> RunOutput:
        """Run a reconstruction job on its uploaded volume with worker ``worker``'s pipeline."""
        if input_path is None or not input_path.is_file():
            raise InputError("the uploaded volume of this job is missing from the server's store")
        # rec.params: the ReconstructOptions validated at the request; the pipeline checks them again itself
        r = self.reconstructors[worker](read_stored_volume(input_path), **rec.params, progress=progress,
                                        cancel=cancel)
        images = {"result": r.image}
        if r.degraded is not None:
            images["degraded"] = r.degraded
        return RunOutput(images, r.info())

    # ---- background purge ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the job workers and the periodic purge of expired results."""
        self.manager.start()
        threading.Thread(target=self._purge_loop, name="meddiffusion-purge", daemon=True).start()

    def stop(self) -> None:
        """Stop the purge and shut the workers down."""
        self._stop_purge.set()
        self.manager.shutdown()

    def _purge_loop(self) -> None:
        while not self._stop_purge.wait(self.purge_interval):
            try:
                self.store.purge_expired()
            except Exception:
                log.exception("purging expired results failed")

    # ---- responses -----------------------------------------------------------------------------------
    def status(self, rec: JobRecord) -> dict[str, Any]:
        """The job's `JobStatus` as the JSON the endpoints answer with."""
        started = rec.started
        elapsed = 0.0 if started is None else (rec.finished or time.time()) - started
        return JobStatus(state=rec.state, kind=rec.kind, id=rec.id, current=rec.current, progress=rec.progress,
                         elapsed_s=elapsed,
                         queue_position=self.manager.queue_position(rec.id) if rec.state == QUEUED else None,
                         error=rec.error, created=rec.created, started=started, finished=rec.finished,
                         expires=self.store.expires_at(rec), params=rec.params, outputs=tuple(rec.outputs),
                         info=rec.info).to_json()

    def record_or_404(self, job_id: str) -> JobRecord:
        """The job's record, or an HTTP 404 that says how long results are kept."""
        rec = self.store.snapshot(job_id)
        if rec is None:
            raise HTTPException(404, f"unknown job id (results are kept {self.config.result_ttl_hours:g} h after "
                                "a job ends, then deleted)")
        return rec


def _declared_hu_range(bundle: ModelBundle) -> Optional[tuple[float, float]]:
    """The HU range the bundle's model.yaml declares for generated CT (the Slicer panel's default)."""
    from ..bundle_summary import OFFICIAL_HU_RANGE, summarize_bundle

    if bundle.source is None:
        return OFFICIAL_HU_RANGE if bundle.name == "official" else None
    try:
        return summarize_bundle(bundle.source).hu_range
    except MedDiffusionError as exc:
        log.warning("no HU range for the model: %s", exc)
        return None


def _validation_message(errors: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _form_to_params(fields: dict[str, str]) -> dict[str, Any]:
    # Empty or 'none' form values mean "server default" (HTML forms cannot send a null).
    return {k: v.strip() for k, v in fields.items() if v.strip().lower() not in ("", "none", "null")}


def create_app(config: ServerConfig) -> FastAPI:
    """Build the app: checks the security settings, loads the model, recovers the store (worker starts with
    the app's lifespan, i.e. when uvicorn starts serving)."""
    check_startup_security(config.host, config.token, config.insecure)
    svc = Services(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            svc.stop()

    # No /docs, /redoc or /openapi.json (they would answer without a token; docs/SERVER.md documents the API),
    # and no slash redirects (they would be built from the client's Host header).
    app = FastAPI(title="MedDiffusion server", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.services = svc

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc.errors())}, status_code=400)

    @app.exception_handler(MedDiffusionError)
    async def _user_error(_req: Request, exc: MedDiffusionError) -> JSONResponse:
        if isinstance(exc, QueueFull):
            return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": "30"})
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(UploadError)
    async def _upload_error(_req: Request, exc: UploadError) -> JSONResponse:
        headers = {"Retry-After": "30"} if exc.status == 503 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    # Every request passes the guard first: token from the headers before any body byte, streamed body caps.
    app.add_middleware(RequestGuard, verifier=svc.verifier, upload_limit_bytes=svc.max_upload_bytes,
                       body_idle_s=config.body_idle_s)

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse(version=__version__, auth_required=svc.verifier.enabled)

    api = APIRouter(prefix="/v1", redirect_slashes=False)

    @api.get("/models", response_model=ModelsResponse)
    async def models() -> ModelsResponse:
        b = svc.bundle
        anatomies = [AnatomyInfo(name=a.name, class_index=a.class_index, modality=a.modality,
                                 description=a.description, sizes_xyz=a.volume_sizes_xyz(b.downsample),
                                 spacing_xyz=a.spacing_xyz) for a in b.catalog]
        limits = Limits(max_queue=config.max_queue, max_upload_mb=config.max_upload_mb, max_voxels=config.max_voxels,
                        result_ttl_hours=config.result_ttl_hours, max_steps=svc.generator.diffusion.timesteps)
        return ModelsResponse(model=b.name, device=svc.device, downsample=b.downsample, anatomies=anatomies,
                              samplers=list(SAMPLERS),
                              default_steps={s: default_steps(s, b.timesteps) for s in SAMPLERS}, tasks=svc.tasks,
                              reconstruct_available=svc.reconstructor is not None, limits=limits,
                              hu_range=svc.hu_range)

    @api.get("/models/available", response_model=AvailableModelsResponse)
    async def available_models() -> AvailableModelsResponse:
        """The models on this machine's registry (`meddiffusion models list`), the loaded one marked."""
        from ..registry import list_models

        entries = await run_in_threadpool(list_models)  # walks model folders for their disk use
        here = Path(svc.bundle.source).resolve() if svc.bundle.source else None
        return AvailableModelsResponse(loaded=svc.bundle.name, models=[
            RegistryModelInfo(name=e.name, kind=e.kind, description=e.description, available=e.available,
                              loaded=here is not None and e.path is not None and e.path.resolve() == here,
                              disk_bytes=e.disk_bytes) for e in entries])

    @api.post("/generate", status_code=202)
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        # The library's checks against this model (anatomy, grid, HU range, steps): InputError -> 400.
        opts = GenerateOptions.from_mapping(req.model_dump()).validate(svc.bundle)
        if opts.size_xyz is not None and math.prod(parse_size(opts.size_xyz)) > config.max_voxels:
            raise InputError(f"size {'x'.join(map(str, opts.size_xyz))} exceeds the server's limit of "
                             f"{config.max_voxels} voxels")
        params = opts.as_dict()
        # In a worker thread: submitting writes (and fsyncs) the job record.
        return svc.status(await run_in_threadpool(svc.manager.submit, "generate", params))

    @api.post("/reconstruct", status_code=202)
    async def reconstruct(request: Request) -> dict[str, Any]:
        if svc.reconstructor is None:
            raise HTTPException(501, svc.recon_reason)
        if svc.uploads_in_flight >= MAX_CONCURRENT_UPLOADS:
            raise UploadError(503, f"the server is already receiving {MAX_CONCURRENT_UPLOADS} uploads; try again "
                              "in a minute")
        length = request.headers.get("content-length")
        declared = int(length) if length and length.isdigit() else None
        svc.uploads_in_flight += 1
        try:
            up = await receive_multipart(request.headers.get("content-type", ""), request.stream(),
                                         svc.store.uploads_dir, svc.max_upload_bytes, declared)
        finally:
            svc.uploads_in_flight -= 1
        try:
            try:
                params = ReconstructParams.model_validate(_form_to_params(up.fields))
            except ValidationError as exc:
                raise UploadError(400, _validation_message(exc.errors())) from None
            # The library's checks against this model (task, anatomy, bounds) before the upload is stored.
            opts = ReconstructOptions.from_mapping(params.model_dump()).validate(svc.bundle)
            path, suffix = await run_in_threadpool(store_upload, up, config.max_voxels)
            fields = {k: v for k, v in opts.as_dict().items() if k in ReconstructParams.model_fields}
            rec = await run_in_threadpool(svc.manager.submit, "reconstruct", fields, path, suffix)
        except BaseException:
            up.discard()
            raise
        return svc.status(rec)

    @api.get("/jobs/{job_id}")
    async def job_status(job_id: str) -> dict[str, Any]:
        return svc.status(svc.record_or_404(job_id))

    def _download(job_id: str, output: str) -> FileResponse:
        rec = svc.record_or_404(job_id)
        if rec.state != "done":
            why = f": {rec.error}" if rec.error else ""
            raise HTTPException(409, f"the job is {rec.state}{why}; results exist only for finished jobs")
        path = svc.store.output_path(rec, output)
        if path is None:
            raise HTTPException(404, f"this job has no {output} volume"
                                + (" (only reconstruction jobs have one)" if output == "degraded" else ""))
        label = rec.params.get("anatomy") or rec.params.get("task") or rec.kind
        suffix = "" if output == "result" else f"-{output}"
        return FileResponse(path, media_type="application/octet-stream",
                            filename=f"meddiffusion-{label}-{rec.id[:8]}{suffix}.nrrd")

    @api.get("/jobs/{job_id}/result")
    async def job_result(job_id: str) -> FileResponse:
        return _download(job_id, "result")

    @api.get("/jobs/{job_id}/degraded")
    async def job_degraded(job_id: str) -> FileResponse:
        return _download(job_id, "degraded")

    @api.post("/jobs/{job_id}/cancel")
    async def job_cancel(job_id: str) -> dict[str, Any]:
        svc.record_or_404(job_id)
        svc.manager.cancel(job_id)
        return svc.status(svc.record_or_404(job_id))

    app.include_router(api)
    return app
