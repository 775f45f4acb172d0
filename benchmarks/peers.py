"""Peer benchmark: asyncdepo against rclone, s5cmd and boto3's TransferManager, pushing the same datasets
to the same local S3 servers, alternating tools run by run.

Servers:

* ``sink`` — nginx (Debian nginx-extras) + a few lines of Lua (``benchmarks/sink/``): reads every body,
  computes its CRC-32, counts objects, bytes and the integrity headers each request declared, keeps no
  data. It costs little CPU, so the ratios measure the clients.
* ``rclone`` — ``rclone serve s3`` over a directory on the real disk (a real server: on 2 cores it is
  itself the bottleneck, so this is a check that asyncdepo at least matches the best peer).

Datasets (generated once, deterministically, under ``--data-dir``): ``small`` = 1,000 x 1 MiB and
``large`` = 4 x 256 MiB, "detector-like": 16-bit pixels of low Poisson-like counts (compressible ~5x).

Every tool runs at the same concurrency (``--transfers`` requests in flight) with its documented
performance settings and its default integrity checks; what each actually sent is counted at the sink and
printed next to its figure (asyncdepo: ``x-amz-checksum-crc64nvme`` on every body; ``asyncdepo-md5``:
the same with ``--s3-md5``, Content-MD5 too, the work rclone does; rclone: Content-MD5; s5cmd: Content-MD5
and the payload SHA-256; boto3: botocore's default CRC):

* asyncdepo  ``asyncdepo push DIR s3://B/P --endpoint-url URL --transfers N --chunk-size 16M`` (and
  ``asyncdepo-md5``: the same with ``--s3-md5``)
* rclone     ``rclone copy DIR :s3:B/P --transfers N --checkers N --s3-upload-concurrency N/4
  --s3-chunk-size 16M --s3-no-check-bucket --s3-no-head --no-traverse`` (N/4 parts per large file,
  since 4 large files run at once: N parts in flight)
* s5cmd      ``s5cmd --numworkers N cp --concurrency N/4 --part-size 16 'DIR/*' s3://B/P/``
* boto3      ``TransferManager(TransferConfig(max_concurrency=N, multipart_chunksize=16M))``, one process

Each run gets a fresh prefix; afterwards every object is verified (sink: the listing's sizes, and the
CRC-32 the sink computed of every body — composed across parts — against the source file's; rclone: a
listing whose sizes and MD5 ETags must match the local files). Reported per server, dataset and tool:
median wall time, MB/s (10^6 bytes), CPU seconds (the child's rusage, its children included), peak RSS
(psutil polling of the process tree), the integrity headers sent (sink), and asyncdepo's speed over each
peer (``asyncdepo x``; ``md5 x`` for ``asyncdepo-md5``). A run of an extra tool (``asyncdepo-direct``, no
retries) that fails is reported as that tool's limitation and does not fail the benchmark.
Results: ``benchmarks/results/peers-<time>.json``, ``peers-latest.json`` and PNG plots. The tools' command
lines and workers are in ``peers_tools.py``; the measurement is ``measure.py``'s.

Usage: ``python benchmarks/peers.py [--runs 3] [--servers sink,rclone] [--datasets small,large]
[--tools asyncdepo,rclone,s5cmd,boto3] [--transfers 8] [--data-dir DIR]`` (``make bench-peers``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python benchmarks/peers.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.measure import free_port, run_measured, warm
from benchmarks.peers_tools import (
    BUCKET,
    EXTRA_TOOLS,
    KEY,
    SECRET,
    TOOLS,
    MiB,
    tool_command,
    tool_env,
    venv_binary,
    worker_main,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SINK_SCRIPT = HERE / "sink" / "sink.sh"
DATASETS = {"small": (1000, MiB), "large": (4, 256 * MiB)}


# -- datasets -----------------------------------------------------------------------------------------
def _detector_table() -> bytes:
    """256 entries mapping a uniform byte to a 16-bit count: Poisson(0.4)-like (0: 67 %, 1: 27 %, 2: 5 %,
    3: 1 %) plus one hot-pixel value, as in a diffraction frame of low counts."""
    counts = [0] * 171 + [1] * 69 + [2] * 13 + [3] * 2 + [200]
    return b"".join(v.to_bytes(2, "little") for v in counts)


def detector_bytes(seed: int, nbytes: int) -> bytes:
    """Deterministic detector-like data: 16-bit little-endian low counts."""
    import numpy as np

    lut = np.frombuffer(_detector_table(), dtype="<u2")
    rng = np.random.default_rng(seed)
    return bytes(lut[rng.integers(0, 256, nbytes // 2, dtype=np.uint8)].tobytes())


def ensure_dataset(data_dir: Path, name: str) -> Path:
    """The dataset directory, generated on first use; ``manifest.json`` (outside it) lists rel -> md5."""
    count, size = DATASETS[name]
    root = data_dir / name
    manifest = data_dir / f"{name}.manifest.json"
    if manifest.exists() and len(json.loads(manifest.read_text())) == count:
        return root
    root.mkdir(parents=True, exist_ok=True)
    print(f"generating dataset {name}: {count} x {size // MiB} MiB under {root}", flush=True)
    md5s: dict[str, str] = {}
    for i in range(count):
        path = root / (f"frame_{i:05d}.raw" if name == "small" else f"stack_{i}.raw")
        h = hashlib.md5()
        with open(path, "wb") as fh:
            for j in range(0, size, 16 * MiB):
                seed = i * 1000 + j // (16 * MiB) + (7 if name == "large" else 0)
                block = detector_bytes(seed, min(16 * MiB, size - j))
                h.update(block)
                fh.write(block)
        md5s[path.name] = h.hexdigest()
    manifest.write_text(json.dumps(md5s, indent=0))
    return root


def manifest(data_dir: Path, name: str) -> dict[str, str]:
    return dict(json.loads((data_dir / f"{name}.manifest.json").read_text()))


def source_crcs(data_dir: Path, name: str) -> dict[str, str]:
    """rel -> hex CRC-32 of every file of a dataset (computed once, cached beside the manifest)."""
    import zlib

    cache = data_dir / f"{name}.crc32.json"
    if cache.exists():
        return dict(json.loads(cache.read_text()))
    out: dict[str, str] = {}
    for path in sorted((data_dir / name).iterdir()):
        crc = 0
        with open(path, "rb") as fh:
            while block := fh.read(16 * MiB):
                crc = zlib.crc32(block, crc)
        out[path.name] = f"{crc:08x}"
    cache.write_text(json.dumps(out, indent=0))
    return out


def composed_crc(pieces: str) -> str:
    """The CRC-32 of an object from the sink's ``crc:size,crc:size,...`` of its parts."""
    from awscrt.checksums import combine_crc32

    crc = None
    for piece in pieces.split(","):
        value, size = piece.split(":")
        crc = int(value, 16) if crc is None else combine_crc32(crc, int(value, 16), int(size))
    return f"{crc or 0:08x}"


