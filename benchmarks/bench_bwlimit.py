"""How close a push stays to ``--bwlimit``: the end-to-end check of the token bucket (its unit test steps a fake
clock; a timing assert has no place in the test suite).

A push of ``--size`` MB in ``--files`` files to a ``file://`` directory (so the disk, not a server, is the far
end) under ``--bwlimit RATE``, with ``--json`` snapshots (bytes on the wire, twice a second). Figures, as
ratios of the limit (binary: 20M = 20 MiB/s): ``ratio`` — the report's bytes over its seconds (start-up and
the final fsyncs included, so it reads low); ``moving`` — from the first snapshot with bytes on the wire to
the last one before the end; ``max_window`` / ``min_window`` — the fastest and slowest 10 s span of snapshots
after the first second. Within 3 % of the limit is the goal for ``moving`` and the windows.

    python -m benchmarks.bench_bwlimit --rate 20M --size 200 --files 4 --out benchmarks/results/bwlimit.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import run_measured

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def rate_of(text: str) -> float:
    """``20M`` -> bytes/s, as ``--bwlimit`` reads it (binary units)."""
    unit = text[-1].upper()
    return float(text[:-1]) * UNITS[unit] if unit in UNITS else float(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", default="20M", help="--bwlimit value (default 20M)")
    p.add_argument("--size", type=int, default=200, help="MB to push (default 200)")
    p.add_argument("--files", type=int, default=4, help="files the bytes are split into (default 4)")
    p.add_argument("--chunk-size", default="16M", help="--chunk-size of the push (default 16M; the bytes of a "
                   "chunk land at once, so a 10 s window can hold one chunk more than the limit allows)")
    p.add_argument("--dest", type=Path, help="directory to push into (default: a temporary one; a tmpfs such "
                   "as /dev/shm keeps the disk's writeback out of the figure)")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    limit = rate_of(args.rate)
    with tempfile.TemporaryDirectory(prefix="bench-bwlimit-") as tmp, \
            tempfile.TemporaryDirectory(prefix="bench-bwlimit-dest-", dir=args.dest) as dest:
        src = Path(tmp) / "src"
        src.mkdir()
        each = args.size * 1_000_000 // args.files
        for i in range(args.files):
            (src / f"f{i}.bin").write_bytes(os.urandom(each))
        cmd = [sys.executable, "-m", "asyncdepo.cli", "push", str(src), f"file://{dest}", "--journal",
               f"{tmp}/j.sqlite", "--bwlimit", args.rate, "--chunk-size", args.chunk_size, "--json"]
        m = run_measured(cmd)
        if m.rc != 0:
            print(m.failure(cmd), file=sys.stderr)
            return 1
    events = [json.loads(line) for line in m.stdout.splitlines() if line.startswith("{")]
    report = next(e["report"] for e in events if e["event"] == "job_finished")
    snaps = [(e["elapsed"], e["bytes_sent"]) for e in events if e["event"] == "snapshot"]
    moving = [s for s in snaps if 0 < s[1] < report["bytes_sent"]]
    rate = report["bytes_sent"] / report["seconds"]
    result: dict[str, object] = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "limit": args.rate, "limit_bytes_per_s": limit,
        "chunk_size": args.chunk_size,
        "bytes": report["bytes_sent"], "seconds": report["seconds"], "wall": round(m.wall, 3),
        "ratio": round(rate / limit, 4)}
    if len(moving) >= 2:
        (t0, b0), (t1, b1) = moving[0], moving[-1]
        result["moving"] = round((b1 - b0) / (t1 - t0) / limit, 4)
    windows = [(b1 - b0) / (t1 - t0) / limit for i, (t0, b0) in enumerate(snaps) if t0 >= 1.0
               for t1, b1 in snaps[i + 1:] if 10.0 <= t1 - t0 < 10.6]
    if windows:
        result["max_window"], result["min_window"] = round(max(windows), 4), round(min(windows), 4)
    print(f"--bwlimit {args.rate} ({limit / 1e6:,.2f} MB/s), --chunk-size {args.chunk_size}: "
          f"{report['bytes_sent'] / 1e6:,.1f} MB in "
          f"{report['seconds']:.2f} s; " + ", ".join(f"{k} {v}" for k, v in result.items()
                                                    if k in ("ratio", "moving", "max_window", "min_window")))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
