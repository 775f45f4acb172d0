"""The targets of the fault suite, each as a user meets it: a server (simulator, moto or ``rclone serve s3``
behind the fault proxy), the command line that pushes to it or pulls from it, and views of what it holds.

Every target answers the same questions, so one test runs over all of them:

* ``argv()`` / ``env()`` — the ``asyncdepo`` command and its environment (secrets only in the environment);
* ``expected()`` — the tree the run must produce (``rel -> bytes``); ``stored()`` — what the target holds now;
* ``leftovers()`` — half-done things on the target (part files, multipart and tus uploads, locks, extra
  submissions), by the ``rel`` they belong to; ``journaled()`` — the ``rel`` s the journal keeps for resume;
* ``arm(n)`` — stop the transfer once ``n`` bytes went through the server (its byte counter and pause point;
  for the local target the child kills itself at the ``n``-th byte it writes): returns the event set when the
  point is reached; ``disarm()`` lets the server go on;
* ``faults`` — the injector of the server (or of the proxy in front of it) for wire faults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import anyio

from asyncdepo.sim import empiar as empiar_sim
from asyncdepo.sim import globus as globus_sim
from asyncdepo.sim import gypsum as gypsum_sim
from asyncdepo.sim import pdis as pdis_sim
from asyncdepo.sim import tus as tus_sim
from asyncdepo.sim.datasets import sample_deposition
from asyncdepo.sim.faults import FaultInjector
from asyncdepo.sim.immport import IMMPORT_KEY
from asyncdepo.sim.immport import build_app as immport_app
from asyncdepo.sim.proxy import FaultProxy
from asyncdepo.sim.server import ThreadedSim
from asyncdepo.transport.partfiles import SUFFIX as PART_SUFFIX
from asyncdepo.transport.partfiles import part_path
from tests import requires
from tests.adapters.s3_servers import REGION, S3TestServer
from tests.chaos.servers import LoopThread, Notified

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SIM_ASCP = requires.program("asyncdepo-sim-ascp", path_too=False)  # the stand-in ascp of this package
MiB = 1 << 20
PARTS = (".asyncdepo-part", ".aspx")


def tree(root: Path, *, skip: tuple[str, ...] = PARTS) -> dict[str, bytes]:
    """``rel -> bytes`` of every regular file under ``root`` (names ending in ``skip`` left out)."""
    if not root.is_dir():
        return {}
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink() and not name.endswith(skip):
                out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def dataset(seed: int, sizes: tuple[int, ...]) -> dict[str, bytes]:
    """Deterministic files of the given sizes in two folders (incompressible: a zstd stream is as long)."""
    rng = random.Random(seed)
    return {f"{'ab'[i % 2]}/f{i:02d}.bin": rng.randbytes(size) for i, size in enumerate(sizes)}


class Target:
    """A target of the fault suite; see the module docstring. Use as a context manager."""

    name = "?"
    direction = "push"
    #: what one byte counter of ``arm`` counts, at most: kill offsets are drawn below it
    sizes: tuple[int, ...] = (0, 1, 1000, 300_000, 2 * MiB + 4321, 3 * MiB + 17)
    chunk = "1M"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.src = tmp / "src"
        self.journal = tmp / "journal.sqlite"
        self.faults: FaultInjector = FaultInjector()
        self.files: dict[str, bytes] = {}
        self._armed: threading.Event | None = None

    # -- life ----------------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    # -- the data --------------------------------------------------------------------------------------------
    def make_source(self, files: dict[str, bytes]) -> None:
        """The source becomes exactly ``files`` (what was there before is removed)."""
        self.files = dict(files)
        shutil.rmtree(self.src, ignore_errors=True)
        write_tree(self.src, files)

    def source_root(self) -> Path:
        return self.src

    def expected(self) -> dict[str, bytes]:
        return tree(self.source_root())

    def kill_range(self) -> int:
        """Kill offsets are drawn in ``[1, kill_range())``: bytes the server sees for sure in one run."""
        return sum(len(v) for v in self.files.values())

    # -- the command -----------------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCDEPO_", "ASPERA_", "AWS_",
                                                                         "EMPIAR_", "GLOBUS_"))}
        base.update(XDG_STATE_HOME=str(self.tmp / "state"), XDG_CONFIG_HOME=str(self.tmp / "config"),
                    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        return base

    # -- what the target holds ------------------------------------------------------------------------------
    def stored(self) -> dict[str, bytes]:
        raise NotImplementedError

    def leftovers(self) -> set[str]:
        return set()

    def journaled(self) -> set[str]:
        """Items the journal keeps for resume (not done, with remote state or a confirmed offset)."""
        if not self.journal.exists():
            return set()
        db = sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT rel, state, remote, offset FROM items").fetchall()
        finally:
            db.close()
        return {rel for rel, state, remote, offset in rows
                if state != "done" and ((remote and remote != "null") or offset)}

    def journal_rels(self) -> list[str]:
        """Every item's name in the journal (a name that is not UTF-8 is stored as its bytes)."""
        if not self.journal.exists():
            return []
        db = sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT rel FROM items").fetchall()
        finally:
            db.close()
        return [os.fsdecode(rel) if isinstance(rel, bytes) else rel for rel, in rows]

    def also(self) -> tuple[str, ...]:
        """Names a failure may give instead of a file's: what the target sends as one item (an archive of the
        whole source, an image set)."""
        return ()

    def call(self, fn: Any) -> None:
        """Run ``fn`` in the loop of the server that owns ``faults`` (their events belong to that loop)."""
        fn()

    # -- kill points ---------------------------------------------------------------------------------------
    def arm(self, n: int) -> tuple[threading.Event, dict[str, str]]:
        """Stop the transfer at byte ``n``; returns the event set when reached and env for the child. By
        default the pause point of ``faults`` (the server's, or the proxy's in front of it)."""
        reached = threading.Event()
        self.faults.on_pause[:] = [lambda _: reached.set()]
        self.call(lambda: self.faults.pause_at(n))
        return reached, {}

    def disarm(self) -> None:
        self.call(lambda: self.faults.pause_at(None))


