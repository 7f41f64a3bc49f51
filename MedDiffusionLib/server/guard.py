"""What may reach the application: the token is checked from the headers before any body byte is read, bodies
are capped by the bytes that actually stream in (not only by Content-Length) and must keep arriving, and
connections that never finish their request headers are closed.

Two layers: ``RequestGuard`` (pure ASGI middleware, inside the app) and ``uvicorn_config`` (socket-level limits
for the uvicorn server that serves the app, used by ``meddiffusion serve`` and the tests alike).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Optional

from fastapi.responses import JSONResponse

from .security import TokenVerifier

MAX_JSON_BYTES = 64 * 1024          # a generate request is a few hundred bytes
OPEN_PATHS = ("/health",)           # the only endpoint that answers without a token
UPLOAD_PATH = "/v1/reconstruct"     # the one endpoint with a large body; everything else is JSON or empty
# The upload endpoint gives its own, friendlier 413 (it reads on a little so the client sees the answer); this
# backstop beyond the file limit covers multipart framing, form fields and that drain.
UPLOAD_BACKSTOP_BYTES = 80 * 2**20
# A body must make progress: no gap longer than BODY_IDLE_S between chunks, and after BODY_GRACE_S at least
# BODY_MIN_RATE bytes per second on average (a 512 MB upload at 64 KB/s still fits; a trickle does not).
BODY_IDLE_S = 30.0
BODY_GRACE_S = 60.0
BODY_MIN_RATE = 64 * 1024
# Request headers must be complete this long after the connection opens (or after the previous response).
HEADER_TIMEOUT_S = 20.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 64                # beyond: 503 (uvicorn limit_concurrency)
MAX_HEADER_BYTES = 16 * 1024        # h11's limit on an incomplete request head

AUTH_MESSAGE = "missing or wrong access token (send 'Authorization: Bearer <token>')"


class _BodyRefused(BaseException):
    # BaseException: FastAPI turns any Exception raised while it reads a body into a generic 400.
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class RequestGuard:
    """Pure ASGI middleware: authenticate from the headers, then hand on a ``receive`` that counts and times
    the body. A refusal is answered without reading the rest of the body (the server then closes the
    connection), so an unauthenticated or oversized body never reaches memory."""

    def __init__(self, app: Any, verifier: TokenVerifier, upload_limit_bytes: int,
                 body_idle_s: float = BODY_IDLE_S, body_grace_s: float = BODY_GRACE_S,
                 body_min_rate: float = BODY_MIN_RATE) -> None:
        self.app = app
        self.verifier = verifier
        self.upload_limit = int(upload_limit_bytes) + UPLOAD_BACKSTOP_BYTES
        self.body_idle_s, self.body_grace_s, self.body_min_rate = body_idle_s, body_grace_s, body_min_rate

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        """The ASGI entry point: check size, pace and headers of a request, then pass it on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path not in OPEN_PATHS and not self.verifier.check(_header(scope, b"authorization")):
            await JSONResponse({"detail": AUTH_MESSAGE}, status_code=401,
                               headers={"WWW-Authenticate": "Bearer", "Connection": "close"})(scope, receive, send)
            return
        limit = self.upload_limit if path == UPLOAD_PATH and scope.get("method") == "POST" else MAX_JSON_BYTES
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _refuse(scope, receive, send, 413, _too_large(limit))
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._metered(receive, limit), tracking_send)
        except _BodyRefused as exc:
            if started:
                raise
            await _refuse(scope, receive, send, exc.status, exc.message)

    def _metered(self, receive: Callable[[], Awaitable[dict]], limit: int) -> Callable[[], Awaitable[dict]]:
        received = 0
        body_done = False
        start = time.monotonic()

        async def metered_receive() -> dict:
            nonlocal received, body_done
            if body_done:  # afterwards only a disconnect can arrive (a streaming response listens for it)
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_idle_s)
            except asyncio.TimeoutError:
                raise _BodyRefused(408, f"the request body stalled (nothing received for {self.body_idle_s:g} s)") \
                    from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise _BodyRefused(413, _too_large(limit))
                elapsed = time.monotonic() - start
                if not body_done and elapsed > self.body_grace_s and received < self.body_min_rate * elapsed:
                    raise _BodyRefused(408, f"the request body arrives too slowly ({received / elapsed / 1024:.0f} "
                                       f"KB/s; at least {self.body_min_rate / 1024:.0f} KB/s is needed)")
            return message

        return metered_receive


def _header(scope: dict, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _too_large(limit: int) -> str:
    if limit == MAX_JSON_BYTES:
        return f"request body too large (at most {MAX_JSON_BYTES // 1024} KB for this endpoint)"
    return (f"the upload exceeds the server's limit of {(limit - UPLOAD_BACKSTOP_BYTES) / 2**20:g} MB "
            "(server option --max-upload-mb)")


async def _refuse(scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
    # Connection: close: the unread rest of the body must not be parsed as a next request.
    await JSONResponse({"detail": message}, status_code=status,
                       headers={"Connection": "close"})(scope, receive, send)


def _guarded_h11_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, plus a deadline for complete request headers (uvicorn's keep-alive timer is
    cancelled by the first byte, so a client dripping its headers would otherwise hold the socket forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self.loop.call_later(header_timeout_s, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle_when_armed: Any) -> None:
            # Still the same request cycle as when armed: no new complete request head arrived in time.
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app: Any, host: str, port: int, header_timeout_s: float = HEADER_TIMEOUT_S,
                   max_connections: int = MAX_CONNECTIONS, **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` with the server's connection limits: header deadline, short keep-alive, bounded
    request heads and a cap on concurrent connections."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, http=_guarded_h11_protocol(header_timeout_s),
                            timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=max_connections,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, server_header=False, **kwargs)
    return config
