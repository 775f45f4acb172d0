"""The PDIS API token store of ``asyncdepo login pdis``: ``$XDG_CONFIG_HOME/asyncdepo/pdis-token``, mode 0600,
JSON ``{server: token}``, written whole to a 0600 temporary file and renamed (never briefly readable by others);
``ASYNCDEPO_PDIS_TOKEN`` overrides it."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from asyncdepo.errors import AuthError

TOKEN_ENV = "ASYNCDEPO_PDIS_TOKEN"


def token_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "asyncdepo" / "pdis-token"


def _read_tokens() -> dict[str, str]:
    try:
        data = orjson.loads(token_path().read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_token(server: str, token: str) -> Path:
    """Store ``token`` for ``server`` in the 0600 token file (created 0600, never briefly wider)."""
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = _read_tokens()
    tokens[server] = token
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, orjson.dumps(tokens))
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def load_token(server: str) -> str:
    """The API token for ``server``: ``ASYNCDEPO_PDIS_TOKEN``, else the token file.

    :raises AuthError: none found.
    """
    token = os.environ.get(TOKEN_ENV) or _read_tokens().get(server)
    if not token:
        raise AuthError(f"no PDIS API token for {server}",
                        hint=f"run `asyncdepo login pdis --server {server}` or set {TOKEN_ENV}")
    return token
