"""Awkward names and files: names that are not UTF-8, names with a newline, 255-byte names, deep trees, symlink
loops, FIFOs and unreadable files, through the CLI over several targets; and trees drawn by hypothesis,
pushed and compared. Each run ends with ``check`` (the target equals the source, or a non-zero exit naming
what differs), and never hangs (a FIFO is not read, a symlink loop not followed)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncdepo import EngineConfig, push
from asyncdepo.adapters.local import LocalAdapter
from tests.chaos.outcome import check, params, run
from tests.chaos.test_recovery import run_unprivileged
from tests.chaos.world import Target, tree

KINDS = ("non-utf8", "newline", "long", "deep", "symlink-loop", "symlink-loop-followed", "fifo", "unreadable")


def _awkward(root: Path, kind: str) -> None:
    """Add one awkward entry of ``kind`` to the source ``root`` (which holds ordinary files already)."""
    base = os.fsencode(root)
    if kind == "non-utf8":
        os.makedirs(os.path.join(base, b"\xff\xfe dir"), exist_ok=True)
        with open(os.path.join(base, b"\xff\xfe dir", b"caf\xe9.bin"), "wb") as fh:
            fh.write(b"latin-1 name\n" * 100)
    elif kind == "newline":
        (root / "two\nlines.txt").write_bytes(b"a name with a newline\n")
    elif kind == "long":
        (root / ("L" * 251 + ".bin")).write_bytes(b"x" * 4000)  # 255 bytes, the most a Linux name may have
    elif kind == "deep":
        deep = root.joinpath(*[f"level{i:02d}" for i in range(40)])
        deep.mkdir(parents=True)
        (deep / "bottom.bin").write_bytes(b"deep" * 1000)
    elif kind.startswith("symlink-loop"):
        (root / "loop").symlink_to(".")
        (root / "self").symlink_to("self")
    elif kind == "fifo":
        os.mkfifo(root / "pipe")  # reading it would block for ever
    elif kind == "unreadable":
        (root / "secret.bin").write_bytes(b"nobody may read this")
        (root / "secret.bin").chmod(0)


#: (target, kind) -> must the run succeed? (None: only the rule of the suite)
OK = {
    ("s3-moto", "non-utf8"): False,  # an S3 key must be UTF-8: that file fails, named, the rest goes
    ("gypsum", "non-utf8"): None,
    ("s3-moto", "newline"): None,  # moto's router answers 404 to a key holding a newline (boto3's PUT too)
}
#: (target, kind) -> the item of #14 the case waits for (a strict xfail until it lands)
WAITING: dict[tuple[str, str], str] = {}
FAST = {("local", kind) for kind in KINDS} | {("gypsum", "unreadable")}


def _params(fast: bool) -> list[object]:
    targets = ("local", "tus", "s3-moto", "gypsum")
    return params([(t, kind, kind) for t in targets for kind in KINDS], fast=fast, fast_cases=FAST, waiting=WAITING)


def _awkward_run(world: Target, kind: str) -> None:
    _awkward(world.src, kind)
    if kind == "unreadable":
        outcome = run_unprivileged(world)
    elif kind == "symlink-loop-followed":
        outcome = run(world, "--follow-symlinks")
    elif kind == "long":
        outcome = run(world, "--retries", "0")  # a target that refuses the name fails it at once
    else:
        outcome = run(world)
    # a file nobody may read, and a link that leads nowhere (self -> self) when links are followed, are
    # failures the operator must see (as rsync's exit 23); the rest of the tree goes
    ok = False if kind in ("unreadable", "symlink-loop-followed") else OK.get((world.name, kind), True)
    check(world, outcome, ok=ok)
    if kind == "symlink-loop-followed":
        assert "self" in outcome.text and "loop" not in [line.split(":")[0] for line in outcome.text.splitlines()]


@pytest.mark.parametrize(("world", "kind"), _params(fast=True), indirect=["world"])
def test_awkward_names_and_files(world: Target, kind: str) -> None:
    _awkward_run(world, kind)


@pytest.mark.slow
@pytest.mark.parametrize(("world", "kind"), _params(fast=False), indirect=["world"])
def test_awkward_names_and_files_on_every_target(world: Target, kind: str) -> None:
    _awkward_run(world, kind)


# -- trees drawn by hypothesis -----------------------------------------------------------------------------
_NAME = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="/\0"), min_size=1, max_size=24)\
    .filter(lambda n: n not in (".", "..") and not n.endswith(".asyncdepo-part")
            and len(n.encode()) <= 200)
_TREE = st.dictionaries(st.lists(_NAME, min_size=1, max_size=4).map(tuple), st.binary(max_size=3000),
                        min_size=1, max_size=12)


def _consistent(files: dict[tuple[str, ...], bytes]) -> dict[str, bytes]:
    """Drop paths that would make a file and a folder of one name (``a`` and ``a/b``)."""
    out: dict[str, bytes] = {}
    dirs: set[str] = set()
    for parts, data in sorted(files.items(), key=lambda kv: len(kv[0])):
        prefixes = {"/".join(parts[:i]) for i in range(1, len(parts))}
        rel = "/".join(parts)
        if rel in dirs or prefixes & set(out):
            continue
        out[rel] = data
        dirs |= prefixes
    return out


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=_TREE)
def test_any_tree_of_names_lands_byte_for_byte(tmp_path_factory: pytest.TempPathFactory,
                                                files: dict[tuple[str, ...], bytes]) -> None:
    tmp = tmp_path_factory.mktemp("tree")
    wanted = _consistent(files)
    for rel, data in wanted.items():
        (tmp / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "src" / rel).write_bytes(data)
    cfg = EngineConfig(transfers=3, chunk_size=1024)

    async def go() -> bool:
        report = await push(tmp / "src", LocalAdapter(f"file://{tmp / 'dst'}", cfg), cfg,
                            journal_path=tmp / "journal.sqlite")
        return report.ok

    assert anyio.run(go)
    assert tree(tmp / "dst") == wanted
