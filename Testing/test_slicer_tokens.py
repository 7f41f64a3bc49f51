"""Server tokens in the Slicer module: bound to the origin they were entered for, never in the scene, never sent
over plain http to another machine, and a server URL from a loaded scene is only contacted after a yes."""
from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "MedDiffusion"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from MedDiffusionLib.errors import InputError  # noqa: E402
from MedDiffusionLogic import selfchecks  # noqa: E402
from MedDiffusionLogic.backends import RemoteBackend  # noqa: E402
from MedDiffusionLogic.parameters import MedDiffusionParameterNode, MedDiffusionParameters  # noqa: E402
from MedDiffusionLogic.tokens import (DictSettings, ServerTrust, TokenStore, check_transport,  # noqa: E402
                                      origin_of)


def test_origin_is_scheme_host_and_port():
    assert origin_of("HTTPS://GPU.example.org/md/") == "https://gpu.example.org:443"
    assert origin_of("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    assert origin_of("http://[::1]:9000") == "http://[::1]:9000"
    for bad in ("ftp://host", "host:8000", "", "http://host:99999"):
        with pytest.raises(InputError):
            origin_of(bad)


def test_tokens_are_bound_to_the_origin_they_were_entered_for():
    store = TokenStore(DictSettings())
    token = secrets.token_urlsafe(32)
    store.set("https://gpu.example.org:8443/md", token)
    assert store.get("https://gpu.example.org:8443/other/path") == token  # same origin, another path
    for other in ("https://evil.example.org:8443", "http://gpu.example.org:8443", "https://gpu.example.org:443",
                  "https://gpu.example.org.evil.net:8443", "https://gpu.example.org:8443@evil.net"):
        assert store.get(other) == "", other
    assert store.get("not a url") == ""


def test_a_scene_with_a_server_url_gets_no_token_and_needs_consent():
    """The attack: a shared scene whose parameter node names the attacker's server. Loading it must not make the
    module send the user's token there, nor contact it without asking."""
    settings = DictSettings()
    tokens, trust = TokenStore(settings), ServerTrust(settings)
    token = secrets.token_urlsafe(32)
    tokens.set("https://gpu.example.org", token)  # what the user entered for their own server
    trust.trust("https://gpu.example.org")

    scene = slicer.vtkMRMLScene()
    MedDiffusionParameterNode.get_or_create(scene).write(
        MedDiffusionParameters(backend="remote", server_url="https://attacker.example.net/x"))
    loaded = selfchecks._reload(scene)  # the scene as another user's Slicer loads it
    params = MedDiffusionParameterNode.get_or_create(loaded).read()
    assert params.server_url == "https://attacker.example.net/x"
    assert tokens.get(params.server_url) == ""  # the panel's token for this URL: none

    asked: list[str] = []
    assert not trust.allow(params.server_url, lambda text: asked.append(text) or False)
    assert asked and "attacker.example.net" in asked[0]
    assert not trust.is_trusted(params.server_url)
    assert trust.allow(params.server_url, lambda text: True)  # the user said yes: remembered
    assert trust.allow(params.server_url, lambda text: pytest.fail("asked twice"))
    assert trust.allow("https://gpu.example.org/v1", lambda text: pytest.fail("own server asked"))


def test_plain_http_to_another_machine_is_refused_when_a_token_is_set():
    token = secrets.token_urlsafe(32)
    with pytest.raises(InputError, match="plain http"):
        check_transport("http://gpu.example.org:8000", token)
    with pytest.raises(InputError, match="plain http"):
        RemoteBackend("http://10.1.2.3:8000", token).client()
    check_transport("http://gpu.example.org:8000", "")  # no token: nothing to leak
    check_transport("https://gpu.example.org", token)
    check_transport("http://127.0.0.1:8000", token)  # an SSH tunnel
    check_transport("http://localhost:8000", token)
    assert RemoteBackend("http://[::1]:8000", token).client().token == token


def test_token_never_enters_the_scene():
    scene = slicer.vtkMRMLScene()
    wrapper = MedDiffusionParameterNode.get_or_create(scene)
    wrapper.write(MedDiffusionParameters(backend="remote", server_url="https://gpu.example.org"))
    assert not any("token" in name.lower() for name in wrapper.node.GetParameterNames())
    assert "token" not in {f.lower() for f in MedDiffusionParameters.__dataclass_fields__}
