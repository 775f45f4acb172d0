"""gypsum push of 1,000 x 1 MiB: asyncdepo vs gypsum-client's ``upload_directory`` (same concurrency).

The dataset (``--files`` random files of ``--file-size``, in 10 directories) is generated once into
``benchmarks/data/gypsum-<n>x<size>/`` and read once before timing so both start from the page cache.
Each round, on a fresh simulator process (``asyncdepo sim gypsum``, its own storage), both contenders
upload the dataset to assets of their own (so nothing deduplicates), one after the other, in alternating
order:

* ``asyncdepo push gypsum DIR bench/<asset>/v1 --transfers N --no-dedup`` (a subprocess): md5 of every file
  in parallel threads, quota check, start, N concurrent presign + streamed PUT with Content-MD5, complete;
* ``gypsum_client.upload_directory(DIR, ..., concurrent=N)`` (a subprocess running the official client,
  0.2.0): md5 of each file read whole into memory, one at a time, then a ``multiprocessing.Pool(N)`` of
  requests-based presign + PUT, complete.

Each contender is reaped with ``os.wait4``: CPU seconds are user+sys of it and its children (the pool's
workers included); ``peak_rss_mb`` is the largest single process; ``peak_tree_rss_mb`` samples the whole
process tree every 50 ms (psutil) and keeps the largest sum — the fair memory figure for a process pool.
Throughput is dataset bytes per wall second, MB = 10^6 bytes; the simulator runs in its own process and
is not counted. The GitHub token reaches both through the environment, never argv. Figures drift on shared
machines; only the ratio within one run means much; each round records the 1-minute load
average when it started. asyncdepo's run is split in its phases from its ``--json`` events: ``prehash_s``
(start of the run to the upload's start: md5 of every file, quota check, start) and ``upload_s`` (presigns
and PUTs to the end); ``simulator_cpu_s / upload_s`` near 1 means the simulator's single thread (md5 and a
disk write of every byte it receives) bounded the upload. Targets: asyncdepo >= 2x faster (median of the
rounds), at most a quarter of gypsum-client's peak memory (tree).

Usage: ``python -m benchmarks.bench_gypsum [--files 1000] [--file-size 1M] [--concurrency 8] [--rounds 2]
[--strict]``; results go to ``benchmarks/results/gypsum.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

from asyncdepo.config import parse_size

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_gypsum.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.measure import asyncdepo_cmd, child_env, run_measured, start_sim, stop_sim, warm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOKEN, LOGIN = "bench-token", "bench"

GYPSUM_CLIENT_SCRIPT = """
import os, sys
import gypsum_client as g
directory, asset, url, concurrent, cache = sys.argv[1:6]
ok = g.upload_directory(directory, "bench", asset, "v1", url=url, token=os.environ["GYPSUM_BENCH_TOKEN"],
                        concurrent=int(concurrent), cache_dir=cache)
sys.exit(0 if ok else 1)
"""


def make_dataset(root: Path, files: int, size: int) -> Path:
    """``files`` random files of ``size`` bytes in 10 directories (cached by shape)."""
    data = root / "data"
    marker = root / "shape.json"
    shape = {"files": files, "size": size, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return data
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(20260722)
    for i in range(files):
        path = data / f"d{i % 10}" / f"file_{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    marker.write_text(json.dumps(shape))
    return data


def call(url: str, method: str, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def run_proc(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` (:func:`benchmarks.measure.run_measured`): wall seconds, CPU seconds (children included),
    peak RSS of the largest single process and of the whole process tree (MB)."""
    m = run_measured(cmd, env=env, cwd=REPO)
    if m.rc != 0:
        raise SystemExit(m.failure(cmd))
    return {"seconds": m.wall, "cpu_s": m.cpu, "peak_rss_mb": m.max_rss / 2**20,
            "peak_tree_rss_mb": m.tree_rss / 2**20}


def ours(data: Path, url: str, asset: str, concurrency: int, work: Path) -> dict[str, Any]:
    env = child_env(ASYNCDEPO_GYPSUM_TOKEN=TOKEN, XDG_STATE_HOME=str(work / "state"),
                    XDG_CONFIG_HOME=str(work / "config"))
    cmd = [*asyncdepo_cmd(), "push", "gypsum", str(data), f"bench/{asset}/v1", "--server", url,
           "--transfers", str(concurrency), "--no-dedup", "--json", "--journal", str(work / "journal.sqlite")]
    m = run_measured(cmd, env=env, cwd=REPO)
    if m.rc != 0:
        raise SystemExit(m.failure(cmd))
    times: dict[str, float] = {}
    for line in m.stdout.splitlines():
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "job_started":
            times["start"] = event["t"]
        elif event.get("event") == "message" and str(event.get("text", "")).startswith("upload started"):
            times["upload"] = event["t"]
        elif event.get("event") == "job_finished":
            times["end"] = event["t"]
    phases = ({"prehash_s": times["upload"] - times["start"], "upload_s": times["end"] - times["upload"]}
              if len(times) == 3 else {})
    return {"seconds": m.wall, "cpu_s": m.cpu, "peak_rss_mb": m.max_rss / 2**20,
            "peak_tree_rss_mb": m.tree_rss / 2**20, **phases}


