"""Tuning sweep: ``python -m benchmarks.sweep TARGET --transfers 1,2,4,8,16,32 --chunk-size 8M,16M,64M
[--compress none,zstd:3] [--dataset DIR|small|large|mixed] [--runs N]``.

Each point of the grid is one ``asyncdepo push DATASET TARGET`` with those settings, run as a child
process through the real CLI and engine (fresh journal, fresh remote prefix, so nothing is skipped), and
measured: the run's own seconds (from its JSON report: without the interpreter's start-up), the process's
wall time, CPU seconds (rusage of the child) and peak RSS (process-tree polling). Prints a table of MB/s
(dataset bytes / run seconds, 10^6 bytes), writes ``sweep-<time>.json`` /
``sweep-latest.json`` and a PNG (heat map of MB/s over transfers x chunk size, and the curves) under
``benchmarks/results/``, and prints the best setting with the command line that uses it.

Targets: any URL ``asyncdepo push`` takes. For ``s3://`` and ``file://`` targets every point writes under
its own sub-prefix (``.../sweep-<time>-t8-c16M``), deleted afterwards unless ``--keep``; other targets
(tus, archives) get the URL unchanged. Credentials come from the environment as for ``asyncdepo push``.
A sweep uploads (grid size x runs x dataset size) bytes: mind real, billed targets.

Run from a source checkout: ``python -m benchmarks.sweep ...`` (or ``make sweep ARGS='...'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 1 << 20


def _peers() -> ModuleType:
    """benchmarks/peers.py (datasets, process measurement), loaded by path: benchmarks is no package."""
    name = "asyncdepo_bench_peers"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_sizes(text: str) -> list[int]:
    """``8M,16M,64M`` -> bytes (binary units, as ``--chunk-size``)."""
    from asyncdepo.config import parse_size

    return [parse_size(t) for t in text.split(",") if t.strip()]


def size_label(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", MiB), ("K", 1024)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def ensure_dataset(spec: str, data_dir: Path) -> Path:
    """A directory to push: an existing DIR, or a generated one (``small``, ``large``, ``mixed``).

    ``mixed`` = 64 x 1 MiB + 2 x 128 MiB detector-like files: small files show the per-request cost,
    large ones the part size.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    peers = _peers()
    if spec in peers.DATASETS:
        return Path(peers.ensure_dataset(data_dir, spec))
    if spec != "mixed":
        raise SystemExit(f"--dataset {spec!r}: not a directory nor one of small, large, mixed")
    root = data_dir / "mixed"
    done = root / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"generating dataset mixed under {root}", flush=True)
        for i in range(64):
            (root / f"frame_{i:03d}.raw").write_bytes(peers.detector_bytes(50_000 + i, MiB))
        for i in range(2):
            with open(root / f"stack_{i}.raw", "wb") as fh:
                fh.writelines(peers.detector_bytes(60_000 + 8 * i + j, 16 * MiB) for j in range(8))
        done.write_text("ok\n")
    return root


def point_target(target: str, tag: str) -> tuple[str, str | None]:
    """(URL for this point, sub-prefix to clean up) — s3:// and file:// targets get a fresh sub-prefix."""
    scheme = urlsplit(target).scheme
    if scheme in ("s3", "file"):
        return f"{target.rstrip('/')}/{tag}", tag
    return target, None


