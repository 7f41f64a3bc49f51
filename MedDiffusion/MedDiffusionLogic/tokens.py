"""Server tokens bound to the server they were entered for, and trust in server URLs that came from a scene.

A scene is shared data: it may carry any server URL. So (1) a token is stored in the application settings under
the origin (scheme://host:port) it was typed for, never in the scene, and only ever sent to that origin; (2) a
URL that arrived with a loaded scene is contacted only after the user agreed (remembered per origin); (3) a
token never travels over plain http to another machine (an SSH tunnel to 127.0.0.1 or https are required).

`settings` is anything with QSettings' `value(key, default)` / `setValue(key, value)` (QSettings in Slicer, a
dict adapter in tests).
"""
from __future__ import annotations

import base64
import urllib.parse
from typing import Any

from MedDiffusionLib.errors import InputError

__all__ = ["origin_of", "is_loopback_url", "check_transport", "TokenStore", "ServerTrust", "DictSettings"]

TOKENS_GROUP = "MedDiffusion/ServerTokens/"
TRUSTED_KEY = "MedDiffusion/TrustedServers"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str:
    """'HTTPS://Host.example:443/path' -> 'https://host.example:443' (scheme, host and port decide where a
    token goes; the path does not)."""
    parts = urllib.parse.urlsplit((url or "").strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InputError(f"server URL must look like http://host:port or https://host, got {url!r}")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise InputError(f"server URL has an invalid port: {url!r}") from None
    host = parts.hostname.lower()
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def is_loopback_url(url: str) -> bool:
    from MedDiffusionLib.client import _is_loopback

    return _is_loopback(urllib.parse.urlsplit(url.strip()).hostname or "")


def check_transport(url: str, token: str) -> None:
    """Refuse to send a token over plain http to a machine other than this one."""
    if token and urllib.parse.urlsplit(url.strip()).scheme.lower() == "http" and not is_loopback_url(url):
        raise InputError(f"refusing to send the access token over plain http to {origin_of(url)}: use an SSH "
                           "tunnel (http://127.0.0.1:PORT) or an https:// address")


def _key(origin: str) -> str:
    # Settings keys cannot hold ':' or '/' portably (QSettings groups): encode the origin.
    return TOKENS_GROUP + base64.urlsafe_b64encode(origin.encode("utf-8")).decode("ascii").rstrip("=")


class TokenStore:
    """Tokens per server origin in application settings."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def get(self, url: str) -> str:
        try:
            origin = origin_of(url)
        except InputError:  # not a server URL: no token for it
            return ""
        return str(self.settings.value(_key(origin), "") or "")

    def set(self, url: str, token: str) -> None:
        origin = origin_of(url)
        self.settings.setValue(_key(origin), token.strip())


class ServerTrust:
    """Which server origins the user agreed to contact. Typing a URL in the panel is agreement; a URL that only
    came with a loaded scene needs an explicit yes (`confirm`) before the first request."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def _trusted(self) -> list[str]:
        value = self.settings.value(TRUSTED_KEY, "") or ""
        items = value if isinstance(value, (list, tuple)) else str(value).split(" ")
        return [v for v in items if v]

    def is_trusted(self, url: str) -> bool:
        try:
            origin = origin_of(url)
        except InputError:  # not a server URL: not trusted
            return False
        return origin in self._trusted()

    def trust(self, url: str) -> None:
        origin = origin_of(url)
        trusted = self._trusted()
        if origin not in trusted:
            self.settings.setValue(TRUSTED_KEY, " ".join([*trusted, origin]))

    def allow(self, url: str, confirm: Any) -> bool:
        """True when `url` may be contacted: already trusted, or `confirm(message)` says yes (then remembered)."""
        if self.is_trusted(url):
            return True
        origin = origin_of(url)
        if confirm(f"The loaded scene asks MedDiffusion to contact the server\n\n    {origin}\n\nwhich you have "
                   "not used before. Contact it? Volumes you process will be sent there."):
            self.trust(url)
            return True
        return False


class DictSettings(dict):
    """A QSettings stand-in for headless use and tests."""

    def value(self, key: str, default: Any = None) -> Any:
        return self.get(key, default)

    def setValue(self, key: str, value: Any) -> None:  # noqa: N802 - QSettings' name
        self[key] = value
