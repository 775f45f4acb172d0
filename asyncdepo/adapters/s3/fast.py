"""The S3 data path without botocore's per-request machinery: PutObject and UploadPart as one aiohttp PUT
signed with AWS Signature V4 by botocore's signer (``UNSIGNED-PAYLOAD``; the body is protected by the
checksum headers S3 verifies, see :mod:`asyncdepo.adapters.s3.checksums`).

Why: botocore spends ~0.8 ms of event-loop CPU per request (event hooks, endpoint rules, serialising,
signing through its header classes, parsing), more than the whole aiohttp request of a 1 MiB body;
on 1,000 small files that was the largest single cost in the loop. Everything else — credentials,
endpoint resolution, region redirects, the control operations — stays with aiobotocore.

How the two paths meet (:class:`FastPath`):

* The first data request of a run goes through aiobotocore; an event hook records the URL botocore
  resolved (minus the encoded key and the query) and the signing region from the credential scope.
  From then on, requests for the same bucket are built from that base, so addressing style, endpoint
  rules and region are botocore's.
* Credentials are the client's own (refreshed by aiobotocore when they expire); the secret goes only to
  botocore's signer. Errors are parsed from S3's XML and mapped like botocore's.
* A redirect (301/307, PermanentRedirect, AuthorizationHeaderMalformed) switches the fast path off
  and that request is repeated through aiobotocore, which knows how to follow S3's region redirects.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from typing import Any
from urllib.parse import quote

import aiohttp
import aiohttp.payload
import anyio
from yarl import URL

from asyncdepo.contract import ByteSource
from asyncdepo.transport.httpbody import SourcePayload, ViewPayload, proxy_request_class
from asyncdepo.transport.s3errors import map_error_response, map_s3_error, parse_s3_xml

log = logging.getLogger(__name__)

_REDIRECT_CODES = frozenset(
    {
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "TemporaryRedirect",
        "IllegalLocationConstraintException",
    }
)
_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/s3/aws4_request")


class SigV4:
    """AWS Signature Version 4 for S3 with an unsigned payload, by botocore's ``S3SigV4Auth``.

    botocore's signer replaced a hand-written one (issue: libraries over our own code, unless a library is
    more than 5 % slower in the same benchmark run). Measured, 1,000 x 1 MiB PutObject into the nginx sink
    (2026-12-04, a 2-core machine loaded by other jobs): ``benchmarks.peers`` 13:33, median of 3 runs,
    wall 1.02x ours (16.9 s vs 16.5 s) and client CPU 1.21x (3.63 vs 3.00 s); 9 paired runs
    (alternating, same sink) wall 1.02x and CPU 1.10x. So not more than 5 % slower in wall time, and kept;
    its costs: ~130 us of CPU more per request (215 vs 87 us in a loop), botocore imported by runs that
    otherwise never need it (+0.3 s of start-up CPU, +7 MB of RSS on 1,000 small files).
    """

    def __init__(self, region: str) -> None:
        from types import SimpleNamespace

        self.region = region
        # what S3SigV4Auth reads of a client's config: the payload is not signed (UNSIGNED-PAYLOAD)
        self._config = SimpleNamespace(s3={"payload_signing_enabled": False})
        self._auth: Any = None
        self._creds: tuple[str, str, str | None] | None = None

    def sign(self, method: str, url: str, headers: dict[str, str], access_key: str, secret_key: str,
             token: str | None) -> dict[str, str]:
        """``headers`` (which must hold ``host`` and every header to sign, e.g. the checksum headers) with
        ``X-Amz-Date``, ``X-Amz-Content-SHA256: UNSIGNED-PAYLOAD``, the token and ``Authorization`` added.

        :param url: the URL exactly as it is sent (path already percent-encoded).
        """
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import ReadOnlyCredentials

        if self._auth is None or self._creds != (access_key, secret_key, token):
            self._creds = (access_key, secret_key, token)
            self._auth = S3SigV4Auth(ReadOnlyCredentials(access_key, secret_key, token), "s3", self.region)
        request = AWSRequest(method=method, url=url, headers=headers)
        request.context["client_config"] = self._config
        self._auth.add_auth(request)
        return dict(request.headers.items())


class FastPath:
    """Signed aiohttp PUTs for PutObject/UploadPart once botocore has shown the way (see module docs).

    :param client: the aiobotocore S3 client (for its credentials and to learn the URL base).
    :param bucket: the bucket every key belongs to.
    :param pool_size: connections to keep (the engine's transfers + a few).
    """

    def __init__(self, client: Any, bucket: str, pool_size: int, *, base: str | None = None,
                 region: str | None = None, credentials: tuple[str, str, str | None] | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.pool_size = pool_size
        self.base: str | None = base  # everything before the encoded key, e.g. http://h:9000/bucket/
        self.signer: SigV4 | None = SigV4(region) if region and base else None
        self._static = credentials  # (key id, secret, token) when the adapter started without botocore
        self.enabled = True
        self._session: aiohttp.ClientSession | None = None
        self.expecting: set[str] = set()  # keys of data requests in flight through botocore
        if client is not None:
            client.meta.events.register("before-send.s3.PutObject", self._learn)
            client.meta.events.register("before-send.s3.UploadPart", self._learn)

    @property
    def ready(self) -> bool:
        return self.enabled and self.base is not None and self.signer is not None

    def _learn(self, request: Any, **_: Any) -> None:
        """botocore's prepared request -> the URL base and signing region (never the headers' secrets).

        The keys being sent through botocore are in ``expecting``; the URL must end with exactly one of
        them, encoded as botocore encodes keys, else nothing is learned (the next request may teach it): with
        ``b`` and ``a/b`` in flight, ``.../bucket/a/b`` could be either, and a base learned from the wrong
        one would send every later object to another key.
        """
        if self.base is not None or not self.enabled:
            return
        try:
            url = str(request.url).split("?", 1)[0]
            auth = request.headers.get("Authorization") or b""
            auth = auth.decode() if isinstance(auth, bytes) else str(auth)
            match = _SCOPE.search(auth)
            bases = [url[: len(url) - len(encoded)] for key in self.expecting
                     if url.endswith("/" + (encoded := quote(key, safe="/~")))]
            if match and len(bases) == 1:
                self.base = bases[0]
                self.signer = SigV4(match.group(1))
        except Exception:  # learning is best effort: without it, requests keep going through botocore
            log.debug("s3 fast path: could not learn the endpoint", exc_info=True)

    def _session_for(self) -> aiohttp.ClientSession:
        if self._session is None:
            ctx: ssl.SSLContext | bool = True
            if self.base and self.base.startswith("https") and os.environ.get("AWS_CA_BUNDLE"):
                ctx = ssl.create_default_context(cafile=os.environ["AWS_CA_BUNDLE"])
            # no total here: each request gets its own deadline scaled to its size (anyio.fail_after)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=20, sock_read=120)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool_size, ssl=ctx, keepalive_timeout=60),
                timeout=timeout,
                auto_decompress=False,
                skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent"),
                request_class=proxy_request_class(),  # through the environment's proxy, as botocore goes
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def put(
        self,
        key: str,
        body: memoryview | ByteSource,
        size: int,
        extra: dict[str, str],
        deadline: float,
        what: str,
        query: str = "",
    ) -> tuple[str, dict[str, str]] | None:
        """PUT ``body`` (a flat view, or a ByteSource of ``size`` bytes streamed as it is read) to ``key``
        with the signed headers ``extra`` (integrity headers); ``query`` e.g. ``partNumber=2&uploadId=...``.
        Returns the ETag and the response headers (lower-cased), or None when S3 redirected us (the fast
        path is then off and the caller repeats it through botocore).

        :raises DepoError: the mapped S3 error or transport failure.
        """
        assert self.base is not None and self.signer is not None
        url = self.base + quote(key, safe="/~") + (f"?{query}" if query else "")
        parsed = URL(url, encoded=True)
        host = parsed.host or ""
        if parsed.port is not None and not parsed.is_default_port():
            host = f"{host}:{parsed.port}"
        if self._static is not None:
            access_key, secret_key, token = self._static
        else:
            source = getattr(getattr(self.client, "_request_signer", None), "_credentials", None)
            if source is None:  # unsigned client, or botocore moved its credentials: let botocore send it
                self.enabled = False
                return None
            creds = await source.get_frozen_credentials()
            access_key, secret_key, token = creds.access_key, creds.secret_key, creds.token
        headers = self.signer.sign("PUT", url, {"host": host, **extra}, access_key, secret_key, token)
        headers["Content-Length"] = str(size)
        data: aiohttp.payload.Payload = (ViewPayload(body) if isinstance(body, memoryview)
                                         else SourcePayload(body))
        session = self._session_for()
        try:
            with anyio.fail_after(deadline):
                async with session.put(parsed, data=data, headers=headers, allow_redirects=False) as resp:
                    raw = await resp.read()
                    lower = {k.lower(): v for k, v in resp.headers.items()}
                    if resp.status < 300:
                        return lower.get("etag", ""), lower
        except Exception as exc:  # noqa: BLE001 - the error boundary: everything is mapped
            raise map_s3_error(exc, what) from None
        code, message = parse_s3_xml(raw)
        if resp.status in (301, 307) or code in _REDIRECT_CODES:
            log.info(
                "s3 fast path: %s answered %s; sending through botocore from now on",
                what,
                code or resp.status,
            )
            self.enabled = False
            return None
        raise map_error_response(resp.status, code, message, lower, what=what)
