"""``asyncdepo.push`` and ``asyncdepo.pull`` through the engine with the S3 adapter, against two
independent S3 servers (moto and ``rclone serve s3``) over loopback: a tree there and back, resume of a
multipart upload after a failed run, compressed objects. The adapter on its own is tested in
tests/adapters/test_s3_adapter.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncdepo.adapters.s3.adapter import S3Adapter
from asyncdepo.config import EngineConfig
from asyncdepo.engine.pull import pull
from asyncdepo.engine.scheduler import push  # re-exported as asyncdepo.push
from tests.adapters.s3_helpers import PART, CallCounter, payload, read_back

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

# the server fixtures: moto_server, rclone_server, and s3_server parametrized over both
pytest_plugins = ["tests.adapters.s3_servers"]


def make_tree(root: Path, *, big: bool = True) -> dict[str, bytes]:
    """Small files in subdirectories, an empty file and a file of two parts; or only a file of three."""
    if big:
        files = {f"d{i % 3}/f{i:02d}.bin": payload(1000 * i + 7, seed=100 + i) for i in range(12)}
        files["empty.txt"] = b""
        files["big/one.raw"] = payload(PART + 12345, seed=200)
    else:
        files = {"big/two.raw": payload(2 * PART + 1000, seed=201)}
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    return files


class CountingS3(S3Adapter):
    """The adapter with its client wrapped: counts calls, injects failures (see CallCounter); every
    request goes through the wrapped aiobotocore client (no fast path)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, fast_path=False, **kw)
        self.fail: dict[tuple[str, int], str] = {}

    gate = 0

    async def _open_client(self) -> None:
        await super()._open_client()
        self.counter = CallCounter(self._client)
        for op in ("put_object", "upload_part", "list_parts", "create_multipart_upload"):
            self.counter.wrap(op)
        self.counter.fail.update(self.fail)
        self.counter.gate = self.gate


async def test_push_and_pull_end_to_end(s3_server: S3TestServer, tmp_path: Path) -> None:
    """``asyncdepo.push`` a tree (parts sent concurrently), then ``asyncdepo.pull`` it back."""
    src = tmp_path / "src"
    files = make_tree(src)
    bucket = s3_server.new_bucket()
    config = EngineConfig(transfers=4, chunk_size=PART)
    adapter = S3Adapter(f"s3://{bucket}/ds", config, s3_server.secrets, endpoint_url=s3_server.endpoint_url)
    report = await push(src, adapter, config, journal_path=tmp_path / "j.db")
    assert report.ok and report.files_done == len(files), report.failures
    client = s3_server.client()
    for rel, body in files.items():
        assert client.get_object(Bucket=bucket, Key=f"ds/{rel}")["Body"].read() == body
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")

    again = await push(
        src,
        S3Adapter(f"s3://{bucket}/ds", config, s3_server.secrets, endpoint_url=s3_server.endpoint_url),
        config,
        journal_path=tmp_path / "j.db",
    )
    assert again.ok and again.files_skipped == len(files) and again.files_done == 0

    out = tmp_path / "out"
    pulled = await pull(
        S3Adapter(f"s3://{bucket}/ds", config, s3_server.secrets, endpoint_url=s3_server.endpoint_url),
        out,
        config,
    )
    assert pulled.ok, pulled.failures
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


async def test_push_resumes_multipart_after_failed_run(s3_server: S3TestServer, tmp_path: Path) -> None:
    """Run 1: part 2 of big/two.raw fails and no retry is allowed, so the run fails with the upload
    journaled. Run 2 (a new adapter, same journal) asks ListParts and sends only part 2."""
    src = tmp_path / "src"
    files = make_tree(src, big=False)
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/ds"
    strict = EngineConfig(transfers=4, chunk_size=PART, request_attempts=1, item_attempts=1, retries=0)
    first = CountingS3(url, strict, s3_server.secrets, endpoint_url=s3_server.endpoint_url)
    first.fail = {("upload_part", 2): "before"}
    first.gate = 2  # parts 1 and 3 are confirmed (and journaled) before part 2 fails
    journal = tmp_path / "j.db"
    # only the big file with three parts, so the injected failure hits it
    report = await push(src / "big" / "two.raw", first, strict, journal_path=journal)
    assert not report.ok and report.files_failed == 1
    held = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert len(held) == 1

    second = CountingS3(url, strict, s3_server.secrets, endpoint_url=s3_server.endpoint_url)
    second.fail = {}
    report = await push(src / "big" / "two.raw", second, strict, journal_path=journal)
    assert report.ok, report.failures
    assert [kw["PartNumber"] for kw in second.counter.calls["upload_part"]] == [2]
    assert "create_multipart_upload" not in second.counter.calls and second.counter.calls["list_parts"]
    body, _ = read_back(s3_server, bucket, "ds/two.raw")
    assert body == files["big/two.raw"]
    assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


async def test_push_compressed(s3_server: S3TestServer, tmp_path: Path) -> None:
    """``--compress zstd``: each file goes as ``<rel>.zst`` (length unknown up front, so multipart even
    when small); the objects decompress to the files, and the check is against the bytes sent."""
    import zstandard

    src = tmp_path / "src"
    src.mkdir()
    files = {"small.txt": b"detector " * 5000, "noise.bin": os.urandom(2 * PART + 4321)}
    for rel, body in files.items():
        (src / rel).write_bytes(body)
    bucket = s3_server.new_bucket()
    config = EngineConfig(transfers=4, chunk_size=PART, compress=("zstd", 3))
    adapter = S3Adapter(f"s3://{bucket}/z", config, s3_server.secrets, endpoint_url=s3_server.endpoint_url)
    report = await push(src, adapter, config, journal_path=tmp_path / "j.db")
    assert report.ok, report.failures
    for rel, body in files.items():
        stored = s3_server.client().get_object(Bucket=bucket, Key=f"z/{rel}.zst")["Body"].read()
        assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == body