def theirs(data: Path, url: str, asset: str, concurrency: int, work: Path) -> dict[str, Any]:
    env = child_env(GYPSUM_BENCH_TOKEN=TOKEN, GYPSUM_CACHE_DIR=str(work / "gypsum-cache"))
    return run_proc([sys.executable, "-c", GYPSUM_CLIENT_SCRIPT, str(data), asset, url, str(concurrency),
                     str(work / "gypsum-cache")], env)


def check(url: str, asset: str, files: int, total: int) -> None:
    """The version exists, complete, with every file of the right size (the store checked each md5)."""
    quoted = quote(f"bench/{asset}/v1/..manifest", safe="")
    with urllib.request.urlopen(f"{url}/file/{quoted}") as r:
        manifest = json.loads(r.read())
    if len(manifest) != files or sum(e["size"] for e in manifest.values()) != total:
        raise SystemExit(f"{asset}: the uploaded version is incomplete")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--file-size", default="1M")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", type=Path, default=HERE / "data")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gypsum.json")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target (ratio, memory) is missed")
    args = ap.parse_args(argv)
    try:
        import gypsum_client  # noqa: F401
        import psutil
    except ImportError as exc:
        raise SystemExit(f"{exc.name} is needed (pip install -e '.[bench]')") from None
    size = parse_size(args.file_size)
    data = make_dataset(args.data / f"gypsum-{args.files}x{args.file_size}", args.files, size)
    total = warm(data)
    rounds: list[dict[str, Any]] = []
    for n in range(args.rounds):
        work = Path(tempfile.mkdtemp(prefix="bench-gypsum-"))
        sim, url = start_sim("gypsum", work / "sim", "--identity", f"{TOKEN}={LOGIN}", "--admin", LOGIN)
        try:
            call(url, "POST", "/create/bench", {"permissions": {"owners": [LOGIN], "uploaders": []},
                                                "quota": {"baseline": 10**15, "growth_rate": 0}})
            order = ("asyncdepo", "gypsum_client") if n % 2 == 0 else ("gypsum_client", "asyncdepo")
            row: dict[str, Any] = {"load": round(os.getloadavg()[0], 2)}
            server = psutil.Process(sim.pid)
            for who in order:
                asset = f"{who}-{n}"
                run = ours if who == "asyncdepo" else theirs
                before = sum(server.cpu_times()[:2])
                row[who] = run(data, url, asset, args.concurrency, work)
                row[who]["simulator_cpu_s"] = sum(server.cpu_times()[:2]) - before
                row[who]["mb_s"] = total / 1e6 / row[who]["seconds"]
                check(url, asset, args.files, total)
            row["ratio"] = row["asyncdepo"]["mb_s"] / row["gypsum_client"]["mb_s"]
            rounds.append(row)
            a, g = row["asyncdepo"], row["gypsum_client"]
            print(f"round {n + 1}: asyncdepo {a['mb_s']:.0f} MB/s ({a['cpu_s']:.1f} CPU s, "
                  f"{a['peak_tree_rss_mb']:.0f} MB; simulator {a['simulator_cpu_s']:.1f} CPU s) | gypsum-client "
                  f"{g['mb_s']:.0f} MB/s ({g['cpu_s']:.1f} CPU s, {g['peak_tree_rss_mb']:.0f} MB; simulator "
                  f"{g['simulator_cpu_s']:.1f} CPU s) | ratio {row['ratio']:.2f} (load {row['load']:.1f}); "
                  f"asyncdepo's phases: prehash {a.get('prehash_s', 0):.1f} s, upload {a.get('upload_s', 0):.1f} s",
                  flush=True)
        finally:
            stop_sim(sim)
            shutil.rmtree(work, ignore_errors=True)
    best = {k: max(r[k]["mb_s"] for r in rounds) for k in ("asyncdepo", "gypsum_client")}
    mem = {k: max(r[k]["peak_tree_rss_mb"] for r in rounds) for k in ("asyncdepo", "gypsum_client")}
    ratio_median = statistics.median(r["ratio"] for r in rounds)
    result = {
        "benchmark": f"gypsum push of {args.files} x {args.file_size} to the simulator",
        "bytes": total, "files": args.files, "file_size": size, "concurrency": args.concurrency,
        "baseline": f"gypsum_client.upload_directory(concurrent={args.concurrency}) (gypsum-client 0.2.0)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rounds": rounds, "best_mb_s": best, "ratio_best": best["asyncdepo"] / best["gypsum_client"],
        "ratio_median": ratio_median, "peak_tree_rss_mb": mem,
        "targets": {"ratio_ge_2": ratio_median >= 2.0,
                    "quarter_of_peak_memory": mem["asyncdepo"] <= mem["gypsum_client"] / 4},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"best: asyncdepo {best['asyncdepo']:.0f} MB/s, gypsum-client {best['gypsum_client']:.0f} MB/s, ratio "
          f"{result['ratio_best']:.2f} (median {ratio_median:.2f}); peak memory {mem['asyncdepo']:.0f} MB vs "
          f"{mem['gypsum_client']:.0f} MB -> {args.out}")
    ok = all(result["targets"].values())
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
