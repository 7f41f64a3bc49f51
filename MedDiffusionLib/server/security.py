"""Who may talk to the server: bearer tokens, the loopback-only insecure mode, and unguessable job ids.

The server runs models on a GPU box that is often shared; anyone who can reach the port can queue work and read
results (patient-like volumes), so a token is required unless the server only listens on the loopback interface
and the operator asked for ``--insecure`` explicitly.
"""
from __future__ import annotations

import hmac
import ipaddress
import math
import os
import re
import secrets
import stat
import sys
from pathlib import Path
from collections import Counter
from typing import Mapping, Optional

from ..errors import MedDiffusionError

TOKEN_ENV = "MEDDIFFUSION_TOKEN"
MIN_TOKEN_LENGTH = 32
# Estimated from the token's own character frequencies (a lower bound for random tokens: 32 hex digits,
# i.e. secrets.token_hex(16), score about 100 bits; 'abcd' * 8 scores 64).
MIN_TOKEN_BITS = 80
MIN_TOKEN_DISTINCT = 8
# secrets.token_urlsafe(24) -> 32 characters of [A-Za-z0-9_-]; anything else is not one of our ids.
# \Z, not $: '$' also matches before a trailing newline.
JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{32}\Z")
TOKEN_HINT = "create one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\""


class SecurityConfigError(MedDiffusionError):
    """The server would start in an unsafe configuration; the message says how to fix it."""


def new_job_id() -> str:
    """A new unguessable job id (24 random bytes, URL-safe)."""
    return secrets.token_urlsafe(24)


def is_valid_job_id(job_id: str) -> bool:
    """Ids from requests become folder names in the store, so only our own alphabet and length pass."""
    return isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id) is not None


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
    """The token in a file (whitespace stripped); SecurityConfigError if it cannot be read or is empty."""
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
        check_token_strength(token)
    return token


def token_bits(token: str) -> float:
    """Entropy estimate in bits: length x Shannon entropy of the token's own character frequencies."""
    counts = Counter(token)
    n = len(token)
    return -n * sum(c / n * math.log2(c / n) for c in counts.values()) if n else 0.0


def _longest_arithmetic_run(token: str) -> int:
    # 'abcdef...', '0123...' or 'aaaa...': each character a constant step from the previous one.
    best = run = 1
    for i in range(2, len(token)):
        same = ord(token[i]) - ord(token[i - 1]) == ord(token[i - 1]) - ord(token[i - 2])
        run = run + 1 if same else 1
        best = max(best, run + 1)
    return best if len(token) > 1 else len(token)


def _is_periodic(token: str) -> bool:
    # 'abcd' * 10, 'password' * 4: a shorter string repeated (the last copy may be cut short).
    return any(all(token[i] == token[i + p] for i in range(len(token) - p)) for p in range(1, len(token) // 2 + 1))


def check_token_strength(token: str) -> None:
    """Refuse (SecurityConfigError) tokens that are short or guessable: the token is the only lock."""
    if any(c.isspace() for c in token) or not token.isprintable():
        raise SecurityConfigError("the token must be printable characters without spaces; " + TOKEN_HINT)
    if len(token) < MIN_TOKEN_LENGTH:
        raise SecurityConfigError(f"the token is too short ({len(token)} characters, need at least "
                                  f"{MIN_TOKEN_LENGTH}); {TOKEN_HINT}")
    if (len(set(token)) < MIN_TOKEN_DISTINCT or token_bits(token) < MIN_TOKEN_BITS
            or _longest_arithmetic_run(token) > len(token) // 2 or _is_periodic(token)):
        raise SecurityConfigError("the token is too predictable (repeated or sequential characters); use a "
                                  f"random one: {TOKEN_HINT}")


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
        """Whether requests need a token."""
        return self._token is not None

    def check(self, authorization: Optional[str]) -> bool:
        """Whether an Authorization header carries the token (compared in constant time)."""
        if self._token is None:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant-time: the comparison time must not tell an attacker how many leading characters matched.
        return hmac.compare_digest(value.strip().encode("utf-8"), self._token)