def cleanup(url: str, args: argparse.Namespace) -> None:
    """Delete what one point wrote (file:// directory, or the objects under an s3:// prefix)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        shutil.rmtree(parts.path, ignore_errors=True)
        return
    if parts.scheme != "s3":
        return
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        print("  (boto3 missing: objects of this point were not deleted)")
        return
    session = boto3.session.Session(profile_name=args.profile) if args.profile else boto3.session.Session()
    client = session.client(
        "s3",
        endpoint_url=args.endpoint_url,
        region_name=args.region,
        config=Config(s3={"addressing_style": "path"} if args.endpoint_url else {}),
    )
    bucket, prefix = parts.netloc, parts.path.strip("/") + "/"
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    except Exception as exc:  # noqa: BLE001 - the sink keeps no objects; a target may refuse deletes
        print(f"  (cleanup of {url} skipped: {type(exc).__name__})")


def push_command(
    dataset: Path,
    url: str,
    transfers: int,
    chunk: int,
    compress: str | None,
    journal: Path,
    args: argparse.Namespace,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "asyncdepo.cli",
        "push",
        str(dataset),
        url,
        "--transfers",
        str(transfers),
        "--chunk-size",
        size_label(chunk),
        "--journal",
        str(journal),
        "--json",
    ]
    if compress:
        cmd += ["--compress", compress]
    for flag in ("endpoint_url", "region", "profile"):
        value = getattr(args, flag)
        if value:
            cmd += [f"--{flag.replace('_', '-')}", value]
    return cmd


def user_command(target: str, point: dict[str, Any], args: argparse.Namespace) -> str:
    """The command line a user runs to push with the best setting found."""
    cmd = [
        "asyncdepo",
        "push",
        "SOURCE",
        target,
        "--transfers",
        str(point["transfers"]),
        "--chunk-size",
        size_label(point["chunk_size"]),
    ]
    if point["compress"]:
        cmd += ["--compress", point["compress"]]
    for flag in ("endpoint_url", "region", "profile"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    return " ".join(cmd)


def run_point(
    dataset: Path,
    total: int,
    transfers: int,
    chunk: int,
    compress: str | None,
    args: argparse.Namespace,
    stamp: str,
) -> dict[str, Any]:
    measure = _peers().measure
    runs = []
    for r in range(args.runs):
        tag = (
            f"sweep-{stamp}-t{transfers}-c{size_label(chunk)}"
            + (f"-{compress.replace(':', '')}" if compress else "")
            + f"-r{r}"
        )
        url, sub = point_target(args.target, tag)
        with tempfile.TemporaryDirectory() as scratch:
            m = measure(
                push_command(dataset, url, transfers, chunk, compress, Path(scratch) / "j.db", args),
                dict(os.environ),
            )
        report: dict[str, Any] = {}
        for line in reversed(m["output"].splitlines()):
            if '"job_finished"' in line:
                try:
                    report = json.loads(line).get("report", {})
                except ValueError:
                    pass
                break
        ok = m["rc"] == 0 and bool(report.get("ok"))
        # the engine's own time (no interpreter start-up, ~0.7 s here, which would flatten the grid)
        seconds = float(report.get("seconds") or m["wall"])
        runs.append({"wall": m["wall"], "seconds": seconds, "cpu": m["cpu"], "rss": m["rss"], "ok": ok,
                     "bytes_sent": report.get("bytes_sent"),
                     "error": None if ok else (report.get("failures") or m["output"][-400:])})
        if sub is not None and not args.keep:
            cleanup(url, args)
    good = [x for x in runs if x["ok"]]
    point: dict[str, Any] = {"transfers": transfers, "chunk_size": chunk, "compress": compress, "runs": runs,
                             "ok": bool(good)}
    if good:
        seconds = statistics.median(x["seconds"] for x in good)
        point.update(seconds=round(seconds, 3), wall_s=round(statistics.median(x["wall"] for x in good), 3),
                     mb_s=round(total / seconds / 1e6, 1),
                     cpu_s=round(statistics.median(x["cpu"] for x in good), 2),
                     peak_rss_mb=round(max(x["rss"] for x in good) / 1e6, 1))
    return point


def print_table(points: list[dict[str, Any]], chunks: list[int]) -> None:
    for compress in dict.fromkeys(p["compress"] for p in points):
        print(f"\nMB/s  (compress: {compress or 'none'}; rows: --transfers, columns: --chunk-size)")
        print("transfers " + "".join(f"{size_label(c):>10}" for c in chunks))
        for t in dict.fromkeys(p["transfers"] for p in points):
            cells = []
            for c in chunks:
                p = next(
                    (
                        q
                        for q in points
                        if q["transfers"] == t and q["chunk_size"] == c and q["compress"] == compress
                    ),
                    None,
                )
                cells.append(f"{p['mb_s']:10.1f}" if p and p["ok"] else f"{'failed':>10}")
            print(f"{t:>9} " + "".join(cells))


def plot(
    points: list[dict[str, Any]], transfers: list[int], chunks: list[int], path: Path, title: str
) -> None:
    """Per compress setting: a heat map of MB/s (transfers x chunk size) and MB/s against transfers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(p["compress"] for p in points))
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4.2 * len(settings)), squeeze=False)
    for row, compress in enumerate(settings):
        grid = [
            [
                next(
                    (
                        p.get("mb_s", 0.0)
                        for p in points
                        if p["transfers"] == t and p["chunk_size"] == c and p["compress"] == compress
                    ),
                    0.0,
                )
                for c in chunks
            ]
            for t in transfers
        ]
        ax = axes[row][0]
        image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(chunks)), [size_label(c) for c in chunks])
        ax.set_yticks(range(len(transfers)), [str(t) for t in transfers])
        ax.set_xlabel("--chunk-size")
        ax.set_ylabel("--transfers")
        ax.set_title(f"MB/s, compress={compress or 'none'}", fontsize=10)
        values = [v for r in grid for v in r]
        low, high = min(values, default=0.0), max(values, default=0.0)
        for i, r in enumerate(grid):
            for j, v in enumerate(r):
                bright = high > low and (v - low) / (high - low) > 0.6  # viridis is light at the top
                ax.text(
                    j,
                    i,
                    f"{v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if bright else "white",
                )
        fig.colorbar(image, ax=ax)
        ax = axes[row][1]
        for j, c in enumerate(chunks):
            ax.plot(transfers, [grid[i][j] for i in range(len(transfers))], marker="o", label=size_label(c))
        ax.set_xscale("log", base=2)
        ax.set_xticks(transfers, [str(t) for t in transfers])
        ax.set_xlabel("--transfers")
        ax.set_ylabel("MB/s")
        ax.legend(title="--chunk-size", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sweep",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="target URL, as for asyncdepo push (s3://, file://, tus+http://)")
    p.add_argument("--transfers", default="1,2,4,8,16,32", help="comma-separated --transfers values")
    p.add_argument("--chunk-size", default="8M,16M,64M", help="comma-separated --chunk-size values")
    p.add_argument("--compress", default="none", help="comma-separated: none, zstd, zstd:LEVEL")
    p.add_argument(
        "--dataset", default="mixed", help="directory to push, or small | large | mixed (generated)"
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("ASYNCDEPO_BENCH_DATA", "/tmp/asyncdepo-bench-data"),
        help="where generated datasets live",
    )
    p.add_argument("--runs", type=int, default=1, help="runs per point (median)")
    p.add_argument("--endpoint-url", help="S3 endpoint")
    p.add_argument("--region")
    p.add_argument("--profile")
    p.add_argument("--keep", action="store_true", help="do not delete what each point wrote")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for JSON and PNG")
    return p


def sweep_main(argv: list[str]) -> int:
    """``python -m benchmarks.sweep ...``; returns 0 when every point succeeded, 1 otherwise, 2 on bad usage."""
    args = _parser().parse_args(argv)
    try:
        transfers = [int(t) for t in args.transfers.split(",") if t.strip()]
        chunks = parse_sizes(args.chunk_size)
    except Exception as exc:  # noqa: BLE001 - any bad value is a usage error
        print(f"benchmarks.sweep: {exc}", file=sys.stderr)
        return 2
    compress = [None if c.strip() in ("", "none", "off") else c.strip() for c in args.compress.split(",")]
    if not transfers or not chunks or min(transfers) < 1:
        print(
            "benchmarks.sweep: give at least one --transfers (>= 1) and one --chunk-size",
            file=sys.stderr,
        )
        return 2
    dataset = ensure_dataset(args.dataset, Path(args.data_dir))
    files = [p for p in dataset.rglob("*") if p.is_file() and not p.name.startswith(".")]
    total = sum(p.stat().st_size for p in files)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(
        f"sweep: {len(files)} files, {total / 1e6:,.1f} MB -> {args.target}; "
        f"{len(transfers) * len(chunks) * len(compress)} points x {args.runs} run(s)",
        flush=True,
    )
    points = []
    for z in compress:
        for t in transfers:
            for c in chunks:
                point = run_point(dataset, total, t, c, z, args, stamp)
                points.append(point)
                shown = (
                    f"{point['mb_s']:8.1f} MB/s  cpu {point['cpu_s']:6.2f} s  "
                    f"rss {point['peak_rss_mb']:6.1f} MB"
                    if point["ok"]
                    else f"FAILED: {str(point['runs'][-1]['error'])[:200]}"
                )
                print(
                    f"  transfers {t:>3}  chunk {size_label(c):>5}  compress {z or 'none':8} {shown}",
                    flush=True,
                )
    print_table(points, chunks)
    args.out.mkdir(parents=True, exist_ok=True)
    ok = [p for p in points if p["ok"]]
    best = max(ok, key=lambda p: p["mb_s"]) if ok else None
    report = {
        "target": args.target,
        "dataset": dataset.name,  # a name, not a path: results are committed
        "files": len(files),
        "bytes": total,
        "time": stamp,
        "cores": os.cpu_count(),
        "points": points,
        "best": best and {k: best[k] for k in ("transfers", "chunk_size", "compress", "mb_s")},
    }
    for name in (f"sweep-{stamp}.json", "sweep-latest.json"):
        (args.out / name).write_text(json.dumps(report, indent=1))
    png = args.out / "sweep-latest.png"
    plot(
        points,
        transfers,
        chunks,
        png,
        f"asyncdepo push -> {args.target} ({len(files)} files, {total / 1e6:,.0f} MB)",
    )
    shutil.copy(png, args.out / f"sweep-{stamp}.png")
    print(f"\nwrote {args.out / f'sweep-{stamp}.json'} and {png}")
    if best is None:
        print("no point succeeded")
        return 1
    print(
        f"best: --transfers {best['transfers']} --chunk-size {size_label(best['chunk_size'])}"
        + (f" --compress {best['compress']}" if best["compress"] else "")
        + f"  ({best['mb_s']} MB/s)"
    )
    print(f"use:  {user_command(args.target, best, args)}")
    return 0 if len(ok) == len(points) else 1


if __name__ == "__main__":
    sys.exit(sweep_main(sys.argv[1:]))
