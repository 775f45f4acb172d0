"""An HTTPS front for a simulator: a self-signed certificate (made with the ``openssl`` command) and nginx
terminating TLS and proxying to the simulator's plain-HTTP port.

Why not the simulator's own TLS (``asyncdepo sim NAME --tls-cert``): one Python process encrypting every
byte is the bottleneck of any fast client -- measured on 2 cores, 300 x 4 MiB: 77 MB/s on asyncio's default
loop, about 240 MB/s on uvloop, against about 330 MB/s through nginx. The real archives serve their bytes from
TLS front ends built for it (ImmPort's DRS URLs are S3 presigned URLs), and a benchmark of clients must not
measure the server. Clients trust the certificate through ``SSL_CERT_FILE`` (asyncdepo, Python) or
``--cacert`` (curl).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Self

from benchmarks.measure import free_port

HERE = Path(__file__).resolve().parent


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (EC P-256, a day) and its key, written with the ``openssl`` command."""
    if shutil.which("openssl") is None:
        raise SystemExit("the openssl command is needed for the HTTPS benchmark (apt-get install openssl)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class TLSFront:
    """``with TLSFront(upstream_url) as front: front.url, front.cert`` -- nginx on a free port of 127.0.0.1."""

    def __init__(self, upstream: str, *, workers: int = 2) -> None:
        if shutil.which("nginx") is None:
            raise SystemExit("nginx is needed for the HTTPS benchmark (make tools installs it)")
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.workers = workers
        self.prefix = Path(tempfile.mkdtemp(prefix="asyncdepo-tlsfront-"))
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.cert, self.key = self_signed(self.prefix)

    def start(self) -> Self:
        (self.prefix / "body").mkdir()
        (self.prefix / "proxy").mkdir()
        conf = (HERE / "tlsfront" / "nginx.conf.in").read_text()
        for name, value in {"PREFIX": self.prefix, "PORT": self.port, "UPSTREAM": self.upstream,
                            "WORKERS": self.workers, "CERT": self.cert, "KEY": self.key}.items():
            conf = conf.replace(f"@{name}@", str(value))
        (self.prefix / "nginx.conf").write_text(conf)
        subprocess.run(["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                        "-e", str(self.prefix / "error.log")], check=True)
        for _ in range(200):  # bounded readiness poll: nginx daemonizes before its workers listen
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit(f"nginx did not listen on {self.port}; see {self.prefix / 'error.log'}")

    def master_pid(self) -> int:
        return int((self.prefix / "nginx.pid").read_text())

    def stop(self) -> None:
        if (self.prefix / "nginx.pid").exists():
            subprocess.run(["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                            "-e", str(self.prefix / "error.log"), "-s", "quit"], check=False)
            for _ in range(200):  # nginx removes its pid file once the master has gone
                if not (self.prefix / "nginx.pid").exists():
                    break
                time.sleep(0.05)
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
