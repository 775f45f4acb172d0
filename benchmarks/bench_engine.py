"""`make bench`: asyncdepo against the tus simulator on loopback, with a baseline on the same bytes in the
same run: (a) 4 x 256 MiB vs `curl -T` of each file, (b) 10,000 x 64 KiB vs `curl -T`, (c) the large set
with --compress zstd:3 vs `zstd -3 -T0 | curl -T -`, and (d) a 200,000-file walk (peak RSS only).

The simulator runs as its own process (`asyncdepo sim tus`) so its CPU is not ours. Each row: MB/s,
files/s, CPU seconds (children's rusage) and peak RSS (polled with psutil), and the ratio to the
baseline. Results go to benchmarks/results/engine.json. Baselines upload straight into the simulator's
creation-with-upload route, which is the cheapest way a tus server can take a file.

With ``ASYNCDEPO_BENCH_BEFORE`` naming an older checkout's ``asyncdepo`` script, rows (a)-(c) also run that
release with the same flags against the same simulator, alternating with the others: a before/after in one
run (``before`` in the results, and ``speedup`` = its wall time over today's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asyncdepo.sim.datasets import make_files

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_engine.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.measure import free_port, run_measured

HERE = Path(__file__).parent
DATA = HERE / "data"
RESULTS = HERE / "results"
VENV_BIN = Path(sys.executable).parent


def measured(argv: list[str]) -> dict[str, float]:
    """Run ``argv``; wall time, CPU seconds and peak RSS of its process tree (MB).

    :raises RuntimeError: it failed.
    """
    m = run_measured(argv)
    if m.rc != 0:
        raise RuntimeError(m.failure(argv))
    return {"wall": m.wall, "cpu": m.cpu, "rss_mb": m.tree_rss / 1e6}


class Sim:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc = subprocess.Popen([str(VENV_BIN / "asyncdepo"), "sim", "tus", "--port", str(self.port),
                                      "--root", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "listening on ..."
        self.url = f"http://127.0.0.1:{self.port}/files/"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def _curl_argv(files: list[Path], url: str, parallel: int, compress: bool) -> list[str]:
    """``xargs -P`` running a small sh script per file that sends it with curl -T (POST,
    creation-with-upload); no shell between us and xargs."""
    fd, name = tempfile.mkstemp(suffix=".lst")
    os.close(fd)
    list_file = Path(name)
    list_file.write_text("\n".join(str(f) for f in files) + "\n")
    fd, name = tempfile.mkstemp(suffix=".sh")
    os.close(fd)  # an open writer would make exec fail with "text file busy"
    script = Path(name)
    head = "-H 'Tus-Resumable: 1.0.0' -H 'Content-Type: application/offset+octet-stream'"
    base = url.rstrip("/")  # curl -T appends the file name to a URL ending in '/'
    if compress:
        # zstd output length is unknown up front: deferred length, one request per file
        body = f"zstd -3 -T0 -q -c \"$1\" | curl -sf -X POST {head} -H 'Upload-Defer-Length: 1' -T - {base} -o /dev/null"
    else:
        body = f"curl -sf -X POST {head} -H \"Upload-Length: $(stat -c %s \"$1\")\" -T \"$1\" {base} -o /dev/null"
    script.write_text("#!/bin/sh\nset -e\n" + body + "\n")
    script.chmod(0o755)
    return ["xargs", "-P", str(parallel), "-a", str(list_file), "-n", "1", str(script)]


def bench_row(name: str, data: Path, *, transfers: int, extra: list[str], compress: bool,
              tmp: Path) -> dict:
    files = sorted(p for p in data.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    rows = {}
    before = os.environ.get("ASYNCDEPO_BENCH_BEFORE")
    tools = ("asyncdepo", "baseline", "before") if before else ("asyncdepo", "baseline")
    for tool in tools * 2:  # alternate, keep the better of two
        sim = Sim(tmp / f"sim-{tool}")
        try:
            if tool in ("asyncdepo", "before"):
                binary = str(VENV_BIN / "asyncdepo") if tool == "asyncdepo" else str(before)
                cmd = [binary, "push", str(data), f"tus+{sim.url}", "-q",
                       "--journal", str(tmp / f"j-{time.time_ns()}.sqlite"), "--transfers", str(transfers),
                       *extra]
                m = measured(cmd)
            else:
                m = measured(_curl_argv(files, sim.url, transfers, compress))
        finally:
            sim.close()
        best = rows.get(tool)
        if best is None or m["wall"] < best["wall"]:
            rows[tool] = m
    out = {"name": name, "files": len(files), "bytes": size}
    for tool, m in rows.items():
        out[tool] = {**{k: round(v, 3) for k, v in m.items()}, "mb_s": round(size / 1e6 / m["wall"], 1),
                     "files_s": round(len(files) / m["wall"], 1)}
    out["ratio"] = round(rows["baseline"]["wall"] / rows["asyncdepo"]["wall"], 2)
    if "before" in rows:
        out["speedup"] = round(rows["before"]["wall"] / rows["asyncdepo"]["wall"], 2)
    return out


def walk_rss(count: int, tmp: Path) -> dict:
    """Peak RSS and rate of a push of ``count`` empty files to the tus simulator (a separate process):
    the walk, the bounded stream, the journal and one request per file, with no bytes to speak of."""
    root = DATA / f"walk-{count}"
    if not root.exists():
        for i in range(count):
            d = root / f"d{i // 1000:04d}"
            if i % 1000 == 0:
                d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i:07d}").write_bytes(b"")
    sim = Sim(tmp / "sim-walk")
    try:
        cmd = [str(VENV_BIN / "asyncdepo"), "push", str(root), f"tus+{sim.url}", "-q",
               "--journal", str(tmp / "walk.sqlite")]
        m = measured(cmd)
    finally:
        sim.close()
    return {"name": f"walk+push {count:,} empty files", "files": count, "asyncdepo": {
        "wall": round(m["wall"], 2), "cpu": round(m["cpu"], 2), "rss_mb": round(m["rss_mb"], 1),
        "files_s": round(count / m["wall"], 1)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller datasets (a smoke run)")
    ap.add_argument("--rows", default="a,b,c,walk", help="which rows to run (a,b,c,walk)")
    args = ap.parse_args(argv)
    big_n, big_size = (4, 256 << 20) if not args.quick else (2, 32 << 20)
    small_n = 10_000 if not args.quick else 1000
    walk_n = 200_000 if not args.quick else 20_000
    large = make_files(DATA / f"large-{big_n}x{big_size >> 20}M", big_n, big_size)
    small = make_files(DATA / f"small-{small_n}x64K", small_n, 64 << 10, detector=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="asyncdepo-bench-") as t:
        tmp = Path(t)
        rows = set(args.rows.split(","))
        if "a" in rows:
            results.append(bench_row("(a) large files", large, transfers=4, extra=[], compress=False, tmp=tmp))
        if "b" in rows:
            results.append(bench_row("(b) small files", small, transfers=8, extra=[], compress=False, tmp=tmp))
        if "c" in rows:
            results.append(bench_row("(c) large, zstd:3", large, transfers=4, extra=["--compress", "zstd:3"],
                                     compress=True, tmp=tmp))
        if "walk" in rows:
            results.append(walk_rss(walk_n, tmp))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "rows": results}, indent=2))
    print("| set | asyncdepo MB/s | files/s | CPU s | peak RSS MB | baseline MB/s | ratio | before MB/s, CPU s | "
          "speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a, b, old = r["asyncdepo"], r.get("baseline"), r.get("before")
        then = f"{old['mb_s']}, {old['cpu']}" if old else "-"
        print(f"| {r['name']} | {a.get('mb_s', '-')} | {a['files_s']} | {a['cpu']} | {a['rss_mb']} | "
              f"{b['mb_s'] if b else '-'} | {r.get('ratio', '-')} | "
              f"{then} | {r.get('speedup', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
