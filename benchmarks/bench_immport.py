"""ImmPort pull over HTTPS: asyncdepo vs curl run in parallel (xargs -P) on the same files, in the same run.

The simulator runs in a process of its own (``asyncdepo sim immport``), serving a study of ``--files`` x
``--size`` pseudo-random files. How HTTPS is served (``--tls``):

* ``nginx`` (default): nginx terminates TLS in front of the simulator (:mod:`benchmarks.tlsfront`), as S3
  does for the real DRS URLs; a self-signed certificate both clients are told to trust;
* ``sim``: the simulator's own TLS (``--tls-cert``): one Python process encrypting everything is the
  bottleneck, so both clients measure about the same;
* ``off``: plain HTTP straight to the simulator.

Each round runs, one after the other:

* ``asyncdepo pull immport --study SDY1 OUT --via https --transfers P`` (a subprocess): login, manifest,
  one DRS lookup per file, ranged GETs, md5 of every file checked against the manifest, temp name + rename;
* ``xargs -P P -L 1 curl -sS --fail -o OUT URL`` over the signed URLs fetched beforehand (curl does no
  lookups and no hashing: the comparison favours curl).

Both write into a fresh directory on the same disk. Each client is reaped with ``os.wait4`` so its CPU
time includes its own children only (xargs: every curl it ran); peak RSS is the largest one process
reached, measured by GNU time when installed. MB = 10^6 bytes. Figures drift between runs on shared machines, so only the ratio
within one run means much. Results go to ``benchmarks/results/immport.json``.

The headline is the median of the per-round ratios (each round runs both clients back to back, so a
change of load between rounds moves both); the best MB/s of each client is kept too.

Usage: ``python benchmarks/bench_immport.py [--files 300] [--size 4M] [--transfers 8] [--rounds 5]
[--tls nginx|sim|off]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from asyncdepo.config import parse_size

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_immport.py): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.measure import asyncdepo_cmd, run_measured, start_sim, stop_sim
from benchmarks.tlsfront import TLSFront, self_signed

HERE = Path(__file__).resolve().parent
USER, PASSWORD = "bench", "bench-password"


def signed_urls(url: str, study: str, cert: Path | None) -> list[tuple[str, str]]:
    """(rel, signed url) of every file in the study, fetched outside the timed part (curl's favour)."""
    ctx = ssl.create_default_context(cafile=str(cert)) if cert else None

    def call(path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        req = urllib.request.Request(url + path, data=data, headers=headers or {})
        with urllib.request.urlopen(req, context=ctx) as r:
            return json.loads(r.read())

    token = call("/auth/token", f"username={USER}&password={PASSWORD}".encode(),
                 {"Content-Type": "application/x-www-form-urlencoded"})["token"]
    hdr = {"Authorization": f"bearer {token}"}
    rows = call(f"/data/query/api/study/manifest/{study}", headers=hdr)
    return [(r["path"].lstrip("/"), call(f"/data/query/drs/download/s3/{r['fileUUID']}", headers=hdr)["url"])
            for r in rows]


def timed(cmd: list[str], *, env: dict[str, str] | None = None, stdin: str | None = None) -> dict[str, float]:
    """Run ``cmd``; wall seconds, CPU seconds (user+sys, children included) and peak RSS in MB.

    Peak RSS is the largest one process reached, from GNU time (``%M``) when it is installed: a child
    forked from this (large) Python process starts with our RSS as its high-water mark, so ``wait4``'s own
    ``ru_maxrss`` would report at least our size (:func:`benchmarks.measure.run_measured`, ``gnu_time``).
    """
    m = run_measured(cmd, env=env, stdin=stdin, gnu_time=True)
    if m.rc != 0:
        raise SystemExit(m.failure(cmd))
    return {"seconds": m.wall, "cpu_s": m.cpu, "peak_rss_mb": m.max_rss / 2**20}


def server_cpu(pids: list[int]) -> float:
    """User + system seconds used so far by the server's processes and their children (nginx workers)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in (proc, *proc.children(recursive=True)):
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def check(out: Path, expect: dict[str, int]) -> None:
    for rel, size in expect.items():
        got = (out / rel).stat().st_size
        if got != size:
            raise SystemExit(f"{out / rel}: {got} bytes, expected {size}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--size", default="4M")
    ap.add_argument("--transfers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tls", choices=("nginx", "sim", "off"), default="nginx",
                    help="who serves HTTPS: nginx in front of the simulator (default), the simulator, or nobody")
    ap.add_argument("--workdir", type=Path, default=None, help="where data and downloads go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "immport.json")
    args = ap.parse_args(argv)
    if shutil.which("curl") is None or shutil.which("xargs") is None:
        raise SystemExit("curl and xargs are needed")
    from asyncdepo.sim.immport_store import write_study

    size = parse_size(args.size)
    total = args.files * size
    work = Path(tempfile.mkdtemp(prefix="bench-immport-", dir=args.workdir))
    sim = front = None
    try:
        store = work / "store"
        write_study(store, "SDY1", args.files, size, per_dir=100)
        expect = {p.relative_to(store).as_posix(): size for p in (store / "SDY1").rglob("*.bin")}
        sim_args = ["--user", f"{USER}:{PASSWORD}", "--token-lifetime", "3600"]
        cert: Path | None = None
        if args.tls == "sim":
            cert, key = self_signed(work)
            sim_args += ["--tls-cert", str(cert), "--tls-key", str(key)]
        sim, url = start_sim("immport", store, *sim_args)
        if args.tls == "nginx":
            front = TLSFront(url).start()
            url, cert = front.url, front.cert
        urls = signed_urls(url, "SDY1", cert)
        assert all(u.startswith(url) for _, u in urls), urls[0]
        env = {**os.environ, "ASYNCDEPO_IMMPORT_PASSWORD": PASSWORD}
        curl_tls: list[str] = []
        if cert is not None:
            env["SSL_CERT_FILE"] = str(cert)  # how a user trusts a private CA (Python's and OpenSSL's variable)
            curl_tls = ["--cacert", str(cert)]
        servers = [sim.pid] + ([front.master_pid()] if front is not None else [])
        rounds: list[dict[str, Any]] = []
        for n in range(args.rounds):
            ours_out, curl_out = work / f"ours{n}", work / f"curl{n}"
            before = server_cpu(servers)
            ours = timed([*asyncdepo_cmd(), "pull", "immport", "--study", "SDY1", str(ours_out),
                          "--server", url, "--user", USER, "--via", "https",
                          "--transfers", str(args.transfers)], env=env)
            ours["server_cpu_s"] = server_cpu(servers) - before
            check(ours_out, expect)
            lines = []
            for rel, u in urls:
                (curl_out / rel).parent.mkdir(parents=True, exist_ok=True)
                lines.append(f"{curl_out / rel} {u}\n")
            curl = timed(["xargs", "-P", str(args.transfers), "-L", "1", "curl", "-sS", "--fail", *curl_tls, "-o"],
                         stdin="".join(lines))
            curl["server_cpu_s"] = server_cpu(servers) - before - ours["server_cpu_s"]
            check(curl_out, expect)
            for r in (ours, curl):
                r["mb_s"] = total / 1e6 / r["seconds"]
            rounds.append({"asyncdepo": ours, "curl": curl, "ratio": ours["mb_s"] / curl["mb_s"]})
            print(f"round {n + 1}: asyncdepo {ours['mb_s']:.0f} MB/s ({ours['cpu_s']:.1f} CPU s, "
                  f"{ours['peak_rss_mb']:.0f} MB) | curl -P{args.transfers} {curl['mb_s']:.0f} MB/s "
                  f"({curl['cpu_s']:.1f} CPU s, {curl['peak_rss_mb']:.0f} MB) | server CPU s "
                  f"{ours['server_cpu_s']:.1f} / {curl['server_cpu_s']:.1f} | ratio {rounds[-1]['ratio']:.2f}",
                  flush=True)
            shutil.rmtree(ours_out)
            shutil.rmtree(curl_out)
        best = {k: max(r[k]["mb_s"] for r in rounds) for k in ("asyncdepo", "curl")}
        result = {
            "benchmark": {"nginx": "immport pull over HTTPS (nginx TLS front) from the simulator",
                          "sim": "immport pull over HTTPS served by the simulator itself",
                          "off": "immport pull over plain HTTP from the simulator"}[args.tls],
            "tls": args.tls,
            "files": args.files, "file_size": size, "bytes": total, "transfers": args.transfers,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "rounds": rounds,
            "best_mb_s": best,
            "ratio_best": best["asyncdepo"] / best["curl"],
            "ratio_median": statistics.median(r["ratio"] for r in rounds),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"ratio asyncdepo/curl: median of rounds {result['ratio_median']:.2f} (best MB/s: asyncdepo "
              f"{best['asyncdepo']:.0f}, curl {best['curl']:.0f}, ratio {result['ratio_best']:.2f}) -> {args.out}")
        return 0
    finally:
        if front is not None:
            front.stop()
        if sim is not None:
            stop_sim(sim)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
