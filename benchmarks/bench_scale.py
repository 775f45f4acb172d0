"""`make bench-scale`: one push over 1, 2 and 4 workers of a local Dask cluster (``--local-cluster N``).

(a) Scaling. Each worker stands in for a data-mover node whose NIC carries ``--share`` bytes/s: the job runs
with ``--bwlimit N x share`` (the coordinator divides it among the live workers), so a job that scales
moves N times as much per second. Throughput is the *steady* rate, bytes sent between the moments the job
passed 10 % and 90 % of its bytes (from the ``--json`` snapshots): the cluster's start, the workers' first
second of bucket credit and the tail of the last batches are left out of it; the whole job's rate is shown
too. Targets: >= 1.8x at 2 workers and >= 3.4x at 4, which says the coordinator (walk, journal, results)
is not what limits the job.

(b) Overhead, no limit: ``--local-cluster 1`` against a plain push of the same dataset to the same kind of
target, alternating, median of ``--rounds``. "job" is the time the engine reports (the cluster already up),
"wall" the whole command (starting the cluster included), "CPU" the CPU seconds of every process that took
part (a standing cluster's worker included; its scheduler and nanny not). A third variant runs on a one-worker cluster that
is already up (``--scheduler``), as a facility's would be, with its scheduler in another process.

The target is a directory (``file://``), the cheapest sink, so that the sink is not what is measured. The
dataset is written once into a temporary directory. Results go to benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def make_dataset(root: Path, files: int, size: int) -> int:
    """``files`` files of ``size`` random bytes (one random block reused with a per-file prefix)."""
    block = os.urandom(size)
    for i in range(files):
        p = root / f"d{i % 16:02d}" / f"frame_{i:05d}.raw"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(i.to_bytes(8, "little") + block[8:])
    return files * size


def push(data: Path, out: Path, journal: Path, extra: list[str]) -> dict[str, Any]:
    """One ``asyncdepo push`` with ``--json``; its report, snapshots and wall time.

    :raises RuntimeError: the push failed.
    """
    shutil.rmtree(out, ignore_errors=True)
    for j in journal.parent.glob(journal.name + "*"):
        j.unlink()
    argv = [sys.executable, "-m", "asyncdepo.cli", "push", str(data), f"file://{out}", "--journal", str(journal),
            "--json", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the command and every process it started and reaped (a local cluster's nanny and workers)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    finished = [d for d in lines if d.get("event") == "job_finished"]
    if proc.returncode != 0 or not finished:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    snaps = [(d["elapsed"], d["bytes_sent"]) for d in lines if d.get("event") == "snapshot"]
    return {"report": finished[0]["report"], "snapshots": snaps, "wall": wall, "cpu": cpu}


def steady_rate(snaps: list[tuple[float, int]], total: int) -> float:
    """Bytes per second between the snapshots where the job passed 10 % and 90 % of ``total``."""
    lo = next((s for s in snaps if s[1] >= 0.1 * total), None)
    hi = next((s for s in snaps if s[1] >= 0.9 * total), None)
    if lo is None or hi is None or hi[0] <= lo[0]:
        return float("nan")
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=400)
    p.add_argument("--size", default="1M", help="bytes per file (K/M/G)")
    p.add_argument("--share", default="10M", help="each worker's share of --bwlimit, bytes/s (binary units)")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the overhead comparison")
    p.add_argument("--overhead-files", type=int, default=256)
    p.add_argument("--overhead-size", default="4M")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = p.parse_args(argv)
    share = _size(args.share)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "make bench-scale",
                               "share": args.share, "scaling": [], "overhead": {}}
    with tempfile.TemporaryDirectory(prefix="asyncdepo-scale-") as tmp:
        base = Path(tmp)
        data = base / "data"
        total = make_dataset(data, args.files, _size(args.size))
        print(f"scaling: {args.files} x {args.size} ({total / 1e6:,.0f} MB), {args.share}/s per worker")
        first = None
        for n in [int(w) for w in args.workers.split(",")]:
            run = push(data, base / "out", base / "j.sqlite",
                       ["--local-cluster", str(n), "--bwlimit", str(share * n), "--batch-files", "4"])
            rep = run["report"]
            rate = steady_rate(run["snapshots"], total)
            first = first or rate
            row = {"workers": n, "steady_mb_s": round(rate / 1e6, 2), "job_mb_s": round(rep["mb_per_s"], 2),
                   "ratio": round(rate / first, 2), "seconds": rep["seconds"],
                   "per_worker_files": {k: v["files"] for k, v in rep["workers"].items()}}
            results["scaling"].append(row)
            print(f"  {n} worker(s): {row['steady_mb_s']:8.2f} MB/s steady ({row['ratio']:.2f}x), "
                  f"{row['job_mb_s']:.2f} MB/s over the job, files per worker {row['per_worker_files']}")
        shutil.rmtree(data)
        data = base / "data-overhead"
        total = make_dataset(data, args.overhead_files, _size(args.overhead_size))
        print(f"overhead, no limit: {args.overhead_files} x {args.overhead_size} ({total / 1e6:,.0f} MB), "
              f"median of {args.rounds}")
        from distributed import LocalCluster

        variants = (("plain", []), ("local-cluster 1", ["--local-cluster", "1"]), ("scheduler, 1 worker", None))
        import psutil

        times: dict[str, dict[str, list[float]]] = {name: {"job": [], "wall": [], "cpu": []}
                                                    for name, _ in variants}
        # the third variant: a one-worker cluster already up (as a facility's would be), given by --scheduler
        with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as up:
            from distributed import Client

            with Client(up) as client:
                worker = psutil.Process(next(iter(client.run(os.getpid).values())))
            for _ in range(args.rounds):
                for name, extra in variants:
                    w0 = sum(worker.cpu_times()[:2])
                    run = push(data, base / "out", base / "j.sqlite",
                               extra if extra is not None else ["--scheduler", up.scheduler_address])
                    times[name]["job"].append(run["report"]["seconds"])
                    times[name]["wall"].append(run["wall"])
                    # CPU seconds of the command, plus the standing worker's when it did the sending
                    times[name]["cpu"].append(run["cpu"] + (sum(worker.cpu_times()[:2]) - w0 if extra is None else 0))
        for name, t in times.items():
            results["overhead"][name] = {k: round(statistics.median(v), 3) for k, v in t.items()}
        over = results["overhead"]
        plain, cl, up_ = over["plain"], over["local-cluster 1"], over["scheduler, 1 worker"]
        over["job_overhead_pct"] = round(100 * (cl["job"] / plain["job"] - 1), 1)
        over["wall_overhead_pct"] = round(100 * (cl["wall"] / plain["wall"] - 1), 1)
        over["scheduler_job_overhead_pct"] = round(100 * (up_["job"] / plain["job"] - 1), 1)
        for name in times:
            o = over[name]
            print(f"  {name:<20} job {o['job']:6.2f} s ({total / 1e6 / o['job']:7.1f} MB/s)   wall {o['wall']:6.2f} s"
                  f"   CPU {o['cpu']:6.2f} s")
        print(f"  overhead of --local-cluster 1: job {over['job_overhead_pct']:+.1f} %, wall "
              f"{over['wall_overhead_pct']:+.1f} %; of --scheduler (one worker, up): job "
              f"{over['scheduler_job_overhead_pct']:+.1f} %")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    ok2 = all(r["ratio"] >= 1.8 for r in results["scaling"] if r["workers"] == 2)
    ok4 = all(r["ratio"] >= 3.4 for r in results["scaling"] if r["workers"] == 4)
    print(f"targets: 2 workers >= 1.8x {'met' if ok2 else 'MISSED'}; 4 workers >= 3.4x {'met' if ok4 else 'MISSED'}; "
          f"overhead < 10 %: {'met' if results['overhead']['job_overhead_pct'] < 10 else 'MISSED'} (job)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
