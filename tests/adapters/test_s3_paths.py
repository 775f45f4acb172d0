"""The S3 adapter's recovery and refusal paths, each reached by a real fault: moto or ``rclone serve s3``
behind the fault proxy (:mod:`asyncdepo.sim.proxy`: an error status, a redirect, a lost or falsified answer,
a connection cut mid-body), an upload aborted on the server behind the writer's back, a journal that no
longer fits the file, credentials files and a profile. What the server holds is read back with boto3.

The happy paths and the basic resume/integrity cases are in test_s3_adapter.py; helpers in s3_helpers.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from asyncdepo import errors
from asyncdepo.adapters.s3 import S3Adapter, multipart_etag
from asyncdepo.adapters.s3.writer import S3Writer
from asyncdepo.contract import Chunk, Item, Part, RemoteItem
from asyncdepo.engine.api import file_source
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.transport.s3errors import s3_code
from tests.adapters.s3_helpers import (
    PART,
    Cfg,
    MiB,
    chunk,
    crc,
    item_for,
    parts_of,
    payload,
    read_back,
    send_parts,
)

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

pytest_plugins = ["tests.adapters.s3_servers"]


@contextlib.asynccontextmanager
async def behind_proxy(server: S3TestServer) -> AsyncIterator[FaultProxy]:
    host, _, port = server.endpoint_url.removeprefix("http://").rpartition(":")
    async with FaultProxy((host, int(port))) as proxy:
        yield proxy


@contextlib.asynccontextmanager
async def opened(server: S3TestServer, url: str, endpoint: str | None = None,
                 **kw: Any) -> AsyncIterator[S3Adapter]:
    async with S3Adapter(url, Cfg(), server.secrets, endpoint_url=endpoint or server.endpoint_url, **kw) as ad:
        yield ad


async def writer_for(adapter: S3Adapter, item: Item, saved: dict[str, Any] | None = None) -> S3Writer:
    writer = await adapter.open_item(item, saved)
    assert isinstance(writer, S3Writer)
    return writer


def uploads(server: S3TestServer, bucket: str) -> list[dict[str, Any]]:
    return list(server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def requests(proxy: FaultProxy, method: str) -> int:
    return sum(n for route, n in proxy.faults.requests.items() if route.startswith(method + " "))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# -- credentials, profiles, the fast path turned off by a redirect ----------------------------------------------
@pytest.fixture
def aws_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_server: S3TestServer) -> str:
    """A profile ``lab`` in private credentials/config files (with a session token and a region), and no
    keys in the environment: the adapter resolves everything through botocore's chain."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    creds, config = tmp_path / "credentials", tmp_path / "config"
    creds.write_text(f"[lab]\naws_access_key_id = {moto_server.access_key}\n"
                     f"aws_secret_access_key = {moto_server.secret_key}\naws_session_token = lab-session-token\n")
    config.write_text("[profile lab]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return "lab"


async def test_handoff_freezes_a_profile_for_the_workers(aws_profile: str, moto_server: S3TestServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator resolves the profile (keys, session token, region); a worker that has no AWS
    configuration at all pushes with what it was handed."""
    bucket = moto_server.new_bucket()
    coordinator = S3Adapter(f"s3://{bucket}/w", Cfg(), profile=aws_profile, endpoint_url=moto_server.endpoint_url)
    handed = await coordinator.handoff()
    assert handed == {"aws_access_key_id": moto_server.access_key, "aws_secret_access_key": moto_server.secret_key,
                      "aws_session_token": "lab-session-token", "region": "eu-west-1"}
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)  # the worker's host knows no profile
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    worker = S3Adapter(f"s3://{bucket}/w", Cfg(), profile=aws_profile, endpoint_url=moto_server.endpoint_url)
    worker.take_handoff({"region": None})  # nothing to take: the profile stays, nothing else changes
    assert (worker.profile, worker.region) == (aws_profile, None)
    worker.take_handoff(handed)
    assert (worker.profile, worker.region) == (None, "eu-west-1")
    data = payload(3000, seed=70)
    async with worker:
        w = await writer_for(worker, item_for("h.bin", data), None)
        await w.write(chunk(data, 0, len(data), 0, len(data)))
        await w.complete({"md5": md5(data)}, len(data))
    assert read_back(moto_server, bucket, "w/h.bin")[0] == data


async def test_handoff_of_keys_given_to_the_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "ca-central-1")
    adapter = S3Adapter("s3://b/p", Cfg(), {"aws_access_key_id": "AKID", "aws_secret_access_key": "s3cr3t"})
    assert await adapter.handoff() == {"aws_access_key_id": "AKID", "aws_secret_access_key": "s3cr3t",
                                       "region": "ca-central-1"}
    assert "s3cr3t" not in repr(adapter)


async def test_handoff_without_any_credentials_is_an_auth_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(errors.AuthError, match=r"no AWS credentials for s3://b/p at http://127\.0\.0\.1:9$") as info:
        await S3Adapter("s3://b/p", Cfg(), endpoint_url="http://user:pw@127.0.0.1:9/?x=1").handoff()
    assert "pw" not in str(info.value) and "--profile" in (info.value.hint or "")


async def test_an_unknown_profile_is_a_usage_error(aws_profile: str) -> None:
    with pytest.raises(errors.UsageError, match="profile was not found") as info:
        async with S3Adapter("s3://b/p", Cfg(), profile="nosuch", endpoint_url="http://127.0.0.1:9"):
            pass
    assert "--profile" in (info.value.hint or "")


@pytest.mark.parametrize("body", ["stream", "buffer"])
async def test_a_redirect_turns_the_fast_path_off_and_botocore_sends_the_rest(
        aws_profile: str, moto_server: S3TestServer, tmp_path: Path, body: str) -> None:
    """With a profile the fast path learns the endpoint from botocore's first PutObject. A redirect answer
    (301) to a fast UploadPart turns it off: a streamed part is spent, so it fails (transient) and is sent
    again through botocore; a buffered one goes through botocore at once. Everything after goes through
    botocore, and the object arrives intact."""
    bucket = moto_server.new_bucket()
    data = payload(PART + 4321, seed=71)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    st = src.stat()
    item = Item(str(src), "big.bin", st.st_size, st.st_mtime_ns)
    async with behind_proxy(moto_server) as proxy, S3Adapter(f"s3://{bucket}/r", Cfg(), profile=aws_profile,
                                                             endpoint_url=proxy.url) as ad:
        small = payload(2000, seed=72)
        w = await writer_for(ad, item_for("small.bin", small), None)
        await w.write(chunk(small, 0, len(small), 0, len(small)))  # through botocore: the fast path learns
        assert ad._fast is not None and ad._fast.ready
        proxy.faults.add("PUT * status=301 first=1")
        w = await writer_for(ad, item, None)
        first = Part(1, 0, PART, {"crc64nvme": crc(data[:PART])}, False)
        if body == "stream":
            with pytest.raises(errors.TransientError, match="redirected"):
                await w.write_part_stream(first, file_source(src, length=PART, expect=item))
            assert not ad._fast.ready
            await w.write_part_stream(first, file_source(src, length=PART, expect=item))
        else:
            await w.write_part(parts_of(data)[0])
            assert not ad._fast.ready
        await w.write_part(parts_of(data)[1])
        await w.complete({"crc64nvme": crc(data)}, len(data))
        assert proxy.faults.statuses == {f"PUT /{bucket}/r/big.bin": 1}
    assert read_back(moto_server, bucket, "r/big.bin")[0] == data
    assert read_back(moto_server, bucket, "r/small.bin")[0] == small


async def test_a_refused_connection_is_transient_naming_the_call() -> None:
    """Nothing listens on the endpoint: botocore's connection error is a transient error of the call."""
    async with S3Adapter("s3://b/p", Cfg(), {"aws_access_key_id": "k", "aws_secret_access_key": "s"},
                         endpoint_url="http://127.0.0.1:9", fast_path=False) as ad:
        with pytest.raises(errors.TransientError, match=r"ListObjectsV2 s3://b/p/: connection failed"):
            [x async for x in ad.list_remote()]


async def test_the_first_control_calls_at_once_share_one_client(moto_server: S3TestServer) -> None:
    """Keys and an endpoint at hand: the adapter starts without botocore; two items that start multipart
    uploads at the same moment create one client between them, and both objects arrive."""
    bucket = moto_server.new_bucket()
    blobs = {f"m{i}.bin": payload(PART + i, seed=90 + i) for i in range(2)}
    async with opened(moto_server, f"s3://{bucket}/m") as ad:
        assert ad._client is None
        writers = {rel: await writer_for(ad, item_for(rel, data), None) for rel, data in blobs.items()}

        async def one(rel: str) -> None:
            await send_parts(writers[rel], parts_of(blobs[rel]))
            await writers[rel].complete({"crc64nvme": crc(blobs[rel])}, len(blobs[rel]))

        async with anyio.create_task_group() as tg:
            for rel in blobs:
                tg.start_soon(one, rel)
        client = ad._client
        assert client is not None and await ad.client() is client
    for rel, data in blobs.items():
        assert read_back(moto_server, bucket, f"m/{rel}")[0] == data


async def test_without_an_endpoint_objects_are_presigned_for_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """No endpoint: S3 itself, virtual-hosted addressing; the presigned GET is made locally."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    async with S3Adapter("s3://lab-data/run", Cfg(), {"aws_access_key_id": "AKID", "aws_secret_access_key": "s"},
                         region="eu-west-1") as ad:
        assert ad.describe() == "s3://lab-data/run"
        got = await ad.plain_get(RemoteItem(rel="a b.bin", size=1, digests={}))
    assert got.url.startswith("https://lab-data.s3.amazonaws.com/run/a%20b.bin?")
    assert "%2Feu-west-1%2Fs3%2F" in got.url and "X-Amz-Signature=" in got.url
    assert got.what == "GetObject s3://lab-data/run/a b.bin"


async def test_an_https_endpoint_with_a_private_ca(moto_server: S3TestServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint over TLS whose certificate only ``AWS_CA_BUNDLE`` trusts: botocore's control calls and
    the fast path's PUTs both verify it, and the objects arrive."""
    import asyncio
    import ssl

    from tests.tlscert import self_signed

    cert, key = self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
    host, _, port = moto_server.endpoint_url.removeprefix("http://").rpartition(":")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    tls = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=server_ctx)
    endpoint = f"https://127.0.0.1:{tls.sockets[0].getsockname()[1]}"
    bucket = moto_server.new_bucket()
    small, big = payload(3000, seed=95), payload(PART + 5, seed=96)
    try:
        async with opened(moto_server, f"s3://{bucket}/tls", endpoint) as ad:
            w = await writer_for(ad, item_for("small.bin", small), None)
            await w.write(chunk(small, 0, len(small), 0, len(small)))
            w = await writer_for(ad, item_for("big.bin", big), None)
            await send_parts(w, parts_of(big))
            await w.complete({"crc64nvme": crc(big)}, len(big))
            assert ad._fast is not None and ad._fast.ready and ad._client is not None
    finally:
        tls.close()
    assert read_back(moto_server, bucket, "tls/small.bin")[0] == small
    assert read_back(moto_server, bucket, "tls/big.bin")[0] == big


async def test_an_endpoint_on_the_default_port_is_signed_without_it(rclone_server: S3TestServer) -> None:
    """An endpoint on port 80 (as S3's own are on 443): the fast path's Host header, and so its signature,
    carry no port, which rclone checks."""
    host, _, port = rclone_server.endpoint_url.removeprefix("http://").rpartition(":")
    proxy = FaultProxy((host, int(port)), port=80)
    try:
        await proxy.start()
    except OSError as exc:
        pytest.skip(f"port 80 is not available here: {exc}")
    bucket = rclone_server.new_bucket()
    data = payload(3000, seed=98)
    try:
        async with opened(rclone_server, f"s3://{bucket}/p80", "http://127.0.0.1") as ad:
            w = await writer_for(ad, item_for("f.bin", data), None)
            await w.write(chunk(data, 0, len(data), 0, len(data)))
            assert ad._client is None  # the fast path sent it
    finally:
        await proxy.stop()
    assert proxy.faults.requests == {f"PUT /{bucket}/p80/f.bin": 1}
    assert read_back(rclone_server, bucket, "p80/f.bin")[0] == data


# -- pull ----------------------------------------------------------------------------------------------------
async def test_listing_skips_directory_markers_at_the_bucket_root(moto_server: S3TestServer) -> None:
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    for key, body in {"dir/": b"", "dir/a.bin": b"aaa", "b.bin": b"bb"}.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    async with opened(moto_server, f"s3://{bucket}") as ad:
        assert ad.describe() == f"s3://{bucket} at {moto_server.endpoint_url}"
        listed = {r.rel: (r.size, r.digests) async for r in ad.list_remote()}
    assert listed == {"dir/a.bin": (3, {"md5": md5(b"aaa")}), "b.bin": (2, {"md5": md5(b"bb")})}


async def test_a_body_cut_mid_read_is_transient(moto_server: S3TestServer) -> None:
    """The connection dies while GetObject's body is read: the error names the object and is transient
    (the engine resumes from what it wrote)."""
    bucket = moto_server.new_bucket()
    data = payload(48 * MiB, seed=73)
    moto_server.client().put_object(Bucket=bucket, Key="p/cut.bin", Body=data)
    async with behind_proxy(moto_server) as proxy, opened(moto_server, f"s3://{bucket}/p", proxy.url) as ad:
        reader = ad.read(RemoteItem(rel="cut.bin", size=len(data), digests={}), 0)
        got = await reader.__anext__()
        assert got == data[: len(got)]
        await proxy.stop()  # every connection through the proxy is reset
        with pytest.raises(errors.DepoError, match=f"GetObject s3://{bucket}/p/cut.bin") as info:
            async for piece in reader:
                got += piece
        assert errors.is_transient(info.value) and len(got) < len(data)


# -- resume from the journal -----------------------------------------------------------------------------------
async def test_listparts_failing_on_reopen_is_raised_and_the_next_reopen_resumes(moto_server: S3TestServer) -> None:
    bucket = moto_server.new_bucket()
    data = payload(2 * PART + 10, seed=74)
    item = item_for("lp.bin", data)
    async with behind_proxy(moto_server) as proxy, opened(moto_server, f"s3://{bucket}/j", proxy.url) as ad:
        w = await writer_for(ad, item, None)
        await send_parts(w, parts_of(data)[:2])
        saved = w.state()
        proxy.faults.add("GET * status=500 first=1")
        with pytest.raises(errors.TransientError, match=f"ListParts s3://{bucket}/j/lp.bin failed with HTTP 500"):
            await writer_for(ad, item, saved)
        w = await writer_for(ad, item, saved)
        assert sorted(w.parts) == [1, 2]
        await w.write_part(parts_of(data)[2])
        await w.complete({"crc64nvme": crc(data)}, len(data))
    assert read_back(moto_server, bucket, "j/lp.bin")[0] == data


async def test_a_journaled_upload_without_parts_is_reused(moto_server: S3TestServer) -> None:
    """The journal holds an UploadId but no confirmed part: the upload is taken back, not created again."""
    bucket = moto_server.new_bucket()
    data = payload(PART + 20, seed=75)
    upload_id = moto_server.client().create_multipart_upload(
        Bucket=bucket, Key="j/reuse.bin", ChecksumAlgorithm="CRC64NVME", ChecksumType="FULL_OBJECT")["UploadId"]
    async with behind_proxy(moto_server) as proxy, opened(moto_server, f"s3://{bucket}/j", proxy.url) as ad:
        w = await writer_for(ad, item_for("reuse.bin", data),
                               {"key": "j/reuse.bin", "upload_id": upload_id, "part_size": None, "parts": {}})
        assert w.upload_id == upload_id and w.parts == {}
        await send_parts(w, parts_of(data))
        await w.complete({"crc64nvme": crc(data)}, len(data))
        creates = requests(proxy, "POST") - 1  # the one POST is Complete
    assert creates == 0
    assert read_back(moto_server, bucket, "j/reuse.bin")[0] == data and not uploads(moto_server, bucket)


async def test_parts_without_a_digest_or_of_another_size_are_sent_again(moto_server: S3TestServer) -> None:
    """Kept on reopen only: a part the journal has a digest of (none with ``--s3-checksum none`` and no
    ``--s3-md5``), and whose size still fits the file (it grew since)."""
    server = moto_server
    bucket = server.new_bucket()
    data = payload(2 * PART + 10, seed=76)
    async with opened(server, f"s3://{bucket}/j", checksum="none") as ad:
        item = item_for("nodigest.bin", data)
        w = await writer_for(ad, item, None)
        await send_parts(w, parts_of(data))
        w = await writer_for(ad, item, w.state())
        assert w.upload_id is not None and w.parts == {}  # nothing to check them with
        await send_parts(w, parts_of(data))
        result = await w.complete({}, len(data))
    assert result == {"key": "j/nodigest.bin", "etag": multipart_etag([md5(c.data.tobytes()) for c in parts_of(data)]),
                      "size": len(data)}
    assert read_back(server, bucket, "j/nodigest.bin")[0] == data

    grown = data + b"more bytes"
    async with opened(server, f"s3://{bucket}/j") as ad:
        w = await writer_for(ad, item_for("grown.bin", data), None)
        await send_parts(w, parts_of(data))
        w = await writer_for(ad, item_for("grown.bin", grown), w.state())
        assert sorted(w.parts) == [1, 2]  # the last part no longer fits the file
        await w.write_part(parts_of(grown)[2])
        await w.complete({"crc64nvme": crc(grown)}, len(grown))
    assert read_back(server, bucket, "j/grown.bin")[0] == grown


async def test_a_changed_part_size_aborts_the_journaled_upload_and_starts_over(moto_server: S3TestServer) -> None:
    """Parts journaled at 5 MiB, the next run sends 6 MiB parts (another --chunk-size): the first part that
    shows the new size aborts the journaled upload (transient); reopened, the item is sent whole."""
    bucket = moto_server.new_bucket()
    data = payload(3 * PART, seed=97)
    item = item_for("size.bin", data)
    async with opened(moto_server, f"s3://{bucket}/z") as ad:
        w = await writer_for(ad, item, None)
        await send_parts(w, parts_of(data)[:2])
        saved = w.state()
        w = await writer_for(ad, item, saved)
        assert sorted(w.parts) == [1, 2]
        bigger = parts_of(data, 6 * MiB)
        with pytest.raises(errors.TransientError, match="part size changed since the last run"):
            await w.write_part(bigger[1])
        assert not uploads(moto_server, bucket) and w.parts == {}
        w = await writer_for(ad, item, saved)
        assert w.parts == {} and w.upload_id is None
        await send_parts(w, bigger)
        await w.complete({"crc64nvme": crc(data)}, len(data))
    assert read_back(moto_server, bucket, "z/size.bin")[0] == data


# -- uploads that vanish, orphans ------------------------------------------------------------------------------
async def test_an_upload_vanishing_before_any_part_is_replaced(rclone_server: S3TestServer) -> None:
    """The upload is aborted on the server (a lifecycle rule) between its creation and the first part:
    rclone answers NoSuchUpload; with no part confirmed, the part goes into a new upload."""
    server = rclone_server
    bucket = server.new_bucket()
    data = payload(PART + 30, seed=77)
    client = server.client()

    def abort_on_first_part(route: str, count: int) -> None:
        if route.startswith("PUT ") and count == 1:
            for up in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])

    async with behind_proxy(server) as proxy, opened(server, f"s3://{bucket}/v", proxy.url) as ad:
        proxy.faults.on_request.append(abort_on_first_part)
        w = await writer_for(ad, item_for("v.bin", data), None)
        for c in parts_of(data):
            await w.write_part(c)
        await w.complete({"crc64nvme": crc(data)}, len(data))
        assert requests(proxy, "PUT") == 3 and requests(proxy, "POST") == 3  # 2 creates, 1 complete
    assert read_back(server, bucket, "v/v.bin")[0] == data and not uploads(server, bucket)


