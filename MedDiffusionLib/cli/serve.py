"""`meddiffusion serve`: run the HTTP job server (see docs/SERVER.md) with uvicorn."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .common import add_model_args, load_bundle_from_args


def default_store_dir() -> Path:
    """Where the server keeps jobs by default: $XDG_CACHE_HOME/meddiffusion/server (~/.cache if unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meddiffusion" / "server"


def register(sub: argparse._SubParsersAction) -> None:
    """Register `meddiffusion serve`."""
    p = sub.add_parser("serve", help="serve generation/reconstruction jobs over HTTP (for a GPU machine)",
                       description="Run the MedDiffusion job server. A bearer token ($MEDDIFFUSION_TOKEN or "
                       "--token-file) is required unless --insecure is given with a loopback --host. Keep the "
                       "default 127.0.0.1 and use an SSH tunnel or a TLS reverse proxy (docs/SERVER.md).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", metavar="DIR",
                   help="job records and results (default: $XDG_CACHE_HOME or ~/.cache, then meddiffusion/server)")
    p.add_argument("--token-file", metavar="FILE", help="file holding the access token (else $MEDDIFFUSION_TOKEN)")
    p.add_argument("--insecure", action="store_true",
                   help="no token (only allowed with a loopback --host such as 127.0.0.1)")
    p.add_argument("--max-queue", type=int, default=8, help="jobs waiting beyond the running one (then HTTP 429)")
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest accepted upload (HTTP 413)")
    p.add_argument("--max-voxels", type=int, default=512**3, help="largest volume accepted or generated")
    p.add_argument("--result-ttl-hours", type=float, default=24.0,
                   help="finished jobs and their results are deleted after this long")
    p.add_argument("--devices", metavar="LIST",
                   help="one worker per device, all fed by the one queue, e.g. cuda:0,cuda:1 (overrides --device)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """`meddiffusion serve`: check the security settings, claim the store folder and run the job server."""
    from ..errors import InputError
    from ..server.security import check_startup_security, resolve_token
    from ..server.store import claim_store_dir

    # Security first: refuse a bad configuration before spending a minute loading the model.
    token = resolve_token(args.token_file)
    check_startup_security(args.host, token, args.insecure)
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    for name in ("max_queue", "max_upload_mb", "max_voxels", "result_ttl_hours"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    # The store must be the server's own folder before a minute goes into loading the model.
    store = claim_store_dir(Path(args.store).expanduser() if args.store else default_store_dir())
    try:
        import uvicorn

        from ..server.app import ServerConfig, create_app
        from ..server.guard import uvicorn_config
    except ModuleNotFoundError as exc:
        raise InputError(f"the server needs '{exc.name}': pip install 'meddiffusion[server]'") from exc

    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    if devices is not None and (not devices or not all(devices)):
        raise InputError(f"--devices must be a comma-separated list such as cuda:0,cuda:1, got '{args.devices}'")
    from ..pipelines.common import resolve_device

    for d in devices or [args.device]:
        resolve_device(d)  # an unavailable GPU is refused before the model loads
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if token is not None and args.insecure:
        print("meddiffusion: note: a token is configured, so it is required despite --insecure", file=sys.stderr)
    bundle = load_bundle_from_args(args)
    config = ServerConfig(store_dir=store, bundle=bundle, device=args.device, devices=devices, host=args.host,
                          token=token, insecure=args.insecure, max_queue=args.max_queue,
                          max_upload_mb=args.max_upload_mb, result_ttl_hours=args.result_ttl_hours,
                          max_voxels=args.max_voxels)
    app = create_app(config)
    svc = app.state.services
    print(f"meddiffusion server {bundle.name} on {svc.device}: http://{args.host}:{args.port} "
          f"({'token required' if token else 'NO TOKEN, loopback only'}), store {store}", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, log_level=args.log_level,
                                  timeout_graceful_shutdown=10)).run()
    return 0
