"""SIGKILL of the client at seeded byte offsets, then the same command again: over every target the second run
ends with the target equal to the source and nothing half-done left (``check``). The offsets are counted by
the target's server (its pause point holds every body at exactly that byte; for ascp the stand-in stalls
there; for the local target the child kills itself at that byte of its writes), never by the clock."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import pytest

from tests.chaos.outcome import FIGURES, Watch, check, run, run_killed, start
from tests.chaos.world import TARGETS, MiB, PdisTarget, Target, dataset

SLOW_POINTS = 20
#: one kill point per target in `make test` (the cheap ones); the slow suite takes 20 of each
FAST = ("local", "tus", "s3-moto", "gypsum", "immport-https")


def _kill_then_resume(world: Target, point: int) -> None:
    offset = random.Random(f"{world.name}:{point}").randrange(1, world.kill_range())
    first = run_killed(world, offset)
    second = run(world)
    if first.killed:
        FIGURES["kills_survived"] += 1
    check(world, second, ok=True, after_kill=first.killed)


@pytest.mark.parametrize("world", FAST, indirect=True)
def test_kill_at_a_byte_offset_then_resume(world: Target) -> None:
    _kill_then_resume(world, 0)


@pytest.mark.slow
@pytest.mark.parametrize("point", range(SLOW_POINTS))
@pytest.mark.parametrize("world", TARGETS, indirect=True)
def test_kill_at_seeded_offsets_then_resume(world: Target, point: int) -> None:
    _kill_then_resume(world, point)


@pytest.mark.parametrize("world", ["tus", "s3-moto", "s3-rclone"], indirect=True)
def test_a_kill_before_the_upload_is_journaled_leaves_nothing_behind(world: Target) -> None:
    """Killed while the first body byte of a multi-chunk file is held: the server has created the upload
    (tus POST, S3 CreateMultipartUpload), the journal may not know it yet. After the resume nothing of
    that upload may be left: no tus upload, no multipart upload."""
    world.make_source({"big.bin": dataset(3, (12 * MiB,))["a/f00.bin"]})
    assert run_killed(world, 1).killed
    second = run(world)
    check(world, second, ok=True)


@pytest.mark.parametrize("world", ["pdis"], indirect=True)
def test_a_pdis_upload_that_landed_as_its_client_was_killed_goes_when_the_data_changed(
        world: PdisTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    """PDIS stores the archive and the client is killed before it hears the answer (so its journal never
    learns the upload's token); then a file of the dataset changes. The resume's upload is a new submission:
    the first one, never submitted, must not stay 'uploaded' for ever."""
    state = world.state
    store = state.add_upload
    running: list[Any] = []

    def store_then_kill(*args: Any) -> Any:
        sub = store(*args)
        os.killpg(running[0].pid, signal.SIGKILL)
        return sub

    monkeypatch.setattr(state, "add_upload", store_then_kill)
    watch = Watch(start(world))
    running.append(watch.proc)
    assert watch.end().killed
    assert len(world._mine()) == 1  # it landed
    monkeypatch.setattr(state, "add_upload", store)
    (world.src / "a/f00.bin").write_bytes(b"changed since the killed run")
    check(world, run(world), ok=True)  # no second submission of the dataset is left (``leftovers``)
