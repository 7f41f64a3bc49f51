"""Who may talk to the server: bearer tokens, the loopback-only insecure mode, and unguessable job ids.

The server runs models on a GPU box that is often shared; anyone who can reach the port can queue work and read
results (patient-like volumes), so a token is required unless the server only listens on the loopback interface
and the operator asked for ``--insecure`` explicitly.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import re
import secrets
import stat
import sys
from pathlib import Path
from typing import Mapping, Optional

from ..errors import MedDiffusionError

TOKEN_ENV = "MEDDIFFUSION_TOKEN"
MIN_TOKEN_LENGTH = 16
# secrets.token_urlsafe(24) -> 32 characters of [A-Za-z0-9_-]; anything else is not one of our ids.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{32}$")
TOKEN_HINT = "create one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\""


class SecurityConfigError(MedDiffusionError):
    """The server would start in an unsafe configuration; the message says how to fix it."""


def new_job_id() -> str:
    return secrets.token_urlsafe(24)


def is_valid_job_id(job_id: str) -> bool:
    """Ids from requests become folder names in the store, so only our own alphabet and length pass."""
    return bool(JOB_ID_RE.match(job_id or ""))


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; wildcard binds (0.0.0.0, ::) and names are not loopback."""
    name = (host or "").strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name could resolve to anything: treat as reachable from outside


def read_token_file(path: str | os.PathLike[str]) -> str:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the token file '{p}': {exc.strerror or exc}") from exc
    token = text.strip()
    if not token:
        raise SecurityConfigError(f"the token file '{p}' is empty; {TOKEN_HINT}")
    if os.name == "posix" and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"meddiffusion: warning: token file '{p}' is readable by other users; run chmod 600 on it",
              file=sys.stderr)
    return token


def resolve_token(token_file: Optional[str], env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The token from ``token_file`` if given, else from $MEDDIFFUSION_TOKEN; None when neither is set."""
    env = os.environ if env is None else env
    if token_file:
        token = read_token_file(token_file)
    else:
        token = (env.get(TOKEN_ENV) or "").strip() or None
    if token is not None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise SecurityConfigError(f"the token is too short ({len(token)} characters, need at least "
                                      f"{MIN_TOKEN_LENGTH}); {TOKEN_HINT}")
        if any(c.isspace() for c in token) or not token.isprintable():
            raise SecurityConfigError("the token must be printable characters without spaces; " + TOKEN_HINT)
    return token


def check_startup_security(host: str, token: Optional[str], insecure: bool) -> None:
    """Refuse to start (SecurityConfigError) unless a token is set, or --insecure on a loopback address."""
    if insecure and not is_loopback(host):
        raise SecurityConfigError(
            f"refusing to start: --insecure (no token) is only allowed on a loopback address such as 127.0.0.1, "
            f"but the host is '{host}'. Set a token (${TOKEN_ENV} or --token-file) to listen on other interfaces, "
            "or keep 127.0.0.1 and reach the server through an SSH tunnel (see docs/SERVER.md)")
    if not insecure and not token:
        raise SecurityConfigError(
            f"refusing to start without an access token: set ${TOKEN_ENV} or pass --token-file FILE "
            f"({TOKEN_HINT}); for a local test on 127.0.0.1 only, pass --insecure")


class TokenVerifier:
    """Checks 'Authorization: Bearer <token>' headers; with no token configured every request passes."""

    def __init__(self, token: Optional[str]) -> None:
        self._token = token.encode("utf-8") if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: Optional[str]) -> bool:
        if self._token is None:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant-time: the comparison time must not tell an attacker how many leading characters matched.
        return hmac.compare_digest(value.strip().encode("utf-8"), self._token)
