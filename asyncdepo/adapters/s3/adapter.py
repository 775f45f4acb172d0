"""S3 (and S3-compatible servers) as a target and a source: ``s3://BUCKET/PREFIX`` on aiobotocore.

Push: a file that fits in one chunk goes as one PutObject; a larger file as a multipart upload whose parts
the engine's workers send concurrently as streams (``Features.part_streams``: no part is held in memory;
see :mod:`asyncdepo.adapters.s3.writer`). Every body carries ``x-amz-checksum-crc64nvme`` (or the
``--s3-checksum`` algorithm) computed by the engine while reading, which S3 checks against what it
received; the checksum S3 reports back is compared with ours, and so is the full-object value of a
multipart upload, composed from the parts' values (CRC combine, no second pass). Content-MD5 (and the ETag
comparison it allows) only with ``--s3-md5``. The UploadId and the finished parts with their checksums
are journaled through ``ChunkWriter.state()``; a re-run asks ListParts and sends only missing parts.

Pull: ``list_remote`` pages through ListObjectsV2 under the prefix (an md5 is published only for objects
whose ETag is a plain md5, i.e. not multipart); each object is fetched through a presigned GetObject URL
by the engine's threaded GET (``plain_get``), or, behind a proxy, by ``read``: GetObject with a Range.

Credentials come from the standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` or ``profile=``, shared config files, instance roles) or from
``secrets`` (a mapping with ``aws_access_key_id``/``aws_secret_access_key``/``aws_session_token``); they
never reach a message, ``describe()`` or the journal.

Client settings, and why:

* botocore's own retries are off (``total_max_attempts=1``): the engine retries, with the journal.
* ``max_pool_connections`` = the engine's transfers + 4 (control calls: create/complete/list), 64
  when no config is given.
* The payload is not SHA-256-signed (``payload_signing_enabled=False``): the CRC checksum already protects
  it and signing would hash every byte a second time with a costlier digest. botocore computes no checksum
  of its own (``request_checksum_calculation="when_required"``): we pass the one the engine computed.
* ``parameter_validation=False`` so a chunk's memoryview goes to aiohttp as the body without a copy
  (botocore's validator accepts only bytes/bytearray/file objects); we build every parameter ourselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

import anyio

from asyncdepo import errors
from asyncdepo.adapters.s3 import checksums
from asyncdepo.adapters.s3.botoclient import share_loader, ssl_context, trim_per_request_work
from asyncdepo.adapters.s3.etags import etag_md5
from asyncdepo.adapters.s3.writer import S3Writer
from asyncdepo.contract import (
    Adapter,
    ByteSource,
    ChunkWriter,
    Features,
    Item,
    PlainGet,
    RemoteItem,
    register,
)
from asyncdepo.transport.s3errors import map_s3_error

MiB = 1 << 20
GiB = 1 << 30
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{0,254}$", re.IGNORECASE)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without surrounding slashes).

    :raises UsageError: not an s3 URL, or no bucket.
    """
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise errors.UsageError(f"not an s3:// URL: {url!r}", hint="use s3://BUCKET/PREFIX")
    bucket = parts.netloc
    if not bucket or not _BUCKET.match(bucket):
        raise errors.UsageError(f"no valid bucket in {url!r}", hint="use s3://BUCKET/PREFIX")
    return bucket, parts.path.strip("/")




def request_deadline(nbytes: int) -> float:
    """Total seconds allowed for one request moving ``nbytes``: generous (64 KiB/s floor) but finite, so a
    stuck request is retried rather than waited on forever."""
    return 60.0 + nbytes / (64 * 1024)


def _public_endpoint(endpoint_url: str | None) -> str | None:
    """The endpoint without userinfo or query (a URL may carry credentials there)."""
    if not endpoint_url:
        return None
    p = urlsplit(endpoint_url)
    host = p.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if p.port:
        netloc += f":{p.port}"
    return urlunsplit((p.scheme, netloc, p.path.rstrip("/"), "", ""))