# -- servers ------------------------------------------------------------------------------------------
def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, attempts: int = 200) -> None:
    for _ in range(attempts):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Server:
    """A running S3 endpoint with a way to verify a finished run."""

    name = ""
    url = ""
    pids: list[int]

    def verify(self, prefix: str, expected: dict[str, int], md5s: dict[str, str],
               crcs: dict[str, str] | None = None) -> str | None:
        raise NotImplementedError

    def integrity(self) -> dict[str, int]:
        """Counters of the integrity headers clients sent (only the sink counts them)."""
        return {}

    def cleanup(self, prefix: str) -> None:
        pass

    def stop(self) -> None:
        raise NotImplementedError

    def cpu(self) -> float:
        """CPU seconds used so far by the server's processes."""
        import psutil

        total = 0.0
        for pid in self.pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total


class Sink(Server):
    """The nginx + Lua discard sink (benchmarks/sink/sink.sh)."""

    name = "sink"

    def __init__(self) -> None:
        self.port = free_port()
        self.prefix = Path(tempfile.mkdtemp(prefix="asyncdepo-sink-"))
        subprocess.run(["sh", str(SINK_SCRIPT), "start", str(self.port), str(self.prefix), "1"], check=True)
        self.url = f"http://127.0.0.1:{self.port}"
        import psutil

        master = int((self.prefix / "nginx.pid").read_text())
        self.pids = [master] + [c.pid for c in psutil.Process(master).children()]

    def stats(self) -> dict[str, int]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/_sink/stats", timeout=10) as r:
            return dict(json.loads(r.read()))

    def verify(self, prefix: str, expected: dict[str, int], md5s: dict[str, str],
               crcs: dict[str, str] | None = None) -> str | None:
        # the objects under the prefix with their sizes, through the S3 listing the sink serves, then the
        # CRC-32 the sink computed of what it received against the source files'
        problem = compare_listing(list_objects(self.url, prefix), expected, None)
        if problem or crcs is None:
            return problem
        import urllib.request

        base = f"{BUCKET}/{prefix}/"
        with urllib.request.urlopen(f"{self.url}/_sink/crc?prefix={base}", timeout=30) as r:
            held = {k[len(base):]: v for k, v in json.loads(r.read()).items()}
        for rel, want in crcs.items():
            got = composed_crc(held[rel]) if rel in held else "missing"
            if got != want:
                return f"{rel}: the sink received CRC-32 {got}, the file's is {want} (damaged upload)"
        return None

    def integrity(self) -> dict[str, int]:
        """The sink's counters of integrity headers (``hdr:*``)."""
        return {k[4:]: v for k, v in self.stats().items() if k.startswith("hdr:")}

    def stop(self) -> None:
        subprocess.run(["sh", str(SINK_SCRIPT), "stop", str(self.prefix)], check=False)
        shutil.rmtree(self.prefix, ignore_errors=True)