async def test_orphans_of_the_key_are_listed_page_by_page_and_aborted(rclone_server: S3TestServer) -> None:
    """A retried item (the journal held a row) first aborts the key's uploads nobody knows of, listing
    them one a page; an upload of a longer key under the same prefix is left alone."""
    server = rclone_server
    bucket = server.new_bucket()
    client = server.client()
    for _ in range(3):
        client.create_multipart_upload(Bucket=bucket, Key="o/f.bin")
    other = client.create_multipart_upload(Bucket=bucket, Key="o/f.bin.more")["UploadId"]
    data = payload(PART + 40, seed=78)
    async with behind_proxy(server) as proxy, opened(server, f"s3://{bucket}/o", proxy.url) as ad:
        ad.list_page_size = 1
        w = await writer_for(ad, item_for("f.bin", data), {})
        await send_parts(w, parts_of(data))
        await w.complete({"crc64nvme": crc(data)}, len(data))
        listings = proxy.faults.requests[f"GET /{bucket}"]
    assert listings == 4  # one upload a page: three orphans and the longer key's
    assert [(u["Key"], u["UploadId"]) for u in uploads(server, bucket)] == [("o/f.bin.more", other)]
    assert read_back(server, bucket, "o/f.bin")[0] == data


async def test_discard_without_a_journal_row_leaves_uploads_alone(moto_server: S3TestServer) -> None:
    bucket = moto_server.new_bucket()
    upload_id = moto_server.client().create_multipart_upload(Bucket=bucket, Key="d/x.bin")["UploadId"]
    async with opened(moto_server, f"s3://{bucket}/d") as ad:
        await ad.discard("x.bin", None)
        assert [u["UploadId"] for u in uploads(moto_server, bucket)] == [upload_id]
        await ad.discard("x.bin", {})
        assert not uploads(moto_server, bucket)
        journaled = moto_server.client().create_multipart_upload(Bucket=bucket, Key="d/y.bin")["UploadId"]
        await ad.discard("y.bin", {"key": "d/y.bin", "upload_id": journaled})
    assert not uploads(moto_server, bucket)


