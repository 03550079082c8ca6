"""Who a registry client is, and where its credentials may go.

The user and password for a registry (``VULCAN_REGISTRY_USER``/``PASSWORD``, else Docker's
``config.json``), what a registry's ``WWW-Authenticate`` challenge asks for, and the origin
(scheme, host, port) that decides where credentials and tokens are sent: client.py sends them to
the registry's own origin only (see the threat model in docs/reliability.md).
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import urlsplit

from .. import settings
from ..errors import SettingError


def credentials_for(registry: str, environment: bool = True) -> tuple[str, str] | None:
    """The user and password for ``registry``: VULCAN_REGISTRY_USER/PASSWORD (unless not
    ``environment``: they name no registry, so a build that reaches several never sends them),
    else Docker's config.json (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``,
    ``auths``: the host, ``https://host`` or ``https://host/v1/``; ``auth`` base64
    ``user:password``, or ``username``/``password``), else None (anonymous). Credential helpers
    are not run."""
    given = settings.registry_user() if environment else None
    if given is not None:
        return given
    config = settings.docker_config() / "config.json"
    try:
        auths = json.loads(config.read_text()).get("auths", {})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise SettingError(f"{config} is not a Docker config.json: {exc}", hint="fix or move it") from None
    for key in (registry, f"https://{registry}", f"https://{registry}/v1/", f"http://{registry}"):
        entry = auths.get(key) if isinstance(auths, dict) else None
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError:
                raise SettingError(f"{config}: auths[{key!r}].auth is not base64 of user:password") from None
            return user, password
        if entry.get("username") and entry.get("password"):
            return str(entry["username"]), str(entry["password"])
    return None


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """A ``WWW-Authenticate`` header: its scheme (lower case) and its parameters."""
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL: where credentials may go is decided by it."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port


CREDENTIALS_HINT = (
    "set VULCAN_REGISTRY_USER and VULCAN_REGISTRY_PASSWORD, or log in so that Docker's config.json "
    "(DOCKER_CONFIG, ~/.docker/config.json) has this registry under 'auths'"
)