# -- local ---------------------------------------------------------------------------------------------------
class LocalTarget(Target):
    name = "local"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.dst = tmp / "dst"

    def argv(self) -> list[str]:
        return ["push", str(self.src), f"file://{self.dst}", "--journal", str(self.journal), "--chunk-size",
                self.chunk, "-q"]

    def stored(self) -> dict[str, bytes]:
        return tree(self.dst)

    def leftovers(self) -> set[str]:
        """The items whose part file is on the target. A part's name is derived from its file's (a long name's
        part is hashed), so parts are matched against every name the source or the journal knows; a part
        nobody's name leads to stays a leftover under its own name."""
        if not self.dst.is_dir():
            return set()
        parts = set(self.dst.rglob(f"*{PART_SUFFIX}"))
        if not parts:
            return set()
        rels = set(tree(self.src)) | set(self.journal_rels())
        owner = {part_path(self.dst / rel): rel for rel in rels}
        return {owner.get(p) or p.relative_to(self.dst).as_posix().removesuffix(PART_SUFFIX) for p in parts}

    notified: Notified | None = None
    held: Any = None

    def arm(self, n: int) -> tuple[threading.Event, dict[str, str]]:
        return threading.Event(), {"ASYNCDEPO_CHAOS_KILL_AFTER": str(n)}  # the child kills itself

    def hold(self, n: int) -> tuple[threading.Event, dict[str, str]]:
        """Hold the run's writes at byte ``n`` (``release()`` lets them go): the child waits, alive."""
        reached = threading.Event()
        listener = self.notified = Notified()

        def wait() -> None:
            try:
                self.held = listener.accept(600)
                reached.set()
            except OSError:
                pass  # closed by release(): the run ended first

        threading.Thread(target=wait, daemon=True).start()
        return reached, {"ASYNCDEPO_CHAOS_PAUSE_AFTER": str(n), "ASYNCDEPO_CHAOS_NOTIFY": listener.address}

    def release(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None
        if self.notified is not None:
            self.notified.close()
            self.notified = None


# -- servers in a thread of this process ------------------------------------------------------------------
class _Threaded(Target):
    """A simulator in its own thread; ``arm`` uses the injector's pause point."""

    sim: ThreadedSim

    def _factory(self) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.sim = ThreadedSim(self._factory).__enter__()
        assert self.sim.server is not None
        self.faults = self.sim.server.faults
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()
        self.sim.call(self.faults.release_stalls)
        self.sim.__exit__(*exc)

    def call(self, fn: Any) -> None:
        self.sim.call(fn)



class TusTarget(_Threaded):
    name = "tus"

    def _factory(self) -> Any:
        return tus_sim.build_app(self.tmp / "tus", FaultInjector(), None)

    def argv(self) -> list[str]:
        return ["push", str(self.src), f"tus+{self.sim.url}/files/", "--journal", str(self.journal),
                "--chunk-size", self.chunk, "-q"]

    def stored(self) -> dict[str, bytes]:
        return tree(self.tmp / "tus" / "complete")

    def leftovers(self) -> set[str]:
        out = set()
        for meta in (self.tmp / "tus" / "uploads").glob("*.json"):
            up = json.loads(meta.read_bytes())
            if not up["terminated"] and up["length"] is not None and up["offset"] < up["length"]:
                out.add(up["metadata"].get("relpath") or up["metadata"].get("filename") or up["id"])
        return out


class PdisTarget(_Threaded):
    name = "pdis"
    user = "alice@lab.edu"

    def _factory(self) -> Any:
        args = argparse.Namespace(status_delay=0, user=[f"{self.user}:alicepw"])
        return pdis_sim.build_app(self.tmp / "pdis", FaultInjector(), args)

    @property
    def state(self) -> Any:
        assert self.sim.server is not None
        return self.sim.server.app[pdis_sim.PDIS_STATE]

    def also(self) -> tuple[str, ...]:
        return (f"{self.src.name}.tar",)  # one archive of the whole source

    def argv(self) -> list[str]:
        return ["push", "pdis", str(self.src), "--pdb", "1ABC", "--journal", str(self.journal), "-q"]

    def env(self) -> dict[str, str]:
        return {**super().env(), "ASYNCDEPO_PDIS_SERVER": self.sim.url,
                "ASYNCDEPO_PDIS_TOKEN": self.state.token_for(self.user)}

    def _mine(self) -> list[Any]:
        return [s for s in list(self.state.submissions.values()) if s.original_filename.startswith(self.src.name)]

    def stored(self) -> dict[str, bytes]:
        subs = self._mine()
        if not subs:
            return {}
        with tarfile.open(self.state.archive_path(subs[-1])) as tf:
            prefix = self.src.name + "/"
            return {m.name.removeprefix(prefix): tf.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tf.getmembers() if m.isfile()}

    def leftovers(self) -> set[str]:
        extra = {f"(submission {s.token})" for s in self._mine()[1:]}
        return extra | {p.name for p in (self.tmp / "pdis" / "incoming").glob("*")}

    def kill_range(self) -> int:
        return int(super().kill_range() * 0.9)  # the tar.zst of incompressible data is a little longer


GYPSUM_OWNER, GYPSUM_ADMIN = "tok-owner", "tok-admin"


class GypsumTarget(_Threaded):
    name = "gypsum"

    def _factory(self) -> Any:
        return gypsum_sim.create_app(self.tmp / "gypsum", FaultInjector(),
                                     identities={GYPSUM_OWNER: "olivia", GYPSUM_ADMIN: "root"}, admins=["root"])

    def __enter__(self) -> Self:
        super().__enter__()
        from asyncdepo.adapters.gypsum.api import GypsumClient

        async def create() -> None:
            async with GypsumClient(self.sim.url, GYPSUM_ADMIN) as client:
                await client.create_project("proj", ["olivia"], [])

        anyio.run(create)
        return self

    @property
    def bucket(self) -> Path:
        assert self.sim.server is not None
        return self.sim.server.app[gypsum_sim.STATE_KEY].bucket.root

    def also(self) -> tuple[str, ...]:
        return ("proj/asset/v1",)  # a version is made visible whole, or not at all

    def argv(self) -> list[str]:
        return ["push", "gypsum", str(self.src), "proj/asset/v1", "--journal", str(self.journal), "-q"]

    def env(self) -> dict[str, str]:
        return {**super().env(), "ASYNCDEPO_GYPSUM_URL": self.sim.url, "ASYNCDEPO_GYPSUM_TOKEN": GYPSUM_OWNER}

    def stored(self) -> dict[str, bytes]:
        return {rel: data for rel, data in tree(self.bucket / "proj/asset/v1").items()
                if not rel.split("/")[-1].startswith("..")}

    def leftovers(self) -> set[str]:
        return {"(project lock)"} if (self.bucket / "proj" / "..LOCK").exists() else set()


# -- S3 behind the fault proxy ------------------------------------------------------------------------------
class S3Target(Target):
    chunk = "5M"
    sizes = (0, 1, 1000, 300_000, 5 * MiB + 4321, 11 * MiB + 17)

    def __init__(self, tmp: Path, server: S3TestServer) -> None:
        super().__init__(tmp)
        self.server = server
        self.name = f"s3-{server.name}"
        self.loop = LoopThread()
        host, _, port = server.endpoint_url.removeprefix("http://").rpartition(":")
        self.proxy = FaultProxy((host, int(port)))
        self.faults = self.proxy.faults
        self.bucket = ""

    def __enter__(self) -> Self:
        self.loop.run(self.proxy.start())
        self.bucket = self.server.new_bucket()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.run(self.proxy.stop())
        self.loop.close()

    def argv(self) -> list[str]:
        return ["push", str(self.src), f"s3://{self.bucket}/run", "--endpoint-url", self.proxy.url, "--region",
                REGION, "--journal", str(self.journal), "--chunk-size", self.chunk, "-q"]

    def env(self) -> dict[str, str]:
        return {**super().env(), "AWS_ACCESS_KEY_ID": self.server.access_key,
                "AWS_SECRET_ACCESS_KEY": self.server.secret_key, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def stored(self) -> dict[str, bytes]:
        client = self.server.client()
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="run/"):
            for obj in page.get("Contents", []):
                out[obj["Key"].removeprefix("run/")] = client.get_object(Bucket=self.bucket,
                                                                          Key=obj["Key"])["Body"].read()
        return out

    def leftovers(self) -> set[str]:
        uploads = self.server.client().list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return {u["Key"].removeprefix("run/") for u in uploads}

    def call(self, fn: Any) -> None:
        self.loop.call(fn)



# -- ascp: the stand-in stalls at a byte count and tells a listener ------------------------------------------
class _AscpArm:
    """Kill points for ascp: the stand-in stalls after ``n`` bytes of a session and writes ``stalled PID BYTES``
    into a FIFO this side reads (``ASYNCDEPO_SIM_ASCP_NOTIFY``)."""

    tmp: Path
    fifo: Path | None = None

    def _ascp_arm(self, n: int) -> tuple[threading.Event, dict[str, str]]:
        reached = threading.Event()
        fifo = self.fifo = self.tmp / f"ascp-stalled-{n}"
        os.mkfifo(fifo)

        def wait() -> None:
            with open(fifo) as said:  # blocks until the stand-in (or _ascp_disarm) opens the other end
                if said.readline().startswith("stalled "):
                    reached.set()

        threading.Thread(target=wait, daemon=True).start()
        return reached, {"ASYNCDEPO_SIM_ASCP_FAIL": f"stall:{n}:once", "ASYNCDEPO_SIM_ASCP_NOTIFY": str(fifo)}

    def _ascp_disarm(self) -> None:
        if self.fifo is not None:
            try:  # a reader still waiting for the stand-in: open the other end, so it reads an end of file
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # nobody reads it any more
            self.fifo = None


# -- EMPIAR (ascp, or Globus when ascp is refused) -----------------------------------------------------------
TRANSFER_PASS = "transfer-secret-3141"


class EmpiarTarget(Target, _AscpArm):
    """EMPIAR through the stand-in ascp, or (``via="globus"``) through Globus after ascp refuses the login."""

    def __init__(self, tmp: Path, via: str = "ascp") -> None:
        super().__init__(tmp)
        self.via = via
        self.name = f"empiar-{via}"
        self.store = tmp / "store"
        self.src = tmp / "dataset"
        self.json = tmp / "deposition.json"

    def make_source(self, files: dict[str, bytes]) -> None:
        super().make_source({k.replace("a/", "micrographs/", 1).replace("b/", "particles/", 1): v
                             for k, v in files.items()})
        (self.src / "micrographs").mkdir(parents=True, exist_ok=True)
        (self.src / "particles").mkdir(parents=True, exist_ok=True)
        name = self.src.name
        self.json.write_text(json.dumps(sample_deposition(f"data/{name}/micrographs", f"/data/{name}/particles")))

    def __enter__(self) -> Self:
        args = argparse.Namespace(token="globus-token", endpoint=[f"{globus_sim.LOCAL_ENDPOINT}=/"])
        self.empiar = ThreadedSim(lambda: empiar_sim.build_app(self.store, FaultInjector(), None)).__enter__()
        self.globus = ThreadedSim(lambda: globus_sim.build_app(self.store, FaultInjector(), args)).__enter__()
        assert self.empiar.server is not None
        self.faults = self.empiar.server.faults
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()
        self.globus.__exit__(*exc)
        self.empiar.__exit__(*exc)

    def call(self, fn: Any) -> None:
        self.empiar.call(fn)

    @property
    def state(self) -> empiar_sim.EmpiarState:
        assert self.empiar.server is not None
        return empiar_sim.state_of(self.empiar.server.app)

    @property
    def meter(self) -> globus_sim.ByteMeter:
        assert self.globus.server is not None
        return globus_sim.state_of(self.globus.server.app).meter

    def also(self) -> tuple[str, ...]:
        return tuple(f"{self.src.name}/{s}" for s in ("micrographs", "particles"))  # one item per image set

    def argv(self) -> list[str]:
        extra = ["-g", globus_sim.LOCAL_ENDPOINT, "--globus-server", self.globus.url + "/v0.10", "--globus-poll",
                 "0.02"] if self.via == "globus" else []
        return ["push", "empiar", "-a", SIM_ASCP, "--server", self.empiar.url, "--transfers", "2", "--journal",
                str(self.journal), "--rate", "2G", "-q", *extra, "-", str(self.json), str(self.src)]

    def env(self) -> dict[str, str]:
        env = {**super().env(), "ASYNCDEPO_SIM_ASCP_ROOT": str(self.store),
               "ASYNCDEPO_SIM_ASCP_PASSWORD": TRANSFER_PASS, "EMPIAR_TRANSFER_PASS": TRANSFER_PASS,
               "EMPIAR_TOKEN": "sim-token", "GLOBUS_TRANSFER_TOKEN": "globus-token"}
        if self.via == "globus":
            env["ASYNCDEPO_SIM_ASCP_FAIL"] = "auth"
        return env

    def _entries(self) -> list[empiar_sim.Entry]:
        return list(self.state.entries.values())

    def stored(self) -> dict[str, bytes]:
        entries = self._entries()
        return tree(self.state.upload_area(entries[0]) / self.src.name) if entries else {}

    def leftovers(self) -> set[str]:
        entries = self._entries()
        out = {f"(entry {e.entry_id})" for e in entries[1:]}
        if entries:
            area = self.state.upload_area(entries[0]) / self.src.name
            out |= {p.relative_to(area).as_posix().removesuffix(".aspx") for p in area.rglob("*.aspx")}
        return out

    def kill_range(self) -> int:
        # the stand-in counts the bytes of each session: the smallest image set bounds every session's count
        sets = [sum(len(v) for k, v in self.files.items() if k.startswith(p)) for p in ("micrographs/", "particles/")]
        return max(2, min(s for s in sets if s))

    def arm(self, n: int) -> tuple[threading.Event, dict[str, str]]:
        if self.via == "ascp":
            return self._ascp_arm(n)
        reached = threading.Event()
        meter = self.meter
        meter.pause_at(n)
        def wait() -> None:
            if meter.paused.wait(600):
                reached.set()

        threading.Thread(target=wait, daemon=True).start()
        return reached, {}

    def disarm(self) -> None:
        self._ascp_disarm()
        if self.via == "globus":
            self.meter.pause_at(None)


# -- ImmPort pulls ------------------------------------------------------------------------------------------
IMMPORT_PASSWORD = "pa55-w0rd-xyz"


class ImmportTarget(Target, _AscpArm):
    """A pull from the ImmPort simulator: over HTTPS (DRS + signed GETs) or through the stand-in ascp."""

    direction = "pull"

    def __init__(self, tmp: Path, via: str = "https") -> None:
        super().__init__(tmp)
        self.via = via
        self.name = f"immport-{via}"
        self.store = tmp / "store"
        self.out = tmp / "out"

    def make_source(self, files: dict[str, bytes]) -> None:
        self.files = {f"SDY1/ResultFiles/{k}": v for k, v in files.items()}
        shutil.rmtree(self.store / "SDY1", ignore_errors=True)
        write_tree(self.store, self.files)

    def source_root(self) -> Path:
        return self.store

    def expected(self) -> dict[str, bytes]:
        # what ImmPort shares: names starting with "." are hidden (the stand-in ascp keeps its fault marks there)
        return {rel: data for rel, data in tree(self.store, skip=(".sim-md5",)).items()
                if not any(part.startswith(".") for part in rel.split("/"))}

    def __enter__(self) -> Self:
        args = argparse.Namespace(user=[("alice", IMMPORT_PASSWORD)], token_lifetime=600.0, token_uses=None,
                                  url_lifetime=3600.0)
        self.sim = ThreadedSim(lambda: immport_app(self.store, FaultInjector(), args)).__enter__()
        assert self.sim.server is not None
        self.faults = self.sim.server.faults
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()
        self.sim.__exit__(*exc)

    def call(self, fn: Any) -> None:
        self.sim.call(fn)

    @property
    def host(self) -> Any:
        assert self.sim.server is not None
        return self.sim.server.app[IMMPORT_KEY]

    def argv(self) -> list[str]:
        via = ["--via", "ascp", "--ascp", SIM_ASCP, "--aspera-host", "127.0.0.1"] if self.via == "ascp" else []
        return ["pull", "immport", "--study", "SDY1", str(self.out), "--server", self.sim.url, "--user", "alice",
                "-q", *via]

    def env(self) -> dict[str, str]:
        return {**super().env(), "ASYNCDEPO_IMMPORT_PASSWORD": IMMPORT_PASSWORD,
                "ASYNCDEPO_SIM_ASCP_ROOT": str(self.store),
                "ASYNCDEPO_SIM_ASCP_TOKEN_URL": f"{self.sim.url}/_sim/aspera/check"}

    def stored(self) -> dict[str, bytes]:
        return tree(self.out)

    def leftovers(self) -> set[str]:
        if not self.out.is_dir():
            return set()
        return {p.relative_to(self.out).as_posix().removesuffix(p.suffix) for p in self.out.rglob("*")
                if p.name.endswith(PARTS)}

    def journaled(self) -> set[str]:
        # a pull resumes from its part files: they are its journal
        return self.leftovers()

    def arm(self, n: int) -> tuple[threading.Event, dict[str, str]]:
        if self.via == "ascp":
            return self._ascp_arm(n)
        host = self.host
        self.sim.call(lambda: host.hold(n))
        return host.held, {}

    def disarm(self) -> None:
        self._ascp_disarm()
        if self.via == "https":
            host = self.host
            self.sim.call(lambda: host.hold(None))


TARGETS = ("local", "tus", "s3-moto", "s3-rclone", "pdis", "gypsum", "empiar-ascp", "empiar-globus",
           "immport-https", "immport-ascp")


def make_target(name: str, tmp: Path, s3: dict[str, S3TestServer] | None = None) -> Target:
    if name == "local":
        return LocalTarget(tmp)
    if name == "tus":
        return TusTarget(tmp)
    if name.startswith("s3-"):
        assert s3 is not None
        return S3Target(tmp, s3[name.removeprefix("s3-")])
    if name == "pdis":
        return PdisTarget(tmp)
    if name == "gypsum":
        return GypsumTarget(tmp)
    if name.startswith("empiar-"):
        return EmpiarTarget(tmp, name.removeprefix("empiar-"))
    if name.startswith("immport-"):
        return ImmportTarget(tmp, name.removeprefix("immport-"))
    raise KeyError(name)


def targets() -> Iterator[str]:
    yield from TARGETS