async def test_an_abort_that_fails_is_logged_and_swallowed(moto_server: S3TestServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    bucket = moto_server.new_bucket()
    data = payload(PART + 50, seed=79)
    async with behind_proxy(moto_server) as proxy, opened(moto_server, f"s3://{bucket}/a", proxy.url) as ad:
        w = await writer_for(ad, item_for("a.bin", data), None)
        await w.write_part(parts_of(data)[0])
        proxy.faults.add("DELETE * status=500 first=1")
        with caplog.at_level(logging.WARNING, logger="asyncdepo.adapters.s3.writer"):
            await w.abort()
    assert f"AbortMultipartUpload s3://{bucket}/a/a.bin failed with HTTP 500" in caplog.text
    assert len(uploads(moto_server, bucket)) == 1  # still there: a lifecycle rule or the next run removes it


# -- what S3 reports back -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("checksum", "with_md5", "answer", "caught"),
                         [("crc64nvme", False, "HEAD", "crc64nvme"), ("none", True, "POST", "ETag")])
async def test_a_falsified_complete_answer_is_an_integrity_error_and_aborts(
        moto_server: S3TestServer, checksum: str, with_md5: bool, answer: str, caught: str) -> None:
    """S3 reports another full-object checksum (moto: only on HEAD, which Complete's answer without one
    makes the writer ask) or multipart ETag (the Complete answer) than the parts give: the item fails as an
    IntegrityError and the upload is aborted, so the retry sends every part again. (The proxy changes the
    first hex digit of a value: the seed gives a base64 checksum that has one.)"""
    bucket = moto_server.new_bucket()
    data = payload(PART + 60, seed=87)
    async with behind_proxy(moto_server) as proxy, opened(moto_server, f"s3://{bucket}/c", proxy.url,
                                                          checksum=checksum, md5=with_md5) as ad:
        w = await writer_for(ad, item_for("c.bin", data), None)
        await send_parts(w, parts_of(data))
        proxy.faults.add(f"{answer} * digest first=1")
        with pytest.raises(errors.IntegrityError, match=f"S3 reports {caught}"):
            await w.complete({}, len(data))
    assert not uploads(moto_server, bucket)


