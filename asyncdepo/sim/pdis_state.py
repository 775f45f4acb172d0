"""State of the PDIS simulator: users and tokens, submissions, the status clock, metadata validation.

Kept apart from the HTTP handlers (``asyncdepo.sim.pdis``) so tests can drive it directly. The rules are
documented in that module's docstring; storage layout too. Everything here runs on the simulator's event
loop except :meth:`PdisState.delete` (file removal, in a thread).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from asyncdepo.sim.pdis_scan import PDB_CODE, ScanResult

EQUIPMENT: list[dict[str, Any]] = [
    {
        "id": 25,
        "short": "APS",
        "fullname": "Advanced Photon Source",
        "url": "http://www.aps.anl.gov",
        "beamlines": [
            {"id": 42, "short": "24-ID-C", "fullname": None, "url": None},
            {"id": 43, "short": "23-ID-B", "fullname": None, "url": None},
        ],
    },
    {
        "id": 12,
        "short": "ALS",
        "fullname": "Advanced Light Source",
        "url": "https://als.lbl.gov",
        "beamlines": [{"id": 17, "short": "5.0.2", "fullname": "Berkeley Center for Structural Biology", "url": None}],
    },
    {
        "id": 31,
        "short": "DLS",
        "fullname": "Diamond Light Source",
        "url": "https://www.diamond.ac.uk",
        "beamlines": [
            {"id": 60, "short": "I03", "fullname": None, "url": None},
            {"id": 61, "short": "I04", "fullname": None, "url": None},
        ],
    },
]

PATH_OK = ("submitted", "pending", "validated", "published")
DELETABLE = ("uploaded", "validated", "error_no_data")
TERMINAL = ("published", "error_no_data", "inconsistent_datasets", "header_not_readable")


def parse_user(spec: str) -> tuple[str, str]:
    """``EMAIL:PASSWORD`` -> (email, password); raises ValueError when malformed."""
    email, sep, password = spec.partition(":")
    if not sep or "@" not in email or not password:
        raise ValueError(f"--user expects EMAIL:PASSWORD, got {email or spec[:20]!r}...")
    return email, password


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class Submission:
    """One upload and its metadata; ``phase`` is ``uploaded`` or ``submitted`` (the rest is computed)."""

    token: str
    owner: str
    seq: int
    original_filename: str
    md5hash: str
    size: int
    detected_pdbid: str | None
    dataset_type: str
    verdict: str
    verdict_details: str | None
    inserted: float
    phase: str = "uploaded"
    pdbid: str | None = None
    project_title: str | None = None
    project_authors: str | None = None
    synchrotron_id: int | None = None
    beamline_id: int | None = None
    equipment_other: str | None = None
    submitted_at: float = 0.0
    steps: int = 0  # steps advanced by polls (delay 0) or by /_sim/pdis/advance
    updated: float = 0.0
    last_status: str = "uploaded"


class PdisState:
    """Users, tokens and submissions of one simulator, persisted under ``root``.

    :param status_delay: seconds per status step (0: each poll advances one step; < 0: manual only).
    :param clock: wall-clock seconds; injectable so tests can step time.
    """

    def __init__(
        self,
        root: Path,
        users: list[tuple[str, str]],
        *,
        status_delay: float = 2.0,
        clock: Callable[[], float],
    ) -> None:
        self.root = root
        self.users: dict[str, str] = dict(users)
        self._user_ids = {email: 42 + i for i, (email, _) in enumerate(users)}
        self.status_delay = status_delay
        self.clock = clock
        self.equipment = EQUIPMENT
        self.lose_upload_responses = 0
        self.incoming = root / "incoming"
        self.store = root / "submissions"
        for d in (self.incoming, self.store):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.glob("*.part"):  # from a simulator that was killed mid-upload
            leftover.unlink()
        self._tokens_file = root / "tokens.json"
        self.tokens: dict[str, str] = {}
        if self._tokens_file.exists():
            self.tokens = orjson.loads(self._tokens_file.read_bytes())
        self.submissions: dict[str, Submission] = {}
        for meta in sorted(self.store.glob("*/meta.json")):
            sub = Submission(**orjson.loads(meta.read_bytes()))
            self.submissions[sub.token] = sub
        self._seq = max((s.seq for s in self.submissions.values()), default=0)

    # -- users -------------------------------------------------------------------------------------
    def user_id(self, email: str) -> int:
        return self._user_ids.get(email, 0)

    def token_for(self, email: str) -> str:
        """The user's API token, created (40 hex) on first use and kept."""
        for token, owner in self.tokens.items():
            if owner == email:
                return token
        token = secrets.token_hex(20)
        self.tokens[token] = email
        tmp = self._tokens_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(self.tokens))
        os.replace(tmp, self._tokens_file)
        return token

    # -- submissions -------------------------------------------------------------------------------
    def owned_by(self, email: str) -> Iterator[Submission]:
        return (s for s in self.submissions.values() if s.owner == email)

    def by_md5(self, md5: str) -> Submission | None:
        return next((s for s in self.submissions.values() if s.md5hash == md5), None)

    def pdb_exists(self, sub: Submission) -> bool:
        """True when another submission already holds the detected PDB id."""
        pdb = sub.detected_pdbid
        return bool(pdb) and any(
            s.token != sub.token and (s.pdbid or s.detected_pdbid) == pdb for s in self.submissions.values()
        )

    def add_upload(
        self,
        owner: str,
        tmp: Path,
        filename: str,
        md5: str,
        size: int,
        dataset_type: str,
        scan: ScanResult,
    ) -> Submission:
        """Move the received archive into place and record an ``uploaded`` submission."""
        token = secrets.token_hex(20)
        self._seq += 1
        now = self.clock()
        sub = Submission(
            token=token,
            owner=owner,
            seq=self._seq,
            original_filename=filename,
            md5hash=md5,
            size=size,
            detected_pdbid=scan.pdbid(filename),
            dataset_type=dataset_type,
            verdict=scan.verdict,
            verdict_details=scan.details,
            inserted=now,
            updated=now,
        )
        folder = self.store / token
        folder.mkdir()
        os.replace(tmp, folder / filename)
        self.submissions[token] = sub
        self._save(sub)
        return sub

    def archive_path(self, sub: Submission) -> Path:
        return self.store / sub.token / sub.original_filename

    def _save(self, sub: Submission) -> None:
        folder = self.store / sub.token
        tmp = folder / "meta.json.tmp"
        tmp.write_bytes(orjson.dumps(dataclasses.asdict(sub)))
        os.replace(tmp, folder / "meta.json")

    def delete(self, sub: Submission) -> None:
        self.submissions.pop(sub.token, None)
        shutil.rmtree(self.store / sub.token, ignore_errors=True)

    # -- metadata ----------------------------------------------------------------------------------
    def validate_metadata(self, form: Mapping[str, Any]) -> str | None:
        """The 400 message for invalid ``submit/`` fields (naming the field), or None when valid."""

        def text(key: str) -> str:
            value = form.get(key)
            return "" if value is None else str(value).strip()

        dataset_type = text("dataset_type") or "pdb"
        if dataset_type not in ("pdb", "other"):
            return "dataset_type: must be 'pdb' or 'other'."
        pdb = text("pdb_code")
        if pdb and not PDB_CODE.match(pdb):
            return "pdb_code: must be a 4-character PDB ID (a digit then three letters or digits)."
        if not pdb and dataset_type != "other":
            return "pdb_code: this field is required unless dataset_type is 'other'."
        sid, bid = text("synchrotron_id"), text("beamline_id")
        if bool(sid) != bool(bid):
            return "beamline_id: synchrotron_id and beamline_id must be given together."
        if sid:
            if not (sid.isdigit() and bid.isdigit()):
                return "synchrotron_id: synchrotron_id and beamline_id must be integers."
            synchrotron = next((e for e in self.equipment if e["id"] == int(sid)), None)
            if synchrotron is None:
                return f"synchrotron_id: unknown synchrotron {sid} (see GET equipment/)."
            if not any(b["id"] == int(bid) for b in synchrotron["beamlines"]):
                return f"beamline_id: beamline {bid} is not at synchrotron {synchrotron['short']}."
        if not pdb:
            title = text("project_title")
            if len(title) < 10:
                return "project_title: required without a pdb_code, at least 10 characters."
            if not text("project_authors"):
                return "project_authors: required without a pdb_code."
            if not sid and not text("equipment_other"):
                return "equipment_other: required without a pdb_code (or synchrotron_id + beamline_id)."
        return None

    def submit(self, sub: Submission, form: Mapping[str, Any]) -> None:
        """Record validated metadata and start the status clock."""

        def text(key: str) -> str | None:
            value = form.get(key)
            return str(value).strip() or None if value is not None else None

        pdb = text("pdb_code")
        sub.pdbid = pdb.upper() if pdb else None
        sub.dataset_type = text("dataset_type") or sub.dataset_type
        # with a PDB code the real server fetches title and authors from RCSB; we mark them as such
        sub.project_title = text("project_title") or (f"(from RCSB) entry {sub.pdbid}" if sub.pdbid else None)
        sub.project_authors = text("project_authors") or ("(from RCSB)" if sub.pdbid else None)
        sid, bid = text("synchrotron_id"), text("beamline_id")
        sub.synchrotron_id = int(sid) if sid else None
        sub.beamline_id = int(bid) if bid else None
        sub.equipment_other = text("equipment_other")
        sub.phase = "submitted"
        sub.submitted_at = sub.updated = self.clock()
        sub.steps = 0
        sub.last_status = "submitted"
        self._save(sub)

    # -- status clock ------------------------------------------------------------------------------
    def _path(self, sub: Submission) -> tuple[str, ...]:
        if sub.verdict == "published":
            return PATH_OK
        return ("submitted", "pending", sub.verdict)

    def status(self, sub: Submission) -> str:
        """The current status (computed from phase, steps and the clock)."""
        if sub.phase == "uploaded":
            return "uploaded"
        step = sub.steps
        if self.status_delay > 0:
            step += int((self.clock() - sub.submitted_at) / self.status_delay)
        path = self._path(sub)
        status = path[min(step, len(path) - 1)]
        if status != sub.last_status:
            sub.last_status, sub.updated = status, self.clock()
        return status

    def advance(self, sub: Submission, steps: int = 1) -> None:
        if sub.phase == "submitted":
            sub.steps += steps
            self._save(sub)

    def on_poll(self, sub: Submission) -> None:
        """A ``GET submissions/<token>/``: with a zero delay it advances one step."""
        if self.status_delay == 0:
            self.advance(sub)

    def to_json(self, sub: Submission) -> dict[str, Any]:
        status = self.status(sub)
        synchrotron = next((e for e in self.equipment if e["id"] == sub.synchrotron_id), None)
        beamline = next(
            (b for b in (synchrotron or {}).get("beamlines", []) if b["id"] == sub.beamline_id), None
        )
        return {
            "token": sub.token,
            "original_filename": sub.original_filename,
            "md5hash": sub.md5hash,
            "pdbid": sub.pdbid or sub.detected_pdbid,
            "dataset_type": sub.dataset_type,
            "project_title": sub.project_title,
            "project_authors": sub.project_authors,
            "synchrotron": {"id": synchrotron["id"], "short": synchrotron["short"]} if synchrotron else None,
            "beamline": {"id": beamline["id"], "short": beamline["short"]} if beamline else None,
            "equipment_other": sub.equipment_other,
            "status": status,
            "status_details": sub.verdict_details if status == sub.verdict and status in TERMINAL else None,
            "inserted": _iso(sub.inserted),
            "updated": _iso(sub.updated),
        }
