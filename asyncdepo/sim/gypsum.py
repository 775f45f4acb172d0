"""A faithful local gypsum (ArtifactDB) server: ``asyncdepo sim gypsum --port P --root DIR``.

The whole REST API of the real gypsum-worker (see ``docs/gypsum.md`` and the modules below), with the S3
bucket behind it simulated too: presigned PUT URLs point back at the simulator and expire, and the PUT
checks ``Content-MD5`` (400 ``BadDigest``). Identities come from the command line or a file, never from
the network: ``--identity TOKEN=user[:org1,org2]`` (repeatable) or ``--identities FILE``; ``--admin ID``
(a user or an organisation, repeatable) names the administrators. The simulator also answers GitHub's
``GET /user`` and ``GET /user/orgs`` so gypsum-client's ``set_access_token(token, github_url=<sim>)`` works.

Modules, one responsibility each:

* ``gypsum_store``  — the bucket on disk (``ROOT/bucket/<key>``) and the layout keys;
* ``gypsum_core``   — configuration, shared state, the JSON error shape, request helpers;
* ``gypsum_auth``   — identities, roles, permission/quota validation, the GitHub stand-in;
* ``gypsum_upload`` — upload start / presigned-file / complete / abort;
* ``gypsum_s3``     — presigned URLs and the PUT that stores an object;
* ``gypsum_admin``  — create, permissions, quota, probation, refresh, remove, unlock;
* ``gypsum_read``   — ``/file/``, ``/list`` and the ``/_sim/gypsum/`` control routes.

Every route goes through the shared fault injector (``--fault``); request bodies are read through
``faults.body(request)`` so byte counters (``/_sim/stats``) show what was sent, and re-sent.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from aiohttp import web

from asyncdepo.sim import gypsum_admin, gypsum_read, gypsum_upload
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.gypsum_auth import add_github_routes
from asyncdepo.sim.gypsum_core import (
    STATE_KEY,
    GypsumState,
    Identity,
    SimConfig,
    error_middleware,
    parse_identities_text,
    parse_identity,
)
from asyncdepo.sim.gypsum_store import Bucket
from asyncdepo.sim.server import make_app

__all__ = ["STATE_KEY", "GypsumState", "Identity", "SimConfig", "add_arguments", "build_app", "create_app"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's own flags (``--port``, ``--root``, ``--fault`` are common to every simulator)."""
    parser.add_argument("--identity", action="append", default=[], metavar="TOKEN=USER[:ORG,...]",
                        help="a GitHub token the simulator accepts, its user and organisations (repeatable)")
    parser.add_argument("--identities", type=Path, metavar="FILE",
                        help="identities file: JSON {token: {login, orgs}} or lines TOKEN=USER[:ORG,...]")
    parser.add_argument("--admin", action="append", default=[], metavar="ID",
                        help="an administrator (GitHub user or organisation; repeatable)")
    parser.add_argument("--presign-lifetime", type=float, default=3600.0, metavar="SECONDS",
                        help="validity of presigned PUT URLs (default 3600, as the real server)")
    parser.add_argument("--expire-first", type=int, default=0, metavar="N",
                        help="issue the first N presigned URLs already expired (to test re-presigning)")


def _secret(root: Path) -> bytes:
    """The URL-signing secret, kept in ROOT (0600) so presigned URLs survive a restart of the simulator."""
    path = root / "secret"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        value = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(value)
        return value


def config_from_args(root: Path, args: argparse.Namespace | None) -> SimConfig:
    """A SimConfig from parsed flags (None: no identities, no admins, defaults)."""
    identities: dict[str, Identity] = {}
    if args is not None and getattr(args, "identities", None):
        identities.update(parse_identities_text(Path(args.identities).read_text()))
    for spec in getattr(args, "identity", None) or []:
        token, ident = parse_identity(spec)
        identities[token] = ident
    return SimConfig(
        identities=identities,
        admins=tuple(getattr(args, "admin", None) or ()),
        presign_lifetime=float(getattr(args, "presign_lifetime", 3600.0) or 3600.0),
        expire_first=int(getattr(args, "expire_first", 0) or 0),
        secret=_secret(root),
    )


def build_app(root: Path, faults: FaultInjector, args: argparse.Namespace | None) -> web.Application:
    """The simulator application (the ``asyncdepo.sim.server`` contract)."""
    root.mkdir(parents=True, exist_ok=True)
    return _assemble(root, faults, config_from_args(root, args))


def create_app(
    root: Path,
    faults: FaultInjector | None = None,
    *,
    identities: Mapping[str, str | Identity] | None = None,
    admins: Iterable[str] = (),
    presign_lifetime: float = 3600.0,
    expire_first: int = 0,
) -> web.Application:
    """Convenience for tests and benchmarks: ``identities`` maps a token to ``"user[:org1,org2]"`` or an
    Identity."""
    root.mkdir(parents=True, exist_ok=True)
    idents: dict[str, Identity] = {}
    for token, value in (identities or {}).items():
        idents[token] = value if isinstance(value, Identity) else parse_identity(f"{token}={value}")[1]
    config = SimConfig(identities=idents, admins=tuple(admins), presign_lifetime=presign_lifetime,
                       expire_first=expire_first, secret=_secret(root))
    return _assemble(root, faults or FaultInjector(), config)


def _assemble(root: Path, faults: FaultInjector, config: SimConfig) -> web.Application:
    app = make_app(faults)
    app.middlewares.append(error_middleware)
    app[STATE_KEY] = GypsumState(Bucket(root), config)
    gypsum_upload.add_routes(app)
    gypsum_admin.add_routes(app)
    gypsum_read.add_routes(app)
    add_github_routes(app)
    return app