@register("s3")
class S3Adapter(Adapter):
    """``s3://BUCKET/PREFIX``; use as ``async with S3Adapter(url, config) as adapter``.

    :param url: ``s3://BUCKET/PREFIX``; objects are named ``PREFIX/<item.rel>``.
    :param config: the engine configuration (``transfers`` sizes the connection pool).
    :param secrets: optional mapping with ``aws_access_key_id``, ``aws_secret_access_key`` and
        ``aws_session_token``; otherwise the standard AWS chain (environment, profile, instance role).
    :param endpoint_url: an S3-compatible server (path-style addressing is used with it).
    :param region: the signing region (default: from the environment/profile, else us-east-1).
    :param profile: a profile of the shared AWS config files.
    :param fast_path: send PutObject/UploadPart as signed aiohttp PUTs once botocore has resolved the
        endpoint (see :mod:`asyncdepo.adapters.s3.fast`); False sends everything through aiobotocore.
    :param checksum: the additional checksum sent with every body (``crc64nvme``, ``crc32c``, ``crc32``) or
        ``none`` (``--s3-checksum``), see :mod:`asyncdepo.adapters.s3.checksums`.
    :param md5: also send Content-MD5 with every body (``--s3-md5``), for endpoints that demand it.
    :raises UsageError: a malformed URL.
    """

    name = "s3"
    #: keys per ListObjectsV2 page and parts per ListParts page (S3's maximum; tests lower them)
    list_page_size = 1000
    features = Features(
        multipart=True,
        part_streams=True,
        resumable=True,
        chunk_digests=("crc64nvme",),
        server_digest="crc64nvme",
        min_part_size=5 * MiB,
        max_part_size=5 * GiB,
        max_parts=10_000,
        pull=True,
    )

    def __init__(
        self,
        url: str,
        config: Any,
        secrets: Mapping[str, str] | None = None,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        fast_path: bool = True,
        checksum: str = "crc64nvme",
        md5: bool = False,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        if importlib.util.find_spec("aiobotocore") is None:  # an optional dependency: say how to get it
            raise errors.UsageError("s3:// targets need aiobotocore, which is not installed",
                                    hint="pip install 'asyncdepo[s3]'")
        if checksum not in (*checksums.ALGORITHMS, "none"):
            raise errors.UsageError(f"--s3-checksum {checksum!r}: choose from {', '.join(checksums.ALGORITHMS)}, none")
        #: the additional checksum sent with every body (None: none), and whether Content-MD5 is sent too
        self.checksum: str | None = None if checksum == "none" else checksum
        self.md5 = md5
        # what the engine computes per part and per file depends on these options
        self.features = dataclasses.replace(
            type(self).features,
            chunk_digests=tuple(a for a in (self.checksum, "md5" if md5 else None) if a),
            server_digest=self.checksum or ("md5" if md5 else None),
        )
        self.fast_path = fast_path
        self._fast: Any = None
        self.config = config
        self.endpoint_url = endpoint_url
        self.region = region
        self.profile = profile
        self._secrets = dict(secrets) if secrets else {}
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client_lock = anyio.Lock()
        # the pool only caps connections (they open on demand): without a config, leave room for any
        # --transfers rather than queue requests behind a small pool
        transfers = getattr(config, "transfers", None)
        self.pool_size = int(transfers) + 4 if transfers else 64

    def __repr__(self) -> str:  # never the secrets
        return f"S3Adapter({self.describe()!r})"

    # -- lifecycle ----------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if not self._start_fast_path_alone():
            await self.client()
        return self

    def _static_credentials(self) -> tuple[str, str, str | None] | None:
        """Keys given to the adapter, or in the environment (which botocore's chain would pick first)."""
        if self._secrets.get("aws_access_key_id") and self._secrets.get("aws_secret_access_key"):
            return (self._secrets["aws_access_key_id"], self._secrets["aws_secret_access_key"],
                    self._secrets.get("aws_session_token"))
        env = os.environ
        if self.profile is None and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            return env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN")
        return None

    async def handoff(self) -> dict[str, Any]:
        """Credentials resolved here (keys, profile, instance role: frozen, a session token included) and
        the region, for copies of the adapter on a cluster's workers, which may have no AWS configuration.

        :raises AuthError: no credentials could be found.
        """
        creds = self._static_credentials()
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if creds is None:
            from aiobotocore.session import AioSession

            session = AioSession(profile=self.profile) if self.profile else AioSession()
            found = await session.get_credentials()
            if found is None:
                raise errors.AuthError(f"no AWS credentials for {self.describe()}",
                                       hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --profile")
            frozen = await found.get_frozen_credentials()
            creds = (frozen.access_key, frozen.secret_key, frozen.token)
            region = region or session.get_config_variable("region")
        out = {"aws_access_key_id": creds[0], "aws_secret_access_key": creds[1], "region": region}
        if creds[2]:
            out["aws_session_token"] = creds[2]
        return out

    def take_handoff(self, data: Mapping[str, Any]) -> None:
        keys = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
        if data.get("aws_access_key_id"):
            self._secrets = {k: str(data[k]) for k in keys if data.get(k)}
            self.profile = None  # the keys resolved by the coordinator; this host may not know the profile
        if data.get("region") and not self.region:
            self.region = str(data["region"])

    def _start_fast_path_alone(self) -> bool:
        """Start without botocore when nothing needs it yet: an explicit endpoint (path-style, so the URL
        of a key is known) and keys at hand. Importing aiobotocore and building a client cost ~0.25 s,
        an eighth of pushing 1,000 small files; the client is still created on the first control call
        (multipart, listing, abort). A wrong region guess is answered AuthorizationHeaderMalformed, which
        turns the fast path off and repeats the request through botocore (see ``s3_fast``)."""
        creds = self._static_credentials()
        if not (self.fast_path and self.endpoint_url and creds):
            return False
        from asyncdepo.adapters.s3.fast import FastPath

        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._fast = FastPath(None, self.bucket, self.pool_size, base=f"{self.endpoint_url.rstrip('/')}/{self.bucket}/",
                              region=region, credentials=creds)
        return True

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the S3 client and its connection pool (idempotent)."""
        stack, self._stack, self._client = self._stack, None, None
        fast, self._fast = self._fast, None
        with anyio.CancelScope(shield=True):
            if fast is not None:
                await fast.aclose()
            if stack is not None:
                await stack.aclose()

    async def client(self) -> Any:
        """The aiobotocore S3 client, created on first use.

        :raises AuthError | UsageError: no credentials, unknown profile.
        """
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is not None:
                return self._client  # another call created it while this one waited for the lock
            try:
                await self._open_client()
            except Exception as exc:  # noqa: BLE001 - the error boundary: everything is mapped
                raise map_s3_error(exc, f"connecting to {self.describe()}") from None
            return self._client

    async def _open_client(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import AioSession

        session = AioSession(profile=self.profile) if self.profile else AioSession()
        share_loader(session)
        region = self.region or session.get_config_variable("region") or "us-east-1"
        cfg = AioConfig(
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=self.pool_size,
            connect_timeout=20,
            read_timeout=120,
            s3={
                "addressing_style": "path" if self.endpoint_url else "auto",
                "payload_signing_enabled": False,
            },
            signature_version="s3v4",  # presigned URLs too (botocore may presign with v2, which servers refuse)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            parameter_validation=False,
        )
        kwargs: dict[str, Any] = {"region_name": region, "config": cfg}
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            if self._secrets.get(name):
                kwargs[name] = self._secrets[name]
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(session.create_client("s3", **kwargs))
            # fail now with a clear message rather than on the first request (explicit keys need no chain)
            if not kwargs.get("aws_access_key_id") and await session.get_credentials() is None:
                from botocore.exceptions import NoCredentialsError

                raise NoCredentialsError()
        except BaseException:
            await stack.aclose()
            raise
        trim_per_request_work(client)
        if self.fast_path and self._fast is None:
            from asyncdepo.adapters.s3.fast import FastPath

            self._fast = FastPath(client, self.bucket, self.pool_size)
        self._client, self._stack = client, stack

    # -- identity -----------------------------------------------------------------------------------
    def describe(self) -> str:
        where = _public_endpoint(self.endpoint_url)
        base = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{base} at {where}" if where else base

    def key_for(self, rel: str) -> str:
        """The object key of an item (``PREFIX/rel``)."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def call(self, op: str, what: str, nbytes: int = 0, **params: Any) -> dict[str, Any]:
        """One S3 operation (``op`` is the client method, e.g. ``"put_object"``), one attempt, mapped errors.

        :raises DepoError: the mapped failure (see :mod:`asyncdepo.transport.s3errors`).
        """
        client = await self.client()
        try:
            with anyio.fail_after(request_deadline(nbytes)):
                result: dict[str, Any] = await getattr(client, op)(Bucket=self.bucket, **params)
                return result
        except Exception as exc:  # noqa: BLE001 - the error boundary: everything is mapped
            raise map_s3_error(exc, what) from None

    async def put_data(
        self,
        key: str,
        body: memoryview | ByteSource,
        size: int,
        digests: Mapping[str, str],
        what: str,
        upload: tuple[str, int] | None = None,
    ) -> tuple[str, dict[str, str]]:
        """PutObject (or UploadPart with ``upload=(UploadId, PartNumber)``) of ``body`` — a flat view, or a
        ByteSource of ``size`` bytes — with the integrity headers of ``digests`` (see
        :mod:`asyncdepo.adapters.s3.checksums`); returns the ETag and the checksums S3 reported (hex).

        Goes through the fast path when it is ready, else through aiobotocore (which teaches the fast
        path the endpoint on the way); aiobotocore gets a copy of the bytes (one part, only until the fast path
        is ready: the first data request of a run, or a run whose endpoint redirects).

        :raises DepoError: the mapped failure.
        """
        fast = self._fast
        if fast is None or not fast.ready:
            await self.client()
            fast = self._fast
        if fast is not None and fast.ready:
            query = f"partNumber={upload[1]}&uploadId={quote(upload[0], safe='')}" if upload else ""
            got = await fast.put(key, body, size, checksums.request_headers(digests), request_deadline(size),
                                 what, query)
            if got is not None:
                etag, headers = got
                return etag, _reported(lambda a: checksums.from_headers(headers, a))
            if not isinstance(body, memoryview):  # the stream was spent on the redirected request
                raise errors.TransientError(f"{what}: the endpoint redirected; sending again through botocore")
        # aiobotocore hands the body to aiohttp's default payload, which may still hold it after a timeout or a
        # cancel: it gets a copy, so the engine's buffer is free to be reused (the rule of transport/httpbody)
        data = bytes(body) if isinstance(body, memoryview) else await _read_all(body, size)
        params: dict[str, Any] = {"Key": key, "Body": data, "ContentLength": size,
                                  **checksums.request_params(digests)}
        if upload:
            params.update(UploadId=upload[0], PartNumber=upload[1])
        if fast is not None:
            fast.expecting.add(key)
        try:
            response = await self.call("upload_part" if upload else "put_object", what, size, **params)
        finally:
            if fast is not None:
                fast.expecting.discard(key)
        return str(response.get("ETag", "")), _reported(lambda a: checksums.from_response(response, a))

    # -- push ---------------------------------------------------------------------------------------
    async def open_item(self, item: Item, saved: Mapping[str, Any] | None) -> ChunkWriter:
        """A writer for ``item``; with ``saved`` journal state, the parts S3 still holds are reused.

        :raises DepoError: ListParts failed for another reason than a vanished upload.
        """
        writer = S3Writer(self, item, self.key_for(item.rel))
        if saved is not None:
            writer.sweep = True  # an earlier attempt may have created an upload the journal never learned of
        if saved:
            await writer.restore(saved)
        return writer

    async def finish(self, ok: bool) -> dict[str, Any]:
        return {"target": self.describe()}

    async def discard(self, rel: str, saved: Mapping[str, Any] | None) -> None:
        """Abort the multipart uploads of ``rel`` (its source vanished or changed): the journaled one, and, when
        the journal held a row for it (``saved`` not None), any other S3 holds for the key (one a run killed
        before its first part created; see "Orphans" in :mod:`asyncdepo.adapters.s3.writer`). An upload
        already gone (NoSuchUpload) is fine.

        :raises DepoError: ListMultipartUploads failed.
        """
        if saved is None:
            return
        key = str(saved.get("key") or self.key_for(rel))
        writer = S3Writer(self, Item(rel, rel, 0, 0), key)
        if saved.get("upload_id"):
            await writer._abort_id(str(saved["upload_id"]))
        await writer._abort_unknown()

    # -- pull ---------------------------------------------------------------------------------------
    async def list_remote(self) -> AsyncIterator[RemoteItem]:
        """Every object under the prefix, ``list_page_size`` keys a page; directory markers are skipped.

        :raises DepoError: ListObjectsV2 failed (NoSuchBucket, AccessDenied, ...).
        """
        base = f"{self.prefix}/" if self.prefix else ""
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Prefix": base, "MaxKeys": self.list_page_size}
            if token:
                params["ContinuationToken"] = token
            page = await self.call("list_objects_v2", f"ListObjectsV2 {self.where(base)}", **params)
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                rel = key[len(base) :]
                if not rel or rel.endswith("/"):
                    continue
                md5 = etag_md5(obj.get("ETag"))
                yield RemoteItem(
                    rel=rel, size=int(obj.get("Size", 0)), digests={"md5": md5} if md5 else {}, ref=key
                )
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    async def plain_get(self, item: RemoteItem) -> PlainGet:
        """A presigned GetObject URL (signed locally, valid an hour): the engine receives, hashes and
        writes it in a thread. The URL carries a signature, so it is never logged (see ``httpget``)."""
        client = await self.client()
        key = item.ref or self.key_for(item.rel)
        url = await client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                  ExpiresIn=3600)
        return PlainGet(url=url, what=f"GetObject {self.where(key)}", ssl_context=ssl_context())

    async def read(self, item: RemoteItem, offset: int) -> AsyncIterator[bytes]:
        """The object's bytes from ``offset`` (GetObject with a Range), in pieces of up to 1 MiB.

        :raises TransientError: the connection broke mid-body (the engine resumes from what it wrote).
        :raises DepoError: GetObject failed (NoSuchKey, AccessDenied, ...).
        """
        if item.size is not None and offset >= item.size:
            return
        key = item.ref or self.key_for(item.rel)
        what = f"GetObject {self.where(key)}"
        params: dict[str, Any] = {"Key": key}
        if offset:
            params["Range"] = f"bytes={offset}-"
        response = await self.call("get_object", what, **params)
        body = response["Body"]
        try:
            while True:
                try:
                    # per-read deadline: a stalled body is retried (and resumed) by the engine
                    with anyio.fail_after(120):
                        data = await body.read(MiB)
                except Exception as exc:  # noqa: BLE001 - the error boundary: everything is mapped
                    raise map_s3_error(exc, what) from None
                if not data:
                    return
                yield data
        finally:
            body.close()


def _reported(lookup: Callable[[str], str | None]) -> dict[str, str]:
    """``{algo: hex}`` of the additional checksums a response carried."""
    return {a: v for a in checksums.ALGORITHMS if (v := lookup(a))}


async def _read_all(source: ByteSource, size: int) -> bytes:
    """A stream's bytes in one buffer (for aiobotocore, which takes bodies it can rewind)."""
    out = bytearray()
    async for view in source:
        out += view
    if len(out) != size:
        raise errors.SourceChangedError(f"read {len(out)} bytes of a {size}-byte part; the file changed")
    return bytes(out)