async def test_a_falsified_etag_of_a_single_put_is_caught_by_complete(moto_server: S3TestServer) -> None:
    """Without ``--s3-md5`` the PutObject answer's ETag is not checked on arrival; complete() compares it
    with the file's md5 the engine computed."""
    bucket = moto_server.new_bucket()
    data = payload(3000, seed=81)
    async with behind_proxy(moto_server) as proxy, opened(moto_server, f"s3://{bucket}/s", proxy.url,
                                                          checksum="none") as ad:
        proxy.faults.add("PUT * digest first=1")
        w = await writer_for(ad, item_for("s.bin", data), None)
        await w.write(chunk(data, 0, len(data), 0, len(data)))
        with pytest.raises(errors.IntegrityError, match=f"md5 is {md5(data)}"):
            await w.complete({"md5": md5(data)}, len(data))


async def test_complete_of_a_single_put_checks_size_and_digests(moto_server: S3TestServer) -> None:
    bucket = moto_server.new_bucket()
    data = payload(3000, seed=82)
    async with opened(moto_server, f"s3://{bucket}/s") as ad:
        w = await writer_for(ad, item_for("none.bin", data), None)
        with pytest.raises(errors.IntegrityError, match="complete\\(\\) before any byte was sent"):
            await w.complete({}, len(data))
        w = await writer_for(ad, item_for("s.bin", data), None)
        # a view of another format (here 32-bit words) goes as its bytes
        await w.write(Chunk(0, memoryview(array("I", data[:2000])), {}, True))
        with pytest.raises(errors.IntegrityError, match="sent 2000 bytes, file has 3000"):
            await w.complete({}, len(data))
        with pytest.raises(errors.IntegrityError, match="sent crc64nvme"):
            await w.complete({"crc64nvme": crc(data[:1999])}, 2000)
        assert (await w.complete({"crc64nvme": crc(data[:2000])}, 2000))["crc64nvme"] == crc(data[:2000])
    assert read_back(moto_server, bucket, "s/s.bin")[0] == data[:2000]


