"""End-to-end integrity of S3 pushes against moto, which refuses a body whose ``x-amz-checksum-crc64nvme``
differs from the bytes it received (``400 BadDigest``, as S3 does; see tests/adapters/s3_servers.py):

* bodies damaged on the wire (a proxy flips one bit) are refused; the CLI reports an integrity failure and
  exits non-zero, and nothing damaged is stored;
* damage on one request is retried with a fresh read and the object ends up right;
* a resumed multipart upload reuses the parts whose journaled checksum still matches the file, and sends
  again the one whose bytes changed (same size, same mtime), so the object is the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from asyncdepo.cli import main
from asyncdepo.config import EngineConfig
from asyncdepo.digests import digest_bytes, to_base64
from asyncdepo.engine.journal import Journal
from asyncdepo.engine.scheduler import push
from tests.adapters.s3_helpers import PART, DamagingProxy, payload, read_back
from tests.e2e.test_s3_push import CountingS3

if TYPE_CHECKING:
    from tests.adapters.s3_servers import S3TestServer

pytest_plugins = ["tests.adapters.s3_servers"]


def _tree(root: Path) -> dict[str, bytes]:
    files = {"big.raw": payload(2 * PART + 777, seed=31), "small.raw": payload(300_000, seed=32)}
    root.mkdir()
    for rel, body in files.items():
        (root / rel).write_bytes(body)
    return files


def _cli(server: S3TestServer, endpoint: str, src: Path, bucket: str, journal: Path,
         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    code = main(["push", str(src), f"s3://{bucket}/ds", "--endpoint-url", endpoint, "--chunk-size", "5M",
                 "--transfers", "4", "--request-attempts", "2", "--retries", "0", "--journal", str(journal),
                 "--json", "--quiet"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    # the failures are in the item-failed events and the final report, wherever the renderer puts them
    return code, {"events": [e for e in events if e.get("event") != "snapshot"]}


def test_damaged_bodies_are_refused_and_the_run_fails(moto_server: S3TestServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    bucket = moto_server.new_bucket()
    with DamagingProxy(moto_server.endpoint_url) as proxy:
        code, report = _cli(moto_server, proxy.url, src, bucket, tmp_path / "j.db", monkeypatch, capsys)
    assert code != 0 and proxy.damaged >= 3
    text = json.dumps(report)
    assert "BadDigest" in text and "big.raw" in text and "small.raw" in text
    client = moto_server.client()
    assert not client.list_objects_v2(Bucket=bucket).get("Contents")  # nothing damaged was stored
    # the upload stays journaled for a resume; it holds only the part the proxy left alone (the 777-byte
    # tail), none of the damaged ones
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        held = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        tail = files["big.raw"][2 * PART:]
        assert [(p["PartNumber"], p["ETag"].strip('"')) for p in held.get("Parts", [])] in (
            [], [(3, hashlib.md5(tail).hexdigest())])


def test_damage_once_is_sent_again_and_the_objects_are_right(moto_server: S3TestServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    bucket = moto_server.new_bucket()
    with DamagingProxy(moto_server.endpoint_url, times=2) as proxy:
        code, _ = _cli(moto_server, proxy.url, src, bucket, tmp_path / "j.db", monkeypatch, capsys)
    assert code == 0 and proxy.damaged == 2
    client = moto_server.client()
    for rel, body in files.items():
        assert read_back(moto_server, bucket, f"ds/{rel}")[0] == body
    head = client.head_object(Bucket=bucket, Key="ds/big.raw", ChecksumMode="ENABLED")
    crc = digest_bytes(files["big.raw"], ("crc64nvme",))["crc64nvme"]
    assert head["ChecksumType"] == "FULL_OBJECT" and head["ChecksumCRC64NVME"] == to_base64(crc)


async def test_resume_reuses_journaled_checksums_and_resends_a_changed_part(moto_server: S3TestServer,
                                                                          tmp_path: Path) -> None:
    """Run 1 fails at part 2 with parts 1 and 3 confirmed and journaled with their CRCs. Part 1 of the
    file then changes in place (same size, mtime put back). Run 2 asks ListParts, keeps part 3 (its
    checksum still matches), sends parts 1 and 2, and completes with the composed full-object CRC."""
    src = tmp_path / "two.raw"
    data = payload(2 * PART + 1000, seed=33)
    src.write_bytes(data)
    bucket = moto_server.new_bucket()
    url = f"s3://{bucket}/ds"
    strict = EngineConfig(transfers=4, chunk_size=PART, request_attempts=1, item_attempts=1, retries=0)
    first = CountingS3(url, strict, moto_server.secrets, endpoint_url=moto_server.endpoint_url)
    first.fail = {("upload_part", 2): "before"}
    first.gate = 2
    journal = tmp_path / "j.db"
    report = await push(src, first, strict, journal_path=journal)
    assert not report.ok
    j = await Journal.open(journal)
    try:
        rows = await j.lookup(report.job_id, ["two.raw"])
    finally:
        await j.close()
    parts = rows["two.raw"]["remote"]["parts"]
    assert sorted(parts) == ["1", "3"]
    crc = lambda b: digest_bytes(b, ("crc64nvme",))["crc64nvme"]  # noqa: E731
    assert parts["1"][3] == {"crc64nvme": crc(data[:PART])}
    assert parts["3"][3] == {"crc64nvme": crc(data[2 * PART:])}

    st = src.stat()
    changed = bytes([data[0] ^ 0xFF]) + data[1:]
    src.write_bytes(changed)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # a change size and mtime cannot see

    second = CountingS3(url, strict, moto_server.secrets, endpoint_url=moto_server.endpoint_url)
    report = await push(src, second, strict, journal_path=journal)
    assert report.ok, report.failures
    sent = {kw["PartNumber"]: kw["ChecksumCRC64NVME"] for kw in second.counter.calls["upload_part"]}
    assert sent == {1: to_base64(crc(changed[:PART])), 2: to_base64(crc(changed[PART:2 * PART]))}
    assert second.counter.calls["list_parts"] and "create_multipart_upload" not in second.counter.calls
    assert read_back(moto_server, bucket, "ds/two.raw")[0] == changed
    head = moto_server.client().head_object(Bucket=bucket, Key="ds/two.raw", ChecksumMode="ENABLED")
    assert head["ChecksumCRC64NVME"] == to_base64(crc(changed))
