"""The S3 adapter against two independent S3 servers (moto and ``rclone serve s3``), over loopback.

The writer is driven directly with Chunk objects hashed here, as the engine would (parts concurrently);
what the server holds is then read back with boto3 and compared byte for byte and by ETag. Elsewhere: runs
through ``push``/``pull`` and the engine in tests/e2e/test_s3_push.py, helpers in s3_helpers.py, the fast
path's signing in tests/unit/test_s3_sigv4.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from botocore.exceptions import ClientError

from asyncdepo import errors
from asyncdepo.adapters import lookup
from asyncdepo.adapters.s3 import S3Adapter, multipart_etag, parse_s3_url
from asyncdepo.adapters.s3.writer import S3Writer
from asyncdepo.contract import Chunk, Item
from asyncdepo.digests import to_base64
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.transport.s3errors import map_s3_error, s3_code
from tests.adapters.contract_suite import AdapterContract, Harness
from tests.adapters.s3_helpers import (
    PART,
    CallCounter,
    Cfg,
    MiB,
    chunk,
    crc,
    item_for,
    parts_of,
    payload,
    read_back,
    send_parts,
    stored_etag,
)

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

# the server fixtures: moto_server, rclone_server, and s3_server parametrized over both
pytest_plugins = ["tests.adapters.s3_servers"]


@pytest.fixture
async def adapter(s3_server: S3TestServer) -> AsyncIterator[S3Adapter]:
    bucket = s3_server.new_bucket()
    async with S3Adapter(
        f"s3://{bucket}/run/1", Cfg(), s3_server.secrets, endpoint_url=s3_server.endpoint_url
    ) as ad:
        yield ad


@pytest.fixture
async def md5_adapter(s3_server: S3TestServer) -> AsyncIterator[S3Adapter]:
    """The adapter with ``--s3-md5``: Content-MD5 on every body, besides the CRC."""
    bucket = s3_server.new_bucket()
    async with S3Adapter(
        f"s3://{bucket}/run/1", Cfg(), s3_server.secrets, endpoint_url=s3_server.endpoint_url, md5=True
    ) as ad:
        yield ad


# -- basics --------------------------------------------------------------------------------------------
def test_registered_and_url() -> None:
    assert lookup("s3") is S3Adapter
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(errors.UsageError):
        parse_s3_url("http://bucket/x")
    ad = S3Adapter(
        "s3://b/p",
        Cfg(),
        {"aws_secret_access_key": "SECRETSECRET"},
        endpoint_url="http://user:pw@127.0.0.1:9000/",
    )
    assert ad.describe() == "s3://b/p at http://127.0.0.1:9000"
    assert "SECRET" not in repr(ad) and "pw" not in ad.describe()
    assert ad.key_for("x/y.bin") == "p/x/y.bin"


async def test_single_put(adapter: S3Adapter, s3_server: S3TestServer) -> None:
    data = payload(3 * MiB + 17)
    item = item_for("dir/small.bin", data)
    writer = await adapter.open_item(item, None)
    await writer.write(chunk(data, 0, len(data), 0, len(data)))
    md5 = hashlib.md5(data).hexdigest()
    result = await writer.complete({"crc64nvme": crc(data)}, len(data))
    assert result["etag"] == md5 and result["crc64nvme"] == crc(data)
    body, etag = read_back(s3_server, adapter.bucket, "run/1/dir/small.bin")
    assert body == data and etag == md5
    if s3_server.root is not None:  # rclone keeps it as a file
        assert (s3_server.root / adapter.bucket / "run/1/dir/small.bin").read_bytes() == data


async def test_empty_file(adapter: S3Adapter, s3_server: S3TestServer) -> None:
    writer = await adapter.open_item(item_for("empty", b""), None)
    await writer.complete({"md5": hashlib.md5(b"").hexdigest()}, 0)
    assert read_back(s3_server, adapter.bucket, "run/1/empty")[0] == b""


async def test_multipart_parts_concurrent(adapter: S3Adapter, s3_server: S3TestServer) -> None:
    data = payload(2 * PART + 3 * MiB, seed=2)
    writer = await adapter.open_item(item_for("big.bin", data), None)
    assert isinstance(writer, S3Writer)
    chunks = parts_of(data)
    await send_parts(writer, chunks)
    state = writer.state()
    assert state["upload_id"] and sorted(state["parts"]) == ["1", "2", "3"]
    assert all(state["parts"][n][3] == {"crc64nvme": crc(c.data.tobytes())} for n, c in zip("123", chunks))
    expected = multipart_etag([c.digests["md5"] for c in chunks])
    result = await writer.complete({"crc64nvme": crc(data)}, len(data))
    assert result["etag"] == expected and result["crc64nvme"] == crc(data)
    assert read_back(s3_server, adapter.bucket, "run/1/big.bin") == (
        data,
        stored_etag(s3_server, data, expected),
    )
    assert not s3_server.client().list_multipart_uploads(Bucket=adapter.bucket).get("Uploads")
    if s3_server.name == "moto":  # moto composes the full-object value from the bytes it holds
        head = s3_server.client().head_object(Bucket=adapter.bucket, Key="run/1/big.bin", ChecksumMode="ENABLED")
        assert head["ChecksumType"] == "FULL_OBJECT"
        assert head["ChecksumCRC64NVME"] == to_base64(crc(data))


# -- resume --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lost", ["before", "after"])
async def test_failed_part_resumes_from_listparts(s3_server: S3TestServer, lost: str) -> None:
    """Part 2 fails (connection reset before it was sent, or after S3 stored it but the answer was lost);
    the run ends ("kill"). A new adapter reopens from the journaled state: ListParts shows what S3 holds,
    only the missing part(s) are sent, and the final ETag is right."""
    bucket = s3_server.new_bucket()
    data = payload(3 * PART + 1234, seed=3)
    item = item_for("resume.bin", data)
    chunks = parts_of(data)
    url = f"s3://{bucket}/run"

    journal: dict[str, Any] = {}
    # the client is wrapped to inject the failure, so every request must go through it
    async with S3Adapter(
        url, Cfg(), s3_server.secrets, endpoint_url=s3_server.endpoint_url, fast_path=False
    ) as first:
        counter = CallCounter(await first.client())
        counter.wrap("upload_part")
        counter.fail[("upload_part", 2)] = lost
        writer = await first.open_item(item, None)
        failures: list[BaseException] = []

        async def send(c: Chunk) -> None:
            try:
                await writer.write_part(c)
            except errors.DepoError as exc:
                failures.append(exc)
            journal.update(writer.state())  # the engine journals after every confirmed part

        async with anyio.create_task_group() as tg:
            for c in chunks:
                tg.start_soon(send, c)
        assert len(failures) == 1 and errors.is_transient(failures[0])
    assert sorted(journal["parts"]) == ["1", "3", "4"]
    held = s3_server.client().list_parts(Bucket=bucket, Key="run/resume.bin", UploadId=journal["upload_id"])
    assert len(held["Parts"]) == (4 if lost == "after" else 3)

    held_parts = len(held["Parts"])
    # ListParts in pages of 2 exercises the pagination; moto (5.2) reads PartNumberMarker as an index into
    # its list rather than a part number, which skips parts after a gap, so it gets one page there
    page = 1000 if (s3_server.name == "moto" and lost == "before") else 2
    async with S3Adapter(
        url, Cfg(), s3_server.secrets, endpoint_url=s3_server.endpoint_url, fast_path=False
    ) as second:
        second.list_page_size = page
        counter = CallCounter(await second.client())
        for op in ("upload_part", "list_parts", "create_multipart_upload"):
            counter.wrap(op)
        writer = await second.open_item(item, journal)
        assert sorted(writer.parts) == [1, 3, 4]
        missing = [c for c in chunks if c.part_number not in writer.parts]
        await send_parts(writer, missing)  # type: ignore[arg-type]
        result = await writer.complete({"crc64nvme": crc(data)}, len(data))
    assert [kw["PartNumber"] for kw in counter.calls["upload_part"]] == [2]
    # the resent part carried its checksum, and the journal's checksums of the kept parts were reused
    assert counter.calls["upload_part"][0]["ChecksumCRC64NVME"] == to_base64(crc(chunks[1].data.tobytes()))
    assert result["crc64nvme"] == crc(data)
    assert len(counter.calls["list_parts"]) == -(-held_parts // page)
    assert "create_multipart_upload" not in counter.calls
    expected = multipart_etag([c.digests["md5"] for c in chunks])
    assert result["etag"] == expected
    assert read_back(s3_server, bucket, "run/resume.bin") == (data, stored_etag(s3_server, data, expected))


async def test_resume_of_vanished_upload_starts_over(adapter: S3Adapter, s3_server: S3TestServer) -> None:
    data = payload(PART + 10, seed=4)
    item = item_for("gone.bin", data)
    writer = await adapter.open_item(item, None)
    first = parts_of(data)
    await writer.write_part(first[0])
    saved = writer.state()
    await writer.abort()  # e.g. a lifecycle rule removed it between runs
    writer = await adapter.open_item(item, saved)
    assert writer.parts == {} and writer.state()["upload_id"] is None
    await send_parts(writer, first)  # type: ignore[arg-type]
    await writer.complete({"md5": hashlib.md5(data).hexdigest()}, len(data))
    assert read_back(s3_server, adapter.bucket, "run/1/gone.bin")[0] == data


# -- integrity -----------------------------------------------------------------------------------------
async def test_wrong_content_md5_is_refused_then_resent(md5_adapter: S3Adapter, s3_server: S3TestServer) -> None:
    """A part whose bytes do not match its Content-MD5 (corrupted between hashing and sending) is refused.

    rclone's server checks Content-MD5 and answers BadDigest; moto does not check it, and the adapter
    catches the mismatch itself from the part's ETag. Either way the error is transient and a re-send of
    the good part completes with the right ETag.
    """
    adapter = md5_adapter
    data = payload(PART + 99, seed=5)
    writer = await adapter.open_item(item_for("bad.bin", data), None)
    good = parts_of(data)
    wrong = chunk(data, 0, PART, 1, len(data), md5=hashlib.md5(b"something else").hexdigest())
    with pytest.raises(errors.DepoError) as info:
        await writer.write_part(wrong)
    assert errors.is_transient(info.value)
    if s3_server.checks_content_md5:
        assert s3_code(info.value) in ("BadDigest", "InvalidDigest")
    else:
        assert isinstance(info.value, errors.IntegrityError)
    await send_parts(writer, good)
    result = await writer.complete({"md5": hashlib.md5(data).hexdigest()}, len(data))
    assert result["etag"] == multipart_etag([c.digests["md5"] for c in good])
    assert read_back(s3_server, adapter.bucket, "run/1/bad.bin")[0] == data


async def test_wrong_content_md5_single_put(md5_adapter: S3Adapter, s3_server: S3TestServer) -> None:
    adapter = md5_adapter
    data = payload(MiB, seed=6)
    writer = await adapter.open_item(item_for("bad-small.bin", data), None)
    with pytest.raises(errors.DepoError) as info:
        await writer.write(chunk(data, 0, len(data), 0, len(data), md5="0" * 32))
    assert errors.is_transient(info.value)
    await writer.write(chunk(data, 0, len(data), 0, len(data)))
    await writer.complete({"md5": hashlib.md5(data).hexdigest()}, len(data))
    assert read_back(s3_server, adapter.bucket, "run/1/bad-small.bin")[0] == data


async def test_wrong_crc_is_refused_by_the_server(moto_server: S3TestServer) -> None:
    """A body whose x-amz-checksum-crc64nvme does not match its bytes (damaged between hashing and sending)
    is refused by the server (BadDigest, before anything is stored) and reported as an IntegrityError,
    which the engine retries; the right one is accepted, and what S3 reports back is checked."""
    bucket = moto_server.new_bucket()
    async with S3Adapter(f"s3://{bucket}/p", Cfg(), moto_server.secrets,
                         endpoint_url=moto_server.endpoint_url) as adapter:
        data = payload(PART + 4321, seed=11)
        writer = await adapter.open_item(item_for("crc.bin", data), None)
        good = parts_of(data)
        with pytest.raises(errors.IntegrityError, match="BadDigest") as info:
            await writer.write_part(chunk(data, 0, PART, 1, len(data), crc="0" * 16))
        assert errors.is_transient(info.value) and s3_code(info.value) == "BadDigest"
        assert writer.parts == {}
        held = moto_server.client().list_parts(Bucket=bucket, Key="p/crc.bin", UploadId=writer.state()["upload_id"])
        assert not held.get("Parts")  # refused before it was stored
        await send_parts(writer, good)
        assert (await writer.complete({"crc64nvme": crc(data)}, len(data)))["crc64nvme"] == crc(data)

        small = payload(MiB, seed=12)
        writer = await adapter.open_item(item_for("crc-small.bin", small), None)
        with pytest.raises(errors.IntegrityError, match="CRC64NVME"):
            await writer.write(chunk(small, 0, len(small), 0, len(small), crc=crc(b"other bytes")))
        await writer.write(chunk(small, 0, len(small), 0, len(small)))
        await writer.complete({"crc64nvme": crc(small)}, len(small))
    client = moto_server.client()
    assert read_back(moto_server, bucket, "p/crc.bin")[0] == data
    assert read_back(moto_server, bucket, "p/crc-small.bin")[0] == small
    head = client.head_object(Bucket=bucket, Key="p/crc-small.bin", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == to_base64(crc(small))


async def test_parts_of_another_file_are_not_completed(adapter: S3Adapter) -> None:
    """The parts' composed checksum must be the file's: parts journaled for another version of the file
    are never completed into an object (IntegrityError)."""
    data = payload(PART + 77, seed=13)
    writer = await adapter.open_item(item_for("other.bin", data), None)
    await send_parts(writer, parts_of(data))
    with pytest.raises(errors.IntegrityError, match="crc64nvme"):
        await writer.complete({"crc64nvme": crc(data + b"x")}, len(data))
    await writer.abort()


async def test_complete_checks_sizes_and_parts(adapter: S3Adapter) -> None:
    data = payload(2 * PART, seed=7)
    writer = await adapter.open_item(item_for("holes.bin", data), None)
    await writer.write_part(parts_of(data)[1])
    with pytest.raises(errors.IntegrityError, match="missing"):
        await writer.complete({}, len(data))
    await writer.write_part(parts_of(data)[0])
    with pytest.raises(errors.IntegrityError, match="bytes"):
        await writer.complete({}, len(data) + 1)
    await writer.abort()


async def test_abort_leaves_no_multipart_upload(adapter: S3Adapter, s3_server: S3TestServer) -> None:
    data = payload(2 * PART, seed=8)
    writer = await adapter.open_item(item_for("aborted.bin", data), None)
    await send_parts(writer, parts_of(data)[:1])
    client = s3_server.client()
    assert len(client.list_multipart_uploads(Bucket=adapter.bucket).get("Uploads", [])) == 1
    await writer.abort()
    await writer.abort()  # idempotent, never raises
    assert not client.list_multipart_uploads(Bucket=adapter.bucket).get("Uploads")
    listed = client.list_objects_v2(Bucket=adapter.bucket)
    assert not listed.get("Contents")


# -- pull ----------------------------------------------------------------------------------------------
async def test_list_and_ranged_read(adapter: S3Adapter, s3_server: S3TestServer) -> None:
    client = s3_server.client()
    blobs = {f"run/1/f{i}.bin": payload(1000 + i, seed=i) for i in range(5)}
    for key, body in blobs.items():
        client.put_object(Bucket=adapter.bucket, Key=key, Body=body)
    client.put_object(Bucket=adapter.bucket, Key="run/10/not-mine", Body=b"x")  # a sibling prefix
    adapter.list_page_size = 2  # three pages
    listed = [r async for r in adapter.list_remote()]
    assert sorted(r.rel for r in listed) == [f"f{i}.bin" for i in range(5)]
    for r in listed:
        body = blobs[r.ref]
        assert r.size == len(body) and r.digests == {"md5": hashlib.md5(body).hexdigest()}
        assert b"".join([b async for b in adapter.read(r, 0)]) == body
        assert b"".join([b async for b in adapter.read(r, 700)]) == body[700:]
        assert [b async for b in adapter.read(r, len(body))] == []


# -- errors --------------------------------------------------------------------------------------------
async def test_missing_bucket_is_permanent(s3_server: S3TestServer) -> None:
    async with S3Adapter(
        "s3://no-such-bucket-here/p", Cfg(), s3_server.secrets, endpoint_url=s3_server.endpoint_url
    ) as ad:
        writer = await ad.open_item(item_for("x", b"abc"), None)
        with pytest.raises(errors.PermanentError) as info:
            await writer.write(chunk(b"abc", 0, 3, 0, 3))
    assert "s3://no-such-bucket-here/p/x" in str(info.value)


async def test_bad_secret_is_auth_error_without_secret(rclone_server: S3TestServer) -> None:
    bucket = rclone_server.new_bucket()
    secret = "not-the-right-secret-0123456789ab"
    async with S3Adapter(
        f"s3://{bucket}",
        Cfg(),
        {"aws_access_key_id": rclone_server.access_key, "aws_secret_access_key": secret},
        endpoint_url=rclone_server.endpoint_url,
    ) as ad:
        writer = await ad.open_item(item_for("x", b"abc"), None)
        with pytest.raises(errors.AuthError) as info:
            await writer.write(chunk(b"abc", 0, 3, 0, 3))
    text = info.value.describe()
    assert secret not in text and info.value.hint  # what to do, never the secret


async def test_credentials_from_environment(
    rclone_server: S3TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", rclone_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rclone_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    bucket = rclone_server.new_bucket()
    async with S3Adapter(f"s3://{bucket}/env", Cfg(), endpoint_url=rclone_server.endpoint_url) as ad:
        writer = await ad.open_item(item_for("e.txt", b"env"), None)
        await writer.write(chunk(b"env", 0, 3, 0, 3))
        await writer.complete({"md5": hashlib.md5(b"env").hexdigest()}, 3)
    assert read_back(rclone_server, bucket, "env/e.txt")[0] == b"env"


def _client_error(code: str, status: int, message: str = "msg", **extra: str) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message, **extra},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("BadDigest", 400, errors.IntegrityError),
        ("XAmzContentChecksumMismatch", 400, errors.IntegrityError),
        ("InvalidDigest", 400, errors.TransientError),
        ("MissingContentMD5", 400, errors.RemoteValidationError),
        ("SlowDown", 503, errors.RateLimitedError),
        ("InternalError", 500, errors.TransientError),
        ("NoSuchUpload", 404, errors.TransientError),
        ("NoSuchBucket", 404, errors.RemoteValidationError),
        ("AccessDenied", 403, errors.AuthError),
        ("InvalidAccessKeyId", 403, errors.AuthError),
        ("SignatureDoesNotMatch", 403, errors.AuthError),
        ("EntityTooSmall", 400, errors.RemoteValidationError),
        ("SomethingNew", 502, errors.TransientError),
        ("SomethingElse", 400, errors.RemoteValidationError),
    ],
)
def test_error_mapping(code: str, status: int, kind: type[Exception]) -> None:
    exc = map_s3_error(
        _client_error(code, status, StringToSign="AWS4-HMAC-SHA256 secret-ish", AWSAccessKeyId="AKIDEXAMPLE"),
        "PutObject s3://b/k",
    )
    assert isinstance(exc, kind) and s3_code(exc) == code
    assert "PutObject s3://b/k" in str(exc) and code in str(exc)
    assert "secret-ish" not in exc.describe() and "AKIDEXAMPLE" not in exc.describe()


# -- the fast data path --------------------------------------------------------------------------------
@pytest.mark.parametrize("start", ["alone", "learning"])
async def test_fast_path_carries_the_data(s3_server: S3TestServer, start: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """PutObject and UploadPart bypass botocore; the server (rclone checks every signature) accepts them
    and holds the right bytes. "alone": an explicit endpoint and keys at hand, so the fast path starts
    without botocore and no data request goes through it. "learning": without keys at hand, the first
    request goes through botocore, which resolves the endpoint for the fast path."""
    if start == "learning":
        monkeypatch.setattr(S3Adapter, "_static_credentials", lambda self: None)
    bucket = s3_server.new_bucket()
    async with S3Adapter(
        f"s3://{bucket}/fast", Cfg(), s3_server.secrets, endpoint_url=s3_server.endpoint_url
    ) as ad:
        assert (ad._client is None) == (start == "alone")  # botocore not even loaded yet when alone
        counter = CallCounter(await ad.client())
        counter.wrap("put_object")
        counter.wrap("upload_part")
        files = {f"k {i}+=&.bin": payload(5000 + i, seed=300 + i) for i in range(4)}
        for rel, body in files.items():
            w = await ad.open_item(item_for(rel, body), None)
            await w.write(chunk(body, 0, len(body), 0, len(body)))
            await w.complete({"md5": hashlib.md5(body).hexdigest()}, len(body))
        big = payload(PART + 77, seed=400)
        w = await ad.open_item(item_for("big.bin", big), None)
        await send_parts(w, parts_of(big))
        await w.complete({"md5": hashlib.md5(big).hexdigest()}, len(big))
        assert ad._fast is not None and ad._fast.ready
    through_botocore = len(counter.calls.get("put_object", [])) + len(counter.calls.get("upload_part", []))
    assert through_botocore == (0 if start == "alone" else 1)
    for rel, body in {**files, "big.bin": big}.items():
        assert read_back(s3_server, bucket, f"fast/{rel}")[0] == body


async def test_fast_path_alone_with_a_wrong_region_still_delivers(s3_server: S3TestServer) -> None:
    """A region guess the server disagrees with is answered AuthorizationHeaderMalformed (servers that do
    not check the region accept it): either way every object arrives intact."""
    bucket = s3_server.new_bucket()
    async with S3Adapter(f"s3://{bucket}/r", Cfg(), s3_server.secrets, endpoint_url=s3_server.endpoint_url,
                         region="ap-southeast-2") as ad:
        for i in range(3):
            body = payload(3000 + i, seed=600 + i)
            w = await ad.open_item(item_for(f"f{i}", body), None)
            await w.write(chunk(body, 0, len(body), 0, len(body)))
            await w.complete({"md5": hashlib.md5(body).hexdigest()}, len(body))
            assert read_back(s3_server, bucket, f"r/f{i}")[0] == body


async def test_fast_path_upload_vanished_with_parts(adapter: S3Adapter, s3_server: S3TestServer) -> None:
    """The upload is aborted behind the writer's back after part 1: part 2 (fast path) gets NoSuchUpload,
    the item cannot be completed, and reopening it from the journal starts over and succeeds."""
    data = payload(PART + 5, seed=500)
    item = item_for("vanish.bin", data)
    chunks = parts_of(data)
    writer = await adapter.open_item(item, None)
    await writer.write_part(chunks[0])
    saved = writer.state()
    s3_server.client().abort_multipart_upload(
        Bucket=adapter.bucket, Key="run/1/vanish.bin", UploadId=saved["upload_id"]
    )
    # rclone answers NoSuchUpload; moto 5.2 fails with a 500 (KeyError) on UploadPart to an aborted
    # upload: transient either way
    with pytest.raises(errors.TransientError, match="vanished" if s3_server.name == "rclone" else "500"):
        await writer.write_part(chunks[1])
    with pytest.raises(errors.DepoError) as info:
        await writer.complete({}, len(data))
    assert errors.is_transient(info.value)  # the engine reopens the item
    writer = await adapter.open_item(item, saved)
    assert writer.parts == {}
    await send_parts(writer, chunks)
    await writer.complete({"md5": hashlib.md5(data).hexdigest()}, len(data))
    assert read_back(s3_server, adapter.bucket, "run/1/vanish.bin")[0] == data


async def test_compressed_stream_does_not_reuse_parts(adapter: S3Adapter, s3_server: S3TestServer) -> None:
    """A journaled upload of a compressed stream (size -1) is aborted on reopen, not resumed."""
    data = payload(PART + 9, seed=600)
    item = Item(path="/src/c.bin", rel="c.bin.zst", size=-1, mtime_ns=1)
    writer = await adapter.open_item(item, None)
    await writer.write_part(parts_of(data)[0])
    writer = await adapter.open_item(item, writer.state())
    assert writer.parts == {} and writer.state()["upload_id"] is None
    assert not s3_server.client().list_multipart_uploads(Bucket=adapter.bucket).get("Uploads")


async def test_no_credentials_is_auth_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    with pytest.raises(errors.AuthError) as info:
        async with S3Adapter("s3://bucket/p", Cfg(), endpoint_url="http://127.0.0.1:9"):
            pass
    assert "AWS_ACCESS_KEY_ID" in (info.value.hint or "")


class TestContract(AdapterContract):
    """The shared contract suite (tests/adapters/contract_suite.py) over moto, behind the fault proxy: the
    faults are real network failures on the S3 path, not exceptions raised above the wire."""

    @pytest.fixture
    async def harness(self, moto_server: S3TestServer) -> AsyncIterator[Harness]:
        bucket = moto_server.new_bucket()
        host, _, port = moto_server.endpoint_url.removeprefix("http://").rpartition(":")
        async with FaultProxy((host, int(port))) as proxy:
            def stored() -> dict[str, bytes]:
                client = moto_server.client()
                keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
                return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}

            yield Harness(lambda cfg: S3Adapter(f"s3://{bucket}", cfg, moto_server.secrets,
                                                endpoint_url=proxy.url),
                          stored, faults=proxy.faults, data=("PUT", "*"), chunk=PART)