async def test_complete_without_a_reported_checksum_asks_head_and_survives_its_failure(
        rclone_server: S3TestServer) -> None:
    """rclone reports no checksum for a multipart object, in the Complete answer or on HEAD; a HEAD that
    fails (500) leaves the object as S3 checked it (the full-object checksum was sent with Complete)."""
    server = rclone_server
    bucket = server.new_bucket()
    data = payload(PART + 70, seed=83)
    async with behind_proxy(server) as proxy, opened(server, f"s3://{bucket}/h", proxy.url) as ad:
        w = await writer_for(ad, item_for("h.bin", data), None)
        await send_parts(w, parts_of(data))
        proxy.faults.add("HEAD * status=500 first=1")
        result = await w.complete({"crc64nvme": crc(data)}, len(data))
        assert proxy.faults.statuses == {f"HEAD /{bucket}/h/h.bin": 1}
    assert result["crc64nvme"] == crc(data)
    assert read_back(server, bucket, "h/h.bin")[0] == data


async def test_complete_meeting_no_such_upload_looks_at_the_object_and_fails_without_it(
        rclone_server: S3TestServer) -> None:
    """The upload is aborted on the server (a lifecycle rule) just before Complete: NoSuchUpload; HEAD finds
    no object, so the error stands (transient: the engine reopens the item) and the writer forgets the
    upload; the reopened item is sent whole."""
    server = rclone_server
    bucket = server.new_bucket()
    data = payload(PART + 100, seed=86)
    client = server.client()
    async with opened(server, f"s3://{bucket}/n", checksum="none", md5=True) as ad:
        item = item_for("n.bin", data)
        w = await writer_for(ad, item, None)
        await send_parts(w, parts_of(data))
        saved = w.state()
        client.abort_multipart_upload(Bucket=bucket, Key="n/n.bin", UploadId=saved["upload_id"])
        with pytest.raises(errors.TransientError, match="NoSuchUpload") as info:
            await w.complete({"md5": md5(data)}, len(data))
        assert s3_code(info.value) == "NoSuchUpload" and w.parts == {} and w.upload_id is None
        w = await writer_for(ad, item, saved)
        assert w.parts == {}
        await send_parts(w, parts_of(data))
        await w.complete({"md5": md5(data)}, len(data))
    assert read_back(server, bucket, "n/n.bin")[0] == data


