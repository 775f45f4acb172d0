"""Set-up of the botocore clients the S3 adapter uses: the CA bundle for requests made outside botocore, one
shared data loader (the parsed service model), and a User-Agent built once per client."""

from __future__ import annotations

import contextlib
import os
import ssl
from typing import Any

_LOADER: Any = None


def ssl_context() -> ssl.SSLContext | None:
    """The CA bundle botocore would use (``AWS_CA_BUNDLE``), for requests made outside botocore."""
    bundle = os.environ.get("AWS_CA_BUNDLE")
    return ssl.create_default_context(cafile=bundle) if bundle else None


def share_loader(session: Any) -> None:
    """Reuse one botocore data loader (the parsed S3 service model and endpoint rules) across sessions:
    a new client then costs ~25 ms instead of ~150 ms (push then pull, tests, sweeps). The loader only
    caches parsed JSON files, so sharing it across event loops and threads is safe."""
    global _LOADER
    if _LOADER is None:
        _LOADER = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _LOADER)


def trim_per_request_work(client: Any) -> None:
    """Build botocore's User-Agent string once instead of twice per request.

    botocore formats it when it serialises every request and again just before sending (to add
    feature-id metrics); together ~0.3 ms of CPU per request, a quarter of its overhead on a 1 MiB
    PutObject, for a header S3 does not need to change. Best effort: these are private attributes, and
    if they move, requests simply cost what they cost before.
    """
    creator = getattr(client, "_user_agent_creator", None)
    handler = getattr(creator, "rebuild_and_replace_user_agent_handler", None)
    with contextlib.suppress(Exception):
        if handler is not None:
            client.meta.events.unregister("request-created.s3", handler)
        if creator is not None:
            text = creator.to_string()
            creator.to_string = lambda: text
