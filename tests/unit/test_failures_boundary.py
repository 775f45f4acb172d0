"""The error boundary's rare paths (asyncdepo.transport.failures), with aiohttp's own exceptions and responses
produced by aioresponses: the paths a simulator seldom reaches (an untrusted certificate, a Retry-After given
as an HTTP date, a library message quoting a presigned URL, an error raised by our own body under aiohttp).

What a real server does on the wire is covered by the simulators' fault tests; here each case pins one
branch of the mapping to the class, the message and the hint a user sees.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import errno
import os
import ssl
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import aioresponses

from asyncdepo.errors import (
    AuthError,
    ConflictError,
    DepoError,
    DiskFullError,
    PermanentError,
    QuotaError,
    RateLimitedError,
    RemoteValidationError,
    SourceChangedError,
    TransientError,
    is_transient,
)
from asyncdepo.transport.failures import (
    CERT_HINT,
    boundary,
    connection_error,
    disk_error,
    message_of,
    status_error,
)

URL = "https://archive.example/api/files/1"
SIGNED = "https://bucket.example/key?X-Amz-Signature=s3cretsig&X-Amz-Credential=AKIA"


class Response(aiohttp.ClientResponse):
    """aiohttp 3.14 made ``stream_writer`` a required argument of ClientResponse, which aioresponses 0.7.9 does
    not pass (upstream pnuckowski/aioresponses#289, fix pending in #288): supply the one attribute aiohttp
    reads of it. Every mocked answer below uses this class."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kw)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def answer(session: aiohttp.ClientSession, what: str = "GET /api/files/1") -> DepoError:
    """One request the way the adapters make it: a transport failure through ``boundary``, a status through
    ``status_error`` with the archive's own message."""
    with boundary(what):
        async with session.get(URL) as r:
            return status_error(r.status, message_of(await r.read()), what=what,
                                retry_after=r.headers.get("Retry-After"))


async def test_retry_after_as_an_http_date_becomes_a_wait(session: aiohttp.ClientSession) -> None:
    when = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=120), usegmt=True)
    with aioresponses() as m:
        m.get(URL, status=503, headers={"Retry-After": when}, payload={"message": "maintenance"}, response_class=Response)
        err = await answer(session)
    assert isinstance(err, RateLimitedError) and is_transient(err)
    assert err.retry_after is not None and 100 < err.retry_after <= 120
    assert str(err) == "GET /api/files/1 failed with HTTP 503: maintenance"


async def test_an_unreadable_retry_after_is_a_plain_transient_error(session: aiohttp.ClientSession) -> None:
    with aioresponses() as m:
        m.get(URL, status=429, headers={"Retry-After": "soon, promise"}, body=b"", response_class=Response)
        err = await answer(session)
    assert type(err) is TransientError and err.status == 429


@pytest.mark.parametrize(("status", "body", "cls", "text"), [
    (401, b'{"detail": "token expired"}', AuthError, "token expired"),
    (409, b'{"reason": "version exists"}', ConflictError, "version exists"),
    (413, b"<html><head><title>413 Request Entity Too Large</title></head><body><h1>413</h1></body></html>",
     QuotaError, "HTTP 413: 413 Request Entity Too Large"),
    (502, b"<!DOCTYPE html><html><body><p>upstream <b>timed out</b></p></body></html>", TransientError,
     "HTTP 502: upstream timed out"),
    (400, b"<?xml version='1.0'?><Error><Code>BadDigest</Code><Message>md5 differs</Message></Error>",
     RemoteValidationError, "BadDigest: md5 differs"),
])
async def test_statuses_and_the_archive_s_own_words(session: aiohttp.ClientSession, status: int, body: bytes,
                                                    cls: type[DepoError], text: str) -> None:
    with aioresponses() as m:
        m.get(URL, status=status, body=body, response_class=Response)
        err = await answer(session)
    assert type(err) is cls and is_transient(err) == (status >= 500)
    assert str(err).endswith(text)


async def test_an_error_page_quoting_a_presigned_url_loses_the_query(session: aiohttp.ClientSession) -> None:
    with aioresponses() as m:
        m.get(URL, status=502, body=f"bad gateway while fetching {SIGNED}".encode(), response_class=Response)
        err = await answer(session)
    assert "s3cretsig" not in str(err) and "AKIA" not in str(err)
    assert "https://bucket.example/key?..." in str(err)


async def test_an_untrusted_certificate_is_permanent_with_a_hint(session: aiohttp.ClientSession) -> None:
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "self-signed certificate"
    key = ConnectionKey("archive.example", 443, True, True, None, None, None)
    with aioresponses() as m:
        m.get(URL, exception=aiohttp.ClientConnectorCertificateError(key, cert))
        with pytest.raises(PermanentError) as info:
            await answer(session)
    assert not is_transient(info.value)
    assert "TLS certificate is not trusted (self-signed certificate)" in str(info.value)
    assert info.value.hint == CERT_HINT


@pytest.mark.parametrize("exc", [
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientPayloadError("Response payload is not completed"),
    aiohttp.ClientOSError(104, "Connection reset by peer"),
    TimeoutError(),
])
async def test_network_failures_are_transient_and_name_the_request(session: aiohttp.ClientSession,
                                                                   exc: Exception) -> None:
    with aioresponses() as m:
        m.get(URL, exception=exc)
        with pytest.raises(TransientError) as info:
            await answer(session)
    assert str(info.value).startswith("GET /api/files/1: ")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no library traceback chained


async def test_a_library_message_quoting_a_presigned_url_loses_the_query(session: aiohttp.ClientSession) -> None:
    with aioresponses() as m:
        m.get(URL, exception=aiohttp.ClientConnectionError(f"Cannot connect to host for {SIGNED}"))
        with pytest.raises(TransientError) as info:
            await answer(session)
    assert "s3cretsig" not in str(info.value)


async def test_raise_for_status_goes_through_the_same_status_table(session: aiohttp.ClientSession) -> None:
    with aioresponses() as m:
        m.get(URL, status=403, reason="Forbidden", response_class=Response)
        with pytest.raises(AuthError, match="HTTP 403"), boundary("GET /api/files/1"):
            async with session.get(URL, raise_for_status=True):
                pass


async def test_our_own_error_under_aiohttp_comes_out_as_itself() -> None:
    """A request body that finds its file changed raises SourceChangedError; aiohttp wraps it in a
    ClientConnectionError: the boundary hands back ours, still retryable."""
    ours = SourceChangedError("data.bin: the file changed while it was read")
    try:
        try:
            raise ours
        except SourceChangedError as inner:
            raise aiohttp.ClientConnectionError("Failed to send bytes into the underlying connection") from inner
    except aiohttp.ClientConnectionError as wrapped:
        assert connection_error(wrapped, "PUT /data.bin") is ours
    with pytest.raises(SourceChangedError), boundary("PUT /data.bin"):
        raise ours


async def test_what_is_not_a_transport_failure_passes_unchanged() -> None:
    with pytest.raises(KeyError), boundary("GET /x"):
        raise KeyError("a bug of ours must not be dressed as a network error")


@pytest.mark.parametrize(("code", "kind"), [(errno.ENAMETOOLONG, PermanentError), (errno.EACCES, PermanentError),
                                            (errno.EROFS, PermanentError), (errno.EIO, TransientError),
                                            (errno.ENOSPC, DiskFullError)])
def test_a_local_write_error_is_retried_only_when_it_may_pass(tmp_path: Any, code: int, kind: type) -> None:
    err = disk_error("write a.bin.asyncdepo-part", OSError(code, os.strerror(code)), tmp_path)
    assert type(err) is kind and "a.bin" in str(err)