async def test_a_part_answer_with_another_checksum_is_an_integrity_error(moto_server: S3TestServer) -> None:
    """UploadPart's answer reports another checksum than the part carried (falsified on the way back): the
    part is not confirmed (IntegrityError, retried by the engine); sent again, it is."""
    bucket = moto_server.new_bucket()
    data = payload(PART + 60, seed=87)  # its first part's base64 checksum has a hex digit for the proxy to change
    async with behind_proxy(moto_server) as proxy, opened(moto_server, f"s3://{bucket}/g", proxy.url) as ad:
        w = await writer_for(ad, item_for("g.bin", data), None)
        proxy.faults.add("PUT * digest first=1")
        with pytest.raises(errors.IntegrityError, match="S3 reports crc64nvme"):
            await w.write_part(parts_of(data)[0])
        assert w.parts == {}
        await send_parts(w, parts_of(data))
        await w.complete({"crc64nvme": crc(data)}, len(data))
    assert read_back(moto_server, bucket, "g/g.bin")[0] == data


# -- the writer's contract with the engine ----------------------------------------------------------------------
async def test_calls_outside_the_contract_are_permanent_errors(moto_server: S3TestServer, tmp_path: Path) -> None:
    bucket = moto_server.new_bucket()
    data = payload(PART + 80, seed=84)
    src = tmp_path / "k.bin"
    src.write_bytes(data)
    async with opened(moto_server, f"s3://{bucket}/k") as ad:
        w = await writer_for(ad, item_for("k.bin", data), None)
        with pytest.raises(errors.PermanentError, match="cannot append at offset 5"):
            await w.write(Chunk(5, memoryview(data[5:10]), {}, True))
        with pytest.raises(errors.PermanentError, match="not a stream"):
            await w.write_stream(file_source(src))
        with pytest.raises(errors.PermanentError, match="part number 10001 is outside"):
            await w.write_part_stream(Part(10_001, 0, 10, {"crc64nvme": crc(data[:10])}, False), file_source(src))
        with pytest.raises(errors.PermanentError, match="crc64nvme was not computed"):
            await w.write_part_stream(Part(1, 0, PART, {}, False), file_source(src))
    assert not uploads(moto_server, bucket)