class RcloneServe(Server):
    """``rclone serve s3`` over a directory on disk, MD5 ETags."""

    name = "rclone-serve"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        env = {**os.environ, "RCLONE_CONFIG": "/nonexistent/rclone.conf"}
        env.pop("AWS_CA_BUNDLE", None)
        (root / BUCKET).mkdir(parents=True, exist_ok=True)
        flags = f"--addr 127.0.0.1:{self.port} --auth-key {KEY},{SECRET} --etag-hash MD5 --log-level ERROR"
        self.proc = subprocess.Popen([venv_binary("rclone"), "serve", "s3", str(root), *flags.split()],
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"
        self.pids = [self.proc.pid]

    def verify(self, prefix: str, expected: dict[str, int], md5s: dict[str, str],
               crcs: dict[str, str] | None = None) -> str | None:
        return compare_listing(list_objects(self.url, prefix), expected, md5s)

    def cleanup(self, prefix: str) -> None:
        shutil.rmtree(self.root / BUCKET / prefix, ignore_errors=True)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def s3_client(url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))


def list_objects(url: str, prefix: str) -> dict[str, tuple[int, str]]:
    """key (relative to ``prefix/``) -> (size, ETag) for every object under the prefix."""
    out: dict[str, tuple[int, str]] = {}
    for page in s3_client(url).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for obj in page.get("Contents", ()):
            out[obj["Key"][len(prefix) + 1 :]] = (int(obj["Size"]), obj["ETag"].strip('"'))
    return out