async def test_a_part_stream_shorter_than_the_part_is_refused(moto_server: S3TestServer, tmp_path: Path) -> None:
    """Through botocore the part's stream is gathered first: one that yields fewer bytes than the part's
    size is a SourceChangedError (the engine re-reads the file), and nothing is stored."""
    bucket = moto_server.new_bucket()
    data = payload(PART + 90, seed=85)
    src = tmp_path / "short.bin"
    src.write_bytes(data)
    async with opened(moto_server, f"s3://{bucket}/t", fast_path=False) as ad:
        w = await writer_for(ad, item_for("short.bin", data), None)
        part = Part(1, 0, PART, {"crc64nvme": crc(data[:PART])}, False)
        with pytest.raises(errors.SourceChangedError, match=f"read {PART - 1} bytes of a {PART}-byte part"):
            await w.write_part_stream(part, file_source(src, length=PART - 1))
        held = moto_server.client().list_parts(Bucket=bucket, Key="t/short.bin", UploadId=w.upload_id)
        assert not held.get("Parts")
        await w.abort()



# -- the fast path learning the endpoint from botocore ---------------------------------------------------------
@pytest.mark.parametrize("sent", ["a/b", "c/a/b", "d/c/a/b", "e/d/c/a/b"])
def test_the_fast_path_learns_no_base_from_a_url_that_fits_two_keys_in_flight(sent: str) -> None:
    """Keys in flight through botocore where one ends another (``b``, ``a/b`` ...): a request's URL
    ``.../bucket/a/b`` fits both, and a base learned from the shorter key would send every later object of
    the run to a wrong key. Only a URL that fits exactly one key in flight teaches the base."""
    from types import SimpleNamespace

    from asyncdepo.adapters.s3.fast import FastPath, SigV4

    in_flight = {"b", "a/b", "c/a/b", "d/c/a/b", "e/d/c/a/b"}
    base = "http://127.0.0.1:9/bkt/"
    url = base + sent
    signed = SigV4("eu-west-1").sign("PUT", url, {"host": "127.0.0.1:9"}, "AKID", "secret", None)
    fast = FastPath(None, "bkt", 4)
    fast.expecting.update(in_flight)
    fast._learn(SimpleNamespace(url=url, headers=signed))
    assert fast.base is None and not fast.ready
    fast.expecting = {sent}
    fast._learn(SimpleNamespace(url=url + "?partNumber=1&uploadId=x", headers=signed))
    assert fast.base == base and fast.signer is not None and fast.signer.region == "eu-west-1"


def test_a_push_to_s3_without_the_s3_extra_says_how_to_install_it(tmp_path: Path) -> None:
    """aiobotocore absent: a push to s3:// is refused before anything is read, with the extra to install
    (it ended in "unexpected ModuleNotFoundError" once the connection was tried)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 10)
    code = ("import sys\nsys.modules['aiobotocore'] = None  # as if not installed: its import fails\n"
            "from asyncdepo.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    res = subprocess.run([sys.executable, "-c", code, "push", str(src), "s3://bucket/x",
                          "--journal", str(tmp_path / "j.db")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2, res.stderr
    assert "s3:// targets need aiobotocore, which is not installed" in res.stderr
    assert "pip install 'asyncdepo[s3]'" in res.stderr
    assert "Traceback" not in res.stderr