def compare_listing(listed: dict[str, tuple[int, str]], expected: dict[str, int],
                    md5s: dict[str, str] | None) -> str | None:
    """None when every expected object is there with its size (and md5 ETag); else what is wrong."""
    if set(listed) != set(expected):
        missing = sorted(set(expected) - set(listed))
        return f"{len(listed)} objects listed, {len(expected)} expected; missing e.g. {missing[:3]}"
    for rel, size in expected.items():
        if listed[rel][0] != size:
            return f"{rel}: {listed[rel][0]} bytes, expected {size}"
        if md5s is not None and listed[rel][1] != md5s[rel]:
            return f"{rel}: ETag {listed[rel][1]} is not the file's md5 {md5s[rel]}"
    return None


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, CPU seconds of it and its children (wait4 rusage), peak tree RSS (bytes),
    exit status and the tail of its output (stdout and stderr together)."""
    m = run_measured(cmd, env=env, merge_output=True, interval=0.02)  # RSS sampling period
    return {"wall": m.wall, "cpu": m.cpu, "rss": m.tree_rss, "rc": m.rc, "output": m.stdout[-2000:]}


# -- the benchmark ------------------------------------------------------------------------------------
def integrity_label(counts: dict[str, int]) -> str:
    """What the data requests declared, e.g. ``md5+sha256`` (a name listed when most requests had it)."""
    n = counts.get("requests", 0)
    if not n:
        return ""
    names = [k for k in ("md5", "crc64nvme", "crc32c", "crc32", "sha1", "sha256", "trailer") if counts.get(k)]
    return "+".join(k if counts[k] >= n else f"{k}({counts[k]}/{n})" for k in names) or "none"


def run_one(server: Server, tool: str, ds_name: str, src: Path, run: int, md5s: dict[str, str],
            expected: dict[str, int], args: argparse.Namespace, crcs: dict[str, str] | None = None
            ) -> dict[str, Any]:
    """One tool pushing one dataset once, verified; the result row."""
    prefix = f"{tool}-{ds_name}-{run}-{uuid.uuid4().hex[:6]}"
    total = sum(expected.values())
    with tempfile.TemporaryDirectory() as scratch:
        cmd = tool_command(tool, src, server.url, prefix, args.transfers, args.chunk_mib, Path(scratch))
        cpu0, seen0 = server.cpu(), server.integrity()
        m = measure(cmd, tool_env())
        m["server_cpu"] = server.cpu() - cpu0
        seen = {k: v - seen0.get(k, 0) for k, v in server.integrity().items() if v - seen0.get(k, 0)}
    problem = server.verify(prefix, expected, md5s, crcs) if m["rc"] == 0 else "exit status"
    server.cleanup(prefix)
    row = {"server": server.name, "dataset": ds_name, "tool": tool, "run": run, "bytes": total,
           "files": len(expected), "ok": problem is None, "problem": problem, "integrity": seen,
           **{k: m[k] for k in ("wall", "cpu", "rss", "rc", "server_cpu")}}
    if problem:
        row["output"] = m["output"]
    print(f"{server.name:12} {ds_name:6} {tool:16} run {run}: {m['wall']:6.2f} s "
          f"{total / m['wall'] / 1e6:7.1f} MB/s cpu {m['cpu']:5.2f} s rss {m['rss'] / 1e6:6.1f} MB "
          f"{integrity_label(seen)}" + (f"  FAILED: {problem}" if problem else ""), flush=True)
    return row


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every server x dataset x run x tool, tools rotated run by run (see the module docstring)."""
    settings = {"runs": args.runs, "transfers": args.transfers, "chunk_mib": args.chunk_mib,
                "cores": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "load_before": os.getloadavg()}
    data_dir = Path(args.data_dir)
    datasets = {name: ensure_dataset(data_dir, name) for name in args.datasets}
    results: list[dict[str, Any]] = []
    for server_name in args.servers:
        disk = Path(tempfile.mkdtemp(prefix="asyncdepo-rclone-s3-", dir=args.disk_dir))
        server: Server = Sink() if server_name == "sink" else RcloneServe(disk)
        try:
            for ds_name, src in datasets.items():
                expected = {p.name: p.stat().st_size for p in src.iterdir() if p.is_file()}
                md5s = manifest(data_dir, ds_name)
                crcs = source_crcs(data_dir, ds_name) if server_name == "sink" else None
                warm(src)  # every tool reads from the page cache, not only those after the first
                for r in range(args.runs):
                    k = r % len(args.tools)
                    for tool in args.tools[k:] + args.tools[:k]:
                        results.append(run_one(server, tool, ds_name, src, r, md5s, expected, args, crcs))
        finally:
            server.stop()
            shutil.rmtree(disk, ignore_errors=True)
    return {"results": results, "summary": summarize(results), "settings": settings}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (server, dataset, tool) over the successful runs, with asyncdepo's speed over each."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["server"], row["dataset"], row["tool"]), []).append(row)
    out = []
    for (server, ds, tool), rows in groups.items():
        good = [r for r in rows if r["ok"]]
        entry: dict[str, Any] = {"server": server, "dataset": ds, "tool": tool, "runs": len(rows),
                                 "failed": len(rows) - len(good)}
        if good:
            wall = statistics.median(r["wall"] for r in good)
            entry.update(wall_s=round(wall, 3), mb_s=round(good[0]["bytes"] / wall / 1e6, 1),
                         cpu_s=round(statistics.median(r["cpu"] for r in good), 2),
                         peak_rss_mb=round(max(r["rss"] for r in good) / 1e6, 1),
                         server_cpu_s=round(statistics.median(r["server_cpu"] for r in good), 2))
            seen: dict[str, int] = {}
            for r in good:
                for k, v in (r.get("integrity") or {}).items():
                    seen[k] = seen.get(k, 0) + v
            entry["integrity"] = integrity_label(seen)
        if len(good) < len(rows):
            entry["problems"] = sorted({str(r["problem"]) for r in rows if not r["ok"]})
        out.append(entry)
    for ours_tool, key in (("asyncdepo", "asyncdepo_speedup"), ("asyncdepo-md5", "md5_speedup")):
        ours = {(e["server"], e["dataset"]): e["mb_s"] for e in out if e["tool"] == ours_tool and "mb_s" in e}
        for entry in out:
            if (entry["server"], entry["dataset"]) in ours and "mb_s" in entry:
                entry[key] = round(ours[(entry["server"], entry["dataset"])] / entry["mb_s"], 2)
    return out


def print_table(summary: list[dict[str, Any]]) -> None:
    print(f"\n{'server':12} {'dataset':7} {'tool':16} {'MB/s':>8} {'wall s':>7} {'CPU s':>6} {'RSS MB':>7} "
          f"{'asyncdepo x':>12} {'md5 x':>6}  integrity sent (per data request, counted at the sink)")
    order = TOOLS + EXTRA_TOOLS
    for e in sorted(summary, key=lambda e: (e["server"], e["dataset"], order.index(e["tool"]))):
        head = f"{e['server']:12} {e['dataset']:7} {e['tool']:16}"
        if "mb_s" not in e:
            print(f"{head} failed every run: {'; '.join(e.get('problems', []))[:200]}")
            continue
        note = f"  ({e['failed']} of {e['runs']} runs failed)" if e["failed"] else ""
        print(f"{head} {e['mb_s']:8.1f} {e['wall_s']:7.2f} {e['cpu_s']:6.2f} {e['peak_rss_mb']:7.1f} "
              f"{e.get('asyncdepo_speedup', 0):12.2f} {e.get('md5_speedup', 0):6.2f}  {e.get('integrity', '')}"
              f"{note}")


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Bars of MB/s, CPU seconds and peak RSS per tool, one row of panels per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = sorted({e["server"] for e in summary})
    datasets = sorted({e["dataset"] for e in summary})
    tools = [t for t in TOOLS + EXTRA_TOOLS if any(e["tool"] == t for e in summary)]
    metrics = [("mb_s", "MB/s (higher is better)"), ("cpu_s", "client CPU s"), ("peak_rss_mb", "peak RSS MB")]
    index = {(e["server"], e["dataset"], e["tool"]): e for e in summary}
    fig, axes = plt.subplots(len(servers), len(metrics), figsize=(5 * len(metrics), 3.6 * len(servers)),
                             squeeze=False)
    width = 0.8 / max(1, len(tools))
    for i, server in enumerate(servers):
        for j, (metric, label) in enumerate(metrics):
            ax = axes[i][j]
            for k, tool in enumerate(tools):
                vals = [index.get((server, d, tool), {}).get(metric, 0) for d in datasets]
                ax.bar([x + k * width for x in range(len(datasets))], vals, width, label=tool)
            ax.set_xticks([x + width * (len(tools) - 1) / 2 for x in range(len(datasets))], datasets)
            ax.set_title(f"{server}: {label}", fontsize=10)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_boto3", "_direct"):  # a worker, as peers_tools.py runs them
        return worker_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    split: Callable[[str], list[str]] = lambda s: [x for x in s.split(",") if x]
    p.add_argument("--runs", type=int, default=3, help="runs per tool and dataset (median reported)")
    p.add_argument("--servers", type=split, default=["sink", "rclone"], help="sink,rclone")
    p.add_argument("--datasets", type=split, default=["small", "large"], help="small,large")
    p.add_argument("--tools", type=split, default=list(TOOLS),
                   help=",".join(TOOLS) + " (and asyncdepo-direct: the adapter without the engine; "
                   "asyncdepo-before: an older asyncdepo named by $ASYNCDEPO_BENCH_BEFORE, same flags)")
    p.add_argument("--transfers", type=int, default=8, help="requests in flight for every tool")
    p.add_argument("--chunk-mib", type=int, default=16, help="part size for every tool (MiB)")
    p.add_argument("--data-dir", default=os.environ.get("ASYNCDEPO_BENCH_DATA", "/tmp/asyncdepo-bench-data"))
    p.add_argument("--disk-dir", default=None, help="where rclone serve s3 writes (default: TMPDIR)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.servers = [{"rclone-serve": "rclone"}.get(s, s) for s in args.servers]
    unknown = (set(args.tools) - set(TOOLS + EXTRA_TOOLS) or set(args.servers) - {"sink", "rclone"}
               or set(args.datasets) - set(DATASETS))
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))}")
    report = run_all(args)
    print_table(report["summary"])
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"peers-{stamp}.json", "peers-latest.json"):
        (args.out / name).write_text(json.dumps(report, indent=1))
    plot(report["summary"], args.out / "peers-latest.png")
    shutil.copy(args.out / "peers-latest.png", args.out / f"peers-{stamp}.png")
    print(f"\nwrote {args.out / f'peers-{stamp}.json'} and peers-latest.png")
    # an extra tool is a probe, not a product: its failures (asyncdepo-direct has no retries, so one of
    # rclone serve s3's 500s fails its run) are reported above as its limitation, not the benchmark's
    limits = sorted({(r["server"], r["tool"]) for r in report["results"] if not r["ok"] and r["tool"] in EXTRA_TOOLS})
    for server, tool in limits:
        print(f"note: {tool} failed some runs on {server}: a known limitation of that probe (no retries)")
    return 0 if all(r["ok"] for r in report["results"] if r["tool"] not in EXTRA_TOOLS) else 1


if __name__ == "__main__":
    sys.exit(main())
